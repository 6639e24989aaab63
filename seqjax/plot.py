"""Matplotlib figures for Jacobian spectra and gradient flow.

matplotlib is an optional dependency (``pip install "seqjax[plot]"``): it is imported only
when a function here is called, so ``import seqjax`` and ``import seqjax.plot`` work without
it. Every function draws on ``ax`` if given (else a new figure through ``pyplot``) and
returns the ``Axes``; save with ``ax.figure.savefig("fig.png")``.

Logarithms of norms are plotted as base-10 logs on a linear axis rather than as norms on
a log axis: products of Jacobians reach ``1e1000`` and beyond, which no float can hold,
while their logs are finite.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "plot_eigenvalues",
    "plot_lyapunov_spectrum",
    "plot_lag_norms",
    "plot_spectral_radius",
    "plot_gradient_flow",
]

_LOG10E = 1.0 / math.log(10.0)


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            'seqjax.plot needs matplotlib, an optional dependency: pip install "seqjax[plot]" '
            "(or pip install matplotlib)."
        ) from e
    return plt


def _axes(ax):
    plt = _require_matplotlib()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    return ax


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
        th = np.linspace(0.0, 2.0 * np.pi, 361)
        ax.plot(np.cos(th), np.sin(th), color="0.6", lw=1.0, ls="--", zorder=0)
    kwargs.setdefault("s", 12)
    ax.scatter(w.real, w.imag, label=label, **kwargs)
    ax.axhline(0.0, color="0.85", lw=0.8, zorder=0)
    ax.axvline(0.0, color="0.85", lw=0.8, zorder=0)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    if label is not None:
        ax.legend()
    return ax


def plot_lyapunov_spectrum(spectrum: Any, *, ax=None, label: str | None = None, **kwargs):
    """Lyapunov exponents against their index, with standard-error bars.

    Args:
      spectrum: a ``LyapunovSpectrum`` (one curve per sequence) or an array ``(..., k)``.
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
    ax.axhline(0.0, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("index i")
    ax.set_ylabel("λ_i (per step)")
    if label is not None:
        ax.legend()
    return ax


def plot_lag_norms(log_norms: Any, *, ax=None, label: str | None = None, **kwargs):
    """Gradient norm against lag: ``log10 ||ds_T/ds_{T-L}||`` for ``L = 1..T``.

    Args:
      log_norms: natural-log norms ``(..., T)`` (e.g. ``lag_log_norms(J)``); one curve per
        leading index.
      ax: matplotlib ``Axes``.
      label: legend label (first curve).
      **kwargs: passed to ``ax.plot``.

    Returns:
      The ``Axes``.
    """
    ax = _axes(ax)
    y = np.asarray(log_norms, dtype=float)
    y = y.reshape(-1, y.shape[-1]) * _LOG10E
    lags = np.arange(1, y.shape[-1] + 1)
    for b, yy in enumerate(y):
        ax.plot(lags, yy, label=label if b == 0 else None, **kwargs)
    ax.set_xlabel("lag L = T - t")
    ax.set_ylabel("log10 ||ds_T / ds_t||")
    if label is not None:
        ax.legend()
    return ax


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
    r = np.asarray(radii, dtype=float)
    r = r.reshape(-1, r.shape[-1])
    t = np.arange(1, r.shape[-1] + 1)
    for b, rr in enumerate(r):
        ax.plot(t, rr, label=label if b == 0 else None, **kwargs)
    ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("step t")
    ax.set_ylabel("spectral radius of J_t")
    if label is not None:
        ax.legend()
    return ax


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
    lags = np.arange(1, curve.size + 1)
    kwargs.setdefault("label", f"measured (rate {report.growth_rate:+.3g}/step)")
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
    ax.set_xlabel("lag L = T - t")
    ax.set_ylabel("log10 ||ds_T / ds_t||")
    ax.set_title(f"gradient flow: {report.cell}, regime {report.regime}")
    ax.legend(fontsize="small")
    return ax
