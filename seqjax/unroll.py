"""Unrolling a cell over time: the one place in seqjax that calls ``jax.lax.scan``.

``unroll(cell, params, xs)`` scans ``cell.step`` over the time axis of ``xs`` and returns
``(final_carry, ys)``. Everything that changes how a sequence is walked (variable lengths,
masks, resets at episode boundaries, reversal, dropout masks shared across time, the
trajectory of carries and gates) lives here, so every cell, a user's own included, gets all
of it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._scan import time_scan
from seqjax._util import promote
from seqjax.cells import Cell, learnable_carry

__all__ = ["unroll", "UnrollAux", "sequence_mask", "learnable_carry", "check_params", "check_carry"]


class UnrollAux(NamedTuple):
    """Extra outputs of ``unroll`` when asked for.

    Attributes:
      carries: the carry after every step, a pytree like the carry whose leaves gain a time
        axis at ``time_axis`` (batch-major default: ``(*batch, T, ...)``); ``None`` unless
        ``return_carries=True``. For the LSTM this holds both ``h_t`` and ``c_t``.
      gates: ``cell.gates`` of every step, leaves ``(*batch, T, H)`` in the same layout;
        ``None`` unless ``return_gates=True``.
    """

    carries: Any
    gates: Any


# --------------------------------------------------------------------------- checks


def _fmt_path(path) -> str:
    return "params" + jax.tree_util.keystr(path) if path else "params"


def check_params(cell: Cell, params: Any, input_size: int) -> None:
    """Raise ``ValueError`` unless ``params`` has the tree and shapes ``cell.init`` makes.

    Runs ``cell.init`` abstractly (``jax.eval_shape``: no FLOPs), so it is cheap and works
    at trace time. Dtypes are not compared (float64 params are allowed).

    Args:
      cell: the cell.
      params: the params to check.
      input_size: the number of input features the params must accept.
    """
    try:
        expected = jax.eval_shape(lambda k: cell.init(k, input_size), jax.random.key(0))
    except ValueError as e:  # the cell rejected input_size itself
        raise ValueError(f"input_size={input_size}: {e}") from None
    exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(params)
    if exp_def != got_def:
        exp_keys = sorted(_fmt_path(p) for p, _ in exp_leaves)
        got_keys = sorted(_fmt_path(p) for p, _ in got_leaves)
        missing = sorted(set(exp_keys) - set(got_keys))
        extra = sorted(set(got_keys) - set(exp_keys))
        raise ValueError(
            "params do not match the cell: expected the tree "
            f"{exp_keys} (from cell.init(key, input_size={input_size})), got {got_keys}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
            + "."
        )
    bad = [
        f"{_fmt_path(path)} has shape {tuple(np.shape(g))} but this cell needs {tuple(e.shape)}"
        for (path, e), (_, g) in zip(exp_leaves, got_leaves)
        if tuple(np.shape(g)) != tuple(e.shape)
    ]
    if bad:
        raise ValueError(
            "; ".join(bad)
            + f" (for input_size={input_size}, the number of features of xs): either xs has the wrong "
            "feature size or the params were made for another input_size / hidden_size."
        )


def check_carry(
    cell: Cell, params: Any, carry: Any, batch_shape: tuple[int, ...], *, name: str = "carry"
) -> None:
    """Raise ``ValueError`` unless ``carry`` matches ``cell.initial_carry(params, batch_shape)``
    in tree structure and shapes, with floating leaves where the cell's are floating (the
    floating dtype itself follows the dtype rule: it is promoted with the params')."""
    expected = jax.eval_shape(lambda p: cell.initial_carry(p, batch_shape), params)
    exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(carry)
    if exp_def != got_def:
        raise ValueError(
            f"{name} has the tree {got_def} but the cell's carry is {exp_def}; "
            f"make it with cell.initial_carry(params, {batch_shape})."
        )
    for (path, e), (_, g) in zip(exp_leaves, got_leaves):
        where = name + jax.tree_util.keystr(path)
        if tuple(np.shape(g)) != tuple(e.shape):
            raise ValueError(
                f"{where} has shape {tuple(np.shape(g))} but needs {tuple(e.shape)} "
                f"(batch shape {batch_shape} of xs, then the cell's state size)."
            )
        if jnp.issubdtype(e.dtype, jnp.floating) and not jnp.issubdtype(jnp.result_type(g), jnp.floating):
            raise ValueError(
                f"{where} has dtype {jnp.result_type(g)} but the cell's carry is floating ({e.dtype})."
            )


