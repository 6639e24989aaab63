"""Parallel-in-time evaluation (DEER, quasi-DEER, ELK): when it converges, and what it costs.

``python -m benchmarks.deer [--quick | --tiny] [--plot] [--out DIR] [--only iterations|speed]
[--budget-s S] [--memory-gb G] [--gpu]`` writes ``<out>/deer.json`` and ``deer.md`` (and
``deer_iterations.png``, ``deer_speed.png`` with ``--plot``); ``--gpu`` writes
``deer_gpu.json`` / ``deer_gpu.md`` instead. ``--only speed`` keeps the iterations section
of an existing ``deer.json`` of the same mode (and says so).

**Iterations against lambda_max** (``iterations``). A tanh Elman cell and a GRU, ``H = 16``,
``T = 1000``, one sequence of ``N(0, 1)`` inputs (``I = 4``, input weights ``N(0, 1/I)``),
recurrent weights ``W_h = gain * N(0, 1/H)`` (every gate's block for the GRU; in full mode
also ``gain * orthogonal`` for the Elman cell), gains from contracting to chaotic. Per row:
``lambda_max`` and the predicted iterations of ``seqjax.spectrum.parallel_convergence``, then
the measured iterations of ``DEER()`` and ``QuasiDEER()`` (default tolerance of the dtype,
``max_iter = 300``: 300 iterations of a scan of depth ``log2 T = 10`` are more dependent
steps than the scan's 1000, so a row that reaches the cap cannot pay) and, where undamped
DEER fails, ``ELK()``; the ratio predicted / measured on the contracting side (a check:
within a factor of 2), and that every converged solve equals the sequential ``unroll``.
Float64 (and float32 in full mode, where DEER's first step overflows earlier). The predictor
was derived from Newton-Kantorovich and the forgetting rate, not fitted to these rows (see
its docstring). Solves run under one ``jax.jit`` per cell and solver (an eager
``seqjax.unroll.solve`` compiles on every call).

**Speed** (``speed``). A GRU (PyTorch's initialisation), batch 16, ``I = 8``, float32,
``T`` in {1e3, 1e4, 1e5}, ``H`` in {1, 16, 64, 256} (quick: ``T <= 1e4``, ``H <= 64``): the
sequential ``unroll`` against ``QuasiDEER()`` (and ``DEER()`` for ``H <= 64``), forward
evaluation, timed interleaved (``benchmarks.common.time_interleaved``), with the iterations
each took. Rows run cheapest first (work ``T * B * max(H, 8)``). Before a row, its memory is
estimated (``speed_bytes``) and a solver skipped above ``--memory-gb`` (default 4); its time
is estimated from the largest row already run, scaled by the work, and the row skipped if
the wall-time budget (``--budget-s``; full 600 s, quick 240 s) would be exceeded. Skips are
listed. The initial carry is an argument of the jitted function, so XLA does not
constant-fold the solvers' zero guess (which at large ``T * B * S`` took seconds of compile).

**GPU** (``--gpu``). The speed grid on the default device, with the device name and the
versions of JAX, jaxlib and CUDA recorded, the memory limit half the device's, and the files
rewritten after every row (marked partial until the end). ``--gpu --tiny`` runs the same
code on CPU with toy sizes (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, report

__all__ = ["settings", "run", "to_markdown", "plot", "main", "speed_bytes"]

GIB = 2**30


def settings(mode: str) -> dict[str, Any]:
    """The sizes of a mode (``tiny``, ``quick``, ``full``)."""
    if mode not in common.MODES:
        raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}.")
    elman = [0.3, 0.5, 0.8, 1.0, 1.2, 1.5, 1.8, 2.0, 2.5, 3.0]
    gru = [0.5, 1.0, 2.0, 3.0, 4.0, 6.0]
    # max_iter 300 at T = 1000: 300 iterations of a scan of depth log2(T) = 10 are 3000
    # dependent steps, more than the scan's 1000, so a row that reaches the cap cannot pay.
    if mode == "full":
        families = {"rnn": elman, "gru": gru, "rnn-orthogonal": [0.5, 1.0, 1.4, 1.6, 1.8, 2.5]}
        sweep = dict(T=1000, H=16, I=4, families=families, dtypes=["float64", "float32"], max_iter=300)
        speed = dict(Ts=[1000, 10_000, 100_000], Hs=[1, 16, 64, 256], B=16, I=8, rounds=5)
        budget_s = 600.0
    elif mode == "quick":
        families = {"rnn": [0.3, 0.5, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0], "gru": [0.5, 1.0, 2.0, 4.0]}
        sweep = dict(T=1000, H=16, I=4, families=families, dtypes=["float64"], max_iter=300)
        speed = dict(Ts=[1000, 10_000], Hs=[1, 16, 64], B=16, I=8, rounds=3)
        budget_s = 240.0
    else:
        families = {"rnn-orthogonal": [0.5, 3.0]}
        sweep = dict(T=64, H=16, I=2, families=families, dtypes=["float64"], max_iter=64)
        speed = dict(Ts=[64], Hs=[1, 4], B=2, I=2, rounds=2)
        budget_s = 60.0
    return {"sweep": sweep, "speed": speed, "budget_s": budget_s, "memory_gb": 4.0}


# --------------------------------------------------------------------------- problems


def _problem(family: str, H: int, I: int, T: int, gain: float, dtype, seed: int = 0):
    """``(cell, params, xs (T, I))`` of one sweep row."""
    import seqjax

    kind = "gru" if family.startswith("gru") else "rnn"
    cell = seqjax.gru(H) if kind == "gru" else seqjax.rnn(H)
    rng = np.random.default_rng(seed)
    p = cell.init(jax.random.key(seed), input_size=I)
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    p["w_x"] = rng.standard_normal(p["w_x"].shape) / np.sqrt(I)
    if family.endswith("orthogonal"):
        q, r = np.linalg.qr(rng.standard_normal((H, H)))
        w = q * np.sign(np.diag(r))
    else:
        w = rng.standard_normal(p["w_h"].shape) / np.sqrt(H)
    p["w_h"] = gain * w
    xs = rng.standard_normal((T, I))
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cell, jax.tree_util.tree_map(cast, p), cast(xs)


@contextlib.contextmanager
def _precision(dtype: str):
    """float64 enabled inside the block (and restored) when asked."""
    if dtype != "float64":
        yield
        return
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def _solve_fn():
    """``go(cell, params, xs, solver) -> (Solution, diagnostics)``: ``seqjax.unroll.solve``
    under one ``jax.jit`` with the cell and the solver static (compiled once per cell, solver
    and shapes: an eager ``solve`` traces and compiles on every call)."""
    from seqjax.unroll import solve

    @jax.jit
    def diag(s):
        ok = jnp.all(jnp.isfinite(s.ys))
        return s.iterations, s.converged, s.nonfinite, ok

    jsolve = jax.jit(solve, static_argnums=(0, 3))

    def go(cell, params, xs, solver):
        t0 = time.perf_counter()
        sol = jsolve(cell, params, xs, solver)
        it, conv, bad, finite = jax.block_until_ready(diag(sol))
        return sol, dict(
            iterations=int(np.max(it)),
            converged=bool(np.all(conv)),
            nonfinite=bool(np.any(bad)),
            finite=bool(finite),
            seconds=time.perf_counter() - t0,
        )

    return go


# --------------------------------------------------------------------------- iterations


def sweep(s: dict, result: dict, log: Callable[[str], None]) -> None:
    """The iterations-against-``lambda_max`` rows (``result["sweep"]``)."""
    import seqjax
    from seqjax.solvers import DEER, ELK, QuasiDEER

    go = _solve_fn()
    rows = result.setdefault("sweep", [])
    T, H, I, cap = s["T"], s["H"], s["I"], s["max_iter"]
    for dtype in s["dtypes"]:
        with _precision(dtype):
            for family, gains in s["families"].items():
                for gain in gains:
                    cell, p, xs = _problem(family, H, I, T, gain, dtype)
                    t0 = time.perf_counter()
                    pred = seqjax.spectrum.parallel_convergence(cell, p, xs)
                    pred_s = time.perf_counter() - t0
                    _, ys_seq = seqjax.unroll(cell, p, xs)
                    row: dict[str, Any] = {
                        "family": family,
                        "gain": gain,
                        "dtype": dtype,
                        "T": T,
                        "H": H,
                        "tol": pred.tol,
                        "lambda_max": float(pred.lambda_max),
                        "lambda_stderr": float(pred.lambda_stderr),
                        "quasi_rate": float(pred.quasi_rate),
                        "verdict": str(pred.verdict),
                        "pred_deer": int(pred.deer_iterations),
                        "pred_quasi": int(pred.quasi_deer_iterations),
                        "pred_deer_overflows": bool(pred.deer_overflows),
                        "pred_quasi_overflows": bool(pred.quasi_deer_overflows),
                        "guess_growth": float(pred.guess_growth),
                        "predict_s": pred_s,
                        "max_iter": cap,
                    }
                    for name, solver in (("deer", DEER(max_iter=cap)), ("quasi", QuasiDEER(max_iter=cap))):
                        sol, d = go(cell, p, xs, solver)
                        if d["converged"]:
                            d["max_abs_err"] = float(jnp.max(jnp.abs(sol.ys - ys_seq)))
                        row[name] = d
                    if not row["deer"]["converged"]:
                        sol, d = go(cell, p, xs, ELK(max_iter=cap))
                        if d["converged"]:
                            d["max_abs_err"] = float(jnp.max(jnp.abs(sol.ys - ys_seq)))
                        row["elk"] = d
                    for name, key in (("deer", "pred_deer"), ("quasi", "pred_quasi")):
                        ok = row[name]["converged"] and row["lambda_max"] < 0 and row[name]["iterations"] > 0
                        row[f"ratio_{name}"] = row[key] / row[name]["iterations"] if ok else None
                    rows.append(row)
                    log(
                        f"deer sweep {dtype} {family} gain {gain}: lambda_max {row['lambda_max']:+.3f} "
                        f"({row['verdict']}); DEER pred {row['pred_deer']}"
                        f"{' (overflows)' if row['pred_deer_overflows'] else ''} meas "
                        f"{_fmt_meas(row['deer'])}; quasi pred {row['pred_quasi']} "
                        f"meas {_fmt_meas(row['quasi'])}"
                        + (f"; ELK {_fmt_meas(row['elk'])}" if "elk" in row else "")
                    )
    # Checks: the requirement (within 2x on the contracting side), exactness, no NaN.
    for row in rows:
        tag = f"{row['dtype']} {row['family']} gain {row['gain']}"
        r = row["ratio_deer"]
        if r is not None:
            result["checks"].append(
                {
                    "what": f"{tag}: predicted / measured DEER iterations {r:.2f} within [0.5, 2]",
                    "ok": 0.5 <= r <= 2,
                }
            )
        for name in ("deer", "quasi", "elk"):
            d = row.get(name)
            if d is None:
                continue
            result["checks"].append({"what": f"{tag}: {name} outputs finite (never NaN)", "ok": d["finite"]})
            if "max_abs_err" in d:
                lim = 1e-8 if row["dtype"] == "float64" else 1e-3
                result["checks"].append(
                    {
                        "what": f"{tag}: converged {name} equals the sequential unroll "
                        f"(max |diff| {d['max_abs_err']:.1e} <= {lim:g})",
                        "ok": d["max_abs_err"] <= lim,
                    }
                )


def _fmt_meas(d: dict | None) -> str:
    if d is None:
        return "–"
    if d["nonfinite"]:
        return f"overflow at {d['iterations']}"
    if not d["converged"]:
        return f">{d['iterations']} (not converged)"
    return str(d["iterations"])


# --------------------------------------------------------------------------- speed


def speed_bytes(T: int, B: int, H: int, I: int, solver: str, itemsize: int = 4) -> int:
    """Estimated peak bytes of one row's function.

    ``sequential``: the inputs and outputs, ``T B (I + H)``. ``quasi``: about 16 arrays of
    ``T B S`` (the iterate, its step, residual and diagonal Jacobians, the candidate's, the
    associative scan's levels and the carries; ``S = H`` for the GRU) plus the inputs.
    ``deer``: ``seqjax.solvers.dense_bytes`` (the ``(S, S)`` Jacobians, ``4 T B S^2``) plus
    the quasi arrays.
    """
    from seqjax.solvers import dense_bytes

    base = T * B * (I + H) * itemsize
    if solver == "sequential":
        return base
    quasi = 16 * T * B * H * itemsize + base
    if solver == "quasi":
        return quasi
    return quasi + dense_bytes(T, H, batch=B, itemsize=itemsize)


def environment() -> dict[str, Any]:
    """The device and versions of this run (JAX, jaxlib, CUDA where JAX reports it)."""
    import jaxlib

    env: dict[str, Any] = {
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", None),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in jax.devices()],
        "device_kind": getattr(jax.devices()[0], "device_kind", str(jax.devices()[0])),
    }
    try:  # private, so guarded: the CUDA libraries JAX's plugin loaded
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            for name in ("cuda_runtime", "cuda_driver", "cudnn", "cublas"):
                fn = getattr(cuda_versions, f"{name}_get_version", None)
                if fn is not None:
                    env[f"{name}_version"] = fn()
    except Exception as e:  # noqa: BLE001 - informative only
        env["cuda_versions_error"] = f"{type(e).__name__}: {e}"
    return env


def _speed_fns(H: int, B: int, T: int, I: int, solvers: dict) -> tuple[dict, dict]:
    """Zero-argument callables of one speed row (jitted, the carry an argument) and the
    iterations each parallel solver took."""
    import seqjax
    from seqjax.unroll import solve

    cell = seqjax.gru(H)
    params = cell.init(jax.random.key(0), input_size=I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    c0 = cell.initial_carry(params, (B,))
    fns: dict[str, Callable[[], Any]] = {}
    iters: dict[str, Any] = {}
    for name, solver in solvers.items():
        if solver is None:
            seq = jax.jit(lambda p, x, c: seqjax.unroll(cell, p, x, carry=c)[1])
            fns[name] = lambda f=seq: f(params, xs, c0)
            continue

        def run_solver(p, x, c, solver=solver):
            sol = solve(cell, p, x, solver, carry=c)
            return sol.ys, sol.iterations, sol.converged

        f = jax.jit(run_solver)
        _, it, conv = jax.block_until_ready(f(params, xs, c0))
        iters[name] = {"max": int(np.max(it)), "mean": float(np.mean(it)), "converged": bool(np.all(conv))}
        fns[name] = lambda f=f: f(params, xs, c0)[0]
    return fns, iters


def speed(
    s: dict,
    result: dict,
    log: Callable[[str], None],
    *,
    budget_s: float,
    memory_gb: float,
    after_row: Callable[[], None] | None = None,
) -> None:
    """The speed rows (``result["speed"]``): sequential against QuasiDEER (and DEER)."""
    from seqjax.solvers import DEER, QuasiDEER

    rows = result.setdefault("speed", [])
    B, I, rounds = s["B"], s["I"], s["rounds"]
    start = time.perf_counter()
    done: list[tuple[float, float]] = []  # (work, seconds) of the rows run
    limit = memory_gb * GIB
    grid = sorted(((T, H) for T in s["Ts"] for H in s["Hs"]), key=lambda th: (th[0] * max(th[1], 8), th))
    for T, H in grid:  # cheapest first, so that the budget leaves out the most expensive rows
        tag = f"GRU T={T} H={H} B={B}"
        work = float(T) * B * max(H, 8)
        if done:
            w_ref, s_ref = max(done)
            eta = s_ref * work / w_ref
        else:
            eta = 0.0
        spent = time.perf_counter() - start
        if spent + eta > budget_s:
            result["skipped"].append(
                f"speed {tag}: estimated {eta:.0f} s (from the largest row run, scaled by T*B*H) "
                f"would exceed the budget ({spent:.0f} of {budget_s:.0f} s spent)"
            )
            log(f"deer speed {tag}: skipped (time budget)")
            continue
        solvers = {"sequential": None, "quasi": QuasiDEER()}
        if H <= 64:
            solvers["deer"] = DEER(memory_limit=None)
        est = {k: speed_bytes(T, B, H, I, k) for k in solvers}
        for k in [k for k in solvers if est[k] > limit]:
            result["skipped"].append(
                f"speed {tag} {k}: estimated {report.fmt_bytes(est[k])} > --memory-gb {memory_gb:g}"
            )
            log(f"deer speed {tag} {k}: skipped (memory {report.fmt_bytes(est[k])})")
            del solvers[k]
        if set(solvers) <= {"sequential"}:
            continue
        t_row = time.perf_counter()
        fns, iters = _speed_fns(H, B, T, I, solvers)
        timing = common.time_interleaved(fns, rounds=rounds, warmup=1)
        seq = timing["sequential"]["median_s"]
        row = {
            "T": T,
            "H": H,
            "B": B,
            "I": I,
            "est_bytes": est,
            "timing": timing,
            "iterations": iters,
            "ratio": {k: timing[k]["median_s"] / seq for k in timing},
        }
        rows.append(row)
        done.append((work, time.perf_counter() - t_row))
        log(
            f"deer speed {tag}: sequential {report.fmt_time(seq)}, "
            + ", ".join(
                f"{k} {report.fmt_time(timing[k]['median_s'])} ({row['ratio'][k]:.1f}x, {iters[k]['max']} it)"
                for k in iters
            )
        )
        if after_row is not None:
            after_row()


# --------------------------------------------------------------------------- output


def to_markdown(result: dict) -> str:
    """The sweep table and the speed table (with their settings and checks)."""
    lines: list[str] = []
    sw = result.get("sweep")
    if sw:
        s = result["settings"]["sweep"]
        lines += [
            "## Iterations against lambda_max",
            "",
            f"Elman (tanh) and GRU cells, H = {s['H']}, T = {s['T']}, one sequence of N(0, 1) inputs "
            f"(I = {s['I']}); `W_h = gain * N(0, 1/H)` (`rnn`, `gru`) or `gain * orthogonal` "
            f"(`rnn-orthogonal`). Default tolerance of the dtype, `max_iter = {s['max_iter']}`. "
            "Predicted: `seqjax.spectrum.parallel_convergence` (no constant fitted to these rows); "
            "ratio: predicted / measured, on the contracting side where the solver converged. "
            "ELK (adaptive damping from 1) runs where undamped DEER failed.",
            "",
        ]
        headers = [
            "dtype",
            "cell",
            "gain",
            "lambda_max",
            "verdict",
            "DEER pred",
            "DEER meas",
            "ratio",
            "quasi pred",
            "quasi meas",
            "ratio",
            "ELK",
        ]
        body = []
        for r in sw:
            pd = f"{r['pred_deer']}" + (" (overflows)" if r["pred_deer_overflows"] else "")
            pq = f"{r['pred_quasi']}" + (" (overflows)" if r["pred_quasi_overflows"] else "")
            body.append(
                [
                    r["dtype"],
                    r["family"],
                    r["gain"],
                    f"{r['lambda_max']:+.3f} ± {r['lambda_stderr']:.3f}",
                    r["verdict"],
                    pd,
                    _fmt_meas(r["deer"]),
                    report.fmt_num(r["ratio_deer"], 2),
                    pq,
                    _fmt_meas(r["quasi"]),
                    report.fmt_num(r["ratio_quasi"], 2),
                    _fmt_meas(r.get("elk")),
                ]
            )
        lines += [report.markdown_table(headers, body), ""]
        ratios = [r["ratio_deer"] for r in sw if r["ratio_deer"] is not None]
        if ratios:
            lines += [
                f"DEER predicted / measured on the {len(ratios)} converged contracting rows: "
                f"{min(ratios):.2f} to {max(ratios):.2f}.",
                "",
            ]
    sp = result.get("speed")
    if sp is not None:
        s = result["settings"]["speed"]
        where = result.get("environment", {}).get("device_kind", result["machine"]["cpu_model"])
        lines += [
            "## Speed: sequential scan against the parallel solvers",
            "",
            f"GRU (default initialisation), batch {s['B']}, I = {s['I']}, float32, on {where}. "
            f"Forward evaluation; median (min–max) of {s['rounds']} interleaved rounds; ratio: "
            "time / sequential time (above 1: slower than the sequential scan); it: the iterations "
            "(largest over the batch).",
            "",
        ]
        headers = ["T", "H", "sequential", "QuasiDEER", "ratio", "it", "DEER", "ratio", "it"]
        body = []
        for r in sorted(sp, key=lambda r: (r["T"], r["H"])):
            t, it, ra = r["timing"], r["iterations"], r["ratio"]

            def cells(k, t=t, it=it, ra=ra, H=r["H"]):
                if k not in t:
                    why = "not run (H > 64)" if k == "deer" and H > 64 else "skipped (memory)"
                    return [why, "–", "–"]
                return [report.fmt_range(t[k]), f"{ra[k]:.1f}", str(it[k]["max"])]

            body.append([r["T"], r["H"], report.fmt_range(t["sequential"]), *cells("quasi"), *cells("deer")])
        lines += [report.markdown_table(headers, body) if body else "(no rows ran)", ""]
        lines += [
            f"Load average (1, 5, 15 min) at start {result['machine'].get('load_average_at_start')}, "
            f"at end {result.get('load_average_at_end')}.",
            "",
        ]
    if result.get("partial"):
        lines += ["**Partial**: written after a row; the run had not finished.", ""]
    checks = result.get("checks", [])
    ok = sum(c["ok"] for c in checks)
    lines.append(f"Checks: {ok}/{len(checks)} passed.")
    lines += [f"- FAILED {c['what']}" for c in checks if not c["ok"]]
    return "\n".join(lines)


def plot(result: dict, out_dir: str) -> list[str]:
    """``deer_iterations.png`` (iterations against lambda_max, predicted and measured, log
    scale) and ``deer_speed.png`` (time ratio to the sequential scan against T)."""
    plt = report.pyplot()
    if plt is None:
        return []
    paths = []
    sw = result.get("sweep")
    if sw:
        from matplotlib.lines import Line2D

        colours = {"rnn": "C0", "gru": "C1", "rnn-orthogonal": "C2"}
        T, cap = sw[0]["T"], sw[0]["max_iter"]
        dtypes = [d for d in ("float64", "float32") if any(r["dtype"] == d for r in sw)]
        fig, axes = plt.subplots(1, len(dtypes), figsize=(5.2 * len(dtypes), 4.8), sharey=True, squeeze=False)
        for ax, dtype in zip(axes[0], dtypes):
            for family, c in colours.items():
                rs = sorted(
                    (r for r in sw if r["family"] == family and r["dtype"] == dtype),
                    key=lambda r: r["lambda_max"],
                )
                if not rs:
                    continue
                lam = [r["lambda_max"] for r in rs]
                ax.plot(lam, [max(r["pred_deer"], 1) for r in rs], "--", color=c, lw=1.2)
                ax.plot(lam, [max(r["pred_quasi"], 1) for r in rs], ":", color=c, lw=1.2)
                ok = [r for r in rs if r["deer"]["converged"]]
                ax.plot([r["lambda_max"] for r in ok], [r["deer"]["iterations"] for r in ok], "o", color=c)
                okq = [r for r in rs if r["quasi"]["converged"]]
                ax.plot(
                    [r["lambda_max"] for r in okq],
                    [r["quasi"]["iterations"] for r in okq],
                    "o",
                    color=c,
                    mfc="none",
                )
                bad = [r for r in rs if not r["deer"]["converged"]]
                ax.plot([r["lambda_max"] for r in bad], [cap for _ in bad], "x", color=c, ms=9, mew=2)
            ax.axvline(0.0, color="k", lw=0.8)
            ax.axhline(cap, color="grey", lw=0.8, ls=":")
            ax.set_yscale("log")
            ax.set_ylim(1, T * 1.5)
            ax.set_xlabel("largest Lyapunov exponent lambda_max (per step)")
            ax.set_title(f"{dtype}, T = {T}, max_iter = {cap}", fontsize=10)
        axes[0][0].set_ylabel("iterations")
        handles = [
            Line2D([], [], color=c, lw=3, label=f)
            for f, c in colours.items()
            if any(r["family"] == f for r in sw)
        ]
        handles += [
            Line2D([], [], color="k", ls="--", label="DEER predicted"),
            Line2D([], [], color="k", ls=":", label="quasi-DEER predicted"),
            Line2D([], [], color="k", marker="o", ls="", label="DEER measured"),
            Line2D([], [], color="k", marker="o", mfc="none", ls="", label="quasi-DEER measured"),
            Line2D([], [], color="k", marker="x", mew=2, ls="", label="DEER failed (cap or overflow)"),
        ]
        axes[0][0].legend(handles=handles, fontsize=7.5, loc="upper left")
        fig.suptitle("Parallel-in-time solvers: iterations against lambda_max")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{result['suite']}_iterations.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    sp = result.get("speed")
    if sp:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for i, H in enumerate(sorted({r["H"] for r in sp})):
            rs = sorted((r for r in sp if r["H"] == H), key=lambda r: r["T"])
            for k, ls in (("quasi", "-o"), ("deer", "--s")):
                pts = [(r["T"], r["ratio"][k]) for r in rs if k in r["ratio"]]
                if pts:
                    ax.plot(
                        *zip(*pts),
                        ls,
                        color=f"C{i}",
                        label=f"H={H} {'QuasiDEER' if k == 'quasi' else 'DEER'}",
                    )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("time / sequential time")
        ax.set_title(f"GRU, batch {sp[0]['B']}: parallel solvers against the sequential scan")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{result['suite']}_speed.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def run(
    mode: str = "full",
    *,
    only: str | None = None,
    gpu: bool = False,
    budget_s: float | None = None,
    memory_gb: float | None = None,
    out: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the sections of ``mode`` (``only``: one of them) and return the result dict. With
    ``gpu`` only the speed grid runs, and with ``out`` the files are rewritten after every row."""
    s = settings(mode)
    suite = "deer_gpu" if gpu else "deer"
    result = common.new_result(suite, mode)
    flags = [f"--{mode}"] if mode != "full" else []
    flags += ["--gpu"] if gpu else []
    flags += [f"--only {only}"] if only else []
    result["command"] = " ".join(["python -m benchmarks.deer", *flags])
    result["settings"] = s
    budget = s["budget_s"] if budget_s is None else float(budget_s)
    mem = s["memory_gb"] if memory_gb is None else float(memory_gb)
    result["settings"]["budget_s"], result["settings"]["memory_gb"] = budget, mem
    if gpu:
        result["environment"] = environment()
        result["partial"] = True
        result["machine"]["dtype"] = "float32"
        if memory_gb is None:  # half the device's memory where JAX reports it
            stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
            if stats.get("bytes_limit"):
                mem = 0.5 * stats["bytes_limit"] / GIB
                result["settings"]["memory_gb"] = mem
    do_sweep = not gpu and only in (None, "iterations")
    do_speed = gpu or only in (None, "speed")

    def save():
        if out is not None:
            report.write(result, to_markdown(result), out)

    if do_sweep:
        result["machine"]["dtype"] = "float64 and float32" if "float32" in s["sweep"]["dtypes"] else "float64"
        sweep(s["sweep"], result, log)
    elif not gpu and out is not None:
        _keep_sweep(result, out, mode)
    if do_speed:
        result["speed"] = []
        speed(s["speed"], result, log, budget_s=budget, memory_gb=mem, after_row=save if gpu else None)
    try:
        result["load_average_at_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        result["load_average_at_end"] = None
    result["partial"] = False
    return result


def _keep_sweep(result: dict, out: str, mode: str) -> None:
    """With ``--only speed``: keep the iterations section of ``<out>/deer.json`` (same mode),
    with its own machine, date and checks, so one file holds both sections."""
    import json

    path = os.path.join(out, f"{result['suite']}.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    if old.get("mode") != mode or not old.get("sweep"):
        return
    result["sweep"] = old["sweep"]
    result["settings"]["sweep"] = old["settings"]["sweep"]
    result["sweep_kept_from"] = {
        k: old["machine"].get(k) for k in ("date_utc", "git_commit", "load_average_at_start")
    }
    result["checks"] += [c for c in old.get("checks", []) if not c["what"].startswith("speed")]
    result["notes"].append(
        f"The iterations section is kept from the run of {old['machine'].get('date_utc')} UTC "
        f"(`{old.get('command')}`); the speed section is this run's."
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.deer [--quick | --tiny] [--plot] [--out DIR] [--only ...] [--gpu]``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.deer", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer gains and sizes")
    g.add_argument("--tiny", action="store_true", help="toy sizes for tests (meaningless numbers)")
    p.add_argument("--plot", action="store_true", help="also write the PNG figures")
    p.add_argument("--out", default=report.DEFAULT_OUT, help="output directory (default benchmarks/results)")
    p.add_argument("--only", choices=("iterations", "speed"), default=None, help="run one section")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget of the speed section")
    p.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="skip speed rows estimated above this (GiB; default 4, with --gpu half the device's memory)",
    )
    p.add_argument("--gpu", action="store_true", help="the speed grid on the default device (deer_gpu.*)")
    args = p.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.gpu and jax.default_backend() == "cpu" and mode != "tiny":
        p.error("--gpu needs a GPU (jax.default_backend() is 'cpu'); --gpu --tiny tests the plumbing on CPU.")
    t0 = time.perf_counter()
    result = run(
        mode,
        only=args.only,
        gpu=args.gpu,
        budget_s=args.budget_s,
        memory_gb=args.memory_gb,
        out=args.out,
    )
    result["wall_s"] = time.perf_counter() - t0
    jpath, mpath = report.write(result, to_markdown(result), args.out)
    figs = plot(result, args.out) if args.plot else []
    print(f"wrote {jpath}, {mpath}" + "".join(f", {f}" for f in figs) + f" ({result['wall_s']:.0f} s)")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
