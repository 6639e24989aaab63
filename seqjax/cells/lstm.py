r"""The LSTM: gate equations written once; step, Jacobian, diagonal and fused kernel from them.

With ``z = x_t W_x + h_{t-1} W_h + b`` split into four blocks in PyTorch's gate order
``i, f, g, o``:

```text
i = sigmoid(z_i)   f = sigmoid(z_f)   g = tanh(z_g)   o = sigmoid(z_o)
c_t = f * c_{t-1} + i * g
h_t = o * tanh(c_t)
```

and their derivatives (``_bwd``):

```text
dc  = dL/dc_t + dL/dh_t * o * (1 - tanh(c_t)^2)
dz  = [dc g i(1-i),  dc c_{t-1} f(1-f),  dc i (1-g^2),  dL/dh_t tanh(c_t) o(1-o)]
dL/dh_{t-1} = dz W_h^T,   dL/dc_{t-1} = dc * f      (the near-identity path diag(f))
```
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqjax import initializers as inits
from seqjax._util import bind
from seqjax.cells import _fused
from seqjax.cells._core import (
    Cell,
    CellMeta,
    add_bias,
    carry_field_h,
    check_carry_width,
    check_hidden,
    check_step_input,
    column_blocks,
    gated_params,
    resolve_init,
    rows_of,
    zeros_carry,
)
from seqjax.cells._cudnn import cudnn_lstm_kernel

__all__ = ["lstm", "LSTMState", "lstm_gate_math", "lstm_recompute_gate_math"]


class LSTMState(NamedTuple):
    """Carry of the LSTM: ``h: (*batch, P)`` (``P = proj_size or H``), ``c: (*batch, H)``.

    The field order is ``(h, c)`` as in Equinox and PyTorch's ``(h_n, c_n)``; Flax's
    ``LSTMCell`` uses ``(c, h)``. Access fields by name.
    """

    h: jax.Array
    c: jax.Array


# --------------------------------------------------------------------------- the gate equations


def _gates_of(z, H):
    """``i, f, g, o`` from the pre-activations ``z: (..., 4H)``."""
    i = jax.nn.sigmoid(z[..., :H])
    f = jax.nn.sigmoid(z[..., H : 2 * H])
    g = jnp.tanh(z[..., 2 * H : 3 * H])
    o = jax.nn.sigmoid(z[..., 3 * H :])
    return i, f, g, o


def _cell_update(i, f, g, o, c):
    c_new = f * c + i * g
    return o * jnp.tanh(c_new), c_new


def _gate_grads(i, f, g, o, c_in, dh, dc_out):
    """``(dz, dc_in)`` from the gates of one step and the cotangents of ``(h_t, c_t)``."""
    tc = jnp.tanh(f * c_in + i * g)  # c_t, recomputed
    dc = dc_out + dh * o * (1.0 - tc * tc)
    dz = jnp.concatenate(
        [dc * g * i * (1.0 - i), dc * c_in * f * (1.0 - f), dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)],
        axis=-1,
    )
    return dz, dc * f


def _split(carry):
    return (carry.h, carry.c)


def _join(state):
    return LSTMState(*state)


def _fwd(a, u, state):
    _, c = state
    i, f, g, o = _gates_of(_fused.preactivation(a, u), c.shape[-1])
    h_new, c_new = _cell_update(i, f, g, o, c)
    # Residuals: the cell state entering the step and the four gates, kept as four arrays
    # (scan outputs written in place; concatenating them costs a copy per step, about 12% of
    # forward+backward at B=32, H=256 on XLA:CPU). c_t is recomputed.
    return (h_new, c_new), (c, (i, f, g, o))


def _bwd(res, h_in, h_out, d):
    c_in, (i, f, g, o) = res
    dz, dc_in = _gate_grads(i, f, g, o, c_in, d[0], d[1])
    return dz, dz, (jnp.zeros_like(d[0]), dc_in)


# A second kernel behind the same interface: residuals are the pre-activations z (4H) and
# c_{t-1}; the gates are recomputed in the backward pass. Same maths, a different
# compute/memory trade; it exists to keep the kernel interface honest (a family may offer
# variants) and is checked against autodiff like the default one.


def _fwd_recompute(a, u, state):
    _, c = state
    z = _fused.preactivation(a, u)
    i, f, g, o = _gates_of(z, c.shape[-1])
    h_new, c_new = _cell_update(i, f, g, o, c)
    return (h_new, c_new), (c, z)


def _bwd_recompute(res, h_in, h_out, d):
    c_in, z = res
    i, f, g, o = _gates_of(z, c_in.shape[-1])
    dz, dc_in = _gate_grads(i, f, g, o, c_in, d[0], d[1])
    return dz, dz, (jnp.zeros_like(d[0]), dc_in)


def _lstm_math(fwd, bwd) -> _fused.GateMath:
    return _fused.GateMath(
        bind(_fused.folded_bias_weights),
        bind(_split),
        bind(_join),
        bind(fwd),
        bind(bwd),
        uses_h_in=False,
        uses_h_out=False,
        summed=True,
    )


def lstm_gate_math() -> _fused.GateMath:
    """The LSTM's ``GateMath`` (residuals: ``c_{t-1}`` and the gate activations)."""
    return _lstm_math(_fwd, _bwd)


