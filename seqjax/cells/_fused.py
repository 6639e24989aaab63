r"""Capabilities derived from a cell's gate equations, written once per family.

Most gated cells share one shape: an affine input projection, an affine recurrent
projection of the carry's first component ``h``, then elementwise gate arithmetic:

```text
a_t = x_t W_x + b_x                       (*batch, G*H)
u_t = h_{t-1} W_h [+ b_u]                 (*batch, G*H)
s_t, residual_t = fwd(a_t, u_t, s_{t-1})  unit by unit;  y_t = h_t = s_t[0]
```

A family describes that shape once, as a ``GateMath`` (its gate equations ``fwd`` and
their derivatives ``bwd``), and gets from this module, exactly and for free:

* ``affine_step``: the cell's ``step``;
* ``affine_jacobian``: ``J_t = ds_t/ds_{t-1}``, from ``bwd`` applied to the ``S`` unit
  cotangents (row ``i`` of ``J`` is the vector-Jacobian product with ``e_i``);
* ``affine_jacobian_diagonal``: ``diag J_t`` from one ``bwd`` per carry component
  (``O(G H)`` work, no ``S x S`` matrix), exact because ``fwd`` acts unit by unit;
* ``affine_kernel``: a fused BPTT kernel (``jax.custom_vjp``). Forward: one matmul per
  step, residuals from ``fwd``. Backward: a reverse scan of ``bwd`` with one matmul per
  step, ``dL/dh_{t-1} = du_t W_h^T + direct``, then the weight gradients as sums over time
  in one ``(T*B)``-row matmul each: ``dW_h = H_{in}^T dU``, ``dW_x = X^T dA``,
  ``db = sum dA``, ``dX = dA W_x^T``.

Masks, resets and truncation are handled here once for every family.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._scan import time_scan
from seqjax._util import bind
from seqjax.cells._core import Cell, Kernel, add_bias

__all__ = [
    "GateMath",
    "affine_step",
    "affine_jacobian",
    "affine_jacobian_diagonal",
    "affine_kernel",
    "affine_cell",
    "folded_bias_weights",
    "preactivation",
]


class GateMath(NamedTuple):
    """The gate equations of a family of the affine form (see the module docstring).

    Attributes:
      weights: ``params -> (w_x (I, G*H), b_x (G*H,), w_h (H, G*H), b_u (G*H,) | None)``.
      split: ``carry -> tuple`` of ``(*batch, H)`` components in tree-leaf order;
        component 0 is ``h`` (it multiplies ``W_h`` and is the output).
      join: ``tuple -> carry``, the inverse of ``split``.
      fwd: ``(a, u, state) -> (new_state, residual)``, elementwise unit by unit.
      bwd: ``(residual, h_in, h_out, d_new_state) -> (d_a, d_u, d_state_direct)``: the
        cotangents of ``a`` and ``u`` and the direct part of the cotangent of the old state
        (everything but the path through ``u``).
      du_from_da: ``(d_a, residual) -> d_u`` over whole ``(T, B, .)`` arrays, for a family
        whose recurrent pre-activation enters the gates differently from the input one (the
        GRU's reset); ``None`` (default) when ``d_u = d_a``. The kernel stores only ``d_a``
        per step and derives ``d_u`` after the reverse scan.
      uses_h_in, uses_h_out: whether ``bwd`` reads ``h_in`` / ``h_out`` (the kernel feeds the
        reverse scan only what is read; ``None`` otherwise).
      summed: ``fwd`` reads ``a`` and ``u`` only through ``a + u`` (the LSTM, the Elman cell,
        JANET; not the GRU, whose reset gates ``u``) and ``weights`` returns no ``b_u``. The
        fused kernel then computes ``z_t = [x_t, h_{t-1}] [W_x; W_h] + b`` with one matmul
        per step and calls ``fwd(z_t, None, state)``, so ``fwd`` must accept ``u=None``
        (``preactivation(a, u)`` reads both cases).
    """

    weights: Callable
    split: Callable
    join: Callable
    fwd: Callable
    bwd: Callable
    du_from_da: Callable | None = None
    uses_h_in: bool = True
    uses_h_out: bool = True
    summed: bool = False


def preactivation(a, u):
    """``a + u``, or ``a`` alone when the kernel already summed them (``u is None``)."""
    return a if u is None else a + u


def folded_bias_weights(params):
    """``(w_x, b [+ b_h], w_h, None)``: both biases sit outside the gates, so they add."""
    b = params["b"]
    if "b_h" in params:
        b = b + params["b_h"]
    return params["w_x"], b, params["w_h"], None


def _row(v):
    return v.reshape((1,) + v.shape)


def _col(v):
    return v.reshape(v.shape + (1,))


def _project(math, params, x, h):
    w_x, b_x, w_h, b_u = math.weights(params)
    a = add_bias(x @ w_x, b_x)
    u = h @ w_h
    if b_u is not None:
        u = add_bias(u, b_u)
    return a, u, w_h


def affine_step(params, carry, x, *, math, check):
    """``step`` of an affine-form cell: ``(params, carry, x_t) -> (carry_t, h_t)``."""
    state = math.split(carry)
    check(params, state, x)
    a, u, _ = _project(math, params, x, state[0])
    new, _ = math.fwd(a, u, state)
    return math.join(new), new[0]


def _vjp_rows(math, params, carry, x):
    state = math.split(carry)
    a, u, w_h = _project(math, params, x, state[0])
    new, res = math.fwd(a, u, state)
    return state, new, res, w_h


def affine_jacobian(params, carry, x, *, math):
    """``J = ds_t/ds_{t-1}: (S, S)`` at one unbatched carry, rows from ``bwd``."""
    state, new, res, w_h = _vjp_rows(math, params, carry, x)
    n, H = len(state), state[0].shape[-1]
    S = n * H
    eye = jnp.eye(S, dtype=state[0].dtype).reshape(S, n, H)
    cot = tuple(eye[:, k, :] for k in range(n))

    def row(d):
        _, d_u, direct = math.bwd(res, state[0], new[0], d)
        return (d_u @ w_h.T + direct[0],) + tuple(direct[1:])

    rows = jax.vmap(row)(cot)
    return jnp.concatenate(rows, axis=-1)


def affine_jacobian_diagonal(params, carry, x, *, math):
    """``diag(ds_t/ds_{t-1}): (S,)`` without forming ``J`` (``fwd`` acts unit by unit)."""
    state, new, res, w_h = _vjp_rows(math, params, carry, x)
    n, H = len(state), state[0].shape[-1]
    G = w_h.shape[-1] // H
    diag_w = jnp.stack([jnp.diagonal(w_h[:, g * H : (g + 1) * H]) for g in range(G)])  # (G, H)
    parts = []
    for k in range(n):
        d = tuple(jnp.ones_like(s) if j == k else jnp.zeros_like(s) for j, s in enumerate(state))
        _, d_u, direct = math.bwd(res, state[0], new[0], d)
        if k == 0:
            parts.append(jnp.sum(d_u.reshape(G, H) * diag_w, axis=0) + direct[0])
        else:
            parts.append(direct[k])
    return jnp.concatenate(parts, axis=-1)


# --------------------------------------------------------------------------- the fused kernel


class _Spec(NamedTuple):
    """Static description of one fused call (hashable: a ``custom_vjp`` non-diff argument)."""

    math: GateMath
    reverse: bool
    unroll: int | bool
    trajectory: bool


def _inputs_in(hs, h0, r, reverse):
    """``h`` entering every step (after resets): ``(T, B, H)``."""
    if reverse:
        prev = jnp.concatenate([hs[1:], h0[None]], axis=0)
    else:
        prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    if r is None:
        return prev
    return jnp.where(r[:, :, None], h0[None], prev)


def _forward(spec, w_x, b_x, w_h, b_u, state0, x, m, r, residuals):
    math = spec.math
    # One matmul per step where the gates read only a + u: [x_t, h] @ [W_x; W_h]. On XLA:CPU
    # two small matmuls per step cost more than one of their combined width.
    w_xh = jnp.concatenate([w_x, w_h], axis=0) if math.summed and b_u is None else None

    def body(state, inp):
        x_t, m_t, r_t = inp
        if r_t is not None:
            state = tuple(jnp.where(_col(r_t), s0, s) for s, s0 in zip(state, state0, strict=True))
        if w_xh is not None:
            a = jnp.concatenate([x_t, state[0]], axis=-1) @ w_xh + _row(b_x)
            u = None
        else:
            a = x_t @ w_x + _row(b_x)
            u = state[0] @ w_h
            if b_u is not None:
                u = u + _row(b_u)
        new, res = math.fwd(a, u, state)
        if m_t is not None:
            new = tuple(jnp.where(_col(m_t), s_new, s) for s_new, s in zip(new, state, strict=True))
        out = (new[0], tuple(new[1:]) if spec.trajectory else None, res if residuals else None)
        return tuple(new), out

    final, (hs, others, res) = time_scan(
        body, tuple(state0), (x, m, r), reverse=spec.reverse, unroll=spec.unroll
    )
    if not spec.trajectory:
        others = tuple(final[1:])
    return hs, others, res


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(spec, w_x, b_x, w_h, b_u, state0, x, m, r, keep):
    """``(hs (T, B, H), others)``: ``others`` holds the other carry components, their
    trajectories ``(T, B, H)`` when ``spec.trajectory`` else their final values ``(B, H)``."""
    hs, others, _ = _forward(spec, w_x, b_x, w_h, b_u, state0, x, m, r, residuals=False)
    return hs, others


def _fused_fwd(spec, w_x, b_x, w_h, b_u, state0, x, m, r, keep):
    hs, others, res = _forward(spec, w_x, b_x, w_h, b_u, state0, x, m, r, residuals=True)
    return (hs, others), (w_x, w_h, b_u, state0, x, hs, res, m, r, keep)


def _zero_cot(a):
    if a is None:
        return None
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


def _instantiate(g, like):
    if g is None or isinstance(g, jax.custom_derivatives.SymbolicZero):
        return jnp.zeros_like(like)
    return g


def _fused_bwd(spec, saved, cts):
    w_x, w_h, b_u, state0, x, hs, res, m, r, keep = saved
    math, rev = spec.math, spec.reverse
    g_hs, g_others = cts
    g_hs = _instantiate(g_hs, hs)
    h0 = state0[0]
    n = len(state0)
    dt = hs.dtype
    w_ht = w_h.T
    mf = None if m is None else m.astype(dt)[:, :, None]
    rf = None if r is None else r.astype(dt)[:, :, None]
    h_in = _inputs_in(hs, h0, r, rev)  # (T, B, H): h entering every step
    zeros = tuple(jnp.zeros_like(s) for s in state0)
    if spec.trajectory:  # cotangents of the other components arrive step by step
        g_steps = tuple(_instantiate(g, like) for g, like in zip(g_others, (hs,) * (n - 1), strict=True))
        d_last = zeros
    else:  # cotangents of their final values only
        g_steps = None
        d_last = (zeros[0],) + tuple(_instantiate(g, s) for g, s in zip(g_others, state0[1:], strict=True))

    def body(carry, inp):
        d_state, acc = carry
        gh_t, go_t, res_t, hin_t, hout_t, m_t, r_t, k_t = inp
        d = (d_state[0] + gh_t,) + tuple(
            d_state[j] + (0.0 if go_t is None else go_t[j - 1]) for j in range(1, n)
        )
        if m_t is not None:  # held steps pass the gradient straight through to the old carry
            through = tuple(dj - dj * m_t for dj in d)
            d = tuple(dj * m_t for dj in d)
        d_a, d_u, direct = math.bwd(res_t, hin_t, hout_t, d)
        d_in = (d_u @ w_ht + direct[0],) + tuple(direct[1:])
        if m_t is not None:
            d_in = tuple(a + b for a, b in zip(d_in, through, strict=True))
        if r_t is not None:  # reset steps send the gradient to the initial carry
            acc = tuple(a + dj * r_t for a, dj in zip(acc, d_in, strict=True))
            d_in = tuple(dj - dj * r_t for dj in d_in)
        if k_t is not None:
            d_in = tuple(dj * k_t for dj in d_in)
        return (d_in, acc), d_a  # one (B, G*H) array stored per step

    (d0, acc), dz = time_scan(
        body,
        (d_last, zeros),
        (
            g_hs,
            g_steps,
            res,
            h_in if math.uses_h_in else None,
            hs if math.uses_h_out else None,
            mf,
            rf,
            keep,
        ),
        reverse=not rev,
        unroll=spec.unroll,
    )
    d_state0 = tuple(a + b for a, b in zip(d0, acc, strict=True))
    d_a = dz
    d_u = d_a if math.du_from_da is None else math.du_from_da(d_a, res)
    T, B, H = hs.shape
    G = d_u.shape[-1]
    # The weight gradients are sums over time: one (T*B)-row matmul each, not T small ones.
    du2 = d_u.reshape(T * B, G)
    dw_h = h_in.reshape(T * B, H).T @ du2
    db_u = None if b_u is None else jnp.sum(du2, axis=0)
    I = x.shape[-1]
    da2 = d_a.reshape(T * B, G)
    dw_x = x.reshape(T * B, I).T @ da2
    db_x = jnp.sum(da2, axis=0)
    dx = (da2 @ w_x.T).reshape(T, B, I)
    return (dw_x, db_x, dw_h, db_u, d_state0, dx, _zero_cot(m), _zero_cot(r), _zero_cot(keep))


_fused.defvjp(_fused_fwd, _fused_bwd)


def _affine_run(
    params,
    carry0,
    xs,
    *,
    math,
    mask=None,
    resets=None,
    keep=None,
    reverse=False,
    unroll=1,
    trajectory=False,
):
    T = xs.shape[0]
    batch_shape = tuple(xs.shape[1:-1])
    B = int(np.prod(batch_shape)) if batch_shape else 1
    x = xs.reshape(T, B, xs.shape[-1])
    w_x, b_x, w_h, b_u = math.weights(params)
    state0 = tuple(s.reshape(B, s.shape[-1]) for s in math.split(carry0))
    spec = _Spec(math, bool(reverse), unroll, bool(trajectory))

    def flat(a):
        return None if a is None else a.reshape(T, B)

    hs, others = _fused(spec, w_x, b_x, w_h, b_u, state0, x, flat(mask), flat(resets), keep)

    def unflat_t(a):
        return a.reshape((T,) + batch_shape + (a.shape[-1],))

    hs = unflat_t(hs)
    ys = hs if mask is None else jnp.where(mask.reshape(mask.shape + (1,)), hs, jnp.zeros_like(hs))
    last = 0 if reverse else T - 1
    if trajectory:
        others = tuple(unflat_t(o) for o in others)
        final = math.join((hs[last],) + tuple(o[last] for o in others))
        return final, ys, math.join((hs,) + others)
    final = math.join((hs[last],) + tuple(o.reshape(batch_shape + (o.shape[-1],)) for o in others))
    return final, ys, None


def affine_kernel(math: GateMath) -> Kernel:
    """The fused BPTT ``Kernel`` of an affine-form family (accepts every option)."""
    return Kernel(bind(_affine_run, math=math))


def affine_cell(init, initial_carry, math: GateMath, *, check, gates, meta, **extra):
    """A ``Cell`` of the affine form: its step, output rule, Jacobian, diagonal, fused kernel
    and ``input_size`` all derived from ``math``; ``extra`` adds further capabilities."""
    return Cell(
        init,
        initial_carry,
        bind(affine_step, math=math, check=check),
        output=bind(affine_output, math=math),
        jacobian=bind(affine_jacobian, math=math),
        jacobian_diagonal=bind(affine_jacobian_diagonal, math=math),
        kernel=affine_kernel(math),
        gates=gates,
        input_size=bind(affine_input_size, math=math),
        meta=meta,
        **extra,
    )


def affine_output(params, carry, x, *, math):
    """The output rule of the affine form: ``y_t = h_t``, the carry's first component."""
    del params, x
    return math.split(carry)[0]


def affine_input_size(params, *, math):
    """``I``: the rows of ``W_x``."""
    return int(math.weights(params)[0].shape[0])
