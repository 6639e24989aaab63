"""Speed: forward and forward+backward of Elman / LSTM / GRU, seqjax against its peers.

For every configuration (``CONFIGS``) and cell, in one process and on the same inputs:

1. every implementation is compiled (compile time recorded apart);
2. seqjax's outputs and gradients are checked against the textbook ``lax.scan`` (same
   weights) and against PyTorch (same weights) before any time is taken; a failed check
   drops that configuration's timings and says so;
3. forward (``ys``) and forward+backward (gradient of ``sum(ys**2)`` with respect to all
   params and the inputs) are timed *interleaved*: two warm-up calls each, then ``reps``
   rounds in which every implementation (PyTorch included) is called once, in an order that
   rotates by round (``benchmarks.common.time_interleaved``); median/min/max per
   implementation, so that load on the machine falls on all of them alike;
4. ratios peer / seqjax (of the medians and of the minima), achieved GFLOP/s from the
   matmul FLOP count, and XLA's peak memory of forward+backward.

FLOP count (matmuls only): forward ``2 B T (I + H) G H`` with ``G`` gate blocks
(1 Elman, 4 LSTM, 3 GRU); forward+backward counted as 3x forward (the backward pass does
two matmuls of the forward's size per forward matmul).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, peers, report

__all__ = ["CONFIGS", "settings", "flops", "run", "to_markdown", "plot"]

#: name -> (B, T, I, H)
CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "small": (32, 100, 64, 64),
    "medium": (32, 100, 64, 256),
    "large": (64, 100, 256, 512),
    "long": (16, 1000, 32, 128),
    "tiny": (2, 6, 3, 4),
}

FWD_TOL = 1e-4  # float32, same maths, different fusion / summation order
GRAD_TOL = 1e-3  # float32 gradients summed over up to 1000 steps in different orders


def settings(mode: str) -> dict[str, Any]:
    """Configurations, repetitions and matmul-peak size of a mode."""
    if mode == "full":
        return {
            "configs": ["small", "medium", "large", "long"],
            "kinds": list(peers.KINDS),
            "reps": 10,
            "peak_n": 2048,
            "peak_reps": 10,
        }
    if mode == "quick":
        return {
            "configs": ["small", "medium"],
            "kinds": list(peers.KINDS),
            "reps": 5,
            "peak_n": 2048,
            "peak_reps": 5,
        }
    if mode == "tiny":
        return {"configs": ["tiny"], "kinds": ["lstm"], "reps": 2, "peak_n": 128, "peak_reps": 2}
    raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}.")


def flops(kind: str, B: int, T: int, I: int, H: int, *, backward: bool) -> float:
    """Matmul FLOPs of one pass: ``2 B T (I + H) G H`` forward, 3x that with the backward."""
    f = 2.0 * B * T * (I + H) * peers.GATES[kind] * H
    return 3.0 * f if backward else f


def _loss(apply: Callable) -> Callable:
    def loss(p, xs):
        ys = apply(p, xs)
        return jnp.sum(ys * ys)

    return loss


def _check(result, name, got, ref, tol, where):
    err = common.tree_rel_err(got, ref)
    ok = bool(np.isfinite(err) and err <= tol)
    result["checks"].append({"where": where, "what": name, "rel_err": err, "tol": tol, "ok": ok})
    return ok


def _torch_fns(torch, kind, H, I, sj_params, xs_np):
    m = peers.torch_module(torch, kind, H, I, sj_params)
    x = torch.from_numpy(xs_np.copy())
    xg = x.clone().requires_grad_(True)
    params = list(m.parameters())

    def fwd():
        with torch.no_grad():
            return m(x)[0]

    def fwdbwd():
        for p in params:
            p.grad = None
        xg.grad = None
        out = m(xg)[0]
        (out * out).sum().backward()
        return None

    return m, xg, fwd, fwdbwd


def _bench_case(result, cfg_name, kind, B, T, I, H, reps, torch, log):
    key = jax.random.key(zlib.crc32(f"{cfg_name}/{kind}".encode()))
    k_p, k_x, k_peer = jax.random.split(key, 3)
    cell = peers.make_cell(kind, H)
    sj_params = cell.init(k_p, I)
    xs = jax.random.normal(k_x, (B, T, I), jnp.float32)
    xs_np = np.asarray(xs)
    where = f"{cfg_name}/{kind}"

    impls = peers.seqjax_impls()
    peer_list, skipped = peers.peer_impls(kind)
    for s in skipped:
        line = f"{where}: {s}"
        if line not in result["skipped"]:
            result["skipped"].append(line)
    impls = impls + peer_list

    # 1. build and compile everything
    built = {}
    for impl in impls:
        apply, params = impl.build(kind, H, I, sj_params, k_peer)
        fwd_c, fwd_cs = common.compile_jax(apply, params, xs)
        bwd_fn = jax.grad(_loss(apply), argnums=(0, 1))
        bwd_c, bwd_cs = common.compile_jax(bwd_fn, params, xs)
        built[impl.name] = (impl, params, fwd_c, fwd_cs, bwd_c, bwd_cs)
        log(f"  compiled {where} {impl.name}: {fwd_cs:.2f} s + {bwd_cs:.2f} s")

    # 2. correctness before any timing
    _, sj_p, sj_fwd, _, sj_bwd, _ = built["seqjax"]
    ys = np.asarray(sj_fwd(sj_p, xs))
    g_p, g_x = sj_bwd(sj_p, xs)
    ok = True
    tb = built["textbook lax.scan"]
    ok &= _check(result, "forward vs textbook lax.scan", ys, np.asarray(tb[2](tb[1], xs)), FWD_TOL, where)
    ok &= _check(result, "gradients vs textbook lax.scan", (g_p, g_x), tb[4](tb[1], xs), GRAD_TOL, where)
    for name, (impl, p, fc, _, bc, _) in built.items():
        if impl.library == "seqjax" and name != "seqjax":
            ok &= _check(result, f"forward vs {name}", ys, np.asarray(fc(p, xs)), FWD_TOL, where)
            ok &= _check(result, f"gradients vs {name}", (g_p, g_x), bc(p, xs), GRAD_TOL, where)
        elif impl.library != "seqjax":
            out = np.asarray(fc(p, xs))
            good = out.shape == ys.shape and bool(np.all(np.isfinite(out)))
            result["checks"].append(
                {"where": where, "what": f"{name}: output shape {out.shape} and finite", "ok": good}
            )
    t_fns = None
    if torch is not None:
        m, xg, t_fwd, t_bwd = _torch_fns(torch, kind, H, I, sj_params, xs_np)
        ok &= _check(result, "forward vs torch", ys, t_fwd().numpy(), FWD_TOL, where)
        t_bwd()
        tg = (peers.torch_grads_as_seqjax(m, sj_params), xg.grad.numpy())
        ok &= _check(result, "gradients vs torch", (g_p, g_x), tg, GRAD_TOL, where)
        t_fns = (t_fwd, t_bwd)
    if not ok:
        result["skipped"].append(f"{where}: seqjax failed a correctness check; no times reported")
        log(f"  {where}: CORRECTNESS CHECK FAILED, skipping timings")
        return

    # 3. timings: every implementation of this row, forward and forward+backward, timed
    # interleaved (round-robin, rotating order), so load on the machine falls on all alike.
    fns: dict[tuple[str, str], Callable[[], Any]] = {}
    meta: dict[tuple[str, str], dict[str, Any]] = {}
    for name, (impl, p, fc, fcs, bc, bcs) in built.items():
        for pass_, comp, cs in (("forward", fc, fcs), ("forward+backward", bc, bcs)):
            fns[(name, pass_)] = functools.partial(comp, p, xs)
            meta[(name, pass_)] = {
                "library": impl.library,
                "note": impl.note,
                "compile_s": cs,
                "memory": common.memory_stats(comp) if pass_ == "forward+backward" else None,
            }
    if t_fns is not None:
        for pass_, fn in (("forward", t_fns[0]), ("forward+backward", t_fns[1])):
            fns[("torch", pass_)] = fn
            meta[("torch", pass_)] = {"library": "torch", "note": "", "compile_s": None, "memory": None}
    else:
        line = f"{where}: torch: not installed"
        if line not in result["skipped"]:
            result["skipped"].append(line)
    rows = []
    for pass_ in ("forward", "forward+backward"):
        keys = [k for k in fns if k[1] == pass_]
        timed = common.time_interleaved({k[0]: fns[k] for k in keys}, rounds=reps, warmup=2)
        for k in keys:
            m = meta[k]
            row = {"impl": k[0], "library": m["library"], "pass": pass_, "note": m["note"], **timed[k[0]]}
            row["compile_s"] = m["compile_s"]
            if pass_ == "forward+backward":
                row["memory"] = m["memory"]
            rows.append(row)
        log(f"  timed {where} {pass_}: {len(keys)} implementations interleaved")
    del built

    # 4. ratios, GFLOP/s
    for pass_ in ("forward", "forward+backward"):
        base = next(r for r in rows if r["impl"] == "seqjax" and r["pass"] == pass_)
        f = flops(kind, B, T, I, H, backward=pass_ != "forward")
        for r in rows:
            if r["pass"] != pass_:
                continue
            r["flops"] = f
            r["gflops"] = f / r["median_s"] / 1e9
            r["ratio_median"] = r["median_s"] / base["median_s"]
            r["ratio_min"] = r["min_s"] / base["min_s"]
    for r in rows:
        r.update({"config": cfg_name, "cell": kind, "B": B, "T": T, "I": I, "H": H})
        result["rows"].append(r)


def run(mode: str = "quick", *, log: Callable[[str], None] = print, configs: list[str] | None = None) -> dict:
    """Run the speed suite and return its result dict (see module docstring).

    Args:
      mode: ``"full"``, ``"quick"`` or ``"tiny"``.
      log: progress printer.
      configs: override the configurations of the mode (names in ``CONFIGS``).
    """
    s = settings(mode)
    result = common.new_result("speed", mode)
    torch = common.setup_torch()
    if torch is None:
        result["skipped"].append("torch: not installed (no PyTorch rows, no torch correctness check)")
    result["unroll_options"] = sorted(peers.unroll_options())
    result["tolerances"] = {"forward": FWD_TOL, "gradients": GRAD_TOL}
    log("matmul peak ...")
    result["matmul_peak"] = common.matmul_peak(n=s["peak_n"], reps=s["peak_reps"], torch=torch)
    result["configs"] = {c: dict(zip("BTIH", CONFIGS[c])) for c in (configs or s["configs"])}
    result["reps"] = s["reps"]
    result["notes"].append(
        "Ratios are peer time / seqjax time (above 1: seqjax faster), of the medians (and of the minima); "
        "all implementations of a row are timed interleaved (round-robin, rotating order). "
        "GFLOP/s counts matmul FLOPs only: forward 2·B·T·(I+H)·G·H, forward+backward 3x that."
    )
    result["notes"].append(
        "Forward+backward = gradient of sum(ys²) with respect to every parameter and the inputs. "
        "Peak memory: XLA's compiled memory analysis of that gradient function, arguments + outputs + "
        "temporaries - aliased (JAX rows only)."
    )
    for cfg_name in configs or s["configs"]:
        B, T, I, H = CONFIGS[cfg_name]
        for kind in s["kinds"]:
            log(f"speed {cfg_name} {kind} (B={B}, T={T}, I={I}, H={H})")
            _bench_case(result, cfg_name, kind, B, T, I, H, s["reps"], torch, log)
    return result


def to_markdown(result: dict) -> str:
    """The speed tables: one per configuration, plus the matmul peak."""
    pk = result["matmul_peak"]
    lines = [
        f"Matmul peak ({pk['n']}² float32): jnp.dot {pk['jax']['gflops_best']:.0f} GFLOP/s best "
        f"({pk['jax']['gflops_median']:.0f} median)"
        + (
            f"; torch.mm {pk['torch']['gflops_best']:.0f} best ({pk['torch']['gflops_median']:.0f} median)."
            if "torch" in pk
            else "."
        ),
        "",
        f"Times: median (min–max) of {result['reps']} interleaved rounds after warm-up. "
        "Ratio = peer median / seqjax median (>1: seqjax faster).",
    ]
    rows = result["rows"]
    for cfg in result["configs"]:
        c = result["configs"][cfg]
        lines += ["", f"## {cfg} (B={c['B']}, T={c['T']}, I={c['I']}, H={c['H']})", ""]
        table = []
        for kind in peers.KINDS:
            impls = [
                r["impl"] for r in rows if r["config"] == cfg and r["cell"] == kind and r["pass"] == "forward"
            ]
            for name in impls:
                f = next(
                    r
                    for r in rows
                    if r["config"] == cfg
                    and r["cell"] == kind
                    and r["impl"] == name
                    and r["pass"] == "forward"
                )
                b = next(
                    r
                    for r in rows
                    if r["config"] == cfg
                    and r["cell"] == kind
                    and r["impl"] == name
                    and r["pass"] == "forward+backward"
                )
                mem = (b.get("memory") or {}).get("peak_bytes")
                table.append(
                    [
                        kind,
                        name,
                        report.fmt_range(f),
                        f"{f['ratio_median']:.2f}",
                        report.fmt_range(b),
                        f"{b['ratio_median']:.2f}",
                        f"{f['gflops']:.1f} / {b['gflops']:.1f}",
                        "–" if f["compile_s"] is None else f"{f['compile_s']:.2f} / {b['compile_s']:.2f}",
                        report.fmt_bytes(mem),
                    ]
                )
        lines.append(
            report.markdown_table(
                [
                    "cell",
                    "implementation",
                    "forward",
                    "ratio",
                    "forward+backward",
                    "ratio",
                    "GFLOP/s fwd / f+b",
                    "compile s fwd / f+b",
                    "peak mem f+b",
                ],
                table,
            )
        )
    bad = [c for c in result["checks"] if not c["ok"]]
    n = len(result["checks"])
    lines += [
        "",
        f"Correctness checks: {n - len(bad)}/{n} passed"
        f" (forward rel. err ≤ {FWD_TOL:g}, gradients ≤ {GRAD_TOL:g}, against the textbook scan and torch).",
    ]
    worst = max((c.get("rel_err", 0.0) for c in result["checks"]), default=0.0)
    lines.append(f"Largest relative error seen: {worst:.2e}.")
    for c in bad:
        lines.append(f"- FAILED {c['where']}: {c['what']} (rel. err {c.get('rel_err')})")
    return "\n".join(lines)


def plot(result: dict, out_dir: str) -> list[str]:
    """Bar chart of forward+backward ratios (peer / seqjax) per configuration and cell."""
    plt = report.pyplot()
    if plt is None:
        return []
    rows = [r for r in result["rows"] if r["pass"] == "forward+backward" and r["impl"] != "seqjax"]
    if not rows:
        return []
    groups = sorted(
        {(r["config"], r["cell"]) for r in rows}, key=lambda g: (list(result["configs"]).index(g[0]), g[1])
    )
    impls = sorted({r["impl"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    w = 0.8 / max(len(impls), 1)
    for j, name in enumerate(impls):
        xs, hs = [], []
        for i, g in enumerate(groups):
            r = next((r for r in rows if (r["config"], r["cell"]) == g and r["impl"] == name), None)
            if r is not None:
                xs.append(i + j * w)
                hs.append(r["ratio_median"])
        ax.bar(xs, hs, width=w, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{k}" for c, k in groups])
    ax.set_ylabel("peer time / seqjax time (forward+backward)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = f"{out_dir}/speed_ratios.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
