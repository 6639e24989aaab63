r"""The engine of the parallel-in-time solvers (``seqjax.solvers.DEER`` and its relatives).

A cell run over ``T`` steps is the root of the stacked residual

```text
r_t(s) = s_t - F_t(s_{t-1}),   t = 1..T,   s_0 = the initial carry (flattened, S numbers)
F_t(s) = m_t ? f(c_t, x_t) : c_t,   c_t = (resets_t ? s_0 : s)
```

(``m_t`` the mask: a held step keeps its carry; a reset step reads the initial carry). Its
Jacobian in the stacked state is block lower-bidiagonal with identity blocks on the
diagonal and ``-J_t`` below (``J_t = dF_t/ds_{t-1}``: ``I`` at a held step, ``0`` at a
reset), so it is always invertible and Newton's method has a unique root to find. Each
iteration linearises every step at the current guess ``s~`` and solves

```text
Delta_t = J_t Delta_{t-1} - r_t(s~),   Delta_0 = 0,   s <- s~ + Delta     (DEER)
```

by ``jax.lax.associative_scan`` (combine ``(A, b) o (A', b') = (A' A, A' b + b')``; dense
``J_t`` or its diagonal). The damped step (ELK) minimises
``sum_t |Delta_t - J_t Delta_{t-1} + r_t|^2 + lambda sum_t |Delta_t|^2``: the posterior mean
of a linear-Gaussian state-space model with unit process noise and observations
``y_t = 0`` of ``Delta_t`` with noise variance ``1/lambda``, computed by the parallel Kalman
filter and Rauch-Tung-Striebel smoother of Sarkka and Garcia-Fernandez (2021), both
associative scans. Everything here works on time-major arrays ``(T, *batch, ...)``; the
batch dimensions of the sequence are kept as they are, so ``cell.step`` sees the batch
shape the sequential scan gives it.

Imports nothing of seqjax but the bottom helpers: ``seqjax.solvers`` imports it and
``seqjax.unroll`` calls it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Plan", "Result", "run", "linear_scan", "kalman_step", "estimate_bytes"]


# --------------------------------------------------------------------------- configuration


class Plan(NamedTuple):
    """What one solve does, read off the solver and the cell (all static).

    Attributes:
      name: the solver's name, for messages.
      structure: ``"dense"`` (``J_t: (S, S)``) or ``"diag"`` (``(S,)``) in the iteration.
      damped: Levenberg-Marquardt (Kalman) steps instead of Newton steps.
      damping: the initial ``lambda``.
      adaptive: adapt ``lambda`` (accept a step only when ``sum r^2`` falls).
      tol: the relative residual tolerance.
      max_iter: the iteration cap.
      linear: use the cell's ``linear_recurrence`` (the exact ``J_t``) when it has one.
      memory_limit: bytes a dense solve may take (``None``: no limit).
    """

    name: str
    structure: str
    damped: bool
    damping: float
    adaptive: bool
    tol: float
    max_iter: int
    linear: bool
    memory_limit: int | None


class Result(NamedTuple):
    """What ``run`` returns, time-major: ``final`` (leaves ``(*batch, ...)``), ``ys``
    (``(T, *batch, O)``), ``carries`` (leaves ``(T, *batch, ...)``), ``gates`` or ``None``,
    ``iterations`` and ``converged`` and ``nonfinite`` (``(*batch,)``), ``residuals``
    (``(*batch, max_iter + 1)``)."""

    final: Any
    ys: Any
    carries: Any
    gates: Any
    iterations: jax.Array
    residuals: jax.Array
    converged: jax.Array
    nonfinite: jax.Array


# Adaptive damping: lambda shrinks by this factor after an accepted step, grows after a rejected one.
_SHRINK, _GROW = 1.0 / 3.0, 4.0
# Bytes per step and sequence of a dense solve, in units of S*S*itemsize: DEER holds the
# Jacobians, the scan's combined products and their copy in the loop; ELK adds the filter's
# three matrices per element, the smoother's gains and their combinations.
_DENSE_MATRICES = {False: 4, True: 10}


def estimate_bytes(T: int, batch: int, S: int, itemsize: int, damped: bool) -> int:
    """Peak bytes of a dense solve: ``k * batch * T * S^2 * itemsize`` (``k = 4`` undamped,
    ``10`` damped): the ``(S, S)`` matrices a step and sequence hold at once."""
    return int(_DENSE_MATRICES[bool(damped)] * batch * T * S * S * itemsize)


# --------------------------------------------------------------------------- the carry as a vector


class _Layout(NamedTuple):
    treedef: Any
    shapes: tuple  # each leaf's shape after the batch dimensions
    dtypes: tuple
    sizes: tuple


def _layout(carry0: Any, nbatch: int) -> _Layout:
    leaves, treedef = jax.tree_util.tree_flatten(carry0)
    shapes = tuple(tuple(a.shape[nbatch:]) for a in leaves)
    return _Layout(
        treedef,
        shapes,
        tuple(a.dtype for a in leaves),
        tuple(int(np.prod(s, dtype=np.int64)) for s in shapes),
    )


def _flatten(carry: Any, nlead: int, dtype) -> jax.Array:
    """Leaves ``(*lead, ...)`` -> ``(*lead, S)`` in tree-leaf order."""
    leaves = jax.tree_util.tree_leaves(carry)
    lead = tuple(leaves[0].shape[:nlead])
    return jnp.concatenate([jnp.reshape(a, lead + (-1,)).astype(dtype) for a in leaves], axis=-1)


def _unflatten(s: jax.Array, layout: _Layout) -> Any:
    """``(*lead, S)`` -> a carry with leaves ``(*lead, *shape)``."""
    lead = tuple(s.shape[:-1])
    out, start = [], 0
    for shape, dtype, n in zip(layout.shapes, layout.dtypes, layout.sizes):
        out.append(jnp.reshape(s[..., start : start + n], lead + shape).astype(dtype))
        start += n
    return jax.tree_util.tree_unflatten(layout.treedef, out)


def _vmap_lead(fn: Callable, nlead: int) -> Callable:
    for _ in range(nlead):
        fn = jax.vmap(fn)
    return fn


def _expand(flag: jax.Array, ndim: int) -> jax.Array:
    return flag.reshape(flag.shape + (1,) * (ndim - flag.ndim))


# --------------------------------------------------------------------------- linear scans


def linear_scan(A: jax.Array, b: jax.Array, *, dense: bool) -> jax.Array:
    """``u_t = A_t u_{t-1} + b_t`` for ``t = 1..T`` with ``u_0 = 0`` (``A_1`` is not read),
    by one ``jax.lax.associative_scan`` over the leading axis.

    Args:
      A: ``(T, *batch, S, S)`` when ``dense``, else ``(T, *batch, S)`` (a diagonal).
      b: ``(T, *batch, S)``.
      dense: which form ``A`` has.

    Returns:
      ``u: (T, *batch, S)``.
    """

    def combine(e1, e2):  # e1 comes first in time, e2 after it: u -> A2 (A1 u + b1) + b2
        A1, b1 = e1
        A2, b2 = e2
        if dense:
            return A2 @ A1, jnp.einsum("...ij,...j->...i", A2, b1) + b2
        return A2 * A1, A2 * b1 + b2

    A = A.at[0].set(jnp.zeros_like(A[0]))  # u_0 = 0: the first element is the constant b_1
    return jax.lax.associative_scan(combine, (A, b))[1]


def _mT(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, -1, -2)


def kalman_step(F: jax.Array, c: jax.Array, damping: jax.Array, *, dense: bool) -> jax.Array:
    r"""The Levenberg-Marquardt step of the stacked residual, as a parallel Kalman smoother.

    Minimises ``sum_t |x_t - F_t x_{t-1} - c_t|^2 + lambda sum_t |x_t|^2`` over
    ``x_1..x_T`` with ``x_0 = 0`` (``F_1`` is not read). With ``c_t = -r_t`` and ``F_t = J_t``
    this is ``(J_r^T J_r + lambda I) Delta = -J_r^T r`` for the residual ``r`` and its
    block-bidiagonal Jacobian ``J_r``. It is the posterior mean of ``x_t = F_t x_{t-1} + c_t
    + q_t``, ``q_t ~ N(0, I)``, observed as ``0 = x_t + e_t``, ``e_t ~ N(0, I / lambda)``:
    a parallel filter (associative scan over the elements ``(A, b, C, eta, J)`` of
    Sarkka and Garcia-Fernandez 2021) followed by a parallel smoother (a reverse affine scan
    ``x_t = E_t x_{t+1} + g_t``). Diagonal ``F`` keeps every matrix diagonal (elementwise).

    Args:
      F: ``(T, *batch, S, S)`` (dense) or ``(T, *batch, S)``.
      c: ``(T, *batch, S)``.
      damping: ``lambda > 0``, broadcastable to ``(*batch,)``.
      dense: which form ``F`` has.

    Returns:
      ``x: (T, *batch, S)``.
    """
    T, S = c.shape[0], c.shape[-1]
    lam = jnp.asarray(damping, c.dtype)
    lam = jnp.broadcast_to(lam, c.shape[1:-1])[None]  # (1, *batch)
    kappa = lam / (1.0 + lam)  # the gain of one step; 1 - kappa = 1 / (1 + lambda)
    rho = 1.0 / (1.0 + lam)
    F = F.at[0].set(jnp.zeros_like(F[0]))  # x_0 = 0 is known exactly
    eye = jnp.eye(S, dtype=c.dtype)
    if dense:
        rho_m, kappa_m, kappa_v, rho_v = (
            rho[..., None, None],
            kappa[..., None, None],
            kappa[..., None],
            rho[..., None],
        )
        A = rho_m * F
        b = rho_v * c
        C = rho_m * jnp.broadcast_to(eye, F.shape)
        eta = -kappa_v * jnp.einsum("...ji,...j->...i", F, c)
        Jinfo = kappa_m * (_mT(F) @ F)

        def combine(e1, e2):
            # With P = C1^{-1} + J2 (C1 is positive definite: every element adds process
            # noise; J2 is semi-definite): (I + C1 J2)^{-1} = P^{-1} C1^{-1} and
            # (I + J2 C1)^{-1} = C1^{-1} P^{-1}, so two Cholesky factorisations serve.
            A1, b1, C1, eta1, J1 = e1
            A2, b2, C2, eta2, J2 = e2
            c1 = jax.scipy.linalg.cho_factor(C1, lower=True)
            Ci = jax.scipy.linalg.cho_solve(c1, jnp.broadcast_to(eye, C1.shape))
            Pf = jax.scipy.linalg.cho_factor(0.5 * (Ci + _mT(Ci)) + J2, lower=True)
            Pi = jax.scipy.linalg.cho_solve(Pf, jnp.broadcast_to(eye, C1.shape))
            Pi = 0.5 * (Pi + _mT(Pi))  # = (I + C1 J2)^{-1} C1, the posterior covariance
            MA = Pi @ (Ci @ A1)  # (I + C1 J2)^{-1} A1
            mv = lambda a, v: jnp.einsum("...ij,...j->...i", a, v)  # noqa: E731
            A12 = A2 @ MA
            b12 = mv(A2, mv(Pi, mv(Ci, b1) + eta2)) + b2
            C12 = A2 @ Pi @ _mT(A2) + C2
            NiT = Ci @ Pi  # (I + J2 C1)^{-1}
            eta12 = mv(_mT(A1), mv(NiT, eta2 - mv(J2, b1))) + eta1
            J12 = _mT(A1) @ NiT @ J2 @ A1 + J1
            return A12, b12, 0.5 * (C12 + _mT(C12)), eta12, 0.5 * (J12 + _mT(J12))

        _, m, P, _, _ = jax.lax.associative_scan(combine, (A, b, C, eta, Jinfo))
        # Smoother gains E_t = P_t F_{t+1}^T (F_{t+1} P_t F_{t+1}^T + I)^{-1}, t < T; E_T = 0.
        Fn, cn = F[1:], c[1:]
        Pt = P[:-1]
        Sm = Fn @ Pt @ _mT(Fn) + jnp.broadcast_to(eye, Pt.shape)  # symmetric positive definite, as is Pt
        E = _mT(jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(Sm, lower=True), Fn @ Pt))
        g = m[:-1] - jnp.einsum("...ij,...j->...i", E, jnp.einsum("...ij,...j->...i", Fn, m[:-1]) + cn)
        E = jnp.concatenate([E, jnp.zeros((1,) + E.shape[1:], E.dtype)], axis=0)
    else:
        A = rho[..., None] * F
        b = rho[..., None] * c
        C = jnp.broadcast_to(rho[..., None], F.shape).astype(c.dtype)
        eta = -kappa[..., None] * F * c
        Jinfo = kappa[..., None] * F * F

        def combine(e1, e2):
            A1, b1, C1, eta1, J1 = e1
            A2, b2, C2, eta2, J2 = e2
            M = 1.0 + C1 * J2
            return (
                A2 * A1 / M,
                A2 * (b1 + C1 * eta2) / M + b2,
                A2 * A2 * C1 / M + C2,
                A1 * (eta2 - J2 * b1) / M + eta1,
                A1 * A1 * J2 / M + J1,
            )

        _, m, P, _, _ = jax.lax.associative_scan(combine, (A, b, C, eta, Jinfo))
        Fn, cn, Pt = F[1:], c[1:], P[:-1]
        E = Pt * Fn / (Fn * Fn * Pt + 1.0)
        g = m[:-1] - E * (Fn * m[:-1] + cn)
        E = jnp.concatenate([E, jnp.zeros((1,) + E.shape[1:], E.dtype)], axis=0)
    g = jnp.concatenate([g, m[-1:]], axis=0)
    # x_t = E_t x_{t+1} + g_t from t = T down: a forward scan over the reversed time axis.
    del T
    return jnp.flip(linear_scan(jnp.flip(E, 0), jnp.flip(g, 0), dense=dense), 0)


# --------------------------------------------------------------------------- the problem


class _Problem:
    """The stacked residual of one call: the cell, its params and the flags, time-major."""

    def __init__(self, cell, carry0, xs, mask, resets, plan: Plan):
        self.cell = cell
        self.plan = plan
        self.T = int(xs.shape[0])
        self.batch = tuple(xs.shape[1:-1])
        self.nb = len(self.batch)
        self.layout = _layout(carry0, self.nb)
        self.S = int(sum(self.layout.sizes))
        self.dtype = jnp.result_type(*jax.tree_util.tree_leaves(carry0))
        self.mask = mask  # (T, *batch) bool or None
        self.resets = resets

    def with_flags_arrays(self, mask, resets) -> _Problem:
        """The same problem with these flag arrays (``None`` for none)."""
        new = copy.copy(self)
        new.mask, new.resets = mask, resets
        return new

    # ---- the step on every time step at once (the batch shape the sequential scan uses)
    def step_all(self, params, c_in, xs):
        """``(f, y)``: ``cell.step`` at every ``(c_in[t], xs[t])``; ``f: (T, *batch, S)``."""

        def one(c, x):
            carry, y = self.cell.step(params, _unflatten(c, self.layout), x)
            return _flatten(carry, self.nb, self.dtype), y

        return jax.vmap(one)(c_in, xs)

    def carry_in(self, s_prev, s0):
        if self.resets is None:
            return s_prev
        return jnp.where(_expand(self.resets, s_prev.ndim), s0[None], s_prev)

    def F(self, params, s_prev, xs, s0):
        """``F_t(s_{t-1})`` for every ``t``: ``(T, *batch, S)``."""
        c_in = self.carry_in(s_prev, s0)
        f, _ = self.step_all(params, c_in, xs)
        if self.mask is not None:
            f = jnp.where(_expand(self.mask, f.ndim), f, c_in)
        return f

    # ---- Jacobians of the cell's step at every (t, sequence), from its capabilities
    def _cell_jacobian(self, params, c_in, xs, dense: bool):
        cell, nlead = self.cell, 1 + self.nb
        cap = cell.jacobian if dense else (cell.jacobian_diagonal or cell.jacobian)
        if cap is not None:

            def one(c, x):
                J = cap(params, _unflatten(c, self.layout), x)
                J = jnp.asarray(J, self.dtype)
                if not dense and J.ndim == 2:  # a dense capability, diagonal wanted
                    J = jnp.diagonal(J)
                return J

            return _vmap_lead(one, nlead)(c_in, xs)
        # No capability: S forward-mode passes of the batched step (one per basis vector,
        # the same for every t and sequence): exact, S times the cost of a step.
        f = lambda c: self.step_all(params, c, xs)[0]  # noqa: E731

        def column(e):
            return jax.jvp(f, (c_in,), (jnp.broadcast_to(e, c_in.shape),))[1]

        cols = jax.vmap(column, out_axes=-1)(jnp.eye(self.S, dtype=self.dtype))  # (..., S, S)
        return cols if dense else jnp.diagonal(cols, axis1=-2, axis2=-1)

    def with_flags(self, J, dense: bool):
        """``J_t`` of ``F_t``: the cell's at read steps, ``I`` at held ones, ``0`` at resets."""
        if self.mask is not None:
            one = jnp.broadcast_to(
                jnp.eye(self.S, dtype=J.dtype) if dense else jnp.ones((self.S,), J.dtype), J.shape
            )
            J = jnp.where(_expand(self.mask, J.ndim), J, one)
        if self.resets is not None:
            J = jnp.where(_expand(self.resets, J.ndim), jnp.zeros_like(J), J)
        return J

    def linear_A(self, params, xs):
        """``A_t`` of a cell's ``linear_recurrence`` at every ``(t, sequence)``, and whether dense."""
        lin = self.cell.linear_recurrence

        def one(x):
            return jnp.asarray(lin(params, x)[0], self.dtype)

        A = _vmap_lead(one, 1 + self.nb)(xs)
        return self.with_flags(A, A.ndim == 3 + self.nb)

    def linear_structure(self, params, xs) -> bool:
        """Whether the cell's ``linear_recurrence`` gives a dense ``A_t`` (checked: ``(S,)`` or
        ``(S, S)``), from shapes alone."""
        x1 = jax.ShapeDtypeStruct(xs.shape[1 + self.nb :], xs.dtype)
        A, b = jax.eval_shape(lambda p, x: self.cell.linear_recurrence(p, x), params, x1)
        S = self.S
        if tuple(A.shape) not in ((S,), (S, S)) or tuple(b.shape) != (S,):
            raise ValueError(
                f"linear_recurrence returned A_t of shape {tuple(A.shape)} and b_t of shape "
                f"{tuple(b.shape)}, but the carry flattens to S={S} numbers: A_t must be ({S},) or "
                f"({S}, {S}) and b_t ({S},)."
            )
        return len(A.shape) == 2


