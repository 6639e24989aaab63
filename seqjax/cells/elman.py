r"""The Elman RNN family: ``h_t = f(x_t W_x + h_{t-1} W_h + b)``, and the IRNN.

Gate equations written once (``_fwd``/``_bwd``); the step, the analytic Jacobian
``J_t = diag(f'(net_t)) W_h^T``, its diagonal and the fused BPTT kernel come from them
(``seqjax.cells._fused``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from seqjax import initializers as inits
from seqjax._util import bind
from seqjax.cells import _fused
from seqjax.cells._core import (
    Cell,
    CellMeta,
    activation_derivative_from_output,
    activation_gamma,
    check_carry_width,
    check_hidden,
    check_step_input,
    column_blocks,
    gated_params,
    get_activation,
    zeros_carry,
)

__all__ = ["rnn", "irnn"]


def _split(h):
    return (h,)


def _join(state):
    return state[0]


def _fwd(a, u, state, *, activation):
    net = a + u
    h = get_activation(activation)(net)
    # f' is read off h for named activations; a callable keeps net to differentiate at.
    return (h,), (net if activation_derivative_from_output(activation) is None else None)


def _bwd(net, h_in, h_out, d, *, activation):
    d_out = activation_derivative_from_output(activation)
    if d_out is not None:
        fp = d_out(h_out)
    else:
        f = get_activation(activation)
        fp = jax.jvp(f, (net,), (jnp.ones_like(net),))[1]
    dnet = d[0] * fp
    return dnet, dnet, (jnp.zeros_like(dnet),)


def _check(params, state, x, *, hidden_size):
    (h,) = state
    check_step_input("rnn", x, params["w_x"].shape[0], h.shape[:-1])
    check_carry_width("rnn", "h", h, hidden_size)


def _init(key, input_size, *, hidden_size, hidden_bias, kernel_init, recurrent_init, bias_init):
    return gated_params(key, input_size, hidden_size, 1, kernel_init, recurrent_init, bias_init, hidden_bias)


def _initial_carry(params, batch_shape=(), *, hidden_size):
    return zeros_carry(params, batch_shape, hidden_size)[0]


def _gates(params, carry, x, *, math):
    a, u, _ = _fused._project(math, params, x, carry)
    return {"net": a + u}


def _jacobian_bound(params, *, gamma):
    """``||J_t||_2 = ||diag(f') W_h^T||_2 <= sigma_max(W_h) * sup|f'|`` (``gamma`` is
    ``None`` for a callable activation: the caller supplies it)."""
    return jnp.linalg.norm(params["w_h"], ord=2), gamma


def rnn(
    hidden_size: int,
    *,
    activation: str | Callable = "tanh",
    hidden_bias: bool = False,
    kernel_init=None,
    recurrent_init=None,
    bias_init=None,
) -> Cell:
    r"""Elman RNN cell: ``h_t = f(x_t W_x + h_{t-1} W_h + b)``, output ``y_t = h_t``.

    Params (a dict):
      ``w_x: (I, H)``, ``w_h: (H, H)``, ``b: (H,)``, and ``b_h: (H,)`` when
      ``hidden_bias=True`` (PyTorch keeps two biases, ``b_ih`` and ``b_hh``; their sum is
      what matters).

    Carry: ``h: (*batch, H)``. Default initialisation: PyTorch's ``U(-1/sqrt(H), 1/sqrt(H))``.

    Capabilities: output ``y_t = h_t``; Jacobian ``diag(f'(net_t)) W_h^T`` and its diagonal
    ``f'(net_t) * diag(W_h)``; a fused BPTT kernel; ``gates`` (``{"net"}``); for a named
    activation the bound ``||J_t|| <= sigma_max(W_h) sup|f'|`` (Pascanu et al. 2013);
    ``recurrent_blocks``: ``{"net": w_h}`` (one block, named like the gate ``net`` it feeds).

    Args:
      hidden_size: ``H``.
      activation: ``"tanh"`` (default), ``"relu"``, ``"leaky_relu"``, ``"identity"`` or a
        callable applied elementwise.
      hidden_bias: keep a second bias ``b_h`` (for exact PyTorch state-dict round trips).
      kernel_init: initialiser ``(key, shape, dtype)`` of ``w_x``.
      recurrent_init: initialiser of ``w_h``.
      bias_init: initialiser of the biases.

    Returns:
      A ``Cell``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.rnn(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> sorted((name, w.shape) for name, w in params.items())
      [('b', (4,)), ('w_h', (4, 4)), ('w_x', (3, 4))]
      >>> xs = jnp.ones((2, 5, 3))
      >>> h, ys = seqjax.unroll(cell, params, xs)
      >>> print(h.shape, ys.shape)
      (2, 4) (2, 5, 4)
      >>> h_1 = jnp.tanh(xs[:, 0] @ params["w_x"] + params["b"])   # the first step, from h_0 = 0
      >>> bool(jnp.allclose(ys[:, 0], h_1, atol=1e-6))
      True

    Reference: Elman, "Finding structure in time", Cognitive Science 14 (1990).
    """
    H = check_hidden(hidden_size)
    get_activation(activation)  # fail early on a bad name
    gamma = activation_gamma(activation)
    math = _fused.GateMath(
        bind(_fused.folded_bias_weights),
        bind(_split),
        bind(_join),
        bind(_fwd, activation=activation),
        bind(_bwd, activation=activation),
        uses_h_in=False,
    )
    return _fused.affine_cell(
        bind(
            _init,
            hidden_size=H,
            hidden_bias=bool(hidden_bias),
            kernel_init=kernel_init,
            recurrent_init=recurrent_init,
            bias_init=bias_init,
        ),
        bind(_initial_carry, hidden_size=H),
        math,
        check=bind(_check, hidden_size=H),
        gates=bind(_gates, math=math),
        jacobian_bound=bind(_jacobian_bound, gamma=gamma),
        recurrent_blocks=bind(column_blocks, names=("net",)),
        meta=CellMeta("rnn", H, (("activation", activation), ("hidden_bias", bool(hidden_bias)))),
    )


def _irnn_kernel_init(key, shape, dtype=jnp.float32, *, scale):
    return scale * jax.random.normal(key, tuple(shape), dtype)


def irnn(hidden_size: int, *, input_scale: float = 1e-3, gain: float = 1.0) -> Cell:
    """IRNN (Le, Jaitly & Hinton 2015): ReLU Elman cell with ``W_h = gain * I``, ``b = 0``.

    Input weights are ``N(0, input_scale**2)`` (the paper uses std 0.001).

    Args:
      hidden_size: ``H``.
      input_scale: standard deviation of the entries of ``w_x``.
      gain: the diagonal of ``w_h``.

    Returns:
      ``rnn(hidden_size, activation="relu", ...)`` with that initialisation.
    """
    return rnn(
        hidden_size,
        activation="relu",
        kernel_init=bind(_irnn_kernel_init, scale=float(input_scale)),
        recurrent_init=inits.identity(gain),
        bias_init=inits.zeros,
    )
