"""Gradient flossing on the copy task (issue 17): does it rescue the rows where every cell fails?

Gradient flossing (Engelken, NeurIPS 2023) regularises the top-``k`` Lyapunov exponents of the
forward dynamics toward 0, ``sum_{i<k} lambda_i^2``, before training ("pre-flossing") and/or
during training. This suite trains the tanh RNN and the GRU of the task table
(``benchmarks.tasks``) on its copy task (full mode: ``L = 10`` symbols of ``K = 8``, delay 50,
``T = 70`` steps) in three arms, with three seeds:

- ``plain``: the task table's run itself (``benchmarks.tasks._train`` with the same keys,
  model, data, optimiser and evaluation as ``benchmarks.tasks._copy_run``), so its recall
  reproduces the table's;
- ``pre``: ``floss_steps`` optimiser steps on the flossing loss alone
  (``seqjax`` ``floss``), then ``steps - floss_steps`` task steps from the flossed params
  with a fresh optimiser state (the reference code keeps a separate optimiser for flossing);
- ``during``: ``steps`` task steps with ``Flossing(model, k, weight, every)`` passed to
  ``fit``: ``weight * flossing_loss`` is added to the task loss on the steps where
  ``step % every == 0``.

Same budget: every arm takes the same number of gradient steps in total (pre-flossing steps
count), with the same optimiser (``clipped_adam(lr)``: Adam behind global-norm clipping at
1), learning rate, task batch and evaluation; the init params and the task batches are
those of the plain arm (same keys), so the arms are paired.

The flossing settings are fixed before any run on this table, from the author's reference
implementation (github.com/RainerEngelken/GradientFlossing, ``GradientFlossing_ExampleCode.jl``
and its README): 500 pre-flossing steps, the loss ``mean_i lambda_i^2`` with weight 1 (here
``weight = 1/k`` on ``flossing_loss``, which sums over the ``k`` exponents), one sequence per
flossing estimate (the reference flosses with batch size 1). "Flossing during training" in the
reference runs bursts of flossing steps between task steps (two bursts of 500 steps in 3,000
task epochs, a third of the task steps); the additive ``Flossing`` term of ``fit`` stands in
for them with ``every = 3`` (a flossing term on a third of the steps). The reference flosses
``k = 75`` of ``N = 80`` exponents; that fraction (123 of the tanh RNN's 131) costs 10 s per
flossing step here, so ``k = 16`` (``FLOSS_K``, 0.03 s), fixed for cost before any flossing
run. See ``settings``.

Per run: recall accuracy on the recalled steps of the 1,000 test sequences (as
``_copy_run``), test cross-entropy, and on ``spec_seqs`` test sequences the top-``k``
Lyapunov exponents (``seqjax.spectrum.lyapunov_spectrum``, per step, natural log) and the
top-``k`` singular values of the long-term Jacobian ``ds_T/ds_0 = J_T ... J_1``
(``seqjax.spectrum.product_singular_values``: subspace iteration in QR-factored form, ``log
sigma_i = sum_t log |R_t[i, i]|``, never the product itself), at init, after pre-flossing (pre
arm) and after training; ``log10 cond_k = log10 sigma_1 / sigma_k`` is taken in the log
domain. Wall times of the flossing and task phases.

Run it::

    python -m benchmarks.flossing --jobs 2 --plot          # full: 18 runs, about an hour on 2 cores
    python -m benchmarks.flossing --quick --plot           # 1 seed, copy delay 10, 400 steps
    python -m benchmarks.flossing --arms plain --jobs 2    # only the plain arm (no flossing API needed)
    python -m benchmarks.flossing --resume                 # keep the finished rows of the last run

The files (``flossing.json``, ``flossing.md``) are rewritten after every finished run, marked
``"partial"``, so a stopped run keeps what it did.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, report
from benchmarks import tasks as btasks

__all__ = [
    "ARMS",
    "CELLS",
    "settings",
    "flossing_api",
    "top_k",
    "spectrum_summary",
    "budget_check",
    "run",
    "to_markdown",
    "plot",
    "main",
]

#: The arms, in table order.
ARMS = ("plain", "pre", "during")
ARM_LABELS = {
    "plain": "plain",
    "pre": "pre-flossing",
    "during": "flossing during training",
}
#: The cells of the experiment (the issue's: the tanh RNN and the GRU).
CELLS = ("rnn", "gru")

#: From the reference implementation: ``nLE = 75`` exponents flossed in an ``N = 80`` network.
REF_K_FRACTION = 75 / 80
#: The ``k`` used here: the reference's fraction (``k = 123`` of the tanh RNN's 131, 69 of the
#: GRU's 74) costs 10 s (RNN) and 1.7 s (GRU) per flossing step on the 2-core machine, ``k = 32``
#: 0.8 s, ``k = 16`` 0.03 s (value and gradient of ``flossing_loss`` on one sequence of 70 steps,
#: measured before any flossing run): 16 is the largest power of two that fits the session.
FLOSS_K = 16
#: From the reference implementation: ``Ep = 500`` pre-flossing steps (3,000 task epochs).
REF_PRE_STEPS = 500
#: The reference's flossing during training: ``Ni * Ei = 2 * 500`` flossing steps in ``E =
#: 3,000`` task epochs, a third: here a flossing term on every third step.
REF_EVERY = 3


def settings(mode: str) -> dict[str, Any]:
    """The task table's settings of ``mode`` (``benchmarks.tasks.settings``) and the flossing ones.

    ``steps``: the total gradient-step budget of every arm (the table's ``copy_steps``);
    ``floss_steps``: pre-flossing steps (counted in the budget); ``k``: exponents flossed and
    measured (``FLOSS_K``; at most the state size); ``weight``: ``"1/k"`` (the reference's
    mean over the ``k`` exponents); ``every``: steps between flossing terms in the ``during``
    arm; ``floss_seqs``: sequences per flossing estimate; ``floss_warmup``: steps dropped
    before the exponents are taken; ``spec_seqs``: test sequences of the measured spectra.
    """
    base = btasks.settings(mode)
    s = {
        "copy": dict(base["copy"]),
        "steps": base["copy_steps"],
        "batch": base["batch"],
        "lr": base["lr"],
        "H_ref": base["H_ref"],
        "n_test": base["n_test"],
        "eval_every": base["eval_every"],
        "seeds": list(base["seeds"]),
        "cells": list(CELLS),
        "arms": list(ARMS),
        "k": FLOSS_K,
        "weight": "1/k",
        "every": REF_EVERY,
        "floss_seqs": 1,
        "floss_warmup": 0,
    }
    if mode == "full":
        s.update(floss_steps=REF_PRE_STEPS, spec_seqs=8)
    elif mode == "quick":
        s.update(floss_steps=50, spec_seqs=4)
    else:  # tiny: the tasks' tiny sizes, one cell, for the test suite
        s.update(floss_steps=2, spec_seqs=2, every=2, k=4, cells=["rnn"])
    return s


def _table_settings(s: dict) -> dict:
    """The dict ``benchmarks.tasks._train`` reads (``eval_every``, ``lr``)."""
    return {"eval_every": s["eval_every"], "lr": s["lr"], "batch": s["batch"], "copy_steps": s["steps"]}


# --------------------------------------------------------------------------- the flossing API

_API_MODULES = (
    "seqjax.train",
    "seqjax.spectrum",
    "seqjax.spectrum.flossing",
    "seqjax.train.options",
    "seqjax.train.loop",
)


def flossing_api() -> dict[str, Any] | None:
    """``{"flossing_loss", "Flossing", "floss"}`` from seqjax, or ``None`` if it is missing."""
    found: dict[str, Any] = {}
    for name in _API_MODULES:
        mod = common.optional_import(name)
        if mod is None:
            continue
        for attr in ("flossing_loss", "Flossing", "floss"):
            if attr not in found and hasattr(mod, attr):
                found[attr] = getattr(mod, attr)
    return found if len(found) == 3 else None


def top_k(state_size: int, s: dict) -> int:
    """``k = min(S, s["k"])``: the flossed (and measured) exponents of a state of size ``S``."""
    return int(min(state_size, s["k"]))


def _weight(s: dict, k: int) -> float:
    w = s["weight"]
    return 1.0 / k if w == "1/k" else float(w)


# --------------------------------------------------------------------------- measurements

LN10 = math.log(10.0)


def spectrum_summary(cell, p_cell, xs, k: int) -> dict[str, Any]:
    """Top-``k`` Lyapunov exponents and the top-``k`` singular values of ``ds_T/ds_0`` of a
    cell on inputs ``xs (n, T, I)``, means over the ``n`` sequences.

    ``exponents``: ``(k,)`` per step, natural log (``lyapunov_spectrum``). ``log10_sigma``:
    ``(k,)`` log10 singular values of ``J_T ... J_1`` (``product_singular_values``: QR-factored
    subspace iteration; never the product). ``log10_cond``: ``log10 sigma_1 - log10 sigma_k``
    per sequence, then their mean (``inf`` when ``sigma_k`` is an exact zero)."""
    from seqjax import spectrum as spec

    ly = spec.lyapunov_spectrum(cell, p_cell, xs, k=k)
    ex = np.asarray(ly.exponents, np.float64)  # (n, k)
    J = spec.step_jacobians(cell, p_cell, xs).jacobians  # (n, T, S, S)
    logs = np.asarray(spec.product_singular_values(J, k=k), np.float64)  # (n, k), natural log
    del J
    with np.errstate(invalid="ignore"):
        cond = (logs[:, 0] - logs[:, -1]) / LN10
        return {
            "k": k,
            "exponents": [float(v) for v in np.mean(ex, axis=0)],
            "exponents_sd": [float(v) for v in np.std(ex, axis=0)],
            "sum_sq": float(np.mean(np.sum(ex**2, axis=-1))),
            "log10_sigma": [float(v) for v in np.mean(logs, axis=0) / LN10],
            "log10_cond": float(np.mean(cond)),
            "log10_cond_per_seq": [float(c) for c in cond],
            "T": int(xs.shape[-2]),
        }


def _fit(loss, model, params, data_fn, eval_data, steps, s, key, flossing=None):
    """``benchmarks.tasks._train``'s ``fit`` call, with ``flossing`` passed through."""
    from seqjax.train import Evaluation, Logging, clipped_adam, fit

    spc = math.gcd(steps, s["eval_every"])
    extra = {} if flossing is None else {"flossing": flossing}
    t0 = time.perf_counter()
    res = fit(
        loss,
        clipped_adam(s["lr"]),
        params,
        data_fn,
        key=key,
        steps=steps,
        evaluation=Evaluation(eval_data, every=s["eval_every"], batch_size=len(eval_data[0])),
        logging=Logging(every=s["eval_every"], progress=False),
        steps_per_call=spc,
        mesh=None,
        **extra,
    )
    return res, time.perf_counter() - t0


def _curve(history, offset=0, key="eval_loss"):
    return [(r["step"] + offset, r.get(key)) for r in history]


def _run(kind: str, arm: str, seed: int, s: dict, H: int, log=print) -> dict[str, Any]:
    """One run: the cell ``kind`` (hidden size ``H``), arm ``arm``, seed ``seed``."""
    from seqjax.tasks import copy_task, copy_task_baseline
    from seqjax.train import clipped_adam

    c = s["copy"]
    L, K = c["length"], c["num_symbols"]
    cell = btasks.make_cell(kind, H)
    model = btasks.task_model(cell, K + 2)
    # the keys of benchmarks.tasks._copy_run: same init, same task batches, same test set
    key = jax.random.key(2000 * seed + 7)
    k_init, k_fit = jax.random.split(key)
    k_floss = jax.random.fold_in(key, 17)
    test = copy_task(jax.random.key(20_000), s["n_test"], **c)
    ts = _table_settings(s)

    def loss(p, batch):
        xs, ys = batch
        logp = jax.nn.log_softmax(model.apply(p, xs), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ys[..., None], axis=-1))

    def acc(p, batch):
        xs, ys = batch
        pred = jnp.argmax(model.apply(p, xs)[:, -L:], axis=-1)
        return jnp.mean((pred == ys[:, -L:]).astype(jnp.float32))

    def data(k):
        return copy_task(k, s["batch"], **c)

    def floss_data(k):
        return copy_task(k, s["floss_seqs"], **c)

    params0 = model.init(k_init, K + 2)
    S = H  # tanh RNN and GRU: the state is h
    k = top_k(S, s)
    w = _weight(s, k)
    xs_spec = jnp.asarray(test[0][: s["spec_seqs"]])
    t0 = time.perf_counter()
    init = spectrum_summary(cell, params0["body"], xs_spec, k)
    analysis_s = time.perf_counter() - t0
    row: dict[str, Any] = {
        "cell": kind,
        "arm": arm,
        "seed": seed,
        "H": H,
        "k": k,
        "T": c["delay"] + 2 * L,
        "weight": w if arm == "during" else None,
        "every": s["every"] if arm == "during" else None,
        "spectrum_init": init,
    }
    floss_s = 0.0
    floss_steps = 0
    floss_terms = 0
    if arm == "plain":
        res, train_s = btasks._train(loss, model, params0, data, test, s["steps"], ts, k_fit)
        task_steps = s["steps"]
        row["curve"] = _curve(res.history)
    elif arm == "pre":
        api = flossing_api()
        floss_steps = s["floss_steps"]
        t0 = time.perf_counter()
        fres = api["floss"](
            model,
            params0,
            floss_data,
            k=k,
            steps=floss_steps,
            optimizer=clipped_adam(s["lr"]),
            key=k_floss,
            warmup=s["floss_warmup"],
            logging=_floss_logging(floss_steps),
        )
        floss_s = time.perf_counter() - t0
        params_f = fres.state.params
        row["floss_steps_recorded"] = int(fres.state.step)
        row["floss_curve"] = _curve(fres.history, key="loss")
        t0 = time.perf_counter()
        row["spectrum_preflossed"] = spectrum_summary(cell, params_f["body"], xs_spec, k)
        analysis_s += time.perf_counter() - t0
        task_steps = s["steps"] - floss_steps
        res, train_s = _fit(loss, model, params_f, data, test, task_steps, ts, k_fit)
        row["curve"] = _curve(res.history, offset=floss_steps)
    elif arm == "during":
        api = flossing_api()
        fl = api["Flossing"](
            model,
            k,
            weight=w,
            every=s["every"],
            inputs=lambda b, n=s["floss_seqs"]: b[0][:n],
            warmup=s["floss_warmup"],
        )
        task_steps = s["steps"]
        floss_terms = sum(1 for t in range(task_steps) if t % s["every"] == 0)
        res, train_s = _fit(loss, model, params0, data, test, task_steps, ts, k_fit, flossing=fl)
        row["curve"] = _curve(res.history)
        row["flossing_curve"] = _curve(res.history, key="flossing")
    else:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}.")
    params = res.state.params
    a = float(jax.jit(acc)(params, test))
    ce = float(jax.jit(loss)(params, test))
    t0 = time.perf_counter()
    after = spectrum_summary(cell, params["body"], xs_spec, k)
    analysis_s += time.perf_counter() - t0
    row.update(
        {
            "accuracy": a,
            "test_ce": ce,
            "baseline_accuracy": 1.0 / K,
            "baseline_ce": copy_task_baseline(L, c["delay"], K),
            "spectrum_after": after,
            "floss_steps": floss_steps,
            "task_steps": task_steps,
            "flossing_terms": floss_terms,
            "gradient_steps": floss_steps + task_steps,
            "optimizer_steps_recorded": int(res.state.step) + row.get("floss_steps_recorded", 0),
            "floss_wall_s": floss_s,
            "train_wall_s": train_s,
            "wall_s": floss_s + train_s,
            "analysis_wall_s": analysis_s,
        }
    )
    log(
        f"  {kind} {arm} seed={seed}: recall {a:.3f} (chance {1 / K:.3f}), lambda_1 "
        f"{init['exponents'][0]:+.3f} -> {after['exponents'][0]:+.3f}, log10 cond_k "
        f"{init['log10_cond']:.1f} -> {after['log10_cond']:.1f}, {floss_s + train_s:.0f} s"
    )
    return row


