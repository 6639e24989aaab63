"""The cost of the opt-in in-graph check of ``lengths`` (issue 16), jitted, on an LSTM.

Under ``jax.jit`` the values of traced ``lengths`` cannot be checked on the host, so
``seqjax.unroll`` states ``0 <= lengths <= T`` with ``checkify.debug_check``: nothing by
default (the compiled program is the one without the check), and a real check when the user
opts in with ``seqjax.unroll.checked(fn)`` (``jax.jit(checkify.checkify(fn))`` plus
``err.throw()`` on the host). This suite measures what opting in costs.

Set-up (full mode): ``B=32, T=100, I=32, H=64`` (40 rounds) and ``B=64, T=200, I=64,
H=128`` (20 rounds); ``seqjax.lstm(H)``, inputs ``(B, T, I)`` ``N(0, 1)``, lengths drawn in ``[1, T]``
(valid: the check passes), float32. Two passes:

- ``forward``: ``unroll(cell, params, xs, lengths=lengths)``, both outputs returned;
- ``value_and_grad``: ``jax.value_and_grad`` of the mean square of the (masked) outputs
  with respect to the params, what a training step differentiates (default gradient:
  the fused BPTT kernel).

Three ways of running each, timed in the same process:

- ``unchecked``: ``jax.jit(fn)``, the default (lengths are not checked);
- ``checked``: ``seqjax.unroll.checked(fn)``: the check runs in the graph and its error
  value is read on the host after every call (``err.throw()``, a small device-to-host read);
- ``checkify, error not read``: ``jax.jit(checkify.checkify(fn))`` whose error is left on
  the device, the cost of the check alone.

Interleaving: after one first call of each (compile included, reported apart), a number of
rounds; each round calls every way once, round-robin, starting with a different way each
round, so drift in the machine's load hits all alike. Reported per way: the first call, the
median (min–max) of the rounds; per checked way the ratio of its median to the unchecked
median and the median of the per-round ratios (paired, steadier on a shared machine). The
compiled programs' HLO instruction counts are given too.

Checks: each checked way returns exactly what the unchecked one returns, and ``checked``
raises for lengths ``T + 1``.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

import seqjax as sj
from benchmarks import common, report

__all__ = ["WAYS", "PASSES", "settings", "run", "to_markdown"]

U = sys.modules["seqjax.unroll"]  # the module (``seqjax.unroll`` is also the function)

UNCHECKED = "unchecked (jax.jit)"
CHECKED = "checked (seqjax checked)"
NO_READ = "checkify, error not read"
#: The ways of running, in table order.
WAYS = (UNCHECKED, CHECKED, NO_READ)
PASSES = ("forward", "value_and_grad")


def settings(mode: str) -> dict[str, Any]:
    """Configurations ``(B, T, I, H, rounds)`` of a mode."""
    if mode == "full":
        return {"configs": [(32, 100, 32, 64, 40), (64, 200, 64, 128, 20)]}
    if mode == "quick":
        return {"configs": [(32, 100, 32, 64, 15)]}
    if mode == "tiny":
        return {"configs": [(2, 6, 3, 4, 3)]}
    raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}.")


def _functions(cell) -> dict[str, Callable]:
    def forward(params, xs, lengths):
        return sj.unroll(cell, params, xs, lengths=lengths)

    def loss(params, xs, lengths):
        _, ys = sj.unroll(cell, params, xs, lengths=lengths)
        return jnp.mean(ys**2)

    return {"forward": forward, "value_and_grad": jax.value_and_grad(loss)}


def _ways(fn: Callable) -> dict[str, Callable]:
    """Zero-overhead callables ``(*args) -> out`` for each way."""
    unchecked = jax.jit(fn)
    checked = U.checked(fn)
    no_read = jax.jit(checkify.checkify(fn, errors=checkify.user_checks))
    return {UNCHECKED: unchecked, CHECKED: checked, NO_READ: no_read}


def _instructions(fn: Callable, *args) -> int:
    """The number of HLO instructions of ``jax.jit(fn)`` compiled for ``args``."""
    text = jax.jit(fn).lower(*args).compile().as_text() or ""
    return len(re.findall(r"^\s*(?:ROOT )?\S+ = ", text, flags=re.M))


def _same(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def run(mode: str = "quick", *, log: Callable[[str], None] = print) -> dict:
    """Time the three ways for both passes and every configuration of ``mode``."""
    s = settings(mode)
    result = common.new_result("checks", mode)
    result["settings"] = {"configs": [list(c) for c in s["configs"]]}
    result["notes"].append(
        "unchecked: jax.jit(fn), the default; checked: seqjax.unroll.checked(fn) = "
        "jax.jit(checkify.checkify(fn)) + err.throw() on the host after every call; checkify, error "
        "not read: the checkified program without the host read. Median (min–max) of the interleaved "
        "rounds; ratio: the way's median / the unchecked median; paired: the median of the per-round "
        "ratios."
    )
    for B, T, I, H, reps in s["configs"]:
        cell = sj.lstm(H)
        key = jax.random.key(B * 1000 + T)
        params = cell.init(key, I)
        xs = jax.random.normal(jax.random.fold_in(key, 1), (B, T, I), jnp.float32)
        lengths = jax.random.randint(jax.random.fold_in(key, 2), (B,), 1, T + 1)
        args = jax.block_until_ready((params, xs, lengths))
        config = f"B={B} T={T} I={I} H={H}"
        log(f"checks: {config}, {reps} rounds")
        for pass_name, fn in _functions(cell).items():
            ways = _ways(fn)
            first: dict[str, float] = {}
            outs: dict[str, Any] = {}
            for way, f in ways.items():
                t0 = time.perf_counter()
                outs[way] = jax.block_until_ready(f(*args))
                first[way] = time.perf_counter() - t0
            times: dict[str, list[float]] = {w: [] for w in WAYS}
            for r in range(reps):
                for j in range(len(WAYS)):
                    way = WAYS[(r + j) % len(WAYS)]
                    t0 = time.perf_counter()
                    jax.block_until_ready(ways[way](*args))
                    times[way].append(time.perf_counter() - t0)
            ref = outs[UNCHECKED]
            result["checks"].append(
                {
                    "what": f"{config} {pass_name}: checked returns what unchecked returns (exactly)",
                    "ok": _same(outs[CHECKED], ref),
                }
            )
            err, out = outs[NO_READ]
            result["checks"].append(
                {
                    "what": f"{config} {pass_name}: checkify passes valid lengths and returns the same",
                    "ok": err.get() is None and _same(out, ref),
                }
            )
            bad = lengths.at[0].set(T + 1)
            try:
                ways[CHECKED](params, xs, bad)
                raised = ""
            except checkify.JaxRuntimeError as e:
                raised = str(e)
            result["checks"].append(
                {
                    "what": f"{config} {pass_name}: checked raises for lengths[0] = T + 1",
                    "ok": f"lengths[0] = {T + 1}" in raised and f"T={T}" in raised,
                }
            )
            n_plain = _instructions(fn, *args)
            n_checked = _instructions(checkify.checkify(fn, errors=checkify.user_checks), *args)
            base = common.stats(times[UNCHECKED])
            for way in WAYS:
                row: dict[str, Any] = {
                    "config": config,
                    "B": B,
                    "T": T,
                    "I": I,
                    "H": H,
                    "cell": "lstm",
                    "pass": pass_name,
                    "impl": way,
                    "first_call_s": first[way],
                    "hlo_instructions": n_plain if way == UNCHECKED else n_checked,
                }
                row.update(common.stats(times[way]))
                row["ratio_median"] = row["median_s"] / base["median_s"]
                row["ratio_paired_median"] = float(
                    np.median(np.asarray(times[way]) / np.asarray(times[UNCHECKED]))
                )
                result["rows"].append(row)
            med = {w: report.fmt_time(float(np.median(times[w]))) for w in WAYS}
            log(f"checks: {config} {pass_name}: " + ", ".join(f"{w} {m}" for w, m in med.items()))
    try:
        result["load_average_at_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        result["load_average_at_end"] = None
    return result


def to_markdown(result: dict) -> str:
    """One table: per configuration and pass, each way's time and its ratio to unchecked."""
    body = []
    for r in result["rows"]:
        body.append(
            [
                r["config"],
                r["pass"],
                r["impl"],
                report.fmt_time(r["first_call_s"]),
                report.fmt_range(r),
                report.fmt_num(r["ratio_median"]),
                report.fmt_num(r["ratio_paired_median"]),
                r["hlo_instructions"],
                r["reps"],
            ]
        )
    headers = [
        "config (lstm)",
        "pass",
        "way",
        "first call (compile)",
        "median (min–max)",
        "ratio to unchecked",
        "paired ratio",
        "HLO instructions",
        "rounds",
    ]
    checks = result.get("checks", [])
    ok = sum(c["ok"] for c in checks)
    lines = [
        "## The cost of the opt-in lengths check (jitted)",
        "",
        "`seqjax.lstm(H)`, lengths in [1, T], float32; interleaved rounds (round-robin, a different "
        "way first each round), their number in the column `rounds`.",
        "",
        report.markdown_table(headers, body),
        "",
        f"Load average (1, 5, 15 min) at start {result['machine'].get('load_average_at_start')}, "
        f"at end {result.get('load_average_at_end')}.",
        "",
        f"Checks: {ok}/{len(checks)} passed.",
    ]
    lines += [f"- {'ok' if c['ok'] else 'FAILED'} {c['what']}" for c in checks]
    return "\n".join(lines)
