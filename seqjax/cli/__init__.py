"""The ``seqjax`` command: train, analyse and benchmark recurrent networks from the shell.

```text
seqjax demo [--out DIR] [--steps N] [--T T] [--quick]
    Train a tanh RNN and an LSTM on the adding problem, then explain why one learns
    and the other does not: Lyapunov spectra, gradient norm against lag, eigenvalues of
    W_h and of the step Jacobians. Prints a verdict and writes DIR/report.md + PNGs.
seqjax train TASK [--cell lstm] [--hidden 128] [--steps N] [--run-dir DIR] [TASK OPTIONS]
seqjax train --run-dir DIR --resume [--steps N]
    Train any cell on a built-in task (adding, copy, digits, sunspots, char), with
    checkpoints, history, a comparison with the task's baselines and plots; --resume
    continues a run with the options saved in DIR/config.json.
seqjax spectrum RUN_DIR [--out DIR]
    The spectrum report of a saved model (a directory written by train or demo).
seqjax bench [ARGS ...]
    The benchmark suite (``python -m benchmarks ARGS``, from a source checkout; ARGS are
    passed on unchanged, ``--help`` included).
```

Exit codes: 0 success, 2 bad arguments, a missing optional extra or an unreadable
checkpoint (with a message saying what to do), 1 any other failure.

A run directory (written by ``train``, and by ``demo`` for each model) holds
``config.json`` (every option of the run; everything needed to rebuild the model),
``checkpoints/`` (orbax, via ``seqjax.train.save_checkpoint``), ``history.json``,
``summary.json`` (``train``: the last evaluation beside the task's baselines) and, with
matplotlib, ``training.png``.

The package only parses arguments and calls the library: ``parser`` (the argument parser),
``commands`` (one function per command; analyses and reports from ``seqjax.diagnose``,
figures from ``seqjax.plot``), ``tasks`` (the built-in tasks: options, data, losses,
baselines), ``runs`` (configurations, new or resumed, and run directories: build, train,
load) and ``errors``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from seqjax.cli.commands import run_demo
from seqjax.cli.errors import CLIError
from seqjax.cli.runs import load_run

__all__ = ["main", "run_demo", "load_run", "CLIError"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``seqjax`` command.

    Args:
      argv: the arguments (default ``sys.argv[1:]``).

    Returns:
      The exit code: 0 on success, 2 for bad arguments, a missing optional extra or an
      unreadable checkpoint (a message on stderr says what to do), 1 otherwise.
    """
    import argparse

    from seqjax.cli import commands
    from seqjax.cli.parser import build_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after it is the suite's, options and --help included
        args = argparse.Namespace(func=commands.cmd_bench, bench_args=argv[1:])
    else:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
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