def _floss_logging(steps):
    from seqjax.train import Logging

    every = max(1, min(50, steps))
    while steps % every:
        every -= 1
    return Logging(every=every, progress=False)


# --------------------------------------------------------------------------- checks


def budget_check(rows: list[dict]) -> list[dict]:
    """Per (cell, seed): every arm took the same number of gradient steps, counted from the
    recorded steps (the task optimiser's ``state.step`` plus the pre-flossing steps)."""
    out = []
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["cell"], r["seed"]), []).append(r)
    for (cell, seed), rs in groups.items():
        steps = {r["arm"]: r["optimizer_steps_recorded"] for r in rs}
        ok = len(set(steps.values())) == 1 and all(
            r["optimizer_steps_recorded"] == r["gradient_steps"] for r in rs
        )
        out.append(
            {
                "check": "same gradient-step budget",
                "cell": cell,
                "seed": seed,
                "steps": steps,
                "ok": bool(ok),
            }
        )
    return out


def _table_check(rows: list[dict], s: dict, mode: str) -> list[dict]:
    """The plain arm against the task table (``tasks.json``) where it has the same run."""
    path = os.path.join(report.DEFAULT_OUT, "tasks.json")
    try:
        with open(path) as f:
            ref = json.load(f)
    except (OSError, ValueError):
        return []
    if ref.get("mode") != mode or ref.get("settings", {}).get("copy") != s["copy"]:
        return []
    table = {(r["cell"], r["seed"]): r for r in ref.get("rows", []) if r.get("task") == "copy"}
    out = []
    for r in rows:
        t = table.get((r["cell"], r["seed"]))
        if r["arm"] != "plain" or t is None or t.get("steps") != r["gradient_steps"]:
            continue
        d = abs(r["accuracy"] - t["accuracy"])
        out.append(
            {
                "check": "plain arm reproduces the task table's recall",
                "cell": r["cell"],
                "seed": r["seed"],
                "table": t["accuracy"],
                "here": r["accuracy"],
                "abs_diff": d,
                "ok": bool(d <= 0.02),
            }
        )
    return out


