"""The argument parser of the ``seqjax`` command (one subparser per command of
``seqjax.cli.commands``)."""

from __future__ import annotations

import argparse

from seqjax._util import positive_int
from seqjax.cli import commands
from seqjax.cli.runs import CELLS

__all__ = ["build_parser"]


def _positive(s: str) -> int:
    """An argparse ``type``: ``s`` as a positive integer (``seqjax._util.positive_int``)."""
    try:
        return positive_int(int(s), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The parser: ``demo``, ``train``, ``spectrum`` and ``bench``, each with ``func`` set to
    its command."""
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
    d.set_defaults(func=commands.cmd_demo)

    t = sub.add_parser("train", help="train a cell on a built-in task (checkpoints, resume, history, plots)")
    t.add_argument("task", help="task name (e.g. adding)")
    t.add_argument("--cell", default="lstm", help=f"one of {', '.join(CELLS)} (default lstm)")
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
    t.set_defaults(func=commands.cmd_train)

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
    s.set_defaults(func=commands.cmd_spectrum)

    b = sub.add_parser("bench", help="run the benchmark suite (python -m benchmarks ...)", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m benchmarks")
    b.set_defaults(func=commands.cmd_bench)
    return p