def sequence_mask(lengths: jax.Array, max_len: int, *, time_axis: int = -1) -> jax.Array:
    """Boolean mask ``(*batch, max_len)``: ``mask[..., t] = t < lengths[...]``.

    Args:
      lengths: integer array ``(*batch,)``.
      max_len: ``T``.
      time_axis: where the time axis goes in the result (default last).
    """
    lengths = jnp.asarray(lengths)
    m = jnp.arange(max_len).reshape((1,) * lengths.ndim + (max_len,)) < lengths[..., None]
    return jnp.moveaxis(m, -1, time_axis)


def _is_concrete(x) -> bool:
    try:
        np.asarray(x)
        return True
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False


def _check_lengths(lengths, batch_shape, T):
    lengths = jnp.asarray(lengths)
    if tuple(lengths.shape) != tuple(batch_shape):
        raise ValueError(
            f"lengths has shape {tuple(lengths.shape)} but needs the batch shape of xs, {tuple(batch_shape)}."
        )
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}.")
    if _is_concrete(lengths) and lengths.size:
        lo, hi = int(np.min(np.asarray(lengths))), int(np.max(np.asarray(lengths)))
        if lo < 0 or hi > T:
            raise ValueError(
                f"lengths must lie in [0, T={T}] (T is the size of the time axis of xs), "
                f"got values from {lo} to {hi}."
            )
    return lengths


def _check_flags(arr, name, want_shape):
    arr = jnp.asarray(arr)
    if tuple(arr.shape) != tuple(want_shape):
        raise ValueError(
            f"{name} has shape {tuple(arr.shape)} but needs xs.shape[:-1] = {tuple(want_shape)} "
            "(one flag per sequence and step)."
        )
    return arr.astype(bool)


def _bcast(flag: jax.Array, leaf: jax.Array) -> jax.Array:
    """Reshape a per-sequence flag ``(*batch,)`` to broadcast against ``leaf: (*batch, ...)``."""
    return flag.reshape(flag.shape + (1,) * (leaf.ndim - flag.ndim))


def _select(flag, a, b):
    """``where(flag, a, b)`` leaf by leaf, with ``flag: (*batch,)``."""
    return jax.tree_util.tree_map(lambda x, y: jnp.where(_bcast(flag, x), x, y), a, b)


def _dropout_mask(key, rate, shape, dtype):
    keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return keep.astype(dtype) / (1.0 - rate)


def _recurrent_leaves(carry):
    """The carry leaves recurrent dropout acts on: ``h`` of a carry with an ``h`` field,
    otherwise every floating leaf."""
    if hasattr(carry, "h") and hasattr(carry, "_replace"):
        return "h"
    return None


