r"""Windowed memory models: the time-delay network (TDNN) and the NARX cell.

Their carries are windows of past inputs (and outputs); neither is of the affine form, so
their Jacobians come from the generic autodiff fallback. The NARX output is the newest
row of its output window, which is its output rule.

Neither has ``recurrent_blocks``: they have no gates, and their state maps are delay lines
(shift registers). The TDNN's carry only shifts (no learned recurrent matrix at all); the
NARX feeds back ``[y_{t-L}, ..., y_{t-1}] W_y``, but the state that the step carries is
the whole window, whose linearisation is a companion (shift) matrix with ``W_y`` in one
block row, so the spectrum of the non-square ``W_y: (L*O, O)`` says little about the
dynamics: analyse them with the step Jacobians (``seqjax.spectrum.step_jacobians``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import initializers as inits
from seqjax._util import bind
from seqjax.cells._core import (
    Cell,
    CellMeta,
    add_bias,
    batch_shape_of,
    check_hidden,
    check_input_size,
    check_step_input,
    get_activation,
    param_dtype,
    resolve_init,
    rows_of,
)

__all__ = ["tdnn", "narx", "NARXState"]


class NARXState(NamedTuple):
    """Carry of the NARX cell: windows of past inputs and past outputs.

    Attributes:
      x: ``(*batch, window - 1, I)``, the previous ``window - 1`` inputs, oldest first.
      y: ``(*batch, output_window, O)``, the previous ``output_window`` outputs, oldest first.
    """

    x: jax.Array
    y: jax.Array


def _shift_in(window: jax.Array, x: jax.Array) -> jax.Array:
    """Drop the oldest row of ``window: (*b, K, F)`` and append ``x: (*b, F)``."""
    return jnp.concatenate([window[..., 1:, :], x[..., None, :]], axis=-2)


def _flat(window: jax.Array) -> jax.Array:
    return window.reshape(window.shape[:-2] + (window.shape[-2] * window.shape[-1],))


# --------------------------------------------------------------------------- TDNN


def _tdnn_init(key, input_size, *, hidden_size, window, kernel_init, bias_init):
    input_size = check_input_size(input_size)
    fan_in = window * input_size
    k_w, k_b = jax.random.split(key)
    w_init = resolve_init(kernel_init, inits.uniform(1.0 / float(np.sqrt(fan_in))))
    b_init = resolve_init(bias_init, inits.zeros)
    return {
        "w": w_init(k_w, (fan_in, hidden_size), jnp.float32),
        "b": b_init(k_b, (hidden_size,), jnp.float32),
    }


def _tdnn_initial_carry(params, batch_shape=(), *, window):
    I = params["w"].shape[0] // window
    return jnp.zeros(batch_shape_of(batch_shape) + (window - 1, I), param_dtype(params))


def _tdnn_step(params, window_x, x, *, window, activation):
    I = params["w"].shape[0] // window
    check_step_input("tdnn", x, I, window_x.shape[:-2])
    win = jnp.concatenate([window_x, x[..., None, :]], axis=-2)
    y = get_activation(activation)(add_bias(_flat(win) @ params["w"], params["b"]))
    return win[..., 1:, :], y


def tdnn(
    hidden_size: int,
    window: int,
    *,
    activation: str | Callable = "tanh",
    kernel_init=None,
    bias_init=None,
) -> Cell:
    r"""Time-delay neural network cell (Waibel et al. 1989): a feed-forward map of the
    last ``K = window`` inputs.

    ``y_t = f([x_{t-K+1}, ..., x_t] W + b)``: the input window, flattened oldest first,
    through one dense layer. The carry is the window of the ``K - 1`` previous inputs
    (zeros before the sequence starts), so the cell has finite memory by construction.

    Params: ``w: (K*I, H)``, ``b: (H,)``. Carry: ``(*batch, K-1, I)`` (an array).
    No output rule: ``y_t`` reads the oldest input of the old window, which the new carry
    no longer holds, so ``y_t`` is not a function of ``s_t``. No ``recurrent_blocks``: the
    carry only shifts, through no learned matrix (see the module docstring).

    Args:
      hidden_size: ``H``, the output size.
      window: ``K >= 1``, the number of inputs seen at each step (the current one included).
      activation: as in ``rnn``.
      kernel_init: initialiser of the kernel; default ``U(-1/sqrt(K I), 1/sqrt(K I))``.
      bias_init: initialiser of the bias; default zeros.

    Returns:
      A ``Cell``.
    """
    H = check_hidden(hidden_size)
    K = check_hidden(window, "window")
    get_activation(activation)
    return Cell(
        bind(_tdnn_init, hidden_size=H, window=K, kernel_init=kernel_init, bias_init=bias_init),
        bind(_tdnn_initial_carry, window=K),
        bind(_tdnn_step, window=K, activation=activation),
        input_size=bind(rows_of, key="w", per=K),
        meta=CellMeta("tdnn", H, (("window", K), ("activation", activation))),
    )


# --------------------------------------------------------------------------- NARX


def _narx_init(key, input_size, *, output_size, window, output_window, kernel_init, bias_init):
    input_size = check_input_size(input_size)
    O, K, L = output_size, window, output_window
    k_x, k_y, k_b = jax.random.split(key, 3)
    fan_in = K * input_size + L * O
    w_init = resolve_init(kernel_init, inits.uniform(1.0 / float(np.sqrt(fan_in))))
    b_init = resolve_init(bias_init, inits.zeros)
    return {
        "w_x": w_init(k_x, (K * input_size, O), jnp.float32),
        "w_y": w_init(k_y, (L * O, O), jnp.float32),
        "b": b_init(k_b, (O,), jnp.float32),
    }


def _narx_initial_carry(params, batch_shape=(), *, output_size, window, output_window):
    I = params["w_x"].shape[0] // window
    dtype = param_dtype(params)
    bs = batch_shape_of(batch_shape)
    return NARXState(
        jnp.zeros(bs + (window - 1, I), dtype), jnp.zeros(bs + (output_window, output_size), dtype)
    )


def _narx_step(params, carry, x, *, window, activation):
    I = params["w_x"].shape[0] // window
    check_step_input("narx", x, I, carry.x.shape[:-2])
    xwin = jnp.concatenate([carry.x, x[..., None, :]], axis=-2)
    f = get_activation(activation)
    y = f(add_bias(_flat(xwin) @ params["w_x"] + _flat(carry.y) @ params["w_y"], params["b"]))
    return NARXState(xwin[..., 1:, :], _shift_in(carry.y, y)), y


def _narx_output(params, carry, x):
    del params, x
    return carry.y[..., -1, :]


def narx(
    output_size: int,
    window: int,
    *,
    output_window: int | None = None,
    activation: str | Callable = "tanh",
    kernel_init=None,
    bias_init=None,
) -> Cell:
    r"""NARX cell (nonlinear autoregressive with exogenous inputs; Lin, Horne, Tino &
    Giles 1996): the output feeds back through a window of delays.

    ``y_t = f([x_{t-K+1}, ..., x_t] W_x + [y_{t-L}, ..., y_{t-1}] W_y + b)`` with
    ``K = window`` input delays (the current input included) and ``L = output_window``
    output delays (default ``K``). Windows are flattened oldest first.

    Params: ``w_x: (K*I, O)``, ``w_y: (L*O, O)``, ``b: (O,)``.
    Carry: ``NARXState(x: (*batch, K-1, I), y: (*batch, L, O))``. Output rule:
    ``y_t = carry.y[..., -1, :]``. No ``recurrent_blocks``: the feedback is a delay line
    (its Jacobian a companion matrix), not one ``h W_h`` per gate (see the module docstring).

    Args:
      output_size: ``O``.
      window: ``K >= 1``, input delays.
      output_window: ``L >= 1``, output delays.
      activation: as in ``rnn``.

    Returns:
      A ``Cell``.
    """
    O = check_hidden(output_size, "output_size")
    K = check_hidden(window, "window")
    L = check_hidden(K if output_window is None else output_window, "output_window")
    get_activation(activation)
    return Cell(
        bind(
            _narx_init, output_size=O, window=K, output_window=L, kernel_init=kernel_init, bias_init=bias_init
        ),
        bind(_narx_initial_carry, output_size=O, window=K, output_window=L),
        bind(_narx_step, window=K, activation=activation),
        output=bind(_narx_output),
        input_size=bind(rows_of, per=K),
        meta=CellMeta("narx", O, (("window", K), ("output_window", L), ("activation", activation))),
    )
