"""Analysis calls over a checkpoint sweep: per-call time of eager calls against one user ``jax.jit``.

What a researcher does with the analysis functions is call them in a loop over training
checkpoints: new params of the same shapes each time, the cell often rebuilt per checkpoint
(``seqjax.lstm(32)`` called again; cells compare and hash by value). If a function wraps a
fresh closure in ``jax.jit`` inside every call, each call recompiles, and the sweep costs
compile time instead of compute time. This suite measures exactly that loop.

Set-up (full mode): ``seqjax.lstm(32)``, ``B = 16`` sequences of ``T = 64`` steps, input
size ``I = 8`` (``N(0, 1)``, one fixed ``xs``), ``N = 20`` checkpoints whose params are
``cell.init(jax.random.key(i), I)``. Timed functions:

- ``seqjax.spectrum.lyapunov_spectrum(cell, params, xs)``;
- ``seqjax.spectrum.step_jacobians(cell, params, xs)``;
- ``seqjax.gradient_norms(cell, params, xs, last_step_loss)`` (``last_step_loss`` a
  module-level function: the sum of squares of the last step's outputs);
- ``seqjax.spectrum.gradient_flow_report(cell, params, xs)``.

Two ways of calling each, measured on the same params in the same process:

- ``seqjax eager``: the plain call, as a user writes it, with the cell rebuilt at every
  checkpoint (``cell = seqjax.lstm(32)`` inside the loop);
- ``user jax.jit`` (the peer): the same call wrapped once, before the loop, in
  ``jax.jit(lambda p, x: f(cell, p, x))`` with the first checkpoint's cell closed over. A
  result that is not a pytree (a plain dataclass) is returned as a dict of its array fields.
  Where the call cannot be traced (``gradient_flow_report`` before issue 15 converted to
  NumPy/floats inside), the peer is recorded as n/a with the exception's type and not retried.

Interleaving: the outer loop runs over checkpoints, the inner over the functions; for each
function the two ways run back to back on the same params, eager first on even checkpoints
and the jitted peer first on odd ones, so drift in the machine's load hits both alike.
Every call ends with ``jax.block_until_ready`` on the array leaves of its result (the
report's fields are host floats / NumPy arrays already, so the call itself is synchronous).

Reported per function and way: the first call (compile included, for eager calls whatever
the function compiles inside), the median (min–max) of calls 2..N, and the ratio
``eager / user-jit`` of the medians (> 1: the eager call is slower than the user's own jit;
after a fix that caches compilation it should approach 1). Because the machine is shared,
the ratio is the figure to compare between runs; absolute times are printed too.

Before/after: every result records the git commit (``+dirty`` when ``seqjax/`` has uncommitted
edits) and which ``seqjax`` was imported. ``python -m benchmarks analysis --baseline
benchmarks/results/analysis_before.json`` stores that earlier run's rows in the new result
and prints both side by side; ``python -m benchmarks.analysis BEFORE.json AFTER.json``
prints the comparison of two existing results without measuring.

Checks: the eager and jitted results agree on the last checkpoint (they are the same
computation; ``COMPARED`` names the array compared), and the rebuilt cell equals and hashes
like the first one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import seqjax as sj
from benchmarks import common, report

__all__ = [
    "FUNCTIONS",
    "COMPARED",
    "settings",
    "last_step_loss",
    "arrays_of",
    "run",
    "to_markdown",
    "compare_markdown",
]

#: The timed functions, in table order.
FUNCTIONS = ("lyapunov_spectrum", "step_jacobians", "gradient_norms", "gradient_flow_report")

EAGER = "seqjax eager"
JIT = "user jax.jit"

#: Agreement of the eager and jitted results (same computation, possibly other fusion).
CHECK_TOL = 1e-4


def settings(mode: str) -> dict[str, Any]:
    """Hidden size, batch, steps, input size and number of checkpoints of a mode."""
    if mode == "full":
        return {"H": 32, "B": 16, "T": 64, "I": 8, "checkpoints": 20}
    if mode == "quick":
        return {"H": 32, "B": 16, "T": 64, "I": 8, "checkpoints": 8}
    if mode == "tiny":
        return {"H": 4, "B": 2, "T": 6, "I": 3, "checkpoints": 2}
    raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}.")


def last_step_loss(ys):
    """The sum of squares of the last step's outputs (``ys``: ``(B, T, H)``)."""
    return jnp.sum(ys[..., -1, :] ** 2)


