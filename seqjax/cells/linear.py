r"""Cells that are linear in their state: minGRU, minLSTM (Feng et al. 2024) and the LRU
(Orvieto et al. 2023).

Each step is ``s_t = A_t s_{t-1} + b_t`` with ``A_t`` and ``b_t`` functions of the input
alone, and each cell says so with the ``linear_recurrence(params, x_t) -> (A_t, b_t)``
capability (``s`` the carry flattened by ``seqjax.spectrum.flatten_state``). The step
Jacobian is then ``A_t`` at every state, so the analytic ``jacobian`` and
``jacobian_diagonal`` are exact by construction, and a Newton (DEER) step on the stacked
residuals ``s_t - A_t s_{t-1} - b_t`` solves the whole sequence at once from any guess.

* ``min_gru``: ``h_t = (1 - z_t) * h_{t-1} + z_t * h~_t``, ``A_t = 1 - z_t`` (a diagonal).
* ``min_lstm``: ``h_t = f'_t * h_{t-1} + i'_t * h~_t`` with normalised gates, ``A_t = f'_t``.
* ``lru``: a complex diagonal recurrence ``h_t = lambda * h_{t-1} + gamma * (x_t B)``,
  stored as real pairs ``LRUState(re, im)``, so ``A`` is the dense ``(2N, 2N)`` real form
  of ``diag(lambda)``, constant in time, with eigenvalues ``lambda`` and ``conj(lambda)``.

No fused BPTT kernel: autodiff of the plain scan is used.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqjax import initializers as inits
from seqjax._util import bind
from seqjax.cells._core import (
    Cell,
    CellMeta,
    add_bias,
    carry_h,
    check_carry_width,
    check_hidden,
    check_input_size,
    check_step_input,
    resolve_init,
    rows_of,
    zeros_carry,
)

__all__ = ["min_gru", "min_lstm", "lru", "LRUState"]


# --------------------------------------------------------------------------- minGRU and minLSTM


def _min_init(key, input_size, *, hidden_size, blocks, kernel_init, bias_init):
    """``{"w_x": (I, G*H), "b": (G*H,)}``, by default ``U(-1/sqrt(I), 1/sqrt(I))`` (the
    default of ``torch.nn.Linear``, whose fan-in is ``I``)."""
    input_size = check_input_size(input_size)
    u = inits.pytorch_uniform(input_size)
    kernel_init, bias_init = resolve_init(kernel_init, u), resolve_init(bias_init, u)
    k_x, k_b = jax.random.split(key)
    return {
        "w_x": kernel_init(k_x, (input_size, blocks * hidden_size), jnp.float32),
        "b": bias_init(k_b, (blocks * hidden_size,), jnp.float32),
    }


def _min_initial_carry(params, batch_shape=(), *, hidden_size):
    return zeros_carry(params, batch_shape, hidden_size)[0]


def _projection(name, params, x, *, hidden_size, blocks, batch_shape=None):
    """``a = x W_x + b`` split into its ``blocks`` column blocks of width ``H``."""
    if batch_shape is not None:
        check_step_input(name, x, params["w_x"].shape[0], batch_shape)
    a = add_bias(x @ params["w_x"], params["b"])
    H = hidden_size
    return tuple(a[..., k * H : (k + 1) * H] for k in range(blocks))


def _min_gru_parts(params, x, h=None, *, hidden_size):
    """``(1 - z_t, z_t * h~_t, z_t, h~_t)``: the coefficients of ``h_t = A h_{t-1} + b``."""
    if h is not None:
        check_carry_width("min_gru", "h", h, hidden_size)
    batch = None if h is None else h.shape[:-1]
    a_z, h_tilde = _projection("min_gru", params, x, hidden_size=hidden_size, blocks=2, batch_shape=batch)
    z = jax.nn.sigmoid(a_z)
    return 1.0 - z, z * h_tilde, z, h_tilde


def _min_gru_step(params, h, x, *, hidden_size):
    decay, drive, _, _ = _min_gru_parts(params, x, h, hidden_size=hidden_size)
    h_new = decay * h + drive
    return h_new, h_new


def _min_gru_gates(params, h, x, *, hidden_size):
    _, _, z, h_tilde = _min_gru_parts(params, x, h, hidden_size=hidden_size)
    return {"z": z, "h_tilde": h_tilde}


def _min_gru_linear(params, x, *, hidden_size):
    decay, drive, _, _ = _min_gru_parts(params, x, hidden_size=hidden_size)
    return decay, drive


def _min_gru_jacobian(params, h, x, *, hidden_size):
    return jnp.diag(_min_gru_parts(params, x, h, hidden_size=hidden_size)[0])


def _min_gru_jacobian_diagonal(params, h, x, *, hidden_size):
    return _min_gru_parts(params, x, h, hidden_size=hidden_size)[0]


def min_gru(hidden_size: int, *, kernel_init=None, bias_init=None) -> Cell:
    r"""minGRU (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, "Were RNNs all we needed?").

    A GRU whose update gate and candidate read the input only, with no ``tanh`` on the
    candidate and no reset gate (the paper's sequential mode):

    ```text
    z_t  = sigmoid(x_t W_x^z + b^z)
    h~_t = x_t W_x^h + b^h
    h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t,     y_t = h_t
    ```

    The step is linear in the state: ``linear_recurrence`` returns the diagonal
    ``A_t = 1 - z_t`` and ``b_t = z_t * h~_t``; the Jacobian is ``diag(1 - z_t)`` at every
    state, with eigenvalues in ``(0, 1)``. (The paper's parallel mode runs the same
    recurrence in log space with ``h~`` passed through a positive function ``g``; that is a
    different parametrisation and not this cell.)

    Params: ``w_x: (I, 2H)``, ``b: (2H,)``, column blocks ``z, h~``; default
    ``U(-1/sqrt(I), 1/sqrt(I))`` (``torch.nn.Linear``'s). Carry: ``h: (*batch, H)``.
    Capabilities: output ``y_t = h_t``, ``jacobian``, ``jacobian_diagonal``,
    ``linear_recurrence``, ``gates`` (``{"z", "h_tilde"}``), ``input_size``. No
    ``recurrent_blocks`` (no recurrent matrix) and no fused kernel.

    Args:
      hidden_size: ``H``.
      kernel_init: initialiser ``(key, shape, dtype)`` of ``w_x``.
      bias_init: initialiser of ``b``.

    Returns:
      A ``Cell``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.min_gru(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> h, x = jnp.full((4,), 0.5), jnp.ones((3,))
      >>> A, b = cell.linear_recurrence(params, x)          # A: (4,), a diagonal
      >>> bool(jnp.allclose(cell.step(params, h, x)[0], A * h + b))
      True
    """
    H = check_hidden(hidden_size)
    c = {"hidden_size": H}
    return Cell(
        bind(_min_init, blocks=2, kernel_init=kernel_init, bias_init=bias_init, **c),
        bind(_min_initial_carry, **c),
        bind(_min_gru_step, **c),
        output=bind(carry_h),
        jacobian=bind(_min_gru_jacobian, **c),
        jacobian_diagonal=bind(_min_gru_jacobian_diagonal, **c),
        gates=bind(_min_gru_gates, **c),
        input_size=bind(rows_of),
        linear_recurrence=bind(_min_gru_linear, **c),
        meta=CellMeta("min_gru", H, ()),
    )


def _min_lstm_parts(params, x, h=None, *, hidden_size):
    """``(f'_t, i'_t * h~_t, f'_t, i'_t, h~_t)`` with ``f' = f / (f + i)``, ``i' = i / (f + i)``.

    ``f / (f + i) = sigmoid(log f - log i)`` with ``log sigmoid(a) = -softplus(-a)``: the same
    number, without the ``0 / 0`` that ``f + i`` underflowing to zero would give."""
    if h is not None:
        check_carry_width("min_lstm", "h", h, hidden_size)
    batch = None if h is None else h.shape[:-1]
    a_f, a_i, h_tilde = _projection(
        "min_lstm", params, x, hidden_size=hidden_size, blocks=3, batch_shape=batch
    )
    d = jax.nn.softplus(-a_i) - jax.nn.softplus(-a_f)  # log f - log i
    f_n, i_n = jax.nn.sigmoid(d), jax.nn.sigmoid(-d)
    return f_n, i_n * h_tilde, f_n, i_n, h_tilde


def _min_lstm_step(params, h, x, *, hidden_size):
    decay, drive = _min_lstm_parts(params, x, h, hidden_size=hidden_size)[:2]
    h_new = decay * h + drive
    return h_new, h_new


def _min_lstm_gates(params, h, x, *, hidden_size):
    _, _, f_n, i_n, h_tilde = _min_lstm_parts(params, x, h, hidden_size=hidden_size)
    return {"f": f_n, "i": i_n, "h_tilde": h_tilde}


def _min_lstm_linear(params, x, *, hidden_size):
    decay, drive = _min_lstm_parts(params, x, hidden_size=hidden_size)[:2]
    return decay, drive


def _min_lstm_jacobian(params, h, x, *, hidden_size):
    return jnp.diag(_min_lstm_parts(params, x, h, hidden_size=hidden_size)[0])


def _min_lstm_jacobian_diagonal(params, h, x, *, hidden_size):
    return _min_lstm_parts(params, x, h, hidden_size=hidden_size)[0]


def min_lstm(hidden_size: int, *, kernel_init=None, bias_init=None) -> Cell:
    r"""minLSTM (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, "Were RNNs all we needed?").

    An LSTM whose gates read the input only, with the forget and input gates normalised to
    sum to one, no output gate and no ``tanh`` (the cell state is the output):

    ```text
    f_t  = sigmoid(x_t W_x^f + b^f),    i_t = sigmoid(x_t W_x^i + b^i)
    f'_t = f_t / (f_t + i_t),           i'_t = i_t / (f_t + i_t)
    h~_t = x_t W_x^h + b^h
    h_t  = f'_t * h_{t-1} + i'_t * h~_t,     y_t = h_t
    ```

    ``f'_t`` is computed as ``sigmoid(log f_t - log i_t)``, the same number without a
    ``0 / 0`` when both gates underflow. The step is linear in the state:
    ``linear_recurrence`` returns the diagonal ``A_t = f'_t`` and ``b_t = i'_t * h~_t``; the
    Jacobian is ``diag(f'_t)`` at every state. (The paper's parallel mode runs the same
    recurrence in log space with a positive ``g(h~)``; that is not this cell.)

    Params: ``w_x: (I, 3H)``, ``b: (3H,)``, column blocks ``f, i, h~``; default
    ``U(-1/sqrt(I), 1/sqrt(I))``. Carry: ``h: (*batch, H)``. Capabilities: output
    ``y_t = h_t``, ``jacobian``, ``jacobian_diagonal``, ``linear_recurrence``, ``gates``
    (``{"f", "i", "h_tilde"}``, the *normalised* ``f'`` and ``i'``), ``input_size``. No
    ``recurrent_blocks`` and no fused kernel.

    Args:
      hidden_size: ``H``.
      kernel_init: initialiser ``(key, shape, dtype)`` of ``w_x``.
      bias_init: initialiser of ``b``.

    Returns:
      A ``Cell``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.min_lstm(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> g = cell.gates(params, jnp.zeros(4), jnp.ones(3))
      >>> bool(jnp.allclose(g["f"] + g["i"], 1.0))               # normalised gates
      True
    """
    H = check_hidden(hidden_size)
    c = {"hidden_size": H}
    return Cell(
        bind(_min_init, blocks=3, kernel_init=kernel_init, bias_init=bias_init, **c),
        bind(_min_initial_carry, **c),
        bind(_min_lstm_step, **c),
        output=bind(carry_h),
        jacobian=bind(_min_lstm_jacobian, **c),
        jacobian_diagonal=bind(_min_lstm_jacobian_diagonal, **c),
        gates=bind(_min_lstm_gates, **c),
        input_size=bind(rows_of),
        linear_recurrence=bind(_min_lstm_linear, **c),
        meta=CellMeta("min_lstm", H, ()),
    )


# --------------------------------------------------------------------------- LRU


class LRUState(NamedTuple):
    """Carry of the LRU: the complex state ``h = re + i im`` as two real arrays
    ``re, im: (*batch, N)``; flattened (``seqjax.spectrum.flatten_state``) it is
    ``s = [re, im]``, ``S = 2N``."""

    re: jax.Array
    im: jax.Array


def _lru_init(key, input_size, *, hidden_size, r_min, r_max, max_phase):
    I = check_input_size(input_size)
    N = hidden_size
    k_nu, k_th, k_bre, k_bim, k_cre, k_cim, k_d = jax.random.split(key, 7)
    f32 = jnp.float32
    # |lambda|^2 uniform on [r_min^2, r_max^2) (uniform on the ring's area), phase on [0, max_phase)
    u1 = jax.random.uniform(k_nu, (N,), f32)
    u2 = jax.random.uniform(k_th, (N,), f32)
    nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
    theta_log = jnp.log(max_phase * u2)
    modulus = jnp.exp(-jnp.exp(nu_log))
    return {
        "nu_log": nu_log,
        "theta_log": theta_log,
        "gamma_log": jnp.log(jnp.sqrt(1.0 - modulus**2)),
        "b_re": jax.random.normal(k_bre, (I, N), f32) / math.sqrt(2 * I),
        "b_im": jax.random.normal(k_bim, (I, N), f32) / math.sqrt(2 * I),
        "c_re": jax.random.normal(k_cre, (N, I), f32) / math.sqrt(N),
        "c_im": jax.random.normal(k_cim, (N, I), f32) / math.sqrt(N),
        "d": jax.random.normal(k_d, (I,), f32),
    }


def _lru_initial_carry(params, batch_shape=(), *, hidden_size):
    re, im = zeros_carry(params, batch_shape, hidden_size, hidden_size)
    return LRUState(re, im)


def _row(v, like):
    """``v: (N,)`` shaped to broadcast against ``like: (*batch, N)`` explicitly (the cells
    run under ``jax_numpy_rank_promotion="raise"``)."""
    return v.reshape((1,) * (like.ndim - 1) + v.shape)


def _lru_lambda(params):
    """``(Re lambda, Im lambda)``, ``lambda = exp(-exp(nu_log) + i exp(theta_log))``."""
    modulus = jnp.exp(-jnp.exp(params["nu_log"]))
    phase = jnp.exp(params["theta_log"])
    return modulus * jnp.cos(phase), modulus * jnp.sin(phase)


def _lru_drive(params, x):
    """``gamma * (x B)`` as ``(real, imaginary)`` parts, ``gamma = exp(gamma_log)``."""
    gamma = jnp.exp(params["gamma_log"])
    u_re, u_im = x @ params["b_re"], x @ params["b_im"]
    return _row(gamma, u_re) * u_re, _row(gamma, u_im) * u_im


def _lru_check(params, carry, x, hidden_size):
    if not isinstance(carry, LRUState):
        raise ValueError(
            f"lru: the carry must be an LRUState(re, im), got {type(carry).__name__}; make it with "
            "cell.initial_carry(params, batch_shape)."
        )
    check_carry_width("lru", "re", carry.re, hidden_size)
    check_carry_width("lru", "im", carry.im, hidden_size)
    check_step_input("lru", x, params["b_re"].shape[0], carry.re.shape[:-1])


def _lru_output(params, carry, x):
    """``y_t = Re(h_t C) + d * x_t = re C_re - im C_im + d * x_t``."""
    return carry.re @ params["c_re"] - carry.im @ params["c_im"] + _row(params["d"], x) * x


def _lru_step(params, carry, x, *, hidden_size):
    _lru_check(params, carry, x, hidden_size)
    lam_re, lam_im = (_row(v, carry.re) for v in _lru_lambda(params))
    u_re, u_im = _lru_drive(params, x)
    re = lam_re * carry.re - lam_im * carry.im + u_re
    im = lam_im * carry.re + lam_re * carry.im + u_im
    new = LRUState(re, im)
    return new, _lru_output(params, new, x)


def _lru_matrix(params):
    """The real ``(2N, 2N)`` form of ``diag(lambda)`` on ``s = [re, im]``:
    ``[[diag Re, -diag Im], [diag Im, diag Re]]``."""
    lam_re, lam_im = _lru_lambda(params)
    a, b = jnp.diag(lam_re), jnp.diag(lam_im)
    return jnp.block([[a, -b], [b, a]])


def _lru_linear(params, x, *, hidden_size):
    check_step_input("lru", x, params["b_re"].shape[0], ())
    u_re, u_im = _lru_drive(params, x)
    return _lru_matrix(params), jnp.concatenate([u_re, u_im])


def _lru_jacobian(params, carry, x, *, hidden_size):
    return _lru_matrix(params)


def _lru_jacobian_diagonal(params, carry, x, *, hidden_size):
    lam_re, _ = _lru_lambda(params)
    return jnp.concatenate([lam_re, lam_re])


def _lru_input_size(params):
    return int(params["b_re"].shape[0])


def _check_ring(r_min, r_max, max_phase) -> tuple[float, float, float]:
    r_min, r_max, max_phase = float(r_min), float(r_max), float(max_phase)
    if not (0.0 <= r_min <= r_max <= 1.0 and r_min < 1.0):
        raise ValueError(
            f"lru: needs 0 <= r_min <= r_max <= 1 and r_min < 1 (the ring of |lambda|), got "
            f"r_min={r_min}, r_max={r_max}."
        )
    if not (0.0 < max_phase < math.inf):
        raise ValueError(f"lru: max_phase must be a positive finite angle (radians), got {max_phase}.")
    return r_min, r_max, max_phase


def lru(hidden_size: int, *, r_min: float = 0.0, r_max: float = 1.0, max_phase: float = 2 * math.pi) -> Cell:
    r"""Linear recurrent unit (Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu & De 2023,
    "Resurrecting recurrent neural networks for long sequences").

    A complex diagonal linear recurrence of ``N = hidden_size`` units:

    ```text
    lambda = exp(-exp(nu_log) + i exp(theta_log))          (N,), |lambda| < 1
    h_t    = lambda * h_{t-1} + gamma * (x_t B),   gamma = exp(gamma_log)
    y_t    = Re(h_t C) + d * x_t
    ```

    with ``B = b_re + i b_im: (I, N)``, ``C = c_re + i c_im: (N, I)`` (row-vector
    convention) and a per-feature skip ``d: (I,)``: as in the paper, the output has the
    input's width ``I``. The normalisation ``gamma`` is a parameter (``gamma_log``, as in
    the paper), initialised to ``sqrt(1 - |lambda|^2)`` and trained freely after.

    Initialisation (the paper's): ``|lambda|^2`` uniform on ``[r_min^2, r_max^2)`` (``lambda``
    uniform on the ring's area), phase uniform on ``[0, max_phase)``; ``b_re, b_im`` from
    ``N(0, 1/(2I))``, ``c_re, c_im`` from ``N(0, 1/N)``, ``d`` from ``N(0, 1)``.

    The complex state is stored as real pairs, ``LRUState(re, im)``, so every tool that
    flattens a real carry takes it: ``s = [re, im]`` (``S = 2N``) and the step is
    ``s_t = A s_{t-1} + b_t`` with the constant dense ``A = [[diag Re lambda, -diag Im lambda],
    [diag Im lambda, diag Re lambda]]``, whose eigenvalues are ``lambda`` and
    ``conj(lambda)``. ``linear_recurrence`` returns ``(A, [Re, Im] of gamma * (x_t B))``;
    ``jacobian`` is ``A`` and ``jacobian_diagonal`` is ``[Re lambda, Re lambda]``.

    Params: ``nu_log, theta_log, gamma_log: (N,)``, ``b_re, b_im: (I, N)``,
    ``c_re, c_im: (N, I)``, ``d: (I,)``. Carry: ``LRUState(re, im)``, each ``(*batch, N)``.
    Capabilities: output (``Re(h_t C) + d * x_t`` from the new carry and the input),
    ``jacobian``, ``jacobian_diagonal``, ``linear_recurrence``, ``input_size``. No gates, no
    ``recurrent_blocks``, no fused kernel.

    Args:
      hidden_size: ``N``, the number of complex units (the flattened state has ``2N``).
      r_min: smallest ``|lambda|`` at initialisation, in ``[0, 1)``.
      r_max: largest ``|lambda|`` at initialisation, in ``[r_min, 1]`` (draws stay below 1).
      max_phase: largest ``arg(lambda)`` at initialisation, in radians (the paper uses
        ``2 pi``, and ``pi / 10`` for its longest tasks).

    Returns:
      A ``Cell``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.lru(3, r_min=0.9, r_max=0.99)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> carry, ys = seqjax.unroll(cell, params, jnp.ones((4, 10, 2)))
      >>> print(carry.re.shape, ys.shape)                   # N = 3 units, output width I = 2
      (4, 3) (4, 10, 2)
      >>> A, b = cell.linear_recurrence(params, jnp.ones(2))
      >>> radius = jnp.abs(jnp.linalg.eigvals(A))
      >>> bool(jnp.all((radius >= 0.9 - 1e-6) & (radius < 0.99)))
      True
    """
    N = check_hidden(hidden_size)
    r_min, r_max, max_phase = _check_ring(r_min, r_max, max_phase)
    c = {"hidden_size": N}
    return Cell(
        bind(_lru_init, r_min=r_min, r_max=r_max, max_phase=max_phase, **c),
        bind(_lru_initial_carry, **c),
        bind(_lru_step, **c),
        output=bind(_lru_output),
        jacobian=bind(_lru_jacobian, **c),
        jacobian_diagonal=bind(_lru_jacobian_diagonal, **c),
        input_size=bind(_lru_input_size),
        linear_recurrence=bind(_lru_linear, **c),
        meta=CellMeta("lru", N, (("r_min", r_min), ("r_max", r_max), ("max_phase", max_phase))),
    )
