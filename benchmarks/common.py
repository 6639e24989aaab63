"""Shared machinery of the benchmark suite: machine description, timing, peaks, memory.

Timing protocol (``../shared/benchmarks.md``):

- JAX functions are lowered and compiled explicitly (``jax.jit(f).lower(*args).compile()``)
  so the compile time is measured apart; one warm-up call follows, then ``reps`` timed calls,
  each ended by ``jax.block_until_ready``.
- Other callables (PyTorch, Python loops) get ``warmup`` untimed calls, then ``reps`` timed.
- Every timing records the raw times and their median, min and max (seconds).
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MODES",
    "cpu_count",
    "machine_info",
    "optional_import",
    "stats",
    "time_jax",
    "compile_jax",
    "time_compiled",
    "time_callable",
    "memory_stats",
    "matmul_peak",
    "new_result",
    "rel_err",
    "tree_rel_err",
    "setup_torch",
]

#: Benchmark modes, from smallest to largest. ``tiny`` exists for the test suite.
MODES = ("tiny", "quick", "full")


def cpu_count() -> int:
    """Cores this process may use (``sched_getaffinity`` where available)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, library versions, dtype."""
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cores": cpu_count(),
        "memory_gb": mem_gb,
        "load_average_at_start": load,
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "dtype": "float32",
        "versions": {
            p: _version(p)
            for p in ("seqjax", "jax", "jaxlib", "flax", "equinox", "optax", "torch", "numpy", "matplotlib")
        },
        "git_commit": _git_commit(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def optional_import(name: str):
    """Import ``name`` or return ``None`` (peers missing from the environment are skipped)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def setup_torch():
    """Import PyTorch with ``set_num_threads(cores)``, or return ``None`` if not installed."""
    torch = optional_import("torch")
    if torch is not None:
        torch.set_num_threads(cpu_count())
    return torch


def stats(times: list[float]) -> dict[str, Any]:
    """Median, min, max, mean of a list of times (seconds), with the raw list."""
    a = np.asarray(times, dtype=np.float64)
    return {
        "median_s": float(np.median(a)),
        "min_s": float(a.min()),
        "max_s": float(a.max()),
        "mean_s": float(a.mean()),
        "reps": len(times),
        "times_s": [float(t) for t in a],
    }


def time_jax(fn: Callable, *args, reps: int = 10, jit: bool = True) -> tuple[dict[str, Any], Any, Any]:
    """Compile ``fn`` for ``args``, then time ``reps`` calls.

    Args:
      fn: a JAX-traceable function (jitted here) of ``args``.
      *args: its arguments (arrays / pytrees).
      reps: timed repetitions after one warm-up call.
      jit: compile with ``jax.jit`` (default); ``False`` times ``fn`` as a plain callable.

    Returns:
      ``(timing, compiled, out)``: the timing dict (``compile_s``, ``median_s``, ``min_s``,
      ``max_s``, raw ``times_s``), the compiled executable (for ``memory_analysis``) and the
      output of the warm-up call.
    """
    if not jit:
        timing, out = time_callable(lambda: fn(*args), reps=reps)
        return timing, None, out
    compiled, compile_s = compile_jax(fn, *args)
    timing, out = time_compiled(compiled, *args, reps=reps)
    timing["compile_s"] = compile_s
    return timing, compiled, out


def compile_jax(fn: Callable, *args) -> tuple[Any, float]:
    """``jax.jit(fn).lower(*args).compile()`` and the seconds it took (trace + compile)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_compiled(compiled, *args, reps: int = 10) -> tuple[dict[str, Any], Any]:
    """One warm-up call of a compiled executable (timed apart as ``first_call_s``), then
    ``reps`` timed calls; returns ``(timing, warm-up output)``."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    timing = stats(times)
    timing["first_call_s"] = first
    return timing, out


