"""Recurrent cells as bundles of pure functions.

The whole contract of a cell, in one place::

    cell = Cell(init, initial_carry, step)
    params = cell.init(key, input_size)              # a pytree of arrays
    carry = cell.initial_carry(params, batch_shape)  # a pytree of zeros, leaves (*batch, ...)
    carry, y_t = cell.step(params, carry, x_t)       # x_t: (*batch, input_size)

``step`` is exactly the body of a ``jax.lax.scan``; ``seqjax.unroll`` is the one place
that scans it. Params come first in every function so ``jax.grad`` differentiates them by
default. Any leading batch dimensions on ``x_t`` work, as long as the carry has the same
ones. Matrices act on row vectors: ``x_t @ w_x`` with ``w_x: (I, G*H)``.

Built-in cells also carry ``gates(params, carry, x_t) -> dict`` (the gate activations of
that step, for analysis) and ``meta`` (what the cell is, so fast paths such as analytic
Jacobians can recognise it). A user's cell may leave both ``None`` and still gets every
feature of seqjax through the generic paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import initializers as inits

__all__ = [
    "Cell",
    "CellMeta",
    "LSTMState",
    "NARXState",
    "rnn",
    "irnn",
    "lstm",
    "gru",
    "mgu",
    "janet",
    "tdnn",
    "narx",
    "get_activation",
]

Params = Any
Carry = Any


@dataclasses.dataclass(frozen=True)
class CellMeta:
    """What a built-in cell is: read by fast paths (analytic Jacobians, fused BPTT).

    Attributes:
      kind: ``"rnn"``, ``"lstm"``, ``"gru"``, ``"mgu"``, ``"janet"``, ``"tdnn"`` or ``"narx"``.
      hidden_size: the number of hidden units ``H`` (output size for TDNN/NARX).
      options: the constructor's options (activation name, projection size, ...).
    """

    kind: str
    hidden_size: int
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Cell(NamedTuple):
    """A recurrent cell: three pure functions (and two optional extras).

    Attributes:
      init: ``(key, input_size) -> params``, a pytree of arrays.
      initial_carry: ``(params, batch_shape=()) -> carry``, zeros with leaves
        ``(*batch_shape, ...)`` in the dtype of the params.
      step: ``(params, carry, x_t) -> (carry, y_t)`` with ``x_t: (*batch, input_size)``.
      gates: optional ``(params, carry, x_t) -> dict`` of this step's gate activations.
      meta: optional ``CellMeta`` describing a built-in cell.
    """

    init: Callable[..., Params]
    initial_carry: Callable[..., Carry]
    step: Callable[[Params, Carry, jax.Array], tuple[Carry, jax.Array]]
    gates: Callable[..., dict] | None = None
    meta: CellMeta | None = None


class LSTMState(NamedTuple):
    """Carry of the LSTM: ``h: (*batch, P)`` (``P = proj_size or H``), ``c: (*batch, H)``.

    The field order is ``(h, c)`` as in Equinox and PyTorch's ``(h_n, c_n)``; Flax's
    ``LSTMCell`` uses ``(c, h)``. Access fields by name.
    """

    h: jax.Array
    c: jax.Array


class NARXState(NamedTuple):
    """Carry of the NARX cell: windows of past inputs and past outputs.

    Attributes:
      x: ``(*batch, window - 1, I)``, the previous ``window - 1`` inputs, oldest first.
      y: ``(*batch, output_window, O)``, the previous ``output_window`` outputs, oldest first.
    """

    x: jax.Array
    y: jax.Array


# --------------------------------------------------------------------------- helpers

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "identity": lambda z: z,
    "linear": lambda z: z,
    "sigmoid": jax.nn.sigmoid,
}


def get_activation(activation: str | Callable) -> Callable[[jax.Array], jax.Array]:
    """Resolve an activation name (``tanh``, ``relu``, ``leaky_relu``, ``identity``,
    ``linear``, ``sigmoid``) or pass a callable through."""
    if callable(activation):
        return activation
    try:
        return _ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {activation!r}."
        ) from None


def _check_hidden(hidden_size: int, name: str = "hidden_size") -> int:
    if not isinstance(hidden_size, (int, np.integer)) or isinstance(hidden_size, bool) or hidden_size < 1:
        raise ValueError(f"{name} must be a positive integer, got {hidden_size!r}.")
    return int(hidden_size)


def _check_input_size(input_size: int) -> int:
    if not isinstance(input_size, (int, np.integer)) or isinstance(input_size, bool) or input_size < 1:
        raise ValueError(
            f"input_size must be a positive integer (the number of features of x_t), got {input_size!r}."
        )
    return int(input_size)


def _check_step_input(cell: str, x: jax.Array, fan_in: int, batch_shape: tuple[int, ...]) -> None:
    """Trace-time checks of one step's input against the params and the carry."""
    if x.ndim < 1 or x.shape[-1] != fan_in:
        raise ValueError(
            f"{cell}: x_t has shape {tuple(x.shape)} but the params expect {fan_in} features "
            f"(x_t must be (*batch, {fan_in})); check input_size at init."
        )
    if tuple(x.shape[:-1]) != tuple(batch_shape):
        raise ValueError(
            f"{cell}: x_t has batch shape {tuple(x.shape[:-1])} but the carry has batch shape "
            f"{tuple(batch_shape)}; make the carry with cell.initial_carry(params, {tuple(x.shape[:-1])})."
        )


