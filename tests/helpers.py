"""Shared test helpers (one module; built on chex, the JAX ecosystem's test vocabulary).

* ``x64_enabled()``: float64 inside a block, restored after (compare in float64 where
  exactness matters).
* ``assert_trees_close(a, b, rtol, atol)``: ``chex.assert_trees_all_close`` with the
  tolerance stated at the call site.
* ``TraceCounter``: counts how often a function is traced (compile-once checks), beside
  ``chex.assert_max_traces``.
* ``random_like(tree, seed)``: a float64 NumPy tree of random numbers shaped like ``tree``.
"""

from __future__ import annotations

import contextlib
import pathlib

import chex
import jax
import numpy as np

__all__ = ["x64_enabled", "assert_trees_close", "TraceCounter", "random_like"]


@contextlib.contextmanager
def x64_enabled():
    """Float64 inside the block, restored after."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def assert_trees_close(a, b, *, rtol: float, atol: float = 0.0) -> None:
    """Same tree structure, every leaf close (``chex.assert_trees_all_close``)."""
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


class TraceCounter:
    """Wrap a function; ``count`` is how many times JAX traced it (Python calls under jit)."""

    def __init__(self, fn):
        self.fn = fn
        self.count = 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.fn(*args, **kwargs)


def random_like(tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: rng.standard_normal(np.shape(a)), tree)


SLOW_TIER_FILE = pathlib.Path(__file__).with_name("slow_tier.txt")


def extended_tier() -> set[str]:
    """Node ids listed in ``extended_tier.txt``: they run only with ``--runextended``."""
    lines = (SLOW_TIER_FILE.parent / "extended_tier.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def slow_tier() -> set[str]:
    """Node ids listed in ``slow_tier.txt``: they run only with ``--runslow``."""
    lines = SLOW_TIER_FILE.read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}
