r"""Lyapunov exponents by the QR method of Benettin et al. (1980) and Shimada & Nagashima (1979).

``lyapunov_from_jacobians`` takes the Jacobians ``(*batch, T, S, S)``; ``lyapunov_spectrum``
unrolls a cell and pushes the frame through dense Jacobians or JVPs (matrix-free). Both
share the QR iteration (``_benettin``) and the windowed summary with error bars
(``_summarise``) and return a ``LyapunovSpectrum``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._util import cast_floating, compute_dtype, promote
from seqjax.cells import Cell
from seqjax.spectrum.jacobians import _METHODS, _batch_major, _jacobian_fn, _trajectory
from seqjax.spectrum.products import _random_frame
from seqjax.spectrum.state import (
    _flat_step,
    _for_model,
    _like,
    _mask_batch_major,
    _valid_steps,
    _vmap_lead,
    state_size,
)
from seqjax.unroll import _is_concrete

__all__ = [
    "lyapunov_spectrum",
    "lyapunov_from_jacobians",
    "LyapunovSpectrum",
]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["exponents", "stderr", "finite_time", "steps"],
    meta_fields=["window"],
)
@dataclasses.dataclass(frozen=True)
class LyapunovSpectrum:
    """Lyapunov exponents with block-means error bars; a pytree (``window`` is static), so it
    passes through ``jit``, ``vmap`` and ``grad``.

    Attributes:
      exponents: ``(*batch, k)``, per step (natural log), decreasing; ``-inf`` where the
        product is (numerically) rank-deficient; NaN only for a sequence with no complete
        window (possible under ``jit`` with traced ``lengths``; eagerly that is an error).
      stderr: ``(*batch, k)``, standard error from the spread of the per-window
        exponents (batch means: ``std(ddof=1)/sqrt(num_windows)``); ``0`` where the
        exponent is ``-inf``; ``inf`` with a single window.
      finite_time: ``(*batch, num_windows, k)``, the finite-time (local) exponents of each
        window, columns in the order of ``exponents``; NaN for a window a (shorter, padded)
        sequence does not fill.
      steps: ``(*batch,)`` integer, the steps each sequence's exponents average over
        (its complete windows times ``window``).
      window: steps per window (a Python int).
    """

    exponents: jax.Array
    stderr: jax.Array
    finite_time: jax.Array
    steps: jax.Array
    window: int

    @property
    def max(self) -> jax.Array:
        """The largest exponent ``(*batch,)``."""
        return self.exponents[..., 0]

    def __str__(self) -> str:
        e = np.asarray(self.exponents, dtype=np.float64)
        s = np.asarray(self.stderr, dtype=np.float64)
        steps = np.asarray(self.steps).reshape(-1)
        flat_e, flat_s = e.reshape(-1, e.shape[-1]), s.reshape(-1, s.shape[-1])
        n, k = flat_e.shape
        shown = min(k, 8)
        more = f", ... ({k} exponents)" if k > shown else ""
        span = (
            f"{steps.min()}" if steps.size and steps.min() == steps.max() else f"{steps.min()}-{steps.max()}"
        )
        head = (
            f"Lyapunov spectrum, per step (natural log); windows of {self.window} steps, "
            f"{span} steps averaged"
        )
        if n == 1:
            body = ", ".join(f"{x:+.4f}±{y:.1e}" for x, y in zip(flat_e[0, :shown], flat_s[0, :shown]))
            return f"{head}\n  {body}{more}"
        with np.errstate(invalid="ignore"):
            finite = np.where(np.isfinite(flat_e), flat_e, np.nan)
            mean = np.nanmean(finite, axis=0) if np.isfinite(finite).any() else np.full(k, np.nan)
            spread = np.nanstd(finite, axis=0, ddof=1) if n > 1 else np.zeros(k)
            mean = np.where(np.all(flat_e == -np.inf, axis=0), -np.inf, mean)
            med_err = np.nanmedian(np.where(np.isfinite(flat_s), flat_s, np.nan), axis=0)
        lines = [
            head,
            f"  mean over {n} sequences ± spread (std across sequences):",
            "  " + ", ".join(f"{m:+.4f}±{d:.1e}" for m, d in zip(mean[:shown], spread[:shown])) + more,
            "  median per-sequence stderr: " + ", ".join(f"{x:.1e}" for x in med_err[:shown]),
            f"  largest exponent per sequence: min {np.min(flat_e[:, 0]):+.4f}, "
            f"max {np.max(flat_e[:, 0]):+.4f}",
        ]
        return "\n".join(lines)

    def plot(self, *, ax=None, **kwargs):
        """Plot the spectrum with error bars (``seqjax.plot.plot_lyapunov_spectrum``)."""
        from seqjax import plot

        return plot.plot_lyapunov_spectrum(self, ax=ax, **kwargs)


def _column_scale(A):
    """``max_j ||A[..., :, j]||`` with the batch axes kept, ``(..., 1, 1)``; no gradient (it
    only decides which ``R_ii`` count as zero, and ``||0||`` has none)."""
    norms = jnp.linalg.norm(jax.lax.stop_gradient(A), axis=-2)
    return jnp.max(norms, axis=-1)[..., None, None]


def _qr_pos_impl(A):
    if A.shape[-1] == 1:  # one column: a normalisation (no LAPACK call); a zero column -> e_1, as LAPACK
        r = jnp.linalg.norm(A, axis=-2, keepdims=True)
        e1 = jnp.zeros_like(A).at[..., 0, 0].set(1)
        return jnp.where(r > 0, A / jnp.where(r > 0, r, jnp.ones_like(r)), e1), r
    Q, R = jnp.linalg.qr(A)
    d = jnp.diagonal(R, axis1=-2, axis2=-1)
    sign = jnp.where(d < 0, -1, 1).astype(A.dtype)
    return Q * sign[..., None, :], R * sign[..., :, None]


@jax.custom_jvp
def _qr_pos(A, rank_tol):
    r"""Reduced QR ``A = Q R`` of ``A: (..., m, n)``, ``m >= n``, with ``diag(R) >= 0``.

    The sign convention makes the factorisation unique where ``A`` has full column rank, so
    ``Q``, ``R`` and ``log R_ii`` are smooth functions of ``A`` there (Householder QR, as
    LAPACK returns it, flips column signs with the sign of a pivot: continuous in
    ``|R_ii|`` but not in ``Q``).

    The JVP is the standard one (``X = Q^T dA R^{-1}``, ``Omega = tril(X, -1) - tril(X, -1)^T``,
    ``dR = (X - Omega) R``, ``dQ = dA R^{-1} + Q (Omega - X)``), with one change: a diagonal
    entry ``R_ii <= rank_tol * max_j ||A_j||`` (numerically zero: a rank-deficient ``A``) is
    replaced by ``max_j ||A_j||`` in the triangular solve. Column ``j`` of ``dQ`` and ``dR``
    depends only on the leading ``(j+1) x (j+1)`` block of ``R``, so the tangents of the
    columns before a deficient one are exact, and the others finite instead of ``inf``/NaN
    (which ``jnp.linalg.qr``'s own rule gives there, and which a matrix product then spreads
    to every column: ``NaN * 0 = NaN``). ``rank_tol`` gets no tangent.
    """
    return _qr_pos_impl(A)


@_qr_pos.defjvp
def _qr_pos_jvp(primals, tangents):
    A, rank_tol = primals
    dA = tangents[0]
    Q, R = _qr_pos_impl(A)
    n = R.shape[-1]
    d = jnp.diagonal(R, axis1=-2, axis2=-1)
    scale = _column_scale(A)[..., 0]  # (..., 1)
    fill = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    zero = d <= rank_tol * scale
    eye = jnp.eye(n, dtype=R.dtype)
    R_safe = R + eye * jnp.where(zero, fill - d, jnp.zeros_like(d))[..., None, :]
    if n == 1:
        dA_Rinv = dA / R_safe
    else:
        dA_Rinv = jax.lax.linalg.triangular_solve(R_safe, dA, left_side=False, lower=False)  # dA R^{-1}
    X = jnp.swapaxes(Q, -1, -2) @ dA_Rinv
    low = jnp.tril(X, -1)
    omega = low - jnp.swapaxes(low, -1, -2)
    dR = (X - omega) @ R
    dQ = dA_Rinv + Q @ (omega - X)
    return (Q, R), (dQ, dR)


def _qr_logs(A, rank_tol):
    """``Q`` and ``log R_ii`` of ``A = Q R`` (``diag(R) >= 0``); ``-inf`` where
    ``R_ii <= rank_tol * max_j ||A_j||``, with a zero gradient there (never NaN)."""
    Q, R = _qr_pos(A, rank_tol)
    d = jnp.diagonal(R, axis1=-2, axis2=-1)
    zero = d <= rank_tol * _column_scale(A)[..., 0]
    logs = jnp.log(jnp.where(zero, jnp.ones_like(d), d))  # no log(0) in the graph: finite gradients
    return Q, jnp.where(zero, -jnp.inf, logs)


def _compact(valid, ops):
    """Move each sequence's valid steps to the front (time order kept); return
    ``(ok (*batch, T) bool, ops)`` with ``ok[t] = t < number of valid steps``."""
    if valid is None:
        return None, ops
    order = jnp.argsort(~valid, axis=-1, stable=True)  # valid steps first, in time order
    n = jnp.sum(valid, axis=-1)
    t = jnp.arange(valid.shape[-1]).reshape((1,) * n.ndim + (valid.shape[-1],))
    ok = t < n[..., None]

    def gather(a):
        idx = order.reshape(order.shape + (1,) * (a.ndim - order.ndim))
        return jnp.take_along_axis(a, idx, axis=order.ndim - 1)

    return ok, jax.tree_util.tree_map(gather, ops)


def _benettin(apply, ops, ok, Q0, *, frame_warmup, r, window, rank_tol):
    """QR iteration over operands ``ops`` (pytree, leading axis time) with step flags ``ok``
    (``(T,)`` bool, valid steps first; an invalid step leaves the frame as it is).

    Returns ``(sums (num_windows, k), window_ok (num_windows,))``: per-window sums of logs and
    whether the window is complete (all its steps valid).
    """

    def push(A, op, o):
        return jnp.where(o, apply(A, op), A)

    def one(Q, x):
        op, o = x
        Q_new, _ = _qr_logs(push(Q, op, o), rank_tol)
        return jnp.where(o, Q_new, Q), None

    tree = jax.tree_util.tree_map
    if frame_warmup:
        Q0, _ = jax.lax.scan(one, Q0, (tree(lambda a: a[:frame_warmup], ops), ok[:frame_warmup]))
    T = ok.shape[0] - frame_warmup
    nw = T // window
    used = nw * window

    def blocks_of(a):
        return a[frame_warmup : frame_warmup + used].reshape((nw, window // r, r) + a.shape[1:])

    blocks = tree(blocks_of, ops)
    ok_b = blocks_of(ok)

    def group(Q, x):
        ops_g, ok_g = x

        def inner(A, y):
            op, o = y
            return push(A, op, o), None

        A, _ = jax.lax.scan(inner, Q, (ops_g, ok_g))
        Q_new, logs = _qr_logs(A, rank_tol)
        keep = ok_g[-1]  # valid steps come first: the group is complete iff its last step is
        return jnp.where(keep, Q_new, Q), jnp.where(keep, logs, jnp.zeros_like(logs))

    def block(Q, x):
        Q, logs = jax.lax.scan(group, Q, x)
        return Q, jnp.sum(logs, axis=0)

    _, sums = jax.lax.scan(block, Q0, (blocks, ok_b))
    return sums, ok_b[:, -1, -1]


def _summarise(sums, window_ok, window):
    """``sums: (*batch, nw, k)``, ``window_ok: (*batch, nw)`` -> LyapunovSpectrum fields (sorted)."""
    nw_b = jnp.sum(window_ok, axis=-1)  # (*batch,)
    ft = sums / window
    wok = window_ok[..., None]
    n = nw_b[..., None].astype(ft.dtype)
    expo = jnp.sum(jnp.where(wok, ft, jnp.zeros_like(ft)), axis=-2) / n  # NaN with no complete window
    order = jnp.argsort(-expo, axis=-1)
    expo = jnp.take_along_axis(expo, order, axis=-1)
    ft = jnp.take_along_axis(ft, order[..., None, :], axis=-1)
    finite = jnp.isfinite(expo)
    centred = jnp.where(wok & finite[..., None, :], ft - jnp.where(finite, expo, 0)[..., None, :], 0.0)
    var = jnp.sum(centred**2, axis=-2) / jnp.maximum(n - 1, 1)
    err = jnp.sqrt(var) / jnp.sqrt(jnp.maximum(n, 1))
    err = jnp.where(n > 1, err, jnp.inf)
    err = jnp.where(jnp.isneginf(expo), jnp.zeros_like(err), err)
    err = jnp.where(jnp.isnan(expo), jnp.nan, err)
    ft = jnp.where(wok, ft, jnp.nan)
    return expo, err, ft, nw_b * window


def _available(valid, T, warmup, frame_warmup):
    """Measured steps of the shortest sequence (concrete ``valid``), else ``T - warmups``."""
    avail = T - warmup - frame_warmup
    if valid is None or not _is_concrete(valid):
        return avail, None
    n = np.asarray(valid).sum(-1)
    if n.size == 0:
        return avail, None
    return int(n.min()) - warmup - frame_warmup, n


def _check_lyap_args(T, k, S, warmup, frame_warmup, reortho_every, window, valid=None):
    if not isinstance(reortho_every, (int, np.integer)) or reortho_every < 1:
        raise ValueError(f"reortho_every must be a positive integer, got {reortho_every!r}.")
    if warmup < 0 or frame_warmup < 0:
        raise ValueError(f"warmup and frame_warmup must be >= 0, got {warmup} and {frame_warmup}.")
    k = S if k is None else int(k)
    if not 1 <= k <= S:
        raise ValueError(f"k must lie in [1, S={S}] (S is the flattened state size), got {k}.")
    avail, counts = _available(valid, T, warmup, frame_warmup)
    shortest = (
        None if counts is None else tuple(int(i) for i in np.unravel_index(counts.argmin(), counts.shape))
    )
    what = "the sequence has" if counts is None else f"the shortest sequence (index {shortest}) has"
    n_have = T if counts is None else int(counts.min())
    if avail < reortho_every:
        raise ValueError(
            f"{what} {n_have} steps but warmup={warmup} + frame_warmup={frame_warmup} leave {avail}, "
            f"fewer than reortho_every={reortho_every}; pass longer sequences."
        )
    if window is None:
        window = max(reortho_every, (avail // 10) // reortho_every * reortho_every)
    window = int(window)
    if window < 1 or window % reortho_every or window > avail:
        where = "" if counts is None else f" of the shortest sequence (index {shortest})"
        raise ValueError(
            f"window must be a positive multiple of reortho_every={reortho_every} and at most the {avail} "
            f"measured steps{where}, got {window}."
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


_STATIC = ("frame_warmup", "r", "window")


def _run(apply, ops, valid, Q0, tol, warmup, frame_warmup, r, window, nlead):
    """Compact, drop ``warmup`` steps, QR-iterate each sequence and summarise."""
    ok, ops = _compact(valid, ops)
    T = jax.tree_util.tree_leaves(ops)[0].shape[nlead]
    if ok is None:
        ok = jnp.ones(tuple(jax.tree_util.tree_leaves(ops)[0].shape[:nlead]) + (T,), bool)
    ops = jax.tree_util.tree_map(lambda a: jax.lax.slice_in_dim(a, warmup, T, axis=nlead), ops)
    ok = ok[..., warmup:]

    def single(ops_b, ok_b):
        return _benettin(apply, ops_b, ok_b, Q0, frame_warmup=frame_warmup, r=r, window=window, rank_tol=tol)

    sums, window_ok = _vmap_lead(single, nlead)(ops, ok)
    return _summarise(sums, window_ok, window)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _from_jacobians_core(J, valid, Q0, tol, *, frame_warmup, r, window):
    def apply(Q, Jt):
        return Jt @ Q

    return _run(apply, J, valid, Q0, tol, 0, frame_warmup, r, window, J.ndim - 3)


def lyapunov_from_jacobians(
    jacobians: jax.Array,
    *,
    k: int | None = None,
    lengths: Any = None,
    mask: Any = None,
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
    ``(*batch, T, S, S)`` in time order; ``lengths`` ``(*batch,)`` or ``mask`` ``(*batch, T)``
    select the steps of each sequence that count (the others are skipped, whatever their
    Jacobian). Compiled once per shapes and static options.

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
    if not jnp.issubdtype(J.dtype, jnp.floating):
        J = J.astype(jnp.result_type(float))
    if frame is not None:  # the dtype rule: a float64 frame promotes float32 Jacobians
        J = J.astype(jnp.result_type(J.dtype, jnp.asarray(frame).dtype))
    T, S = J.shape[-3], J.shape[-1]
    valid = _valid_steps(lengths, mask, J[..., 0])
    if frame is not None and k is None:
        k = int(np.shape(frame)[-1])
    k, window = _check_lyap_args(T, k, S, 0, frame_warmup, reortho_every, window, valid)
    tol = _default_tol(J.dtype, S) if rank_tol is None else float(rank_tol)
    Q0 = _initial_frame(key, frame, S, k, J.dtype)
    e, err, ft, steps = _from_jacobians_core(
        J,
        valid,
        Q0,
        jnp.asarray(tol, J.dtype),
        frame_warmup=int(frame_warmup),
        r=int(reortho_every),
        window=window,
    )
    return LyapunovSpectrum(e, err, ft, steps, window)


@functools.partial(jax.jit, static_argnames=("cell", "method", "matrix_free", "warmup", *_STATIC))
def _spectrum_core(
    cell, params, xs_bm, carry, valid, Q0, tol, *, method, matrix_free, warmup, frame_warmup, r, window
):
    """The compiled body of ``lyapunov_spectrum`` (one cache entry per cell, options, shapes)."""
    prev, _ = _trajectory(cell, params, xs_bm, carry, valid)
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

    return _run(apply, (prev, xs_bm), valid, Q0, tol, warmup, frame_warmup, r, window, xs_bm.ndim - 2)


@overload
def lyapunov_spectrum(
    cell: Cell,
    params: Any,
    xs: Any,
    *,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    k: int | None = ...,
    warmup: int = ...,
    frame_warmup: int = ...,
    reortho_every: int = ...,
    window: int | None = ...,
    matrix_free: bool = ...,
    method: str = ...,
    rank_tol: float | None = ...,
    key: jax.Array | None = ...,
    frame: jax.Array | None = ...,
    time_axis: int = ...,
) -> LyapunovSpectrum: ...


@overload
def lyapunov_spectrum(
    cell: object,
    params: Any,
    xs: Any,
    *,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    k: int | None = ...,
    warmup: int = ...,
    frame_warmup: int = ...,
    reortho_every: int = ...,
    window: int | None = ...,
    matrix_free: bool = ...,
    method: str = ...,
    rank_tol: float | None = ...,
    key: jax.Array | None = ...,
    frame: jax.Array | None = ...,
    time_axis: int = ...,
) -> dict[str, LyapunovSpectrum]: ...


def lyapunov_spectrum(
    cell: Cell | Any,
    params: Any,
    xs: Any,
    *,
    carry: Any = None,
    lengths: Any = None,
    mask: Any = None,
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
) -> LyapunovSpectrum | dict[str, LyapunovSpectrum]:
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

    Padded data: with ``lengths`` (or ``mask``) each sequence's exponents come from its own
    valid steps only: ``warmup``, ``frame_warmup`` and the windows count that sequence's
    valid steps, a sequence averages over its own complete windows (``steps`` per sequence),
    and the default ``window`` is a tenth of the shortest sequence's measured steps. The
    same numbers as slicing each sequence by hand and calling this function on it.

    Speed and transformations: the work is one ``jax.jit`` with the cell and the integer
    options static (cells compare by value, so a cell rebuilt for each checkpoint of a sweep
    hits the cache; new params of the same shapes never recompile). The result is a pytree:
    the call works inside a user's ``jit`` and ``vmap``, and ``jax.grad`` flows through it.

    Gradients: the QR is taken with ``diag(R) > 0`` (unique for a full-rank frame, so ``Q``,
    ``R`` and ``log R_ii`` are smooth in the params, and ``jax.grad`` of ``exponents``
    matches finite differences), and its tangent stays finite where a ``R_ii`` is
    numerically zero: a ``-inf`` exponent has a zero gradient and the others keep theirs
    (never NaN; ``sum(exponents**2)`` is then itself infinite, see
    ``seqjax.spectrum.flossing.flossing_loss`` for a floored loss). Repeated exponents are
    no obstacle (the QR does not separate directions by their growth rates). With
    ``reortho_every=1`` nothing overflows, in float32 too, however long the sequence.

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
      cell: any ``Cell``, or a whole model (``many_to_one``, ``encoder_decoder``, a layer, an
        NNX module; see ``seqjax.spectrum.recurrent_cores``): then a dict, one spectrum per core.
      params: its params.
      xs: ``(*batch, T, I)`` (or time at ``time_axis``); one spectrum per sequence.
      carry: initial carry ``(*batch, ...)``; default ``cell.initial_carry``.
      lengths: ``(*batch,)`` valid steps of each sequence (padded data), or ``None``.
      mask: ``(*batch, T)`` bool (laid out like ``xs`` without features): the steps read.
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
      ``LyapunovSpectrum(exponents (*batch, k), stderr, finite_time (*batch, nw, k), steps, window)``.

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
    if not isinstance(cell, Cell):
        return _for_model(
            lyapunov_spectrum,
            cell,
            params,
            xs,
            carry,
            lengths,
            mask,
            time_axis,
            k=k,
            warmup=warmup,
            frame_warmup=frame_warmup,
            reortho_every=reortho_every,
            window=window,
            matrix_free=matrix_free,
            method=method,
            rank_tol=rank_tol,
            key=key,
            frame=frame,
        )
    xs = jnp.asarray(xs)
    xs_bm = _batch_major(xs, time_axis)
    valid = _valid_steps(lengths, _mask_batch_major(mask, xs, time_axis), xs_bm)
    if frame is not None:  # the dtype rule: a float64 frame promotes a float32 cell and inputs
        dtype = compute_dtype(params, xs_bm, carry, frame)
        params, xs_bm, carry = cast_floating((params, xs_bm, carry), dtype)
    params, xs_bm, carry, _ = promote(params, xs_bm, carry)
    T = xs_bm.shape[-2]
    S = state_size(cell, params)
    if frame is not None and k is None:
        k = int(np.shape(frame)[-1])
    k, window = _check_lyap_args(T, k, S, warmup, frame_warmup, reortho_every, window, valid)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(_like(cell, params)))
    tol = _default_tol(dtype, S) if rank_tol is None else float(rank_tol)
    Q0 = _initial_frame(key, frame, S, k, dtype)
    if method == "analytic" and not matrix_free:
        _jacobian_fn(cell, params, method)  # raise outside jit when there is no closed form
    elif method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    e, err, ft, steps = _spectrum_core(
        cell,
        params,
        xs_bm,
        carry,
        valid,
        Q0,
        jnp.asarray(tol, dtype),
        method=method,
        matrix_free=bool(matrix_free),
        warmup=int(warmup),
        frame_warmup=int(frame_warmup),
        r=int(reortho_every),
        window=window,
    )
    return LyapunovSpectrum(e, err, ft, steps, window)