def _floss_check(rows: list[dict]) -> list[dict]:
    """Pre-flossing lowered ``sum_i lambda_i^2`` on the test sequences."""
    out = []
    for r in rows:
        if r["arm"] == "pre" and "spectrum_preflossed" in r:
            b, a = r["spectrum_init"]["sum_sq"], r["spectrum_preflossed"]["sum_sq"]
            out.append(
                {
                    "check": "pre-flossing lowered sum lambda_i^2",
                    "cell": r["cell"],
                    "seed": r["seed"],
                    "before": b,
                    "after": a,
                    "ok": bool(a < b),
                }
            )
    return out


def _checks(rows, s, mode):
    return budget_check(rows) + _floss_check(rows) + _table_check(rows, s, mode)


# --------------------------------------------------------------------------- the suite


def _budgets(s: dict) -> dict[str, int]:
    """Hidden size of each cell: the parameter count closest to the LSTM's at ``H_ref``
    (``benchmarks.tasks``' copy budgets)."""
    O = s["copy"]["num_symbols"] + 2
    ref = btasks._n_params(btasks.task_model(btasks.make_cell("lstm", s["H_ref"]), O), O)
    return {kind: btasks.hidden_for_budget(kind, O, O, ref)[0] for kind in s["cells"]}


def _job_key(job) -> tuple:
    return (job[0], job[1], job[2])


