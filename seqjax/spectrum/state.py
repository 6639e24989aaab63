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


def _valid_steps(lengths: Any, mask: Any, xs_bm: jax.Array) -> jax.Array | None:
    """``(*batch, T)`` bool, true at the steps a sequence reads (``t < lengths`` and ``mask``),
    or ``None`` when neither is given. Checked as ``unroll`` checks them (shape, dtype, range)."""
    if lengths is None and mask is None:
        return None
    from seqjax.unroll import _check_flags, _check_lengths, sequence_mask

    batch, T = tuple(xs_bm.shape[:-2]), int(xs_bm.shape[-2])
    valid = jnp.ones(batch + (T,), bool)
    if lengths is not None:
        valid = valid & sequence_mask(_check_lengths(lengths, batch, T), T)
    if mask is not None:
        valid = valid & _check_flags(mask, "mask", batch + (T,))
    return valid


def _mask_batch_major(mask: Any, xs: jax.Array, time_axis: int) -> Any:
    """``mask`` laid out like ``xs`` without features, moved to batch-major ``(*batch, T)``."""
    if mask is None:
        return None
    from seqjax._scan import time_axis_of

    ta = time_axis_of(time_axis, xs.ndim, name=f"xs of shape {tuple(xs.shape)}")
    mask = jnp.asarray(mask)
    if mask.ndim != xs.ndim - 1:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but needs xs.shape[:-1] = {tuple(xs.shape[:-1])} "
            "(one flag per sequence and step)."
        )
    return jnp.moveaxis(mask, ta, -1)


def _for_model(fn, model, params, xs, carry, lengths, mask, time_axis, **kwargs):
    """``fn`` over the recurrent cores of a whole model (``seqjax.spectrum.recurrent_cores``):
    ``{core name: fn(core.cell, core.params, core.xs, carry=core.carry, lengths=core.lengths, ...)}``."""
    from seqjax.spectrum.models import over_cores

    if carry is not None or mask is not None:
        raise ValueError(
            f"{fn.__name__}: carry= and mask= are for a single Cell; a whole model "
            f"({type(model).__name__}) sets each core's initial carry itself and takes lengths= for "
            "padded data. Analyse a core directly (seqjax.spectrum.recurrent_cores) to give them."
        )
    return over_cores(fn, model, params, xs, lengths=lengths, time_axis=time_axis, **kwargs)


def _vmap_lead(fn, nlead):
    for _ in range(nlead):
        fn = jax.vmap(fn)
    return fn
