"""The argument parser of the ``seqjax`` command (one subparser per command of
``seqjax.cli.commands``).

``train``'s options all default to ``None`` so that the command can tell an option given
on the command line from one left out: a new run fills what is left out from
``seqjax.cli.runs.TRAIN_DEFAULTS`` and the task's defaults, a resumed run from its saved
``config.json``.
"""

from __future__ import annotations

import argparse
import textwrap

from seqjax.cli import commands
from seqjax.cli.runs import CELLS, RESUME_MAY_CHANGE, TRAIN_DEFAULTS
from seqjax.cli.tasks import TASKS, positive_arg, positive_float_arg

__all__ = ["build_parser"]

_positive = positive_arg  # the name the demo options use


def _tasks_text() -> str:
    lines = ["tasks (TASK):"]
    for t in TASKS.values():
        T = "" if t.default_T is None else f" Default T {t.default_T}."
        body = textwrap.wrap(t.summary + "." + T, 70)
        lines.append(f"  {t.name:<9} {body[0]}")
        lines += [" " * 12 + b for b in body[1:]]
    return "\n".join(lines)


def _train_epilog() -> str:
    may = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
    return textwrap.dedent(
        f"""\
        resume: `seqjax train --run-dir DIR --resume` continues the run in DIR with the options saved
        in DIR/config.json. Only {may} (and --plot, --no-progress) may change on resume
        (--steps is the total: a larger value extends the run). Any other option given again must
        equal its saved value, or the command stops with an error naming both.

        examples:
          seqjax train adding --cell lstm --hidden 64 --steps 2000 --run-dir runs/a
          seqjax train --run-dir runs/a --resume --steps 4000
          seqjax train copy --length 5 --delay 20 --cell gru
          seqjax train char --modules textwrap,string --T 64 --hidden 128"""
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser: ``demo``, ``train``, ``spectrum`` and ``bench``, each with ``func`` set to
    its command. (``seqjax.cli.main`` hands everything after ``bench`` to the benchmark
    suite untouched, ``--help`` included; the ``bench`` subparser is here for the command
    list.)"""
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
    d.add_argument("--lr", type=positive_float_arg, default=1e-2, help="learning rate (default 1e-2)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a shorter run (T=50, 300 steps)")
    d.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--no-plots", action="store_true", help="no PNG figures")
    d.set_defaults(func=commands.cmd_demo)

    dflt = TRAIN_DEFAULTS
    t = sub.add_parser(
        "train",
        help="train a cell on a built-in task (checkpoints, resume, history, plots)",
        description="Train a cell with a linear readout on a built-in task into a run directory.\n\n"
        + _tasks_text(),
        epilog=_train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument(
        "task",
        nargs="?",
        default=None,
        metavar="TASK",
        help=f"one of {', '.join(TASKS)} (with --resume it may be left out: the run's)",
    )
    where = t.add_argument_group("where")
    where.add_argument(
        "--run-dir",
        "--out",
        dest="out",
        default=None,
        metavar="DIR",
        help="the run directory (default runs/TASK-CELLHIDDEN)",
    )
    where.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its latest checkpoint, with its saved options",
    )
    g = t.add_argument_group(
        "run options",
        "Saved in the run's config.json. With --resume they come from there:\n"
        "leave them out, or give the saved value.",
    )
    g.add_argument(
        "--cell", default=None, metavar="NAME", help=f"one of {', '.join(CELLS)} (default {dflt['cell']})"
    )
    g.add_argument(
        "--hidden", type=_positive, default=None, metavar="H", help=f"hidden units (default {dflt['hidden']})"
    )
    g.add_argument(
        "--batch", type=_positive, default=None, metavar="B", help=f"batch size (default {dflt['batch']})"
    )
    g.add_argument("--T", type=_positive, default=None, help="sequence length (default: the task's)")
    g.add_argument(
        "--lr",
        type=positive_float_arg,
        default=None,
        metavar="LR",
        help=f"Adam learning rate (default {dflt['lr']:g})",
    )
    g.add_argument(
        "--clip",
        type=positive_float_arg,
        default=None,
        metavar="C",
        help=f"global-norm gradient clipping (default {dflt['clip']:g})",
    )
    g.add_argument(
        "--seed", type=int, default=None, metavar="S", help=f"random seed (default {dflt['seed']})"
    )
    r = t.add_argument_group("options --resume may change (also saved)")
    r.add_argument(
        "--steps",
        type=_positive,
        default=None,
        metavar="N",
        help=f"total training steps (default {dflt['steps']}; with --resume the saved total, "
        "and a larger one extends the run)",
    )
    r.add_argument(
        "--checkpoint-every",
        type=_positive,
        default=None,
        metavar="N",
        help="steps between checkpoints (default: only at the end)",
    )
    show = t.add_argument_group("display (not saved)")
    show.add_argument("--plot", action="store_true", help="also write training.png (needs matplotlib)")
    show.add_argument("--no-progress", action="store_true", help="no progress bar")
    for task in TASKS.values():
        if not task.options:
            continue
        tg = t.add_argument_group(f"options of the {task.name} task (saved)")
        for o in task.options:
            tg.add_argument(
                o.flag,
                dest=o.key,
                type=o.type,
                default=None,
                choices=o.choices,
                metavar=o.metavar,
                help=o.help,
            )
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

    b = sub.add_parser(
        "bench",
        help="run the benchmark suite (python -m benchmarks ARGS; `seqjax bench --help` for its options)",
        add_help=False,
    )
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m benchmarks")
    b.set_defaults(func=commands.cmd_bench)
    return p