def _order(row_or_job) -> tuple:
    if isinstance(row_or_job, dict):
        c, a, sd = row_or_job["cell"], row_or_job["arm"], row_or_job["seed"]
    else:
        c, a, sd = row_or_job[:3]
    return (CELLS.index(c) if c in CELLS else 99, ARMS.index(a), sd)


def _run_job(job, s, log=None):
    log = log or (lambda m: print(m, flush=True))
    kind, arm, seed, H = job
    return _run(kind, arm, seed, s, H, log)


def _notes(s: dict) -> list[str]:
    c = s["copy"]
    T = c["delay"] + 2 * c["length"]
    return [
        f"Copy task: L={c['length']} symbols of K={c['num_symbols']}, delay {c['delay']} (T={T} "
        f"steps); recall accuracy on the last L steps of {s['n_test']} test sequences, chance "
        f"1/K = {1 / c['num_symbols']:.3f}. Seeds {s['seeds']}.",
        f"Same budget for every arm: {s['steps']} gradient steps in total (pre-flossing steps "
        f"count), clipped_adam({s['lr']:g}) (Adam behind global-norm clipping at 1), task batch "
        f"{s['batch']}; the init params and task batches of the plain arm (the keys of "
        "benchmarks.tasks). The pre arm's task phase starts with a fresh optimiser state.",
        "Flossing settings fixed from the reference implementation "
        "(github.com/RainerEngelken/GradientFlossing), never tuned on this table: "
        f"{s['floss_steps']} pre-flossing steps; "
        f"weight {s['weight']} on flossing_loss (= the mean of lambda_i^2 over the k exponents, "
        f"the reference's loss); {s['floss_seqs']} sequence(s) per flossing estimate; during "
        f"training a flossing term every {s['every']} steps (the reference's flossing bursts "
        "during training add up to a third of its task steps).",
        f"Spectra on {s['spec_seqs']} test sequences (means over them): lambda_i, the top-k "
        "Lyapunov exponents (per step, natural log); log10 cond_k = log10 sigma_1/sigma_k of "
        "ds_T/ds_0 = J_T ... J_1 from product_singular_values (QR-factored, log domain); "
        "log10 sigma_1: how much the most amplified direction of the whole map grows (> 0) or "
        "shrinks (< 0) over the T steps.",
    ]