# --------------------------------------------------------------------------- Newton / LM loop


def _shift(s, s0):
    """``s_{t-1}`` for ``t = 1..T``: ``s0`` then ``s[:-1]``."""
    return jnp.concatenate([s0[None], s[:-1]], axis=0)


def _seq_max(a, nb):
    """Max over every axis but the batch axes ``1..nb`` of a ``(T, *batch, ...)`` array."""
    axes = (0,) + tuple(range(1 + nb, a.ndim))
    return jnp.max(a, axis=axes)


def _seq_all_finite(a, nb):
    axes = (0,) + tuple(range(1 + nb, a.ndim))
    return jnp.all(jnp.isfinite(a), axis=axes)


def _jacobians(prob: _Problem, params, s0, xs, s, A_lin, dense: bool):
    """``J_t`` of ``F_t`` at ``s_{t-1}`` for every ``t`` (``A_lin`` when the cell is linear)."""
    if A_lin is not None:
        return A_lin
    J = prob._cell_jacobian(params, prob.carry_in(_shift(s, s0), s0), xs, dense)
    return prob.with_flags(J, dense)


def _newton(prob: _Problem, params, s0, xs, guess, A_lin, dense: bool):
    """The iteration: ``(s, iterations, residuals, converged, nonfinite)``.

    The loop carries the iterate ``s`` and ``F(s)``; each iteration forms the Jacobians at
    ``s`` (traced once), takes the step and evaluates ``F`` at the candidate."""
    plan, nb = prob.plan, prob.nb
    tol = jnp.asarray(plan.tol, prob.dtype)
    damped = plan.damped and A_lin is None
    adaptive = damped and plan.adaptive

    def F_of(s):
        return prob.F(params, _shift(s, s0), xs, s0)

    def measure(s, Fv):
        r = s - Fv
        err = _seq_max(jnp.abs(r), nb)
        scale = jnp.maximum(1.0, _seq_max(jnp.abs(s), nb))
        return err, jnp.sum(r * r, axis=(0, *range(1 + nb, r.ndim))), err <= tol * scale

    seq = lambda flag, a: _expand(flag[None], a.ndim)  # noqa: E731  (*batch,) -> broadcast on (T, *batch, ...)

    Fv = F_of(guess)
    err, merit, conv = measure(guess, Fv)
    hist = jnp.zeros(prob.batch + (plan.max_iter + 1,), prob.dtype).at[..., 0].set(err)
    lam = jnp.full(prob.batch, plan.damping, prob.dtype)
    lam_max = jnp.asarray(1.0 / jnp.finfo(prob.dtype).eps, prob.dtype)  # steps of relative size eps
    zeros_b = jnp.zeros(prob.batch, bool)
    state = (0, guess, Fv, err, merit, lam, jnp.zeros(prob.batch, jnp.int32), conv, zeros_b, hist)

    def cond(st):
        k, *_, done, _, _ = st
        return (k < plan.max_iter) & jnp.logical_not(jnp.all(done))

    def body(st):
        k, s, Fv, err, merit, lam, iters, done, bad, hist = st
        active = jnp.logical_not(done)
        J = _jacobians(prob, params, s0, xs, s, A_lin, dense)
        if damped:
            delta = kalman_step(J, Fv - s, lam, dense=dense)
        else:
            delta = linear_scan(J, Fv - s, dense=dense)
        cand = s + delta
        Fc = F_of(cand)
        errc, meritc, _ = measure(cand, Fc)
        finite = _seq_all_finite(cand, nb) & _seq_all_finite(Fc, nb) & jnp.isfinite(meritc)
        if adaptive:
            # Levenberg-Marquardt: take the step only if sum r^2 falls (an overflowing step
            # does not), then trust the linearisation more; otherwise trust it less.
            improved = finite & (meritc < merit)
            accept = active & improved
            lam = jnp.where(
                active, jnp.where(improved, lam * _SHRINK, jnp.minimum(lam * _GROW, lam_max)), lam
            )
        else:
            accept = active & finite
            bad = bad | (active & jnp.logical_not(finite))
        s = jnp.where(seq(accept, s), cand, s)
        Fv = jnp.where(seq(accept, Fv), Fc, Fv)
        err = jnp.where(accept, errc, err)
        merit = jnp.where(accept, meritc, merit)
        iters = iters + active.astype(jnp.int32)
        hist = hist.at[..., k + 1].set(err)
        conv = measure(s, Fv)[2]
        done = done | conv | bad
        return (k + 1, s, Fv, err, merit, lam, iters, done, bad, hist)

    k, s, Fv, err, _, _, iters, _, bad, hist = jax.lax.while_loop(cond, body, state)
    past = jnp.broadcast_to(jnp.arange(plan.max_iter + 1) > k, hist.shape)
    hist = jnp.where(past, jnp.broadcast_to(err[..., None], hist.shape), hist)  # repeat the last value
    conv = measure(s, Fv)[2]
    return s, iters, hist, conv & jnp.logical_not(bad), bad