def _check_rate(rate, name):
    if not (0.0 <= float(rate) < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got {rate}.")


# --------------------------------------------------------------------------- the time scan


_BPTT_MODES = ("auto", "fused", "autodiff")


def _check_bptt_options(bptt, truncate, remat, T):
    if bptt not in _BPTT_MODES:
        raise ValueError(f"bptt must be one of {_BPTT_MODES}, got {bptt!r}.")
    if truncate is not None and (
        not isinstance(truncate, (int, np.integer)) or isinstance(truncate, bool) or truncate < 1
    ):
        raise ValueError(f"truncate must be None or a positive integer (steps), got {truncate!r}.")
    if remat in (False, None, True, "step"):
        return
    if not isinstance(remat, (int, np.integer)) or isinstance(remat, bool) or remat < 1:
        raise ValueError(
            f"remat must be False, True / 'step' (checkpoint every step) or a positive integer k "
            f"(checkpoint segments of k steps), got {remat!r}."
        )


def _kernel_refusals(cell, requested, return_gates, recurrent_dropout, remat, T) -> list[str]:
    """Why ``cell.kernel`` cannot run this request (empty: it can). Declared capabilities only."""
    if cell.kernel is None:
        return ["the cell has no kernel capability (cell.kernel is None)"]
    why = [
        f"its kernel does not accept {name!r} (kernel.accepts = {sorted(cell.kernel.accepts)})"
        for name, on in requested.items()
        if on and name not in cell.kernel.accepts
    ]
    if return_gates:
        why.append("return_gates=True")
    if recurrent_dropout:
        why.append("recurrent_dropout (it changes the step)")
    if remat not in (False, None):
        why.append("remat")
    if T == 0:
        why.append("T = 0")
    return why


def _keep_flags(T, truncate, reverse, dtype):
    """``(T,)`` in time order: 0 where the gradient through the carry entering step t is cut
    (scan position s = 1..T-1 with s % truncate == 0; s counts in scan order), else 1."""
    s = np.arange(T)
    if reverse:
        s = T - 1 - s
    keep = ~((s % truncate == 0) & (s > 0))
    return jnp.asarray(keep, dtype)


# --------------------------------------------------------------------------- unroll


def unroll(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    *,
    carry: Any = None,
    lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    resets: jax.Array | None = None,
    reverse: bool = False,
    time_axis: int = -2,
    return_carries: bool = False,
    return_gates: bool = False,
    input_dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    key: jax.Array | None = None,
    unroll: int | bool = 1,
    bptt: str = "auto",
    truncate: int | None = None,
    remat: bool | int | str = False,
):
    r"""Run ``cell`` over a sequence with ``jax.lax.scan``.

    ``carry_t, y_t = cell.step(params, carry_{t-1}, x_t)`` for ``t = 1..T`` (or ``T..1``
    with ``reverse=True``), starting from ``carry`` (default ``cell.initial_carry``: zeros).

    Shapes (batch-major default, ``time_axis=-2``)::

        xs: (*batch, T, I)   ys: (*batch, T, O)   lengths: (*batch,)   mask, resets: (*batch, T)

    With ``time_axis=0`` everything is time-major: ``xs: (T, *batch, I)``. Any number of
    batch dimensions (including none: ``xs: (T, I)``) works.

    Variable lengths (``lengths``) and masks: where ``mask[b, t]`` is false (or
    ``t >= lengths[b]``) the carry holds still and ``y_t = 0``. So past its own end a
    sequence's carry stops changing and the final carry is the carry at its own last step,
    as PyTorch's packed sequences and Flax's ``seq_lengths`` behave. With ``reverse=True``
    and ``lengths``, each sequence is read from its own last step back to step 0 (padded
    steps come first in reverse order and leave the carry at its initial value).

    Resets: where ``resets[b, t]`` is true the carry returns to its initial value (the
    ``carry`` given, or the cell's initial carry) *before* step ``t``: ``x_t`` starts a new
    episode.

    Recurrent (variational) dropout (Gal & Ghahramani 2016): one Bernoulli mask per
    sequence, shared by every step, on the inputs (``input_dropout``) and on the recurrent
    state fed back into the step (``recurrent_dropout``; the ``h`` field of a carry that has
    one, such as ``LSTMState``, else every carry leaf). Kept units are scaled by
    ``1/(1 - rate)``. Needs ``key``.

    Args:
      cell: a ``Cell``.
      params: the cell's params; checked against ``cell.init`` (tree and shapes).
      xs: inputs, features last.
      carry: initial carry with leaves ``(*batch, ...)``; default ``cell.initial_carry``.
      lengths: integer ``(*batch,)`` in ``[0, T]``.
      mask: boolean ``(*batch, T)`` (layout of ``xs`` without the feature axis).
      resets: boolean ``(*batch, T)``.
      reverse: scan from the last step to the first; outputs stay in input order.
      time_axis: the time axis of ``xs`` (default ``-2``; ``0`` for time-major).
      return_carries: also return every step's carry (the state trajectory).
      return_gates: also return every step's gate activations (needs ``cell.gates``).
      input_dropout, recurrent_dropout: dropout rates in ``[0, 1)``.
      key: PRNG key for dropout.
      unroll: passed to ``lax.scan``.
      bptt: how gradients are computed. ``"auto"`` (default): the cell's fused BPTT kernel
        (its ``kernel`` capability, e.g. the ``jax.custom_vjp`` that ``rnn``, ``lstm``,
        ``gru``, ``janet`` and stacks or wrappers of them carry) whenever the kernel accepts
        every option asked for (``Kernel.accepts``) and neither ``return_gates``,
        ``recurrent_dropout`` nor ``remat`` is set; else autodiff of the plain scan.
        ``"fused"``: the kernel or a ``ValueError`` saying why not. ``"autodiff"``: always
        ``jax.grad`` through the plain scan (needed for forward-mode
        ``jax.jvp``/``jax.jacfwd``/``jax.hessian``, which a ``custom_vjp`` does not support;
        ``jax.grad`` of ``jax.grad`` works on both paths).
      truncate: truncated BPTT: the gradient through the carry is stopped every ``truncate``
        steps (``stop_gradient`` on the carry entering scan positions ``k, 2k, ...``; the
        initial carry still gets the gradient of the first ``k`` steps). Forward values are
        unchanged.
      remat: rematerialisation for long sequences (autodiff path). ``True`` or ``"step"``:
        checkpoint the step body (residuals per step: the carry only). An integer ``k``:
        checkpoint segments of ``k`` steps (an outer scan over ``ceil(T/k)`` segments whose
        body is a checkpointed inner scan; memory ``O(T/k + k)`` carries, about one extra
        forward pass of compute; ``k ~ sqrt(T)`` minimises memory).

    Dtypes: params, floating inputs and the carry are cast to their promoted dtype
    (``jnp.result_type``) before the scan; integer inputs are left alone; gradients come back
    in each argument's own dtype (``docs/design/cells.md``, the dtype rule).

    Returns:
      ``(final_carry, ys)``, or ``(final_carry, ys, UnrollAux(carries, gates))`` when
      ``return_carries`` or ``return_gates`` is set.

    Raises:
      ValueError: at trace time, for params that do not fit the cell or ``xs``, a carry of
        the wrong tree/shape/dtype, ``lengths``/``mask``/``resets`` of the wrong shape or
        (when concrete) lengths outside ``[0, T]``, a bad ``time_axis``, or dropout without
        a key.
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"cell must be a seqjax.Cell, got {type(cell).__name__}.")
    xs = jnp.asarray(xs)
    if xs.ndim < 2:
        raise ValueError(
            f"xs has shape {tuple(xs.shape)} but needs at least 2 dims: (*batch, T, features) "
            "with time_axis=-2, or (T, *batch, features) with time_axis=0."
        )
    ta = time_axis + xs.ndim if time_axis < 0 else time_axis
    if not 0 <= ta < xs.ndim - 1:
        raise ValueError(
            f"time_axis={time_axis} is not a valid time axis for xs of shape {tuple(xs.shape)} "
            "(the last axis holds the features)."
        )
    T = xs.shape[ta]
    xs_tm = jnp.moveaxis(xs, ta, 0)  # (T, *batch, I)
    batch_shape = tuple(xs_tm.shape[1:-1])
    input_size = xs.shape[-1]
    check_params(cell, params, input_size)
    if carry is not None:
        check_carry(cell, params, carry, batch_shape)
    # The dtype rule: params, floating inputs and carry meet in their promoted dtype.
    params, xs_tm, carry, _ = promote(params, xs_tm, carry)
    carry0 = cell.initial_carry(params, batch_shape) if carry is None else carry

    flags = None
    if lengths is not None:
        lengths = _check_lengths(lengths, batch_shape, T)
        flags = jnp.arange(T).reshape((T,) + (1,) * len(batch_shape)) < lengths[None]
    if mask is not None:
        m = jnp.moveaxis(_check_flags(mask, "mask", xs.shape[:-1]), ta, 0)
        flags = m if flags is None else flags & m
    rs = None
    if resets is not None:
        rs = jnp.moveaxis(_check_flags(resets, "resets", xs.shape[:-1]), ta, 0)
    if return_gates and cell.gates is None:
        raise ValueError("return_gates=True needs a cell with a gates function; this cell has none.")

    _check_rate(input_dropout, "input_dropout")
    _check_rate(recurrent_dropout, "recurrent_dropout")
    x_mask = None
    h_mask = None
    if input_dropout or recurrent_dropout:
        if key is None:
            raise ValueError("dropout needs a PRNG key: pass key=jax.random.key(...).")
        k_x, k_h = jax.random.split(key)
        if input_dropout:
            x_mask = _dropout_mask(k_x, input_dropout, batch_shape + (input_size,), xs_tm.dtype)
        if recurrent_dropout:
            field = _recurrent_leaves(carry0)
            target = getattr(carry0, field) if field else carry0
            leaves, treedef = jax.tree_util.tree_flatten(target)
            ks = jax.random.split(k_h, max(len(leaves), 1))
            h_mask = (
                field,
                jax.tree_util.tree_unflatten(
                    treedef,
                    [
                        _dropout_mask(k, recurrent_dropout, leaf.shape, leaf.dtype)
                        for k, leaf in zip(ks, leaves)
                    ],
                ),
            )

    def drop_carry(c):
        if h_mask is None:
            return c
        field, m = h_mask
        if field:
            return c._replace(**{field: jax.tree_util.tree_map(jnp.multiply, getattr(c, field), m)})
        return jax.tree_util.tree_map(jnp.multiply, c, m)

    _check_bptt_options(bptt, truncate, remat, T)
    c_leaves = jax.tree_util.tree_leaves(carry0)
    f_dtype = jnp.result_type(*c_leaves) if c_leaves else xs.dtype
    keep = None if truncate is None or T == 0 else _keep_flags(T, truncate, reverse, f_dtype)

    def back(a):
        return jnp.moveaxis(a, 0, ta)

    if bptt != "autodiff":
        requested = {
            "mask": flags is not None,
            "resets": rs is not None,
            "truncate": keep is not None,
            "reverse": bool(reverse),
            "trajectory": bool(return_carries),
        }
        why = _kernel_refusals(cell, requested, return_gates, recurrent_dropout, remat, T)
        if not why:
            x_in = xs_tm if x_mask is None else xs_tm * x_mask[None]
            final, ys, carries = cell.kernel.run(
                params,
                carry0,
                x_in,
                mask=flags,
                resets=rs,
                keep=keep,
                reverse=bool(reverse),
                unroll=unroll,
                trajectory=bool(return_carries),
            )
            ys = back(ys)
            if not return_carries:
                return final, ys
            return final, ys, UnrollAux(jax.tree_util.tree_map(back, carries), None)
        if bptt == "fused":
            raise ValueError(f"bptt='fused' is not available here: {'; '.join(why)}. Use bptt='auto'.")

    def body(c, inp):
        x, m, r, k = inp
        if k is not None:  # truncated BPTT: cut the gradient through the carry here
            c = jax.tree_util.tree_map(lambda a: jnp.where(k > 0, a, jax.lax.stop_gradient(a)), c)
        if r is not None:
            c = _select(r, carry0, c)
        c_in = drop_carry(c)
        x_in = x if x_mask is None else x * x_mask
        c_new, y = cell.step(params, c_in, x_in)
        g = cell.gates(params, c_in, x_in) if return_gates else None
        if m is not None:
            c_new = _select(m, c_new, c)
            y = jnp.where(_bcast(m, y), y, jnp.zeros_like(y))
            if g is not None:
                g = jax.tree_util.tree_map(lambda a: jnp.where(_bcast(m, a), a, jnp.zeros_like(a)), g)
        out = (y, c_new if return_carries else None, g)
        return c_new, out

    inputs = (xs_tm, flags, rs, keep)
    if remat in (False, None):
        final, (ys, carries, gates) = time_scan(body, carry0, inputs, reverse=reverse, unroll=unroll)
    elif remat is True or remat == "step":
        final, (ys, carries, gates) = time_scan(
            jax.checkpoint(body), carry0, inputs, reverse=reverse, unroll=unroll
        )
    else:  # segments of k steps, each a checkpointed inner scan
        k = int(remat)
        n = -(-T // k)
        pad = n * k - T
        if pad:  # padded steps come last in time order and leave the carry unchanged
            valid = jnp.arange(n * k).reshape((n * k,) + (1,) * len(batch_shape)) < T
            valid = jnp.broadcast_to(valid, (n * k,) + batch_shape)

            def pad_t(a, fill=0):
                if a is None:
                    return None
                return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)

            flags_p = valid if flags is None else valid & pad_t(flags, False)
            inputs = (pad_t(xs_tm), flags_p, pad_t(rs, False), pad_t(keep, 1))
        inputs = jax.tree_util.tree_map(lambda a: a.reshape((n, k) + a.shape[1:]), inputs)

        @jax.checkpoint
        def segment(c, seg):
            return time_scan(body, c, seg, reverse=reverse, unroll=unroll)

        final, outs = time_scan(segment, carry0, inputs, reverse=reverse)
        ys, carries, gates = jax.tree_util.tree_map(lambda a: a.reshape((n * k,) + a.shape[2:])[:T], outs)

    ys = jax.tree_util.tree_map(back, ys)
    if not (return_carries or return_gates):
        return final, ys
    aux = UnrollAux(
        jax.tree_util.tree_map(back, carries) if return_carries else None,
        jax.tree_util.tree_map(back, gates) if return_gates else None,
    )
    return final, ys, aux