def time_callable(fn: Callable[[], Any], *, reps: int = 10, warmup: int = 1) -> tuple[dict[str, Any], Any]:
    """Time a zero-argument callable: ``warmup`` untimed calls (the first one timed apart as
    ``first_call_s``, e.g. tracing/compilation inside), then ``reps`` timed calls. JAX outputs
    are blocked on."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    timing = stats(times)
    timing["compile_s"] = None
    timing["first_call_s"] = first
    return timing, out


def time_interleaved(
    fns: dict[str, Callable[[], Any]], *, rounds: int = 10, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Time several zero-argument callables against each other, interleaved.

    Every callable is called ``warmup`` times untimed (the first call timed apart as
    ``first_call_s``); then ``rounds`` rounds each call every callable once, in an order that
    rotates from round to round, so that a slow spell of the machine (another process, CPU
    frequency, memory pressure) falls on all of them alike and their *ratios* stay meaningful.
    JAX outputs are blocked on. Wall time is what is reported; ``cpu_s`` (process CPU time,
    all threads) is kept beside it as a second opinion on a loaded machine.

    Returns:
      ``{name: stats}`` with ``stats`` as ``stats()`` gives (``median_s``, ``min_s``, ...,
      ``times_s``) plus ``first_call_s``, ``compile_s`` (``None``) and ``cpu_median_s``.
    """
    names = list(fns)
    first: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name]())
        first[name] = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            jax.block_until_ready(fns[name]())
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            c0 = time.process_time()
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name]())
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {}
    for name in names:
        st = stats(wall[name])
        st["first_call_s"] = first[name]
        st["compile_s"] = None
        st["cpu_median_s"] = float(np.median(cpu[name]))
        out[name] = st
    return out


def memory_stats(compiled) -> dict[str, Any] | None:
    """XLA's compiled memory analysis in bytes: ``peak_bytes = argument + output + temp -
    alias`` (temp is XLA's buffer assignment for temporaries, reuse included), the parts, and
    XLA's own ``peak_memory_in_bytes`` (which on CPU leaves the temporaries out)."""
    if compiled is None:
        return None
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if ma is None:
        return None
    parts = {
        k: int(getattr(ma, k, 0) or 0)
        for k in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
        )
    }
    derived = (
        parts["argument_size_in_bytes"]
        + parts["output_size_in_bytes"]
        + parts["temp_size_in_bytes"]
        - parts["alias_size_in_bytes"]
    )
    peak = getattr(ma, "peak_memory_in_bytes", None)
    # On the CPU backend XLA's peak_memory_in_bytes counts arguments and outputs only (no
    # temporaries), so the peak used here is arguments + outputs + the temp allocation
    # (XLA's buffer assignment, which already reuses buffers) - aliased bytes.
    parts["xla_peak_memory_in_bytes"] = int(peak) if peak is not None else None
    parts["peak_bytes"] = int(derived)
    parts["peak_source"] = "argument+output+temp-alias"
    return parts


def matmul_peak(*, n: int = 2048, reps: int = 10, torch=None) -> dict[str, Any]:
    """The machine's measured float32 matmul throughput: an ``n x n`` ``jnp.dot`` (and
    ``torch.mm`` when PyTorch is given), ``2 n^3`` FLOPs per call, best and median GFLOP/s."""
    flops = 2.0 * n**3
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.float32)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
    timing, _, _ = time_jax(jnp.dot, a, b, reps=reps)
    out = {
        "n": n,
        "flops": flops,
        "jax": {
            "median_s": timing["median_s"],
            "min_s": timing["min_s"],
            "gflops_median": flops / timing["median_s"] / 1e9,
            "gflops_best": flops / timing["min_s"] / 1e9,
        },
    }
    if torch is not None:
        ta = torch.from_numpy(np.array(a))
        tb = torch.from_numpy(np.array(b))
        with torch.no_grad():
            t_timing, _ = time_callable(lambda: torch.mm(ta, tb), reps=reps, warmup=2)
        out["torch"] = {
            "median_s": t_timing["median_s"],
            "min_s": t_timing["min_s"],
            "gflops_median": flops / t_timing["median_s"] / 1e9,
            "gflops_best": flops / t_timing["min_s"] / 1e9,
        }
    return out


def new_result(suite: str, mode: str) -> dict[str, Any]:
    """The skeleton every sub-suite fills: ``suite``, ``mode``, ``machine``, ``notes``,
    ``skipped`` (what was not run and why), ``checks`` (correctness), ``rows``."""
    return {
        "suite": suite,
        "mode": mode,
        "machine": machine_info(),
        "notes": [],
        "skipped": [],
        "checks": [],
        "rows": [],
    }


def rel_err(a, b) -> float:
    """``max |a - b| / max(max |b|, tiny)`` in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_err: shapes differ, {a.shape} vs {b.shape}.")
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def tree_rel_err(a, b) -> float:
    """The largest ``rel_err`` over matching leaves of two pytrees."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"tree_rel_err: {len(la)} leaves vs {len(lb)}.")
    return max((rel_err(x, y) for x, y in zip(la, lb)), default=0.0)
