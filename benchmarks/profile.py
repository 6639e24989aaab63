"""Profile: where the time of seqjax's forward+backward goes, beside PyTorch's whole pass.

The speed suite says *how fast*; this suite says *why*. For every configuration of the
speed suite and cell, in one process, on the same weights and inputs, it times (compile
apart, median of ``reps`` calls):

- ``f+b``: seqjax's forward+backward (``jax.grad`` of ``sum(ys**2)`` with respect to every
  parameter and the inputs; the fused BPTT kernel), and ``forward``: ``unroll`` alone;
  ``backward`` is their difference;
- ``bare forward scan``: a ``lax.scan`` doing nothing but the forward's per-step matmuls
  (``x_t W_x + h_{t-1} W_h``) and one ``tanh`` on ``H`` columns: the least any scan-based
  forward can cost on this backend;
- ``bare reverse scan``: the same for the reverse scan's per-step matmul ``dZ_t W_h^T``;
- ``weight-gradient GEMMs``: what the kernel does after the reverse scan, as large
  matmuls over the stacked ``T·B`` rows (``X^T dZ``, ``H^T dZ``, ``dZ W_x^T``, ``Σ dZ``);
- ``rest``: ``f+b`` minus the three above (gate arithmetic, residual stores, loop overhead);
- ``torch f+b``: ``torch.nn.RNN/LSTM/GRU`` forward+backward (oneDNN), when installed;
- the machine's matmul peak (``jnp.dot`` of 2048² float32) and the GFLOP/s the bare scans
  reach.

Before timing, seqjax's gradients are checked against the textbook ``lax.scan`` of the
equations (``benchmarks.peers.textbook_apply``).
"""

from __future__ import annotations

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
    row["f+b"] = common.time_jax(grad, p, xs, reps=reps)[0]
    row["forward"] = common.time_jax(apply, p, xs, reps=reps)[0]
    fwd, rev, gemms = bare_scans(H, G)
    xs_t = jnp.swapaxes(xs, 0, 1)
    dzs = 0.1 * jax.random.normal(k_z, (T, B, G * H), jnp.float32)
    row["bare forward scan"] = common.time_jax(fwd, p["w_x"], p["w_h"], xs_t, reps=reps)[0]
    row["bare reverse scan"] = common.time_jax(rev, p["w_h"], dzs, reps=reps)[0]
    X = xs_t.reshape(T * B, I)
    Hin = jnp.tanh(dzs[..., :H]).reshape(T * B, H)
    row["weight-gradient GEMMs"] = common.time_jax(
        gemms, p["w_x"], X, Hin, dzs.reshape(T * B, G * H), reps=reps
    )[0]
    if torch is not None:
        _, _, _, fwdbwd = speed._torch_fns(torch, kind, H, I, p, np.asarray(xs))
        row["torch f+b"] = common.time_callable(fwdbwd, reps=reps, warmup=2)[0]
    med = {k: v["median_s"] for k, v in row.items() if isinstance(v, dict)}
    row["backward_s"] = med["f+b"] - med["forward"]
    row["bare_scans_s"] = med["bare forward scan"] + med["bare reverse scan"]
    row["rest_s"] = med["f+b"] - row["bare_scans_s"] - med["weight-gradient GEMMs"]
    row["flops_forward_scan"] = 2.0 * B * T * (I + H) * G * H
    row["flops_reverse_scan"] = 2.0 * B * T * G * H * H
    row["gflops_forward_scan"] = row["flops_forward_scan"] / med["bare forward scan"] / 1e9
    row["gflops_reverse_scan"] = row["flops_reverse_scan"] / med["bare reverse scan"] / 1e9
    row["gflops_gemms"] = 2.0 * T * B * G * H * (2 * I + H) / med["weight-gradient GEMMs"] / 1e9
    row["bare_scans_share_of_fb"] = row["bare_scans_s"] / med["f+b"]
    if "torch f+b" in med:
        row["bare_scans_over_torch_fb"] = row["bare_scans_s"] / med["torch f+b"]
        row["torch_over_seqjax"] = med["torch f+b"] / med["f+b"]
    result["rows"].append(row)
    log(
        f"  profile {where}: f+b {report.fmt_time(med['f+b'])}, "
        f"bare scans {report.fmt_time(row['bare_scans_s'])}"
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
    log("matmul peak ...")
    result["matmul_peak"] = common.matmul_peak(n=2048 if mode != "tiny" else 128, reps=s["reps"], torch=None)
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
    """One table: the parts of seqjax's forward+backward, beside PyTorch's whole pass."""
    pk = result["matmul_peak"]["jax"]
    lines = [
        f"Matmul peak (jnp.dot, {result['matmul_peak']['n']}² float32): "
        f"{pk['gflops_best']:.0f} GFLOP/s best, {pk['gflops_median']:.0f} median. "
        f"Times: medians of {result['settings']['reps']} calls.",
        "",
    ]
    table = []
    for r in result["rows"]:
        med = {k: v["median_s"] for k, v in r.items() if isinstance(v, dict)}
        torch_fb = r.get("torch f+b")
        table.append(
            [
                r["config"],
                r["cell"],
                report.fmt_time(med["f+b"]),
                report.fmt_time(med["forward"]),
                report.fmt_time(r["backward_s"]),
                f"{report.fmt_time(med['bare forward scan'])} ({r['gflops_forward_scan']:.0f})",
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
                "bare fwd scan (GFLOP/s)",
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
        "Reading: 'bare scans / torch f+b' near or above 1 means XLA:CPU spends as long on the per-step "
        "matmuls alone, in a loop that does nothing else, as PyTorch spends on its whole forward+backward.",
    ]
    n = len(result["checks"])
    bad = sum(not c["ok"] for c in result["checks"])
    lines.append(f"Gradient checks against the textbook scan: {n - bad}/{n} passed.")
    return "\n".join(lines)
