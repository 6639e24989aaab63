"""Command line of the benchmark suite.

``python -m benchmarks [SUITE ...] [--quick | --tiny] [--plot] [--out DIR]``

- ``SUITE``: any of ``speed``, ``profile``, ``memory``, ``spectrum``, ``tasks``, ``analysis``
  (default: all, in that order).
- ``--quick``: smaller configurations and fewer repetitions (a few minutes on 2 cores).
- ``--tiny``: toy sizes, for the test suite only (numbers mean nothing).
- ``--plot``: also draw PNG figures (needs matplotlib).
- ``--out DIR``: where results go (default ``benchmarks/results``).
- ``--jobs N`` (tasks suite): run the task jobs in ``N`` worker processes, each pinned to one
  core (the full task table is hours of training on one process; the timing suites always
  run alone).
- ``--only TASK[:T][:CELL]`` (tasks suite, repeatable): run only the matching jobs, e.g.
  ``--only adding:200`` or ``--only copy:lstm``.
- ``--baseline PATH`` (analysis suite): an earlier ``analysis.json`` (e.g. the "before" run)
  whose rows are kept in the new result and printed beside the new ones.

A long tasks run writes its files after every finished job, marked ``"partial"``, so a run that
is stopped keeps what it did.

A sub-suite whose seqjax module is missing (e.g. ``seqjax.spectrum`` before it exists)
writes a result that says so and the run goes on.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

from benchmarks import SUITES, common, report

__all__ = ["main", "run_suite"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="seqjax benchmark suite")
    p.add_argument("suites", nargs="*", metavar="SUITE", help=f"any of {', '.join(SUITES)} (default: all)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small sizes, few repetitions (minutes)")
    g.add_argument("--tiny", action="store_true", help="toy sizes for tests (meaningless numbers)")
    p.add_argument("--plot", action="store_true", help="also write PNG figures")
    p.add_argument("--out", default=report.DEFAULT_OUT, help="output directory (default benchmarks/results)")
    p.add_argument(
        "--jobs", type=int, default=1, help="tasks suite: worker processes, one core each (default 1)"
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="TASK[:T][:CELL]",
        help="tasks suite: run only these jobs (repeatable), e.g. adding:200 or copy:lstm",
    )
    p.add_argument(
        "--baseline",
        metavar="PATH",
        help="analysis suite: an earlier analysis.json to print beside this run (before/after)",
    )
    return p


def run_suite(
    name: str,
    mode: str,
    out_dir: str,
    *,
    plot: bool = False,
    command: str | None = None,
    log=print,
    options: dict | None = None,
):
    """Run one sub-suite, write its JSON and Markdown (and PNGs), return the result dict.

    ``options`` are extra keyword arguments of the suite's ``run`` (the tasks suite's ``jobs``
    and ``only``)."""
    t0 = time.perf_counter()
    mod = None
    command = command or f"python -m benchmarks {name}" + ("" if mode == "full" else f" --{mode}")
    options = dict(options or {})
    last_partial = {}
    if name == "tasks":

        def checkpoint(partial):
            partial = dict(partial, wall_s=time.perf_counter() - t0, command=command, figures=[])
            last_partial["result"] = partial
            body = f"**Partial result: {partial['partial']}.**\n\n" + mod.to_markdown(partial)
            report.write(partial, body, out_dir)

        options["checkpoint"] = checkpoint
    try:
        mod = importlib.import_module(f"benchmarks.{name}")
        result = mod.run(mode, log=log, **options)
    except Exception as e:  # noqa: BLE001 - one broken suite must not hide the others
        # a failed tasks run keeps the rows it finished (its last checkpoint) beside the error
        result = last_partial.get("result") or common.new_result(name, mode)
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
        log(f"{name}: FAILED: {result['error']}")
    result["wall_s"] = time.perf_counter() - t0
    result["command"] = command
    if "error" in result:
        body = f"The suite failed: `{result['error']}`\n\n```\n{result['traceback']}\n```"
        if result["rows"] or result.get("real_rows"):
            body += f"\n\nWhat it finished ({result.get('partial')}):\n\n" + mod.to_markdown(result)
    else:
        body = mod.to_markdown(result)
    body += f"\n\nWall time of this suite: {result['wall_s']:.0f} s."
    figures = []
    if plot and "error" not in result and mod is not None and hasattr(mod, "plot"):
        try:
            figures = mod.plot(result, out_dir)
        except Exception as e:  # noqa: BLE001
            result["notes"].append(f"plotting failed: {type(e).__name__}: {e}")
    result["figures"] = [os.path.basename(f) for f in figures]
    jpath, mpath = report.write(result, body, out_dir)
    log(f"{name}: wrote {jpath} and {mpath} ({result['wall_s']:.0f} s)")
    return result


def main(argv=None) -> int:
    """Parse ``argv`` and run the chosen sub-suites. Returns 0, or 1 if any suite failed."""
    parser = _parser()
    args = parser.parse_args(argv)
    bad = [s for s in args.suites if s not in SUITES]
    if bad:
        parser.error(f"unknown suite(s) {bad}; choose from {list(SUITES)}")
    mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    suites = args.suites or list(SUITES)
    task_opts = {}
    if args.jobs != 1 or args.only:
        if "tasks" not in args.suites:
            parser.error(
                "--jobs and --only apply to the tasks suite: name it, "
                "e.g. `python -m benchmarks tasks --jobs 2`"
            )
        if args.jobs < 1 or args.jobs > common.cpu_count():
            parser.error(
                f"--jobs must be between 1 and the {common.cpu_count()} cores this process may use, "
                f"got {args.jobs}"
            )
        try:
            from benchmarks.tasks import parse_only

            parse_only(args.only)
        except ValueError as e:
            parser.error(str(e))
        task_opts = {"jobs": args.jobs, "only": args.only}
    if args.baseline is not None:
        if "analysis" not in args.suites:
            parser.error(
                "--baseline applies to the analysis suite: name it, e.g. `python -m benchmarks analysis`"
            )
        if not os.path.isfile(args.baseline):
            parser.error(f"--baseline {args.baseline}: no such file")
    suite_opts = {"tasks": task_opts, "analysis": {"baseline": args.baseline} if args.baseline else {}}
    os.makedirs(args.out, exist_ok=True)
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    failed = False

    def log(msg):
        print(msg, flush=True)

    for name in suites:
        log(f"=== {name} ({mode}) ===")
        res = run_suite(
            name,
            mode,
            args.out,
            plot=args.plot,
            command=command.strip(),
            log=log,
            options=suite_opts.get(name),
        )
        failed |= "error" in res
    return 1 if failed else 0