# --------------------------------------------------------------------------- the adjoint


def _adjoint(prob: _Problem, params, s0, xs, s, P, dense: bool, g):
    """Cotangents of ``(params, s0, xs)`` for a cotangent ``g`` of the solution ``s``.

    ``lambda_t = g_t + J_{t+1}^T lambda_{t+1}`` (``lambda_T = g_T``) is a linear recurrence
    backwards in time. It is solved by iterative refinement: a reverse associative scan with
    the preconditioner ``P_t`` (the Jacobians of the forward solve: exact and dense for DEER
    and ELK, their diagonal for the quasi variants), then corrections by the same scan
    applied to the exact residual ``g_t + J_{t+1}^T lambda_{t+1} - lambda_t``, whose
    ``J^T lambda`` term is one vector-Jacobian product of the batched step. With exact ``P``
    the first scan is the answer and one product confirms it; with a diagonal ``P`` after
    ``k`` rounds the last ``k`` steps are exact, so at most ``T`` rounds give the exact
    adjoint (the cap, reached only when the refinement does not converge sooner). Then the
    cotangents of everything the steps read come from one vector-Jacobian product of the
    step at ``lambda``, batched over time (weights as sums over time, as BPTT forms them).
    """
    plan, T = prob.plan, prob.T
    s_prev = _shift(s, s0)
    _, vjp = jax.vjp(lambda p, sp, x, z: prob.F(p, sp, x, z), params, s_prev, xs, s0)

    def JT_next(lam):  # (J_{t+1}^T lambda_{t+1})_t, zero at t = T
        sp_bar = vjp(lam)[1]
        return jnp.concatenate([sp_bar[1:], jnp.zeros_like(sp_bar[:1])], axis=0)

    # Preconditioner of the reverse recurrence, in time order: B_t = P_{t+1}^T, B_T = 0.
    B = _mT(P[1:]) if dense else P[1:]
    B = jnp.concatenate([B, jnp.zeros((1,) + B.shape[1:], B.dtype)], axis=0)
    Bf = jnp.flip(B, 0)

    def rscan(v):  # u_t = v_t + B_t u_{t+1}, u_{T+1} = 0: a forward scan over reversed time
        return jnp.flip(linear_scan(Bf, jnp.flip(v, 0), dense=dense), 0)

    tol = jnp.asarray(plan.tol, s.dtype)

    def cond(st):
        k, _, _, ok = st
        return (k < T) & jnp.logical_not(ok)

    def body(st):  # from lambda = 0 (residual g): the first pass is the preconditioned scan
        k, lam, res, _ = st
        lam = lam + rscan(res)
        res = g + JT_next(lam) - lam
        scale = jnp.maximum(1.0, jnp.max(jnp.abs(lam)))
        ok = jnp.all(jnp.isfinite(res)) & (jnp.max(jnp.abs(res)) <= tol * scale)
        return k + 1, lam, res, ok

    _, lam, _, _ = jax.lax.while_loop(cond, body, (0, jnp.zeros_like(g), g, jnp.asarray(False)))
    p_bar, sp_bar, x_bar, z_bar = vjp(lam)
    return p_bar, z_bar + sp_bar[0], x_bar


