"""The recurrent state vector ``s``: a carry pytree flattened (leaves in tree order, each
raveled) and back, its length ``S``, and the flattened step ``F(s, x) -> s'`` every other
module of ``seqjax.spectrum`` works on. Also ``_vmap_lead``, the one way these modules map
a per-sequence function over leading batch axes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.cells import Cell

__all__ = [
    "flatten_state",
    "unflatten_state",
    "state_size",
]


def flatten_state(carry: Any, *, batch_ndim: int = 0) -> jax.Array:
    """Flatten a carry pytree to the state vector ``s``.

    Each leaf ``(*batch, ...)`` is reshaped to ``(*batch, -1)`` and the leaves are
    concatenated in tree order (the order of ``jax.tree_util.tree_leaves``; for
    ``LSTMState(h, c)`` that is ``[h, c]``). With ``batch_ndim=0`` this equals
    ``jax.flatten_util.ravel_pytree(carry)[0]``.

    Args:
      carry: the carry, leaves ``(*batch, ...)``.
      batch_ndim: how many leading axes are batch axes.

    Returns:
      ``s: (*batch, S)``.
    """
    leaves = jax.tree_util.tree_leaves(carry)
    if not leaves:
        raise ValueError("flatten_state: the carry has no array leaves.")
    batch = tuple(leaves[0].shape[:batch_ndim])
    for leaf in leaves:
        if tuple(leaf.shape[:batch_ndim]) != batch:
            raise ValueError(
                f"flatten_state: leaves disagree on the batch shape: {tuple(leaf.shape[:batch_ndim])} "
                f"vs {batch} (batch_ndim={batch_ndim})."
            )
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([jnp.reshape(a, batch + (-1,)).astype(dtype) for a in leaves], axis=-1)


def unflatten_state(s: jax.Array, like: Any) -> Any:
    """Inverse of ``flatten_state``: split ``s: (*batch, S)`` into a carry shaped like ``like``.

    Args:
      s: state vectors ``(*batch, S)``.
      like: an *unbatched* carry (leaves without batch axes), e.g.
        ``cell.initial_carry(params, ())``; only its structure, shapes and dtypes are used.

    Returns:
      A carry with leaves ``(*batch, *leaf_shape)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [int(np.prod(np.shape(a), dtype=int)) for a in leaves]
    if s.shape[-1] != sum(sizes):
        raise ValueError(
            f"unflatten_state: s has shape {tuple(s.shape)} but the carry holds {sum(sizes)} numbers "
            f"(needs (*batch, {sum(sizes)}))."
        )
    batch = tuple(s.shape[:-1])
    out, start = [], 0
    for a, n in zip(leaves, sizes):
        out.append(
            jnp.reshape(s[..., start : start + n], batch + tuple(np.shape(a))).astype(jnp.result_type(a))
        )
        start += n
    return jax.tree_util.tree_unflatten(treedef, out)


def state_size(cell: Cell, params: Any) -> int:
    """``S``, the length of the flattened state of ``cell`` with ``params`` (``2H`` for the LSTM)."""
    like = jax.eval_shape(lambda p: cell.initial_carry(p, ()), params)
    return int(sum(int(np.prod(a.shape, dtype=int)) for a in jax.tree_util.tree_leaves(like)))


def _like(cell: Cell, params: Any) -> Any:
    return jax.eval_shape(lambda p: cell.initial_carry(p, ()), params)


def _flat_step(cell: Cell, params: Any, like: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``F(s, x) -> s'`` on unbatched flat states."""

    def f(s, x):
        carry, _ = cell.step(params, unflatten_state(s, like), x)
        return flatten_state(carry).astype(s.dtype)

    return f


def _vmap_lead(fn, nlead):
    for _ in range(nlead):
        fn = jax.vmap(fn)
    return fn
