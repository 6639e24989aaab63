"""Shared test configuration.

Strict by default: rank promotion raises (no silent broadcasting of wrong shapes) and
warnings are errors (pyproject). Slow tests run only with ``--runslow`` (``.ci/run`` and
the README's test command pass it).
"""

import contextlib

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (as .ci/run does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@contextlib.contextmanager
def enable_x64():
    """Float64 inside the block, restored after (compare in float64 where exactness matters)."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


@pytest.fixture
def x64():
    with enable_x64():
        yield
