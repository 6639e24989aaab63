r"""Simplified gated cells: the minimal gated unit (MGU) and the forget-gate-only LSTM (JANET).

JANET is of the affine form (``seqjax.cells._fused``): its gate equations are written once
and give its step, Jacobian, diagonal and fused kernel. The MGU applies its gate *before*
the second recurrent matmul, ``(f * h) W_hn``, so it is not; its Jacobian and diagonal are
written here next to its step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax._util import bind
from seqjax.cells import _fused
from seqjax.cells._core import (
    Cell,
    CellMeta,
    add_bias,
    carry_h,
    check_carry_width,
    check_hidden,
    check_step_input,
    column_blocks,
    gated_params,
    rows_of,
    zeros_carry,
)

__all__ = ["mgu", "janet"]


def _init(key, input_size, *, hidden_size, kernel_init, recurrent_init, bias_init):
    return gated_params(key, input_size, hidden_size, 2, kernel_init, recurrent_init, bias_init, False)


def _initial_carry(params, batch_shape=(), *, hidden_size):
    return zeros_carry(params, batch_shape, hidden_size)[0]


def _check(name, params, h, x, hidden_size):
    check_step_input(name, x, params["w_x"].shape[0], h.shape[:-1])
    check_carry_width(name, "h", h, hidden_size)


# --------------------------------------------------------------------------- MGU


def _mgu_values(params, h, x):
    """``f, n`` and the input projection: the MGU's gate equations."""
    H = h.shape[-1]
    w = params["w_h"]
    gx = add_bias(x @ params["w_x"], params["b"])
    f = jax.nn.sigmoid(gx[..., :H] + h @ w[:, :H])
    n = jnp.tanh(gx[..., H:] + (f * h) @ w[:, H:])
    return f, n


def _mgu_step(params, h, x, *, hidden_size):
    _check("mgu", params, h, x, hidden_size)
    f, n = _mgu_values(params, h, x)
    h_new = (1.0 - f) * h + f * n
    return h_new, h_new


def _mgu_gates(params, h, x, *, hidden_size):
    f, n = _mgu_values(params, h, x)
    return {"f": f, "n": n}


def _mgu_jacobian(params, h, x, *, hidden_size):
    r"""``J = diag(1 - f) + (n - h) df + f dn`` with ``df = f(1-f) W_hf^T`` and
    ``dn = (1 - n^2) W_hn^T (h df + diag f)`` (rows: d h_t[i], columns: d h_{t-1}[j])."""
    H = hidden_size
    w = params["w_h"]
    f, n = _mgu_values(params, h, x)
    df = (f * (1 - f))[:, None] * w[:, :H].T
    dfh = h[:, None] * df + jnp.diag(f)
    dn = (1 - n * n)[:, None] * (w[:, H:].T @ dfh)
    return jnp.diag(1 - f) + (n - h)[:, None] * df + f[:, None] * dn


def _mgu_jacobian_diagonal(params, h, x, *, hidden_size):
    """``diag J`` in ``O(H^2)``: ``(W_hn^T dfh)[k, k] = sum_j W_hn[j, k] dfh[j, k]``."""
    H = hidden_size
    w = params["w_h"]
    f, n = _mgu_values(params, h, x)
    sf = f * (1 - f)
    w_f, w_n = w[:, :H], w[:, H:]
    # dfh[j, k] = h_j sf_j W_hf[k, j] + f_j delta_jk
    dfh_cols = (h * sf)[:, None] * w_f.T + jnp.diag(f)
    inner = jnp.sum(w_n * dfh_cols, axis=0)  # (W_hn^T dfh)[k, k]
    return (1 - f) + (n - h) * sf * jnp.diagonal(w_f) + f * (1 - n * n) * inner