# --------------------------------------------------------------------------- run


def _solve_states(prob: _Problem, params, s0, xs, guess, dense: bool, linear: bool):
    """``(s, iterations, residuals, converged, nonfinite)`` with an adjoint ``custom_vjp``.

    The flags travel as arguments (without cotangents), so that nothing the rule reads is
    closed over."""

    @jax.custom_vjp
    def solve(params, s0, xs, guess, mask, resets):
        p = prob.with_flags_arrays(mask, resets)
        A = p.linear_A(params, xs) if linear else None
        return _newton(p, params, s0, xs, guess, A, dense)

    def fwd(params, s0, xs, guess, mask, resets):
        out = solve(params, s0, xs, guess, mask, resets)
        return out, (params, s0, xs, out[0], mask, resets)

    def bwd(res, cts):
        params, s0, xs, s, mask, resets = res
        p = prob.with_flags_arrays(mask, resets)
        A = p.linear_A(params, xs) if linear else None
        P = _jacobians(p, params, s0, xs, s, A, dense)  # at the solution
        p_bar, s0_bar, x_bar = _adjoint(p, params, s0, xs, s, P, dense, cts[0])
        return p_bar, s0_bar, x_bar, None, None, None

    solve.defvjp(fwd, bwd)
    s, *diagnostics = solve(params, s0, xs, guess, prob.mask, prob.resets)
    # The diagnostics carry no derivative: cut them here, so that a predicate built from them
    # (on_failure="sequential") is not differentiated.
    return (s, *(jax.lax.stop_gradient(d) for d in diagnostics))


