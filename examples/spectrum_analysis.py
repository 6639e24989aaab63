"""Spectrum analysis of a trained recurrent network.

Train a small network on the adding problem, then ask the Jacobian questions of Pascanu,
Mikolov & Bengio (2013) about it, all with ``seqjax.spectrum``:

* ``gradient_flow_report``: ``log ||ds_T/ds_{T-L}||`` against the lag ``L``, its growth
  rate, the bound ``||J_t|| <= sigma_max(W_h) * max|f'|`` and the memory horizon;
* ``lyapunov_spectrum``: the Lyapunov exponents by the QR method (per step);
* ``step_jacobians`` + ``step_spectra``: eigenvalues and singular values of
  ``J_t = ds_t/ds_{t-1}`` along a trajectory;
* ``spectrum.find_fixed_points``: fixed points of the autonomous dynamics (input 0)
  and their stability.

With matplotlib installed (``pip install "seqjax[plot]"``) the figures go to ``--out``.

Run:  python examples/spectrum_analysis.py [--cell rnn|lstm|gru] [--T 50] [--steps 500]
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import seqjax as sj
from seqjax import spectrum, tasks
from seqjax.layers import dense
from seqjax.losses import mse
from seqjax.seq2seq import many_to_one
from seqjax.train import Logging, clipped_adam, fit


def main(
    cell_name: str = "rnn",
    hidden: int = 32,
    T: int = 50,
    steps: int = 500,
    batch: int = 64,
    analysis_batch: int = 8,
    fixed_point_starts: int = 32,
    out: str | None = "spectrum-analysis",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train, then analyse.

    Args:
      cell_name: ``"rnn"`` (tanh), ``"lstm"`` or ``"gru"``.
      hidden: hidden units.
      T: sequence length of the adding problem.
      steps: Adam steps.
      batch: batch size.
      analysis_batch: sequences the analysis averages over.
      fixed_point_starts: starting states for the fixed-point search (0: skip it).
      out: folder for the figures (``None``: no figures).
      seed: random seed.
      progress: show a progress bar.

    Returns:
      ``{"test_mse", "report", "lyapunov", "spectral_radius", "fixed_points"}``.
    """
    cell = {"rnn": sj.rnn, "lstm": functools.partial(sj.lstm, forget_bias=1.0), "gru": sj.gru}[cell_name](
        hidden
    )
    model = many_to_one(cell, dense(1))
    k_init, k_fit, k_test, k_fp = jax.random.split(jax.random.key(seed), 4)
    params = model.init(k_init, 2)

    def loss_fn(p, batch):
        xs, ys = batch
        return mse(model.apply(p, xs)[:, 0], ys)

    res = fit(
        loss_fn,
        clipped_adam(1e-2),
        params,
        functools.partial(tasks.adding_problem, n=batch, length=T),
        key=k_fit,
        steps=steps,
        logging=Logging(every=max(1, steps // 5), progress=progress),
        mesh=None,
    )
    params = res.state.params
    xs, ys = tasks.adding_problem(k_test, 1000, T)
    test_mse = float(jax.jit(loss_fn)(params, (xs, ys)))
    print(f"{cell_name}({hidden}) on the adding problem, T={T}: test MSE {test_mse:.4f} (guessing: 0.167)")

    body = params["body"]
    x_an = xs[:analysis_batch]
    report = spectrum.gradient_flow_report(cell, body, x_an)
    print("\n" + str(report))
    lyap = spectrum.lyapunov_spectrum(cell, body, x_an, warmup=min(10, T // 5))
    print("\nLyapunov exponents (per step, mean over sequences):")
    print("  " + " ".join(f"{e:+.3f}" for e in np.mean(np.asarray(lyap.exponents), axis=0)))

    J = spectrum.step_jacobians(cell, body, x_an).jacobians  # (B, T, S, S)
    eig, sv = spectrum.step_spectra(J[0])  # (T, S) each
    radius = np.max(np.abs(np.asarray(eig)), axis=-1)
    print(
        f"\nstep Jacobians of sequence 0: spectral radius {radius.min():.3f}..{radius.max():.3f}, "
        f"largest singular value {float(np.max(sv)):.3f}"
    )

    fps = None
    if fixed_point_starts:
        starts = spectrum.sample_states(cell, body, x_an, n=fixed_point_starts, key=k_fp, noise=0.05)
        fps = spectrum.find_fixed_points(cell, body, jnp.zeros((2,)), starts, steps=500)
        print("\nfixed points of the autonomous dynamics (input 0):\n" + str(fps))

    if out is not None:
        _figures(out, report, lyap, eig, fps)
    return {
        "test_mse": test_mse,
        "report": report,
        "lyapunov": np.mean(np.asarray(lyap.exponents), axis=0),
        "spectral_radius": radius,
        "fixed_points": fps,
    }


def _figures(out, report, lyap, eig, fps):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('(no figures: matplotlib is not installed; pip install "seqjax[plot]")')
        return
    from seqjax import plot

    os.makedirs(out, exist_ok=True)
    fig, axes = plt.subplots(1, 3 if fps is None else 4, figsize=(18 if fps is None else 22, 4.5))
    plot.plot_gradient_flow(report, ax=axes[0])
    axes[0].set_title("log10 ||ds_T/ds_(T-L)|| against lag")
    plot.plot_lyapunov_spectrum(lyap, ax=axes[1])
    axes[1].set_title("Lyapunov spectrum")
    plot.plot_eigenvalues(np.asarray(eig), ax=axes[2], s=4)
    axes[2].set_title("eigenvalues of J_t (one sequence, all t)")
    if fps is not None and len(fps):
        fps.plot(ax=axes[3], s=6)
        axes[3].set_title("eigenvalues at the fixed points")
    fig.tight_layout()
    path = os.path.join(out, "spectrum.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nfigure: {path}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", choices=["rnn", "lstm", "gru"], default="rnn")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--out", default="spectrum-analysis")
    a = ap.parse_args()
    main(a.cell, hidden=a.hidden, T=a.T, steps=a.steps, out=a.out)
