"""Matplotlib figures for Jacobian spectra, gradient flow, diagnoses and training curves.

matplotlib is an optional dependency (``pip install "seqjax[plot]"``): it is imported only
when a function here is called, so ``import seqjax`` and ``import seqjax.plot`` work without
it. Every ``plot_*`` function draws on ``ax`` if given (else a new figure through
``pyplot``) and returns the ``Axes``; save with ``ax.figure.savefig("fig.png")``.
``write_figures`` writes the standard figures of ``seqjax.diagnose`` results to PNG files
(it builds ``matplotlib.figure.Figure`` objects directly: no ``pyplot`` state, no GUI
backend).

Logarithms of norms are plotted as base-10 logs on a linear axis rather than as norms on
a log axis: products of Jacobians reach ``1e1000`` and beyond, which no float can hold,
while their logs are finite.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "PLOT_EXTRA",
    "matplotlib_available",
    "plot_eigenvalues",
    "plot_lyapunov_spectrum",
    "plot_lag_norms",
    "plot_spectral_radius",
    "plot_gradient_flow",
    "plot_gradient_vs_lag",
    "plot_diagnosis_eigenvalues",
    "plot_training_history",
    "write_figures",
]

PLOT_EXTRA = 'pip install "seqjax[plot]"'
"""The install command of the optional dependency the figures need."""

_LOG10E = 1.0 / math.log(10.0)


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            f"seqjax.plot needs matplotlib, an optional dependency: {PLOT_EXTRA} (or pip install matplotlib)."
        ) from e
    return plt


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (what every function here needs)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _axes(ax):
    plt = _require_matplotlib()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    return ax


def _finish(ax, xlabel: str, ylabel: str, legend: bool = False, **legend_kw):
    """Label the axes, add the legend if asked, return ``ax``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(**legend_kw)
    return ax


def _reference_line(ax, y: float) -> None:
    ax.axhline(y, color="0.6", lw=0.8, ls="--")


def _curves(ax, values: Any, label: str | None, scale: float = 1.0, *, start: int = 1, **kwargs):
    """One curve per leading index of ``values: (..., n)`` against ``start..start+n-1`` (lags
    start at 0, steps at 1); ``label`` on the first."""
    y = np.asarray(values, dtype=float)
    y = y.reshape(-1, y.shape[-1]) * scale
    x = np.arange(start, start + y.shape[-1])
    for b, yy in enumerate(y):
        ax.plot(x, yy, label=label if b == 0 else None, **kwargs)


def _unit_circle(ax) -> None:
    """``|z| = 1``: the discrete-time stability boundary."""
    th = np.linspace(0.0, 2.0 * np.pi, 361)
    ax.plot(np.cos(th), np.sin(th), color="0.6", lw=1.0, ls="--", zorder=0)


def plot_eigenvalues(
    eigenvalues: Any, *, ax=None, unit_circle: bool = True, label: str | None = None, **kwargs
):
    """Eigenvalues in the complex plane with the unit circle (the discrete-time stability
    boundary: modes inside decay, modes outside grow).

    Args:
      eigenvalues: complex array of any shape (all are drawn), e.g. ``step_spectra(J)[0]``
        or ``FixedPoints.eigenvalues``.
      ax: matplotlib ``Axes`` (default: a new figure).
      unit_circle: draw ``|z| = 1``.
      label: legend label.
      **kwargs: passed to ``ax.scatter``.

    Returns:
      The ``Axes``.
    """
    ax = _axes(ax)
    w = np.asarray(eigenvalues).reshape(-1).astype(complex)
    if unit_circle:
        _unit_circle(ax)
    kwargs.setdefault("s", 12)
    ax.scatter(w.real, w.imag, label=label, **kwargs)
    ax.axhline(0.0, color="0.85", lw=0.8, zorder=0)
    ax.axvline(0.0, color="0.85", lw=0.8, zorder=0)
    ax.set_aspect("equal", adjustable="datalim")
    return _finish(ax, "Re λ", "Im λ", label is not None)


