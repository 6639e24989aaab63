r"""Covariant Lyapunov vectors by the method of Ginelli et al. (2007, 2013), and the angles
between the unstable and stable subspaces they span.

The Lyapunov exponents (``seqjax.spectrum.lyapunov``) are growth rates; the covariant
Lyapunov vectors (CLVs) are the directions that grow at those rates. ``v_t^i`` is carried by
the dynamics into ``v_{t+1}^i``, ``J_{t+1} v_t^i = gamma_{t+1}^i v_{t+1}^i``, and
``(1/N) sum_t log |gamma_t^i| -> lambda_i``. Unlike the orthonormal (Gram–Schmidt) frame of
the QR method they are not orthogonal: for a constant map they are its eigenvectors, and
where the unstable and stable directions come close, a small perturbation can be moved
from one to the other and amplified (the transient growth of non-normal dynamics).

Ginelli's method: a forward QR iteration ``Q_t R_t = J_t Q_{t-1}`` (stored), then a
backward iteration of upper-triangular coefficients from a random upper-triangular start,

```text
C_{t-1} = R_t^{-1} C_t,  columns renormalised;      v_t^i = Q_t C_t[:, i]
```

after transients at both ends (the frame needs ``warmup`` steps to align with the
Gram–Schmidt vectors, the coefficients ``backward_warmup`` steps to converge). Both passes
are one ``lax.scan`` each.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from seqjax._util import cast_floating, compute_dtype, promote
from seqjax.cells import Cell
from seqjax.spectrum.jacobians import _METHODS, _batch_major, _jacobian_fn, _trajectory
from seqjax.spectrum.lyapunov import _default_tol, _initial_frame
from seqjax.spectrum.state import _flat_step, _for_model, _like, _vmap_lead, state_size

__all__ = [
    "CovariantLyapunovVectors",
    "covariant_lyapunov_vectors",
    "clvs_from_jacobians",
    "clv_angles",
]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["vectors", "growth", "exponents"],
    meta_fields=["first_step"],
)
@dataclasses.dataclass(frozen=True)
class CovariantLyapunovVectors:
    r"""Covariant Lyapunov vectors over the middle part of a trajectory; a pytree
    (``first_step`` is static), so it passes through ``jit`` and ``vmap``.

    Time: the vectors cover ``T' = T - warmup - backward_warmup`` steps. Index ``u`` holds
    step ``t = first_step + u`` in the 0-based step indexing of ``xs`` and of
    ``StepJacobians`` (the state ``states[..., t, :]`` after reading ``xs[..., t, :]``, and
    the Jacobian ``jacobians[..., t, :, :]`` of that step).

    Attributes:
      vectors: ``(*batch, T', S, k)``, unit columns; column ``i`` is the CLV of the ``i``-th
        exponent, tangent to the state of step ``first_step + u``. Each is defined up to sign.
      growth: ``(*batch, T', k)``, the local growth rates ``log ||J_t v_{t-1}^i||`` (natural
        log): how much step ``t`` stretches the unit CLV of the step before it, which it maps
        onto ``v_t^i``. Their time average tends to ``lambda_i``.
      exponents: ``(*batch, k)``, the Lyapunov exponents from the forward QR iteration (the mean
        of ``log |R_t[i, i]|`` over the steps after ``warmup``), in the order of the columns
        (decreasing once the frame has aligned); ``-inf`` for a rank-deficient direction.
      first_step: the step of ``vectors[..., 0, :, :]`` (``= warmup``; a Python int).
    """

    vectors: jax.Array
    growth: jax.Array
    exponents: jax.Array
    first_step: int


@jax.jit
def _unit_triangular(r):
    """``r (k, k)`` made upper triangular, its diagonal pushed away from 0, columns of unit norm."""
    d = jnp.diagonal(r)
    r = jnp.triu(r) + jnp.diag(jnp.sign(d) + (d == 0))
    return r / jnp.linalg.norm(r, axis=0, keepdims=True)


def _starts(key, frame, S, k, dtype):
    """The initial frame and the random upper-triangular start, drawn outside the compiled core
    (random bits compiled into it would cost more compile time than the rest): ``Q R = G`` for a
    Gaussian ``G (S, k)`` from ``key``. ``Q`` is the frame ``lyapunov_spectrum`` draws for the
    same key (unless ``frame`` is given); ``R``, a random upper-triangular matrix (Bartlett), is
    the start of the backward pass."""
    key = jax.random.key(0) if key is None else key
    q, r = jnp.linalg.qr(jax.random.normal(key, (S, k), dtype=jnp.float32).astype(dtype))
    return (q if frame is None else _initial_frame(None, frame, S, k, dtype)), _unit_triangular(r)


def _ginelli(apply, ops, Q0, C0, tol, *, warmup, backward_warmup):
    """Ginelli's two passes over operands ``ops`` (pytree, leading axis time ``T``) for one
    sequence. Returns ``(vectors (T', S, k), growth (T', k), exponents (k,))``."""

    def forward(Q, op):
        Q_new, R = jnp.linalg.qr(apply(Q, op))
        return Q_new, (Q_new, R)

    # One scan over every step (the warmup steps' factors are stored and dropped: one loop body
    # to compile instead of two). Qs[u], Rs[u]: step t = warmup + u (0-based), u = 0..n-1.
    _, (Qs, Rs) = jax.lax.scan(forward, Q0, ops)
    Qs, Rs = Qs[warmup:], Rs[warmup:]

    d = jnp.abs(jnp.diagonal(Rs, axis1=-2, axis2=-1))  # (n, k)
    scale = jnp.max(jnp.linalg.norm(Rs, axis=-2), axis=-1, keepdims=True)  # max column norm of J Q
    zero = d <= tol * scale
    logs = jnp.where(zero, -jnp.inf, jnp.log(jnp.where(zero, jnp.ones_like(d), d)))
    exponents = jnp.mean(logs, axis=0)

    # A direction that collapses (R_ii = 0) has no preimage: solve with R_ii floored at the
    # rank threshold, which keeps every number finite (the vector is then meaningless).
    floor = jnp.maximum(tol * scale, jnp.finfo(Rs.dtype).tiny)[..., None]  # (n, 1, 1)
    eye = jnp.eye(Rs.shape[-1], dtype=bool)[None]
    Rs = jnp.where(eye & (jnp.abs(Rs) <= floor), floor, Rs)

    def backward(C, x):
        Q, R = x
        B = solve_triangular(R, C, lower=False)  # R_t^{-1} C_t
        norms = jnp.linalg.norm(B, axis=0)
        # C_{t-1}; v_t = Q_t C_t; log ||J_t v_{t-1}|| = -log ||R_t^{-1} C_t[:, i]||
        return B / norms[None, :], (Q @ C, -jnp.log(norms))

    # One reverse scan over the stored steps; the last `backward_warmup` (the backward transient,
    # where C has not converged yet) are dropped.
    _, (vectors, growth) = jax.lax.scan(backward, C0, (Qs, Rs), reverse=True)
    n_out = Rs.shape[0] - backward_warmup
    return vectors[:n_out], growth[:n_out], exponents


_STATIC = ("warmup", "backward_warmup")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _from_jacobians_core(J, Q0, C0, tol, *, warmup, backward_warmup):
    def apply(Q, Jt):
        return Jt @ Q

    def single(Js):
        return _ginelli(apply, Js, Q0, C0, tol, warmup=warmup, backward_warmup=backward_warmup)

    return _vmap_lead(single, J.ndim - 3)(J)


@functools.partial(jax.jit, static_argnames=("cell", "method", "matrix_free", *_STATIC))
def _clv_core(cell, params, xs_bm, carry, Q0, C0, tol, *, method, matrix_free, warmup, backward_warmup):
    prev, _ = _trajectory(cell, params, xs_bm, carry)
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

    def single(ops):
        return _ginelli(apply, ops, Q0, C0, tol, warmup=warmup, backward_warmup=backward_warmup)

    return _vmap_lead(single, xs_bm.ndim - 2)((prev, xs_bm))


def _check_clv_args(T, S, k, warmup, backward_warmup):
    k = S if k is None else int(k)
    if not 1 <= k <= S:
        raise ValueError(f"k must lie in [1, S={S}] (S is the flattened state size), got {k}.")
    warmup = T // 4 if warmup is None else warmup
    backward_warmup = T // 4 if backward_warmup is None else backward_warmup
    for name, v in (("warmup", warmup), ("backward_warmup", backward_warmup)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}.")
    if T - warmup - backward_warmup < 1:
        raise ValueError(
            f"the sequence has {T} steps but warmup={warmup} + backward_warmup={backward_warmup} leave "
            f"{T - warmup - backward_warmup}; the vectors need at least one step between the transients."
        )
    return k, int(warmup), int(backward_warmup)


def clvs_from_jacobians(
    jacobians: jax.Array,
    *,
    k: int | None = None,
    warmup: int | None = None,
    backward_warmup: int | None = None,
    rank_tol: float | None = None,
    key: jax.Array | None = None,
    frame: jax.Array | None = None,
) -> CovariantLyapunovVectors:
    r"""Covariant Lyapunov vectors of a given sequence of Jacobians (Ginelli's method).

    See ``covariant_lyapunov_vectors`` for the method; this variant takes the Jacobians
    ``(*batch, T, S, S)`` of ``s_t = J_t s_{t-1}`` directly (e.g. ``step_jacobians(...).jacobians``,
    or any linear time-varying system). Compiled once per shapes and static options
    (``warmup``, ``backward_warmup``).

    Args:
      jacobians: ``(*batch, T, S, S)`` in time order.
      k: number of vectors (the top ``k``; default all ``S``). Ginelli's method needs only the
        first ``k`` Gram–Schmidt vectors for the first ``k`` CLVs.
      warmup: forward transient: steps the frame evolves before anything is stored (default
        ``T // 4``).
      backward_warmup: backward transient: steps the coefficients evolve back from their
        random start before vectors are emitted (default ``T // 4``).
      rank_tol: relative threshold below which ``|R_ii|`` is an exact zero (as in
        ``lyapunov_spectrum``; default ``S * eps``).
      key: PRNG key of the random initial frame and the random triangular start (default
        ``jax.random.key(0)``).
      frame: an explicit orthonormal initial frame ``(S, k)`` instead of a random one.

    Returns:
      ``CovariantLyapunovVectors(vectors (*batch, T', S, k), growth (*batch, T', k),
      exponents (*batch, k), first_step)`` with ``T' = T - warmup - backward_warmup``.

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> A = jnp.array([[2.0, 1.0], [0.0, 0.5]])       # eigenvectors (1, 0) and (1, -1.5)/|.|
      >>> clv = seqjax.spectrum.clvs_from_jacobians(
      ...     jnp.broadcast_to(A, (60, 2, 2)), warmup=20, backward_warmup=20)
      >>> clv.vectors.shape, clv.first_step              # (T', S, k)
      ((20, 2, 2), 20)
      >>> v2 = clv.vectors[10, :, 1]
      >>> bool(jnp.allclose(jnp.abs(v2 @ jnp.array([1.0, -1.5])), jnp.hypot(1.0, 1.5), atol=1e-5))
      True
    """
    J = jnp.asarray(jacobians)
    if J.ndim < 3 or J.shape[-1] != J.shape[-2]:
        raise ValueError(f"jacobians must be (*batch, T, S, S), got shape {tuple(J.shape)}.")
    if not jnp.issubdtype(J.dtype, jnp.floating):
        J = J.astype(jnp.result_type(float))
    if frame is not None:  # the dtype rule: a float64 frame promotes float32 Jacobians
        J = J.astype(jnp.result_type(J.dtype, jnp.asarray(frame).dtype))
        if k is None:
            k = int(np.shape(frame)[-1])
    T, S = J.shape[-3], J.shape[-1]
    k, warmup, backward_warmup = _check_clv_args(T, S, k, warmup, backward_warmup)
    tol = _default_tol(J.dtype, S) if rank_tol is None else float(rank_tol)
    Q0, C0 = _starts(key, frame, S, k, J.dtype)
    v, g, e = _from_jacobians_core(
        J, Q0, C0, jnp.asarray(tol, J.dtype), warmup=warmup, backward_warmup=backward_warmup
    )
    return CovariantLyapunovVectors(v, g, e, warmup)


@overload
def covariant_lyapunov_vectors(
    cell: Cell,
    params: Any,
    xs: Any,
    *,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    k: int | None = ...,
    warmup: int | None = ...,
    backward_warmup: int | None = ...,
    matrix_free: bool = ...,
    method: str = ...,
    rank_tol: float | None = ...,
    key: jax.Array | None = ...,
    frame: jax.Array | None = ...,
    time_axis: int = ...,
) -> CovariantLyapunovVectors: ...


@overload
def covariant_lyapunov_vectors(
    cell: object,
    params: Any,
    xs: Any,
    *,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    k: int | None = ...,
    warmup: int | None = ...,
    backward_warmup: int | None = ...,
    matrix_free: bool = ...,
    method: str = ...,
    rank_tol: float | None = ...,
    key: jax.Array | None = ...,
    frame: jax.Array | None = ...,
    time_axis: int = ...,
) -> dict[str, CovariantLyapunovVectors]: ...


def covariant_lyapunov_vectors(
    cell: Cell | Any,
    params: Any,
    xs: Any,
    *,
    carry: Any = None,
    lengths: Any = None,
    mask: Any = None,
    k: int | None = None,
    warmup: int | None = None,
    backward_warmup: int | None = None,
    matrix_free: bool = False,
    method: str = "auto",
    rank_tol: float | None = None,
    key: jax.Array | None = None,
    frame: jax.Array | None = None,
    time_axis: int = -2,
) -> CovariantLyapunovVectors | dict[str, CovariantLyapunovVectors]:
    r"""Covariant Lyapunov vectors of a cell driven by inputs ``xs`` (Ginelli's method).

    The CLVs ``v_t^1, ..., v_t^k`` at each step are the directions in state space that grow
    at the Lyapunov rates ``lambda_1 >= ... >= lambda_k`` and are carried into each other by
    the step Jacobians: ``J_t v_{t-1}^i = gamma_t^i v_t^i``. They are intrinsic to the
    dynamics (independent of the norm and of the initial frame) and, unlike the Gram–Schmidt
    vectors of the QR method, not orthogonal. For a constant Jacobian with real eigenvalues
    of distinct moduli they are its eigenvectors.

    Method (Ginelli et al. 2007):

    1. Forward: ``Q_t R_t = J_t Q_{t-1}`` (QR every step) from a random orthonormal ``S x k``
       frame. The first ``warmup`` steps align the frame; ``Q_t``, ``R_t`` of the rest are stored.
    2. Backward: from a random upper-triangular ``C_T`` with unit columns,
       ``C_{t-1} = R_t^{-1} C_t`` with the columns renormalised; the first ``backward_warmup``
       steps (from the end) let ``C`` converge. The column norms give the local growth
       ``log |gamma_t^i| = -log ||R_t^{-1} C_t[:, i]||``.
    3. ``v_t^i = Q_t C_t[:, i]`` at the steps between the transients.

    Both transients converge geometrically, at the rates of the gaps
    ``lambda_i - lambda_{i+1}``: near-degenerate exponents need long transients (the
    defaults are a quarter of the sequence each). The span of the first ``m`` CLVs equals the
    span of the first ``m`` columns of ``Q_t``; ``clv_angles`` measures how close it comes to
    the span of the others.

    Cost: ``O(T S k^2)`` after the Jacobians; memory ``O(T S k)`` for the stored ``Q_t`` (and
    ``O(T S^2)`` for the dense Jacobians; ``matrix_free=True`` pushes the frame through
    ``jax.linearize`` of the step instead, as in ``lyapunov_spectrum``). Compiled once per
    cell, options and shapes; transparent to ``jit`` and ``vmap``.

    Padded data is not supported (``lengths`` and ``mask`` raise): the valid middle part
    differs per sequence. Analyse each sequence sliced to its own length.

    Args:
      cell: any ``Cell``, or a whole model (see ``seqjax.spectrum.recurrent_cores``; run
        without ``lengths``): then a dict, one result per core.
      params: its params.
      xs: ``(*batch, T, I)`` (or time at ``time_axis``); one set of vectors per sequence.
      carry: initial carry ``(*batch, ...)``; default ``cell.initial_carry``.
      lengths: not supported (``ValueError``); see above.
      mask: not supported (``ValueError``).
      k: number of vectors (default all ``S``).
      warmup: forward transient in steps (default ``T // 4``); it also lets the state forget
        its initial value.
      backward_warmup: backward transient in steps (default ``T // 4``).
      matrix_free: push the frame through JVPs instead of dense Jacobians.
      method: Jacobian method for the dense path (see ``step_jacobian``).
      rank_tol: relative threshold below which ``|R_ii|`` is an exact zero.
      key: PRNG key of the random frame and triangular start (default ``jax.random.key(0)``).
      frame: an explicit orthonormal initial frame ``(S, k)``.
      time_axis: time axis of ``xs``.

    Returns:
      ``CovariantLyapunovVectors(vectors (*batch, T', S, k), growth (*batch, T', k),
      exponents (*batch, k), first_step)``, ``T' = T - warmup - backward_warmup``;
      ``vectors[..., u, :, :]`` belongs to step ``first_step + u``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.rnn(6, recurrent_init=seqjax.initializers.scaled_gaussian(1.5))
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> xs = 0.5 * jax.random.normal(jax.random.key(1), (2, 120, 2))
      >>> clv = seqjax.spectrum.covariant_lyapunov_vectors(cell, params, xs, k=3)
      >>> clv.vectors.shape, clv.growth.shape, clv.first_step     # T' = 120 - 30 - 30
      ((2, 60, 6, 3), (2, 60, 3), 30)
      >>> bool(jnp.allclose(jnp.linalg.norm(clv.vectors, axis=-2), 1.0, atol=1e-5))
      True

    References: Ginelli, Poggi, Turchi, Chaté, Livi & Politi, "Characterizing dynamics with
    covariant Lyapunov vectors", Phys. Rev. Lett. 99 (2007); Ginelli, Chaté, Livi & Politi,
    "Covariant Lyapunov vectors", J. Phys. A 46 (2013); Engelken, Wolf & Abbott (2020).
    """
    if not isinstance(cell, Cell):
        return _for_model(
            covariant_lyapunov_vectors,
            cell,
            params,
            xs,
            carry,
            lengths,
            mask,
            time_axis,
            k=k,
            warmup=warmup,
            backward_warmup=backward_warmup,
            matrix_free=matrix_free,
            method=method,
            rank_tol=rank_tol,
            key=key,
            frame=frame,
        )
    if lengths is not None or mask is not None:
        raise ValueError(
            "covariant_lyapunov_vectors: padded data (lengths= or mask=) is not supported: the steps "
            "between the transients differ per sequence. Slice each sequence to its own length and "
            "call it per sequence."
        )
    xs = jnp.asarray(xs)
    xs_bm = _batch_major(xs, time_axis)
    if frame is not None:  # the dtype rule: a float64 frame promotes a float32 cell and inputs
        dtype = compute_dtype(params, xs_bm, carry, frame)
        params, xs_bm, carry = cast_floating((params, xs_bm, carry), dtype)
    params, xs_bm, carry, _ = promote(params, xs_bm, carry)
    T = xs_bm.shape[-2]
    S = state_size(cell, params)
    if frame is not None and k is None:
        k = int(np.shape(frame)[-1])
    k, warmup, backward_warmup = _check_clv_args(T, S, k, warmup, backward_warmup)
    if method == "analytic" and not matrix_free:
        _jacobian_fn(cell, params, method)  # raise outside jit when there is no closed form
    elif method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(_like(cell, params)))
    tol = _default_tol(dtype, S) if rank_tol is None else float(rank_tol)
    Q0, C0 = _starts(key, frame, S, k, dtype)
    v, g, e = _clv_core(
        cell,
        params,
        xs_bm,
        carry,
        Q0,
        C0,
        jnp.asarray(tol, dtype),
        method=method,
        matrix_free=bool(matrix_free),
        warmup=warmup,
        backward_warmup=backward_warmup,
    )
    return CovariantLyapunovVectors(v, g, e, warmup)


# --------------------------------------------------------------------------- angles


def _min_angle(V, m):
    """Smallest principal angle between ``span(V[:, :m])`` and ``span(V[:, m:])`` for one
    ``V (S, k)`` and a (traced) integer ``m``; NaN unless ``1 <= m <= k - 1``."""
    k = V.shape[-1]
    # V = Q1 R1 with R1 upper triangular: span(V[:, :m]) is span(e_1..e_m) in the coordinates
    # of Q1, and span(V[:, m:]) is span(R1[:, m:]), whose orthonormal basis is the first k - m
    # columns of the QR of R1 with its columns reversed. Masks keep m traced (one compile).
    _, R1 = jnp.linalg.qr(V)
    P, _ = jnp.linalg.qr(R1[:, ::-1])
    idx = jnp.arange(k)
    active = idx < k - m  # columns of P that span V[:, m:]
    W = jnp.where(active[None, :], P, jnp.zeros_like(P))
    top = jnp.where((idx < m)[:, None], W, jnp.zeros_like(W))  # the components inside span(e_1..e_m)
    rest = W - top  # the components outside it
    cos = jnp.linalg.svd(top, compute_uv=False)[0]
    # sin(theta_min) = the smallest singular value of `rest` over the active columns; the
    # inactive columns get singular value 2 (> 1 >= any sine) from rows appended below.
    pad = jnp.diag(jnp.where(active, 0.0, 2.0).astype(V.dtype))
    sin = jnp.linalg.svd(jnp.concatenate([rest, pad], axis=0), compute_uv=False)[-1]
    theta = jnp.arctan2(sin, cos)
    return jnp.where((m >= 1) & (m <= k - 1), theta, jnp.nan)


@jax.jit
def _angles_core(V, m):
    lead = V.shape[:-2]
    flat_V = V.reshape((-1,) + V.shape[-2:])
    flat_m = m.reshape(-1)
    return jax.vmap(_min_angle)(flat_V, flat_m).reshape(lead)


def clv_angles(
    clvs: CovariantLyapunovVectors | jax.Array,
    *,
    m: int | jax.Array | None = None,
) -> jax.Array:
    r"""The smallest angle between the unstable and the stable subspace, at every step.

    With ``E_u = span(v^1, ..., v^m)`` (the CLVs of the ``m`` largest exponents) and
    ``E_s = span(v^{m+1}, ..., v^k)``, the smallest principal angle

    ```text
    theta_t = min { angle(a, b) : a in E_u(t), b in E_s(t) }        (radians, in [0, pi/2])
    ```

    By default ``m`` is the number of positive exponents of each sequence, so the split is
    into expanding and contracting directions. A small ``theta_t`` is a near-tangency: there a
    perturbation of unit size can be the nearly cancelling difference of components of size
    about ``1/sin(theta_t)`` along ``E_u`` and ``E_s``; the ``E_s`` part decays, the ``E_u`` part is
    left and grows, and the perturbation is amplified by up to that factor beyond what the
    exponents say. This is the transient growth of non-normal dynamics, and for a recurrent
    network it marks the steps at which perturbations can align and gradients blow up (a
    uniformly hyperbolic system keeps ``theta_t`` away from 0). For a constant map it is the
    angle between the eigenspaces.

    Computed stably for small angles: the cosine is the largest singular value of the
    projection of an orthonormal basis of ``E_s`` onto ``E_u``, the sine the smallest singular
    value of its rejection, and ``theta = arctan2(sin, cos)``, so both ends of ``[0, pi/2]``
    keep full relative accuracy.

    Args:
      clvs: a ``CovariantLyapunovVectors`` (``vectors (*batch, T', S, k)``), or an array of
        vectors ``(..., S, k)`` (columns in the order of decreasing exponents).
      m: dimension of the unstable subspace: an int, or an integer array broadcastable to the
        batch shape ``(*batch,)`` (``(...)`` for an array of vectors; with a
        ``CovariantLyapunovVectors`` it is broadcast over ``T'`` too). Default: the number of
        positive ``clvs.exponents`` per sequence (required for an array).

    Returns:
      ``(*batch, T')`` angles in radians (``(...)`` for an array); NaN where ``m`` is 0 or
      ``k`` (one subspace is empty: e.g. no positive exponent).

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> P = jnp.array([[1.0, 1.0], [0.0, 1.0]])          # eigenvectors 45 degrees apart
      >>> A = P @ jnp.diag(jnp.array([2.0, 0.5])) @ jnp.linalg.inv(P)
      >>> clv = seqjax.spectrum.clvs_from_jacobians(
      ...     jnp.broadcast_to(A, (60, 2, 2)), warmup=20, backward_warmup=20)
      >>> theta = seqjax.spectrum.clv_angles(clv)          # m = 1: one positive exponent
      >>> bool(jnp.allclose(theta, jnp.pi / 4, atol=1e-5))
      True
    """
    if isinstance(clvs, CovariantLyapunovVectors):
        V = clvs.vectors
        if m is None:
            m = jnp.sum(clvs.exponents > 0, axis=-1)  # (*batch,)
        m = jnp.asarray(m)
        if m.ndim:  # (*batch,) -> (*batch, 1): broadcast over T'
            m = m[..., None]
    else:
        V = jnp.asarray(clvs)
        if V.ndim < 2:
            raise ValueError(f"vectors must be (..., S, k), got shape {tuple(V.shape)}.")
        if m is None:
            raise ValueError(
                "clv_angles: m (the dimension of the unstable subspace) is required for an array of "
                "vectors; a CovariantLyapunovVectors defaults it to the number of positive exponents."
            )
        m = jnp.asarray(m)
    if not jnp.issubdtype(m.dtype, jnp.integer):
        raise ValueError(f"m must be an integer or an integer array, got dtype {m.dtype}.")
    if not jnp.issubdtype(V.dtype, jnp.floating):
        V = V.astype(jnp.result_type(float))
    lead = tuple(V.shape[:-2])
    try:
        shape = tuple(jnp.broadcast_shapes(m.shape, lead))
    except ValueError:
        shape = None
    if shape != lead:
        raise ValueError(
            f"m has shape {tuple(m.shape)}, which does not broadcast to the batch shape {tuple(lead)}."
        )
    return _angles_core(V, jnp.broadcast_to(m, lead).astype(jnp.int32))  # one compilation per V shape
