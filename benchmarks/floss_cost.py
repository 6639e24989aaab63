"""The cost of gradient flossing (issue 17): a train step with ``Flossing`` against a plain one.

``python -m benchmarks.floss_cost [--quick | --tiny] [--out DIR]`` writes
``benchmarks/results/floss_cost.json`` and ``floss_cost.md``.

Set-up (full mode): the copy task of the task suite (``benchmarks.tasks.settings("full")``:
batch 64, copy length 10, delay 50, 8 symbols, so ``T = 70`` steps of one-hot inputs
``I = 10``), the task model ``benchmarks.tasks.task_model`` (the cell with a linear readout on
every step) with the hidden size of the task suite's parameter budget
(``hidden_for_budget``: the LSTM's count at ``H_ref = 64``), the tanh RNN and the GRU,
``clipped_adam(3e-3)``, the cross-entropy loss of the task suite, float32.

Ways, each one ``seqjax.train.make_train_step`` (jitted, ``donate=False``, the same state
every call):

- ``plain``: the task loss alone;
- ``floss k=K``: ``flossing=Flossing(model, k=K, every=1)``, the flossing loss of the top
  ``K`` exponents (``K`` = 1, 8, 32) computed and differentiated on every step.

Interleaving (as in ``benchmarks.checks``): after one first call of each (compile included,
reported apart), a number of rounds; each round calls every way once, round-robin, starting
with a different way each round. Reported per way: the median (min–max) of the rounds, the
ratio of its median to the plain median, and the median of the per-round ratios (paired).

Check: the ``flossing`` metric of each flossing step equals
``seqjax.spectrum.flossing.flossing_loss`` of the initial params on the batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, report
from benchmarks import tasks as task_suite

__all__ = ["settings", "run", "to_markdown", "main"]

PLAIN = "plain"


def settings(mode: str) -> dict[str, Any]:
    """Cells, ``k`` values, task shape and rounds of a mode."""
    if mode not in common.MODES:
        raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}.")
    s = task_suite.settings("full" if mode != "tiny" else "tiny")
    out = {
        "cells": ["rnn", "gru"],
        "ks": [1, 8, 32],
        "batch": s["batch"],
        "copy": dict(s["copy"]),
        "H_ref": s["H_ref"],
        "lr": 3e-3,
        "rounds": {"full": 10, "quick": 4, "tiny": 2}[mode],
    }
    if mode == "tiny":
        out["ks"] = [1, 2]
    return out


def _hidden(kind: str, s: dict) -> int:
    K = s["copy"]["num_symbols"]
    io = K + 2
    ref = task_suite._n_params(task_suite.task_model(task_suite.make_cell("lstm", s["H_ref"]), io), io)
    return task_suite.hidden_for_budget(kind, io, io, ref)[0]


def _steps(kind: str, H: int, s: dict, key) -> tuple[dict[str, Callable], Any, Any, Any]:
    """The ways' train steps, the initial state, a batch and the model."""
    from seqjax.tasks import copy_task
    from seqjax.train import clipped_adam, init_train_state, make_train_step
    from seqjax.train.options import Flossing

    K = s["copy"]["num_symbols"]
    model = task_suite.task_model(task_suite.make_cell(kind, H), K + 2)
    params = model.init(key, K + 2)

    def loss(p, batch):
        xs, ys = batch
        logp = jax.nn.log_softmax(model.apply(p, xs), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ys[..., None], axis=-1))

    opt = clipped_adam(s["lr"])
    steps = {PLAIN: make_train_step(loss, opt, donate=False)}
    for k in s["ks"]:
        fl = Flossing(model, k=k, every=1)
        steps[f"floss k={k}"] = make_train_step(loss, opt, donate=False, flossing=fl)
    xs, ys = copy_task(jax.random.fold_in(key, 1), s["batch"], **s["copy"])
    batch = jax.block_until_ready((jnp.asarray(xs), jnp.asarray(ys)))
    state = init_train_state(params, opt, key=jax.random.fold_in(key, 2))
    return steps, state, batch, model