def plot_lyapunov_spectrum(spectrum: Any, *, ax=None, label: str | None = None, **kwargs):
    """Lyapunov exponents against their index, with standard-error bars.

    Args:
      spectrum: a ``LyapunovSpectrum`` (one curve per sequence) or an array ``(..., k)``
        (e.g. ``Diagnosis.lyapunov``; no error bars).
      ax: matplotlib ``Axes``.
      label: legend label.
      **kwargs: passed to ``ax.errorbar``.

    Returns:
      The ``Axes``. ``-inf`` exponents (rank-deficient directions) are marked at the bottom.
    """
    ax = _axes(ax)
    if hasattr(spectrum, "exponents"):
        e = np.asarray(spectrum.exponents, dtype=float)
        err = np.asarray(spectrum.stderr, dtype=float)
    else:
        e = np.asarray(spectrum, dtype=float)
        err = np.zeros_like(e)
    e = e.reshape(-1, e.shape[-1])
    err = err.reshape(-1, err.shape[-1])
    finite = e[np.isfinite(e)]
    floor = (finite.min() - 0.1 * (np.ptp(finite) + 1e-3)) if finite.size else -1.0
    kwargs.setdefault("marker", "o")
    kwargs.setdefault("ms", 3)
    kwargs.setdefault("capsize", 2)
    for b, (ee, ss) in enumerate(zip(e, err)):
        idx = np.arange(1, ee.size + 1)
        ok = np.isfinite(ee)
        ss = np.where(np.isfinite(ss), ss, 0.0)
        lab = label if b == 0 else None
        ax.errorbar(idx[ok], ee[ok], yerr=ss[ok], label=lab, **kwargs)
        if (~ok).any():
            ax.scatter(idx[~ok], np.full((~ok).sum(), floor), marker="v", color="C3", s=14, label=None)
    _reference_line(ax, 0.0)
    return _finish(ax, "index i", "λ_i (per step)", label is not None)


def plot_lag_norms(log_norms: Any, *, ax=None, label: str | None = None, **kwargs):
    """Gradient norm against lag: ``log10 ||ds_T/ds_{T-L}||`` for ``L = 0..T``.

    The lag convention of every seqjax analysis function: index ``L`` holds lag ``L``, lag 0
    first (the x axis starts at 0); NaN entries (lags a padded sequence lacks) leave gaps.

    Args:
      log_norms: natural-log norms ``(..., T + 1)`` (e.g. ``lag_log_norms(J)``); one curve per
        leading index.
      ax: matplotlib ``Axes``.
      label: legend label (first curve).
      **kwargs: passed to ``ax.plot``.

    Returns:
      The ``Axes``.
    """
    ax = _axes(ax)
    _curves(ax, log_norms, label, _LOG10E, start=0, **kwargs)
    return _finish(ax, "lag L = T - t", "log10 ||ds_T / ds_t||", label is not None)


def plot_spectral_radius(radii: Any, *, ax=None, label: str | None = None, **kwargs):
    """Spectral radius of ``J_t`` over time, with the line ``rho = 1``.

    Args:
      radii: ``(..., T)``, e.g. ``spectral_radii(J)``.
      ax: matplotlib ``Axes``.
      label: legend label.
      **kwargs: passed to ``ax.plot``.

    Returns:
      The ``Axes``.
    """
    ax = _axes(ax)
    _curves(ax, radii, label, **kwargs)
    _reference_line(ax, 1.0)
    return _finish(ax, "step t", "spectral radius of J_t", label is not None)


