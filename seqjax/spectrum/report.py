r"""The one-call gradient-flow report (Pascanu, Mikolov & Bengio 2013): one estimator of the
growth rate of backpropagated gradients (the largest Lyapunov exponent, with its error bar),
the verdict it supports, the lag curve, the Pascanu bound where the cell has one, and the
per-gate recurrent spectra, in a printable ``GradientFlowReport``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np

from seqjax.cells import Cell
from seqjax.spectrum.jacobians import _batch_major, _step_jacobians_core
from seqjax.spectrum.lyapunov import _check_lyap_args, _from_jacobians_core, _initial_frame
from seqjax.spectrum.products import _lag_core
from seqjax.spectrum.state import _for_model, _mask_batch_major, _valid_steps, state_size

__all__ = [
    "gradient_flow_report",
    "GradientFlowReport",
]

VERDICTS = ("undetermined", "vanishing", "exploding", "neutral")
"""The verdicts, indexed by ``GradientFlowReport.verdict_code``."""

_DATA = [
    "sigma_max",
    "gamma",
    "gate_sigma_max",
    "gate_spectral_radius",
    "step_norm_max",
    "step_norm_mean",
    "lag_log_norms",
    "lyapunov_max",
    "lyapunov_stderr",
    "interval",
    "windows",
    "measured_steps",
    "memory_horizon_index",
    "verdict_code",
]
_META = ["cell", "state_size", "steps", "window", "tol", "margin", "confidence", "min_steps", "gate_names"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=_DATA, meta_fields=_META)
@dataclasses.dataclass(frozen=True)
class GradientFlowReport:
    r"""Gradient propagation of a recurrent network, judged by one estimator with its error bar.

    The estimator is the largest Lyapunov exponent ``lambda_1`` (per step, natural log): the
    asymptotic rate at which ``||ds_T/ds_{T-L}||`` grows with the lag ``L``. It is measured
    by the QR method over windows of ``window`` steps, pooled over every window of every
    sequence; its standard error comes from the spread of the window estimates, and the
    ``confidence`` interval uses Student's t with ``windows - 1`` degrees of freedom. The
    verdict is ``"vanishing"`` when the whole interval lies below ``-margin``,
    ``"exploding"`` when it lies above ``+margin``, ``"neutral"`` when it lies inside
    ``[-margin, +margin]`` (gradients change by less than a factor ``e`` over ``1/margin``
    steps: an orthogonal linear cell), and ``"undetermined"`` when it straddles ``±margin``,
    or when a sequence has fewer than ``min_steps`` measured steps or fewer than four windows
    exist: a short run cannot tell.

    For an Elman cell ``h_t = f(x_t W_x + h_{t-1} W_h + b)`` with ``|f'| <= gamma`` (its
    ``jacobian_bound`` capability): ``||J_t|| <= sigma_max(W_h) gamma``, so
    ``sigma_max(W_h) < 1/gamma`` is *sufficient* for gradients to vanish and
    ``sigma_max(W_h) > 1/gamma`` *necessary* for them to explode. Gated cells have no bound of
    that form; for them (and every cell with the ``recurrent_blocks`` capability) the report
    gives ``sigma_max`` and the spectral radius of each gate's ``(H, H)`` recurrent block.

    A pytree (the ``cell`` label and the sizes and settings are static), so the report can be
    made inside ``jit``; printing it and ``regime`` need concrete values.

    Attributes (arrays unless noted; logs natural, rates per step):
      cell: the cell's label (``Cell.label``), a string.
      state_size: ``S`` (int).
      steps: ``T``, the time axis of the inputs (int).
      window: steps per window of the estimator (int).
      tol, margin, confidence, min_steps: the settings (floats and an int).
      gate_names: the recurrent blocks' names in the cell's order (a tuple; empty without them).
      sigma_max: ``sigma_max(W_h)`` from the cell's ``jacobian_bound``, or ``None``.
      gamma: the bound on ``|f'|`` (the ``gamma`` argument, else the capability's), or ``None``.
      gate_sigma_max, gate_spectral_radius: ``{gate: scalar}`` per recurrent block
        (``seqjax.spectrum.gate_spectra``), or ``None`` for a cell without the capability.
      step_norm_max, step_norm_mean: measured ``||J_t||_2`` over the steps read.
      lag_log_norms: ``(T + 1,)``, entry ``L``: the mean over sequences of
        ``log ||ds_{T_b}/ds_{T_b-L}||_2`` (lag ``L`` counted from each sequence's own last
        step ``T_b``; sequences shorter than ``L`` left out; NaN where none is that long).
      lyapunov_max: the estimate of ``lambda_1``.
      lyapunov_stderr: its standard error.
      interval: ``(2,)``, the ``confidence`` interval of ``lambda_1``.
      windows: how many windows the estimate pools.
      measured_steps: ``(*batch,)`` steps each sequence contributes.
      memory_horizon_index: first lag with ``lag_log_norms < log(tol)``, ``-1`` if none
        (see ``memory_horizon``).
      verdict_code: index into ``seqjax.spectrum.report.VERDICTS`` (see ``regime``).
    """

    cell: str
    state_size: int
    steps: int
    window: int
    tol: float
    margin: float
    confidence: float
    min_steps: int
    gate_names: tuple
    sigma_max: Any
    gamma: Any
    gate_sigma_max: Any
    gate_spectral_radius: Any
    step_norm_max: jax.Array
    step_norm_mean: jax.Array
    lag_log_norms: jax.Array
    lyapunov_max: jax.Array
    lyapunov_stderr: jax.Array
    interval: jax.Array
    windows: jax.Array
    measured_steps: jax.Array
    memory_horizon_index: jax.Array
    verdict_code: jax.Array

    @property
    def regime(self) -> str:
        """``"vanishing"``, ``"exploding"``, ``"neutral"`` or ``"undetermined"`` (needs a
        concrete report)."""
        return VERDICTS[int(self.verdict_code)]

    @property
    def critical(self) -> float | None:
        """``1/gamma``, the ``sigma_max`` at which the Pascanu bound reaches 1."""
        return None if self.gamma is None or float(self.gamma) == 0 else 1.0 / float(self.gamma)

    @property
    def step_bound(self) -> float | None:
        """``sigma_max * gamma``, the bound on every ``||J_t||_2`` (``None`` without one)."""
        if self.sigma_max is None or self.gamma is None:
            return None
        return float(self.sigma_max) * float(self.gamma)

    @property
    def bound_rate(self) -> float | None:
        """``log(sigma_max * gamma)``: the growth rate per step the bound allows."""
        b = self.step_bound
        return None if not b else math.log(b)

    @property
    def memory_horizon(self) -> int | None:
        """The first lag at which the mean gradient norm falls below ``tol``, or ``None``."""
        i = int(self.memory_horizon_index)
        return None if i < 0 else i

    @property
    def horizon_estimate(self) -> float:
        """``log(tol) / lambda_1`` steps when the verdict is ``"vanishing"``; ``inf`` when
        ``"exploding"`` or ``"neutral"``; NaN when undetermined (the data cannot tell)."""
        r = self.regime
        if r == "vanishing":
            return math.log(self.tol) / float(self.lyapunov_max)
        return math.inf if r in ("exploding", "neutral") else math.nan

    def __str__(self) -> str:
        def f(v, fmt="{:.4g}"):
            return "n/a" if v is None else fmt.format(float(v))

        lo, hi = (float(v) for v in np.asarray(self.interval))
        lines = [
            "Gradient flow (Pascanu, Mikolov & Bengio 2013): "
            f"cell={self.cell}, S={self.state_size}, T={self.steps}",
            f"  largest Lyapunov exponent: {float(self.lyapunov_max):+.4g}"
            f" ± {float(self.lyapunov_stderr):.2g}"
            f" per step ({self.confidence:.0%} interval [{lo:+.4g}, {hi:+.4g}];"
            f" {int(self.windows)} windows of {self.window} steps)",
            f"  verdict: {self.regime}" + self._why(lo, hi),
        ]
        if self.sigma_max is not None:
            lines.append(
                f"  sigma_max(W_h) = {f(self.sigma_max)}   gamma = {f(self.gamma)}"
                f"   1/gamma = {f(self.critical)}"
            )
            if self.critical is not None:
                if float(self.sigma_max) < self.critical:
                    cond = "sigma_max < 1/gamma: gradients provably vanish (sufficient condition)"
                else:
                    cond = "sigma_max >= 1/gamma: exploding gradients possible (necessary condition met)"
                lines.append(f"  {cond}")
            lines.append(
                f"  per-step bound ||J_t|| <= sigma_max*gamma = {f(self.step_bound)}   "
                f"measured: max {float(self.step_norm_max):.4g}, mean {float(self.step_norm_mean):.4g}"
            )
        else:
            lines.append(
                f"  ||J_t||_2 measured: max {float(self.step_norm_max):.4g}, "
                f"mean {float(self.step_norm_mean):.4g}"
            )
        if self.gate_sigma_max is not None:
            parts = [
                f"{g}: {float(self.gate_sigma_max[g]):.3g}/{float(self.gate_spectral_radius[g]):.3g}"
                for g in self.gate_names
            ]
            lines.append("  recurrent blocks, sigma_max/spectral radius: " + ", ".join(parts))
        h = self.memory_horizon
        lines.append(
            f"  memory horizon (||ds_T/ds_(T-L)|| < {self.tol:g}): observed at lag {f(h, '{:.0f}')}, "
            f"estimated {self.horizon_estimate:.4g} steps"
        )
        return "\n".join(lines)

    def _why(self, lo: float, hi: float) -> str:
        if self.regime != "undetermined":
            return ""
        if int(self.windows) < 4:
            return f" (only {int(self.windows)} windows: too short to tell)"
        if int(np.min(np.asarray(self.measured_steps))) < self.min_steps:
            return (
                f" (a sequence has fewer than min_steps={self.min_steps} measured steps: too short to tell)"
            )
        return f" (the interval straddles the boundary ±{self.margin:g})"

    def plot(self, *, ax=None, **kwargs):
        """Gradient norm against lag, with the bound (``seqjax.plot.plot_gradient_flow``)."""
        from seqjax import plot

        return plot.plot_gradient_flow(self, ax=ax, **kwargs)


def _t_quantile(p: Any, dof: jax.Array) -> jax.Array:
    """Student's t quantile ``t_p(dof)`` by the Cornish-Fisher expansion in ``1/dof`` (four
    terms; error below 0.01 at ``dof = 3`` and shrinking as ``dof^-5``), traceable in ``dof``."""
    z = jax.scipy.special.ndtri(jnp.asarray(p))
    v = jnp.maximum(dof, 1).astype(z.dtype)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / v + g2 / v**2 + g3 / v**3 + g4 / v**4


@functools.partial(jax.jit, static_argnames=("cell", "window", "frame_warmup"))
def _report_core(cell, params, xs_bm, carry, valid, Q0, gamma, settings, *, window, frame_warmup):
    """The compiled body of ``gradient_flow_report``; ``settings = (tol, margin, confidence,
    min_steps)`` are traced, so changing them does not recompile."""
    tol, margin, confidence, min_steps = settings
    sj = _step_jacobians_core(cell, params, xs_bm, carry, valid, method="auto", inputs=False)
    J = sj.jacobians
    norms = jnp.linalg.norm(J, ord=2, axis=(-2, -1))
    read = jnp.ones(norms.shape, bool) if valid is None else valid
    n_read = jnp.maximum(jnp.sum(read), 1)
    norm_max = jnp.max(jnp.where(read, norms, -jnp.inf))
    norm_mean = jnp.sum(jnp.where(read, norms, 0.0)) / n_read
    curves = _lag_core(J, None, valid, ord=2).reshape(-1, J.shape[-3] + 1)
    have = ~jnp.isnan(curves)
    count = jnp.sum(have, axis=0)
    curve = jnp.sum(jnp.where(have, curves, 0.0), axis=0) / jnp.maximum(count, 1)
    curve = jnp.where(count > 0, curve, jnp.nan)
    below = curve < jnp.log(tol)
    horizon = jnp.where(jnp.any(below), jnp.argmax(below), -1)
    S = J.shape[-1]
    rank_tol = jnp.asarray(S * jnp.finfo(J.dtype).eps, J.dtype)
    _, _, ft, steps = _from_jacobians_core(
        J, valid, Q0, rank_tol, frame_warmup=frame_warmup, r=1, window=window
    )
    w = ft[..., 0].reshape(-1)  # every window of every sequence; NaN for the ones a sequence lacks
    ok = ~jnp.isnan(w)
    n = jnp.sum(ok)
    nf = jnp.maximum(n, 1).astype(J.dtype)
    est = jnp.sum(jnp.where(ok, w, 0.0)) / nf
    finite = jnp.isfinite(est)
    dev = jnp.where(ok & finite, w - jnp.where(finite, est, 0.0), 0.0)
    se = jnp.sqrt(jnp.sum(dev**2) / jnp.maximum(nf - 1, 1)) / jnp.sqrt(nf)
    se = jnp.where(finite, se, 0.0)
    q = _t_quantile(0.5 + confidence / 2, n - 1).astype(J.dtype)  # confidence: traced
    lo, hi = est - q * se, est + q * se
    enough = (n >= 4) & (jnp.min(steps) >= min_steps)
    code = jnp.where(
        hi < -margin, 1, jnp.where(lo > margin, 2, jnp.where((lo >= -margin) & (hi <= margin), 3, 0))
    )
    code = jnp.where(enough, code, 0)
    sigma = None
    if cell.jacobian_bound is not None:
        sigma, g_cap = cell.jacobian_bound(params)
        sigma = jnp.asarray(sigma)
        if gamma is None and g_cap is not None:
            gamma = jnp.asarray(g_cap, sigma.dtype)
    gate_sigma = gate_rho = None
    if cell.recurrent_blocks is not None:
        from seqjax.spectrum.gates import gate_spectra

        spectra = gate_spectra(cell, params)
        gate_sigma = {g: v.sigma_max for g, v in spectra.items()}
        gate_rho = {g: v.spectral_radius for g, v in spectra.items()}
    return dict(
        sigma_max=sigma,
        gamma=None if gamma is None else jnp.asarray(gamma),
        gate_sigma_max=gate_sigma,
        gate_spectral_radius=gate_rho,
        step_norm_max=norm_max,
        step_norm_mean=norm_mean,
        lag_log_norms=curve,
        lyapunov_max=est,
        lyapunov_stderr=se,
        interval=jnp.stack([lo, hi]),
        windows=n,
        measured_steps=steps,
        memory_horizon_index=horizon,
        verdict_code=code,
    )


@overload
def gradient_flow_report(
    cell: Cell,
    params: Any,
    xs: Any,
    *,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    gamma: float | None = ...,
    tol: float = ...,
    margin: float = ...,
    confidence: float = ...,
    window: int | None = ...,
    frame_warmup: int | None = ...,
    min_steps: int = ...,
    time_axis: int = ...,
) -> GradientFlowReport: ...


@overload
def gradient_flow_report(
    cell: object,
    params: Any,
    xs: Any,
    *,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    gamma: float | None = ...,
    tol: float = ...,
    margin: float = ...,
    confidence: float = ...,
    window: int | None = ...,
    frame_warmup: int | None = ...,
    min_steps: int = ...,
    time_axis: int = ...,
) -> dict[str, GradientFlowReport]: ...


def gradient_flow_report(
    cell: Cell | Any,
    params: Any,
    xs: Any,
    *,
    carry: Any = None,
    lengths: Any = None,
    mask: Any = None,
    gamma: float | None = None,
    tol: float = 1e-3,
    margin: float = 1e-3,
    confidence: float = 0.95,
    window: int | None = None,
    frame_warmup: int | None = None,
    min_steps: int = 50,
    time_axis: int = -2,
) -> GradientFlowReport | dict[str, GradientFlowReport]:
    r"""One-call report on vanishing/exploding gradients of ``cell`` driven by ``xs``.

    Computes the step Jacobians along the trajectories (``step_jacobians``), the lag curve
    ``log ||ds_T/ds_{T-L}||`` (``lag_log_norms``), and one estimate of the growth rate: the
    largest Lyapunov exponent by the QR method (``lyapunov_from_jacobians``, ``k = 1``),
    pooled over windows of every sequence, with its standard error and confidence interval;
    the verdict follows from the interval (see ``GradientFlowReport``). Also the Pascanu
    bound ``||J_t|| <= sigma_max(W_h) gamma`` for cells with a ``jacobian_bound`` and the
    per-gate ``sigma_max`` and spectral radius for cells with ``recurrent_blocks``. Memory
    ``O(B T S^2)``: meant for small and medium ``S``. Compiled once per cell, ``window``,
    ``frame_warmup`` and shapes (``tol``, ``margin``, ``confidence`` and ``min_steps`` are
    traced: changing them does not recompile); transparent to ``jit``.

    Args:
      cell: any ``Cell``, or a whole model (see ``seqjax.spectrum.recurrent_cores``): then a
        dict, one report per core.
      params: its params.
      xs: ``(*batch, T, I)``.
      carry: initial carry.
      lengths: ``(*batch,)`` valid steps of each sequence (padded data): each sequence is
        measured over its own steps, its lags counted from its own end.
      mask: ``(*batch, T)`` bool, the steps read (laid out like ``xs`` without features).
      gamma: bound on ``|f'|``; default the one the cell's ``jacobian_bound`` gives (for an
        Elman cell with a callable activation, give it here).
      tol: gradient-norm tolerance defining the memory horizon.
      margin: rates within ``±margin`` per step count as neutral (default ``1e-3``: less than a
        factor ``e`` over 1000 steps); the interval must clear ``±margin`` for ``"vanishing"``
        or ``"exploding"``.
      confidence: level of the interval (default 0.95).
      window: steps per window (default a tenth of the shortest sequence's measured steps).
      frame_warmup: steps the QR frame aligns before measuring (default ``min(10, T // 10)``).
      min_steps: a sequence with fewer measured steps makes the verdict ``"undetermined"``.
      time_axis: time axis of ``xs``.

    Returns:
      ``GradientFlowReport`` (``print`` it; ``.plot()`` it).

    Examples:
      A linear cell with spectral radius 0.5 forgets at ``log 0.5`` per step, and the report
      says so decisively at ``T = 100``:

      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.rnn(3, activation="identity")
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> params["w_h"] = 0.5 * jnp.eye(3)
      >>> report = seqjax.spectrum.gradient_flow_report(cell, params, jnp.ones((2, 100, 2)))
      >>> report.regime, round(float(report.lyapunov_max), 4)
      ('vanishing', -0.6931)

    Reference: Pascanu, Mikolov & Bengio, ICML 2013, sections 2-3.
    """
    if not isinstance(cell, Cell):
        return _for_model(
            gradient_flow_report,
            cell,
            params,
            xs,
            carry,
            lengths,
            mask,
            time_axis,
            gamma=gamma,
            tol=tol,
            margin=margin,
            confidence=confidence,
            window=window,
            frame_warmup=frame_warmup,
            min_steps=min_steps,
        )
    from seqjax._util import promote

    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    xs = jnp.asarray(xs)
    xs_bm = _batch_major(xs, time_axis)
    T = xs_bm.shape[-2]
    if T < 2:
        raise ValueError(f"gradient_flow_report needs at least 2 time steps in xs, got T={T}.")
    valid = _valid_steps(lengths, _mask_batch_major(mask, xs, time_axis), xs_bm)
    params, xs_bm, carry, dtype = promote(params, xs_bm, carry)
    S = state_size(cell, params)
    fw = min(10, T // 10) if frame_warmup is None else int(frame_warmup)
    _, window = _check_lyap_args(T, 1, S, 0, fw, 1, window, valid)
    Q0 = _initial_frame(None, None, S, 1, dtype)
    names: tuple = ()
    blocks = cell.recurrent_blocks
    if blocks is not None:
        names = tuple(blocks(params))  # the cell's order (a pytree dict would sort)
    out = _report_core(
        cell,
        params,
        xs_bm,
        carry,
        valid,
        Q0,
        None if gamma is None else jnp.asarray(gamma, dtype),
        (
            jnp.asarray(tol, dtype),
            jnp.asarray(margin, dtype),
            jnp.asarray(confidence, dtype),
            jnp.asarray(int(min_steps)),
        ),
        window=window,
        frame_warmup=fw,
    )
    return GradientFlowReport(
        cell=cell.label,
        state_size=S,
        steps=T,
        window=window,
        tol=float(tol),
        margin=float(margin),
        confidence=float(confidence),
        min_steps=int(min_steps),
        gate_names=names,
        **out,
    )
