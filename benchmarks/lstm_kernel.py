"""The LSTM kernel, before and after: 0.1's fused kernel against 0.2's, in one run.

``python -m benchmarks.lstm_kernel [--quick|--tiny] [--out DIR]`` times the forward+backward
(the gradient of ``sum(ys**2)`` with respect to every parameter and the inputs) of:

- ``seqjax``: today's ``seqjax.lstm`` (one matmul per step, ``[x_t, h] @ [W_x; W_h]``, and
  the four gate residuals stored as four scan outputs);
- ``0.1 kernel``: the fused kernel as 0.1 shipped it (two matmuls per step, the gate
  residuals concatenated into one ``(B, 4H)`` array every step), rebuilt here from the same
  ``GateMath`` interface so that both run side by side;
- ``0.1 + one matmul`` and ``0.1 + separate residuals``: each change alone;
- Flax's ``OptimizedLSTMCell`` and ``LSTMCell`` under ``nn.RNN``, and ``torch.nn.LSTM``
  (when installed) holding the same weights;

all interleaved (``benchmarks.common.time_interleaved``: round-robin, rotating order) on the
same inputs, after checking every seqjax variant's gradients against the default's.
Ratios are time / seqjax's time (above 1: slower than seqjax). Compile time (trace + XLA
compile of the forward+backward) is recorded per JAX implementation.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import seqjax as sj
from benchmarks import common, peers, report, speed
from seqjax._util import bind
from seqjax.cells import _fused

_lstm_mod = importlib.import_module("seqjax.cells.lstm")  # the module (seqjax.cells.lstm is the function)

__all__ = ["CONFIGS", "settings", "old_gate_math", "run", "to_markdown", "main"]

CONFIGS = {name: speed.CONFIGS[name] for name in ("small", "medium", "large", "tiny")}


def settings(mode: str) -> dict[str, Any]:
    """Configurations and rounds of a mode."""
    if mode == "full":
        return {"configs": ["medium", "large"], "rounds": 15}
    if mode == "quick":
        return {"configs": ["medium"], "rounds": 8}
    if mode == "tiny":
        return {"configs": ["tiny"], "rounds": 2}
    raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}.")


def _old_fwd(a, u, state):
    _, c = state
    i, f, g, o = _lstm_mod._gates_of(_fused.preactivation(a, u), c.shape[-1])
    h_new, c_new = _lstm_mod._cell_update(i, f, g, o, c)
    return (h_new, c_new), (c, jnp.concatenate([i, f, g, o], axis=-1))


def _old_bwd(res, h_in, h_out, d):
    c_in, gates = res
    H = c_in.shape[-1]
    i, f, g, o = (gates[..., k * H : (k + 1) * H] for k in range(4))
    dz, dc_in = _lstm_mod._gate_grads(i, f, g, o, c_in, d[0], d[1])
    return dz, dz, (jnp.zeros_like(d[0]), dc_in)


def old_gate_math(*, one_matmul: bool = False, separate_residuals: bool = False) -> _fused.GateMath:
    """The LSTM's ``GateMath`` as 0.1 had it (concatenated residuals, two matmuls per step),
    with either 0.2 change switched on alone."""
    new = _lstm_mod.lstm_gate_math()
    if separate_residuals:
        return new._replace(summed=one_matmul)
    return new._replace(fwd=bind(_old_fwd), bwd=bind(_old_bwd), summed=one_matmul)


def _variants(H: int) -> dict[str, sj.Cell]:
    base = sj.lstm(H)
    return {
        "seqjax": base,
        "0.1 kernel": base._replace(kernel=_fused.affine_kernel(old_gate_math())),
        "0.1 + one matmul": base._replace(kernel=_fused.affine_kernel(old_gate_math(one_matmul=True))),
        "0.1 + separate residuals": base._replace(
            kernel=_fused.affine_kernel(old_gate_math(separate_residuals=True))
        ),
    }


def _grad_fn(apply):
    return jax.grad(lambda p, xs: jnp.sum(apply(p, xs) ** 2), argnums=(0, 1))


def _unroll_apply(cell, p, xs):
    return sj.unroll(cell, p, xs)[1]


def _case(result, cfg, rounds, torch, log):
    B, T, I, H = CONFIGS[cfg]
    key = jax.random.key(zlib.crc32(f"lstm_kernel/{cfg}".encode()))
    k_p, k_x, k_peer = jax.random.split(key, 3)
    variants = _variants(H)
    params = variants["seqjax"].init(k_p, I)
    xs = jax.random.normal(k_x, (B, T, I), jnp.float32)
    fns: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    ref = None
    for name, cell in variants.items():
        compiled, cs = common.compile_jax(_grad_fn(functools.partial(_unroll_apply, cell)), params, xs)
        compile_s[name] = cs
        out = compiled(params, xs)
        if ref is None:
            ref = out
        else:
            err = common.tree_rel_err(out, ref)
            ok = bool(np.isfinite(err) and err <= speed.GRAD_TOL)
            result["checks"].append(
                {"where": cfg, "what": f"{name} gradients vs seqjax", "rel_err": err, "ok": ok}
            )
        fns[name] = functools.partial(compiled, params, xs)
    for cell_name in ("OptimizedLSTMCell", "LSTMCell"):
        apply, fp = peers._flax_build(cell_name)("lstm", H, I, params, k_peer)
        compiled, cs = common.compile_jax(_grad_fn(apply), fp, xs)
        compile_s[f"flax {cell_name}"] = cs
        fns[f"flax {cell_name}"] = functools.partial(compiled, fp, xs)
    if torch is not None:
        m, xg, _, fwdbwd = speed._torch_fns(torch, "lstm", H, I, params, np.asarray(xs))
        fwdbwd()
        tg = (peers.torch_grads_as_seqjax(m, params), xg.grad.numpy())
        err = common.tree_rel_err(ref, tg)
        result["checks"].append(
            {
                "where": cfg,
                "what": "seqjax gradients vs torch",
                "rel_err": err,
                "ok": bool(err <= speed.GRAD_TOL),
            }
        )
        fns["torch"] = fwdbwd
    log(f"  {cfg}: timing {len(fns)} implementations interleaved, {rounds} rounds")
    timed = common.time_interleaved(fns, rounds=rounds, warmup=2)
    base = timed["seqjax"]["median_s"]
    for name, st in timed.items():
        result["rows"].append(
            {
                "config": cfg,
                "B": B,
                "T": T,
                "I": I,
                "H": H,
                "impl": name,
                **st,
                "compile_s": compile_s.get(name),
                "ratio_median": st["median_s"] / base,
                "gflops": speed.flops("lstm", B, T, I, H, backward=True) / st["median_s"] / 1e9,
            }
        )


def run(mode: str = "full", *, log=print) -> dict:
    """Run the comparison; returns the result dict (``rows``: one per config and implementation)."""
    s = settings(mode)
    result = common.new_result("lstm_kernel", mode)
    result["settings"] = s
    torch = common.setup_torch()
    if torch is None:
        result["skipped"].append("torch: not installed (no PyTorch row)")
    for cfg in s["configs"]:
        log(f"lstm_kernel {cfg} {CONFIGS[cfg]}")
        _case(result, cfg, s["rounds"], torch, log)
    return result


def to_markdown(result: dict) -> str:
    """One table per configuration: median (min–max), ratio to seqjax, GFLOP/s, compile time."""
    lines = [
        f"Forward+backward of the LSTM, medians of {result['settings']['rounds']} interleaved rounds. "
        "Ratio = time / seqjax's time (above 1: slower than seqjax).",
    ]
    for cfg in result["settings"]["configs"]:
        B, T, I, H = CONFIGS[cfg]
        lines += ["", f"## {cfg} (B={B}, T={T}, I={I}, H={H})", ""]
        table = []
        for r in result["rows"]:
            if r["config"] != cfg:
                continue
            table.append(
                [
                    r["impl"],
                    report.fmt_range(r),
                    f"{r['ratio_median']:.2f}",
                    f"{r['gflops']:.0f}",
                    "–" if r["compile_s"] is None else f"{r['compile_s']:.2f} s",
                ]
            )
        lines.append(report.markdown_table(["implementation", "f+b", "ratio", "GFLOP/s", "compile"], table))
    bad = [c for c in result["checks"] if not c["ok"]]
    lines += ["", f"Gradient checks: {len(result['checks']) - len(bad)}/{len(result['checks'])} passed."]
    for c in bad:
        lines.append(f"- FAILED {c['where']}: {c['what']} (rel. err {c['rel_err']:.2e})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.lstm_kernel [--quick|--tiny] [--out DIR]``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.lstm_kernel", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default=report.DEFAULT_OUT)
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    t0 = time.perf_counter()
    result = run(mode)
    result["wall_s"] = time.perf_counter() - t0
    result["command"] = (
        "python -m benchmarks.lstm_kernel" + {"full": "", "quick": " --quick", "tiny": " --tiny"}[mode]
    )
    report.write(result, to_markdown(result), args.out)
    print(to_markdown(result))
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
