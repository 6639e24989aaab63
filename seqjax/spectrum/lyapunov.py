r"""Lyapunov exponents by the QR method of Benettin et al. (1980) and Shimada & Nagashima (1979).

``lyapunov_from_jacobians`` takes the Jacobians ``(*batch, T, S, S)``; ``lyapunov_spectrum``
unrolls a cell and pushes the frame through dense Jacobians or JVPs (matrix-free). Both
share the QR iteration (``_benettin``) and the windowed summary with error bars
(``_summarise``) and return a ``LyapunovSpectrum``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._util import promote
from seqjax.cells import Cell
from seqjax.spectrum.jacobians import _METHODS, _batch_major, _jacobian_fn, _trajectory
from seqjax.spectrum.products import _random_frame
from seqjax.spectrum.state import _flat_step, _like, _vmap_lead, state_size

__all__ = [
    "lyapunov_spectrum",
    "lyapunov_from_jacobians",
    "LyapunovSpectrum",
]


@dataclasses.dataclass(frozen=True)
class LyapunovSpectrum:
    """Lyapunov exponents with block-means error bars.

    Attributes:
      exponents: ``(*batch, k)``, per step (natural log), decreasing; ``-inf`` where the
        product is (numerically) rank-deficient, never NaN.
      stderr: ``(*batch, k)``, standard error from the spread of the per-window
        exponents (batch means: ``std(ddof=1)/sqrt(num_windows)``); ``0`` where the
        exponent is ``-inf``; ``inf`` with a single window.
      finite_time: ``(*batch, num_windows, k)``, the finite-time (local) exponents of each
        window, columns in the order of ``exponents``.
      window: steps per window.
      steps: steps averaged over (``num_windows * window``).
    """

    exponents: jax.Array
    stderr: jax.Array
    finite_time: jax.Array
    window: int
    steps: int

    @property
    def max(self) -> jax.Array:
        """The largest exponent ``(*batch,)``."""
        return self.exponents[..., 0]

    def __str__(self) -> str:
        e = np.asarray(self.exponents)
        s = np.asarray(self.stderr)
        flat_e, flat_s = e.reshape(-1, e.shape[-1]), s.reshape(-1, s.shape[-1])
        lines = [f"Lyapunov spectrum ({self.steps} steps, windows of {self.window}); per step, natural log"]
        for b, (ee, ss) in enumerate(zip(flat_e, flat_s)):
            head = f"  seq {b}: " if flat_e.shape[0] > 1 else "  "
            lines.append(head + ", ".join(f"{x:+.4f}±{y:.1e}" for x, y in zip(ee[:8], ss[:8])))
            if ee.shape[0] > 8:
                lines[-1] += f", ... ({ee.shape[0]} exponents)"
        return "\n".join(lines)

    def plot(self, *, ax=None, **kwargs):
        """Plot the spectrum with error bars (``seqjax.plot.plot_lyapunov_spectrum``)."""
        from seqjax import plot

        return plot.plot_lyapunov_spectrum(self, ax=ax, **kwargs)


def _qr_logs(A, rank_tol):
    Q, R = jnp.linalg.qr(A)
    d = jnp.abs(jnp.diagonal(R))
    scale = jnp.max(jnp.linalg.norm(A, axis=0))
    d = jnp.where(d <= rank_tol * scale, jnp.zeros_like(d), d)
    return Q, jnp.log(d)


def _benettin(apply, ops, Q0, *, frame_warmup, r, window, rank_tol):
    """QR iteration over operands ``ops`` (pytree, leading axis time).

    Returns per-window sums of logs ``(num_windows, k)``.
    """

    def one(Q, op):
        return _qr_logs(apply(Q, op), rank_tol)[0], None

    tree = jax.tree_util.tree_map
    if frame_warmup:
        Q0, _ = jax.lax.scan(one, Q0, tree(lambda a: a[:frame_warmup], ops))
    T = jax.tree_util.tree_leaves(ops)[0].shape[0] - frame_warmup
    nw = T // window
    used = nw * window
    blocks = tree(
        lambda a: a[frame_warmup : frame_warmup + used].reshape((nw, window // r, r) + a.shape[1:]), ops
    )

    def group(Q, ops_g):
        def inner(A, op):
            return apply(A, op), None

        A, _ = jax.lax.scan(inner, Q, ops_g)
        return _qr_logs(A, rank_tol)

    def block(Q, ops_b):
        Q, logs = jax.lax.scan(group, Q, ops_b)
        return Q, jnp.sum(logs, axis=0)

    _, sums = jax.lax.scan(block, Q0, blocks)
    return sums


def _summarise(sums, window):
    """``sums: (*batch, nw, k)`` -> LyapunovSpectrum fields (sorted)."""
    nw = sums.shape[-2]
    ft = sums / window
    expo = jnp.sum(sums, axis=-2) / (nw * window)
    order = jnp.argsort(-expo, axis=-1)
    expo = jnp.take_along_axis(expo, order, axis=-1)
    ft = jnp.take_along_axis(ft, order[..., None, :], axis=-1)
    finite = jnp.isfinite(expo)
    if nw > 1:
        ft_safe = jnp.where(finite[..., None, :], ft, jnp.zeros_like(ft))
        err = jnp.std(ft_safe, axis=-2, ddof=1) / math.sqrt(nw)
        err = jnp.where(finite, err, jnp.zeros_like(err))
    else:
        err = jnp.where(finite, jnp.full_like(expo, jnp.inf), jnp.zeros_like(expo))
    return expo, err, ft


def _check_lyap_args(T, k, S, warmup, frame_warmup, reortho_every, window):
    if not isinstance(reortho_every, (int, np.integer)) or reortho_every < 1:
        raise ValueError(f"reortho_every must be a positive integer, got {reortho_every!r}.")
    if warmup < 0 or frame_warmup < 0:
        raise ValueError(f"warmup and frame_warmup must be >= 0, got {warmup} and {frame_warmup}.")
    k = S if k is None else int(k)
    if not 1 <= k <= S:
        raise ValueError(f"k must lie in [1, S={S}] (S is the flattened state size), got {k}.")
    avail = T - warmup - frame_warmup
    if avail < reortho_every:
        raise ValueError(
            f"the sequence has T={T} steps but warmup={warmup} + frame_warmup={frame_warmup} leave {avail}, "
            f"fewer than reortho_every={reortho_every}; pass a longer xs."
        )
    if window is None:
        window = max(reortho_every, (avail // 10) // reortho_every * reortho_every)
    window = int(window)
    if window < 1 or window % reortho_every or window > avail:
        raise ValueError(
            f"window must be a positive multiple of reortho_every={reortho_every} and at most the {avail} "
            f"measured steps, got {window}."
        )
    return k, window


def _initial_frame(key, frame, S, k, dtype):
    if frame is None:
        return _random_frame(jax.random.key(0) if key is None else key, S, k, dtype)
    frame = jnp.asarray(frame, dtype)
    if frame.shape != (S, k):
        raise ValueError(f"frame has shape {tuple(frame.shape)} but needs (S, k) = ({S}, {k}).")
    return frame


def _default_tol(dtype, S):
    return float(S * np.finfo(np.dtype(dtype)).eps)


def lyapunov_from_jacobians(
    jacobians: jax.Array,
    *,
    k: int | None = None,
    frame_warmup: int = 0,
    reortho_every: int = 1,
    window: int | None = None,
    rank_tol: float | None = None,
    key: jax.Array | None = None,
    frame: jax.Array | None = None,
) -> LyapunovSpectrum:
    r"""Lyapunov spectrum of a given sequence of Jacobians by the QR (Benettin) method.

    See ``lyapunov_spectrum`` for the method; this variant takes the Jacobians
    ``(*batch, T, S, S)`` directly (e.g. from ``step_jacobians`` or any linear
    time-varying system ``s_t = J_t s_{t-1}``). Arguments as there; ``jacobians``:
    ``(*batch, T, S, S)`` in time order.

    Returns:
      ``LyapunovSpectrum``.

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> J = jnp.broadcast_to(jnp.array([[2.0, 1.0], [0.0, 0.5]]), (40, 2, 2))   # s_t = J s_{t-1}
      >>> spec = seqjax.spectrum.lyapunov_from_jacobians(J, window=10)
      >>> bool(jnp.allclose(spec.exponents, jnp.log(jnp.array([2.0, 0.5])), atol=0.05))
      True
    """
    J = jnp.asarray(jacobians)
    if J.ndim < 3 or J.shape[-1] != J.shape[-2]:
        raise ValueError(f"jacobians must be (*batch, T, S, S), got shape {tuple(J.shape)}.")
    T, S = J.shape[-3], J.shape[-1]
    if frame is not None and k is None:
        k = int(np.shape(frame)[-1])
    k, window = _check_lyap_args(T, k, S, 0, frame_warmup, reortho_every, window)
    tol = _default_tol(J.dtype, S) if rank_tol is None else float(rank_tol)
    Q0 = _initial_frame(key, frame, S, k, J.dtype)

    def single(Js):
        return _benettin(
            lambda Q, Jt: Jt @ Q,
            Js,
            Q0,
            frame_warmup=frame_warmup,
            r=reortho_every,
            window=window,
            rank_tol=tol,
        )

    e, err, ft = jax.jit(lambda J: _summarise(_vmap_lead(single, J.ndim - 3)(J), window))(J)
    return LyapunovSpectrum(e, err, ft, window, ft.shape[-2] * window)


def lyapunov_spectrum(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    *,
    carry: Any = None,
    k: int | None = None,
    warmup: int = 0,
    frame_warmup: int = 0,
    reortho_every: int = 1,
    window: int | None = None,
    matrix_free: bool = False,
    method: str = "auto",
    rank_tol: float | None = None,
    key: jax.Array | None = None,
    frame: jax.Array | None = None,
    time_axis: int = -2,
) -> LyapunovSpectrum:
    r"""Lyapunov exponents of a cell driven by inputs ``xs``, by the QR (Benettin) method.

    With ``Q_0`` a random orthonormal ``S x k`` frame, iterate
    ``Q_t R_t = J_t Q_{t-1}`` (QR every ``r = reortho_every`` steps; in between
    ``Q <- J_t Q``) and average the logs of the diagonal of ``R``:

    ```text
    lambda_i = (1/N) sum_t log |R_t[i, i]|          (per step, natural log)
    ```

    The exponents measure the asymptotic growth of ``ds_T/ds_k`` along nested subspaces:
    ``lambda_1`` is the rate at which the largest gradient component grows (> 0: exploding,
    chaotic) or decays (< 0: vanishing); ``sum_i lambda_i`` is the mean of
    ``log|det J_t|`` (volume contraction).

    Procedure: ``unroll`` the cell over ``xs`` for the trajectory; drop the first ``warmup``
    steps (state warm-up: forget the initial condition); evolve the frame for
    ``frame_warmup`` more steps without recording (it aligns with the Lyapunov vectors); then
    record per-window log sums over windows of ``window`` steps. The windows give the
    finite-time exponents and the standard error. Trailing steps that do not fill a window
    are dropped.

    Rank deficiency: a diagonal entry with ``|R_ii| <= rank_tol * max_j ||A[:, j]||`` (``A`` the
    matrix being factorised) counts as an exact zero, as ``numpy.linalg.matrix_rank`` decides
    numerical rank; its log is ``-inf`` and so is the exponent (never NaN). Default
    ``rank_tol = S * eps(dtype)``; ``rank_tol=0`` keeps the raw values.

    Dense or matrix-free: by default ``J_t`` is formed (the cell's ``jacobian`` capability,
    else ``jax.jacfwd``) and multiplied into the frame. With ``matrix_free=True`` the frame is
    pushed through ``jax.linearize`` of the step (``k`` JVPs per step) and no ``S x S`` matrix
    exists: memory ``O(T S + S k)`` and time ``O(T k * cost(step) + T S k^2)``, usable at
    ``H = 4096`` for modest ``k``.

    Args:
      cell: any ``Cell``.
      params: its params.
      xs: ``(*batch, T, I)`` (or time at ``time_axis``); one spectrum per sequence.
      carry: initial carry ``(*batch, ...)``; default ``cell.initial_carry``.
      k: number of exponents (default all ``S``).
      warmup: steps of the trajectory discarded before the frame starts.
      frame_warmup: steps the frame evolves before logs are recorded.
      reortho_every: ``r``, steps between QR re-orthonormalisations.
      window: steps per finite-time window (a multiple of ``r``); default about a tenth of
        the measured steps.
      matrix_free: push the frame through JVPs instead of dense Jacobians.
      method: Jacobian method for the dense path (see ``step_jacobian``).
      rank_tol: relative threshold below which a ``|R_ii|`` is an exact zero.
      key: PRNG key of the random initial frame (default ``jax.random.key(0)``).
      frame: an explicit orthonormal initial frame ``(S, k)`` instead (e.g. the identity,
        which makes a diagonal system's exponents exact at every step).
      time_axis: time axis of ``xs``.

    Returns:
      ``LyapunovSpectrum(exponents (*batch, k), stderr, finite_time (*batch, nw, k), window, steps)``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.rnn(4, activation="identity")            # linear: J_t = W_h^T
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> params["w_h"] = jnp.diag(jnp.array([0.9, 0.5, 0.2, 0.1]))
      >>> spec = seqjax.spectrum.lyapunov_spectrum(
      ...     cell, params, jnp.ones((2, 20, 3)), window=5, frame=jnp.eye(4))
      >>> print(spec.exponents.shape, spec.finite_time.shape)    # (B, k), (B, windows, k)
      (2, 4) (2, 4, 4)
      >>> bool(jnp.allclose(spec.exponents, jnp.log(jnp.array([0.9, 0.5, 0.2, 0.1])), atol=1e-5))
      True

    References: Benettin et al. (1980); Eckmann & Ruelle (1985); Engelken, Wolf & Abbott (2020).
    """
    xs_bm = _batch_major(xs, time_axis)
    params, xs_bm, carry, _ = promote(params, xs_bm, carry)
    T = xs_bm.shape[-2]
    S = state_size(cell, params)
    if frame is not None and k is None:
        k = int(np.shape(frame)[-1])
    k, window = _check_lyap_args(T, k, S, warmup, frame_warmup, reortho_every, window)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(_like(cell, params)))
    tol = _default_tol(dtype, S) if rank_tol is None else float(rank_tol)
    Q0 = _initial_frame(key, frame, S, k, dtype)
    if method == "analytic" and not matrix_free:
        _jacobian_fn(cell, params, method)  # raise outside jit when there is no closed form
    elif method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")

    def core(params, xs_bm, carry, Q0):
        prev, _ = _trajectory(cell, params, xs_bm, carry)
        xs_w = xs_bm[..., warmup:, :]
        prev_w = prev[..., warmup:, :]
        if matrix_free:
            f = _flat_step(cell, params, _like(cell, params))

            def apply(Q, op):
                s, x = op
                _, lin = jax.linearize(lambda v: f(v, x), s)
                return jax.vmap(lin, in_axes=1, out_axes=1)(Q)

        else:
            jac = _jacobian_fn(cell, params, method)

            def apply(Q, op):
                s, x = op
                return jac(s, x) @ Q

        def single(p, x):
            return _benettin(
                apply, (p, x), Q0, frame_warmup=frame_warmup, r=reortho_every, window=window, rank_tol=tol
            )

        return _summarise(_vmap_lead(single, xs_bm.ndim - 2)(prev_w, xs_w), window)

    e, err, ft = jax.jit(core)(params, xs_bm, carry, Q0)
    return LyapunovSpectrum(e, err, ft, window, ft.shape[-2] * window)
