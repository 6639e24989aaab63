"""Profile: where the time of seqjax's forward+backward goes, beside PyTorch's whole pass.

The speed suite says *how fast*; this suite says *why*. For every configuration of the
speed suite and cell, in one process, on the same weights and inputs, it times (compile
apart; all parts of one row and PyTorch interleaved, round-robin, median of ``reps`` rounds):

- ``f+b``: seqjax's forward+backward (``jax.grad`` of ``sum(ys**2)`` with respect to every
  parameter and the inputs; the fused BPTT kernel), and ``forward``: ``unroll`` alone;
  ``backward`` is their difference;
- ``bare forward scan``: a ``lax.scan`` doing nothing but the forward's per-step matmuls
  (``x_t W_x + h_{t-1} W_h``) and one ``tanh`` on ``H`` columns, and ``bare forward scan,
  one matmul`` (``[x_t, h_{t-1}] [W_x; W_h]``): the least any scan-based forward can cost on
  this backend is the faster of the two;
- ``bare reverse scan``: the same for the reverse scan's per-step matmul ``dZ_t W_h^T``;
- ``weight-gradient GEMMs``: what the kernel does after the reverse scan, as large
  matmuls over the stacked ``T·B`` rows (``X^T dZ``, ``H^T dZ``, ``dZ W_x^T``, ``Σ dZ``);
- ``rest``: ``f+b`` minus the three above (gate arithmetic, residual stores, loop overhead);
- ``torch f+b``: ``torch.nn.RNN/LSTM/GRU`` forward+backward (oneDNN), when installed;
- ``loop overhead``: a near-empty scan of ``T`` steps (the loop's own cost);
- the machine's matmul peak (``jnp.dot`` of 2048² float32), its elementwise bandwidth, and
  the GFLOP/s the bare scans reach.

From these it builds a roofline: the least each part can cost on XLA:CPU (matmuls at the
rate they reach alone, the gate arithmetic's least memory traffic ``ELEMENTWISE_WORDS`` at
the measured bandwidth) against what seqjax and PyTorch take; and it counts the operations
per step in the optimised HLO of the forward and reverse scans (``hlo_ops_per_step``).

Before timing, seqjax's gradients are checked against the textbook ``lax.scan`` of the
equations (``benchmarks.peers.textbook_apply``).
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import seqjax as sj
from benchmarks import common, peers, report, speed

__all__ = ["settings", "bare_scans", "run", "to_markdown"]


def settings(mode: str) -> dict[str, Any]:
    """Configurations (names of ``benchmarks.speed.CONFIGS``), cells and repetitions."""
    if mode == "full":
        return {"configs": ["small", "medium", "large", "long"], "kinds": list(peers.KINDS), "reps": 10}
    if mode == "quick":
        return {"configs": ["small", "medium"], "kinds": ["lstm", "gru"], "reps": 5}
    if mode == "tiny":
        return {"configs": ["tiny"], "kinds": ["lstm"], "reps": 2}
    raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}.")


def bare_scans(H: int, G: int) -> tuple[Callable, Callable, Callable]:
    """The three floors, as functions to jit.

    Returns ``(forward, reverse, gemms)``:

    - ``forward(w_x, w_h, xs)``, ``xs: (T, B, I)``: ``h <- tanh((x_t W_x + h W_h)[:, :H])``,
      returns the last ``h`` ``(B, H)``;
    - ``reverse(w_h, dzs)``, ``dzs: (T, B, G*H)``: ``g <- tanh((tile(g, G) * dz_t) W_h^T)``
      from the last step to the first, returns the first ``g`` ``(B, H)``: per step one
      ``(B, G*H) @ (G*H, H)`` matmul, as in the kernel's reverse scan;
    - ``gemms(w_x, X, Hin, dZ)``, ``X: (T*B, I)``, ``Hin: (T*B, H)``, ``dZ: (T*B, G*H)``:
      ``(X^T dZ, Hin^T dZ, dZ W_x^T, sum(dZ))``.
    """

    def forward(w_x, w_h, xs):
        def body(h, x_t):
            z = x_t @ w_x + h @ w_h
            return jnp.tanh(z[:, :H]), None

        h0 = jnp.zeros((xs.shape[1], H), xs.dtype)
        return jax.lax.scan(body, h0, xs)[0]

    def reverse(w_h, dzs):
        w_t = w_h.T

        def body(g, dz_t):
            d = (jnp.tile(g, (1, G)) * dz_t) @ w_t
            return jnp.tanh(d), None

        g0 = jnp.ones((dzs.shape[1], H), dzs.dtype)
        return jax.lax.scan(body, g0, dzs, reverse=True)[0]

    def gemms(w_x, X, Hin, dZ):
        return X.T @ dZ, Hin.T @ dZ, dZ @ w_x.T, jnp.sum(dZ, axis=0)

    return forward, reverse, gemms


def bare_forward_fused(H: int) -> Callable:
    """``forward(w_x, w_h, xs)`` as ``bare_scans``' but with one matmul per step,
    ``[x_t, h] @ [W_x; W_h]`` (what the fused kernel does for cells whose gates read
    ``x_t W_x + h W_h`` only through the sum)."""

    def forward(w_x, w_h, xs):
        w = jnp.concatenate([w_x, w_h], axis=0)

        def body(h, x_t):
            z = jnp.concatenate([x_t, h], axis=-1) @ w
            return jnp.tanh(z[:, :H]), None

        h0 = jnp.zeros((xs.shape[1], H), xs.dtype)
        return jax.lax.scan(body, h0, xs)[0]

    return forward


def loop_overhead(H: int) -> Callable:
    """``loop(xs)``: a ``lax.scan`` over ``xs: (T, B, I)`` whose step does almost nothing
    (``h <- 0.5 h + x_t[:, :1]`` on a ``(B, H)`` carry, one ``(B, H)`` output stored): the
    cost of the loop itself, per step, on this backend."""

    def loop(xs):
        def body(h, x_t):
            h = 0.5 * h + x_t[:, :1]
            return h, h

        h0 = jnp.zeros((xs.shape[1], H), xs.dtype)
        return jax.lax.scan(body, h0, xs)

    return loop


#: Float32 words per step and per ``B*H`` that the gate arithmetic of the fused kernel must
#: at least move to and from memory (forward: read the pre-activations, write the new carry
#: and the residuals; backward: read the residuals and the output cotangent, write dZ):
#: the elementwise part of the roofline, at the measured bandwidth.
ELEMENTWISE_WORDS = {"rnn": 6, "lstm": 21, "gru": 20}


def bandwidth(reps: int = 5) -> dict[str, float]:
    """Measured bandwidth of an XLA:CPU elementwise op (``a * 1.0001 + b`` on ``2^22``-element
    float32 arrays: 3 x 16 MiB moved per call, the size of a medium LSTM's residuals), in
    GB/s (best and median)."""
    n = 1 << 22
    a = jnp.ones((n,), jnp.float32)
    b = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a, b: a * 1.0001 + b)
    timing, _, _ = common.time_jax(f, a, b, reps=reps)
    moved = 3.0 * 4 * n
    return {"gbs_best": moved / timing["min_s"] / 1e9, "gbs_median": moved / timing["median_s"] / 1e9}


def hlo_ops_per_step(compiled_text: str) -> list[dict[str, int]]:
    """Operations per step of every ``while`` loop in an optimised HLO module (the scans of
    a forward+backward: one dict per loop, in program order), counted by kind: ``dot``
    (matmul, whatever library runs it), ``fusion`` (elementwise loop fusions, dynamic
    slices and updates included), ``copy``, ``concatenate``, ``other``. Parameters,
    tuples, constants, bitcasts and tuple reads are free and not counted."""
    comps: dict[str, list[str]] = {}
    cur = None
    for line in compiled_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if m and line.rstrip().endswith("{"):
            cur = m.group(1)
            comps[cur] = []
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            comps[cur].append(line)
    free = {"parameter", "get-tuple-element", "constant", "tuple", "bitcast"}
    loops = []
    for lines in comps.values():
        for line in lines:
            m = re.search(r"while\(.*body=%([^,\s]+)", line)
            if not m or m.group(1) not in comps:
                continue
            counts = {"dot": 0, "fusion": 0, "copy": 0, "concatenate": 0, "other": 0}
            for bl in comps[m.group(1)]:
                mm = re.search(r"= \S+ ([\w-]+)\(", bl)
                if not mm or mm.group(1) in free:
                    continue
                op = mm.group(1)
                if op == "fusion":
                    op = "dot" if "kind=kCustom" in bl else "fusion"
                counts[op if op in counts else "other"] += 1
            loops.append(counts)
    return loops


def _case(result, cfg, kind, s, torch, log):
    B, T, I, H = speed.CONFIGS[cfg]
    G = peers.GATES[kind]
    key = jax.random.key(zlib.crc32(f"profile/{cfg}/{kind}".encode()))
    k_p, k_x, k_z = jax.random.split(key, 3)
    cell = peers.make_cell(kind, H)
    p = cell.init(k_p, I)
    xs = jax.random.normal(k_x, (B, T, I), jnp.float32)
    where = f"{cfg}/{kind}"
    reps = s["reps"]

    def apply(p, xs):
        return sj.unroll(cell, p, xs)[1]

    loss = lambda p, xs: jnp.sum(apply(p, xs) ** 2)  # noqa: E731
    grad = jax.grad(loss, argnums=(0, 1))
    ref = jax.jit(jax.grad(lambda p, xs: jnp.sum(peers.textbook_apply(kind)(p, xs) ** 2), argnums=(0, 1)))
    err = common.tree_rel_err(jax.jit(grad)(p, xs), ref(p, xs))
    ok = bool(np.isfinite(err) and err <= speed.GRAD_TOL)
    result["checks"].append(
        {
            "where": where,
            "what": "gradients vs textbook scan",
            "rel_err": err,
            "tol": speed.GRAD_TOL,
            "ok": ok,
        }
    )
    if not ok:
        result["skipped"].append(f"{where}: gradient check failed (rel. err {err:.2e}): no timings")
        return

    row: dict[str, Any] = {"config": cfg, "cell": kind, "B": B, "T": T, "I": I, "H": H, "G": G}
    fwd, rev, gemms = bare_scans(H, G)
    xs_t = jnp.swapaxes(xs, 0, 1)
    dzs = 0.1 * jax.random.normal(k_z, (T, B, G * H), jnp.float32)
    X = xs_t.reshape(T * B, I)
    Hin = jnp.tanh(dzs[..., :H]).reshape(T * B, H)
    dZ = dzs.reshape(T * B, G * H)
    parts: dict[str, tuple[Callable, tuple]] = {
        "f+b": (grad, (p, xs)),
        "forward": (apply, (p, xs)),
        "bare forward scan": (fwd, (p["w_x"], p["w_h"], xs_t)),
        "bare forward scan, one matmul": (bare_forward_fused(H), (p["w_x"], p["w_h"], xs_t)),
        "bare reverse scan": (rev, (p["w_h"], dzs)),
        "weight-gradient GEMMs": (gemms, (p["w_x"], X, Hin, dZ)),
        "loop overhead": (loop_overhead(H), (xs_t,)),
    }
    fns: dict[str, Callable[[], Any]] = {}
    for name, (fn, args) in parts.items():
        compiled, _ = common.compile_jax(fn, *args)
        fns[name] = functools.partial(compiled, *args)
        if name == "f+b":
            row["hlo_ops_per_step"] = hlo_ops_per_step(compiled.as_text())
    if torch is not None:
        _, _, _, fwdbwd = speed._torch_fns(torch, kind, H, I, p, np.asarray(xs))
        fns["torch f+b"] = fwdbwd
    row.update(common.time_interleaved(fns, rounds=reps, warmup=2))
    med = {k: v["median_s"] for k, v in row.items() if isinstance(v, dict) and "median_s" in v}
    row["backward_s"] = med["f+b"] - med["forward"]
    fwd_floor = min(med["bare forward scan"], med["bare forward scan, one matmul"])
    row["bare_scans_s"] = fwd_floor + med["bare reverse scan"]
    row["rest_s"] = med["f+b"] - row["bare_scans_s"] - med["weight-gradient GEMMs"]
    row["flops_forward_scan"] = 2.0 * B * T * (I + H) * G * H
    row["flops_reverse_scan"] = 2.0 * B * T * G * H * H
    row["gflops_forward_scan"] = row["flops_forward_scan"] / fwd_floor / 1e9
    row["gflops_reverse_scan"] = row["flops_reverse_scan"] / med["bare reverse scan"] / 1e9
    row["gflops_gemms"] = 2.0 * T * B * G * H * (2 * I + H) / med["weight-gradient GEMMs"] / 1e9
    row["bare_scans_share_of_fb"] = row["bare_scans_s"] / med["f+b"]
    # The roofline: what XLA:CPU allows, part by part. Matmuls at the rate the bare scans and
    # GEMMs reach on their own; the gate arithmetic's unavoidable traffic at the measured
    # bandwidth; the loop's own cost for the two scans.
    bw = result["bandwidth"]["gbs_median"] * 1e9
    row["elementwise_floor_s"] = 4.0 * ELEMENTWISE_WORDS[kind] * B * H * T / bw
    row["loop_floor_s"] = 2.0 * med["loop overhead"]
    # The bare scans already pay their loops; the loop cost is shown, not added again.
    row["floor_s"] = row["bare_scans_s"] + med["weight-gradient GEMMs"] + row["elementwise_floor_s"]
    row["seqjax_over_floor"] = med["f+b"] / row["floor_s"]
    if "torch f+b" in med:
        row["bare_scans_over_torch_fb"] = row["bare_scans_s"] / med["torch f+b"]
        row["torch_over_seqjax"] = med["torch f+b"] / med["f+b"]
        row["torch_over_floor"] = med["torch f+b"] / row["floor_s"]
    result["rows"].append(row)
    log(
        f"  profile {where}: f+b {report.fmt_time(med['f+b'])}, floor {report.fmt_time(row['floor_s'])}"
        + (f", torch f+b {report.fmt_time(med['torch f+b'])}" if "torch f+b" in med else "")
    )


def run(mode: str = "quick", *, log: Callable[[str], None] = print) -> dict:
    """Run the profile suite and return its result dict (see module docstring)."""
    s = settings(mode)
    result = common.new_result("profile", mode)
    result["settings"] = s
    torch = common.setup_torch()
    if torch is None:
        result["skipped"].append("torch: not installed (no torch f+b column)")
    log("matmul peak, bandwidth ...")
    result["matmul_peak"] = common.matmul_peak(n=2048 if mode != "tiny" else 128, reps=s["reps"], torch=None)
    result["bandwidth"] = bandwidth(reps=s["reps"])
    result["notes"].append(
        "bare forward scan: lax.scan of x_t W_x + h W_h and one tanh per step; bare reverse scan: "
        "lax.scan of dZ_t W_h^T and one tanh per step; weight-gradient GEMMs: X^T dZ, H^T dZ, dZ W_x^T, "
        "sum(dZ) over the "
        "T·B stacked rows; rest = f+b - bare scans - GEMMs (gate arithmetic, residual stores, loop overhead)."
    )
    for cfg in s["configs"]:
        for kind in s["kinds"]:
            log(f"profile {cfg} {kind}")
            _case(result, cfg, kind, s, torch, log)
    return result


def to_markdown(result: dict) -> str:
    """Three tables: the parts of seqjax's forward+backward beside PyTorch's whole pass, the
    roofline (the least each part can cost on this backend), and the HLO ops per step."""
    pk = result["matmul_peak"]["jax"]
    bw = result["bandwidth"]
    lines = [
        f"Matmul peak (jnp.dot, {result['matmul_peak']['n']}² float32): "
        f"{pk['gflops_best']:.0f} GFLOP/s best, {pk['gflops_median']:.0f} median. "
        f"Elementwise bandwidth: {bw['gbs_median']:.1f} GB/s median ({bw['gbs_best']:.1f} best). "
        f"Times: medians of {result['settings']['reps']} interleaved rounds (all parts of a row and "
        "PyTorch timed round-robin).",
        "",
        "## Where the time goes",
        "",
    ]
    table = []
    for r in result["rows"]:
        med = {k: v["median_s"] for k, v in r.items() if isinstance(v, dict) and "median_s" in v}
        torch_fb = r.get("torch f+b")
        table.append(
            [
                r["config"],
                r["cell"],
                report.fmt_time(med["f+b"]),
                report.fmt_time(med["forward"]),
                report.fmt_time(r["backward_s"]),
                f"{report.fmt_time(med['bare forward scan'])} / "
                f"{report.fmt_time(med['bare forward scan, one matmul'])} ({r['gflops_forward_scan']:.0f})",
                f"{report.fmt_time(med['bare reverse scan'])} ({r['gflops_reverse_scan']:.0f})",
                f"{report.fmt_time(med['weight-gradient GEMMs'])} ({r['gflops_gemms']:.0f})",
                report.fmt_time(r["rest_s"]),
                f"{100 * r['bare_scans_share_of_fb']:.0f}%",
                "–" if torch_fb is None else report.fmt_time(torch_fb["median_s"]),
                "–" if torch_fb is None else f"{r['bare_scans_over_torch_fb']:.2f}",
            ]
        )
    lines.append(
        report.markdown_table(
            [
                "config",
                "cell",
                "seqjax f+b",
                "forward",
                "backward",
                "bare fwd scan: 2 / 1 matmul (GFLOP/s)",
                "bare rev scan (GFLOP/s)",
                "weight-grad GEMMs (GFLOP/s)",
                "rest",
                "bare scans / f+b",
                "torch f+b",
                "bare scans / torch f+b",
            ],
            table,
        )
    )
    lines += [
        "",
        "## The roofline: what XLA:CPU allows",
        "",
        "floor = the faster bare forward scan + the bare reverse scan + the weight-gradient GEMMs "
        "(matmuls at the rate XLA:CPU reaches on them alone, their loops included) + the gate "
        "arithmetic's least memory traffic at the measured bandwidth. 'loops' is the part of the "
        "floor that two near-empty scans of T steps cost by themselves.",
        "",
    ]
    table = []
    for r in result["rows"]:
        med = {k: v["median_s"] for k, v in r.items() if isinstance(v, dict) and "median_s" in v}
        table.append(
            [
                r["config"],
                r["cell"],
                report.fmt_time(r["bare_scans_s"]),
                report.fmt_time(med["weight-gradient GEMMs"]),
                report.fmt_time(r["elementwise_floor_s"]),
                f"{report.fmt_time(r['loop_floor_s'])} "
                f"({report.fmt_time(med['loop overhead'] / r['T'])}/step)",
                report.fmt_time(r["floor_s"]),
                report.fmt_time(med["f+b"]),
                f"{r['seqjax_over_floor']:.2f}",
                "–" if "torch_over_floor" not in r else f"{r['torch_over_floor']:.2f}",
            ]
        )
    lines.append(
        report.markdown_table(
            [
                "config",
                "cell",
                "per-step matmuls",
                "weight-grad GEMMs",
                "gate arithmetic (bytes/bandwidth)",
                "of which loops",
                "floor",
                "seqjax f+b",
                "seqjax / floor",
                "torch / floor",
            ],
            table,
        )
    )
    lines += ["", "## HLO operations per step (optimised forward+backward)", ""]
    table = []
    for r in result["rows"]:
        loops = r.get("hlo_ops_per_step") or []
        cells = []
        for counts in loops[:2]:
            cells.append(", ".join(f"{v} {k}" for k, v in counts.items() if v))
        while len(cells) < 2:
            cells.append("–")
        table.append([r["config"], r["cell"], cells[0], cells[1]])
    lines.append(
        report.markdown_table(["config", "cell", "forward scan, per step", "reverse scan, per step"], table)
    )
    lines += [
        "",
        "Reading: 'bare scans / torch f+b' near or above 1 means XLA:CPU spends as long on the per-step "
        "matmuls alone, in a loop that does nothing else, as PyTorch spends on its whole forward+backward. "
        "'seqjax / floor' is how far the kernel is from what XLA:CPU allows part by part.",
    ]
    n = len(result["checks"])
    bad = sum(not c["ok"] for c in result["checks"])
    lines.append(f"Gradient checks against the textbook scan: {n - bad}/{n} passed.")
    return "\n".join(lines)