def mgu(hidden_size: int, *, kernel_init=None, recurrent_init=None, bias_init=None) -> Cell:
    r"""Minimal gated unit (Zhou, Wu, Zhang & Zhou 2016): one forget gate.

    With blocks ``f, n`` of the kernels:

    ```text
    f = sigmoid(x W_xf + h_{t-1} W_hf + b_f)
    n = tanh(x W_xn + (f * h_{t-1}) W_hn + b_n)
    h_t = (1 - f) * h_{t-1} + f * n
    ```

    Params: ``w_x: (I, 2H)``, ``w_h: (H, 2H)``, ``b: (2H,)``. Carry: ``h: (*batch, H)``.
    Capabilities: output, analytic Jacobian and diagonal, gates (no fused kernel),
    ``recurrent_blocks``: ``{"f": W_hf, "n": W_hn}``, the ``(H, H)`` column blocks of
    ``w_h``. ``W_hf`` is ``d net_f / d h_{t-1}`` transposed; the candidate's recurrent term
    is ``(f * h_{t-1}) W_hn``, so ``W_hn`` is the matrix applied to the *gated* state
    ``f * h_{t-1}`` (``d net_n / d(f * h_{t-1}) = W_hn^T``), not to ``h_{t-1}`` itself.

    Returns:
      A ``Cell``; ``gates`` returns ``{"f", "n"}``.
    """
    H = check_hidden(hidden_size)
    c = {"hidden_size": H}
    return Cell(
        bind(_init, kernel_init=kernel_init, recurrent_init=recurrent_init, bias_init=bias_init, **c),
        bind(_initial_carry, **c),
        bind(_mgu_step, **c),
        output=bind(carry_h),
        jacobian=bind(_mgu_jacobian, **c),
        jacobian_diagonal=bind(_mgu_jacobian_diagonal, **c),
        gates=bind(_mgu_gates, **c),
        input_size=bind(rows_of),
        recurrent_blocks=bind(column_blocks, names=("f", "n")),
        meta=CellMeta("mgu", H, ()),
    )


# --------------------------------------------------------------------------- JANET


def _janet_weights(params):
    return params["w_x"], params["b"], params["w_h"], None


def _split(h):
    return (h,)


def _join(state):
    return state[0]


def _janet_fwd(a, u, state, *, beta):
    (h,) = state
    H = h.shape[-1]
    z = a + u
    s = z[..., :H]
    f = jax.nn.sigmoid(s)
    sb = jax.nn.sigmoid(s - beta)
    ct = jnp.tanh(z[..., H:])
    h_new = f * h + (1.0 - sb) * ct
    return (h_new,), jnp.concatenate([f, sb, ct], axis=-1)


def _janet_bwd(res, h_in, h_out, d, *, beta):
    H = h_in.shape[-1]
    f, sb, ct = (res[..., k * H : (k + 1) * H] for k in range(3))
    d = d[0]
    ds = d * (h_in * f * (1.0 - f) - ct * sb * (1.0 - sb))
    dct = d * (1.0 - sb) * (1.0 - ct * ct)
    dz = jnp.concatenate([ds, dct], axis=-1)
    return dz, dz, (d * f,)


def _janet_check(params, state, x, *, hidden_size):
    _check("janet", params, state[0], x, hidden_size)


def _janet_gates(params, h, x, *, math):
    a, u, _ = _fused._project(math, params, x, h)
    H = h.shape[-1]
    z = a + u
    return {"f": jax.nn.sigmoid(z[..., :H]), "c_tilde": jnp.tanh(z[..., H:])}


def janet(
    hidden_size: int, *, beta: float = 1.0, kernel_init=None, recurrent_init=None, bias_init=None
) -> Cell:
    r"""Forget-gate-only LSTM, "JANET" (van der Westhuizen & Lasenby 2018).

    With blocks ``f, c`` of the kernels:

    ```text
    s = x W_xf + h_{t-1} W_hf + b_f
    c~ = tanh(x W_xc + h_{t-1} W_hc + b_c)
    c_t = sigmoid(s) * c_{t-1} + (1 - sigmoid(s - beta)) * c~
    h_t = c_t
    ```

    ``beta = 0`` gives the coupled form ``c_t = f c_{t-1} + (1 - f) c~``.

    Params: ``w_x: (I, 2H)``, ``w_h: (H, 2H)``, ``b: (2H,)``. Carry: ``h: (*batch, H)``.
    Capabilities: output, Jacobian, diagonal, fused kernel, gates, ``recurrent_blocks``
    (``{"f": W_hf, "c_tilde": W_hc}``, the ``(H, H)`` column blocks of ``w_h``; the ``f``
    block feeds ``s``, which enters both ``sigmoid(s)`` and ``sigmoid(s - beta)``).

    Args:
      hidden_size: ``H``.
      beta: the shift of the input gate (the paper uses 1).

    Returns:
      A ``Cell``; ``gates`` returns ``{"f", "c_tilde"}``.
    """
    H = check_hidden(hidden_size)
    beta = float(beta)
    math = _fused.GateMath(
        bind(_janet_weights),
        bind(_split),
        bind(_join),
        bind(_janet_fwd, beta=beta),
        bind(_janet_bwd, beta=beta),
        uses_h_out=False,
    )
    return _fused.affine_cell(
        bind(
            _init, hidden_size=H, kernel_init=kernel_init, recurrent_init=recurrent_init, bias_init=bias_init
        ),
        bind(_initial_carry, hidden_size=H),
        math,
        check=bind(_janet_check, hidden_size=H),
        gates=bind(_janet_gates, math=math),
        recurrent_blocks=bind(column_blocks, names=("f", "c_tilde")),
        meta=CellMeta("janet", H, (("beta", beta),)),
    )