def lstm_recompute_gate_math() -> _fused.GateMath:
    """A variant ``GateMath`` that keeps the pre-activations and recomputes the gates backward."""
    return _lstm_math(_fwd_recompute, _bwd_recompute)


# --------------------------------------------------------------------------- cell functions

_GATES = ("i", "f", "g", "o")  # the column blocks of w_x, w_h and b, in PyTorch's order


def _check(params, state, x, *, hidden_size, proj_size):
    h, c = state
    check_step_input("lstm", x, params["w_x"].shape[0], h.shape[:-1])
    check_carry_width("lstm", "h", h, proj_size or hidden_size)
    check_carry_width("lstm", "c", c, hidden_size)


def _init(
    key,
    input_size,
    *,
    hidden_size,
    proj_size,
    forget_bias,
    hidden_bias,
    kernel_init,
    recurrent_init,
    bias_init,
):
    H, P = hidden_size, proj_size or hidden_size
    key, k_p = jax.random.split(key)
    params = gated_params(
        key, input_size, H, 4, kernel_init, recurrent_init, bias_init, hidden_bias, recurrent_rows=P
    )
    if forget_bias:
        params["b"] = params["b"].at[H : 2 * H].add(forget_bias)
    if proj_size:
        r_init = resolve_init(recurrent_init, inits.pytorch_uniform(H))
        params["w_p"] = r_init(k_p, (H, P), jnp.float32)
    return params


def _initial_carry(params, batch_shape=(), *, hidden_size, proj_size):
    h, c = zeros_carry(params, batch_shape, proj_size or hidden_size, hidden_size)
    return LSTMState(h, c)


def _proj_forward(params, carry, x, *, hidden_size, proj_size):
    """The step with a projection ``h_t = (o * tanh(c_t)) W_p`` (not of the affine form)."""
    H = hidden_size
    h, c = carry
    _check(params, (h, c), x, hidden_size=H, proj_size=proj_size)
    z = add_bias(x @ params["w_x"] + h @ params["w_h"], params["b"])
    if "b_h" in params:
        z = add_bias(z, params["b_h"])
    i, f, g, o = _gates_of(z, H)
    h_new, c_new = _cell_update(i, f, g, o, c)
    h_new = h_new @ params["w_p"]
    return LSTMState(h_new, c_new), {"i": i, "f": f, "g": g, "o": o}


def _proj_step(params, carry, x, **config):
    new, _ = _proj_forward(params, carry, x, **config)
    return new, new.h


def _proj_gates(params, carry, x, **config):
    return _proj_forward(params, carry, x, **config)[1]


def _gates(params, carry, x, *, math):
    state = math.split(carry)
    a, u, _ = _fused._project(math, params, x, state[0])
    i, f, g, o = _gates_of(a + u, state[1].shape[-1])
    return {"i": i, "f": f, "g": g, "o": o}


