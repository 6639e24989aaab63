"""The one-call gradient-flow report (Pascanu, Mikolov & Bengio 2013): step-Jacobian norms
against the bound ``sigma_max(W_h) gamma``, the lag curve, its growth rate, the largest
Lyapunov exponent and the memory horizon, in a printable ``GradientFlowReport``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.cells import Cell
from seqjax.spectrum.jacobians import step_jacobians
from seqjax.spectrum.lyapunov import lyapunov_from_jacobians
from seqjax.spectrum.products import lag_log_norms

__all__ = [
    "gradient_flow_report",
    "GradientFlowReport",
]


def _recurrent_bound(cell, params):
    """``(sigma_max, gamma)`` from the cell's ``jacobian_bound`` capability (``None`` when absent)."""
    if cell.jacobian_bound is None:
        return None, None
    return cell.jacobian_bound(params)


@dataclasses.dataclass(frozen=True)
class GradientFlowReport:
    r"""Gradient propagation of a recurrent network in the terms of Pascanu, Mikolov & Bengio (2013).

    For ``h_t = f(x_t W_x + h_{t-1} W_h + b)`` with ``|f'| <= gamma``:
    ``||J_t|| <= ||W_h|| gamma``, so ``sigma_max(W_h) < 1/gamma`` is *sufficient* for
    gradients to vanish (``||ds_T/ds_k|| <= (sigma_max gamma)^(T-k)``) and
    ``sigma_max(W_h) > 1/gamma`` is *necessary* for them to explode.

    Attributes (floats unless noted; logs natural, rates per step):
      cell: the cell's label (``Cell.label``), for display.
      state_size: ``S``.
      steps: ``T``.
      sigma_max: largest singular value of the recurrent matrix (from the cell's
        ``jacobian_bound`` capability; ``None`` for a cell without one, e.g. gated cells,
        whose Jacobians have no bound of this form).
      gamma: bound on ``|f'|`` (1 for tanh/ReLU, 1/4 for sigmoid; the ``gamma`` argument,
        else the capability's; ``None`` if unknown).
      critical: ``1/gamma``.
      step_bound: ``sigma_max * gamma``, the bound on every ``||J_t||``.
      step_norm_max, step_norm_mean: measured ``||J_t||_2`` over steps and sequences.
      lag_log_norms: ``(T,)``, mean over sequences of ``log ||ds_T/ds_{T-L}||``, ``L = 1..T``.
      growth_rate: least-squares slope of ``lag_log_norms`` against ``L``.
      bound_rate: ``log(step_bound)``, the slope the bound allows.
      lyapunov_max: mean over sequences of the largest Lyapunov exponent.
      tol: the tolerance of the memory horizon.
      memory_horizon: first lag with ``||ds_T/ds_{T-L}|| < tol`` (``None`` if not reached).
      horizon_estimate: ``log(tol) / growth_rate`` when the rate is negative, else ``inf``.
      regime: ``"vanishing"``, ``"exploding"`` or ``"marginal"`` (from ``lyapunov_max``
        against ``+-margin``).
    """

    cell: str
    state_size: int
    steps: int
    sigma_max: float | None
    gamma: float | None
    critical: float | None
    step_bound: float | None
    step_norm_max: float
    step_norm_mean: float
    lag_log_norms: np.ndarray
    growth_rate: float
    bound_rate: float | None
    lyapunov_max: float
    tol: float
    memory_horizon: int | None
    horizon_estimate: float
    regime: str

    def __str__(self) -> str:
        def f(v, fmt="{:.4g}"):
            return "n/a" if v is None else fmt.format(v)

        lines = [
            "Gradient flow (Pascanu, Mikolov & Bengio 2013): "
            f"cell={self.cell}, S={self.state_size}, T={self.steps}",
            f"  sigma_max(W_h) = {f(self.sigma_max)}   gamma = {f(self.gamma)}"
            f"   1/gamma = {f(self.critical)}",
        ]
        if self.sigma_max is not None and self.critical is not None:
            if self.sigma_max < self.critical:
                cond = "sigma_max < 1/gamma: gradients provably vanish (sufficient condition)"
            else:
                cond = "sigma_max >= 1/gamma: exploding gradients possible (necessary condition met)"
            lines.append(f"  {cond}")
        lines += [
            f"  per-step bound ||J_t|| <= sigma_max*gamma = {f(self.step_bound)}"
            f"   measured: max {self.step_norm_max:.4g}, mean {self.step_norm_mean:.4g}",
            f"  growth rate of ||ds_T/ds_(T-L)||: measured {self.growth_rate:+.4g}/step, "
            f"bound {f(self.bound_rate, '{:+.4g}')}/step, "
            f"largest Lyapunov exponent {self.lyapunov_max:+.4g}/step",
            f"  memory horizon (||ds_T/ds_(T-L)|| < {self.tol:g}): observed {f(self.memory_horizon, '{}')}, "
            f"estimated {self.horizon_estimate:.4g} steps",
            f"  regime: {self.regime}",
        ]
        return "\n".join(lines)

    def plot(self, *, ax=None, **kwargs):
        """Gradient norm against lag, with the bound (``seqjax.plot.plot_gradient_flow``)."""
        from seqjax import plot

        return plot.plot_gradient_flow(self, ax=ax, **kwargs)


