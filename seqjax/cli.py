"""The ``seqjax`` command: train, analyse and benchmark recurrent networks from the shell.

::

    seqjax demo [--out DIR] [--steps N] [--T T] [--quick]
        Train a tanh RNN and an LSTM on the adding problem, then explain why one learns
        and the other does not: Lyapunov spectra, gradient norm against lag, eigenvalues of
        W_h and of the step Jacobians. Prints a verdict and writes DIR/report.md + PNGs.
    seqjax train TASK [--cell lstm] [--hidden 128] [--steps N] [--out DIR] [--resume]
        Train any cell on a built-in task, with checkpoints, history and plots.
    seqjax spectrum RUN_DIR [--out DIR]
        The spectrum report of a saved model (a directory written by train or demo).
    seqjax bench [ARGS ...]
        The benchmark suite (``python -m benchmarks ARGS``, from a source checkout).

Exit codes: 0 success, 2 bad arguments, a missing optional extra or an unreadable
checkpoint (with a message saying what to do), 1 any other failure.

A run directory (written by ``train``, and by ``demo`` for each model) holds
``config.json`` (everything needed to rebuild the model), ``checkpoints/`` (orbax, via
``seqjax.train.save_checkpoint``), ``history.json`` and, with matplotlib, ``training.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["main", "run_demo", "CLIError"]

PLOT_EXTRA = 'pip install "seqjax[plot]"'
BASELINE_ADDING_MSE = 1.0 / 6.0


class CLIError(Exception):
    """A user-facing error: printed as ``seqjax: error: <message>``, exit code 2."""


# --------------------------------------------------------------------------- helpers


def _matplotlib(required: bool):
    """``matplotlib.pyplot`` (Agg backend), or ``None`` / ``CLIError`` when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if required:
            raise CLIError(f"plots need matplotlib, which is not installed: {PLOT_EXTRA}") from None
        return None
    return plt