def arrays_of(out) -> Any:
    """The arrays of an analysis result as a pytree: a registered pytree (a NamedTuple) as it
    is, a dataclass that is not one as the dict of its array fields (JAX arrays, tracers and
    NumPy arrays; ints, floats and strings left out)."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        leaves = jax.tree_util.tree_leaves(out)
        if len(leaves) == 1 and leaves[0] is out:  # not registered as a pytree
            return {
                f.name: getattr(out, f.name)
                for f in dataclasses.fields(out)
                if isinstance(getattr(out, f.name), jax.Array | np.ndarray)
            }
    return out


def _block(out):
    return jax.block_until_ready(arrays_of(out))


def _calls(spec) -> dict[str, Callable]:
    """``name -> f(cell, params, xs)``, each the plain library call."""
    return {
        "lyapunov_spectrum": lambda c, p, x: spec.lyapunov_spectrum(c, p, x),
        "step_jacobians": lambda c, p, x: spec.step_jacobians(c, p, x),
        "gradient_norms": lambda c, p, x: sj.gradient_norms(c, p, x, last_step_loss),
        "gradient_flow_report": lambda c, p, x: spec.gradient_flow_report(c, p, x),
    }


#: The array compared between the eager and jitted results of each function.
COMPARED = {
    "lyapunov_spectrum": "exponents",
    "step_jacobians": "jacobians",
    "gradient_norms": "norms",
    "gradient_flow_report": "lag_log_norms",
}


def _main_output(name: str, out):
    """The field ``COMPARED[name]`` of a (blocked) result, or ``None``."""
    if out is None:
        return None
    field = COMPARED[name]
    return out.get(field) if isinstance(out, dict) else getattr(out, field, None)


def _seqjax_source() -> dict[str, Any]:
    """Which seqjax was imported, and its checkout's commit (``+dirty`` with uncommitted
    edits under ``seqjax/``)."""
    pkg = os.path.dirname(os.path.abspath(sj.__file__))
    root = os.path.dirname(pkg)
    info: dict[str, Any] = {"seqjax_file": os.path.abspath(sj.__file__), "commit": None, "dirty": None}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, cwd=root
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "seqjax"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=root,
        )
        if head.returncode == 0 and head.stdout.strip():
            info["commit"] = head.stdout.strip()
            info["dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _label(source: dict[str, Any]) -> str:
    c = source.get("commit") or "?"
    return c + ("+dirty" if source.get("dirty") else "")


def _load_baseline(path: str) -> dict[str, Any]:
    with open(path) as f:
        old = json.load(f)
    if old.get("suite") != "analysis":
        raise ValueError(f"--baseline {path}: not an analysis result (suite {old.get('suite')!r}).")
    return {
        "path": path,
        "label": _label(old.get("source", {})),
        "source": old.get("source", {}),
        "mode": old.get("mode"),
        "settings": old.get("settings"),
        "date_utc": old.get("machine", {}).get("date_utc"),
        "load_average_at_start": old.get("machine", {}).get("load_average_at_start"),
        "load_average_at_end": old.get("load_average_at_end"),
        "rows": old.get("rows", []),
    }


def run(
    mode: str = "quick",
    *,
    log: Callable[[str], None] = print,
    baseline: str | None = None,
    functions: tuple[str, ...] = FUNCTIONS,
) -> dict:
    """Run the checkpoint sweep and return the result dict (see the module docstring).

    ``baseline``: path of an earlier ``analysis.json`` whose rows are kept beside the new ones.
    ``functions``: a subset of ``FUNCTIONS`` to time (the test suite's smoke test)."""
    bad = [f for f in functions if f not in FUNCTIONS]
    if bad:
        raise ValueError(f"functions must be among {FUNCTIONS}, got {bad}")
    functions = tuple(f for f in FUNCTIONS if f in functions)
    s = settings(mode)
    result = common.new_result("analysis", mode)
    result["settings"] = dict(s)
    result["functions"] = list(functions)
    result["source"] = _seqjax_source()
    if baseline is not None:
        result["baseline"] = _load_baseline(baseline)
        if result["baseline"]["settings"] != s:
            result["notes"].append(
                f"the baseline ran other settings ({result['baseline']['settings']}) than this run ({s})"
            )
    result["notes"].append(
        f"seqjax imported from {result['source']['seqjax_file']} (commit {_label(result['source'])})."
    )
    result["notes"].append(
        "eager: the plain call with the cell rebuilt per checkpoint; user jax.jit: the same call wrapped "
        "once before the loop (cell closed over). First call: compile included. Median (min–max) over "
        "calls 2..N. Ratio: eager median / user-jit median (> 1: eager slower)."
    )
    spec = common.optional_import("seqjax.spectrum")
    if spec is None:
        result["skipped"].append("seqjax.spectrum is missing in this checkout: nothing to time")
        return result
    H, B, T, I, N = s["H"], s["B"], s["T"], s["I"], s["checkpoints"]
    make_cell = lambda: sj.lstm(H)  # noqa: E731 - what the user's loop calls per checkpoint
    cell0 = make_cell()
    xs = jax.block_until_ready(jax.random.normal(jax.random.key(10_000), (B, T, I), jnp.float32))
    ckpts = [jax.block_until_ready(cell0.init(jax.random.key(i), I)) for i in range(N)]
    calls = _calls(spec)

    def user_jit(f):  # what the user writes once, before the loop
        return jax.jit(lambda p, x: arrays_of(f(cell0, p, x)))

    jitted = {name: user_jit(f) for name, f in calls.items()}
    times: dict[tuple[str, str], list[float]] = {(n, w): [] for n in functions for w in (EAGER, JIT)}
    failed: dict[str, str] = {}
    last: dict[tuple[str, str], Any] = {}
    log(f"analysis: lstm({H}), {B} x {T} x {I}, {N} checkpoints")
    for i, params in enumerate(ckpts):
        cell = make_cell()
        if i == 1:
            same = bool(cell == cell0 and hash(cell) == hash(cell0))
            result["checks"].append(
                {"what": f"rebuilt sj.lstm({H}) equals and hashes like the first", "ok": same}
            )
        for name in functions:
            order = (EAGER, JIT) if i % 2 == 0 else (JIT, EAGER)
            for way in order:
                if way == JIT and name in failed:
                    continue
                t0 = time.perf_counter()
                try:
                    out = _block(calls[name](cell, params, xs) if way == EAGER else jitted[name](params, xs))
                except Exception as e:  # noqa: BLE001 - a peer that cannot be jitted is a finding
                    if way == EAGER:
                        raise
                    failed[name] = type(e).__name__
                    log(f"  {name}: user jax.jit fails: {type(e).__name__}")
                    continue
                times[(name, way)].append(time.perf_counter() - t0)
                if i == N - 1:
                    last[(name, way)] = out
        log(
            f"  checkpoint {i + 1}/{N}: " + ", ".join(f"{n} {times[(n, EAGER)][-1]:.3f} s" for n in functions)
        )
    for name in functions:
        rows = {}
        for way in (EAGER, JIT):
            row: dict[str, Any] = {"function": name, "impl": way, "checkpoints": N}
            ts = times[(name, way)]
            if way == JIT and name in failed:
                row["unavailable"] = failed[name]
            elif ts:
                row["first_call_s"] = ts[0]
                row.update(common.stats(ts[1:] or ts[:1]))
                row["all_times_s"] = ts
            rows[way] = row
        e, j = rows[EAGER], rows[JIT]
        ok = "median_s" in e and "median_s" in j
        e["ratio_median"] = e["median_s"] / j["median_s"] if ok else None
        e["ratio_first"] = e["first_call_s"] / j["first_call_s"] if ok else None
        j["ratio_median"] = 1.0 if "median_s" in j else None
        result["rows"] += [e, j]
        a, b = _main_output(name, last.get((name, EAGER))), _main_output(name, last.get((name, JIT)))
        if a is not None and b is not None:
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            fin = np.isfinite(a) & np.isfinite(b)
            err = common.rel_err(a[fin], b[fin]) if fin.any() else 0.0
            same_inf = bool(np.array_equal(np.isfinite(a), np.isfinite(b)))
            result["checks"].append(
                {
                    "what": f"{name}: eager vs user jax.jit result (last checkpoint)",
                    "rel_err": err,
                    "tol": CHECK_TOL,
                    "ok": bool(err <= CHECK_TOL and same_inf),
                }
            )
    if failed:
        result["notes"].append(
            "user jax.jit n/a: "
            + "; ".join(f"{n} cannot be traced ({t})" for n, t in failed.items())
            + ", so there is no jitted peer for it."
        )
    try:
        result["load_average_at_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        result["load_average_at_end"] = None
    return result


def _cells(r: dict | None) -> list[str]:
    """first call, median (min–max) of calls 2..N, for one row."""
    if r is None:
        return ["–", "–"]
    if "unavailable" in r:
        return [f"n/a ({r['unavailable']})"] * 2
    return [report.fmt_time(r.get("first_call_s")), report.fmt_range(r)]


def _row(rows: list[dict], name: str, way: str) -> dict | None:
    return next((r for r in rows if r["function"] == name and r["impl"] == way), None)


def _table(runs: list[tuple[str, list[dict]]]) -> str:
    """One line per function and run (``runs``: ``(label, rows)`` in display order)."""
    body = []
    for name in FUNCTIONS:
        for label, rows in runs:
            e, j = _row(rows, name, EAGER), _row(rows, name, JIT)
            if e is None:
                continue
            n = e.get("checkpoints")
            body.append(
                [
                    f"`{name}`",
                    label,
                    *_cells(e),
                    *_cells(j),
                    report.fmt_num(e.get("ratio_median")),
                    n,
                ]
            )
    headers = [
        "function",
        "run (commit)",
        "eager: first call",
        "eager: median calls 2..N (min–max)",
        "user jit: first call",
        "user jit: median calls 2..N (min–max)",
        "ratio eager / user jit",
        "N",
    ]
    return report.markdown_table(headers, body)


def _speedups(before: list[dict], after: list[dict]) -> str:
    """Eager median and first call, before / after, per function."""
    lines = []
    for name in FUNCTIONS:
        b, a = _row(before, name, EAGER), _row(after, name, EAGER)
        if not (b and a and b.get("median_s") and a.get("median_s")):
            continue
        lines.append(
            f"- `{name}`: eager median {report.fmt_time(b['median_s'])} → {report.fmt_time(a['median_s'])} "
            f"({b['median_s'] / a['median_s']:.3g}x); ratio to user jit "
            f"{report.fmt_num(b.get('ratio_median'))} → {report.fmt_num(a.get('ratio_median'))}"
        )
    return "\n".join(lines)


def _checks(result: dict) -> list[str]:
    checks = result.get("checks", [])
    bad = [c for c in checks if not c["ok"]]
    out = [f"Checks: {len(checks) - len(bad)}/{len(checks)} passed."]
    for c in checks:
        val = f": {report.fmt_num(c['rel_err'])}" if "rel_err" in c else ""
        out.append(f"- {'ok' if c['ok'] else 'FAILED'} {c['what']}{val}")
    return out


def _load(x) -> str:
    return "–" if not x else ", ".join(f"{v:.2f}" for v in x)


def _setting_line(result: dict) -> str:
    s = result["settings"]
    return (
        f"`seqjax.lstm({s['H']})`, {s['B']} sequences × {s['T']} steps, input size {s['I']}, "
        f"N = {s['checkpoints']} checkpoints (params `cell.init(key(i), {s['I']})`, "
        "cell rebuilt per checkpoint)."
    )


def compare_markdown(before: dict, after: dict) -> str:
    """Side-by-side tables of two results (``before`` may be a stored ``baseline`` entry)."""
    b_label = f"before {before.get('label') or _label(before.get('source', {}))}"
    a_label = f"after {_label(after.get('source', {}))}"
    b_start = before.get("load_average_at_start") or before.get("machine", {}).get("load_average_at_start")
    loads = (
        f"Load average (1, 5, 15 min): before {_load(b_start)} at start, "
        f"{_load(before.get('load_average_at_end'))} at end; after "
        f"{_load(after.get('machine', {}).get('load_average_at_start'))} at start, "
        f"{_load(after.get('load_average_at_end'))} at end."
    )
    out = [
        "## Per-call time over a checkpoint sweep: before / after",
        "",
        _setting_line(after),
        "",
    ]
    if before.get("settings") != after["settings"]:
        out += [f"**The before run had other settings:** {before.get('settings')}.", ""]
    out += [
        _table([(b_label, before["rows"]), (a_label, after["rows"])]),
        "",
        "Eager calls, before → after (the ratio to the user's jit is the figure comparable across runs):",
        "",
        _speedups(before["rows"], after["rows"]),
        "",
        loads,
        "",
    ]
    return "\n".join(out + _checks(after))


def to_markdown(result: dict) -> str:
    """The sweep table (with the baseline's rows beside it when the run had one)."""
    if result.get("baseline"):
        return compare_markdown(result["baseline"], result)
    out = [
        "## Per-call time over a checkpoint sweep",
        "",
        _setting_line(result),
        "",
        _table([(_label(result.get("source", {})), result["rows"])]),
        "",
        f"Load average (1, 5, 15 min) at start {_load(result['machine'].get('load_average_at_start'))}, "
        f"at end {_load(result.get('load_average_at_end'))}.",
        "",
    ]
    return "\n".join(out + _checks(result))


def _main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks.analysis BEFORE.json AFTER.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        before = json.load(f)
    with open(argv[1]) as f:
        after = json.load(f)
    print(compare_markdown(before, after))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
