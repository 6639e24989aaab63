"""The gradient-flossing benchmark suite (``benchmarks/flossing.py``, issue 17).

The tiny-mode smoke test runs the whole suite in-process (three arms, one cell, one seed) and
checks its rows, its checks and the same-budget rule from the recorded step counts; the
other tests check the bookkeeping on hand-made rows.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import flossing as bf  # noqa: E402
from benchmarks import tasks as btasks  # noqa: E402


def _row(cell="rnn", arm="plain", seed=0, floss=0, task=8, recorded=None, acc=0.125):
    spec = {
        "k": 3,
        "exponents": [-0.1, -0.5, -1.0],
        "exponents_sd": [0.0] * 3,
        "sum_sq": 1.26,
        "log10_sigma": [-1.0, -3.0, -5.0],
        "log10_cond": 4.0,
        "log10_cond_per_seq": [4.0],
        "T": 7,
    }
    r = {
        "cell": cell,
        "arm": arm,
        "seed": seed,
        "H": 4,
        "k": 3,
        "T": 7,
        "accuracy": acc,
        "test_ce": 0.3,
        "spectrum_init": spec,
        "spectrum_after": dict(spec, exponents=[0.0, -0.1, -0.2], sum_sq=0.05, log10_cond=0.5),
        "floss_steps": floss,
        "task_steps": task,
        "gradient_steps": floss + task,
        "optimizer_steps_recorded": floss + task if recorded is None else recorded,
        "floss_wall_s": 0.0,
        "train_wall_s": 1.0,
        "wall_s": 1.0,
    }
    if arm == "pre":
        r["spectrum_preflossed"] = dict(spec, sum_sq=0.01)
    return r


def test_settings_keep_the_task_table_budget():
    for mode in ("tiny", "quick", "full"):
        s, t = bf.settings(mode), btasks.settings(mode)
        assert s["steps"] == t["copy_steps"] and s["batch"] == t["batch"] and s["lr"] == t["lr"]
        assert s["copy"] == t["copy"] and s["seeds"] == t["seeds"] and s["n_test"] == t["n_test"]
        assert 0 < s["floss_steps"] < s["steps"]
    full = bf.settings("full")
    assert full["copy"] == {"length": 10, "delay": 50, "num_symbols": 8} and full["seeds"] == [0, 1, 2]
    assert full["floss_steps"] == bf.REF_PRE_STEPS and full["every"] == bf.REF_EVERY
    assert bf.top_k(80, full) == bf.FLOSS_K == full["k"] and bf.top_k(1, full) == 1


def test_budget_check_reads_the_recorded_steps():
    rows = [_row(arm="plain"), _row(arm="pre", floss=2, task=6), _row(arm="during")]
    (ch,) = bf.budget_check(rows)
    assert ch["ok"] and ch["steps"] == {"plain": 8, "pre": 8, "during": 8}
    rows[1] = _row(arm="pre", floss=2, task=6, recorded=6)  # the flossing steps not counted
    assert not bf.budget_check(rows)[0]["ok"]
    rows[1] = _row(arm="pre", floss=2, task=8)  # a pre arm that took 10 steps in all
    assert not bf.budget_check(rows)[0]["ok"]


def test_markdown_has_every_cell_arm_and_seed():
    rows = [
        _row(arm=a, seed=s, floss=2 if a == "pre" else 0, task=6 if a == "pre" else 8)
        for a in bf.ARMS
        for s in (0, 1)
    ]
    result = {
        "settings": bf.settings("tiny") | {"seeds": [0, 1]},
        "rows": rows,
        "checks": bf.budget_check(rows),
    }
    md = bf.to_markdown(result)
    for label in bf.ARM_LABELS.values():
        assert label in md
    assert "0.125 ± 0" in md and "2 + 6" in md and "4 ± 0 → 0.5 ± 0" in md
    assert md.count("| tanh RNN |") == 3 + 6  # the summary rows and the per-seed rows
    assert "ok: same gradient-step budget" in md


@pytest.mark.bench
@pytest.mark.slow  # about 20 s on one idle core (three fits, one floss, the spectra)
def test_flossing_suite_tiny_smoke(tmp_path):
    pytest.importorskip("seqjax.tasks")
    assert bf.flossing_api() is not None  # seqjax.spectrum / seqjax.train export it
    lines = []
    res = bf.run("tiny", log=lines.append)
    s = res["settings"]
    assert res["partial"] is None and not res["skipped"]
    assert {(r["cell"], r["arm"], r["seed"]) for r in res["rows"]} == {
        (c, a, sd) for c in s["cells"] for a in bf.ARMS for sd in s["seeds"]
    }
    for r in res["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["test_ce"])
        for key in ("spectrum_init", "spectrum_after"):
            assert len(r[key]["exponents"]) == r["k"] == len(r[key]["log10_sigma"])
            assert all(math.isfinite(v) for v in r[key]["exponents"])
            assert r[key]["log10_cond"] >= 0.0
    # the same-budget rule, from the recorded step counts
    recorded = {r["arm"]: r["optimizer_steps_recorded"] for r in res["rows"]}
    assert set(recorded.values()) == {s["steps"]}
    pre = next(r for r in res["rows"] if r["arm"] == "pre")
    assert (
        pre["floss_steps_recorded"] == s["floss_steps"] and pre["task_steps"] == s["steps"] - s["floss_steps"]
    )
    assert "spectrum_preflossed" in pre
    budget = [c for c in res["checks"] if c["check"] == "same gradient-step budget"]
    assert budget and all(c["ok"] for c in budget)
    assert any(c["check"].startswith("pre-flossing lowered") for c in res["checks"])
    # the writers: strict JSON and a table; figures when matplotlib is there
    md = bf.to_markdown(res)
    assert "pre-flossing" in md and "flossing during training" in md
    bf._write(res, str(tmp_path), 0.0, "python -m benchmarks.flossing --tiny")
    with open(tmp_path / "flossing.json") as f:
        assert json.load(f)["command"] == "python -m benchmarks.flossing --tiny"
    if bf.report.pyplot() is not None:
        assert [os.path.basename(p) for p in bf.plot(res, str(tmp_path))] == [
            "flossing_spectra.png",
            "flossing_recall.png",
        ]
