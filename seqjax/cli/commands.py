"""The ``seqjax`` subcommands: each reads its parsed arguments, calls the library
(``seqjax.diagnose`` for analyses and reports, ``seqjax.plot`` for figures, the run
directories of ``seqjax.cli.runs`` for training) and writes what it says."""

from __future__ import annotations

import importlib
import json
import os
import time

import jax

from seqjax import diagnose as dg
from seqjax import plot
from seqjax._util import positive_int
from seqjax.cli.runs import (
    CELLS,
    CLIError,
    _build,
    _final_eval,
    _task_registry,
    _train,
    _write_json,
    load_run,
)
from seqjax.tasks import ADDING_BASELINE_MSE

__all__ = ["run_demo", "cmd_demo", "cmd_train", "cmd_spectrum", "cmd_bench"]


def _say(msg: str = "", *, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


def _plots(required: bool) -> bool:
    """Whether figures can be drawn; ``CLIError`` naming the extra when ``required`` and not."""
    if plot.matplotlib_available():
        return True
    if required:
        raise CLIError(f"plots need matplotlib, which is not installed: {plot.PLOT_EXTRA}")
    return False


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
      out: the report folder (``report.md``, ``summary.json``, ``*.png``, and the run
        directories ``rnn/`` and ``lstm/``).
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
      ``{"rnn": TrainedModel, "lstm": TrainedModel, "verdict": [str], "report": path}``
      (``seqjax.diagnose.TrainedModel``: ``diagnosis``, ``test_mse``, ``seconds``).
    """
    os.makedirs(out, exist_ok=True)
    draw = plots and _plots(required=False)
    if plots and not draw:
        _say(
            f"note: matplotlib is not installed, so the report has no figures ({plot.PLOT_EXTRA}).",
            quiet=quiet,
        )
    results: dict[str, dg.TrainedModel] = {}
    histories = {}
    _say(
        f"seqjax demo: adding problem, T={T}; tanh RNN vs LSTM ({hidden} units), {steps} steps each",
        quiet=quiet,
    )
    _say(
        f"(always answering 1 scores test MSE {ADDING_BASELINE_MSE:.3f}; learning means going well below)",
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
        cell, _ = _build(config)
        d = dg.diagnose(cell, params, x_test[:analysis_batch], ys=y_test[:analysis_batch])
        results[name] = dg.TrainedModel(d, test_mse, secs)
        histories[name] = hist
    L = min(100, T)
    findings = dg.verdict(results, L)
    figures = {}
    if draw:
        figures = plot.write_figures(out, {n: r.diagnosis for n, r in results.items()}, histories=histories)
    report = os.path.join(out, "report.md")
    with open(report, "w") as f:
        f.write(dg.demo_report(results, findings, figures, T=T, steps=steps, hidden=hidden, lag=L))
    _write_json(
        os.path.join(out, "summary.json"),
        dg.demo_summary(results, findings, T=T, steps=steps, hidden=hidden, lag=L),
    )
    _say("\nVerdict", quiet=quiet)
    for line in findings:
        _say("  - " + line, quiet=quiet)
    _say(f"\nReport: {report}", quiet=quiet)
    _say(
        f"Next: seqjax spectrum {os.path.join(out, 'lstm')} --plot  (spectrum report of one saved model)",
        quiet=quiet,
    )
    return {**results, "verdict": findings, "report": report}


def cmd_demo(args) -> int:
    """``seqjax demo``: ``run_demo`` with the parsed options (``--quick`` and ``--tiny`` shrink
    the defaults of ``--steps`` and ``--T``). Returns the exit code, 0."""
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


def cmd_train(args) -> int:
    """``seqjax train TASK``: train a cell on a built-in task into a run directory
    (checkpoints, history, plots). Returns the exit code; ``CLIError`` for an unknown task."""
    reg = _task_registry()
    if args.task not in reg:
        raise CLIError(f"unknown task {args.task!r}; choose from {', '.join(sorted(reg))}.")
    if args.cell not in CELLS:
        raise CLIError(f"unknown cell {args.cell!r}; choose from {', '.join(CELLS)}.")
    for name in ("hidden", "steps", "batch"):
        try:
            positive_int(getattr(args, name), f"--{name}")
        except ValueError as e:
            raise CLIError(str(e)) from None
    draw = _plots(required=args.plot)
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
    if draw:
        plot.write_figures(out, histories={args.cell: hist})
    final = hist[-1] if hist else {}
    loss, ev = final.get("loss"), _final_eval(hist)
    print(
        f"done: step {final.get('step')}, train loss {'n/a' if loss is None else f'{loss:.4f}'}, "
        f"eval loss {'n/a' if ev is None else f'{ev:.4f}'}; checkpoints in {os.path.join(out, 'checkpoints')}"
    )
    return 0


def cmd_spectrum(args) -> int:
    """``seqjax spectrum RUN``: the spectrum report (``report.md``, ``spectrum.json``, figures)
    of the model saved in a run directory. Returns the exit code, 0."""
    config, cell, model, params, _ = load_run(args.run)
    draw = _plots(required=args.plot)
    out = args.out or os.path.join(args.run, "spectrum")
    os.makedirs(out, exist_ok=True)
    task = _task_registry().get(config["task"])
    if task is None:
        raise CLIError(f"the run's task {config['task']!r} is not a built-in task here; cannot make inputs.")
    T = args.T or int(config["T"])
    xs, ys = task["make"](jax.random.key(args.seed), args.batch, T)
    many_to_one_mse = not config.get("per_step") and config["loss"] == "mse"
    d = dg.diagnose(cell, params, xs, ys=ys if many_to_one_mse else None)
    name = config["cell"]
    figures = plot.write_figures(out, {name: d}) if draw else {}
    lines = dg.spectrum_report(
        d,
        name=name,
        hidden=config["hidden"],
        task=config["task"],
        T=T,
        lag=min(100, T),
        figures=list(figures),
    )
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    _write_json(
        os.path.join(out, "spectrum.json"),
        {"lyapunov": d.lyapunov.tolist(), "grad_log10": d.grad_log10.tolist(), "T": T, "cell": name},
    )
    print("\n".join(lines[:8]))
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def cmd_bench(args) -> int:
    """``seqjax bench ARGS``: the benchmark suite's ``main(ARGS)`` (a source checkout only;
    ``CLIError`` otherwise). Returns its exit code."""
    try:
        # imported by name: the suite is not part of the package (type checkers do not follow it)
        bench_main = importlib.import_module("benchmarks.cli").main
    except (ImportError, AttributeError):
        raise CLIError(
            "the benchmark suite is not importable: it lives in the benchmarks/ folder of the seqjax source "
            "repository. Run `seqjax bench` (or `python -m benchmarks`) from a source checkout, with "
            'pip install -e ".[bench]".'
        ) from None
    return int(bench_main(list(args.bench_args)) or 0)
