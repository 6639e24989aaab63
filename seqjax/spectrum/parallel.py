r"""When parallel-in-time evaluation pays: predicting DEER's iterations from the Lyapunov exponent.

The parallel solvers (``seqjax.solvers.DEER``, ``QuasiDEER``) find the carries
``s_1..s_T`` as the root of the stacked residual ``r_t = s_t - F_t(s_{t-1})`` by Newton
(or quasi-Newton) steps. Gonzalez et al. (2025) showed that the conditioning of that
problem is set by the largest Lyapunov exponent ``lambda_max`` of the trajectory: the
inverse of the residual's Jacobian is built from the products ``J_t ... J_{tau+1}``,
which for a predictable (contracting, ``lambda_max < 0``) system are summable, so the
problem is well conditioned at every ``T`` and the solvers converge in few iterations
(``O((log T)^2)`` parallel time); for a chaotic one (``lambda_max > 0``) the conditioning
degrades like ``exp(lambda_max T)`` and parallel evaluation does not pay.

``parallel_convergence`` turns that into numbers for one cell, params and inputs: the
verdict, predicted iteration counts for DEER and quasi-DEER, and whether DEER's first
undamped step overflows. ``ParallelPrediction`` holds them (a pytree).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._util import promote
from seqjax.cells import Cell
from seqjax.solvers import default_tol
from seqjax.spectrum.jacobians import _batch_major, _trajectory
from seqjax.spectrum.lyapunov import lyapunov_spectrum
from seqjax.spectrum.state import _flat_step, _like, _vmap_lead

__all__ = ["parallel_convergence", "ParallelPrediction"]

_FIELDS = [
    "lambda_max",
    "lambda_stderr",
    "memory",
    "quasi_rate",
    "initial_error",
    "curvature",
    "guess_growth",
    "guess_growth_diag",
    "deer_iterations",
    "quasi_deer_iterations",
    "deer_overflows",
    "quasi_deer_overflows",
]


@functools.partial(jax.tree_util.register_dataclass, data_fields=_FIELDS, meta_fields=["T", "tol", "dtype"])
@dataclasses.dataclass(frozen=True)
class ParallelPrediction:
    r"""What ``parallel_convergence`` predicts, per sequence; a pytree (``T``, ``tol`` and
    ``dtype`` are static), so it passes through ``jit`` and ``vmap``.

    Attributes:
      lambda_max: ``(*batch,)``, the largest Lyapunov exponent of the trajectory (per step,
        natural log; ``seqjax.spectrum.lyapunov_spectrum`` with ``k=1``).
      lambda_stderr: ``(*batch,)``, its standard error (from the windows).
      memory: ``(*batch,)``, ``M = 1 / (1 - exp(lambda_max))``: the steps a perturbation
        is remembered, the bound ``sum_n exp(lambda_max n)`` on the inverse of the
        residual's Jacobian; ``inf`` where ``lambda_max >= 0``.
      quasi_rate: ``(*batch,)``, ``q``: the factor by which one quasi-DEER iteration shrinks
        its (linearised) error, measured by power iteration.
      initial_error: ``(*batch,)``, ``eps_0 = max_{t,i} |s_t - g|``, the distance of the
        solvers' default guess ``g`` (the initial carry at every step) from the solution.
      curvature: ``(*batch,)``, ``gamma``: the secant curvature of the step between the guess
        and the solution, ``2 |R_t| / |s_{t-1} - g|^2`` with ``R_t`` the first-order Taylor
        remainder (max norms), averaged over the steps an error is remembered for and
        maximised over ``t`` (``0`` for a step linear in its state).
      guess_growth: ``(*batch,)``, the largest log amplification ``log ||J_t ... J_{tau+1}||``
        over windows ``tau < t`` of the step Jacobians at the guess: the log of how much
        DEER's first (undamped) step can grow.
      guess_growth_diag: ``(*batch,)``, the same for ``diag(J_t)`` (quasi-DEER's first step).
      deer_iterations: int32 ``(*batch,)``, predicted DEER iterations (at most ``T``).
      quasi_deer_iterations: int32 ``(*batch,)``, predicted quasi-DEER iterations (at most ``T``).
      deer_overflows: bool ``(*batch,)``, ``guess_growth`` exceeds the log of the dtype's
        largest finite number: DEER's first step overflows (the solver stops with
        ``nonfinite``) even where the dynamics contract; use ``ELK`` or ``QuasiDEER``.
      quasi_deer_overflows: bool ``(*batch,)``, the same for quasi-DEER.
      T: the sequence length.
      tol: the relative residual tolerance the counts are for.
      dtype: the compute dtype's name.
    """

    lambda_max: jax.Array
    lambda_stderr: jax.Array
    memory: jax.Array
    quasi_rate: jax.Array
    initial_error: jax.Array
    curvature: jax.Array
    guess_growth: jax.Array
    guess_growth_diag: jax.Array
    deer_iterations: jax.Array
    quasi_deer_iterations: jax.Array
    deer_overflows: jax.Array
    quasi_deer_overflows: jax.Array
    T: int
    tol: float
    dtype: str

    @property
    def parallelizes(self) -> jax.Array:
        """bool ``(*batch,)``: ``lambda_max < 0`` (predictable: the parallel solvers converge
        in few iterations)."""
        return self.lambda_max < 0

    @property
    def verdict(self) -> np.ndarray:
        """Per sequence (a NumPy array of strings, shape ``(*batch,)``): ``"converges"``
        (``lambda_max < 0`` by more than two standard errors), ``"will not parallelise"``
        (``lambda_max > 0`` by more than two standard errors: iterations of order ``T``, or
        an overflowing undamped step), or ``"marginal"`` (``lambda_max`` within two standard
        errors of ``0``: the iteration counts are long and the sign is uncertain)."""
        lam = np.asarray(self.lambda_max, np.float64)
        err = np.asarray(self.lambda_stderr, np.float64)
        err = np.where(np.isfinite(err), err, 0.0)
        out = np.where(
            lam < -2 * err, "converges", np.where(lam > 2 * err, "will not parallelise", "marginal")
        )
        return out.astype(object) if out.ndim else np.asarray(str(out), dtype=object)

    def __str__(self) -> str:
        lam = np.asarray(self.lambda_max, np.float64).reshape(-1)
        err = np.asarray(self.lambda_stderr, np.float64).reshape(-1)
        mem = np.asarray(self.memory, np.float64).reshape(-1)
        kd = np.asarray(self.deer_iterations).reshape(-1)
        kq = np.asarray(self.quasi_deer_iterations).reshape(-1)
        od = np.asarray(self.deer_overflows).reshape(-1)
        oq = np.asarray(self.quasi_deer_overflows).reshape(-1)
        verdict = np.asarray(self.verdict).reshape(-1)
        lines = [f"Parallel-in-time prediction (T={self.T}, tol={self.tol:.1e}, {self.dtype})"]
        for i in range(lam.size):
            d = "overflows" if od[i] else f"~{kd[i]} iterations"
            q = "overflows" if oq[i] else f"~{kq[i]} iterations"
            lines.append(
                f"  lambda_max {lam[i]:+.4f}±{err[i]:.1e} (memory {mem[i]:.3g} steps): {verdict[i]}; "
                f"DEER {d}, QuasiDEER {q}"
            )
        return "\n".join(lines)


def _diagonal_fn(cell: Cell, params: Any, like: Any):
    """``(s, x) -> diag(J)`` on unbatched flat states, from the cell's capabilities or ``jacfwd``."""
    from seqjax.spectrum.state import unflatten_state

    if cell.jacobian_diagonal is not None:
        cap = cell.jacobian_diagonal
        return lambda s, x: jnp.asarray(cap(params, unflatten_state(s, like), x), s.dtype)
    if cell.jacobian is not None:
        cap = cell.jacobian
        return lambda s, x: jnp.diagonal(jnp.asarray(cap(params, unflatten_state(s, like), x), s.dtype))
    f = _flat_step(cell, params, like)
    return lambda s, x: jnp.diagonal(jax.jacfwd(f)(s, x))


