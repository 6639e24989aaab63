"""Writers: JSON results, Markdown tables and (optionally) PNG figures.

Every sub-suite produces a result dict (see ``benchmarks.common.new_result``); ``write``
stores it as ``<out>/<suite>.json`` and its Markdown rendering as ``<out>/<suite>.md``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_OUT",
    "markdown_table",
    "machine_markdown",
    "fmt_time",
    "fmt_range",
    "fmt_bytes",
    "fmt_num",
    "fmt_mean_std",
    "write",
    "pyplot",
]

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _clean(o):
    """Replace non-finite floats by ``None`` so the file is strict JSON."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(float(o)) else None
    return o


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells converted with ``str``)."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join("" if c is None else str(c) for c in r) + " |")
    return "\n".join(out)


def fmt_time(s: float | None) -> str:
    """Seconds as a short string in ms (or s above 10 s)."""
    if s is None or not math.isfinite(s):
        return "–"
    if s >= 10:
        return f"{s:.1f} s"
    ms = s * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms * 1e3:.0f} µs"


def fmt_range(r: dict) -> str:
    """``median (min–max)`` of a timing dict."""
    return f"{fmt_time(r['median_s'])} ({fmt_time(r['min_s'])}–{fmt_time(r['max_s'])})"


def fmt_bytes(b: float | None) -> str:
    """Bytes as MiB (or KiB / GiB)."""
    if b is None:
        return "–"
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    if b >= 2**20:
        return f"{b / 2**20:.1f} MiB"
    return f"{b / 2**10:.0f} KiB"


def fmt_num(x: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, ``–`` for missing."""
    if x is None:
        return "–"
    return f"{x:.{digits}g}"  # non-finite values print as inf / nan: a diverged run says so


def fmt_mean_std(values: Sequence[float] | None, digits: int = 3) -> str:
    """``mean ± std`` over seeds (just the value for one seed)."""
    if not values:
        return "–"
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return "–"
    if a.size == 1:
        return fmt_num(float(a[0]), digits)
    bad = ~np.isfinite(a)
    if bad.any():  # diverged seeds: summarise the finite ones and count the rest
        fin = a[~bad]
        head = fmt_mean_std(list(fin), digits) + "; " if fin.size else ""
        return f"{head}{int(bad.sum())}/{a.size} non-finite"
    return f"{fmt_num(float(a.mean()), digits)} ± {fmt_num(float(a.std(ddof=1)), 2)}"


def machine_markdown(result: dict[str, Any]) -> str:
    """One paragraph naming the machine, versions, mode and date of a result."""
    m = result["machine"]
    v = m["versions"]
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    return (
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m.get('memory_gb')} GB; backend "
        f"{m['jax_backend']}; {m['dtype']}. Versions: {libs}. Mode: `{result['mode']}`. "
        f"Taken {m['date_utc']} UTC (commit {m.get('git_commit')}, load average at start "
        f"{m.get('load_average_at_start')})."
    )


def _notes_markdown(result: dict[str, Any]) -> str:
    parts = []
    if result.get("notes"):
        parts.append("Notes:\n\n" + "\n".join(f"- {n}" for n in result["notes"]))
    if result.get("skipped"):
        parts.append("Skipped:\n\n" + "\n".join(f"- {n}" for n in result["skipped"]))
    return "\n\n".join(parts)


def write(result: dict[str, Any], body_markdown: str, out_dir: str) -> tuple[str, str]:
    """Write ``<out_dir>/<suite>.json`` and ``<out_dir>/<suite>.md``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    suite = result["suite"]
    jpath = os.path.join(out_dir, f"{suite}.json")
    mpath = os.path.join(out_dir, f"{suite}.md")
    with open(jpath, "w") as f:
        json.dump(_clean(result), f, indent=1, default=_json_default, allow_nan=False)
        f.write("\n")
    cmd = result.get("command", f"python -m benchmarks {suite}")
    md = [f"# seqjax benchmarks: {suite}", "", f"Command: `{cmd}`", "", machine_markdown(result), ""]
    md.append(body_markdown.rstrip())
    notes = _notes_markdown(result)
    if notes:
        md += ["", notes]
    with open(mpath, "w") as f:
        f.write("\n".join(md) + "\n")
    return jpath, mpath


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend, or ``None`` if missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