def run(mode: str = "full", *, log: Callable[[str], None] = print) -> dict:
    """Time the plain and flossing steps of every cell of ``mode``."""
    from seqjax.spectrum.flossing import flossing_loss

    s = settings(mode)
    result = common.new_result("floss_cost", mode)
    result["command"] = "python -m benchmarks.floss_cost" + ("" if mode == "full" else f" --{mode}")
    result["settings"] = s
    result["notes"].append(
        "One make_train_step (jitted, donate=False) per way, called on the same state and copy-task "
        "batch; floss k=K: Flossing(model, k=K, every=1), the flossing loss (QR every step, k JVPs per "
        "step) computed and differentiated on every step. Median (min–max) of interleaved rounds; "
        "ratio: the way's median / the plain median; paired: the median of the per-round ratios."
    )
    for kind in s["cells"]:
        H = _hidden(kind, s)
        T = s["copy"]["delay"] + 2 * s["copy"]["length"]
        config = f"{kind} H={H} B={s['batch']} T={T}"
        steps, state, batch, model = _steps(kind, H, s, jax.random.key(0))
        ways = list(steps)
        log(f"floss_cost: {config}, ways {ways}, {s['rounds']} rounds")
        first: dict[str, float] = {}
        for way in ways:
            t0 = time.perf_counter()
            _, m = jax.block_until_ready(steps[way](state, batch))
            first[way] = time.perf_counter() - t0
            if way != PLAIN:
                k = int(way.split("=")[1])
                want = float(flossing_loss(model, state.params, batch[0], k=k))
                got = float(m["flossing"])
                result["checks"].append(
                    {
                        "what": f"{config} {way}: the flossing metric equals flossing_loss "
                        f"({got:.6g} vs {want:.6g})",
                        "ok": bool(np.isclose(got, want, rtol=1e-4)) and bool(m["finite"]),
                    }
                )
        times: dict[str, list[float]] = {w: [] for w in ways}
        for r in range(s["rounds"]):
            for j in range(len(ways)):
                way = ways[(r + j) % len(ways)]
                t0 = time.perf_counter()
                jax.block_until_ready(steps[way](state, batch))
                times[way].append(time.perf_counter() - t0)
        base = common.stats(times[PLAIN])
        for way in ways:
            row: dict[str, Any] = {
                "config": config,
                "cell": kind,
                "H": H,
                "way": way,
                "first_call_s": first[way],
            }
            row["k"] = None if way == PLAIN else int(way.split("=")[1])
            row.update(common.stats(times[way]))
            row["ratio_median"] = row["median_s"] / base["median_s"]
            row["ratio_paired_median"] = float(np.median(np.asarray(times[way]) / np.asarray(times[PLAIN])))
            result["rows"].append(row)
        log(
            f"floss_cost: {config}: "
            + ", ".join(f"{w} {report.fmt_time(float(np.median(times[w])))}" for w in ways)
        )
    try:
        result["load_average_at_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        result["load_average_at_end"] = None
    return result


def to_markdown(result: dict) -> str:
    """One table: per cell and way, the step time and its ratio to the plain step."""
    body = [
        [
            r["config"],
            r["way"],
            report.fmt_time(r["first_call_s"]),
            report.fmt_range(r),
            report.fmt_num(r["ratio_median"]),
            report.fmt_num(r["ratio_paired_median"]),
            r["reps"],
        ]
        for r in result["rows"]
    ]
    headers = [
        "config",
        "way",
        "first call (compile)",
        "median (min–max)",
        "ratio to plain",
        "paired ratio",
        "rounds",
    ]
    s = result["settings"]
    checks = result.get("checks", [])
    ok = sum(c["ok"] for c in checks)
    lines = [
        "## The cost of gradient flossing (one train step)",
        "",
        f"Copy task (batch {s['batch']}, length {s['copy']['length']}, delay {s['copy']['delay']}, "
        f"{s['copy']['num_symbols']} symbols), task model with the task suite's parameter budget, "
        "`clipped_adam`, float32; `floss k=K`: `Flossing(model, k=K, every=1)`. Interleaved rounds "
        "(round-robin, a different way first each round).",
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


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.floss_cost [--quick | --tiny] [--out DIR]``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.floss_cost", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer rounds")
    g.add_argument("--tiny", action="store_true", help="toy sizes for tests (meaningless numbers)")
    p.add_argument("--out", default=report.DEFAULT_OUT, help="output directory (default benchmarks/results)")
    args = p.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    t0 = time.perf_counter()
    result = run(mode)
    result["wall_s"] = time.perf_counter() - t0
    jpath, mpath = report.write(result, to_markdown(result), args.out)
    print(f"wrote {jpath} and {mpath} ({result['wall_s']:.0f} s)")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