def lstm(
    hidden_size: int,
    *,
    proj_size: int = 0,
    forget_bias: float = 0.0,
    hidden_bias: bool = False,
    kernel_init=None,
    recurrent_init=None,
    bias_init=None,
    cudnn: bool = False,
) -> Cell:
    r"""Long short-term memory cell (Hochreiter & Schmidhuber 1997; Gers et al. 2000).

    With ``z = x_t W_x + h_{t-1} W_h + b`` split into four blocks in PyTorch's gate order
    ``i, f, g, o``:

    ```text
    i = sigmoid(z_i)   f = sigmoid(z_f)   g = tanh(z_g)   o = sigmoid(z_o)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)            (times W_p when proj_size > 0, as PyTorch)
    ```

    ``dc_t/dc_{t-1} = diag(f)``: the near-identity path that keeps gradients alive.

    Params (a dict):
      ``w_x: (I, 4H)``, ``w_h: (P, 4H)``, ``b: (4H,)``, optional ``b_h: (4H,)``
      (``hidden_bias=True``), optional ``w_p: (H, P)`` (``proj_size = P > 0``).
      Column block ``k`` of the kernels is gate ``"ifgo"[k]``.

    Carry: ``LSTMState(h: (*batch, P), c: (*batch, H))`` with ``P = proj_size or H``.

    Capabilities: output ``y_t = h_t``; gates; ``recurrent_blocks``, ``{"i", "f", "g", "o"}``
    -> the column blocks ``W_h^g: (P, H)`` of ``w_h`` (``z_g = x W_x^g + h_{t-1} W_h^g + b_g``;
    square only without projection). Without projection also the analytic Jacobian of
    ``s = [h, c]`` (``S = 2H``), its diagonal and the fused BPTT kernel; with a projection
    those fall back to autodiff (the step is not of the affine form).

    Args:
      hidden_size: ``H``.
      proj_size: if positive, project ``h_t`` to ``P`` features (PyTorch's ``proj_size``).
      forget_bias: added to the forget-gate block of ``b`` at initialisation (1.0 is the
        common choice of Gers et al. and Jozefowicz et al. 2015).
      hidden_bias: keep a second bias ``b_h`` (PyTorch's ``bias_hh``).
      kernel_init: initialiser ``(key, shape, dtype)`` of ``w_x``; default PyTorch's uniform.
      recurrent_init: initialiser of ``w_h``; default PyTorch's uniform.
      bias_init: initialiser of the biases; default PyTorch's uniform.
      cudnn: on NVIDIA GPUs, run whole-sequence calls that need nothing cuDNN lacks (no
        lengths or mask, resets, truncation or trajectory; float32) through cuDNN's LSTM
        (``jax.experimental.rnn``), chosen at lowering by ``jax.lax.platform_dependent``;
        every other call, and every other platform, runs the fused kernel. Needs
        ``proj_size=0``. See the guide "GPU and cuDNN".

    Returns:
      A ``Cell``; ``gates`` returns ``{"i", "f", "g", "o"}`` activations ``(*batch, H)``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.lstm(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> print(params["w_x"].shape, params["w_h"].shape, params["b"].shape)   # blocks i, f, g, o
      (3, 16) (4, 16) (16,)
      >>> carry = cell.initial_carry(params, (2,))
      >>> print(type(carry).__name__, carry.h.shape, carry.c.shape)
      LSTMState (2, 4) (2, 4)
      >>> carry, y = cell.step(params, carry, jnp.ones((2, 3)))
      >>> bool(jnp.allclose(y, carry.h))
      True
    """
    H = check_hidden(hidden_size)
    if proj_size < 0 or (proj_size != 0 and proj_size >= H):
        raise ValueError(f"lstm: proj_size must be 0 or in [1, hidden_size={H}), got {proj_size}.")
    config = {"hidden_size": H, "proj_size": int(proj_size)}
    init = bind(
        _init,
        forget_bias=float(forget_bias),
        hidden_bias=bool(hidden_bias),
        kernel_init=kernel_init,
        recurrent_init=recurrent_init,
        bias_init=bias_init,
        **config,
    )
    options: tuple = (
        ("proj_size", int(proj_size)),
        ("forget_bias", float(forget_bias)),
        ("hidden_bias", bool(hidden_bias)),
    )
    if cudnn:
        options += (("cudnn", True),)
    meta = CellMeta("lstm", H, options)
    if proj_size:
        if cudnn:
            raise ValueError(
                f"lstm: cudnn=True needs proj_size=0, got proj_size={proj_size}: the projected LSTM "
                "has no fused kernel, and cuDNN's LSTM in jax.experimental.rnn has no projection."
            )
        return Cell(
            init,
            bind(_initial_carry, **config),
            bind(_proj_step, **config),
            output=bind(carry_field_h),
            gates=bind(_proj_gates, **config),
            input_size=bind(rows_of),
            recurrent_blocks=bind(column_blocks, names=_GATES),
            meta=meta,
        )
    math = lstm_gate_math()
    cell = _fused.affine_cell(
        init,
        bind(_initial_carry, **config),
        math,
        check=bind(_check, **config),
        gates=bind(_gates, math=math),
        recurrent_blocks=bind(column_blocks, names=_GATES),
        meta=meta,
    )
    if cudnn:
        cell = cell._replace(kernel=cudnn_lstm_kernel(cell.kernel, H))
    return cell