def plot_gradient_flow(report: Any, *, ax=None, **kwargs):
    """The lag curve of a ``GradientFlowReport`` with the Pascanu et al. bound, the tolerance
    and the memory horizon.

    Args:
      report: a ``seqjax.spectrum.GradientFlowReport``.
      ax: matplotlib ``Axes``.
      **kwargs: passed to the measured curve's ``ax.plot``.

    Returns:
      The ``Axes``.
    """
    ax = _axes(ax)
    curve = np.asarray(report.lag_log_norms, dtype=float)
    lags = np.arange(curve.size)  # lag 0 first
    rate, err = float(report.lyapunov_max), float(report.lyapunov_stderr)
    kwargs.setdefault("label", f"measured (λ_1 = {rate:+.3g} ± {err:.1g}/step)")
    ax.plot(lags, curve * _LOG10E, **kwargs)
    if report.bound_rate is not None:
        ax.plot(
            lags,
            lags * report.bound_rate * _LOG10E,
            ls="--",
            color="C3",
            label=f"bound (σ_max γ)^L, rate {report.bound_rate:+.3g}/step",
        )
    ax.axhline(math.log10(report.tol), color="0.5", lw=0.8, ls=":", label=f"tol {report.tol:g}")
    if report.memory_horizon is not None:
        ax.axvline(report.memory_horizon, color="0.3", lw=0.8, label=f"horizon {report.memory_horizon}")
    finite = curve[np.isfinite(curve)] * _LOG10E
    if finite.size:
        lo, hi = finite.min(), finite.max()
        pad = 0.1 * (hi - lo + 1.0)
        ax.set_ylim(min(lo, math.log10(report.tol)) - pad, max(hi, 0.0) + pad)
    ax.set_title(f"gradient flow: {report.cell}, regime {report.regime}")
    return _finish(ax, "lag L = T - t", "log10 ||ds_T / ds_t||", True, fontsize="small")


# --------------------------------------------------------------------------- diagnoses (seqjax.diagnose)


def plot_gradient_vs_lag(diagnoses: Mapping[str, Any], *, ax=None):
    """The gradient ratio against lag of one or more ``seqjax.diagnose.Diagnosis``.

    For each model ``name``: ``grad_log10`` (``log10 ||dL/ds_(T-L)|| / ||dL/ds_T||``, or
    ``log10 ||ds_T/ds_(T-L)||`` without targets) against ``L = 0..T``, and for multi-leaf
    carries the memory path ``cell_log10`` (dashed; the LSTM's ``prod f`` of its most
    persistent unit), with the line ``0`` (no decay).

    Args:
      diagnoses: ``{name: Diagnosis}``.
      ax: matplotlib ``Axes``.

    Returns:
      The ``Axes``.
    """
    ax = _axes(ax)
    for name, d in diagnoses.items():
        what = "||dL/ds_(T-L)|| / ||dL/ds_T||" if d.cotangent else "||ds_T/ds_(T-L)||"
        _curves(ax, d.grad_log10, f"{name}: {what}", start=0)
        if d.cell_log10 is not None:
            _curves(ax, d.cell_log10, f"{name}: cell path, prod f (most persistent unit)", start=0, ls="--")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_title("Gradient norm against lag")
    return _finish(ax, "lag L (steps back from the end)", "log10 gradient ratio", True, fontsize=8)


