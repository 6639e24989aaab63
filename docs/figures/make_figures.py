"""Draw the figures of the guides "Backpropagation through time" and "Jacobian spectra".

Every figure comes from a small deterministic computation with ``seqjax.spectrum`` and
``seqjax.bptt`` and is drawn by ``seqjax.plot``: tanh Elman RNNs whose recurrent matrix
has Gaussian entries of variance ``g**2 / H`` (``scaled_gaussian(g)``) at the gains
``g = 0.8, 1.0, 1.5``, driven by the same weak random input, and an LSTM for comparison.

Run from the repository root (under a minute on two CPU cores)::

    python docs/figures/make_figures.py

It rewrites the PNG files next to this script.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
from matplotlib.figure import Figure  # figures without pyplot: no GUI backend needed

import seqjax as sj
from seqjax import plot
from seqjax import spectrum as sp
from seqjax.bptt import gradient_norms

OUT = pathlib.Path(__file__).resolve().parent
DPI = 110
H = 64  # hidden units
I = 2  # input features
GAINS = (0.8, 1.0, 1.5)
COLORS = {0.8: "C0", 1.0: "C2", 1.5: "C3"}


def elman(gain: float):
    """A tanh Elman cell with ``W_h`` of gain ``gain`` and its params (the same key for every gain)."""
    cell = sj.rnn(H, recurrent_init=sj.initializers.scaled_gaussian(gain))
    return cell, cell.init(jax.random.key(0), input_size=I)


def inputs(batch: int, steps: int, seed: int = 1) -> jax.Array:
    """Weak Gaussian input ``(batch, steps, I)``."""
    return 0.5 * jax.random.normal(jax.random.key(seed), (batch, steps, I))


def save(fig: Figure, name: str, **layout) -> None:
    fig.tight_layout(**layout)
    path = OUT / name
    fig.savefig(path, dpi=DPI)
    print(f"wrote {path.relative_to(OUT.parents[1])} ({path.stat().st_size // 1024} KB)")


def eigenvalue_clouds() -> None:
    """Eigenvalues of ``W_h`` and of the step Jacobians ``J_t`` against the unit circle."""
    fig = Figure(figsize=(10.5, 3.8))
    axes = fig.subplots(1, len(GAINS))
    xs = inputs(1, 300)
    for ax, g in zip(axes, GAINS, strict=True):
        cell, params = elman(g)
        J = sp.step_jacobians(cell, params, xs).jacobians[0, 100:]  # (200, H, H), after a warm-up
        eig_j, _ = sp.step_spectra(J[::20])  # every 20th step: 10 Jacobians
        plot.plot_eigenvalues(eig_j, ax=ax, s=5, alpha=0.5, color=COLORS[g], label="J_t (10 steps)")
        plot.plot_eigenvalues(
            sp.eigvals(params["w_h"]), ax=ax, s=14, facecolors="none", edgecolors="k", lw=0.6, label="W_h"
        )
        ax.set_title(f"gain g = {g}")
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
    handles, _ = axes[0].get_legend_handles_labels()
    for ax in axes:
        ax.get_legend().remove()  # one legend for the three panels
    fig.legend(handles, ["$J_t$, every 20th of 200 steps", "$W_h$"], loc="lower center", ncol=2)
    save(fig, "eigenvalues.png", rect=(0, 0.07, 1, 1))


def lag_curves() -> None:
    """``log10 ||ds_T/ds_{T-L}||`` against the lag for each gain (mean over 4 sequences)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    xs = inputs(4, 300)
    for g in GAINS:
        cell, params = elman(g)
        J = sp.step_jacobians(cell, params, xs).jacobians[:, 100:]  # drop the warm-up
        curve = sp.lag_log_norms(J).mean(axis=0)  # natural log, lags L = 0..200 (lag 0: log ||I|| = 0)
        plot.plot_lag_norms(curve, ax=ax, label=f"tanh RNN, g = {g}", color=COLORS[g])
    ax.axhline(0.0, color="0.6", lw=0.8, ls="--")
    ax.set_title("Norm of the Jacobian product against lag")
    ax.legend(fontsize=8)
    save(fig, "lag_norms.png")


