"""Small helpers at the bottom of the import graph (imports nothing of seqjax).

* ``bind``: a function with static, hashable configuration. Two cells (or initialisers)
  built with the same arguments hold equal ``Bound`` objects, so they compare equal, hash
  alike, and can be static arguments of ``jax.jit`` without a retrace when rebuilt.
* The dtype rule (``compute_dtype``, ``cast_floating``, ``promote``): see
  ``docs/design/cells.md``.
* ``positive_int``: the one positive-integer check.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Bound",
    "Opaque",
    "bind",
    "positive_int",
    "compute_dtype",
    "cast_floating",
    "promote",
    "is_floating",
    "same_treedef",
]


@dataclasses.dataclass(frozen=True)
class Bound:
    """``fn`` with keyword configuration ``config`` (a sorted tuple of ``(name, value)``).

    ``Bound(fn, config)(*args)`` calls ``fn(*args, **dict(config))``. Equality and hashing
    are by ``(fn, config)``: ``fn`` is a module-level function (compared by identity, which
    is stable), the values are hashable (strings, numbers, ``None``, tuples, cells, other
    ``Bound`` objects; a user's callable compares by identity).
    """

    fn: Callable
    config: tuple

    def __call__(self, *args, **kwargs):
        config = {k: (v.value if isinstance(v, Opaque) else v) for k, v in self.config}
        return self.fn(*args, **config, **kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config)
        return f"{getattr(self.fn, '__name__', self.fn)}({args})"


def _hashable(value):
    try:
        hash(value)
        return value
    except TypeError:  # an array, a mutable object: held by identity
        return Opaque(value)


def bind(fn: Callable, **config) -> Bound:
    """``fn`` with hashable keyword configuration (see ``Bound``). A value that cannot be
    hashed (an array, a mutable object) is held by identity (``Opaque``) and passed through
    unwrapped when ``fn`` is called."""
    return Bound(fn, tuple(sorted((k, _hashable(v)) for k, v in config.items())))


def positive_int(value: Any, name: str, what: str = "") -> int:
    """``int(value)`` if it is a positive integer (not a bool), else ``ValueError`` naming ``name``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer{what}, got {value!r}.")
    return int(value)


def same_treedef(a: Any, b: Any) -> bool:
    """Whether two ``PyTreeDef`` values are equal (``a == b``). A function of its own because
    jaxlib ships no type stub for ``PyTreeDef``, so type checkers reject ``==`` on it."""
    return bool(a == b)


def write_atomically(path, write: Callable[[Any], None], *, newline: str | None = None) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``: a
    reader never sees a half-written file, and a crash leaves the old file in place. The
    folder of ``path`` is created when missing."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline=newline) as f:
        write(f)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the dtype rule


def is_floating(a: Any) -> bool:
    """Whether ``a`` (an array or ``ShapeDtypeStruct``) has a real floating dtype."""
    return jnp.issubdtype(jnp.result_type(a), jnp.floating)


def compute_dtype(*trees: Any) -> jnp.dtype | None:
    """The dtype a computation on ``trees`` runs in: the JAX promotion of their floating leaves.

    Integer and boolean leaves (token ids, masks, lengths) take no part. ``None`` when no
    floating leaf exists. Complex leaves are refused: seqjax cells are real.
    """
    dts = []
    for tree in trees:
        for leaf in jax.tree_util.tree_leaves(tree):
            dt = jnp.result_type(leaf)
            if jnp.issubdtype(dt, jnp.complexfloating):
                raise ValueError(
                    f"seqjax computes in real floating dtypes; got a leaf of dtype {dt} "
                    f"(shape {tuple(np.shape(leaf))}). Split complex data into real and imaginary features."
                )
            if jnp.issubdtype(dt, jnp.floating):
                dts.append(dt)
    return jnp.result_type(*dts) if dts else None


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast every floating leaf of ``tree`` to ``dtype`` (a no-op for leaves already in it).

    The cast is differentiable: a gradient comes back in each leaf's own dtype.
    """
    if dtype is None:
        return tree

    def cast(a):
        if is_floating(a) and jnp.result_type(a) != dtype:
            return jnp.asarray(a).astype(dtype)
        return a

    return jax.tree_util.tree_map(cast, tree)


def promote(params: Any, xs: Any, carry: Any = None) -> tuple[Any, Any, Any, Any]:
    """Apply the dtype rule at the entry of a function that runs a cell over data.

    Returns ``(params, xs, carry, dtype)`` with every floating leaf cast to
    ``dtype = compute_dtype(params, xs, carry)``.
    """
    dtype = compute_dtype(params, xs, carry)
    return cast_floating(params, dtype), cast_floating(xs, dtype), cast_floating(carry, dtype), dtype


class Opaque:
    """Holds a value that is not hashable (a PRNG key, a traced array) and compares by
    identity, so a ``Bound`` configuration can carry it."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Opaque) and other.value is self.value

    def __hash__(self):
        return id(self.value)

    def __repr__(self):
        return f"Opaque({type(self.value).__name__})"
