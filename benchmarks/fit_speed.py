"""``fit`` against a bare training loop (issue 18): steps per second on the adding problem.

``python -m benchmarks.fit_speed [--quick | --tiny] [--steps N] [--rounds R] [--ways W,...] [--out DIR]``
writes ``benchmarks/results/fit_speed.json`` and ``fit_speed.md``.

Set-up (full mode): the adding problem with ``T = 100`` steps and batches of ``B = 64``
drawn on the host every step by ``functools.partial(seqjax.tasks.adding_problem, n=64,
length=100)`` (a function ``key -> (xs (B, T, 2), ys (B,))``); the model
``many_to_one(lstm(64), dense(1))`` with the mean squared error; the optimizer
``optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))``; float32; one device.

Ways (each run trains from the same initial params for ``steps`` steps, compile included):

- ``bare``: a Python ``for`` loop calling one ``jax.jit``-compiled step
  ``(params, opt_state, batch) -> (params, opt_state, loss)`` (``value_and_grad``, then the
  optimizer's ``update``, then ``optax.apply_updates``), with batch ``i`` drawn as
  ``data(fold_in(data_key, i))``, the keys ``fit`` hands a batch function (the issue's
  reference). Reading an eager ``fold_in`` makes the host wait for the step in flight;
- ``bare_seeds``: the same loop drawing batch ``i`` as ``data(i)`` (``adding_problem``
  also takes an int seed): the host never waits for the device, so it draws the next batch
  while the step runs. The stricter reference: what a bare loop gets without keys;
- ``fit``: ``seqjax.train.fit(loss, optimizer, params, data, key=key, steps=steps,
  logging=Logging(progress=False))``: every default (a row every 50 steps, non-finite steps
  skipped, ``steps_per_call=1``, no evaluation, no checkpoints) but the progress bar, which
  is off as it is whenever stderr is not a terminal;
- ``fit_fused``: ``fit`` with ``steps_per_call=50`` (50 steps per compiled call).

Each way builds its step afresh in every run (a new ``jax.jit``), so every run compiles.
Two rates per run: **whole run**, ``steps`` over the wall time of the whole call (compile,
``fit``'s checks and the final sync included), and **steady**, the steps after step 50 over
the time from step 50 to the end (the bare loop waits for step 50's result once; ``fit``'s
first log row at step 50 does the same, and its rows' ``time`` stamps give the interval).
Beside them the **CPU time** of the process per step over the whole run
(``time.process_time``: the host thread and XLA's compute threads): the work done, which
other processes' load on a shared machine disturbs far less than the wall time (a CPU ratio
below 1 means less work than the reference).

Interleaving: a number of rounds; each round runs every way once, round-robin, starting with
a different way each round, so drift in the machine's load hits all alike. Reported per way:
the median (min–max) of the rounds' rates, and the ratio of its rate to each bare loop's in
the same round (paired), median and range.

Check (not timed): after 50 steps from the same params, ``fit``'s first row's mean loss and
its params equal the bare loop's (both read the same batches and take the same steps).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

import seqjax as sj
from benchmarks import common, report

__all__ = ["WAYS", "settings", "run", "to_markdown", "main"]

BARE = "bare"
BARE_SEEDS = "bare_seeds"
FIT = "fit"
FIT_FUSED = "fit_fused"
WAYS = (BARE, BARE_SEEDS, FIT, FIT_FUSED)
REFERENCES = (BARE, BARE_SEEDS)
LABELS = {BARE: "bare", BARE_SEEDS: "bare (int seeds)", FIT: "fit", FIT_FUSED: "fit (steps_per_call=50)"}
WARM = 50  # the steady rate counts the steps after this one (fit's first log row)


def settings(mode: str) -> dict[str, Any]:
    """Task shape, steps per run, rounds and ways of a mode."""
    if mode not in common.MODES:
        raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}.")
    if mode == "tiny":
        return {"H": 8, "T": 10, "B": 8, "lr": 3e-3, "steps": 100, "rounds": 1, "ways": list(WAYS)}
    return {
        "H": 64,
        "T": 100,
        "B": 64,
        "lr": 3e-3,
        "steps": {"full": 3000, "quick": 500}[mode],
        "rounds": 3,
        "ways": list(WAYS),
    }


def _problem(s: dict):
    """The model's loss, its initial params, the optimizer and the host data function."""
    from seqjax.tasks import adding_problem

    model = sj.many_to_one(sj.lstm(s["H"]), sj.dense(1))
    params = model.init(jax.random.key(0), input_size=2)

    def loss_fn(p, batch):
        xs, ys = batch
        return sj.mse(model.apply(p, xs), ys[:, None])

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(s["lr"]))
    data = functools.partial(adding_problem, n=s["B"], length=s["T"])
    return loss_fn, params, optimizer, data