def gradient_flow_report(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    *,
    carry: Any = None,
    gamma: float | None = None,
    tol: float = 1e-3,
    margin: float = 1e-3,
    time_axis: int = -2,
) -> GradientFlowReport:
    r"""One-call report on vanishing/exploding gradients of ``cell`` driven by ``xs``.

    Computes the step Jacobians along the trajectories, the lag curve
    ``log ||ds_T/ds_{T-L}||`` (``lag_log_norms``), its growth rate (least-squares slope), the
    largest Lyapunov exponent (``lyapunov_from_jacobians``, ``k=1``), the per-step bound
    ``||J_t|| <= sigma_max(W_h) gamma`` and the memory horizon. Memory ``O(B T S^2)``: meant
    for small and medium ``S``.

    Args:
      cell: any ``Cell`` (the bound ``||J_t|| <= sigma_max gamma`` needs the cell's
        ``jacobian_bound`` capability, which the Elman cells carry).
      params: its params.
      xs: ``(*batch, T, I)``.
      carry: initial carry.
      gamma: bound on ``|f'|``; default the one the cell's ``jacobian_bound`` gives (for an
        Elman cell with a callable activation, give it here).
      tol: gradient-norm tolerance defining the memory horizon.
      margin: ``|lyapunov_max| <= margin`` is called ``"marginal"``.
      time_axis: time axis of ``xs``.

    Returns:
      ``GradientFlowReport`` (``print`` it; ``.plot()`` it).

    Reference: Pascanu, Mikolov & Bengio, ICML 2013, sections 2-3.
    """
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}.")
    sj = step_jacobians(cell, params, xs, carry=carry, time_axis=time_axis)
    J = sj.jacobians
    T, S = J.shape[-3], J.shape[-1]
    if T < 2:
        raise ValueError(f"gradient_flow_report needs at least 2 time steps in xs, got T={T}.")
    sigma, g_default = _recurrent_bound(cell, params)
    gamma = g_default if gamma is None else float(gamma)
    sigma = None if sigma is None else float(sigma)
    critical = None if gamma in (None, 0) else 1.0 / gamma
    bound = None if (sigma is None or gamma is None) else sigma * gamma
    norms = np.asarray(jnp.linalg.norm(J, ord=2, axis=(-2, -1)))
    lag = np.asarray(lag_log_norms(J)).reshape(-1, T)
    finite = np.all(np.isfinite(lag), axis=0)
    curve = np.where(finite, np.mean(np.where(np.isfinite(lag), lag, 0.0), axis=0), -np.inf)
    L = np.arange(1, T + 1, dtype=np.float64)
    ok = np.isfinite(curve)
    if ok.sum() >= 2:
        rate = float(np.polyfit(L[ok], curve[ok], 1)[0])
    else:
        rate = -np.inf
    lyap = float(np.mean(np.asarray(lyapunov_from_jacobians(J, k=1, window=T).exponents)))
    below = np.nonzero(curve < math.log(tol))[0]
    horizon = int(below[0] + 1) if below.size else None
    est = math.log(tol) / rate if rate < 0 else math.inf
    regime = "marginal" if abs(lyap) <= margin else ("vanishing" if lyap < 0 else "exploding")
    return GradientFlowReport(
        cell=cell.label,
        state_size=S,
        steps=T,
        sigma_max=sigma,
        gamma=gamma,
        critical=critical,
        step_bound=bound,
        step_norm_max=float(norms.max()),
        step_norm_mean=float(norms.mean()),
        lag_log_norms=curve,
        growth_rate=rate,
        bound_rate=None if not bound else math.log(bound),
        lyapunov_max=lyap,
        tol=float(tol),
        memory_horizon=horizon,
        horizon_estimate=est,
        regime=regime,
    )
