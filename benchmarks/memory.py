"""Memory: peak memory (and time) of forward+backward against the sequence length.

At the ``long`` shape (B=16, I=32, H=128) and T = 100, 1,000, 10,000, for seqjax's
gradient strategies (``seqjax.gradients``: the default, fused BPTT; ``Autodiff()`` through
the scan; ``Remat(1)``, a checkpoint per step; ``Remat(k)``, segments of
``k = ceil(sqrt(T))`` steps) and the textbook ``lax.scan``:

- JAX peak memory from XLA's compiled memory analysis of the gradient function
  (``jax.jit(f).lower(*args).compile().memory_analysis()``: arguments + outputs +
  temporaries - aliased bytes; on CPU XLA's ``peak_memory_in_bytes`` omits temporaries);
- PyTorch's peak where measurable: the growth of the resident-set high-water mark
  (``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``) during one
  forward+backward in a fresh subprocess, after the model and inputs exist. That includes
  allocator slack and is an upper bound of what the tensors need;
- time of forward+backward (median of ``reps`` calls).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import seqjax as sj
from benchmarks import common, peers, report

__all__ = ["SHAPE", "settings", "variants", "torch_peak_rss", "run", "to_markdown", "plot"]

#: (B, I, H) of the ``long`` configuration.
SHAPE = (16, 32, 128)


def settings(mode: str) -> dict[str, Any]:
    """Sequence lengths, cells, repetitions and the longest T that is also timed."""
    if mode == "full":
        return {
            "Ts": [100, 1000, 10000],
            "kinds": ["rnn", "lstm", "gru"],
            "reps": 5,
            "time_max_T": 10000,
            "shape": SHAPE,
        }
    if mode == "quick":
        return {"Ts": [100, 1000, 10000], "kinds": ["lstm"], "reps": 3, "time_max_T": 1000, "shape": SHAPE}
    if mode == "tiny":
        return {"Ts": [5, 20], "kinds": ["lstm"], "reps": 1, "time_max_T": 20, "shape": (2, 3, 4)}
    raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}.")


def variants(T: int) -> tuple[list[tuple[str, dict]], list[str]]:
    """seqjax ``unroll`` keyword sets to compare at length ``T`` and notes on missing options.

    The names do not depend on ``T`` (a row of the tables is one name across the ``T``s):
    ``"seqjax Remat(⌈√T⌉)"`` runs ``gradient=Remat(ceil(sqrt(T)))``."""
    opts = peers.unroll_options()
    out: list[tuple[str, dict]] = [("seqjax (default)", {})]
    notes = []
    if "gradient" in opts:
        k = max(1, math.ceil(math.sqrt(T)))
        out.append(("seqjax Autodiff()", {"gradient": sj.gradients.Autodiff()}))
        out.append(("seqjax Remat(1)", {"gradient": sj.gradients.Remat(1)}))
        out.append(("seqjax Remat(⌈√T⌉)", {"gradient": sj.gradients.Remat(k)}))
    else:
        notes.append(
            "seqjax.unroll has no gradient option in this checkout: rows without rematerialisation only."
        )
    return out, notes


_TORCH_SCRIPT = r"""
import json, sys, torch
kind, B, T, I, H, threads = sys.argv[1], *map(int, sys.argv[2:7])
torch.set_num_threads(threads)
torch.manual_seed(0)
cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
m = cls(I, H, batch_first=True)
x = torch.randn(B, T, I, requires_grad=True)
# warm-up on 2 steps: library and thread-pool initialisation are not the model's memory
w = torch.randn(B, 2, I, requires_grad=True)
(m(w)[0] ** 2).sum().backward()
m.zero_grad(set_to_none=True)
del w
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
base = status("VmRSS")
reset = True
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    reset = False
out = m(x)[0]
(out * out).sum().backward()
peak = status("VmHWM")
print(json.dumps({"base_rss": base, "hwm": peak, "growth": peak - base, "reset": reset}))
"""


def torch_peak_rss(kind: str, B: int, T: int, I: int, H: int, *, timeout: float = 600) -> dict | None:
    """Peak resident-memory growth of one PyTorch forward+backward in a fresh subprocess
    (bytes), or ``None`` when PyTorch or ``/proc`` is unavailable."""
    if common.optional_import("torch") is None or not os.path.exists("/proc/self/status"):
        return None
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                _TORCH_SCRIPT,
                kind,
                str(B),
                str(T),
                str(I),
                str(H),
                str(common.cpu_count()),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def _unroll_apply(cell, kwargs):
    def apply(p, xs):
        return sj.unroll(cell, p, xs, **kwargs)[1]

    return apply


def _loss(apply):
    def loss(p, xs):
        ys = apply(p, xs)
        return jnp.sum(ys * ys)

    return loss


def run(mode: str = "quick", *, log: Callable[[str], None] = print) -> dict:
    """Run the memory suite and return its result dict (see module docstring)."""
    s = settings(mode)
    result = common.new_result("memory", mode)
    B, I, H = s["shape"]
    result["shape"] = {"B": B, "I": I, "H": H}
    result["Ts"] = s["Ts"]
    result["reps"] = s["reps"]
    torch = common.setup_torch()
    if torch is None:
        result["skipped"].append("torch: not installed (no PyTorch peak)")
    result["notes"].append(
        "JAX peak: XLA compiled memory analysis of jax.grad of sum(ys²) with respect to params and "
        "inputs: arguments + outputs + temporaries - aliased. PyTorch peak: growth of the "
        "process's resident-set "
        "high-water mark (VmHWM, reset via /proc/self/clear_refs) during one forward+backward in a fresh "
        "subprocess; includes allocator slack."
    )
    for kind in s["kinds"]:
        cell = peers.make_cell(kind, H)
        key = jax.random.key(zlib.crc32(f"memory/{kind}".encode()))
        k_p, k_x = jax.random.split(key)
        params = cell.init(k_p, I)
        for T in s["Ts"]:
            xs = jax.random.normal(jax.random.fold_in(k_x, T), (B, T, I), jnp.float32)
            vs, notes = variants(T)
            for n in notes:
                if n not in result["notes"]:
                    result["notes"].append(n)
            impls: list[tuple[str, Callable]] = [(name, _unroll_apply(cell, kw)) for name, kw in vs]
            impls.append(("textbook lax.scan", peers.textbook_apply(kind)))
            ref = None
            for name, apply in impls:
                grad_fn = jax.grad(_loss(apply), argnums=(0, 1))
                compiled, cs = common.compile_jax(grad_fn, params, xs)
                mem = common.memory_stats(compiled)
                row = {
                    "cell": kind,
                    "T": T,
                    "impl": name,
                    "B": B,
                    "I": I,
                    "H": H,
                    "compile_s": cs,
                    "memory": mem,
                    "unroll_kwargs": {k: repr(v) for k, v in dict(vs).get(name, {}).items()},
                }
                if T <= s["time_max_T"]:
                    timing, out = common.time_compiled(compiled, params, xs, reps=s["reps"])
                    row.update(timing)
                    row["compile_s"] = cs
                    if ref is None:
                        ref = out
                    else:
                        err = common.tree_rel_err(out, ref)
                        ok = bool(err <= 1e-3)
                        result["checks"].append(
                            {
                                "where": f"{kind}/T={T}",
                                "what": f"gradients of {name} vs {impls[0][0]}",
                                "rel_err": err,
                                "tol": 1e-3,
                                "ok": ok,
                            }
                        )
                del compiled
                result["rows"].append(row)
                log(f"  memory {kind} T={T} {name}: peak {report.fmt_bytes((mem or {}).get('peak_bytes'))}")
            if torch is not None:
                tp = torch_peak_rss(kind, B, T, I, H)
                row = {
                    "cell": kind,
                    "T": T,
                    "impl": "torch (RSS growth)",
                    "B": B,
                    "I": I,
                    "H": H,
                    "torch_rss": tp,
                    "memory": {"peak_bytes": tp["growth"]} if tp else None,
                }
                result["rows"].append(row)
                log(f"  memory {kind} T={T} torch: {report.fmt_bytes(tp['growth'] if tp else None)}")
    return result


def to_markdown(result: dict) -> str:
    """One table per cell: rows = implementation, columns = T (peak memory and time)."""
    sh = result["shape"]
    lines = [
        f"Shape B={sh['B']}, I={sh['I']}, H={sh['H']}; forward+backward. "
        "Peak memory (time: median of "
        f"{result['reps']} calls; – where not timed in this mode)."
    ]
    for kind in dict.fromkeys(r["cell"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["cell"] == kind]
        names = list(dict.fromkeys(r["impl"] for r in rows))
        table = []
        for name in names:
            line = [name]
            for T in result["Ts"]:
                r = next((r for r in rows if r["impl"] == name and r["T"] == T), None)
                if r is None:
                    line.append("–")
                    continue
                mem = report.fmt_bytes((r.get("memory") or {}).get("peak_bytes"))
                t = r.get("median_s")
                line.append(mem + (f" ({report.fmt_time(t)})" if t is not None else ""))
            table.append(line)
        lines += [
            "",
            f"## {kind}",
            "",
            report.markdown_table(["implementation"] + [f"T={T}" for T in result["Ts"]], table),
        ]
    bad = [c for c in result["checks"] if not c["ok"]]
    if result["checks"]:
        lines += [
            "",
            f"Gradient checks (every variant against the first, rel. err ≤ 1e-3): "
            f"{len(result['checks']) - len(bad)}/{len(result['checks'])} passed.",
        ]
    for c in bad:
        lines.append(f"- FAILED {c['where']}: {c['what']} ({c['rel_err']:.2e})")
    return "\n".join(lines)


def plot(result: dict, out_dir: str) -> list[str]:
    """Peak memory against T (log-log), one line per implementation, one figure per cell."""
    plt = report.pyplot()
    if plt is None:
        return []
    paths = []
    for kind in dict.fromkeys(r["cell"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["cell"] == kind]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["T"], (r.get("memory") or {}).get("peak_bytes")) for r in rows if r["impl"] == name]
            pts = [(t, m / 2**20) for t, m in pts if m]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("peak memory of forward+backward (MiB)")
        ax.set_title(f"{kind}, B={result['shape']['B']}, H={result['shape']['H']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"memory_{kind}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
