"""The ``seqjax`` subcommands: each reads its parsed arguments, calls the library
(``seqjax.diagnose`` for analyses and reports, ``seqjax.plot`` for figures, the run
directories of ``seqjax.cli.runs`` for training) and writes what it says."""

from __future__ import annotations

import importlib
import os
import sys
import time

import jax

from seqjax import diagnose as dg
from seqjax import plot
from seqjax.cli.runs import (
    TRAIN_DEFAULTS,
    TRAIN_KEYS,
    CLIError,
    _build,
    _final_eval,
    _train,
    _write_json,
    checkpoint_step,
    load_run,
    new_config,
    read_config,
    resume_config,
)
from seqjax.cli.tasks import TASKS
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
        f"(always answering 1 scores test MSE {ADDING_BASELINE_MSE:.3f}; 'learned' needs a test MSE below "
        f"{dg.LEARNED_MSE_RATIO:g} x that)",
        quiet=quiet,
    )
    for name in ("rnn", "lstm"):
        config = new_config(
            {
                "task": "adding",
                "cell": name,
                "hidden": hidden,
                "T": T,
                "lr": lr,
                "clip": 1.0,
                "batch": batch,
                "steps": steps,
                "seed": seed,
            }
        )
        _say(f"\n[{name}] training ...", quiet=quiet)
        t0 = time.perf_counter()
        params, hist, data = _train(
            config, os.path.join(out, name), resume=False, progress=progress, quiet=quiet
        )
        x_test, y_test = data.test
        secs = time.perf_counter() - t0
        test_mse = _final_eval(hist)
        _say(
            f"[{name}] test MSE {dg._fmt(test_mse)} after {steps} steps ({secs:.1f} s); analysing ...",
            quiet=quiet,
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


def _given(args) -> dict:
    """The ``train`` options given on the command line: config key -> value (``None``: not given)."""
    return {k: getattr(args, k, None) for k in TRAIN_KEYS}


def _default_dir(config: dict) -> str:
    return os.path.join("runs", f"{config['task']}-{config['cell']}{config['hidden']}")


def _resolve_train(args) -> tuple[dict, str, int | None]:
    """``(config, run_dir, step reached)`` of ``seqjax train``: a new run's configuration, or
    the saved one with ``--resume``. ``CLIError`` for what cannot run."""
    given = _given(args)
    if not args.resume:
        config = new_config(given)
        out = args.out or _default_dir(config)
        if checkpoint_step(out) is not None:
            raise CLIError(
                f"{out!r} already holds a run; pass --resume to continue it or --run-dir to start another."
            )
        return config, out, None
    if args.out is None:
        if given["task"] is None:
            raise CLIError(
                "--resume needs the run: pass --run-dir DIR "
                "(or the TASK and options of its default directory)."
            )
        out = _default_dir({**TRAIN_DEFAULTS, **{k: v for k, v in given.items() if v is not None}})
    else:
        out = args.out
    if not os.path.exists(os.path.join(out, "config.json")):
        raise CLIError(f"--resume: {out!r} holds no run to resume (no config.json).")
    saved, cfg_path = read_config(out)
    config, notes = resume_config(given, saved, cfg_path)
    for note in notes:
        print(f"note: {note}.")
    done = checkpoint_step(out)
    steps = int(config["steps"])
    if done is not None and done > steps:
        raise CLIError(
            f"the run in {out!r} is already at step {done}, beyond --steps {steps} (the total number of "
            f"steps, not steps to add); pass --steps {done} or more."
        )
    return config, out, done


_LOSS_LABEL = {"mse": "held-out MSE", "xent": "held-out cross-entropy (nats)", "bits": "held-out bits/char"}
_METRIC_LABEL = {
    "eval_accuracy": "held-out accuracy",
    "eval_recall_accuracy": "accuracy on the recalled symbols",
}


def _label(metric: str, config: dict) -> str:
    if metric == "eval_loss":
        return _LOSS_LABEL.get(config.get("loss", ""), "held-out loss")
    return _METRIC_LABEL.get(metric, metric)


def _compare(data, row: dict) -> list[dict]:
    """Each baseline of the task beside the model's score on the same held-out data."""
    rows = []
    for b in data.baselines:
        v = row.get(b.metric)
        rows.append(
            {
                "metric": b.metric,
                "model": v,
                "baseline": b.value,
                "baseline_name": b.name,
                "higher_is_better": b.higher_is_better,
                "ratio": None if v is None or b.value == 0 else float(v) / b.value,
            }
        )
    return rows


def cmd_train(args) -> int:
    """``seqjax train TASK``: train a cell on a built-in task into a run directory
    (checkpoints, history, summary, plots), or continue one (``--resume``, with its saved
    options). Returns the exit code; ``CLIError`` for what cannot run."""
    config, out, done = _resolve_train(args)
    draw = _plots(required=args.plot)
    steps = int(config["steps"])
    if done is not None and done == steps:
        print(
            f"nothing to do: the run in {out!r} is at step {done} of its {steps}; pass --steps N with "
            f"N > {done} to train it further."
        )
        return 0
    if args.resume and done is None:
        print(f"note: {out!r} has no checkpoint yet; starting from step 0 with its saved options.")
    T, cell, hidden = config["T"], config["cell"], config["hidden"]
    print(
        f"seqjax train: {config['task']} (T={T}), {cell} with {hidden} units, {steps} steps"
        + (f" (resuming at step {done})" if done else "")
        + f" -> {out}"
    )
    _, hist, data = _train(config, out, resume=args.resume, progress=not args.no_progress, quiet=False)
    if draw:
        plot.write_figures(out, histories={cell: hist})
    final = hist[-1] if hist else {}
    ev_row: dict = next((r for r in reversed(hist) if "eval_loss" in r), {})
    loss, ev = final.get("loss"), ev_row.get("eval_loss")
    print(
        f"done: step {final.get('step')}, train loss {'n/a' if loss is None else f'{loss:.4f}'}, "
        f"eval loss {'n/a' if ev is None else f'{ev:.4f}'}; checkpoints in {os.path.join(out, 'checkpoints')}"
    )
    comparison = _compare(data, ev_row)
    for c in comparison:
        label = _label(c["metric"], config)
        if c["model"] is None:
            print(f"  {label}: not evaluated; {c['baseline_name']} scores {c['baseline']:.4f}")
            continue
        ratio = "" if c["ratio"] is None else f" ({c['ratio']:.3g} x)"
        print(f"  {label} {c['model']:.4f} vs {c['baseline']:.4f} for {c['baseline_name']}{ratio}")
    skipped = int(final.get("skipped", 0) or 0)
    if skipped:
        print(
            f"warning: {skipped} steps had a non-finite loss or gradient and were skipped (not applied); "
            "a lower --lr or --clip may help."
        )
    _write_json(
        os.path.join(out, "summary.json"),
        {
            "task": config["task"],
            "step": final.get("step"),
            "train_loss": loss,
            "eval": {k.removeprefix("eval_"): v for k, v in ev_row.items() if k.startswith("eval_")},
            "baselines": comparison,
            "skipped": skipped,
        },
    )
    return 0


def cmd_spectrum(args) -> int:
    """``seqjax spectrum RUN``: the spectrum report (``report.md``, ``spectrum.json``, figures)
    of the model saved in a run directory. Returns the exit code, 0."""
    config, cell, model, params, _ = load_run(args.run)
    draw = _plots(required=args.plot)
    out = args.out or os.path.join(args.run, "spectrum")
    os.makedirs(out, exist_ok=True)
    task = TASKS.get(config.get("task"))
    if task is None:
        raise CLIError(
            f"the run's task {config.get('task')!r} is not a built-in task here; cannot make inputs."
        )
    T = args.T or int(config["T"])
    xs, ys = task.probe(config, jax.random.key(args.seed), args.batch, T)
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


BENCH_HELP = """usage: seqjax bench [ARGS ...]

Run the benchmark suite: `seqjax bench ARGS` is `python -m benchmarks ARGS` (ARGS passed on
unchanged, --help included). The suite lives in the benchmarks/ folder of the seqjax source
repository, not in the installed package: run it from a source checkout, installed with
pip install -e ".[bench]"."""


def _bench_main():
    """The benchmark suite's ``main``, or ``None`` when there is no suite to import.

    The suite is the ``benchmarks`` package of a source checkout: importable as it is when
    Python runs from the checkout (``python -m seqjax.cli``), else found next to this
    ``seqjax`` package (an editable install, whose console script does not put the checkout
    on ``sys.path``) or in the working directory. A dependency of the suite that is missing
    is a ``CLIError`` naming it."""
    import seqjax

    roots = [os.path.dirname(os.path.dirname(os.path.abspath(seqjax.__file__))), os.getcwd()]
    for root in [None, *roots]:
        if root is not None:
            if not os.path.isfile(os.path.join(root, "benchmarks", "cli.py")):
                continue
            if root not in sys.path:
                sys.path.insert(0, root)
        try:
            # imported by name: the suite is not part of the package (type checkers do not follow it)
            return importlib.import_module("benchmarks.cli").main
        except ModuleNotFoundError as e:
            if e.name is not None and e.name.split(".")[0] != "benchmarks":
                raise CLIError(
                    f"the benchmark suite needs {e.name}, which is not installed: "
                    'pip install -e ".[bench]" in the source checkout.'
                ) from None
        except (ImportError, AttributeError):
            pass
    return None


def cmd_bench(args) -> int:
    """``seqjax bench ARGS``: the benchmark suite's ``main(ARGS)`` (a source checkout only;
    ``CLIError`` otherwise). ``-h``/``--help`` prints what the command does, then the suite's
    own help (or, outside a source checkout, why it is not there). Returns its exit code."""
    argv = list(args.bench_args)
    wants_help = any(a in ("-h", "--help") for a in argv)
    if wants_help:
        print(BENCH_HELP + "\n")
    bench_main = _bench_main()
    if bench_main is None:
        if wants_help:
            print("The benchmark suite is not importable here (not a source checkout).")
            return 0
        raise CLIError(
            "the benchmark suite is not importable: it lives in the benchmarks/ folder of the seqjax source "
            "repository. Run `seqjax bench` (or `python -m benchmarks`) from a source checkout, with "
            'pip install -e ".[bench]".'
        )
    if wants_help:
        print("The suite's options (python -m benchmarks):\n")
    try:
        return int(bench_main(argv) or 0)
    except SystemExit as e:  # the suite's argparse: --help (0) or a usage error (2)
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