def lyapunov_spectra() -> None:
    """Lyapunov spectra with standard errors, one sequence of 2,000 steps per gain."""
    fig = Figure(figsize=(10, 4))
    full, top = fig.subplots(1, 2)
    xs = inputs(1, 2200)
    for g in GAINS:
        cell, params = elman(g)
        spec = sp.lyapunov_spectrum(cell, params, xs, warmup=100, frame_warmup=100, window=200)
        for ax in (full, top):
            plot.plot_lyapunov_spectrum(spec, ax=ax, label=f"g = {g}", color=COLORS[g], ms=2, elinewidth=0.8)
        print(f"  g = {g}: lambda_1 = {float(spec.max[0]):+.4f} +- {float(spec.stderr[0, 0]):.1e} per step")
    full.set_title("Lyapunov spectra of tanh RNNs (H = 64)")
    full.legend(fontsize=8)
    top.set_xlim(0.5, 8.5)
    top.set_ylim(-0.45, 0.1)
    top.get_legend().remove()
    top.set_title("the top 8, with standard errors")
    save(fig, "lyapunov.png")


def gradient_flow() -> None:
    """Gradient-flow reports at gains 0.4 (the bound proves vanishing) and 1.0 (it says nothing).

    The measured curve is the report's ``lag_log_norms`` (lags ``0..T``), its legend the largest
    Lyapunov exponent with its standard error; the title gives the verdict (``report.regime``)
    and the 95% interval it rests on.
    """
    fig = Figure(figsize=(10, 4))
    for ax, g in zip(fig.subplots(1, 2), (0.4, 1.0), strict=True):
        cell, params = elman(g)
        report = sp.gradient_flow_report(cell, params, inputs(4, 200))
        print("  " + str(report).replace("\n", "\n  "))
        report.plot(ax=ax)
        lo, hi = (float(v) for v in report.interval)
        interval = f"95% interval of λ_1: [{lo:+.3f}, {hi:+.3f}] per step"
        ax.set_title(f"tanh RNN, g = {g}: {report.regime}\n{interval}")
    save(fig, "gradient_flow.png")


def gradient_vs_lag() -> None:
    """``||dL_T/ds_t||`` against the lag ``T - t`` from ``gradient_norms``: tanh RNNs and an LSTM."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    xs = inputs(8, 150)

    def last_step_loss(ys):
        return jnp.sum(ys[:, -1] ** 2)

    def curve(norms):  # by_lag: entry L is ||dL_T/ds_{T-L}||, lag 0 first; mean log over sequences
        return jnp.log(norms).mean(0)  # lags 0..T-1, plotted by plot_lag_norms from lag 0

    for g in GAINS:
        cell, params = elman(g)
        gn = gradient_norms(cell, params, xs, last_step_loss, by_lag=True)
        plot.plot_lag_norms(curve(gn.norms), ax=ax, label=f"tanh RNN, g = {g}", color=COLORS[g])
    lstm = sj.lstm(H, forget_bias=3.0)
    p = lstm.init(jax.random.key(0), input_size=I)
    gn = gradient_norms(lstm, p, xs, last_step_loss, by_lag=True)
    plot.plot_lag_norms(curve(gn.leaf_norms.h), ax=ax, label="LSTM: h part", color="C4")
    plot.plot_lag_norms(curve(gn.leaf_norms.c), ax=ax, label="LSTM: c part", color="C4", ls="--")
    ax.set_xlabel("lag T - t (steps)")
    ax.set_ylabel("log10 ||dL_T / ds_t||")
    ax.set_title("Gradient of a last-step loss against lag")
    ax.legend(fontsize=8)
    save(fig, "gradient_norms.png")


def main() -> None:
    start = time.perf_counter()
    for draw in (eigenvalue_clouds, lag_curves, lyapunov_spectra, gradient_flow, gradient_vs_lag):
        draw()
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