def plot_diagnosis_eigenvalues(diagnosis: Any, which: str = "wh", *, ax=None, name: str = ""):
    """Eigenvalues of one ``seqjax.diagnose.Diagnosis`` with the unit circle.

    Args:
      diagnosis: a ``Diagnosis``.
      which: ``"wh"``: each gate block of the recurrent matrix (``W_h[i]``, ``W_h[f]``, ...);
        ``"jac"``: the step Jacobians ``J_t`` at the first, middle and last step.
      ax: matplotlib ``Axes``.
      name: the model's name, for the title.

    Returns:
      The ``Axes``.
    """
    if which not in ("wh", "jac"):
        raise ValueError(f"which must be 'wh' or 'jac', got {which!r}.")
    ax = _axes(ax)
    prefix = f"{name}: " if name else ""
    if which == "wh":
        for ev, gname in zip(diagnosis.eig_wh or [], diagnosis.gate_names or [], strict=False):
            plot_eigenvalues(ev, ax=ax, label=f"W_h[{gname}]", s=8)
        ax.set_title(f"{prefix}eigenvalues of W_h")
    else:
        ev = diagnosis.eig_jac
        T = ev.shape[0]
        for t in sorted({0, T // 2, T - 1}):
            plot_eigenvalues(ev[t], ax=ax, label=f"J_t, t={t + 1}", s=8)
        ax.set_title(f"{prefix}eigenvalues of step Jacobians")
    if not ax.collections:  # nothing drawn (no square W_h): still a labelled plane
        _unit_circle(ax)
        return _finish(ax, "Re λ", "Im λ")
    return _finish(ax, "Re λ", "Im λ", True, fontsize=7)


def plot_training_history(histories: Mapping[str, list[dict]], *, ax=None):
    """Training loss (and evaluation loss, dashed with markers) against step, log scale.

    Args:
      histories: ``{name: history}``, a history being the rows of ``seqjax.train.fit``
        (``{"step", "loss", "eval_loss"?}``).
      ax: matplotlib ``Axes``.

    Returns:
      The ``Axes``.
    """
    ax = _axes(ax)
    for name, hist in histories.items():
        rows = [row for row in hist if "loss" in row]
        ax.plot([row["step"] for row in rows], [row["loss"] for row in rows], label=f"{name} train")
        ev = [(row["step"], row["eval_loss"]) for row in hist if "eval_loss" in row]
        if ev:
            ax.plot([e[0] for e in ev], [e[1] for e in ev], "o--", ms=3, label=f"{name} eval")
    ax.set_yscale("log")
    ax.set_title("Training")
    return _finish(ax, "step", "loss", True)


def write_figures(
    out_dir: str,
    diagnoses: Mapping[str, Any] | None = None,
    *,
    histories: Mapping[str, list[dict]] | None = None,
    dpi: int = 100,
) -> dict[str, str]:
    """Write the standard figures of diagnosed and trained models as PNG files in ``out_dir``.

    ``training.png`` (``plot_training_history``, when ``histories`` are given) and, when
    ``diagnoses`` are given, ``gradient_vs_lag.png`` (``plot_gradient_vs_lag``),
    ``lyapunov.png`` (``plot_lyapunov_spectrum`` of every model), ``eigenvalues_wh.png``
    and ``eigenvalues_jacobians.png`` (``plot_diagnosis_eigenvalues``, one panel per
    model).

    Args:
      out_dir: an existing folder.
      diagnoses: ``{name: seqjax.diagnose.Diagnosis}``.
      histories: ``{name: training history}``.
      dpi: resolution.

    Returns:
      ``{file name: title}`` of the files written, in the order above.
    """
    _require_matplotlib()
    from matplotlib.figure import Figure

    written: dict[str, str] = {}

    def save(fig, fn, title):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fn), dpi=dpi)
        written[fn] = title

    if histories:
        fig = Figure(figsize=(6, 4))
        plot_training_history(histories, ax=fig.subplots())
        save(fig, "training.png", "Training curves")
    if diagnoses:
        fig = Figure(figsize=(6, 4))
        plot_gradient_vs_lag(diagnoses, ax=fig.subplots())
        save(fig, "gradient_vs_lag.png", "Gradient norm against lag")
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for name, d in diagnoses.items():
            plot_lyapunov_spectrum(d.lyapunov, ax=ax, label=name)
        ax.set_title("Lyapunov spectra")
        save(fig, "lyapunov.png", "Lyapunov spectra")
        for which, fn, title in (
            ("wh", "eigenvalues_wh.png", "Eigenvalues of W_h"),
            ("jac", "eigenvalues_jacobians.png", "Eigenvalues of the step Jacobians"),
        ):
            fig = Figure(figsize=(4.5 * len(diagnoses), 4))
            for ax, (name, d) in zip(fig.subplots(1, len(diagnoses), squeeze=False)[0], diagnoses.items()):
                plot_diagnosis_eigenvalues(d, which, ax=ax, name=name)
            save(fig, fn, title)
    return written
