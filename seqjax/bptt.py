"""Backpropagation through time: the fused fast path, truncation, chunked streams, gradient norms.

BPTT for an Elman cell ``h_t = f(net_t)``, ``net_t = x_t W_x + h_{t-1} W_h + b`` (row vectors):
the error term travels back one step at a time,

    delta_t = dL/dnet_t = (dL/dh_t) * f'(net_t),     dL/dh_{t-1} += delta_t W_h^T,

and the weight gradients are sums over time of outer products,

    dL/dW_h = sum_t h_{t-1}^T delta_t = H_prev^T Delta,   dL/dW_x = X^T Delta,   dL/db = sum_t delta_t,

so they are computed *after* the reverse scan as one large matmul over the stacked ``(T*B)`` rows.
The LSTM and GRU follow the same pattern with their gate derivatives (see ``_lstm_bwd_step`` and
``_gru_bwd_step``).

The fast path (``unroll(..., bptt="auto")``, the default) recognises the built-in ``rnn``, ``lstm``
and ``gru`` cells by ``cell.meta`` and runs a ``jax.custom_vjp`` kernel:

* forward: the input projection ``X W_x + b`` for all steps is one matmul outside the scan; the
  scan does one matmul per step (``h_{t-1} W_h``) and the gate arithmetic, and saves only the
  carries and the gate activations (``i, f, g, o`` for the LSTM; ``r, z, n, h W_hn + b_hn`` for the
  GRU; nothing beyond ``h`` for the Elman cell, whose ``f'`` is read off ``h``);
* backward: a reverse scan carries ``dL/dh`` (and ``dL/dc``) with one fused matmul per step
  (``dZ_t W_h^T``) and emits ``dZ_t``; then ``dW_h = H_in^T dZ``, and autodiff of the hoisted
  input projection gives ``dW_x = X^T dZ``, ``db = sum dZ`` and ``dX = dZ W_x^T`` as large matmuls.

The scans themselves go through ``seqjax.unroll._time_scan`` (``unroll.py`` stays the one place
that scans over time). Reverse-over-reverse second derivatives (``jax.grad`` of ``jax.grad``)
work through the fused path (JAX differentiates the backward rule); forward-mode
differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) does not (``custom_vjp``): use
``bptt="autodiff"`` for it.

Also here: ``chunk_stream`` and ``tbptt`` (stateful truncated BPTT over a long stream) and
``gradient_norms`` (``||dL/dh_t||`` for every step from one backward pass).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.cells import Cell, CellMeta, LSTMState
from seqjax.unroll import _time_scan, unroll

__all__ = [
    "fused_supported",
    "chunk_stream",
    "tbptt",
    "gradient_norms",
    "GradientNorms",
]

# --------------------------------------------------------------------------- which cells are fused

_RNN_ACTS = ("tanh", "relu", "leaky_relu", "identity", "linear", "sigmoid")


def fused_supported(cell: Cell) -> bool:
    """Whether ``cell`` has a fused BPTT kernel (built-in ``rnn`` with a named activation in
    ``tanh, relu, leaky_relu, identity, linear, sigmoid``; ``lstm`` without projection; ``gru``;
    ``learnable_carry`` of one of these; ``seqjax.layers.stack`` of these without dropout).

    A cell for which this is ``False`` (a user's cell, a callable activation, ``lstm(proj_size>0)``)
    runs through autodiff of the plain scan, which gives the same gradients, only slower.
    """
    meta = getattr(cell, "meta", None)
    if not isinstance(meta, CellMeta):
        return False
    if meta.kind == "learnable_carry":  # seqjax.learnable_carry: the inner cell's kernel
        return fused_supported(meta.options.get("inner"))
    if meta.kind == "stack":  # seqjax.layers.stack without dropout: run layer by layer
        cells = meta.options.get("cells", ())
        return bool(cells) and all(fused_supported(c) for c in cells)
    if meta.kind == "rnn":
        return isinstance(meta.options.get("activation"), str) and meta.options["activation"] in _RNN_ACTS
    if meta.kind == "lstm":
        return not meta.options.get("proj_size", 0)
    return meta.kind == "gru"


_HOIST = False  # measured slower on the 2-core CPU this was tuned on: see the README notes


class _Spec(NamedTuple):
    """Static description of one fused call (hashable: a ``custom_vjp`` non-diff argument)."""

    kind: str
    act: str
    reverse: bool
    unroll: int | bool
    all_c: bool  # LSTM: return the whole c trajectory (else only the final c)
    hoist: bool  # input projection as one matmul before the scan (else x_t W_x inside it)


# --------------------------------------------------------------------------- small helpers


def _row(v):
    """``(N,) -> (1, N)`` for explicit broadcasting against ``(B, N)``."""
    return v.reshape((1,) + v.shape)


def _col(v):
    """``(B,) -> (B, 1)``."""
    return v.reshape(v.shape + (1,))


def _shift_prev(hs, h0, reverse):
    """The carry entering each step: ``h_{t-1}`` (``h0`` first), or ``h_{t+1}`` when reversed."""
    if reverse:
        return jnp.concatenate([hs[1:], h0[None]], axis=0)
    return jnp.concatenate([h0[None], hs[:-1]], axis=0)


def _inputs_in(hs, h0, r, reverse):
    """Carry fed to the step at every t (after resets): ``(T, B, H)``."""
    prev = _shift_prev(hs, h0, reverse)
    if r is None:
        return prev
    return jnp.where(r[:, :, None], h0[None], prev)


def _rnn_act(act, net):
    if act == "tanh":
        return jnp.tanh(net)
    if act == "relu":
        return jax.nn.relu(net)
    if act == "leaky_relu":
        return jax.nn.leaky_relu(net)
    if act == "sigmoid":
        return jax.nn.sigmoid(net)
    return net


def _rnn_dact(act, h):
    """``f'(net)`` written in terms of ``h = f(net)``."""
    if act == "tanh":
        return 1.0 - h * h
    if act == "relu":
        return (h > 0).astype(h.dtype)
    if act == "leaky_relu":
        return jnp.where(h >= 0, jnp.ones_like(h), jnp.full_like(h, 0.01))
    if act == "sigmoid":
        return h * (1.0 - h)
    return jnp.ones_like(h)


def _lstm_gates(z, H):
    """``i, f, g, o`` from the pre-activations ``z: (B, 4H)``, one array ``(B, 4H)``."""
    i = jax.nn.sigmoid(z[:, :H])
    f = jax.nn.sigmoid(z[:, H : 2 * H])
    g = jnp.tanh(z[:, 2 * H : 3 * H])
    o = jax.nn.sigmoid(z[:, 3 * H :])
    return i, f, g, o


# --------------------------------------------------------------------------- forward scans


def _forward(spec, w_x, b, w_h, b_h, h0, c0, x, m, r, residuals=True):
    """Run the recurrence. Returns ``(hs, cs, res)``: the ``h`` trajectory ``(T, B, H)``; for the
    LSTM the ``c`` trajectory (``spec.all_c``) or the final ``c`` ``(B, H)``, else ``None``; and
    the residuals for the backward pass (``None`` for the Elman cell, ``gates (T, B, 4H)`` for
    the GRU, ``(c_in, gates)`` for the LSTM)."""
    kind, H = spec.kind, h0.shape[-1]
    if spec.hoist:  # the input projection of every step at once: one (T*B, I) @ (I, G*H) matmul
        T, B, I = x.shape
        xw = (x.reshape(T * B, I) @ w_x + _row(b)).reshape(T, B, w_x.shape[1])

        def proj(xw_t):
            return xw_t
    else:
        xw = x

        def proj(x_t):
            return x_t @ w_x + _row(b)

    def carry_in(carry, r_t):
        if r_t is None:
            return carry
        return jax.tree_util.tree_map(
            lambda a, a0: jnp.where(_col(r_t), a0, a), carry, (h0, c0)[: len(carry)]
        )

    def hold(m_t, new, old):
        if m_t is None:
            return new
        return jnp.where(_col(m_t), new, old)

    if kind == "rnn":

        def body(carry, inp):
            xw_t, m_t, r_t = inp
            (h,) = carry_in((carry,), r_t)
            h_new = _rnn_act(spec.act, proj(xw_t) + h @ w_h)
            h_new = hold(m_t, h_new, h)
            return h_new, h_new

        _, hs = _time_scan(body, h0, (xw, m, r), reverse=spec.reverse, unroll=spec.unroll)
        return hs, None, None

    if kind == "lstm":

        def body(carry, inp):
            xw_t, m_t, r_t = inp
            h, c = carry_in(carry, r_t)
            z = proj(xw_t) + h @ w_h
            i, f, g, o = _lstm_gates(z, H)
            c_new = f * c + i * g
            h_new = o * jnp.tanh(c_new)
            h_new, c_new = hold(m_t, h_new, h), hold(m_t, c_new, c)
            # Residuals: the gates and the cell state *entering* the step (c_t is recomputed).
            res = (c, jnp.concatenate([i, f, g, o], axis=-1)) if residuals else (None, None)
            out = (h_new, c_new if spec.all_c else None) + res
            return (h_new, c_new), out

        (_, c_last), (hs, cs, c_in, gates) = _time_scan(
            body, (h0, c0), (xw, m, r), reverse=spec.reverse, unroll=spec.unroll
        )
        return hs, (cs if spec.all_c else c_last), (c_in, gates)

    # gru
    def body(carry, inp):
        xw_t, m_t, r_t = inp
        xw_t = proj(xw_t)
        (h,) = carry_in((carry,), r_t)
        gh = h @ w_h + _row(b_h)
        rz = jax.nn.sigmoid(xw_t[:, : 2 * H] + gh[:, : 2 * H])
        rg, zg = rz[:, :H], rz[:, H:]
        ghn = gh[:, 2 * H :]
        n = jnp.tanh(xw_t[:, 2 * H :] + rg * ghn)
        h_new = n + zg * (h - n)
        h_new = hold(m_t, h_new, h)
        return h_new, (h_new, jnp.concatenate([rz, n, ghn], axis=-1) if residuals else None)

    _, (hs, gates) = _time_scan(body, h0, (xw, m, r), reverse=spec.reverse, unroll=spec.unroll)
    return hs, None, gates


# --------------------------------------------------------------------------- the custom_vjp kernel


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(spec, w_x, b, w_h, b_h, h0, c0, x, m, r, keep):
    """Carry trajectory ``hs (T, B, H)`` of a built-in cell and, for the LSTM, ``cs`` (the
    trajectory ``(T, B, H)`` when ``spec.all_c``, else the final ``c (B, H)``).

    Args (time-major, batch flattened):
      spec: static ``_Spec``.
      w_h: ``(H, G*H)``. b_h: ``(G*H,)`` hidden-side bias (GRU only, else ``None``).
      h0, c0: initial carry ``(B, H)`` (``c0`` LSTM only, else ``None``).
      w_x: ``(I, G*H)``; b: ``(G*H,)`` input-side bias (for the LSTM and Elman cell the sum of
        both biases).
      x: inputs ``(T, B, I)``.
      m: step mask ``(T, B)`` bool or ``None``; r: resets ``(T, B)`` bool or ``None``.
      keep: ``(T,)`` float, 0 where the gradient through the carry into step t is cut
        (truncated BPTT), or ``None``. Does not change the forward values.
    """
    hs, cs, _ = _forward(spec, w_x, b, w_h, b_h, h0, c0, x, m, r, residuals=False)
    return hs, cs


def _fused_fwd(spec, w_x, b, w_h, b_h, h0, c0, x, m, r, keep):
    hs, cs, gates = _forward(spec, w_x, b, w_h, b_h, h0, c0, x, m, r)
    return (hs, cs), (w_x, w_h, b_h, h0, c0, x, hs, cs, gates, m, r, keep)


def _zero_cot(a):
    if a is None:
        return None
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


def _fused_bwd(spec, res, cts):
    w_x, w_h, b_h, h0, c0, x, hs, cs, gates, m, r, keep = res
    g_hs, g_cs = cts
    kind, H, rev = spec.kind, h0.shape[-1], spec.reverse
    dt = hs.dtype
    g_hs = (
        jnp.zeros_like(hs) if g_hs is None or isinstance(g_hs, jax.custom_derivatives.SymbolicZero) else g_hs
    )
    w_ht = w_h.T  # (G*H, H), contiguous for the per-step matmul
    mf = None if m is None else m.astype(dt)[:, :, None]
    rf = None if r is None else r.astype(dt)[:, :, None]

    def split_mask(d, m_t):
        """Gradient into the step (where it ran) and straight through to the carry (where held)."""
        if m_t is None:
            return d, None
        return d * m_t, d - d * m_t

    def route(d_in, r_t, k_t, acc):
        """Send the gradient of the step's input carry to h0 (reset steps) or to h_{t-1}."""
        if r_t is not None:
            acc = acc + d_in * r_t
            d_in = d_in - d_in * r_t
        if k_t is not None:
            d_in = d_in * k_t
        return d_in, acc

    zero = jnp.zeros_like(h0)

    if kind == "rnn":

        def body(carry, inp):
            dh, acc = carry
            g_t, h_t, m_t, r_t, k_t = inp
            d, through = split_mask(dh + g_t, m_t)
            dnet = d * _rnn_dact(spec.act, h_t)
            d_in = dnet @ w_ht
            if through is not None:
                d_in = d_in + through
            d_in, acc = route(d_in, r_t, k_t, acc)
            return (d_in, acc), dnet

        (dh0, acc), dz = _time_scan(
            body, (zero, zero), (g_hs, hs, mf, rf, keep), reverse=not rev, unroll=spec.unroll
        )
        dh0 = dh0 + acc
        dc0 = None
        dgh = dz
    elif kind == "lstm":
        c_in, gates = gates
        if spec.all_c:  # cotangent of the whole c trajectory, added step by step
            g_cs_t, dc_last = g_cs, zero
        else:  # cotangent of the final c only
            g_cs_t, dc_last = None, g_cs

        def body(carry, inp):
            dh, dc, acc_h, acc_c = carry
            gh_t, gc_t, gates_t, cin_t, m_t, r_t, k_t = inp
            dh, through_h = split_mask(dh + gh_t, m_t)
            dc, through_c = split_mask(dc if gc_t is None else dc + gc_t, m_t)
            i, f, g, o = (gates_t[:, k * H : (k + 1) * H] for k in range(4))
            tc = jnp.tanh(f * cin_t + i * g)  # c_t of the step, recomputed
            dc = dc + dh * o * (1.0 - tc * tc)
            dz = jnp.concatenate(
                [
                    dc * g * i * (1.0 - i),
                    dc * cin_t * f * (1.0 - f),
                    dc * i * (1.0 - g * g),
                    dh * tc * o * (1.0 - o),
                ],
                axis=-1,
            )
            dh_in = dz @ w_ht
            dc_in = dc * f
            if through_h is not None:
                dh_in = dh_in + through_h
                dc_in = dc_in + through_c
            dh_in, acc_h = route(dh_in, r_t, k_t, acc_h)
            dc_in, acc_c = route(dc_in, r_t, k_t, acc_c)
            return (dh_in, dc_in, acc_h, acc_c), dz

        (dh0, dc0, acc_h, acc_c), dz = _time_scan(
            body,
            (zero, dc_last, zero, zero),
            (g_hs, g_cs_t, gates, c_in, mf, rf, keep),
            reverse=not rev,
            unroll=spec.unroll,
        )
        dh0, dc0 = dh0 + acc_h, dc0 + acc_c
        dgh = dz
    else:  # gru

        def body(carry, inp):
            dh, acc = carry
            g_t, gates_t, hin_t, m_t, r_t, k_t = inp
            d, through = split_mask(dh + g_t, m_t)
            rg, zg, n, ghn = (gates_t[:, k * H : (k + 1) * H] for k in range(4))
            dn = d * (1.0 - zg) * (1.0 - n * n)
            dzg = d * (hin_t - n) * zg * (1.0 - zg)
            drg = dn * ghn * rg * (1.0 - rg)
            dgh_t = jnp.concatenate([drg, dzg, dn * rg], axis=-1)
            d_in = dgh_t @ w_ht + d * zg
            if through is not None:
                d_in = d_in + through
            d_in, acc = route(d_in, r_t, k_t, acc)
            return (d_in, acc), jnp.concatenate([drg, dzg, dn], axis=-1)

        (dh0, acc), dz = _time_scan(
            body,
            (zero, zero),
            (g_hs, gates, _inputs_in(hs, h0, r, rev), mf, rf, keep),
            reverse=not rev,
            unroll=spec.unroll,
        )
        dh0 = dh0 + acc
        dc0 = None
        rg = gates[:, :, :H]
        dgh = jnp.concatenate([dz[:, :, : 2 * H], dz[:, :, 2 * H :] * rg], axis=-1)

    T, B = hs.shape[0], hs.shape[1]
    G = dgh.shape[-1]
    h_in = _inputs_in(hs, h0, r, rev)  # (T, B, H): the carry entering every step
    # The weight gradient is a sum over time: one (T*B)-row matmul, not T small ones.
    dw_h = h_in.reshape(T * B, H).T @ dgh.reshape(T * B, G)
    db_h = None if b_h is None else jnp.sum(dgh, axis=(0, 1))
    # The input side, also as (T*B)-row matmuls: dW_x = X^T dZ, db = sum dZ, dX = dZ W_x^T.
    I = x.shape[-1]
    dz2 = dz.reshape(T * B, G)
    dw_x = x.reshape(T * B, I).T @ dz2
    db = jnp.sum(dz2, axis=0)
    dx = (dz2 @ w_x.T).reshape(T, B, I)
    return (dw_x, db, dw_h, db_h, dh0, dc0, dx, _zero_cot(m), _zero_cot(r), _zero_cot(keep))


_fused.defvjp(_fused_fwd, _fused_bwd)


def _fused_unroll(
    cell, params, xs_tm, carry0, flags, resets, keep, *, reverse, unroll_k, x_mask=None, all_c=False
):
    """Internal: the fused path of ``unroll`` on time-major inputs.

    Args:
      cell: a cell for which ``fused_supported(cell)``.
      params: its params (checked by ``unroll``).
      xs_tm: ``(T, *batch, I)``.
      carry0: initial carry with leaves ``(*batch, ...)``.
      flags: step mask ``(T, *batch)`` bool or ``None``; resets: ``(T, *batch)`` bool or ``None``.
      keep: ``(T,)`` float (0 where truncation cuts the carry gradient) or ``None``.
      reverse, unroll_k: as in ``unroll``.
      x_mask: optional input dropout mask ``(*batch, I)``.
      all_c: return the carry trajectories (``return_carries``); else ``carries_tm`` is ``None``
        for the LSTM (its ``c`` trajectory is not kept).

    Returns:
      ``(final_carry, ys_tm, carries_tm)`` with leaves time-major, batch dims restored.
    """
    if cell.meta.kind == "learnable_carry":  # carry0 already holds the learned initial carry
        return _fused_unroll(
            cell.meta.options["inner"],
            params["cell"],
            xs_tm,
            carry0,
            flags,
            resets,
            keep,
            reverse=reverse,
            unroll_k=unroll_k,
            x_mask=x_mask,
            all_c=all_c,
        )
    if cell.meta.kind == "stack":
        # Layer by layer: layer l reads the (masked) outputs of layer l-1. Same maths as the
        # stack's own step (masking, resets and truncation act on every layer at the same steps).
        finals, carries = [], []
        ys = xs_tm
        for l, (c, p, c0) in enumerate(zip(cell.meta.options["cells"], params, carry0, strict=True)):
            final, ys, cs = _fused_unroll(
                c,
                p,
                ys,
                c0,
                flags,
                resets,
                keep,
                reverse=reverse,
                unroll_k=unroll_k,
                x_mask=x_mask if l == 0 else None,
                all_c=all_c,
            )
            finals.append(final)
            carries.append(cs)
        return tuple(finals), ys, tuple(carries)
    meta = cell.meta
    kind = meta.kind
    T = xs_tm.shape[0]
    batch_shape = tuple(xs_tm.shape[1:-1])
    B = int(np.prod(batch_shape)) if batch_shape else 1
    I = xs_tm.shape[-1]
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    x = xs_tm.reshape(T, B, I)
    if x_mask is not None:
        x = x * x_mask.reshape(1, B, I)
    x = x.astype(dtype)
    b = params["b"]
    b_h = None
    if kind == "gru":
        b_h = params["b_h"]
    elif "b_h" in params:
        b = b + params["b_h"]

    def flat(a):
        return None if a is None else a.reshape(T, B)

    if kind == "lstm":
        h0, c0 = carry0.h.reshape(B, -1), carry0.c.reshape(B, -1)
    else:
        h0, c0 = carry0.reshape(B, -1), None
    spec = _Spec(kind, str(meta.options.get("activation", "")), bool(reverse), unroll_k, bool(all_c), _HOIST)
    hs, cs = _fused(spec, params["w_x"], b, params["w_h"], b_h, h0, c0, x, flat(flags), flat(resets), keep)
    H = hs.shape[-1]
    hs = hs.reshape((T,) + batch_shape + (H,))
    if cs is not None and all_c:
        cs = cs.reshape((T,) + batch_shape + (H,))
    ys = hs
    if flags is not None:
        ys = jnp.where(flags.reshape(flags.shape + (1,)), hs, jnp.zeros_like(hs))
    last = 0 if reverse else T - 1
    if kind == "lstm":
        if not all_c:
            return LSTMState(hs[last], cs.reshape(batch_shape + (H,))), ys, None
        return LSTMState(hs[last], cs[last]), ys, LSTMState(hs, cs)
    return hs[last], ys, hs


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
    if xs.ndim < 1:
        raise ValueError(f"xs must have a time axis, got shape {tuple(xs.shape)}.")
    ta = time_axis + xs.ndim if time_axis < 0 else time_axis
    if not 0 <= ta < xs.ndim:
        raise ValueError(f"time_axis={time_axis} is out of range for xs of shape {tuple(xs.shape)}.")
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}.")
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
    ``L_n = loss_fn(ys_n[, targets_n])`` is back-propagated through at most ``chunk`` steps::

        carry_n, ys_n = unroll(cell, params, x_n, carry=stop_gradient(carry_{n-1}))
        g_n = dL_n / dparams

    Without ``update`` the gradients are summed (``sum_n g_n``: the truncated gradient of the
    total loss, which equals ``unroll(..., truncate=chunk)`` for a loss that sums over steps).
    With ``update(params, g_n, state) -> (params, state)`` (e.g. an optax step) the params are
    updated after every chunk, as in online TBPTT training.

    Args:
      cell, params: the cell and its params.
      xs: the stream ``(*batch, T, I)`` (or time-major with ``time_axis=0``).
      loss_fn: ``loss_fn(ys_n) -> scalar`` or, with ``targets``, ``loss_fn(ys_n, targets_n)``;
        ``ys_n`` has the layout of ``unroll``'s ``ys`` over one chunk.
      chunk: steps per chunk (must divide ``T``).
      targets: optional pytree of arrays with the same time axis as ``xs``, chunked alike.
      carry: the initial carry (default zeros).
      update: optional ``(params, grads, state) -> (params, state)``.
      state: the initial ``state`` for ``update`` (e.g. an optax optimiser state).
      time_axis: the time axis of ``xs`` and ``targets``.
      **unroll_kwargs: passed to ``unroll`` for every chunk (``bptt``, ``remat``, ...).

    Returns:
      Without ``update``: ``(losses (N,), grads, final_carry)``.
      With ``update``: ``(losses (N,), params, state, final_carry)``.

    Example::

      losses, grads, carry = tbptt(cell, params, stream, lambda ys, t: jnp.mean((ys - t) ** 2),
                                   chunk=50, targets=target_stream)
    """

    chunks = chunk_stream(xs, chunk, time_axis=time_axis)
    t_chunks = (
        None
        if targets is None
        else jax.tree_util.tree_map(lambda a: chunk_stream(a, chunk, time_axis=time_axis), targets)
    )
    ta = time_axis + xs.ndim if time_axis < 0 else time_axis
    batch_shape = tuple(s for i, s in enumerate(xs.shape[:-1]) if i != ta)
    carry0 = cell.initial_carry(params, batch_shape) if carry is None else carry

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
        (final, grads), losses = _time_scan(body, (carry0, zeros), (chunks, t_chunks))
        return losses, grads, final

    def body_u(acc, inp):
        p, s, c = acc
        x_n, t_n = inp
        (loss, c_new), g = grad_fn(p, jax.lax.stop_gradient(c), x_n, t_n)
        p, s = update(p, g, s)
        return (p, s, c_new), loss

    (params, state, final), losses = _time_scan(body_u, (params, state, carry0), (chunks, t_chunks))
    return losses, params, state, final


# --------------------------------------------------------------------------- gradient norms per step


class GradientNorms(NamedTuple):
    """Per-step gradient norms of ``gradient_norms``.

    Attributes:
      norms: ``||dL/ds_t||`` over the whole flattened carry ``s_t`` of each sequence, in the
        layout of ``xs`` without its feature axis (``(*batch, T)`` batch-major).
      leaf_norms: the same per carry leaf, a pytree like the carry (e.g.
        ``LSTMState(h=(*batch, T), c=(*batch, T))``).
    """

    norms: jax.Array
    leaf_norms: Any


def _flat_leaves(c, nb):
    return [a.reshape(a.shape[:nb] + (-1,)) for a in jax.tree_util.tree_leaves(c)]


def gradient_norms(
    cell: Cell,
    params,
    xs: jax.Array,
    loss_fn: Callable,
    *,
    carry=None,
    time_axis: int = -2,
    by_lag: bool = False,
    **unroll_kwargs,
) -> GradientNorms:
    r"""``||dL/ds_t||`` for every step ``t``, from one backward pass.

    ``s_t`` is the carry after step ``t`` (for the LSTM the pair ``(h_t, c_t)``; per-leaf norms
    are returned too). ``dL/ds_t`` is the *total* derivative: through the output ``y_t`` and
    through every later step. It is computed by adding a zero perturbation ``eps_t`` to the
    carry after each step, ``s_t <- s_t + eps_t``, and taking ``dL/deps`` (one ``jax.grad``):
    the reverse scan delivers all ``T`` values at once instead of ``T`` separate gradients.
    When a cell's step returns its carry (or the carry's ``h`` field) as its output, as every
    built-in recurrent cell does, the output sees the perturbation too; for other cells only
    the path through the carry counts. Masked or padded steps hold the carry, so their
    perturbation is dropped and their norm is 0.

    For a loss over the sequence this measures how much each step's state matters; for a loss
    on the last step only (``loss_fn = lambda ys: f(ys[..., -1, :])``) it is
    ``||dL_T/ds_t||`` whose decay with the lag ``T - t`` shows vanishing or exploding gradients
    (Pascanu, Mikolov & Bengio 2013): for a linear Elman cell ``h_t = h_{t-1} W_h + x_t W_x``
    (row vectors) ``dL_T/dh_t = g (W_h^T)^{T-t}`` with ``g = dL_T/dh_T``.

    The sum over a batch of independent sequences gives per-sequence norms. Uses autodiff of
    the plain scan (any cell).

    Args:
      cell, params: the cell and its params.
      xs: ``(*batch, T, I)`` (or per ``time_axis``).
      loss_fn: ``loss_fn(ys) -> scalar`` with ``ys`` as ``unroll`` returns them.
      carry: initial carry (default zeros).
      time_axis: the time axis of ``xs``.
      by_lag: flip the time axis of the result: index ``k`` then holds step ``T - 1 - k``
        (0-based), i.e. the lag ``k`` behind the last step, lag 0 first (the curve for a
        last-step loss).
      **unroll_kwargs: passed to ``unroll`` (``lengths``, ``mask``, ``reverse``, ...).

    Returns:
      ``GradientNorms(norms, leaf_norms)``, arrays in the layout of ``xs`` without features.

    Example::

      gn = gradient_norms(cell, params, xs, lambda ys: jnp.sum(ys[:, -1] ** 2), by_lag=True)
      gn.norms.mean(0)   # (T,): ||dL_T/dh_{T-k}|| against the lag k
    """

    xs = jnp.asarray(xs)
    ta = time_axis + xs.ndim if time_axis < 0 else time_axis
    batch_shape = tuple(s for i, s in enumerate(xs.shape[:-1]) if i != ta)
    nb = len(batch_shape)
    I = xs.shape[-1]
    if carry is None:
        carry = cell.initial_carry(params, batch_shape)
    c_leaves, c_def = jax.tree_util.tree_flatten(carry)
    widths = [int(np.prod(a.shape[nb:])) for a in c_leaves]
    E = sum(widths)
    dtype = jnp.result_type(xs.dtype, *c_leaves)

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
        x, e = xe[..., :I], xe[..., I:]
        c_new, y = cell.step(p, c, x)
        c_pert = unflat_add(c_new, e)
        if y is c_new:
            y = c_pert
        elif getattr(c_new, "h", None) is y:
            y = c_pert.h
        return c_pert, y

    wrapped = Cell(init, cell.initial_carry, step)

    def loss(eps):
        xe = jnp.concatenate([xs.astype(dtype), eps], axis=-1)
        _, ys = unroll(
            wrapped, params, xe, carry=carry, time_axis=time_axis, bptt="autodiff", **unroll_kwargs
        )
        return loss_fn(ys)

    g = jax.grad(loss)(jnp.zeros(xs.shape[:-1] + (E,), dtype))
    parts, off = [], 0
    for w in widths:
        parts.append(jnp.linalg.norm(g[..., off : off + w], axis=-1))
        off += w
    norms = jnp.linalg.norm(g, axis=-1)
    if by_lag:
        norms = jnp.flip(norms, axis=ta)
        parts = [jnp.flip(a, axis=ta) for a in parts]
    return GradientNorms(norms, jax.tree_util.tree_unflatten(c_def, parts))