def _diag_scan(D: jax.Array, b: jax.Array) -> jax.Array:
    """``u_t = D_t * u_{t-1} + b_t`` (``u_0 = 0``) along axis ``-2`` of ``(*batch, T, S)``
    arrays (a sequential scan: this is measurement, not the solver)."""

    def body(u, db):
        d, bb = db
        u = d * u + bb
        return u, u

    Dt, bt = jnp.moveaxis(D, -2, 0), jnp.moveaxis(b, -2, 0)
    _, u = jax.lax.scan(body, jnp.zeros_like(bt[0]), (Dt, bt))
    return jnp.moveaxis(u, 0, -2)


def _shift(E: jax.Array) -> jax.Array:
    """``E_{t-1}`` for ``t = 1..T`` along axis ``-2`` (zero first)."""
    return jnp.concatenate([jnp.zeros_like(E[..., :1, :]), E[..., :-1, :]], axis=-2)


def _rms(E: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(E * E, axis=(-2, -1)))


@functools.partial(jax.jit, static_argnames=("cell", "power_steps"))
def _probe(cell, params, xs_bm, carry, key, *, power_steps):
    """Measured quantities of the trajectories (batch-major ``xs_bm: (*batch, T, I)``):
    ``(eps0, gamma_t, scale, quasi_rate, growth, growth_diag)``."""
    prev, states = _trajectory(cell, params, xs_bm, carry)  # (*batch, T, S)
    like = _like(cell, params)
    f = _flat_step(cell, params, like)
    diag = _diagonal_fn(cell, params, like)
    g = prev[..., :1, :]  # the default guess: the initial carry at every step
    gb = jnp.broadcast_to(g, prev.shape)
    nlead = xs_bm.ndim - 1
    k_grow, k_rate = jax.random.split(key)

    # Secant curvature between the guess and the solution, per step.
    def remainders(sp, x, gg):
        e = sp - gg
        Fg, Jg_e = jax.jvp(lambda s: f(s, x), (gg,), (e,))
        Fs, Js_e = jax.jvp(lambda s: f(s, x), (sp,), (e,))
        r_guess = jnp.max(jnp.abs(Fs - Fg - Jg_e))  # Taylor at the guess
        r_sol = jnp.max(jnp.abs(Fg - Fs + Js_e))  # Taylor at the solution
        return jnp.maximum(r_guess, r_sol), jnp.max(jnp.abs(e))

    R, E = _vmap_lead(remainders, nlead)(prev, xs_bm, gb)  # (*batch, T)
    tiny = jnp.finfo(prev.dtype).tiny ** 0.25
    ok = E > tiny
    gamma_t = jnp.where(ok, 2.0 * R / jnp.where(ok, E * E, 1.0), 0.0)
    eps0 = jnp.max(jnp.abs(states - g), axis=(-2, -1))
    scale = jnp.maximum(1.0, jnp.max(jnp.abs(states), axis=(-2, -1)))

    # The rate at which the diagonal (quasi-Newton) iteration forgets its errors: power
    # iteration on its linearised error map E -> u, u_t = D_t u_{t-1} + (J_t - D_t) E_{t-1}
    # (Jacobians at the solution), RMS norms over the sequence.
    D_sol = _vmap_lead(diag, nlead)(prev, xs_bm)
    jvp_sol = _vmap_lead(lambda s, x, e: jax.jvp(lambda v: f(v, x), (s,), (e,))[1], nlead)

    def error_map(E):
        Es = _shift(E)
        return _diag_scan(D_sol, jvp_sol(prev, xs_bm, Es) - D_sol * Es)

    E0 = jax.random.normal(k_rate, prev.shape, prev.dtype)
    E0 = E0 / _rms(E0)[..., None, None]

    def power(E, _):
        U = error_map(E)
        n = _rms(U)
        safe = jnp.where(n > 0, n, 1.0)[..., None, None]
        return U / safe, jnp.log(jnp.where(n > 0, n, 0.0))

    _, logs_q = jax.lax.scan(power, E0, None, length=power_steps)
    quasi_rate = jnp.exp(jnp.mean(logs_q[power_steps // 2 :], axis=0))

    # Growth of the linearisations at the guess: a unit vector pushed through J_t(g) (JVPs),
    # renormalised every step, and the diagonal D_t(g); the largest sum of consecutive log
    # growths (Kadane's running maximum) is the log amplification of the first step.
    v0 = jax.random.normal(k_grow, prev.shape[-1:], prev.dtype)
    v0 = v0 / jnp.linalg.norm(v0)

    def grow_one(g1, xs1):
        def body(st, x):
            v, run, best, run_d, best_d = st
            _, w = jax.jvp(lambda s: f(s, x), (g1,), (v,))
            n = jnp.linalg.norm(w)
            log_n = jnp.log(n)  # -inf for a zero product: no growth
            run = jnp.maximum(log_n, run + log_n)
            log_d = jnp.log(jnp.abs(diag(g1, x)))
            run_d = jnp.maximum(log_d, run_d + log_d)
            v = jnp.where(n > 0, w / jnp.where(n > 0, n, 1.0), v0)
            return (v, run, jnp.maximum(best, run), run_d, jnp.maximum(best_d, run_d)), None

        ninf = jnp.full((), -jnp.inf, prev.dtype)
        ninf_s = jnp.full(prev.shape[-1:], -jnp.inf, prev.dtype)
        st, _ = jax.lax.scan(body, (v0, ninf, ninf, ninf_s, ninf_s), xs1)
        return st[2], jnp.max(st[4])

    growth, growth_diag = _vmap_lead(grow_one, nlead - 1)(g[..., 0, :], xs_bm)
    return eps0, gamma_t, scale, quasi_rate, growth, growth_diag


def _remembered(gamma_t, rate):
    """``max_t sum_n (1 - r) r^n gamma_{t-n}`` for a rate ``r`` in ``[0, 1)``
    (``(*batch, T)`` -> ``(*batch,)``): the largest curvature averaged over the steps an
    error is remembered for (the plain maximum where ``r >= 1``)."""
    r = jnp.minimum(rate, 1.0)

    def body(acc, g):
        acc = r * acc + (1.0 - r) * g
        return acc, acc

    _, ema = jax.lax.scan(body, jnp.zeros_like(r), jnp.moveaxis(gamma_t, -1, 0))
    return jnp.where(rate < 1, jnp.max(ema, axis=0), jnp.max(gamma_t, axis=-1))


@functools.partial(jax.jit, static_argnames=("T", "tol", "linear"))
def _predict(lam, quasi_rate, eps0, gamma_t, scale, *, T, tol, linear):
    """``(memory, gamma, k_deer, k_quasi)`` from the measured quantities (see
    ``parallel_convergence``)."""
    contracting = lam < 0
    rho = jnp.exp(jnp.minimum(lam, 0.0))
    memory = jnp.where(contracting, 1.0 / -jnp.expm1(jnp.where(contracting, lam, -1.0)), jnp.inf)
    tol_abs = tol * scale
    done = eps0 <= tol_abs
    # DEER: errors are forgotten at the rate r = min(exp(lambda), q) outside the basin;
    # h = gamma eps / (2 (1 - r)) (Kantorovich's h with |J_r^{-1}| <= 1 / (1 - r)); linear
    # phase down to h = 1/2 at rate r, then h_{k+1} = h_k^2 down to h_tol.
    r = jnp.minimum(rho, quasi_rate)
    fast = contracting & (r < 1)
    neg = jnp.where(fast, -jnp.log(jnp.where(fast, r, 0.5)), 1.0)
    gamma = _remembered(gamma_t, jnp.where(fast, r, 1.0))
    mg = jnp.where(fast, 1.0 / (1.0 - jnp.where(fast, r, 0.0)), 1.0) * gamma
    h0 = mg * eps0 / 2
    k_lin = jnp.where(h0 > 0.5, jnp.ceil(jnp.log(2 * jnp.maximum(h0, 0.5)) / neg), 0.0)
    h_start = jnp.where(h0 > 0.5, h0 * jnp.exp(-neg * k_lin), h0)  # <= 1/2 after k_lin steps
    h_tol = mg * tol_abs / 2
    tiny = jnp.finfo(h0.dtype).tiny
    ratio = jnp.log(jnp.maximum(h_tol, tiny)) / jnp.log(jnp.where(h_start > 0, h_start, tiny))
    k_quad = jnp.maximum(1.0, jnp.ceil(jnp.log2(jnp.maximum(ratio, 1.0))))
    k_deer = jnp.where(fast, k_lin + k_quad, T)
    # Quasi-DEER: linear convergence at its measured rate q from eps_0 to tol.
    qok = contracting & (quasi_rate < 1)
    negq = jnp.where(qok, -jnp.log(jnp.where(qok, quasi_rate, 0.5)), 1.0)
    k_quasi = jnp.where(qok, jnp.ceil(jnp.log(jnp.maximum(eps0 / tol_abs, 1.0)) / negq), T)
    k_quasi = jnp.maximum(k_quasi, 1.0)
    k_deer = jnp.where(done, 0.0, jnp.minimum(k_deer, T))
    k_quasi = jnp.where(done, 0.0, jnp.minimum(k_quasi, T))
    if linear:  # the solvers take one exact scan of the cell's own A_t
        k_deer = k_quasi = jnp.where(done, 0.0, 1.0)
    return memory, gamma, k_deer.astype(jnp.int32), k_quasi.astype(jnp.int32)


def parallel_convergence(
    cell: Cell,
    params: Any,
    xs: Any,
    *,
    carry: Any = None,
    tol: float | None = None,
    warmup: int | None = None,
    window: int | None = None,
    time_axis: int = -2,
    key: jax.Array | None = None,
) -> ParallelPrediction:
    r"""Predict whether DEER and quasi-DEER converge on these sequences, and in how many iterations.

    Everything is measured along the sequential trajectory $s_t = F_t(s_{t-1})$: one
    ``trajectory``, one Lyapunov QR sweep with ``k = 1`` (matrix-free), a dozen power
    iterations of a diagonal linear recurrence, and a few batched evaluations of the step.
    That costs about as much as a few sequential runs: the prediction is a property of the
    params and of the input statistics, made once before deciding how to run many sequences.

    **Verdict** (Gonzalez et al. 2025). Newton's step solves
    $\Delta_t = J_t \Delta_{t-1} - r_t$, so the inverse of the residual's Jacobian maps $r$ to
    $\Delta_t = -\sum_{\tau \le t} J_t \cdots J_{\tau+1} r_\tau$. Along the trajectory the
    products grow like $e^{\lambda_{\max}(t - \tau)}$, so

    $$
    \|J_r^{-1}\| \lesssim M = \sum_{n \ge 0} e^{\lambda_{\max} n} = \frac{1}{1 - e^{\lambda_{\max}}}
    \qquad (\lambda_{\max} < 0),
    $$

    bounded at every $T$ (well conditioned: few iterations), while for $\lambda_{\max} > 0$
    it grows like $e^{\lambda_{\max} T}$: Newton still ends within $T$ iterations (after $k$
    of them the first $k$ carries are exact) but needs of order $T$, and undamped steps
    overflow. ``verdict``: ``"converges"``, ``"will not parallelise"``, or ``"marginal"``
    ($|\lambda_{\max}|$ within two standard errors of 0).

    **Quasi-DEER's iterations.** With $D_t = \operatorname{diag} J_t$ the error of iterate
    $k$ obeys, to first order, $e^{k+1}_t = D_t e^{k+1}_{t-1} + (J_t - D_t) e^k_{t-1}$: a
    linear map $E \mapsto \mathcal{Q} E$ of the whole error sequence. Its growth per
    application, $q$ (``quasi_rate``), is measured by power iteration (RMS norm over the
    sequence, Jacobians at the solution: one JVP per step and one diagonal scan per
    application). Convergence is linear at that rate:

    $$
    k_{\mathrm{quasi}} = \Big\lceil \frac{\ln(\varepsilon_0 / \mathrm{tol}_{\mathrm{abs}})}{-\ln q}
    \Big\rceil, \qquad \mathrm{tol}_{\mathrm{abs}} = \mathrm{tol} \cdot \max(1, \max_{t,i} |s_{t,i}|),
    $$

    at most $T$ (and $T$ where $q \ge 1$ or $\lambda_{\max} \ge 0$). For an Elman cell $q
    \approx e^{\lambda_{\max}}$ (the diagonal carries little of the dynamics: errors are
    forgotten at the trajectory's own rate); for a gated cell whose slowest direction is a
    leaky diagonal (the GRU's update gate) $q$ is much smaller, as that direction is solved
    exactly by the diagonal.

    **DEER's iterations** (contracting side). One Newton step maps the error to
    $e^{k+1} = J_r^{-1} R(e^k)$, with $R$ the remainder of the first-order Taylor expansion
    of the step, $|R_t| \le \tfrac{\gamma}{2} |e^k_{t-1}|^2$. Near the solution
    $|e^{k+1}| \le \tfrac{\beta \gamma}{2} |e^k|^2$, so $h_k = \beta \gamma |e^k| / 2$ obeys
    $h_{k+1} \le h_k^2$ (Newton–Kantorovich): once $h \le 1/2$ the error squares every
    iteration. Outside that basin the linearisation at the iterate is poor and a Newton step
    does no better than forgetting: it gains at least what a fixed-point sweep gains (errors
    shrink by $e^{\lambda_{\max}}$ per iteration) and what a diagonal step gains ($q$), so
    errors shrink by $r = \min(e^{\lambda_{\max}}, q)$ per iteration, and $\beta = 1 / (1 - r)$
    (the memory of the iteration). With $h_0 = \beta \gamma \varepsilon_0 / 2$,

    $$
    k_{\mathrm{DEER}} = \underbrace{\Big\lceil \frac{\ln (2 h_0)}{-\ln r}
    \Big\rceil_+}_{\text{linear phase}} + \underbrace{\Big\lceil \log_2
    \frac{\ln h_{\mathrm{tol}}}{\ln h_{k_1}} \Big\rceil}_{\text{quadratic phase}},
    \qquad h_{k_1} = h_0 r^{k_1} \le \tfrac12, \quad
    h_{\mathrm{tol}} = \tfrac{\beta \gamma}{2} \mathrm{tol}_{\mathrm{abs}},
    $$

    at least 1 and at most $T$ ($T$ where $\lambda_{\max} \ge 0$). The inputs are measured,
    not fitted: $\varepsilon_0 = \max_{t,i} |s_{t,i} - g_i|$ (``initial_error``; the solvers'
    default guess $g$ is the initial carry at every step) and $\gamma$ (``curvature``), the
    secant curvature $\gamma_t = 2 |R_t| / |s_{t-1} - g|^2$ of the step between the guess
    and the solution (Taylor remainders both ways, max norms), averaged over the steps an
    error is remembered for ($\max_t \sum_n (1 - r) r^n \gamma_{t-n}$, as $J_r^{-1}$ sums
    them). No constant was tuned on measured iteration counts. The counts are typical values,
    not bounds: transient (non-normal) growth of the Jacobian products is ignored.

    **Overflow of the first step.** The first Newton step is linearised at the guess, not
    at the solution, and the products of the guess's Jacobians can grow although the
    trajectory contracts. ``guess_growth`` is the largest log amplification over windows,
    $\max_{\tau < t} \ln \|J_t(g) \cdots J_{\tau+1}(g)\|$ (a vector pushed through JVPs,
    renormalised each step); ``guess_growth_diag`` the same for the diagonal. Where it
    exceeds half the log of the dtype's largest number (44.4 in float32, 354.9 in float64:
    the solvers square the residual) the first step overflows and the solver stops
    (``Solution.nonfinite``): ``deer_overflows`` / ``quasi_deer_overflows``. Later iterates
    are not checked.

    A cell with the ``linear_recurrence`` capability is solved exactly in one scan by every
    solver: both counts are 1.

    **Where it misses.** Close to the edge of chaos ($\lambda_{\max} \approx -0.09$ in the
    benchmark ``python -m benchmarks.deer``) Newton's iterates can wander far from the
    solution (residuals well above the state's scale for many iterations) and converge only as
    the exact prefix advances, a few steps per iteration; the linear phase assumes the errors
    shrink, so DEER's count is then underestimated (measured 2 to 7 times the prediction).
    Elsewhere on the contracting side of that benchmark the DEER prediction is within a
    factor 1.6 of the measured count, and the overflow flag matched every row.

    Args:
      cell: a ``Cell``.
      params: its params.
      xs: inputs ``(*batch, T, I)`` (time at ``time_axis``); one prediction per sequence.
      carry: initial carry, leaves ``(*batch, ...)``; default ``cell.initial_carry``. It is
        also the solvers' default guess.
      tol: the solvers' relative tolerance; default ``seqjax.solvers.default_tol`` of the
        compute dtype (as the solvers use).
      warmup: steps dropped before the Lyapunov exponent is measured (default
        ``min(100, T // 10)``).
      window: the Lyapunov windows (default: ``lyapunov_spectrum``'s).
      time_axis: the time axis of ``xs``.
      key: PRNG key of the random initial vectors (default ``jax.random.key(0)``).

    Returns:
      ``ParallelPrediction``, every field ``(*batch,)``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.rnn(16)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> w = jax.random.orthogonal(jax.random.key(1), 16)          # W_h = gain * orthogonal
      >>> xs = jax.random.normal(jax.random.key(2), (200, 2))
      >>> calm = seqjax.spectrum.parallel_convergence(cell, dict(params, w_h=0.5 * w), xs)
      >>> wild = seqjax.spectrum.parallel_convergence(cell, dict(params, w_h=3.0 * w), xs)
      >>> print(calm.verdict, wild.verdict)
      converges will not parallelise
      >>> print(int(calm.deer_iterations), int(wild.deer_iterations))   # at most T = 200
      4 200
      >>> from seqjax.solvers import DEER
      >>> from seqjax.unroll import solve                            # the measured count
      >>> int(solve(cell, dict(params, w_h=0.5 * w), xs, DEER()).iterations)
      3

    References:
      Gonzalez, Kozachkov, Zoltowski, Clarkson & Linderman, "Predictability enables
      parallelization of nonlinear state space models", NeurIPS 2025. Lim et al.,
      "Parallelizing non-linear sequential models over the sequence length", ICLR 2024.
      Kantorovich & Akilov, "Functional analysis" (Newton's method).
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"parallel_convergence takes a seqjax Cell, got {type(cell).__name__}.")
    xs = jnp.asarray(xs)
    xs_bm = _batch_major(xs, time_axis)
    params, xs_bm, carry, _ = promote(params, xs_bm, carry)
    T = int(xs_bm.shape[-2])
    if T < 2:
        raise ValueError(f"xs must hold at least 2 steps to predict a parallel solve, got T={T}.")
    batch = tuple(xs_bm.shape[:-2])
    c0 = cell.initial_carry(params, batch) if carry is None else carry
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(_like(cell, params)))
    dtype = jnp.result_type(dtype, *jax.tree_util.tree_leaves(c0))
    tol_v = default_tol(dtype) if tol is None else float(tol)
    if not np.isfinite(tol_v) or tol_v <= 0:
        raise ValueError(f"tol must be a positive float (or None), got {tol!r}.")
    if warmup is None:
        warmup = min(100, T // 10)
    key = jax.random.key(0) if key is None else key
    k1, k2 = jax.random.split(key)
    spec = lyapunov_spectrum(
        cell, params, xs_bm, carry=c0, k=1, warmup=int(warmup), window=window, matrix_free=True, key=k1
    )
    lam, err = spec.exponents[..., 0], spec.stderr[..., 0]
    steps = max(2, min(12, T // 4))
    eps0, gamma_t, scale, q, growth, growth_diag = _probe(cell, params, xs_bm, c0, k2, power_steps=steps)
    linear = cell.linear_recurrence is not None
    memory, gamma, k_deer, k_quasi = _predict(lam, q, eps0, gamma_t, scale, T=T, tol=tol_v, linear=linear)
    limit = 0.5 * float(np.log(np.finfo(np.dtype(dtype)).max))
    over = growth >= limit
    over_d = growth_diag >= limit
    if linear:
        over = over_d = jnp.zeros_like(over)
    return ParallelPrediction(
        lambda_max=lam,
        lambda_stderr=err,
        memory=memory,
        quasi_rate=q,
        initial_error=eps0,
        curvature=gamma,
        guess_growth=growth,
        guess_growth_diag=growth_diag,
        deer_iterations=k_deer,
        quasi_deer_iterations=k_quasi,
        deer_overflows=over,
        quasi_deer_overflows=over_d,
        T=T,
        tol=tol_v,
        dtype=np.dtype(dtype).name,
    )