def run(cell, params, carry0, xs, *, mask, resets, reverse: bool, plan: Plan, guess, gates: bool) -> Result:
    """Solve ``cell`` over time-major ``xs: (T, *batch, I)`` from ``carry0`` (leaves
    ``(*batch, ...)``) with the flags ``mask``/``resets`` (``(T, *batch)`` bool or ``None``),
    as the sequential scan of ``seqjax.unroll`` defines the result. ``guess``: ``None`` (the
    initial carry at every step) or the carries ``(T, *batch, S)`` flattened, in time order.

    Compiled as one function (the cell, the plan and the flags are static): an eager call
    compiles once per shape and is cached, instead of dispatching every operation; under an
    outer ``jit`` it is inlined."""
    flags = {"mask": mask, "resets": resets, "guess": guess}
    try:
        hash((cell, plan))
    except TypeError:  # a cell holding something unhashable: run it uncompiled (traced as called)
        return _run(cell, params, carry0, xs, reverse=reverse, plan=plan, gates=gates, **flags)
    return _run_jit(cell, params, carry0, xs, reverse=reverse, plan=plan, gates=gates, **flags)


def _run(cell, params, carry0, xs, *, mask, resets, reverse: bool, plan: Plan, guess, gates: bool) -> Result:
    if reverse:
        flip = lambda a: None if a is None else jnp.flip(a, 0)  # noqa: E731
        xs, mask, resets, guess = flip(xs), flip(mask), flip(resets), flip(guess)
    prob = _Problem(cell, carry0, xs, mask, resets, plan)
    linear = plan.linear and getattr(cell, "linear_recurrence", None) is not None
    dense = prob.linear_structure(params, xs) if linear else plan.structure == "dense"
    if dense and plan.memory_limit is not None:
        itemsize = jnp.dtype(prob.dtype).itemsize
        B = int(np.prod(prob.batch, dtype=np.int64))
        need = estimate_bytes(prob.T, B, prob.S, itemsize, plan.damped and not linear)
        if need > plan.memory_limit:
            raise ValueError(
                f"{plan.name}: a dense solve holds (S, S) Jacobians for every step and sequence, "
                f"about {need:,} bytes here (T={prob.T}, S={prob.S}, batch={B}, {itemsize}-byte "
                f"{jnp.dtype(prob.dtype).name}), above memory_limit={plan.memory_limit:,} bytes. "
                "Use the diagonal variant (QuasiDEER / QuasiELK: O(T S) memory), shorter sequences, "
                "or raise memory_limit (None: no limit)."
            )
    s0 = _flatten(carry0, prob.nb, prob.dtype)
    if guess is None:
        guess = jnp.broadcast_to(s0[None], (prob.T,) + s0.shape)
    guess = jax.lax.stop_gradient(jnp.asarray(guess, prob.dtype))
    guess = jnp.where(jnp.isfinite(guess), guess, jnp.zeros_like(guess))  # only a starting point
    s, iters, hist, conv, bad = _solve_states(prob, params, s0, xs, guess, dense, linear)

    # Outputs (and gates) from the solved carries: one batched step, differentiated as usual.
    c_in = prob.carry_in(_shift(s, s0), s0)
    _, ys = prob.step_all(params, c_in, xs)
    gs = None
    if gates:
        gs = jax.vmap(lambda c, x: cell.gates(params, _unflatten(c, prob.layout), x))(c_in, xs)
    if mask is not None:
        zero = lambda a: jnp.where(_expand(mask, a.ndim), a, jnp.zeros_like(a))  # noqa: E731
        ys = jax.tree_util.tree_map(zero, ys)
        gs = None if gs is None else jax.tree_util.tree_map(zero, gs)
    carries = _unflatten(s, prob.layout)
    final = _unflatten(s[-1], prob.layout)
    if reverse:
        back = lambda a: jnp.flip(a, 0)  # noqa: E731
        ys, carries = jax.tree_util.tree_map(back, ys), jax.tree_util.tree_map(back, carries)
        gs = None if gs is None else jax.tree_util.tree_map(back, gs)
    return Result(final, ys, carries, gs, iters, hist, conv, bad)


_run_jit = jax.jit(_run, static_argnames=("cell", "reverse", "plan", "gates"))


def state_size(carry0: Any, nbatch: int) -> int:
    """``S`` of a carry whose leaves are ``(*batch, ...)`` with ``nbatch`` batch axes."""
    return int(sum(_layout(carry0, nbatch).sizes))


def flatten_guess(carries: Any, nlead: int, dtype) -> jax.Array:
    """Carries with leaves ``(T, *batch, ...)`` -> ``(T, *batch, S)``."""
    return _flatten(carries, nlead, dtype)