def run(
    mode: str = "quick",
    *,
    log: Callable[[str], None] = print,
    jobs: int = 1,
    arms: list[str] | None = None,
    keep_rows: list[dict] | None = None,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Run the flossing suite and return its result dict (see the module docstring).

    Args:
      mode: ``"tiny"``, ``"quick"`` or ``"full"``.
      log: progress lines.
      jobs: worker processes, each pinned to one core (as ``benchmarks.tasks.run``).
      arms: the arms to run (default all of ``ARMS``).
      keep_rows: rows of an earlier run of the same settings to keep (their runs are skipped).
      checkpoint: called with the result so far after every finished run.
    """
    s = settings(mode)
    arms = list(arms or ARMS)
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise ValueError(f"arms must be among {ARMS}, got {bad}.")
    ncores = common.cpu_count()
    if not 1 <= jobs <= ncores:
        raise ValueError(f"jobs must be between 1 and the {ncores} cores this process may use, got {jobs}.")
    result = common.new_result("flossing", mode)
    result["settings"] = s
    result["jobs"] = jobs
    missing = [
        m for m in ("seqjax.tasks", "seqjax.train", "seqjax.spectrum") if common.optional_import(m) is None
    ]
    if missing:
        result["skipped"].append(f"{', '.join(missing)} missing: the flossing suite needs them")
        return result
    if any(a != "plain" for a in arms) and flossing_api() is None:
        result["skipped"].append(
            "the flossing API (flossing_loss, Flossing, floss) is missing in this checkout: "
            "only the plain arm ran"
        )
        arms = [a for a in arms if a == "plain"]
    budgets = _budgets(s)
    result["budgets"] = {kind: {"H": H, "k": top_k(H, s)} for kind, H in budgets.items()}
    result["notes"] += _notes(s)
    if jobs > 1:
        result["notes"].append(
            f"Runs in {jobs} worker processes, each pinned to one core: a run's wall time is its time on one "
            "core while the other worker ran."
        )
    todo = [(kind, arm, seed, budgets[kind]) for kind in s["cells"] for arm in arms for seed in s["seeds"]]
    kept = {(r["cell"], r["arm"], r["seed"]): r for r in (keep_rows or []) if r.get("cell") in budgets}
    todo = [j for j in todo if _job_key(j) not in kept]
    if kept:
        result["notes"].append(
            f"{len(kept)} run(s) kept from an earlier run of the same settings (--resume): "
            + ", ".join(f"{c}/{a}/{sd}" for c, a, sd in sorted(kept, key=lambda x: _order(x)))
            + "."
        )
    done: dict[tuple, dict] = dict(kept)
    total = len(todo) + len(kept)

    def finish(row):
        done[(row["cell"], row["arm"], row["seed"])] = row
        result["rows"] = sorted(done.values(), key=_order)
        result["checks"] = _checks(result["rows"], s, mode)
        result["partial"] = None if len(done) == total else f"{len(done)} of {total} runs done"
        if checkpoint is not None and result["partial"]:
            checkpoint(dict(result, skipped=list(result["skipped"])))

    result["rows"] = sorted(done.values(), key=_order)
    result["checks"] = _checks(result["rows"], s, mode)
    if jobs == 1 or len(todo) <= 1:
        for job in todo:
            finish(_run_job(job, s, log))
        result["partial"] = None if len(done) == total else f"{len(done)} of {total} runs done"
        return result

    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # JAX is not fork-safe
    cores = ctx.Queue()
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(jobs)
    for core in list(allowed)[:jobs]:
        cores.put(core)
    # the costliest runs first: flossing arms, then the wider cell
    order = sorted(todo, key=lambda j: (j[1] == "plain", -j[3]))
    log(f"  {len(todo)} runs in {jobs} worker processes")
    with cf.ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=btasks._pin_worker, initargs=(cores,)
    ) as pool:
        futures = [pool.submit(_run_job, j, s) for j in order]
        for f in cf.as_completed(futures):
            row = f.result()
            log(
                f"  {row['cell']} {row['arm']} seed={row['seed']}: recall {row['accuracy']:.3f}, "
                f"{row['wall_s']:.0f} s"
            )
            finish(row)
    result["partial"] = None if len(done) == total else f"{len(done)} of {total} runs done"
    return result


# --------------------------------------------------------------------------- report


def _ms(vals, digits=3):
    return report.fmt_mean_std([v for v in vals if v is not None], digits)


def _spec(rows, which, f):
    vals = [f(r[which]) for r in rows if which in r]
    return _ms(vals, 3) if vals else "–"


def _group(rows):
    out: dict[tuple, list] = {}
    for r in rows:
        out.setdefault((r["cell"], r["arm"]), []).append(r)
    return out


def to_markdown(result: dict) -> str:
    """The table (one row per cell and arm), the per-seed table, the checks."""
    rows = result.get("rows") or []
    if not rows:
        return "No flossing rows (see Skipped)."
    s = result["settings"]
    c = s["copy"]
    n_seeds = len(s["seeds"])
    agg = "mean ± sd over seeds" if n_seeds > 1 else "one seed"
    out = [
        f"Copy task, L={c['length']} symbols of K={c['num_symbols']}, delay {c['delay']} "
        f"(T={c['delay'] + 2 * c['length']}); recall accuracy on the recalled steps (chance "
        f"{1 / c['num_symbols']:.3f}). Values: {agg}. Budget: {s['steps']} gradient steps per run.",
        "",
        "λ: top-k Lyapunov exponents per step (natural log), mean over test sequences; λ̄_k the mean "
        "of the k; cond_k = σ_1/σ_k of ds_T/ds_0. `init → after`: at initialisation → after "
        "training (pre arm: after pre-flossing in its own column).",
        "",
    ]
    table = []
    for (cell, arm), rs in _group(rows).items():
        seeds = ", ".join(f"{r['accuracy']:.3f}" for r in sorted(rs, key=lambda r: r["seed"]))
        pre = [r for r in rs if "spectrum_preflossed" in r]
        table.append(
            [
                btasks.LABELS[cell],
                ARM_LABELS[arm],
                f"{rs[0]['H']} / {rs[0]['k']}",
                f"{rs[0]['floss_steps']} + {rs[0]['task_steps']}",
                _ms([r["accuracy"] for r in rs]),
                seeds,
                _ms([r["test_ce"] for r in rs]),
                f"{_spec(rs, 'spectrum_init', lambda p: p['exponents'][0])} → "
                f"{_spec(rs, 'spectrum_after', lambda p: p['exponents'][0])}",
                f"{_spec(rs, 'spectrum_init', lambda p: p['exponents'][-1])} → "
                f"{_spec(rs, 'spectrum_after', lambda p: p['exponents'][-1])}",
                f"{_spec(rs, 'spectrum_init', lambda p: float(np.mean(p['exponents'])))} → "
                f"{_spec(rs, 'spectrum_after', lambda p: float(np.mean(p['exponents'])))}",
                f"{_spec(rs, 'spectrum_init', lambda p: p['log10_cond'])} → "
                f"{_spec(rs, 'spectrum_after', lambda p: p['log10_cond'])}",
                (
                    f"λ_1 {_spec(pre, 'spectrum_preflossed', lambda p: p['exponents'][0])}, "
                    f"λ_k {_spec(pre, 'spectrum_preflossed', lambda p: p['exponents'][-1])}, "
                    f"log10 cond {_spec(pre, 'spectrum_preflossed', lambda p: p['log10_cond'])}"
                )
                if pre
                else "–",
                report.fmt_mean_std([r["wall_s"] for r in rs], 3),
            ]
        )
    out.append(
        report.markdown_table(
            [
                "cell",
                "arm",
                "H / k",
                "steps floss + task",
                "recall",
                "recall per seed",
                "test CE",
                "λ_1 init → after",
                "λ_k init → after",
                "λ̄_k init → after",
                "log10 cond_k init → after",
                "after pre-flossing",
                "wall s",
            ],
            table,
        )
    )
    out += ["", "### Per seed", ""]
    per = []
    for r in rows:
        i, a = r["spectrum_init"], r["spectrum_after"]
        per.append(
            [
                btasks.LABELS[r["cell"]],
                ARM_LABELS[r["arm"]],
                r["seed"],
                f"{r['accuracy']:.3f}",
                f"{r['test_ce']:.3f}",
                f"{i['exponents'][0]:+.3f} → {a['exponents'][0]:+.3f}",
                f"{i['exponents'][-1]:+.3f} → {a['exponents'][-1]:+.3f}",
                f"{report.fmt_num(i['log10_sigma'][0])} → {report.fmt_num(a['log10_sigma'][0])}",
                f"{report.fmt_num(i['log10_cond'])} → {report.fmt_num(a['log10_cond'])}",
                f"{r['floss_wall_s']:.0f} + {r['train_wall_s']:.0f}",
            ]
        )
    out.append(
        report.markdown_table(
            [
                "cell",
                "arm",
                "seed",
                "recall",
                "test CE",
                "λ_1",
                "λ_k",
                "log10 σ_1(ds_T/ds_0)",
                "log10 cond_k",
                "wall s floss + task",
            ],
            per,
        )
    )
    checks = result.get("checks") or []
    if checks:
        out += ["", "### Checks", ""]
        for ch in checks:
            what = {k: v for k, v in ch.items() if k not in ("check", "ok")}
            out.append(f"- {'ok' if ch['ok'] else 'FAILED'}: {ch['check']} ({json.dumps(what)})")
    return "\n".join(out)


def plot(result: dict, out_dir: str) -> list[str]:
    """``flossing_spectra.png``: the top-k exponents per cell and arm, at init, after
    pre-flossing and after training (means over seeds); ``flossing_recall.png``: recall per
    arm (every seed) beside log10 cond_k after training."""
    plt = report.pyplot()
    rows = result.get("rows") or []
    if plt is None or not rows:
        return []
    cells = [c for c in CELLS if any(r["cell"] == c for r in rows)]
    paths = []
    fig, axes = plt.subplots(1, len(cells), figsize=(5.5 * len(cells), 3.8), squeeze=False)
    colours = {"plain": "C0", "pre": "C1", "during": "C2"}
    for ax, cell in zip(axes[0], cells):
        rs = [r for r in rows if r["cell"] == cell]
        init = np.mean([r["spectrum_init"]["exponents"] for r in rs], axis=0)
        idx = np.arange(1, len(init) + 1)
        ax.plot(idx, init, color="k", ls="--", lw=1.2, label="at init (all arms)")
        for arm in ARMS:
            ra = [r for r in rs if r["arm"] == arm]
            if not ra:
                continue
            if arm == "pre" and all("spectrum_preflossed" in r for r in ra):
                pf = np.mean([r["spectrum_preflossed"]["exponents"] for r in ra], axis=0)
                ax.plot(
                    idx, pf, color=colours[arm], ls=":", lw=1.5, marker="x", ms=4, label="after pre-flossing"
                )
            after = np.mean([r["spectrum_after"]["exponents"] for r in ra], axis=0)
            ax.plot(idx, after, color=colours[arm], lw=1.6, label=f"{ARM_LABELS[arm]}: after training")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("index i")
        ax.set_ylabel("λ_i per step (natural log)")
        ax.set_title(f"{btasks.LABELS[cell]}, copy T={rs[0]['T']}, top k={rs[0]['k']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "flossing_spectra.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    arms_here = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    width = 0.8 / max(len(cells), 1)
    for j, cell in enumerate(cells):
        for i, arm in enumerate(arms_here):
            rs = [r for r in rows if r["cell"] == cell and r["arm"] == arm]
            x = i + (j - (len(cells) - 1) / 2) * width
            for ax, vals in (
                (axes[0], [r["accuracy"] for r in rs]),
                (axes[1], [r["spectrum_after"]["log10_cond"] for r in rs]),
            ):
                vals = [v for v in vals if v is not None and math.isfinite(v)]
                if vals:
                    ax.bar(x, np.mean(vals), width * 0.9, color=f"C{j}", alpha=0.35)
                    ax.plot([x] * len(vals), vals, "o", color=f"C{j}", ms=4, label=None)
        for ax in axes:
            ax.bar(0, 0, 0, color=f"C{j}", alpha=0.35, label=btasks.LABELS[cell])
    c = result["settings"]["copy"]
    axes[0].axhline(1 / c["num_symbols"], color="k", ls="--", lw=0.8, label="chance 1/K")
    axes[0].set_ylabel("recall accuracy")
    axes[1].set_ylabel("log10 cond_k of ds_T/ds_0, after training")
    for ax in axes:
        ax.set_xticks(range(len(arms_here)), [ARM_LABELS[a] for a in arms_here], fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "flossing_recall.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


# --------------------------------------------------------------------------- command line


def _write(result: dict, out_dir: str, t0: float, command: str) -> None:
    result = dict(result, wall_s=time.perf_counter() - t0, command=command)
    body = to_markdown(result)
    if result.get("partial"):
        body = f"**Partial result: {result['partial']}.**\n\n" + body
    body += f"\n\nWall time of this suite: {result['wall_s']:.0f} s."
    report.write(result, body, out_dir)


def main(argv=None) -> int:
    """``python -m benchmarks.flossing [--quick|--tiny] [--jobs N] [--arms A,B] [--resume]
    [--plot] [--out DIR]``: run the suite, writing the files after every finished run."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.flossing", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--tiny", action="store_true")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, among {','.join(ARMS)}")
    p.add_argument(
        "--resume", action="store_true", help="keep the rows of <out>/flossing.json of the same settings"
    )
    p.add_argument("--plot", action="store_true")
    p.add_argument("--out", default=report.DEFAULT_OUT)
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    command = "python -m benchmarks.flossing " + " ".join(sys.argv[1:] if argv is None else argv)
    command = command.strip()
    os.makedirs(args.out, exist_ok=True)
    keep = []
    jpath = os.path.join(args.out, "flossing.json")
    if args.resume and os.path.isfile(jpath):
        with open(jpath) as f:
            old = json.load(f)
        if old.get("mode") == mode and old.get("settings") == json.loads(json.dumps(settings(mode))):
            keep = old.get("rows") or []
            command = old.get("command", command) + " ; " + command
    t0 = time.perf_counter()

    def log(m):
        print(m, flush=True)

    result = run(
        mode,
        log=log,
        jobs=args.jobs,
        arms=[a for a in args.arms.split(",") if a],
        keep_rows=keep,
        checkpoint=lambda partial: _write(partial, args.out, t0, command),
    )
    figures = plot(result, args.out) if args.plot else []
    result["figures"] = [os.path.basename(f) for f in figures]
    _write(result, args.out, t0, command)
    log(f"flossing: wrote {jpath} ({time.perf_counter() - t0:.0f} s)")
    return 0 if all(ch["ok"] for ch in result.get("checks", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