def _check_carry_width(cell: str, name: str, arr: jax.Array, width: int) -> None:
    if arr.ndim < 1 or arr.shape[-1] != width:
        raise ValueError(f"{cell}: carry {name} has shape {tuple(arr.shape)} but needs (*batch, {width}).")


def _bias(z: jax.Array, b: jax.Array) -> jax.Array:
    """``z + b`` with ``b: (N,)`` broadcast explicitly over the batch dims of ``z: (*batch, N)``
    (no implicit rank promotion, so cells work under ``jax_numpy_rank_promotion="raise"``)."""
    return z + b.reshape((1,) * (z.ndim - 1) + b.shape)


def _param_dtype(params: Mapping[str, jax.Array]) -> jnp.dtype:
    return jnp.result_type(*[p.dtype for p in jax.tree_util.tree_leaves(params)])


def _default(init, fallback):
    return fallback if init is None else inits._as_initializer(init, "initializer")


def _batch_shape(batch_shape) -> tuple[int, ...]:
    if isinstance(batch_shape, (int, np.integer)):
        return (int(batch_shape),)
    return tuple(int(b) for b in batch_shape)


def _gated_params(
    key,
    input_size: int,
    hidden_size: int,
    gates: int,
    kernel_init,
    recurrent_init,
    bias_init,
    hidden_bias: bool,
    recurrent_rows: int | None = None,
) -> dict[str, jax.Array]:
    input_size = _check_input_size(input_size)
    rows = hidden_size if recurrent_rows is None else recurrent_rows
    k_x, k_h, k_b, k_bh = jax.random.split(key, 4)
    params = {
        "w_x": kernel_init(k_x, (input_size, gates * hidden_size), jnp.float32),
        "w_h": recurrent_init(k_h, (rows, gates * hidden_size), jnp.float32),
        "b": bias_init(k_b, (gates * hidden_size,), jnp.float32),
    }
    if hidden_bias:
        params["b_h"] = bias_init(k_bh, (gates * hidden_size,), jnp.float32)
    return params


def _zeros_like_batch(params, batch_shape, *widths):
    dtype = _param_dtype(params)
    batch_shape = _batch_shape(batch_shape)
    return [jnp.zeros(batch_shape + (w,), dtype) for w in widths]


