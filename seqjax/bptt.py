"""Backpropagation through time: the fused fast path, truncation, chunked streams, gradient norms.

BPTT for an Elman cell ``h_t = f(net_t)``, ``net_t = x_t W_x + h_{t-1} W_h + b`` (row vectors):
the error term travels back one step at a time,

    delta_t = dL/dnet_t = (dL/dh_t) * f'(net_t),     dL/dh_{t-1} += delta_t W_h^T,

and the weight gradients are sums over time of outer products,

    dL/dW_h = sum_t h_{t-1}^T delta_t = H_prev^T Delta,   dL/dW_x = X^T Delta,   dL/db = sum_t delta_t,

so they are computed *after* the reverse scan as one large matmul over the stacked ``(T*B)`` rows.

The fused kernels themselves belong to the cells (their ``kernel`` capability; the shared
driver for gated cells of the affine form is ``seqjax.cells._fused``, where each family's
gate equations and their derivatives are written once). ``unroll`` runs a cell's kernel
whenever the kernel accepts the options asked for. Reverse-over-reverse second derivatives
(``jax.grad`` of ``jax.grad``) work through a kernel (JAX differentiates the backward rule);
forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) does not
(``custom_vjp``): use ``gradient=seqjax.gradients.Autodiff()`` for it. The gradient strategies
themselves (``Auto``, ``Fused``, ``Autodiff``, ``Remat``, ``Truncate``) are in
``seqjax.gradients``.

Also here: ``chunk_stream`` and ``tbptt`` (stateful truncated BPTT over a long stream) and
``gradient_norms`` (``||dL/ds_t||`` for every step from one backward pass).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._scan import batch_shape_of_xs, time_axis_of, time_scan
from seqjax._util import cast_floating, compute_dtype, positive_int, promote
from seqjax.cells import Cell
from seqjax.gradients import Auto, Autodiff, resolve
from seqjax.unroll import sequence_mask, unroll

__all__ = [
    "fused_supported",
    "chunk_stream",
    "tbptt",
    "gradient_norms",
    "GradientNorms",
]

# --------------------------------------------------------------------------- which cells are fused


def fused_supported(cell: Cell) -> bool:
    """Whether ``cell`` carries a fused BPTT kernel (its ``kernel`` capability).

    Built-in ``rnn``, ``lstm`` (without projection), ``gru`` and ``janet`` carry one, and so
    do ``learnable_carry``, ``stack`` and ``seqjax.cells.wrap`` of cells
    that do. A cell without one runs through autodiff of the plain scan, which gives the
    same gradients, only slower.
    """
    return isinstance(cell, Cell) and cell.kernel is not None


# --------------------------------------------------------------------------- truncated BPTT over streams


def chunk_stream(xs: jax.Array, chunk: int, *, time_axis: int = -2) -> jax.Array:
    """Split a long stream into consecutive chunks of ``chunk`` steps.

    ``(*batch, T, F) -> (T // chunk, *batch, chunk, F)`` (chunk index first, so the result can
    be scanned over); with ``time_axis=0``: ``(T, *batch, F) -> (T // chunk, chunk, *batch, F)``.

    Args:
      xs: the stream, with a time axis at ``time_axis``.
      chunk: steps per chunk; must divide ``T`` (trim or pad the stream first).
      time_axis: the time axis of ``xs``.

    Returns:
      The chunks, chunk ``n`` holding steps ``n*chunk .. (n+1)*chunk - 1``.

    Raises:
      ValueError: if ``chunk`` does not divide ``T`` or is not a positive integer.
    """
    xs = jnp.asarray(xs)
    ta = time_axis_of(time_axis, xs.ndim, name=f"xs of shape {tuple(xs.shape)}", features=False)
    positive_int(chunk, "chunk")
    T = xs.shape[ta]
    if T % chunk:
        raise ValueError(
            f"chunk={chunk} does not divide the stream length T={T} (xs shape {tuple(xs.shape)}, "
            f"time_axis={time_axis}); trim the stream to {T - T % chunk} steps or pad it."
        )
    n = T // chunk
    split = xs.reshape(xs.shape[:ta] + (n, chunk) + xs.shape[ta + 1 :])
    return jnp.moveaxis(split, ta, 0)


def tbptt(
    cell: Cell,
    params,
    xs: jax.Array,
    loss_fn: Callable,
    *,
    chunk: int,
    targets=None,
    carry=None,
    update: Callable | None = None,
    state=None,
    time_axis: int = -2,
    **unroll_kwargs,
):
    r"""Stateful truncated BPTT over one long stream (how language models are trained).

    The stream is cut into ``N = T // chunk`` consecutive chunks. Chunk ``n`` starts from the
    carry the previous chunk ended with, with its gradient stopped, so each chunk's loss
    ``L_n = loss_fn(ys_n[, targets_n])`` is back-propagated through at most ``chunk`` steps:

    ```text
    carry_n, ys_n = unroll(cell, params, x_n, carry=stop_gradient(carry_{n-1}))
    g_n = dL_n / dparams
    ```

    Without ``update`` the gradients are summed (``sum_n g_n``: the truncated gradient of the
    total loss, which equals ``unroll(..., gradient=Truncate(chunk))`` for a loss that sums over
    steps).
    With ``update(params, g_n, state) -> (params, state)`` (e.g. an optax step) the params are
    updated after every chunk, as in online TBPTT training.

    Args:
      cell: the cell.
      params: its params.
      xs: the stream ``(*batch, T, I)`` (or time-major with ``time_axis=0``).
      loss_fn: ``loss_fn(ys_n) -> scalar`` or, with ``targets``, ``loss_fn(ys_n, targets_n)``;
        ``ys_n`` has the layout of ``unroll``'s ``ys`` over one chunk.
      chunk: steps per chunk (must divide ``T``).
      targets: optional pytree of arrays with the same time axis as ``xs``, chunked alike.
      carry: the initial carry (default zeros).
      update: optional ``(params, grads, state) -> (params, state)``.
      state: the initial ``state`` for ``update`` (e.g. an optax optimiser state).
      time_axis: the time axis of ``xs`` and ``targets``.
      **unroll_kwargs: passed to ``unroll`` for every chunk (``gradient``, ``solver``, ...).

    Returns:
      Without ``update``: ``(losses (N,), grads, final_carry)``.
      With ``update``: ``(losses (N,), params, state, final_carry)``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.rnn(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> stream, target = jnp.ones((2, 10, 3)), jnp.zeros((2, 10, 4))
      >>> def mse(ys, t):
      ...     return jnp.mean((ys - t) ** 2)
      >>> losses, grads, carry = seqjax.tbptt(cell, params, stream, mse, chunk=5, targets=target)
      >>> print(losses.shape, grads["w_h"].shape, carry.shape)    # N = 10 // 5 chunks
      (2,) (4, 4) (2, 4)

      ``grads`` is ``jax.grad`` of ``sum_n L_n`` through
      ``unroll(cell, params, stream, gradient=seqjax.gradients.Truncate(5))``.
    """

    chunks = chunk_stream(xs, chunk, time_axis=time_axis)
    t_chunks = (
        None
        if targets is None
        else jax.tree_util.tree_map(lambda a: chunk_stream(a, chunk, time_axis=time_axis), targets)
    )
    ta = time_axis_of(time_axis, xs.ndim, name=f"xs of shape {tuple(xs.shape)}")
    batch_shape = batch_shape_of_xs(xs.shape, ta)
    carry0 = cell.initial_carry(params, batch_shape) if carry is None else carry
    # The dtype rule: the stream and the carry in the compute dtype (params keep theirs, so the
    # gradients and ``update`` see the params' own dtype; each chunk's unroll casts them).
    dtype = compute_dtype(params, xs, carry0)
    chunks, carry0 = cast_floating(chunks, dtype), cast_floating(carry0, dtype)

    def chunk_loss(p, c, x_n, t_n):
        c_new, ys = unroll(cell, p, x_n, carry=c, time_axis=time_axis, **unroll_kwargs)
        loss = loss_fn(ys) if t_n is None else loss_fn(ys, t_n)
        return loss, c_new

    grad_fn = jax.value_and_grad(chunk_loss, has_aux=True)

    if update is None:

        def body(acc, inp):
            c, g_sum = acc
            x_n, t_n = inp
            (loss, c_new), g = grad_fn(params, jax.lax.stop_gradient(c), x_n, t_n)
            return (c_new, jax.tree_util.tree_map(jnp.add, g_sum, g)), loss

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (final, grads), losses = time_scan(body, (carry0, zeros), (chunks, t_chunks))
        return losses, grads, final

    def body_u(acc, inp):
        p, s, c = acc
        x_n, t_n = inp
        (loss, c_new), g = grad_fn(p, jax.lax.stop_gradient(c), x_n, t_n)
        p, s = update(p, g, s)
        return (p, s, c_new), loss

    (params, state, final), losses = time_scan(body_u, (params, state, carry0), (chunks, t_chunks))
    return losses, params, state, final


# --------------------------------------------------------------------------- gradient norms per step


class GradientNorms(NamedTuple):
    """Per-step gradient norms of ``gradient_norms``.

    Attributes:
      norms: ``||dL/ds_t||`` over the whole flattened carry ``s_t`` of each sequence, in the
        layout of ``xs`` without its feature axis (``(*batch, T)`` batch-major); with
        ``by_lag=True`` index ``L`` along time holds lag ``L`` (see ``gradient_norms``).
      leaf_norms: the same per carry leaf, a pytree like the carry (e.g.
        ``LSTMState(h=(*batch, T), c=(*batch, T))``).
      valid: bool, same layout as ``norms``: where an entry is a measured step (in time
        order: the steps a sequence reads; by lag: the lags a sequence has). ``None`` without
        ``lengths``/``mask``.
    """

    norms: jax.Array
    leaf_norms: Any
    valid: jax.Array | None = None


_ARRAY_OPTIONS = ("lengths", "mask", "resets")


@functools.partial(jax.jit, static_argnames=("cell", "loss_fn", "time_axis", "by_lag", "direct", "static"))
def _gradient_norms_core(cell, params, xs, carry, arrays, *, loss_fn, time_axis, by_lag, direct, static):
    options = dict(static)
    gradient = options.pop("gradient")
    output = cell.output if direct else None
    ta = time_axis_of(time_axis, xs.ndim, name=f"xs of shape {tuple(xs.shape)}")
    batch_shape = batch_shape_of_xs(xs.shape, ta)
    nb = len(batch_shape)
    I = xs.shape[-1]
    if carry is None:
        carry = cell.initial_carry(params, batch_shape)
    c_leaves, c_def = jax.tree_util.tree_flatten(carry)
    widths = [int(np.prod(a.shape[nb:])) for a in c_leaves]
    E = sum(widths)
    dtype = jnp.result_type(xs.dtype, *c_leaves)
    x_dtype = xs.dtype

    def unflat_add(c, e):
        leaves = jax.tree_util.tree_leaves(c)
        out, off = [], 0
        for a, w in zip(leaves, widths, strict=True):
            out.append(a + e[..., off : off + w].reshape(a.shape).astype(a.dtype))
            off += w
        return jax.tree_util.tree_unflatten(c_def, out)

    def init(key, input_size):
        return cell.init(key, input_size - E)

    def step(p, c, xe):
        x, e = xe[..., :I].astype(x_dtype), xe[..., I:]  # integer inputs (token ids) come back exact
        c_new, y = cell.step(p, c, x)
        c_pert = unflat_add(c_new, e)
        if output is not None:  # direct: the output read from the perturbed carry, as the cell defines it
            y = output(p, c_pert, x)
        return c_pert, y

    wrapped = Cell(init, cell.initial_carry, step)

    def loss(eps):
        xe = jnp.concatenate([xs.astype(dtype), eps], axis=-1)
        _, ys = unroll(
            wrapped, params, xe, carry=carry, time_axis=time_axis, gradient=gradient, **arrays, **options
        )
        return loss_fn(ys)

    g = jax.grad(loss)(jnp.zeros(xs.shape[:-1] + (E,), dtype))
    parts, off = [], 0
    for w in widths:
        parts.append(jnp.linalg.norm(g[..., off : off + w], axis=-1))
        off += w
    norms = jnp.linalg.norm(g, axis=-1)
    valid = _read_steps(arrays, xs.shape[:-1], ta)
    if by_lag:
        index, valid = _lag_index(valid, xs.shape[:-1], ta, bool(options.get("reverse", False)))
        norms, parts = (
            _gather_lags(norms, index, valid, ta),
            [_gather_lags(a, index, valid, ta) for a in parts],
        )
    return GradientNorms(norms, jax.tree_util.tree_unflatten(c_def, parts), valid)


def _read_steps(arrays, shape, ta):
    """``(layout of xs without features)`` bool: the steps read (``t < lengths`` and ``mask``),
    or ``None`` when neither is given."""
    lengths, mask = arrays.get("lengths"), arrays.get("mask")
    if lengths is None and mask is None:
        return None
    T = shape[ta]
    valid = jnp.ones(shape, bool)
    if lengths is not None:
        valid = valid & sequence_mask(jnp.asarray(lengths), T, time_axis=ta)
    if mask is not None:
        valid = valid & jnp.asarray(mask, bool)
    return valid


def _lag_index(valid, shape, ta, reverse):
    """For each sequence and lag ``L``, the time index of lag ``L`` (counted from the last step
    the sequence reads, or the first with ``reverse``) and whether it exists."""
    T = shape[ta]
    t = jnp.arange(T)
    lag = jnp.arange(T)
    if valid is None:
        idx = (lag if reverse else T - 1 - lag).reshape((1,) * (len(shape) - 1) + (T,))
        idx = jnp.broadcast_to(idx, tuple(np.delete(np.array(shape), ta)) + (T,))
        return jnp.moveaxis(idx, -1, ta), None
    v = jnp.moveaxis(valid, ta, -1)
    t = t.reshape((1,) * (v.ndim - 1) + (T,))
    lag = lag.reshape((1,) * (v.ndim - 1) + (T,))
    first = jnp.min(jnp.where(v, t, T), axis=-1)[..., None]
    last = jnp.max(jnp.where(v, t, -1), axis=-1)[..., None]
    # a reverse pass ends at the first step read, a forward one at the last
    idx = first + lag if reverse else last - lag
    has = (idx >= first) & (idx <= last)
    return jnp.moveaxis(jnp.clip(idx, 0, T - 1), -1, ta), jnp.moveaxis(has, -1, ta)


def _gather_lags(a, index, has, ta):
    out = jnp.take_along_axis(a, index, axis=ta)
    return out if has is None else jnp.where(has, out, jnp.nan)


def gradient_norms(
    cell: Cell,
    params,
    xs: jax.Array,
    loss_fn: Callable,
    *,
    carry=None,
    time_axis: int = -2,
    by_lag: bool = False,
    direct: bool = True,
    **unroll_kwargs,
) -> GradientNorms:
    r"""``||dL/ds_t||`` for every step ``t``, from one backward pass.

    ``s_t`` is the carry after step ``t`` (for the LSTM the pair ``(h_t, c_t)``; per-leaf norms
    are returned too). ``dL/ds_t`` is the *total* derivative: through the output ``y_t`` and
    through every later step. It is computed by adding a zero perturbation ``eps_t`` to the
    carry after each step, ``s_t <- s_t + eps_t``, and taking ``dL/deps`` (one ``jax.grad``):
    the reverse scan delivers all ``T`` values at once instead of ``T`` separate gradients.
    The output's dependence on ``s_t`` is read from the cell's ``output`` capability,
    ``y_t = output(params, s_t, x_t)``, so the perturbation reaches ``y_t`` exactly as the
    cell defines it (for a carry ``(y, z)`` with output ``y``, or an output that is any
    function of the carry and the input). A cell without an output rule is refused unless
    ``direct=False``, which counts only the path through later steps (exact when ``y_t``
    does not depend on ``s_t``, as for ``tdnn``). Masked or padded steps hold the carry, so
    their perturbation is dropped and their norm is 0 (``valid`` marks the steps read).

    Lags (``by_lag=True``), the convention of every seqjax analysis function: index ``L``
    along time holds **lag ``L``, lag 0 first**, the state ``L`` steps before the last step
    the sequence reads: ``||dL/ds_{T_b - L}||`` with ``T_b`` each sequence's own last valid
    step (``lengths``/``mask``), so a batch of padded sequences lines up by lag and
    ``jnp.nanmean(norms, axis=0)`` averages each lag over the sequences that have it; lags
    before a sequence's start are NaN. With ``reverse=True`` the pass ends at the first step
    read, and lag ``L`` is ``L`` steps after it. Raw norms (not logs).

    For a loss over the sequence this measures how much each step's state matters; for a loss
    on the last step only (``loss_fn = lambda ys: f(ys[..., -1, :])``) it is
    ``||dL_T/ds_t||`` whose decay with the lag ``T - t`` shows vanishing or exploding gradients
    (Pascanu, Mikolov & Bengio 2013): for a linear Elman cell ``h_t = h_{t-1} W_h + x_t W_x``
    (row vectors) ``dL_T/dh_t = g (W_h^T)^{T-t}`` with ``g = dL_T/dh_T``. (With padding,
    ``ys[..., -1, :]`` is a padded zero: take each sequence's last valid output,
    ``seqjax.last_step(ys, lengths)``.)

    The sum over a batch of independent sequences gives per-sequence norms. Uses autodiff of
    the plain scan (any cell). Compiled once per cell, ``loss_fn`` (by identity: define it
    once, outside a loop over checkpoints), options and shapes.

    Args:
      cell: the cell.
      params: its params.
      xs: ``(*batch, T, I)`` (or per ``time_axis``).
      loss_fn: ``loss_fn(ys) -> scalar`` with ``ys`` as ``unroll`` returns them.
      carry: initial carry (default zeros).
      time_axis: the time axis of ``xs``.
      by_lag: index the result by lag instead of time (see above).
      direct: include the direct path ``s_t -> y_t`` (needs ``cell.output``); ``False``
        counts only the path through later steps.
      **unroll_kwargs: passed to ``unroll`` (``lengths``, ``mask``, ``resets``, ``reverse``,
        ``solver``); ``gradient`` may be ``Autodiff()`` (the default), ``Remat(k)`` or a
        ``Truncate`` of them (a ``Truncate`` gives the truncated ``dL/ds_t``); ``Fused()`` is
        refused.

    Returns:
      ``GradientNorms(norms, leaf_norms, valid)``, arrays in the layout of ``xs`` without
      features.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.rnn(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jnp.ones((2, 5, 3))
      >>> def last_loss(ys):
      ...     return jnp.sum(ys[:, -1] ** 2)
      >>> gn = seqjax.gradient_norms(cell, params, xs, last_loss, by_lag=True)
      >>> print(gn.norms.shape)                         # (B, T): ||dL_T/ds_{T-L}|| at lag L
      (2, 5)
      >>> bool(jnp.all(gn.norms[:, 0] > gn.norms[:, -1]))     # it vanishes with the lag
      True
    """

    gradient = unroll_kwargs.pop("gradient", None)
    if gradient is None or isinstance(gradient, Auto):
        gradient = Autodiff()
    if resolve(gradient).kernel == "require":
        raise ValueError(
            f"gradient_norms(gradient={gradient!r}): the perturbation of every step's carry runs on the "
            "plain scan, never a fused kernel; use Autodiff(), Remat(k) or Truncate(k, base=Autodiff())."
        )
    if direct and cell.output is None:
        raise ValueError(
            "gradient_norms: this cell has no output capability, so how y_t depends on the carry "
            "s_t is unknown. Give the cell one (Cell(..., output=lambda params, carry, x: y)) or "
            "pass direct=False to count only the path through later steps."
        )
    unknown = sorted(set(unroll_kwargs) - {*_ARRAY_OPTIONS, "reverse", "solver"})
    if unknown:
        raise TypeError(
            f"gradient_norms got unexpected keyword arguments {unknown}; options of unroll it takes: "
            f"{sorted({*_ARRAY_OPTIONS, 'reverse', 'solver', 'gradient'})}."
        )
    arrays = {k: jnp.asarray(v) for k, v in unroll_kwargs.items() if k in _ARRAY_OPTIONS and v is not None}
    static = {k: v for k, v in unroll_kwargs.items() if k not in _ARRAY_OPTIONS}
    static["gradient"] = gradient
    if "reverse" in static:
        static["reverse"] = bool(static["reverse"])
    xs = jnp.asarray(xs)
    params, xs, carry, _ = promote(params, xs, carry)
    ta = time_axis_of(time_axis, xs.ndim, name=f"xs of shape {tuple(xs.shape)}")
    if "lengths" in arrays:
        from seqjax.unroll import _check_lengths

        _check_lengths(arrays["lengths"], batch_shape_of_xs(xs.shape, ta), xs.shape[ta])
    if "mask" in arrays and tuple(arrays["mask"].shape) != tuple(xs.shape[:-1]):
        raise ValueError(
            f"mask has shape {tuple(arrays['mask'].shape)} but needs xs.shape[:-1] = {tuple(xs.shape[:-1])} "
            "(one flag per sequence and step)."
        )
    try:
        key = tuple(sorted(static.items()))
        hash(key)
    except TypeError as e:
        raise TypeError(f"gradient_norms: the options {sorted(static)} must be hashable: {e}") from None
    return _gradient_norms_core(
        cell,
        params,
        xs,
        carry,
        arrays,
        loss_fn=loss_fn,
        time_axis=ta,
        by_lag=bool(by_lag),
        direct=bool(direct),
        static=key,
    )
