"""Spectrum: step Jacobians and full Lyapunov spectra, seqjax against what a user would write.

For a tanh RNN and an LSTM (state ``s = h``, resp. ``s = [h, c]``: ``S = H``, resp. ``2H``),
H = 64 and 256, one input sequence of length T = 1,000 and 10,000 (I = 16, ``N(0, 1)``):

All step Jacobians ``J_t = ds_t/ds_{t-1}`` (``(T, S, S)``):

- ``seqjax.spectrum.step_jacobians`` (analytic Jacobians for built-in cells), and with
  ``method="autodiff"`` (``vmap`` of ``jacfwd`` over the trajectory);
- per-step ``jax.jacfwd`` inside a Python loop (each step a jitted call; the state advanced
  in the same loop): run on the first ``P`` steps and extrapolated linearly to ``T``;
- ``jax.jacfwd`` of the whole unrolled map ``s_0 -> (s_1, ..., s_T)``: the products
  ``ds_t/ds_0`` a user forms to study gradient flow (``(T, S, S)``, same memory).

Full Lyapunov spectrum (QR / Benettin method, ``k = S`` exponents):

- ``seqjax.spectrum.lyapunov_spectrum`` (dense path);
- per-step ``jax.jacfwd`` + ``jnp.linalg.qr`` in a Python loop (first ``P`` steps,
  extrapolated);
- ``jax.jacfwd`` of the unrolled map ``s_0 -> s_T`` and ``log(singular values) / T``: the
  naive estimate, which loses all but the top exponents to float32 round-off; its error
  against the QR result is reported beside its time.

Rows whose ``(T, S, S)`` output would exceed ``MAX_BYTES`` are skipped with a note.
Correctness: seqjax's step Jacobians are compared with the Python loop's on the first
``P`` steps, and the sum of seqjax's exponents with the mean ``log|det J_t|`` (an identity
of the QR method).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, peers, report

__all__ = ["settings", "MAX_BYTES", "run", "to_markdown", "plot"]

MAX_BYTES = 1152 * 2**20
INPUT_SIZE = 16


def settings(mode: str) -> dict[str, Any]:
    """Cells, hidden sizes, lengths, loop prefix ``P`` and repetitions of a mode."""
    if mode == "full":
        return {"kinds": ["rnn", "lstm"], "Hs": [64, 256], "Ts": [1000, 10000], "P": 1000, "reps": 3, "I": 16}
    if mode == "quick":
        return {"kinds": ["rnn", "lstm"], "Hs": [64], "Ts": [1000], "P": 200, "reps": 2, "I": 16}
    if mode == "tiny":
        return {"kinds": ["rnn", "lstm"], "Hs": [4], "Ts": [20], "P": 10, "reps": 1, "I": 3}
    raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}.")


def _flat_step(cell, params):
    """``F(s, x) -> s'`` on the flat state (leaves of the carry concatenated in tree order),
    written here independently of ``seqjax.spectrum``."""
    like = cell.initial_carry(params, ())
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [a.size for a in leaves]

    def unflat(s):
        out, i = [], 0
        for a, n in zip(leaves, sizes):
            out.append(s[i : i + n].reshape(a.shape))
            i += n
        return jax.tree_util.tree_unflatten(treedef, out)

    def flat(c):
        return jnp.concatenate([a.reshape(-1) for a in jax.tree_util.tree_leaves(c)])

    def f(s, x):
        return flat(cell.step(params, unflat(s), x)[0])

    return f, flat(like)


def _timed(fn, args, reps, *, budget_s=60.0):
    """Compile + time a JAX function: one warm-up call, then ``reps`` calls, fewer when one
    call is long (down to the warm-up call alone when it exceeds ``budget_s``)."""
    compiled, cs = common.compile_jax(fn, *args)
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t0
    n = min(reps, int(budget_s / max(first, 1e-9)))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    # one call is long: the first call after compilation is the measurement
    timing = common.stats(times or [first])
    timing["compile_s"] = cs
    timing["first_call_s"] = first
    return timing, out


def _time_loop(go, reps, *, budget_s=60.0):
    """Warm a Python-loop baseline on 2 steps (compiles its jitted step), then time full
    calls: ``reps`` of them, fewer when one call is long (the first full call counts)."""
    jax.block_until_ready(go(2))
    t0 = time.perf_counter()
    out = jax.block_until_ready(go())
    first = time.perf_counter() - t0
    n = min(reps, int(budget_s / max(first, 1e-9)))
    times = [first]
    for _ in range(max(n - 1, 0)):
        t0 = time.perf_counter()
        jax.block_until_ready(go())
        times.append(time.perf_counter() - t0)
    timing = common.stats(times)
    timing["compile_s"] = None
    return timing, out


def _loop_step_jacobians(f, s0, xs, P):
    """Per-step ``jax.jacfwd`` in a Python loop over the first ``P`` steps."""
    jac = jax.jit(jax.jacfwd(f, argnums=0))
    step = jax.jit(f)

    def go(n=P):
        s, out = s0, []
        for t in range(n):
            out.append(jac(s, xs[t]))
            s = step(s, xs[t])
        return jnp.stack(out)

    return go


def _loop_lyapunov(f, s0, xs, P, Q0):
    """Per-step ``jax.jacfwd`` + QR in a Python loop over the first ``P`` steps; returns the
    exponents (sum of ``log|R_ii|`` / P), sorted decreasing."""

    @jax.jit
    def one(s, Q, x):
        J = jax.jacfwd(f, argnums=0)(s, x)
        Qn, R = jnp.linalg.qr(J @ Q)
        return f(s, x), Qn, jnp.log(jnp.abs(jnp.diagonal(R)))

    def go(n=P):
        s, Q, acc = s0, Q0, jnp.zeros(Q0.shape[1], Q0.dtype)
        for t in range(n):
            s, Q, logs = one(s, Q, xs[t])
            acc = acc + logs
        return jnp.sort(acc / n)[::-1]

    return go


def _case(result, kind, H, T, s, log):
    I = s["I"]
    P = min(s["P"], T)
    key = jax.random.key(zlib.crc32(f"spectrum/{kind}/{H}".encode()))
    k_p, k_x, k_q = jax.random.split(key, 3)
    cell = peers.make_cell(kind, H)
    params = cell.init(k_p, I)
    xs = jax.random.normal(jax.random.fold_in(k_x, T), (T, I), jnp.float32)
    f, s0 = _flat_step(cell, params)
    S = s0.shape[0]
    where = f"{kind}/H={H}/T={T}"
    base = {"cell": kind, "H": H, "S": S, "T": T, "I": I}
    jac_bytes = 4 * T * S * S
    spec = common.optional_import("seqjax.spectrum")

    def add(table, impl, timing, **extra):
        result["rows"].append({**base, "table": table, "impl": impl, **(timing or {}), **extra})

    # ---- loop baselines on the first P steps, extrapolated
    loop_sj = _loop_step_jacobians(f, s0, xs, P)
    t_loop, J_loop = _time_loop(loop_sj, s["reps"])
    scale = T / P
    ext = {
        k: (t_loop[k] * scale if isinstance(t_loop.get(k), float) else t_loop[k])
        for k in ("median_s", "min_s", "max_s")
    }
    add(
        "step_jacobians",
        "per-step jax.jacfwd, Python loop",
        {**t_loop, **ext},
        extrapolated_from=P,
        measured_median_s=t_loop["median_s"],
    )
    Q0, _ = jnp.linalg.qr(jax.random.normal(k_q, (S, S), jnp.float32))
    loop_ly = _loop_lyapunov(f, s0, xs, P, Q0)
    t_ll, lyap_loop = _time_loop(loop_ly, s["reps"])
    ext = {k: t_ll[k] * scale for k in ("median_s", "min_s", "max_s")}
    add(
        "lyapunov",
        "per-step jax.jacfwd + QR, Python loop",
        {**t_ll, **ext},
        extrapolated_from=P,
        measured_median_s=t_ll["median_s"],
    )
    log(f"  {where}: Python loops timed on {P} steps")

    # ---- seqjax
    lyap_sj = None
    if spec is None:
        line = "seqjax.spectrum is missing in this checkout: no seqjax rows"
        if line not in result["skipped"]:
            result["skipped"].append(line)
    else:
        for method in ("auto", "autodiff"):
            name = "seqjax step_jacobians" + ("" if method == "auto" else " (method='autodiff')")
            if jac_bytes > s.get("max_bytes", MAX_BYTES):
                result["skipped"].append(f"{where}: {name}: output {report.fmt_bytes(jac_bytes)} > limit")
                continue
            fn = (lambda m: lambda p, x: spec.step_jacobians(cell, p, x, method=m).jacobians)(method)
            timing, J = _timed(fn, (params, xs), s["reps"])
            add("step_jacobians", name, timing)
            err = common.rel_err(np.asarray(J[:P]), np.asarray(J_loop))
            result["checks"].append(
                {
                    "where": where,
                    "what": f"{name} vs per-step jacfwd loop (first {P} steps)",
                    "rel_err": err,
                    "tol": 1e-4,
                    "ok": bool(err <= 1e-4),
                }
            )
            del J
        # the sum of the exponents equals the mean log|det J_t| (rank_tol=0: raw values, no
        # rank-deficiency cut-off): check on the first P steps
        fn_p = lambda p, x: spec.lyapunov_spectrum(cell, p, x, window=P, rank_tol=0.0).exponents  # noqa: E731
        ex_p = np.asarray(jax.jit(fn_p)(params, xs[:P]), dtype=np.float64)
        logdet = float(np.mean(np.linalg.slogdet(np.asarray(J_loop, dtype=np.float64))[1]))
        what = f"sum of seqjax exponents (rank_tol=0) vs mean log|det J_t| ({P} steps)"
        if np.isfinite(logdet):
            err = abs(float(np.sum(ex_p)) - logdet) / max(abs(logdet), 1e-12)
            ok = bool(np.isfinite(err) and err <= 1e-3)
            result["checks"].append({"where": where, "what": what, "rel_err": err, "tol": 1e-3, "ok": ok})
        else:
            result["notes"].append(f"{where}: a step Jacobian is exactly singular; {what} not checked")
        diff_top = float(abs(ex_p[0] - float(lyap_loop[0])))
        result["checks"].append(
            {
                "where": where,
                "what": f"largest exponent: seqjax vs Python-loop QR ({P} steps), "
                "abs. difference (different random frames; informative)",
                "abs_diff": diff_top,
                "ok": True,
            }
        )
        fn = lambda p, x: spec.lyapunov_spectrum(cell, p, x).exponents  # noqa: E731
        timing, lyap_sj = _timed(fn, (params, xs), s["reps"])
        lyap_sj = np.asarray(lyap_sj, dtype=np.float64)
        add(
            "lyapunov",
            "seqjax lyapunov_spectrum",
            timing,
            lambda_max=float(lyap_sj[0]),
            lambda_sum=float(np.sum(lyap_sj)),
        )
        log(f"  {where}: seqjax timed")

    # ---- jacfwd of the whole unrolled map
    def traj(s_init, x):
        def body(c, x_t):
            n = f(c, x_t)
            return n, n

        return jax.lax.scan(body, s_init, x)[1]

    if jac_bytes > s.get("max_bytes", MAX_BYTES):
        result["skipped"].append(
            f"{where}: jax.jacfwd of the unrolled map (all ds_t/ds_0): output "
            f"{report.fmt_bytes(jac_bytes)} > limit"
        )
    else:
        timing, _ = _timed(lambda s_init, x: jax.jacfwd(traj)(s_init, x), (s0, xs), s["reps"])
        add("step_jacobians", "jax.jacfwd of unrolled map (products ds_t/ds_0)", timing)
    fn = lambda s_init, x: jax.jacfwd(lambda a: traj(a, x)[-1])(s_init)  # noqa: E731
    timing, Jprod = _timed(fn, (s0, xs), s["reps"])
    sv = np.linalg.svd(np.asarray(Jprod, dtype=np.float64), compute_uv=False)
    with np.errstate(divide="ignore"):
        naive = np.log(sv) / T
    extra = {
        "lambda_max": float(naive[0]) if np.isfinite(naive[0]) else None,
        "finite_exponents": int(np.sum(np.isfinite(naive))),
    }
    if lyap_sj is not None:
        both = np.isfinite(naive) & np.isfinite(lyap_sj)
        extra["max_abs_error_vs_qr"] = (
            float(np.max(np.abs(naive[both] - lyap_sj[both]))) if both.any() else None
        )
        extra["top_error_vs_qr"] = float(abs(naive[0] - lyap_sj[0])) if np.isfinite(naive[0]) else None
    add("lyapunov", "jax.jacfwd of unrolled map s_0 -> s_T, log σ / T (naive)", timing, **extra)
    log(f"  {where}: whole-map jacfwd timed")

    # ratios against seqjax
    for table in ("step_jacobians", "lyapunov"):
        rows = [
            r
            for r in result["rows"]
            if r["table"] == table and r["cell"] == kind and r["H"] == H and r["T"] == T
        ]
        ref = next((r for r in rows if r["impl"].startswith("seqjax") and "autodiff" not in r["impl"]), None)
        for r in rows:
            r["ratio_median"] = r["median_s"] / ref["median_s"] if ref else None


def run(mode: str = "quick", *, log: Callable[[str], None] = print) -> dict:
    """Run the spectrum suite and return its result dict (see module docstring)."""
    s = settings(mode)
    result = common.new_result("spectrum", mode)
    result["settings"] = {k: v for k, v in s.items()}
    result["notes"].append(
        f"Python-loop rows run the first {s['P']} steps (or T if shorter) and are extrapolated linearly to T "
        "(columns 'measured' hold the raw time). Ratios: time / seqjax time (>1: seqjax faster)."
    )
    result["notes"].append(
        "The naive Lyapunov estimate (log singular values of ds_T/ds_0 over T) underflows/overflows in "
        "float32: 'finite' counts the exponents it can still resolve, 'error' its largest deviation from "
        "seqjax's QR result."
    )
    if common.optional_import("seqjax.spectrum") is None:
        result["skipped"].append("seqjax.spectrum is missing in this checkout: only the baselines run")
    for kind in s["kinds"]:
        for H in s["Hs"]:
            for T in s["Ts"]:
                log(f"spectrum {kind} H={H} T={T}")
                _case(result, kind, H, T, s, log)
    return result


def to_markdown(result: dict) -> str:
    """Two tables: all step Jacobians, and the full Lyapunov spectrum."""
    out = []
    titles = {
        "step_jacobians": "All step Jacobians J_t (T, S, S)",
        "lyapunov": "Full Lyapunov spectrum (k = S)",
    }
    for table, title in titles.items():
        rows = [r for r in result["rows"] if r["table"] == table]
        body = []
        for r in rows:
            t = report.fmt_range(r)
            if r.get("extrapolated_from") and r["extrapolated_from"] < r["T"]:
                measured = report.fmt_time(r["measured_median_s"])
                t += f" [×T/P: measured {measured} on the first P = {r['extrapolated_from']} steps]"
            extra = ""
            if table == "lyapunov":
                if "finite_exponents" in r:
                    extra = (
                        f"λ_max {report.fmt_num(r.get('lambda_max'))}, "
                        f"finite {r['finite_exponents']}/{r['S']}, "
                        f"error {report.fmt_num(r.get('max_abs_error_vs_qr'))}"
                    )
                elif "lambda_max" in r:
                    extra = f"λ_max {report.fmt_num(r['lambda_max'])}, Σλ {report.fmt_num(r['lambda_sum'])}"
            cs = r.get("compile_s")
            body.append(
                [
                    r["cell"],
                    r["H"],
                    r["S"],
                    r["T"],
                    r["impl"],
                    t,
                    report.fmt_num(r.get("ratio_median")),
                    "–" if cs is None else f"{cs:.2f}",
                    extra,
                ]
            )
        out += [
            f"## {title}",
            "",
            report.markdown_table(
                [
                    "cell",
                    "H",
                    "S",
                    "T",
                    "implementation",
                    "time median (min–max)",
                    "ratio",
                    "compile s",
                    "result",
                ],
                body,
            ),
            "",
        ]
    checks = result["checks"]
    bad = [c for c in checks if not c["ok"]]
    out.append(f"Checks: {len(checks) - len(bad)}/{len(checks)} passed.")
    for c in checks:
        val = c.get("rel_err", c.get("abs_diff"))
        out.append(f"- {'ok' if c['ok'] else 'FAILED'} {c['where']}: {c['what']}: {report.fmt_num(val)}")
    return "\n".join(out)


def plot(result: dict, out_dir: str) -> list[str]:
    """Time per implementation (log scale) for every case, one figure per table."""
    plt = report.pyplot()
    if plt is None:
        return []
    paths = []
    for table in ("step_jacobians", "lyapunov"):
        rows = [r for r in result["rows"] if r["table"] == table]
        if not rows:
            continue
        cases = list(dict.fromkeys((r["cell"], r["H"], r["T"]) for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases)), 4))
        w = 0.8 / len(impls)
        for j, name in enumerate(impls):
            xs, hs = [], []
            for i, c in enumerate(cases):
                r = next((r for r in rows if (r["cell"], r["H"], r["T"]) == c and r["impl"] == name), None)
                if r is not None:
                    xs.append(i + j * w)
                    hs.append(r["median_s"])
            ax.bar(xs, hs, width=w, label=name)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{k}\nH={h}\nT={t}" for k, h, t in cases], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = f"{out_dir}/spectrum_{table}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