def _copy(tree):
    return jax.tree_util.tree_map(lambda a: np.array(a, copy=True), tree)


def run_bare(loss_fn, params, optimizer, data, key, steps: int, seeds: bool = False) -> dict[str, Any]:
    """The bare loop: ``{"total_s", "warm_s" (time at step WARM), "params", "losses"}``.

    Batch ``i`` is ``data(fold_in(data_key, i))``, or ``data(i)`` with ``seeds``.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    data_key, _ = jax.random.split(key)  # the data key fit derives from the same key

    @jax.jit
    def step(p, s, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    p = jax.device_put(params)
    s = optimizer.init(p)
    losses = []
    t_warm = None
    for i in range(steps):
        p, s, loss = step(p, s, data(i) if seeds else data(jax.random.fold_in(data_key, i)))
        losses.append(loss)
        if i + 1 == WARM:
            jax.block_until_ready(p)
            t_warm = time.perf_counter()
    jax.block_until_ready((p, s))
    t1, c1 = time.perf_counter(), time.process_time()
    warm = None if t_warm is None else t_warm - t0
    return {"total_s": t1 - t0, "cpu_s": c1 - c0, "warm_s": warm, "params": p, "losses": losses}


def run_fit(loss_fn, params, optimizer, data, key, steps: int, steps_per_call: int = 1) -> dict[str, Any]:
    """``fit`` with default options: ``{"total_s", "warm_s", "params", "history"}``."""
    from seqjax.train import Logging, fit

    t0, c0 = time.perf_counter(), time.process_time()
    result = fit(
        loss_fn,
        optimizer,
        params,
        data,
        key=key,
        steps=steps,
        steps_per_call=steps_per_call,
        logging=Logging(progress=False),
    )
    jax.block_until_ready(result.state)
    t1, c1 = time.perf_counter(), time.process_time()
    rows = result.history
    # row["time"] counts from fit's own start (t0 plus a few microseconds of argument checks)
    warm = next((r["time"] for r in rows if r["step"] == WARM), None)
    return {
        "total_s": t1 - t0,
        "cpu_s": c1 - c0,
        "warm_s": warm,
        "params": result.state.params,
        "history": rows,
    }


def _rates(out: dict, steps: int) -> tuple[float, float | None, float]:
    """``(whole-run steps/s, steady steps/s, CPU milliseconds per step of the whole run)``."""
    whole = steps / out["total_s"]
    steady = None if out["warm_s"] is None else (steps - WARM) / (out["total_s"] - out["warm_s"])
    return whole, steady, 1e3 * out["cpu_s"] / steps


def _check(loss_fn, params, optimizer, data, key) -> list[dict[str, Any]]:
    """fit's first 50 steps against the bare loop's (same batches, same updates)."""
    bare = run_bare(loss_fn, params, optimizer, data, key, WARM)
    fitted = run_fit(loss_fn, params, optimizer, data, key, WARM)
    bare_mean = float(np.mean(np.asarray(jax.device_get(bare["losses"]), np.float64)))
    fit_mean = fitted["history"][0]["loss"]
    loss_err = abs(fit_mean - bare_mean) / abs(bare_mean)
    param_err = common.tree_rel_err(fitted["params"], bare["params"])
    # float32: the two programs are compiled apart, so XLA may fuse and order the sums
    # differently; 50 Adam steps of size <= 3e-3 keep such rounding near 1e-6 relative
    tol = 1e-4
    return [
        {
            "what": f"fit's mean loss over steps 1..{WARM} equals the bare loop's "
            f"(rel. err {loss_err:.2e} <= {tol})",
            "ok": bool(loss_err <= tol),
        },
        {
            "what": f"fit's params after {WARM} steps equal the bare loop's "
            f"(max rel. err {param_err:.2e} <= {tol})",
            "ok": bool(param_err <= tol),
        },
    ]


def run(
    mode: str,
    *,
    steps: int | None = None,
    rounds: int | None = None,
    ways: list[str] | None = None,
    log=print,
) -> dict[str, Any]:
    """Run the suite; returns the result dict (``rows``: one per way and round, plus summaries)."""
    s = settings(mode)
    if ways is not None:
        unknown = [w for w in ways if w not in WAYS]
        if unknown or not ways:
            raise ValueError(f"ways must be among {WAYS}, got {ways}.")
        s["ways"] = list(ways)
    if steps is not None:
        s["steps"] = int(steps)
    if rounds is not None:
        s["rounds"] = int(rounds)
    if s["steps"] % 50 or s["steps"] <= WARM:
        raise ValueError(f"steps must be a multiple of 50 above {WARM}, got {s['steps']}.")
    result = common.new_result("fit_speed", mode)
    result["settings"] = s
    flag = {"full": "", "quick": " --quick", "tiny": " --tiny"}[mode]
    result["command"] = "python -m benchmarks.fit_speed" + flag
    loss_fn, params, optimizer, data = _problem(s)
    key = jax.random.key(1)
    result["checks"] = _check(loss_fn, params, optimizer, data, key)

    ways = s["ways"]
    runners = {
        BARE: lambda n: run_bare(loss_fn, params, optimizer, data, key, n),
        BARE_SEEDS: lambda n: run_bare(loss_fn, params, optimizer, data, key, n, seeds=True),
        FIT: lambda n: run_fit(loss_fn, params, optimizer, data, key, n),
        FIT_FUSED: lambda n: run_fit(loss_fn, params, optimizer, data, key, n, steps_per_call=50),
    }
    per_round: list[dict[str, tuple]] = []
    for r in range(s["rounds"]):
        order = ways[r % len(ways) :] + ways[: r % len(ways)]
        got = {}
        for way in order:
            out = runners[way](s["steps"])
            got[way] = _rates(out, s["steps"])
            result["rows"].append(
                {
                    "round": r,
                    "way": way,
                    "whole_steps_per_s": got[way][0],
                    "steady_steps_per_s": got[way][1],
                    "cpu_ms_per_step": got[way][2],
                }
            )
            del out
        per_round.append(got)
        log(
            f"fit_speed round {r}: "
            + ", ".join(f"{w} {got[w][0]:.1f}/s ({got[w][1]:.1f}/s steady)" for w in ways)
        )

    summary = []
    for way in ways:
        whole = [g[way][0] for g in per_round]
        steady = [g[way][1] for g in per_round]
        row: dict[str, Any] = {
            "way": way,
            "whole_median": float(np.median(whole)),
            "whole_min": float(np.min(whole)),
            "whole_max": float(np.max(whole)),
            "steady_median": float(np.median(steady)),
            "steady_min": float(np.min(steady)),
            "steady_max": float(np.max(steady)),
            "cpu_ms_median": float(np.median([g[way][2] for g in per_round])),
        }
        for ref in REFERENCES:
            if ref == way or ref not in ways:
                continue
            for kind, i in (("whole", 0), ("steady", 1), ("cpu", 2)):
                r = [g[way][i] / g[ref][i] for g in per_round]
                row[f"{kind}_ratio_to_{ref}"] = {
                    "median": float(np.median(r)),
                    "min": float(np.min(r)),
                    "max": float(np.max(r)),
                }
        summary.append(row)
    result["summary"] = summary
    try:
        result["load_average_at_end"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        result["load_average_at_end"] = None
    return result


def _ratio(row: dict, kind: str, ref: str) -> str:
    if row["way"] == ref:
        return "1"
    r = row.get(f"{kind}_ratio_to_{ref}")
    return "–" if r is None else f"{r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f})"


def to_markdown(result: dict) -> str:
    """One table: per way, whole-run and steady rates and their paired ratios to the bare loop."""
    s = result["settings"]
    refs = [r for r in REFERENCES if r in s["ways"]]
    body = []
    for r in result["summary"]:
        line = [LABELS[r["way"]], f"{r['whole_median']:.1f} ({r['whole_min']:.1f}–{r['whole_max']:.1f})"]
        line += [_ratio(r, "whole", ref) for ref in refs]
        line.append(f"{r['steady_median']:.1f} ({r['steady_min']:.1f}–{r['steady_max']:.1f})")
        line += [_ratio(r, "steady", ref) for ref in refs]
        line.append(f"{r['cpu_ms_median']:.2f}")
        line += [_ratio(r, "cpu", ref) for ref in refs]
        body.append(line)
    headers = ["way", f"whole run, steps/s ({s['steps']} steps, compile included)"]
    headers += [f"ratio to {LABELS[ref]}" for ref in refs]
    headers.append(f"steady, steps/s (after step {WARM})")
    headers += [f"ratio to {LABELS[ref]}" for ref in refs]
    headers.append("CPU ms per step (whole run)")
    headers += [f"CPU ratio to {LABELS[ref]}" for ref in refs]
    checks = result.get("checks", [])
    ok = sum(c["ok"] for c in checks)
    lines = [
        "## `fit` against a bare training loop",
        "",
        f"Adding problem (T={s['T']}, batch {s['B']}, a fresh host batch every step from "
        f"`adding_problem`), `many_to_one(lstm({s['H']}), dense(1))`, MSE, "
        f"`chain(clip_by_global_norm(1), adam({s['lr']}))`, float32. {s['rounds']} interleaved rounds "
        "(round-robin, a different way first each round); median (min–max) over the rounds; "
        "ratios paired within a round. `bare` draws batch `i` with `fold_in(data_key, i)` as `fit` "
        "does; `bare (int seeds)` with the seed `i` (no device work to wait for).",
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
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.fit_speed", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="500 steps per run")
    g.add_argument("--tiny", action="store_true", help="toy sizes for tests (meaningless numbers)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (a multiple of 50)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    p.add_argument("--ways", default=None, help=f"comma-separated subset of {', '.join(WAYS)} (default: all)")
    p.add_argument("--out", default=report.DEFAULT_OUT, help="output directory (default benchmarks/results)")
    args = p.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    t0 = time.perf_counter()
    ways = None if args.ways is None else [w.strip() for w in args.ways.split(",")]
    result = run(mode, steps=args.steps, rounds=args.rounds, ways=ways)
    result["wall_s"] = time.perf_counter() - t0
    shown = ["python -m benchmarks.fit_speed"] + ([f"--{mode}"] if mode != "full" else [])
    for name in ("steps", "rounds", "ways"):
        if getattr(args, name) is not None:
            shown.append(f"--{name} {getattr(args, name)}")
    result["command"] = " ".join(shown)
    jpath, mpath = report.write(result, to_markdown(result), args.out)
    print(f"wrote {jpath} and {mpath} ({result['wall_s']:.0f} s)")
    return 0 if all(c["ok"] for c in result["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