# --------------------------------------------------------------------------- Elman


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

    Args:
      hidden_size: ``H``.
      activation: ``"tanh"`` (default), ``"relu"``, ``"leaky_relu"``, ``"identity"`` or a
        callable applied elementwise.
      hidden_bias: keep a second bias ``b_h`` (for exact PyTorch state-dict round trips).
      kernel_init, recurrent_init, bias_init: initialisers ``(key, shape, dtype)`` of
        ``w_x``, ``w_h`` and the biases.

    Returns:
      A ``Cell``.

    Example::

      cell = seqjax.rnn(32)
      params = cell.init(jax.random.key(0), input_size=8)
      carry, ys = seqjax.unroll(cell, params, xs)  # xs: (B, T, 8) -> ys: (B, T, 32)

    Reference: Elman, "Finding structure in time", Cognitive Science 14 (1990).
    """
    H = _check_hidden(hidden_size)
    f = get_activation(activation)
    u = inits.pytorch_uniform(H)
    k_init, r_init, b_init = _default(kernel_init, u), _default(recurrent_init, u), _default(bias_init, u)

    def init(key, input_size):
        return _gated_params(key, input_size, H, 1, k_init, r_init, b_init, hidden_bias)

    def initial_carry(params, batch_shape=()):
        return _zeros_like_batch(params, batch_shape, H)[0]

    def forward(params, h, x):
        _check_step_input("rnn", x, params["w_x"].shape[0], h.shape[:-1])
        _check_carry_width("rnn", "h", h, H)
        net = _bias(x @ params["w_x"] + h @ params["w_h"], params["b"])
        if "b_h" in params:
            net = _bias(net, params["b_h"])
        h_new = f(net)
        return h_new, h_new, {"net": net}

    def step(params, h, x):
        h_new, y, _ = forward(params, h, x)
        return h_new, y

    def gates(params, h, x):
        return forward(params, h, x)[2]

    meta = CellMeta("rnn", H, {"activation": activation, "hidden_bias": hidden_bias})
    return Cell(init, initial_carry, step, gates, meta)


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

    def kernel_init(key, shape, dtype=jnp.float32):
        return input_scale * jax.random.normal(key, tuple(shape), dtype)

    return rnn(
        hidden_size,
        activation="relu",
        kernel_init=kernel_init,
        recurrent_init=inits.identity(gain),
        bias_init=inits.zeros,
    )


# --------------------------------------------------------------------------- LSTM


def lstm(
    hidden_size: int,
    *,
    proj_size: int = 0,
    forget_bias: float = 0.0,
    hidden_bias: bool = False,
    kernel_init=None,
    recurrent_init=None,
    bias_init=None,
) -> Cell:
    r"""Long short-term memory cell (Hochreiter & Schmidhuber 1997; Gers et al. 2000).

    With ``z = x_t W_x + h_{t-1} W_h + b`` split into four blocks in PyTorch's gate order
    ``i, f, g, o``::

        i = sigmoid(z_i)   f = sigmoid(z_f)   g = tanh(z_g)   o = sigmoid(z_o)
        c_t = f * c_{t-1} + i * g
        h_t = o * tanh(c_t)            (times W_p when proj_size > 0, as PyTorch)

    ``dc_t/dc_{t-1} = diag(f)``: the near-identity path that keeps gradients alive.

    Params (a dict):
      ``w_x: (I, 4H)``, ``w_h: (P, 4H)``, ``b: (4H,)``, optional ``b_h: (4H,)``
      (``hidden_bias=True``), optional ``w_p: (H, P)`` (``proj_size = P > 0``).
      Column block ``k`` of the kernels is gate ``"ifgo"[k]``.

    Carry: ``LSTMState(h: (*batch, P), c: (*batch, H))`` with ``P = proj_size or H``.

    Args:
      hidden_size: ``H``.
      proj_size: if positive, project ``h_t`` to ``P`` features (PyTorch's ``proj_size``).
      forget_bias: added to the forget-gate block of ``b`` at initialisation (1.0 is the
        common choice of Gers et al. and Jozefowicz et al. 2015).
      hidden_bias: keep a second bias ``b_h`` (PyTorch's ``bias_hh``).
      kernel_init, recurrent_init, bias_init: initialisers; default PyTorch's uniform.

    Returns:
      A ``Cell``; ``gates`` returns ``{"i", "f", "g", "o"}`` activations ``(*batch, H)``.
    """
    H = _check_hidden(hidden_size)
    if proj_size < 0 or (proj_size != 0 and proj_size >= H):
        raise ValueError(f"lstm: proj_size must be 0 or in [1, hidden_size={H}), got {proj_size}.")
    P = proj_size or H
    u = inits.pytorch_uniform(H)
    k_init, r_init, b_init = _default(kernel_init, u), _default(recurrent_init, u), _default(bias_init, u)

    def init(key, input_size):
        key, k_p = jax.random.split(key)
        params = _gated_params(key, input_size, H, 4, k_init, r_init, b_init, hidden_bias, recurrent_rows=P)
        if forget_bias:
            params["b"] = params["b"].at[H : 2 * H].add(forget_bias)
        if proj_size:
            params["w_p"] = r_init(k_p, (H, P), jnp.float32)
        return params

    def initial_carry(params, batch_shape=()):
        h, c = _zeros_like_batch(params, batch_shape, P, H)
        return LSTMState(h, c)

    def forward(params, carry, x):
        h, c = carry
        _check_step_input("lstm", x, params["w_x"].shape[0], h.shape[:-1])
        _check_carry_width("lstm", "h", h, P)
        _check_carry_width("lstm", "c", c, H)
        z = _bias(x @ params["w_x"] + h @ params["w_h"], params["b"])
        if "b_h" in params:
            z = _bias(z, params["b_h"])
        i = jax.nn.sigmoid(z[..., :H])
        f = jax.nn.sigmoid(z[..., H : 2 * H])
        g = jnp.tanh(z[..., 2 * H : 3 * H])
        o = jax.nn.sigmoid(z[..., 3 * H :])
        c_new = f * c + i * g
        h_new = o * jnp.tanh(c_new)
        if proj_size:
            h_new = h_new @ params["w_p"]
        return LSTMState(h_new, c_new), h_new, {"i": i, "f": f, "g": g, "o": o}

    def step(params, carry, x):
        new, y, _ = forward(params, carry, x)
        return new, y

    def gates(params, carry, x):
        return forward(params, carry, x)[2]

    meta = CellMeta(
        "lstm", H, {"proj_size": proj_size, "forget_bias": forget_bias, "hidden_bias": hidden_bias}
    )
    return Cell(init, initial_carry, step, gates, meta)


# --------------------------------------------------------------------------- GRU


def gru(hidden_size: int, *, kernel_init=None, recurrent_init=None, bias_init=None) -> Cell:
    r"""Gated recurrent unit in PyTorch's convention (Cho et al. 2014).

    With gate order ``r, z, n`` (PyTorch's)::

        r = sigmoid(x W_xr + b_r + h W_hr + b_hr)
        z = sigmoid(x W_xz + b_z + h W_hz + b_hz)
        n = tanh(x W_xn + b_n + r * (h W_hn + b_hn))     # reset applied after W_hn h + b_hn
        h_t = (1 - z) * n + z * h_{t-1}

    This is ``torch.nn.GRU`` exactly (and Flax's linen ``GRUCell``, which has
    ``b_hr = b_hz = 0``). The original paper applies the reset before the matmul,
    ``(r * h) W_hn``; that variant is not this cell.

    Params (a dict): ``w_x: (I, 3H)``, ``w_h: (H, 3H)``, ``b: (3H,)`` (input side),
    ``b_h: (3H,)`` (hidden side; its ``n`` block sits inside the reset product).

    Carry: ``h: (*batch, H)``.

    Args:
      hidden_size: ``H``.
      kernel_init, recurrent_init, bias_init: initialisers; default PyTorch's uniform.

    Returns:
      A ``Cell``; ``gates`` returns ``{"r", "z", "n"}`` activations ``(*batch, H)``.
    """
    H = _check_hidden(hidden_size)
    u = inits.pytorch_uniform(H)
    k_init, r_init, b_init = _default(kernel_init, u), _default(recurrent_init, u), _default(bias_init, u)

    def init(key, input_size):
        return _gated_params(key, input_size, H, 3, k_init, r_init, b_init, hidden_bias=True)

    def initial_carry(params, batch_shape=()):
        return _zeros_like_batch(params, batch_shape, H)[0]

    def forward(params, h, x):
        _check_step_input("gru", x, params["w_x"].shape[0], h.shape[:-1])
        _check_carry_width("gru", "h", h, H)
        gx = _bias(x @ params["w_x"], params["b"])
        gh = _bias(h @ params["w_h"], params["b_h"])
        r = jax.nn.sigmoid(gx[..., :H] + gh[..., :H])
        z = jax.nn.sigmoid(gx[..., H : 2 * H] + gh[..., H : 2 * H])
        n = jnp.tanh(gx[..., 2 * H :] + r * gh[..., 2 * H :])
        h_new = (1.0 - z) * n + z * h
        return h_new, h_new, {"r": r, "z": z, "n": n}

    def step(params, h, x):
        h_new, y, _ = forward(params, h, x)
        return h_new, y

    def gates(params, h, x):
        return forward(params, h, x)[2]

    return Cell(init, initial_carry, step, gates, CellMeta("gru", H, {}))


# --------------------------------------------------------------------------- simplified gated cells


def mgu(hidden_size: int, *, kernel_init=None, recurrent_init=None, bias_init=None) -> Cell:
    r"""Minimal gated unit (Zhou, Wu, Zhang & Zhou 2016): one forget gate.

    With blocks ``f, n`` of the kernels::

        f = sigmoid(x W_xf + h_{t-1} W_hf + b_f)
        n = tanh(x W_xn + (f * h_{t-1}) W_hn + b_n)
        h_t = (1 - f) * h_{t-1} + f * n

    Params: ``w_x: (I, 2H)``, ``w_h: (H, 2H)``, ``b: (2H,)``. Carry: ``h: (*batch, H)``.

    Returns:
      A ``Cell``; ``gates`` returns ``{"f", "n"}``.
    """
    H = _check_hidden(hidden_size)
    u = inits.pytorch_uniform(H)
    k_init, r_init, b_init = _default(kernel_init, u), _default(recurrent_init, u), _default(bias_init, u)

    def init(key, input_size):
        return _gated_params(key, input_size, H, 2, k_init, r_init, b_init, hidden_bias=False)

    def initial_carry(params, batch_shape=()):
        return _zeros_like_batch(params, batch_shape, H)[0]

    def forward(params, h, x):
        _check_step_input("mgu", x, params["w_x"].shape[0], h.shape[:-1])
        _check_carry_width("mgu", "h", h, H)
        gx = _bias(x @ params["w_x"], params["b"])
        f = jax.nn.sigmoid(gx[..., :H] + h @ params["w_h"][:, :H])
        n = jnp.tanh(gx[..., H:] + (f * h) @ params["w_h"][:, H:])
        h_new = (1.0 - f) * h + f * n
        return h_new, h_new, {"f": f, "n": n}

    def step(params, h, x):
        h_new, y, _ = forward(params, h, x)
        return h_new, y

    def gates(params, h, x):
        return forward(params, h, x)[2]

    return Cell(init, initial_carry, step, gates, CellMeta("mgu", H, {}))


def janet(
    hidden_size: int, *, beta: float = 1.0, kernel_init=None, recurrent_init=None, bias_init=None
) -> Cell:
    r"""Forget-gate-only LSTM, "JANET" (van der Westhuizen & Lasenby 2018).

    With blocks ``f, c`` of the kernels::

        s = x W_xf + h_{t-1} W_hf + b_f
        c~ = tanh(x W_xc + h_{t-1} W_hc + b_c)
        c_t = sigmoid(s) * c_{t-1} + (1 - sigmoid(s - beta)) * c~
        h_t = c_t

    ``beta = 0`` gives the coupled form ``c_t = f c_{t-1} + (1 - f) c~``.

    Params: ``w_x: (I, 2H)``, ``w_h: (H, 2H)``, ``b: (2H,)``. Carry: ``h: (*batch, H)``.

    Args:
      hidden_size: ``H``.
      beta: the shift of the input gate (the paper uses 1).

    Returns:
      A ``Cell``; ``gates`` returns ``{"f", "c_tilde"}``.
    """
    H = _check_hidden(hidden_size)
    u = inits.pytorch_uniform(H)
    k_init, r_init, b_init = _default(kernel_init, u), _default(recurrent_init, u), _default(bias_init, u)

    def init(key, input_size):
        return _gated_params(key, input_size, H, 2, k_init, r_init, b_init, hidden_bias=False)

    def initial_carry(params, batch_shape=()):
        return _zeros_like_batch(params, batch_shape, H)[0]

    def forward(params, h, x):
        _check_step_input("janet", x, params["w_x"].shape[0], h.shape[:-1])
        _check_carry_width("janet", "h", h, H)
        z = _bias(x @ params["w_x"] + h @ params["w_h"], params["b"])
        s = z[..., :H]
        f = jax.nn.sigmoid(s)
        c_tilde = jnp.tanh(z[..., H:])
        h_new = f * h + (1.0 - jax.nn.sigmoid(s - beta)) * c_tilde
        return h_new, h_new, {"f": f, "c_tilde": c_tilde}

    def step(params, h, x):
        h_new, y, _ = forward(params, h, x)
        return h_new, y

    def gates(params, h, x):
        return forward(params, h, x)[2]

    return Cell(init, initial_carry, step, gates, CellMeta("janet", H, {"beta": beta}))


# --------------------------------------------------------------------------- windowed memory models


def _shift_in(window: jax.Array, x: jax.Array) -> jax.Array:
    """Drop the oldest row of ``window: (*b, K, F)`` and append ``x: (*b, F)``."""
    return jnp.concatenate([window[..., 1:, :], x[..., None, :]], axis=-2)


def _flat(window: jax.Array) -> jax.Array:
    return window.reshape(window.shape[:-2] + (window.shape[-2] * window.shape[-1],))


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

    Args:
      hidden_size: ``H``, the output size.
      window: ``K >= 1``, the number of inputs seen at each step (the current one included).
      activation: as in ``rnn``.
      kernel_init, bias_init: initialisers; default ``U(-1/sqrt(K I), 1/sqrt(K I))`` and zeros.

    Returns:
      A ``Cell``.
    """
    H = _check_hidden(hidden_size)
    K = _check_hidden(window, "window")
    f = get_activation(activation)

    def init(key, input_size):
        input_size = _check_input_size(input_size)
        fan_in = K * input_size
        k_w, k_b = jax.random.split(key)
        w_init = _default(kernel_init, inits.uniform(1.0 / float(np.sqrt(fan_in))))
        b_init = _default(bias_init, inits.zeros)
        return {"w": w_init(k_w, (fan_in, H), jnp.float32), "b": b_init(k_b, (H,), jnp.float32)}

    def input_size_of(params):
        return params["w"].shape[0] // K

    def initial_carry(params, batch_shape=()):
        I = input_size_of(params)
        return jnp.zeros(_batch_shape(batch_shape) + (K - 1, I), _param_dtype(params))

    def step(params, window_x, x):
        I = input_size_of(params)
        _check_step_input("tdnn", x, I, window_x.shape[:-2])
        win = jnp.concatenate([window_x, x[..., None, :]], axis=-2)
        y = f(_bias(_flat(win) @ params["w"], params["b"]))
        return win[..., 1:, :], y

    return Cell(init, initial_carry, step, None, CellMeta("tdnn", H, {"window": K, "activation": activation}))


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
    Carry: ``NARXState(x: (*batch, K-1, I), y: (*batch, L, O))``.

    Args:
      output_size: ``O``.
      window: ``K >= 1``, input delays.
      output_window: ``L >= 1``, output delays.
      activation: as in ``rnn``.

    Returns:
      A ``Cell``.
    """
    O = _check_hidden(output_size, "output_size")
    K = _check_hidden(window, "window")
    L = _check_hidden(K if output_window is None else output_window, "output_window")
    f = get_activation(activation)

    def init(key, input_size):
        input_size = _check_input_size(input_size)
        k_x, k_y, k_b = jax.random.split(key, 3)
        fan_in = K * input_size + L * O
        w_init = _default(kernel_init, inits.uniform(1.0 / float(np.sqrt(fan_in))))
        b_init = _default(bias_init, inits.zeros)
        return {
            "w_x": w_init(k_x, (K * input_size, O), jnp.float32),
            "w_y": w_init(k_y, (L * O, O), jnp.float32),
            "b": b_init(k_b, (O,), jnp.float32),
        }

    def initial_carry(params, batch_shape=()):
        I = params["w_x"].shape[0] // K
        dtype = _param_dtype(params)
        bs = _batch_shape(batch_shape)
        return NARXState(jnp.zeros(bs + (K - 1, I), dtype), jnp.zeros(bs + (L, O), dtype))

    def step(params, carry, x):
        I = params["w_x"].shape[0] // K
        _check_step_input("narx", x, I, carry.x.shape[:-2])
        xwin = jnp.concatenate([carry.x, x[..., None, :]], axis=-2)
        y = f(_bias(_flat(xwin) @ params["w_x"] + _flat(carry.y) @ params["w_y"], params["b"]))
        return NARXState(xwin[..., 1:, :], _shift_in(carry.y, y)), y

    meta = CellMeta("narx", O, {"window": K, "output_window": L, "activation": activation})
    return Cell(init, initial_carry, step, None, meta)