def _say(msg: str = "", *, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


def _adding_batch(key: jax.Array, batch: int, T: int):
    """Adding problem (Hochreiter & Schmidhuber 1997): ``xs: (B, T, 2)``, ``ys: (B, 1)``.

    Channel 0 holds values ``U(0, 1)``, channel 1 marks one step in each half; the target is
    the sum of the two marked values. Predicting 1 always scores MSE 1/6.
    """
    try:
        from seqjax import tasks

        if hasattr(tasks, "adding_problem"):
            xs, ys = tasks.adding_problem(key, batch, T)
            return xs, jnp.reshape(ys, (batch, 1))
    except ImportError:
        pass
    k_v, k_a, k_b = jax.random.split(key, 3)
    values = jax.random.uniform(k_v, (batch, T))
    first = jax.random.randint(k_a, (batch,), 0, T // 2)
    second = jax.random.randint(k_b, (batch,), T // 2, T)
    t = jnp.arange(T)[None, :]
    markers = ((t == first[:, None]) | (t == second[:, None])).astype(jnp.float32)
    xs = jnp.stack([values, markers], axis=-1)
    ys = jnp.sum(values * markers, axis=1, keepdims=True)
    return xs, ys


_CELLS = ("rnn", "irnn", "lstm", "gru", "mgu", "janet")


def _make_cell(name: str, hidden: int):
    import seqjax as sj

    if name == "rnn":
        return sj.rnn(hidden)
    if name == "irnn":
        return sj.irnn(hidden)
    if name == "lstm":
        return sj.lstm(hidden, forget_bias=1.0)
    if name == "gru":
        return sj.gru(hidden)
    if name == "mgu":
        return sj.mgu(hidden)
    if name == "janet":
        return sj.janet(hidden)
    raise CLIError(f"unknown cell {name!r}; choose from {', '.join(_CELLS)}.")


# --------------------------------------------------------------------------- tasks


def _task_registry() -> dict[str, dict]:
    """Built-in tasks: name -> spec (``make(key, batch, T) -> (xs, ys)``, sizes, loss kind)."""
    reg: dict[str, dict] = {
        "adding": {
            "make": _adding_batch,
            "input_size": 2,
            "output_size": 1,
            "loss": "mse",
            "per_step": False,
            "T": 50,
            "doc": "adding problem: sum of two marked values (MSE; always answering 1 scores 0.167)",
        }
    }
    try:
        from seqjax import tasks
    except ImportError:
        return reg
    if hasattr(tasks, "copy_task"):
        K = 8

        def make_copy(key, batch, T):
            L = max(1, min(10, T // 4))
            return tasks.copy_task(key, batch, length=L, delay=T - 2 * L, num_symbols=K)

        reg["copy"] = {
            "make": make_copy,
            "input_size": K + 2,
            "output_size": K + 1,
            "loss": "xent",
            "per_step": True,
            "T": 40,
            "doc": "copy task: recall L = min(10, T//4) of 8 symbols after a delay (cross-entropy per step)",
        }
    return reg


# --------------------------------------------------------------------------- models and run dirs


def _build(config: dict):
    """``(cell, model)`` from a run config: the cell and a ``SeqModel`` with a dense head."""
    from seqjax.layers import dense
    from seqjax.seq2seq import many_to_many, many_to_one

    cell = _make_cell(config["cell"], int(config["hidden"]))
    head = dense(int(config["output_size"]))
    model = many_to_many(cell, head) if config.get("per_step") else many_to_one(cell, head)
    return cell, model


def _loss_fn(config: dict, model):
    from seqjax import losses

    kind = config["loss"]

    def loss_fn(params, batch):
        xs, ys = batch
        out = model.apply(params, xs)
        if kind == "mse":
            return losses.mse(out, ys)
        return losses.softmax_cross_entropy(out, ys)

    return loss_fn


def _optimizer(config: dict):
    from seqjax.train import clipped_adam

    return clipped_adam(float(config["lr"]), max_norm=float(config["clip"]))


def _template(config: dict):
    """A ``TrainState`` of the right structure for restoring (values unused)."""
    from seqjax.train import init_train_state

    _, model = _build(config)
    params = model.init(jax.random.key(0), int(config["input_size"]))
    return init_train_state(params, _optimizer(config), key=jax.random.key(0))


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def load_run(run_dir: str):
    """``(config, cell, model, params, meta)`` of a run directory; ``CLIError`` if unreadable."""
    from seqjax.train import restore_checkpoint

    if not os.path.isdir(run_dir):
        raise CLIError(
            f"{run_dir!r} is not a directory; pass a run directory written by `seqjax train` or `demo`."
        )
    cfg_path = os.path.join(run_dir, "config.json")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
        for k in ("cell", "hidden", "input_size", "output_size", "loss", "lr", "clip"):
            if k not in config:
                raise KeyError(k)
    except FileNotFoundError:
        raise CLIError(
            f"{run_dir!r} has no config.json: not a seqjax run directory (made by `seqjax train` or `demo`)."
        ) from None
    except (json.JSONDecodeError, KeyError) as e:
        raise CLIError(f"cannot read {cfg_path!r}: {type(e).__name__}: {e}.") from None
    ckpt = os.path.join(run_dir, "checkpoints")
    try:
        restored = restore_checkpoint(ckpt, _template(config))
    except CLIError:
        raise
    except Exception as e:  # orbax raises many kinds
        raise CLIError(f"cannot read the checkpoint in {ckpt!r}: {type(e).__name__}: {e}") from None
    if restored is None:
        raise CLIError(f"no checkpoint in {ckpt!r}; train first (`seqjax train ... --out {run_dir}`).")
    state, meta = restored
    cell, model = _build(config)
    return config, cell, model, state.params, meta


# --------------------------------------------------------------------------- analysis


def _gate_names(cell, params, input_size: int, blocks: int) -> list[str]:
    """Names of the column blocks of ``w_h``: the keys of the cell's ``gates`` capability (in
    block order) when it names one per block, else ``h``, ``h1``, ..."""
    if cell.gates is not None:
        like = jax.eval_shape(lambda p: cell.initial_carry(p, ()), params)
        x = jax.ShapeDtypeStruct((input_size,), jax.tree_util.tree_leaves(like)[0].dtype)
        order: list[str] = []  # eval_shape returns dicts with sorted keys: record the order traced

        def gates(p, c, x):
            out = cell.gates(p, c, x)
            order.extend(out)
            return out

        jax.eval_shape(gates, params, like, x)
        names = order
        if len(names) == blocks:
            return names
    return ["h"] if blocks == 1 else [f"h{k}" for k in range(blocks)]


def analyse(cell, params: dict, xs: jax.Array, ys: jax.Array | None = None) -> dict:
    """Spectrum analysis of a trained model on inputs ``xs: (B, T, I)``.

    Returns a dict of NumPy arrays and floats: ``grad_log10`` (``(T,)``, mean over sequences
    of ``log10 ||dL/ds_{T-L}|| / ||dL/ds_T||`` for ``L = 1..T`` when ``ys`` (the targets of a
    many-to-one MSE model whose head is ``params["head"]``) is given, else of
    ``log10 ||ds_T/ds_{T-L}||_2``), ``cell_log10_units`` (cells whose carry has more than one
    leaf, ``(T, units)``: ``log10`` of the product of the last ``L`` diagonal entries of
    ``J_t`` for the memory leaves, per unit, mean over sequences; for the LSTM the forget
    gates) and
    ``cell_log10`` (its maximum over units), ``lyapunov`` (the full
    spectrum, mean over sequences), ``eig_wh`` (eigenvalues of ``W_h`` or, for gated cells,
    of each gate block), ``eig_jac`` (eigenvalues of the step Jacobians of one sequence),
    ``radius_jac`` (their spectral radii over time), ``sigma_wh``.
    """
    from seqjax import spectrum as sp
    from seqjax.unroll import unroll

    body = params["body"]
    T = xs.shape[-2]
    J = sp.step_jacobians(cell, body, xs).jacobians  # (B, T, S, S)
    if ys is not None:
        # dL/ds_T of the many-to-one MSE loss, carried back by the step Jacobians.
        carry, _ = unroll(cell, body, xs)

        def loss_from_carry(c):
            h = cell.output(body, c, xs[:, -1])  # the last output, read from the carry
            out = h @ params["head"]["w"] + params["head"]["b"].reshape((1, -1))
            return jnp.mean((out - ys) ** 2)

        g_flat = sp.flatten_state(jax.grad(loss_from_carry)(carry), batch_ndim=1)
        lag = np.asarray(sp.lag_log_norms(J, cotangent=g_flat))  # (B, T): log ||dL/ds_{T-L}||
        g0 = np.log(np.maximum(np.asarray(jnp.linalg.norm(g_flat, axis=-1)), 1e-30))
        lag = lag - g0[:, None]
    else:
        lag = np.asarray(sp.lag_log_norms(J))  # log ||ds_T/ds_{T-L}||_2
    grad_log10 = np.mean(lag / math.log(10.0), axis=0)
    out: dict[str, Any] = {"grad_log10": grad_log10, "T": T, "cotangent": ys is not None}

    H = cell.meta.hidden_size if cell.meta is not None else None
    like = jax.eval_shape(lambda p: cell.initial_carry(p, ()), body)
    leaves = jax.tree_util.tree_leaves(like)
    if len(leaves) > 1:
        # The self-recurrent path of the memory leaves (every carry leaf after the first):
        # the product of the diagonal of J_t over the last L steps, per unit. For the LSTM
        # this is prod f, since dc_t/dc_{t-1} = diag(f_t) exactly.
        first = int(np.prod(leaves[0].shape, dtype=int))
        d = np.abs(np.diagonal(np.asarray(J), axis1=-2, axis2=-1))[..., first:]  # (B, T, S - first)
        logd = np.log10(np.maximum(d, 1e-30))
        cum = np.cumsum(logd[:, ::-1, :], axis=1)  # lag L = 1..T from the end
        units = np.mean(cum, axis=0)  # (T, units): mean over sequences, per unit
        out["cell_log10_units"] = units
        out["cell_log10"] = np.max(units, axis=-1)  # the most persistent unit
    lyap = sp.lyapunov_spectrum(cell, body, xs, warmup=min(10, T // 5))
    out["lyapunov"] = np.mean(np.asarray(lyap.exponents), axis=0)
    w_h = np.asarray(body["w_h"]) if "w_h" in body else None
    if w_h is not None and H:
        G = w_h.shape[1] // H
        blocks = [w_h[:, k * H : (k + 1) * H] for k in range(G)] if w_h.shape[0] == H else []
        out["eig_wh"] = [np.linalg.eigvals(b) for b in blocks]
        out["gate_names"] = _gate_names(cell, body, xs.shape[-1], G)
        out["sigma_wh"] = float(np.linalg.norm(w_h, 2))
    Jn = np.asarray(J[0], dtype=np.float64)
    eig = np.linalg.eigvals(Jn)  # (T, S)
    out["eig_jac"] = eig
    out["radius_jac"] = np.max(np.abs(eig), axis=-1)
    out["jac_norm"] = np.linalg.norm(Jn, ord=2, axis=(-2, -1))
    return out


def _at_lag(curve: np.ndarray, L: int) -> float:
    return float(curve[min(L, len(curve)) - 1])


def _verdict(results: dict, L: int) -> list[str]:
    """Plain-language findings, each backed by a number from ``results``."""
    lines = []
    r, l_ = results.get("rnn"), results.get("lstm")
    if r is not None:
        k = _at_lag(r["analysis"]["grad_log10"], L)
        lam = float(r["analysis"]["lyapunov"][0])
        mse = r["test_mse"]
        learned = mse < 0.5 * BASELINE_ADDING_MSE
        s = (
            f"The tanh RNN's gradients shrink by about 10^{k:.1f} over {L} steps "
            f"(largest Lyapunov exponent {lam:+.3f} per step, so a perturbation decays like e^({lam:.3f} t))"
        )
        if k < -3:
            s += (
                f": it cannot learn dependencies that long (test MSE {mse:.3f} vs "
                f"{BASELINE_ADDING_MSE:.3f} for guessing)."
            )
        else:
            s += f"; test MSE {mse:.3f} vs {BASELINE_ADDING_MSE:.3f} for guessing" + (
                " (it learned the task)." if learned else "."
            )
        lines.append(s)
    if l_ is not None:
        a = l_["analysis"]
        k_full = _at_lag(a["grad_log10"], L)
        mse = l_["test_mse"]
        s = f"The LSTM's gradients change by about 10^{k_full:.1f} over the same {L} steps"
        if "cell_log10" in a:
            kc = _at_lag(a["cell_log10"], L)
            units = a["cell_log10_units"][min(L, len(a["cell_log10"])) - 1]
            kept = int(np.sum(units > -1.0))
            s += (
                f": its cell path dc_T/dc_(T-{L}) = prod f keeps them near 1 in the units that carry memory "
                f"(best unit 10^{kc:.1f}; {kept} of {units.size} units keep more than 10% over {L} steps)"
            )
        s += f"; test MSE {mse:.3f}" + (
            " (it learned the task)." if mse < 0.5 * BASELINE_ADDING_MSE else " (more steps would help)."
        )
        lines.append(s)
    if r is not None and l_ is not None:
        gap = _at_lag(l_["analysis"]["grad_log10"], L) - _at_lag(r["analysis"]["grad_log10"], L)
        lines.append(
            f"At lag {L} the gradient reaching the LSTM's state is about 10^{gap:.1f} times the tanh RNN's "
            "(same loss, same lag): that ratio, not the number of parameters, decides which one can learn "
            "the task."
        )
    return lines


# --------------------------------------------------------------------------- figures


def _fig_lag(plt, results, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        a = r["analysis"]
        L = np.arange(1, len(a["grad_log10"]) + 1)
        what = "||dL/ds_(T-L)|| / ||dL/ds_T||" if a.get("cotangent", True) else "||ds_T/ds_(T-L)||"
        ax.plot(L, a["grad_log10"], label=f"{name}: {what}")
        if "cell_log10" in a:
            ax.plot(L, a["cell_log10"], "--", label=f"{name}: cell path, prod f (most persistent unit)")
    ax.set_xlabel("lag L (steps back from the end)")
    ax.set_ylabel("log10 gradient ratio")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title("Gradient norm against lag")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fig_lyapunov(plt, results, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        e = r["analysis"]["lyapunov"]
        e = e[np.isfinite(e)]
        ax.plot(np.arange(1, len(e) + 1), e, "o-", ms=3, label=name)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("index i")
    ax.set_ylabel("lambda_i (per step)")
    ax.set_title("Lyapunov spectra")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _unit_circle(ax):
    t = np.linspace(0, 2 * np.pi, 200)
    ax.plot(np.cos(t), np.sin(t), "k", lw=0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("Re")
    ax.set_ylabel("Im")


def _fig_eig(plt, results, path, which):
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        a = r["analysis"]
        _unit_circle(ax)
        if which == "wh":
            for ev, gname in zip(a.get("eig_wh", []), a.get("gate_names", "h"), strict=False):
                ax.scatter(ev.real, ev.imag, s=8, label=f"W_h[{gname}]")
            ax.set_title(f"{name}: eigenvalues of W_h")
        else:
            ev = a["eig_jac"]
            T = ev.shape[0]
            for t in sorted({0, T // 2, T - 1}):
                ax.scatter(ev[t].real, ev[t].imag, s=8, label=f"J_t, t={t + 1}")
            ax.set_title(f"{name}: eigenvalues of step Jacobians")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fig_history(plt, histories: dict, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, hist in histories.items():
        steps = [row["step"] for row in hist if "loss" in row]
        loss = [row["loss"] for row in hist if "loss" in row]
        ax.plot(steps, loss, label=f"{name} train")
        ev = [(row["step"], row["eval_loss"]) for row in hist if "eval_loss" in row]
        if ev:
            ax.plot([e[0] for e in ev], [e[1] for e in ev], "o--", ms=3, label=f"{name} eval")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- training core


def _train(
    config: dict,
    run_dir: str,
    *,
    steps: int,
    batch: int,
    seed: int,
    resume: bool,
    progress: bool,
    quiet: bool,
    eval_size: int = 512,
    checkpoint_every: int | None = None,
):
    """Train per ``config`` into ``run_dir`` with ``seqjax.train.fit``.

    Returns ``(params, history, test_data)``.
    """
    from seqjax.train import fit

    task = _task_registry()[config["task"]]
    T = int(config["T"])
    _, model = _build(config)
    key = jax.random.key(seed)
    k_init, k_fit, k_test = jax.random.split(key, 3)
    params = model.init(k_init, int(config["input_size"]))
    test = task["make"](k_test, eval_size, T)
    os.makedirs(run_dir, exist_ok=True)
    _write_json(os.path.join(run_dir, "config.json"), config)
    log_every = max(1, min(50, steps // 10))
    result = fit(
        _loss_fn(config, model),
        _optimizer(config),
        params,
        lambda k: task["make"](k, batch, T),
        key=k_fit,
        steps=steps,
        eval_data=test,
        eval_batch_size=eval_size,
        eval_every=log_every * max(1, (steps // log_every) // 4),
        log_every=log_every,
        checkpoint_dir=os.path.join(run_dir, "checkpoints"),
        checkpoint_every=checkpoint_every,
        resume=resume,
        history_path=os.path.join(run_dir, "history.json"),
        progress=progress and not quiet,
        mesh=None,
    )
    return result.state.params, result.history, test


def _final_eval(history: list[dict]) -> float | None:
    for row in reversed(history):
        if "eval_loss" in row:
            return float(row["eval_loss"])
    return None


# --------------------------------------------------------------------------- commands


def run_demo(
    out: str = "seqjax-demo",
    *,
    steps: int = 1000,
    T: int = 100,
    hidden: int = 32,
    batch: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    analysis_batch: int = 8,
    progress: bool = True,
    plots: bool = True,
    quiet: bool = False,
) -> dict:
    """Train a tanh RNN and an LSTM on the adding problem and write the spectrum report.

    Args:
      out: the report folder (``report.md``, ``*.png``, ``rnn/`` and ``lstm/`` run dirs).
      steps: Adam steps per model.
      T: sequence length.
      hidden: hidden units of both models.
      batch: batch size.
      lr: learning rate (global-norm clipping at 1).
      seed: random seed.
      analysis_batch: number of test sequences the Jacobian analysis averages over.
      progress: show progress bars.
      plots: write PNG figures (needs matplotlib; skipped with a note when it is missing).
      quiet: print nothing.

    Returns:
      ``{"rnn": {...}, "lstm": {...}, "verdict": [str], "report": path}`` where each model
      entry holds ``test_mse``, ``seconds`` and ``analysis`` (see ``analyse``).
    """
    os.makedirs(out, exist_ok=True)
    plt = _matplotlib(required=False) if plots else None
    if plots and plt is None:
        _say(f"note: matplotlib is not installed, so the report has no figures ({PLOT_EXTRA}).", quiet=quiet)
    results: dict[str, dict] = {}
    histories = {}
    _say(
        f"seqjax demo: adding problem, T={T}; tanh RNN vs LSTM ({hidden} units), {steps} steps each",
        quiet=quiet,
    )
    _say(
        f"(always answering 1 scores test MSE {BASELINE_ADDING_MSE:.3f}; learning means going well below)",
        quiet=quiet,
    )
    for name in ("rnn", "lstm"):
        config = {
            "task": "adding",
            "cell": name,
            "hidden": hidden,
            "input_size": 2,
            "output_size": 1,
            "loss": "mse",
            "per_step": False,
            "T": T,
            "lr": lr,
            "clip": 1.0,
            "batch": batch,
        }
        _say(f"\n[{name}] training ...", quiet=quiet)
        t0 = time.perf_counter()
        params, hist, (x_test, y_test) = _train(
            config,
            os.path.join(out, name),
            steps=steps,
            batch=batch,
            seed=seed,
            resume=False,
            progress=progress,
            quiet=quiet,
        )
        secs = time.perf_counter() - t0
        test_mse = _final_eval(hist)
        _say(
            f"[{name}] test MSE {test_mse:.4f} after {steps} steps ({secs:.1f} s); analysing ...", quiet=quiet
        )
        cell, model = _build(config)
        a = analyse(cell, params, x_test[:analysis_batch], y_test[:analysis_batch])
        results[name] = {"test_mse": test_mse, "seconds": secs, "analysis": a}
        histories[name] = hist
    L = min(100, T)
    verdict = _verdict(results, L)
    figures = {}
    if plt is not None:
        figures = {
            "training": "training.png",
            "gradient_vs_lag": "gradient_vs_lag.png",
            "lyapunov": "lyapunov.png",
            "eig_wh": "eigenvalues_wh.png",
            "eig_jac": "eigenvalues_jacobians.png",
        }
        _fig_history(plt, histories, os.path.join(out, figures["training"]))
        _fig_lag(plt, results, os.path.join(out, figures["gradient_vs_lag"]))
        _fig_lyapunov(plt, results, os.path.join(out, figures["lyapunov"]))
        _fig_eig(plt, results, os.path.join(out, figures["eig_wh"]), "wh")
        _fig_eig(plt, results, os.path.join(out, figures["eig_jac"]), "jac")
    report = os.path.join(out, "report.md")
    _write_demo_report(report, results, verdict, figures, T=T, steps=steps, hidden=hidden, L=L)
    _write_json(
        os.path.join(out, "summary.json"),
        {
            "T": T,
            "steps": steps,
            "hidden": hidden,
            "verdict": verdict,
            **{
                n: {
                    "test_mse": r["test_mse"],
                    "seconds": r["seconds"],
                    "grad_log10_at_lag": _at_lag(r["analysis"]["grad_log10"], L),
                    "lyapunov_max": float(r["analysis"]["lyapunov"][0]),
                    **(
                        {"cell_log10_at_lag": _at_lag(r["analysis"]["cell_log10"], L)}
                        if "cell_log10" in r["analysis"]
                        else {}
                    ),
                }
                for n, r in results.items()
            },
        },
    )
    _say("\nVerdict", quiet=quiet)
    for line in verdict:
        _say("  - " + line, quiet=quiet)
    _say(f"\nReport: {report}", quiet=quiet)
    _say(
        f"Next: seqjax spectrum {os.path.join(out, 'lstm')} --plot  (spectrum report of one saved model)",
        quiet=quiet,
    )
    return {**results, "verdict": verdict, "report": report}


def _fmt(x, f="{:.4f}"):
    return "n/a" if x is None else f.format(x)


def _write_demo_report(path, results, verdict, figures, *, T, steps, hidden, L):
    lines = [
        "# seqjax demo: why the LSTM learns the adding problem and the tanh RNN does not",
        "",
        f"Adding problem, T = {T}; {hidden} hidden units; {steps} Adam steps (lr as configured, "
        f"global-norm clipping at 1). Always answering 1 scores MSE {BASELINE_ADDING_MSE:.3f}.",
        "",
        "## Verdict",
        "",
        *[f"- {v}" for v in verdict],
        "",
        "## Numbers",
        "",
        f"| model | test MSE | train time (s) | log10 gradient ratio at lag {L} | "
        "largest Lyapunov exponent | "
        "sigma_max(W_h) | mean spectral radius of J_t |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        a = r["analysis"]
        lines.append(
            f"| {name} | {_fmt(r['test_mse'])} | {r['seconds']:.1f} | {_at_lag(a['grad_log10'], L):.2f} | "
            f"{float(a['lyapunov'][0]):+.4f} | {_fmt(a.get('sigma_wh'), '{:.3f}')} | "
            f"{float(np.mean(a['radius_jac'])):.3f} |"
        )
    if "lstm" in results and "cell_log10" in results["lstm"]["analysis"]:
        lines += [
            "",
            f"LSTM cell path: log10 of the product of forget gates over {L} steps (most persistent unit): "
            f"{_at_lag(results['lstm']['analysis']['cell_log10'], L):.2f}.",
        ]
    lines += [
        "",
        "Definitions: the state s is the whole carry (h for the RNN, [h, c] for the LSTM); "
        "J_t = ds_t/ds_(t-1); the gradient ratio is ||dL/ds_(T-L)|| / ||dL/ds_T|| for the trained "
        "model's loss (Pascanu, Mikolov & Bengio 2013); Lyapunov exponents by the QR method "
        "(per step, natural log).",
        "",
    ]
    titles = {
        "training": "Training curves",
        "gradient_vs_lag": "Gradient norm against lag",
        "lyapunov": "Lyapunov spectra",
        "eig_wh": "Eigenvalues of W_h",
        "eig_jac": "Eigenvalues of the step Jacobians",
    }
    if figures:
        lines += ["## Figures", ""]
        for k, fn in figures.items():
            lines += [f"### {titles[k]}", "", f"![{titles[k]}]({fn})", ""]
    else:
        lines += [f"(No figures: matplotlib is not installed; {PLOT_EXTRA}.)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _cmd_demo(args) -> int:
    steps, T, hidden, batch = args.steps, args.T, args.hidden, args.batch
    if args.quick:
        steps = steps or 300
        T = T or 50
    if args.tiny:
        steps, T, hidden, batch = steps or 4, T or 8, 4, 8
    run_demo(
        args.out,
        steps=steps or 1000,
        T=T or 100,
        hidden=hidden,
        batch=batch,
        lr=args.lr,
        seed=args.seed,
        analysis_batch=2 if args.tiny else 8,
        progress=not args.no_progress,
        plots=not args.no_plots,
    )
    return 0


def _cmd_train(args) -> int:
    reg = _task_registry()
    if args.task not in reg:
        raise CLIError(f"unknown task {args.task!r}; choose from {', '.join(sorted(reg))}.")
    if args.cell not in _CELLS:
        raise CLIError(f"unknown cell {args.cell!r}; choose from {', '.join(_CELLS)}.")
    for name in ("hidden", "steps", "batch"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    plt = _matplotlib(required=args.plot)
    task = reg[args.task]
    out = args.out or os.path.join("runs", f"{args.task}-{args.cell}{args.hidden}")
    T = args.T or int(task["T"])
    config = {
        "task": args.task,
        "cell": args.cell,
        "hidden": args.hidden,
        "input_size": int(task["input_size"]),
        "output_size": int(task["output_size"]),
        "loss": task["loss"],
        "per_step": bool(task.get("per_step", False)),
        "T": T,
        "lr": args.lr,
        "clip": args.clip,
        "batch": args.batch,
    }
    cfg_path = os.path.join(out, "config.json")
    if args.resume:
        if not os.path.exists(cfg_path):
            raise CLIError(f"--resume: {out!r} holds no run to resume (no config.json).")
        with open(cfg_path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            raise CLIError(
                f"--resume: the options differ from the saved run in {out!r}: {diff} (saved, given)."
            )
    elif os.path.exists(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
        raise CLIError(
            f"{out!r} already holds a run; pass --resume to continue it or --out to start another."
        )
    print(
        f"seqjax train: {args.task} (T={T}), {args.cell} with {args.hidden} units, "
        f"{args.steps} steps -> {out}"
    )
    _, hist, _ = _train(
        config,
        out,
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        resume=args.resume,
        progress=not args.no_progress,
        quiet=False,
        checkpoint_every=args.checkpoint_every,
    )
    if plt is not None:
        _fig_history(plt, {args.cell: hist}, os.path.join(out, "training.png"))
    final = hist[-1] if hist else {}
    print(
        f"done: step {final.get('step')}, train loss {_fmt(final.get('loss'))}, "
        f"eval loss {_fmt(_final_eval(hist))}; checkpoints in {os.path.join(out, 'checkpoints')}"
    )
    return 0


def _cmd_spectrum(args) -> int:
    config, cell, model, params, _ = load_run(args.run)
    plt = _matplotlib(required=args.plot)
    out = args.out or os.path.join(args.run, "spectrum")
    os.makedirs(out, exist_ok=True)
    task = _task_registry().get(config["task"])
    if task is None:
        raise CLIError(f"the run's task {config['task']!r} is not a built-in task here; cannot make inputs.")
    T = args.T or int(config["T"])
    xs, ys = task["make"](jax.random.key(args.seed), args.batch, T)
    many_to_one_mse = not config.get("per_step") and config["loss"] == "mse"
    a = analyse(cell, params, xs, ys if many_to_one_mse else None)
    name = config["cell"]
    L = min(100, T)
    results = {name: {"analysis": a}}
    lines = [
        f"# Spectrum report: {name} ({config['hidden']} units) on {config['task']}, T = {T}",
        "",
        (
            f"- log10 ||dL/ds_(T-L)|| / ||dL/ds_T|| at lag {L}: {_at_lag(a['grad_log10'], L):.2f}"
            if a["cotangent"]
            else f"- log10 ||ds_T/ds_(T-L)||_2 at lag {L}: {_at_lag(a['grad_log10'], L):.2f}"
        ),
        f"- largest Lyapunov exponent: {float(a['lyapunov'][0]):+.4f} per step",
        f"- mean spectral radius of the step Jacobians: {float(np.mean(a['radius_jac'])):.3f}",
        f"- mean ||J_t||_2: {float(np.mean(a['jac_norm'])):.3f}",
    ]
    if "sigma_wh" in a:
        lines.append(f"- sigma_max(W_h): {a['sigma_wh']:.3f}")
    if "cell_log10" in a:
        lines.append(
            f"- log10 product of forget gates over {L} steps (most persistent unit): "
            f"{_at_lag(a['cell_log10'], L):.2f}"
        )
    lines += ["", "Lyapunov spectrum: " + ", ".join(f"{e:+.3f}" for e in a["lyapunov"]), ""]
    if plt is not None:
        _fig_lag(plt, results, os.path.join(out, "gradient_vs_lag.png"))
        _fig_lyapunov(plt, results, os.path.join(out, "lyapunov.png"))
        _fig_eig(plt, results, os.path.join(out, "eigenvalues_wh.png"), "wh")
        _fig_eig(plt, results, os.path.join(out, "eigenvalues_jacobians.png"), "jac")
        lines += [
            f"![{f}]({f}.png)\n"
            for f in ("gradient_vs_lag", "lyapunov", "eigenvalues_wh", "eigenvalues_jacobians")
        ]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    _write_json(
        os.path.join(out, "spectrum.json"),
        {"lyapunov": a["lyapunov"].tolist(), "grad_log10": a["grad_log10"].tolist(), "T": T, "cell": name},
    )
    print("\n".join(lines[:8]))
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def _cmd_bench(args) -> int:
    try:
        from benchmarks.cli import main as bench_main
    except ImportError:
        raise CLIError(
            "the benchmark suite is not importable: it lives in the benchmarks/ folder of the seqjax source "
            "repository. Run `seqjax bench` (or `python -m benchmarks`) from a source checkout, with "
            'pip install -e ".[bench]".'
        ) from None
    return int(bench_main(list(args.bench_args)) or 0)


# --------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqjax", description="Functional recurrent networks in JAX.")
    from seqjax import __version__

    p.add_argument("--version", action="version", version=f"seqjax {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "demo", help="train a tanh RNN and an LSTM on the adding problem and explain the difference"
    )
    d.add_argument("--out", default="seqjax-demo", help="report folder (default: seqjax-demo)")
    d.add_argument(
        "--steps", type=_positive, default=None, help="Adam steps per model (default 1000; --quick 300)"
    )
    d.add_argument("--T", type=_positive, default=None, help="sequence length (default 100; --quick 50)")
    d.add_argument("--hidden", type=_positive, default=32, help="hidden units (default 32)")
    d.add_argument("--batch", type=_positive, default=64, help="batch size (default 64)")
    d.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a shorter run (T=50, 300 steps)")
    d.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--no-plots", action="store_true", help="no PNG figures")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="train a cell on a built-in task (checkpoints, resume, history, plots)")
    t.add_argument("task", help="task name (e.g. adding)")
    t.add_argument("--cell", default="lstm", help=f"one of {', '.join(_CELLS)} (default lstm)")
    t.add_argument("--hidden", type=int, default=128, help="hidden units (default 128)")
    t.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    t.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    t.add_argument("--T", type=_positive, default=None, help="sequence length (default: the task's)")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--clip", type=float, default=1.0, help="global-norm gradient clipping (default 1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="run directory (default runs/TASK-CELLHIDDEN)")
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    t.add_argument("--checkpoint-every", type=_positive, default=None, help="steps between checkpoints")
    t.add_argument("--plot", action="store_true", help="also write training.png (needs matplotlib)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("spectrum", help="spectrum report of a saved model (a run directory)")
    s.add_argument(
        "run", help="run directory written by `seqjax train` or `seqjax demo` (e.g. seqjax-demo/lstm)"
    )
    s.add_argument("--out", default=None, help="report folder (default RUN/spectrum)")
    s.add_argument(
        "--T", type=_positive, default=None, help="sequence length to analyse (default: the run's)"
    )
    s.add_argument("--batch", type=_positive, default=8, help="sequences to average over (default 8)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--plot", action="store_true", help="also write PNG figures (needs matplotlib)")
    s.set_defaults(func=_cmd_spectrum)

    b = sub.add_parser("bench", help="run the benchmark suite (python -m benchmarks ...)", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m benchmarks")
    b.set_defaults(func=_cmd_bench)
    return p


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``seqjax`` command.

    Args:
      argv: the arguments (default ``sys.argv[1:]``).

    Returns:
      The exit code: 0 on success, 2 for bad arguments, a missing optional extra or an
      unreadable checkpoint (a message on stderr says what to do), 1 otherwise.
    """
    parser = _parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2)
        return int(e.code or 0)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"seqjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seqjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
