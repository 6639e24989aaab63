"""Tests of the benchmark suite (``benchmarks/``).

Fast tests check the pieces against independent references: the textbook scan and the
PyTorch weight mapping against ``seqjax.unroll``, the task suite's state-gradient norms
against the closed form of a linear RNN, the parameter-budget solver against hand counts,
and the writers, the profile suite's bare scans against the recurrences they stand for. The
``bench`` tests (only with ``--runbench``, outside CI's time budget) run ``python -m
benchmarks --tiny`` end to end (every sub-suite, toy sizes) in a subprocess and validate the
JSON files key by key, and run the task suite's jobs and models.
"""

import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import common, peers, report, speed  # noqa: E402
from benchmarks import tasks as btasks  # noqa: E402

# the LSTM by default (the largest recurrence); every kind with --runslow
_KINDS = [k if k == "lstm" else pytest.param(k, marks=pytest.mark.slow) for k in peers.KINDS]


@pytest.mark.parametrize("kind", _KINDS)
def test_textbook_scan_matches_unroll(kind):
    # The textbook scan is written from the equations, independently of seqjax.cells; it is
    # the speed suite's correctness reference, so check it (and the path the suite times,
    # unroll's default) both ways: outputs and gradients of sum(ys**2). float32; same maths,
    # different fusion/summation order: 1e-5 on outputs, 1e-4 on gradients over 7 steps.
    B, T, I, H = 3, 7, 4, 5
    cell = peers.make_cell(kind, H)
    p = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    tb = peers.textbook_apply(kind)
    got = jax.jit(tb)(p, xs)
    ref = sj.unroll(cell, p, xs)[1]
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)

    def loss(apply):
        return lambda p, x: jnp.sum(apply(p, x) ** 2)

    g_tb = jax.jit(jax.grad(loss(tb), argnums=(0, 1)))(p, xs)
    g_sj = jax.jit(jax.grad(loss(lambda p, x: sj.unroll(cell, p, x)[1]), argnums=(0, 1)))(p, xs)
    assert common.tree_rel_err(g_sj, g_tb) < 1e-4


@pytest.mark.parametrize("kind", _KINDS)
def test_torch_module_carries_seqjax_weights(kind):
    torch = pytest.importorskip("torch")
    B, T, I, H = 2, 6, 3, 4
    cell = peers.make_cell(kind, H)
    p = cell.init(jax.random.key(2), I)
    xs = np.asarray(jax.random.normal(jax.random.key(3), (B, T, I)))
    m = peers.torch_module(torch, kind, H, I, p)
    with torch.no_grad():
        out = m(torch.from_numpy(xs.copy()))[0].numpy()
    ref = np.asarray(sj.unroll(cell, p, jnp.asarray(xs))[1])
    # oneDNN vs XLA float32 kernels: 1e-5 relative to O(1) outputs.
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # gradients come back in seqjax's layout, with the same shapes
    xg = torch.from_numpy(xs.copy()).requires_grad_(True)
    (m(xg)[0] ** 2).sum().backward()
    g = peers.torch_grads_as_seqjax(m, p)
    assert {k: v.shape for k, v in g.items()} == {k: tuple(v.shape) for k, v in p.items()}


def test_flops_formula():
    # LSTM at medium: 2*B*T*(I+H)*4H
    B, T, I, H = 32, 100, 64, 256
    assert speed.flops("lstm", B, T, I, H, backward=False) == 2 * B * T * (I + H) * 4 * H
    assert speed.flops("gru", B, T, I, H, backward=True) == 3 * 2 * B * T * (I + H) * 3 * H


def test_stats_and_rel_err():
    st = common.stats([3.0, 1.0, 2.0, 10.0])
    assert st["median_s"] == 2.5 and st["min_s"] == 1.0 and st["max_s"] == 10.0 and st["reps"] == 4
    assert common.rel_err(np.array([1.0, 2.0]), np.array([1.0, 4.0])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        common.rel_err(np.zeros(2), np.zeros(3))


def test_report_writers(tmp_path):
    res = common.new_result("demo", "tiny")
    res["rows"].append({"x": float("nan"), "y": np.float32(1.5)})
    res["notes"].append("a note")
    body = report.markdown_table(["a", "b"], [[1, None], ["x", 2.5]])
    assert body.splitlines()[1] == "|---|---|"
    j, m = report.write(res, body, str(tmp_path))
    data = _strict_load(j)
    assert data["rows"][0] == {"x": None, "y": 1.5}
    with open(m) as f:
        md = f.read()
    assert "| 1 |  |" in md and "a note" in md and data["machine"]["cpu_model"] in md
    assert report.fmt_time(0.0123) == "12.3 ms" and report.fmt_bytes(3 * 2**20) == "3.0 MiB"
    assert report.fmt_mean_std([1.0, 3.0]) == "2 ± 1.4"


def test_state_gradient_norms_linear_rnn_closed_form():
    # Identity activation, loss L = <h_T, v> through a zero-bias readout on the last step:
    # dL/dh_t = v (W_h^T)^(T-t) in the row-vector convention (h_t = x_t W_x + h_{t-1} W_h + b).
    H, I, T = 5, 2, 6
    cell = sj.rnn(H, activation="identity")
    params = btasks.task_model(cell, 1).init(jax.random.key(0), I)
    assert not np.any(params["head"]["b"])  # the readout starts with a zero bias
    params["body"]["w_h"] = 0.9 * params["body"]["w_h"] / jnp.linalg.norm(params["body"]["w_h"], 2)
    xs = jax.random.normal(jax.random.key(1), (1, T, I))
    v = np.asarray(params["head"]["w"][:, 0], np.float64)
    got = btasks.state_gradient_norms(cell, params, xs, lambda outs: jnp.sum(outs[:, -1, 0]))
    W = np.asarray(params["body"]["w_h"], np.float64)
    want = [np.linalg.norm(v @ np.linalg.matrix_power(W.T, T - 1 - t)) for t in range(T)]
    np.testing.assert_allclose(got, want, rtol=1e-5)  # float32 vs float64 reference


def test_hidden_for_budget_matches_hand_count():
    I, O = 2, 1
    lstm_count = lambda H: 4 * H * (I + H + 1) + H * O + O  # noqa: E731
    rnn_count = lambda H: H * (I + H + 1) + H * O + O  # noqa: E731
    budget = lstm_count(16)
    H, n = btasks.hidden_for_budget("lstm", I, O, budget)
    assert (H, n) == (16, budget)
    H, n = btasks.hidden_for_budget("rnn", I, O, budget)
    assert n == rnn_count(H)
    assert all(abs(rnn_count(H)) - budget <= abs(rnn_count(h) - budget) for h in (H - 1, H + 1))


def test_cli_rejects_unknown_suite(capsys):
    from benchmarks.cli import main

    with pytest.raises(SystemExit):
        main(["nonsense", "--tiny"])
    assert "unknown suite" in capsys.readouterr().err


def test_profile_bare_scans_compute_their_recurrences():
    # The profile's floors must do the work they claim: compare with NumPy loops of the same
    # recurrences (float32 vs float64 over 5 steps of O(1) values: 1e-5).
    from benchmarks import profile

    T, B, I, H, G = 5, 3, 2, 4, 3
    rng = np.random.default_rng(0)
    w_x, w_h = rng.normal(size=(I, G * H)) / 2, rng.normal(size=(H, G * H)) / 2
    xs, dzs = rng.normal(size=(T, B, I)), rng.normal(size=(T, B, G * H)) / 2
    fwd, rev, gemms = profile.bare_scans(H, G)
    h = np.zeros((B, H))
    for t in range(T):
        h = np.tanh((xs[t] @ w_x + h @ w_h)[:, :H])
    f32 = lambda *a: [jnp.asarray(x, jnp.float32) for x in a]  # noqa: E731
    np.testing.assert_allclose(jax.jit(fwd)(*f32(w_x, w_h, xs)), h, rtol=1e-5, atol=1e-5)
    one_matmul = profile.bare_forward_fused(H)
    np.testing.assert_allclose(jax.jit(one_matmul)(*f32(w_x, w_h, xs)), h, rtol=1e-5, atol=1e-5)
    g = np.ones((B, H))
    for t in reversed(range(T)):
        g = np.tanh((np.tile(g, (1, G)) * dzs[t]) @ w_h.T)
    np.testing.assert_allclose(jax.jit(rev)(*f32(w_h, dzs)), g, rtol=1e-5, atol=1e-5)
    X, Hin, dZ = xs.reshape(T * B, I), rng.normal(size=(T * B, H)), dzs.reshape(T * B, G * H)
    want = (X.T @ dZ, Hin.T @ dZ, dZ @ w_x.T, dZ.sum(0))
    for got, ref in zip(jax.jit(gemms)(*f32(w_x, X, Hin, dZ)), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_profile_counts_hlo_ops_per_step_of_each_loop():
    # One scan with one matmul per step, then a reverse scan with two: the parser must find
    # both loops, in order, with their dots (whatever library runs them).
    from benchmarks import profile

    def f(w, xs):
        h, hs = jax.lax.scan(lambda h, x: (jnp.tanh(x @ w + h @ w), h), jnp.zeros((2, 4)), xs)
        g, _ = jax.lax.scan(lambda g, h: ((g @ w) @ w.T + h, None), h, hs, reverse=True)
        return g

    text = jax.jit(f).lower(jnp.ones((4, 4)), jnp.ones((5, 2, 4))).compile().as_text()
    loops = profile.hlo_ops_per_step(text)
    assert [c["dot"] for c in loops] == [2, 2] or [c["dot"] for c in loops] == [1, 2], loops


def test_time_interleaved_calls_everyone_every_round_in_rotating_order():
    from benchmarks import common

    calls = []
    fns = {n: (lambda n: lambda: calls.append(n))(n) for n in "abc"}
    out = common.time_interleaved(fns, rounds=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert set(out) == set("abc") and all(len(v["times_s"]) == 3 for v in out.values())


@pytest.mark.bench
def test_lstm_kernel_variants_have_the_same_gradients():
    # The before/after benchmark rebuilds 0.1's LSTM kernel from the GateMath interface; every
    # variant must compute the same gradients as today's kernel (float32, 5 steps: 1e-5).
    from benchmarks import lstm_kernel

    variants = lstm_kernel._variants(3)
    p = variants["seqjax"].init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 2))
    grads = {
        name: jax.jit(lstm_kernel._grad_fn(lambda p, xs, c=cell: sj.unroll(c, p, xs)[1]))(p, xs)
        for name, cell in variants.items()
    }
    assert variants["0.1 kernel"].kernel != variants["seqjax"].kernel
    for name, g in grads.items():
        chex.assert_trees_all_close(g, grads["seqjax"], rtol=1e-5, atol=1e-6, custom_message=name)


def test_task_table_reports_diverged_seeds():
    # A diverged seed (inf/nan, stored as null in the strict JSON) is counted, never dropped
    # silently from the mean; underflowed and non-finite gradients are named.
    rows = [
        {"test_mse": 0.01, "grad_underflow": True, "grad_norms_first_last": [0.0, 1.0], "wall_s": 10.0},
        {"test_mse": None, "grad_underflow": False, "grad_norms_first_last": [None, None], "wall_s": 12.0},
        {
            "test_mse": float("inf"),
            "log10_grad_ratio": -2.0,
            "grad_norms_first_last": [0.1, 10.0],
            "wall_s": 14.0,
        },
    ]
    assert btasks._ms(rows, "test_mse") == "0.01; diverged (2/3)"
    assert btasks._ms(rows[:1], "test_mse") == "0.01"
    assert btasks._ms(rows, "log10_grad_ratio") == "-2; underflow to 0 (1/3); non-finite (1/3)"
    assert btasks._wall(rows) == "12 ± 2"


def test_task_job_selectors():
    # Every full-mode job is listed once; --only narrows to exactly the matching ones.
    s = btasks.settings("full")
    budgets = {t: {k: (8, 0) for k in btasks.CELLS} for t in ("adding", "copy", "digits")}
    jobs = btasks._jobs(s, budgets)
    n_seeds, n_cells = len(s["seeds"]), len(btasks.CELLS)
    assert (
        len(jobs)
        == len(set(jobs))
        == n_seeds * (len(s["adding_Ts"]) * n_cells + 2 * n_cells + 1 + len(s["char_cells"]))
    )
    pick = lambda sel: [j for j in jobs if btasks._selected(j, btasks.parse_only(sel))]  # noqa: E731
    assert {(j[0], j[1]) for j in pick(["adding:200"])} == {("adding", 200)}
    assert len(pick(["adding:200"])) == n_cells * n_seeds
    assert [j[2] for j in pick(["adding:400:gru"])] == ["gru"] * n_seeds
    assert {j[0] for j in pick(["copy:lstm", "sunspots"])} == {"copy", "sunspots"}
    assert btasks.parse_only(None) is None
    bad_selectors = [
        ("addng:200", "task must be one of"),
        ("adding:lsmt", "expected TASK"),
        ("adding:1:2", "got '2'"),
    ]
    for bad, msg in bad_selectors:
        with pytest.raises(ValueError, match=msg):
            btasks.parse_only([bad])


def test_cli_task_options_errors(capsys):
    from benchmarks.cli import main

    with pytest.raises(SystemExit):
        main(["speed", "--only", "adding:200", "--tiny"])
    assert "apply to the tasks suite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tasks", "--only", "adding:xx", "--tiny"])
    assert "expected TASK[:T][:CELL]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tasks", "--jobs", str(common.cpu_count() + 1), "--tiny"])
    assert "--jobs must be between 1" in capsys.readouterr().err


def test_analysis_suite_smoke(tmp_path, capsys, monkeypatch):
    # The checkpoint-sweep suite end to end at toy sizes on one real function (the cheapest to
    # compile; all four run in the slow end-to-end test): rows, ratio, checks, the JSON/Markdown
    # files, and the rendering of a run with a --baseline. Then the n/a path of a peer that
    # cannot be jitted, with a stand-in that returns a host float.
    from benchmarks import analysis
    from benchmarks.cli import main, run_suite

    fns = ("step_jacobians",)
    out = tmp_path / "r"
    res = run_suite("analysis", "tiny", str(out), log=lambda m: None, options={"functions": fns})
    assert "error" not in res, res.get("traceback")
    d = _strict_load(out / "analysis.json")
    n = analysis.settings("tiny")["checkpoints"]
    rows = {(r["function"], r["impl"]): r for r in d["rows"]}
    assert set(rows) == {(f, w) for f in fns for w in (analysis.EAGER, analysis.JIT)}
    e, j = rows[("step_jacobians", analysis.EAGER)], rows[("step_jacobians", analysis.JIT)]
    assert len(e["all_times_s"]) == len(j["all_times_s"]) == n and e["reps"] == j["reps"] == n - 1
    assert e["ratio_median"] == pytest.approx(e["median_s"] / j["median_s"])
    assert all(c["ok"] for c in d["checks"]) and len(d["checks"]) == 2
    assert d["source"]["commit"] == d["machine"]["git_commit"]
    md = (out / "analysis.md").read_text()
    assert "|---" in md and d["source"]["commit"] in md
    # --baseline: the earlier run's rows stored in the new result, both printed
    md2 = analysis.to_markdown(dict(d, baseline=analysis._load_baseline(str(out / "analysis.json"))))
    assert "before / after" in md2 and md2.count("`step_jacobians` | before") == 1
    assert md2.count("`step_jacobians` | after") == 1
    with pytest.raises(SystemExit):
        main(["speed", "--tiny", "--baseline", str(out / "analysis.json")])
    assert "applies to the analysis suite" in capsys.readouterr().err

    monkeypatch.setattr(
        analysis, "_calls", lambda spec: {"gradient_flow_report": lambda c, p, x: float(x.sum())}
    )
    res = analysis.run("tiny", log=lambda m: None, functions=("gradient_flow_report",))
    j = next(r for r in res["rows"] if r["impl"] == analysis.JIT)
    assert j["unavailable"] == "ConcretizationTypeError" and j["ratio_median"] is None
    assert "n/a (ConcretizationTypeError)" in analysis.to_markdown(res)


@pytest.mark.bench
@pytest.mark.slow  # benchmark-suite plumbing (not the library); seconds of compiling
def test_task_suite_only_and_checkpoint(monkeypatch):
    # The bookkeeping of a tasks run, with the training replaced by a stub that records the
    # job: --only picks the two tiny adding jobs, the checkpoint sees the first one done and
    # the result marked partial, the final result has both rows in table order. (The real
    # jobs run in the slow end-to-end tests.)
    pytest.importorskip("seqjax.tasks")
    ran = []

    def fake_job(job, s, log=None):
        ran.append(job)
        return [{"task": job[0], "T": job[1], "cell": job[2], "seed": job[3]}], None

    monkeypatch.setattr(btasks, "_run_job", fake_job)
    seen = []
    res = btasks.run("tiny", log=lambda m: None, only=["adding"], checkpoint=lambda r: seen.append(r))
    assert [j[:3] for j in ran] == [("adding", 8, "rnn"), ("adding", 8, "lstm")]
    assert [(r["task"], r["cell"]) for r in res["rows"]] == [("adding", "rnn"), ("adding", "lstm")]
    assert res["real_rows"] == [] and res["partial"] is None
    assert len(seen) == 1 and seen[0]["partial"] == "1 of 2 jobs done" and len(seen[0]["rows"]) == 1
    assert "adding" in res["notes"][-1]
    with pytest.raises(ValueError, match="no job"):
        btasks.run("tiny", only=["adding:999"])
    with pytest.raises(ValueError, match="jobs must be between 1"):
        btasks.run("tiny", jobs=0)


@pytest.mark.bench
@pytest.mark.slow  # benchmark-suite plumbing (not the library); seconds of compiling
def test_failed_task_run_keeps_finished_rows(tmp_path, monkeypatch):
    # A job that raises fails the suite, but the file it writes still holds the rows of the
    # jobs that finished before it (nothing already saved is lost), beside the error.
    pytest.importorskip("seqjax.tasks")
    from benchmarks.cli import run_suite

    def job(j, s, log=None):
        if j[2] == "lstm":
            raise RuntimeError("boom")
        row = {"task": j[0], "T": j[1], "cell": j[2], "seed": j[3], "H": j[4], "wall_s": 1.0}
        return [dict(row, test_mse=0.1, **{"steps_to_0.01": None})], None

    monkeypatch.setattr(btasks, "_run_job", job)
    res = run_suite("tasks", "tiny", str(tmp_path), log=lambda m: None, options={"only": ["adding"]})
    d = _strict_load(tmp_path / "tasks.json")
    assert "RuntimeError: boom" in d["error"] and res["error"] == d["error"]
    assert [r["cell"] for r in d["rows"]] == ["rnn"] and d["partial"] == "1 of 2 jobs done"
    md = (tmp_path / "tasks.md").read_text()
    assert "boom" in md and "1 of 2 jobs done" in md


# --------------------------------------------------------------------------- end to end

TIMING_KEYS = {"median_s", "min_s", "max_s", "times_s", "reps", "compile_s"}


def _strict_load(path):
    with open(path) as f:
        return json.load(f, parse_constant=lambda c: pytest.fail(f"{path}: non-strict JSON constant {c}"))


@pytest.mark.bench
@pytest.mark.slow
def test_tasks_in_worker_processes(tmp_path):
    # --jobs 2: the jobs run in two spawned worker processes, and the result is the same
    # table (rows in table order, not completion order) as a one-process run would write.
    if common.cpu_count() < 2:
        pytest.skip("needs 2 cores")
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks", "tasks", "--tiny", "--jobs", "2", "--only", "adding"]
    cmd += ["--only", "sunspots", "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = _strict_load(out / "tasks.json")
    assert d["jobs"] == 2 and d["only"] == ["adding", "sunspots"] and d["partial"] is None
    assert [(r["task"], r["cell"]) for r in d["rows"]] == [("adding", "rnn"), ("adding", "lstm")]
    assert all(math.isfinite(r["wall_s"]) and r["wall_s"] > 0 for r in d["rows"])
    assert {r["task"].split()[0] for r in d["real_rows"]} == {"sunspots"}
    assert "worker processes" in (out / "tasks.md").read_text()


@pytest.mark.bench
@pytest.mark.slow
def test_suite_end_to_end_tiny(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--plot", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for suite in ("speed", "profile", "memory", "spectrum", "tasks", "analysis"):
        d = _strict_load(out / f"{suite}.json")
        assert d["suite"] == suite and d["mode"] == "tiny" and "error" not in d
        m = d["machine"]
        assert {"cpu_model", "cores", "dtype", "versions", "date_utc"} <= set(m)
        assert {"jax", "jaxlib", "flax", "torch", "equinox"} <= set(m["versions"])
        assert m["cores"] >= 1 and m["dtype"] == "float32"
        assert {"notes", "skipped", "checks", "rows", "wall_s", "command", "figures"} <= set(d)
        assert d["rows"], suite
        assert all(c["ok"] for c in d["checks"]), [c for c in d["checks"] if not c["ok"]]
        md = (out / f"{suite}.md").read_text()
        assert "|---" in md and d["command"] in md
        for fig in d["figures"]:
            assert (out / fig).stat().st_size > 0

    sp = _strict_load(out / "speed.json")
    assert {"jax", "torch"} <= set(sp["matmul_peak"]) and sp["matmul_peak"]["jax"]["gflops_best"] > 0
    impls = {r["impl"] for r in sp["rows"]}
    assert {
        "seqjax",
        "textbook lax.scan",
        "flax LSTMCell",
        "flax OptimizedLSTMCell",
        "equinox LSTMCell",
        "torch",
    } <= impls
    assert any(c["what"] == "gradients vs torch" for c in sp["checks"])
    for r in sp["rows"]:
        assert TIMING_KEYS <= set(r) and len(r["times_s"]) == r["reps"]
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        assert {"gflops", "ratio_median", "ratio_min", "flops", "config", "cell", "pass"} <= set(r)
        if r["impl"] == "seqjax":
            assert r["ratio_median"] == 1.0
        if r["library"] != "torch" and r["pass"] == "forward+backward":
            assert r["memory"]["peak_bytes"] > 0

    prof = _strict_load(out / "profile.json")
    for r in prof["rows"]:
        parts = ("f+b", "forward", "bare forward scan", "bare reverse scan", "weight-gradient GEMMs")
        assert all(TIMING_KEYS <= set(r[k]) for k in parts)
        assert "torch f+b" in r or any("torch" in x for x in prof["skipped"])
        # the derived columns are what their names say
        med = {k: r[k]["median_s"] for k in parts}
        assert r["backward_s"] == pytest.approx(med["f+b"] - med["forward"])
        assert r["rest_s"] == pytest.approx(
            med["f+b"] - med["bare forward scan"] - med["bare reverse scan"] - med["weight-gradient GEMMs"]
        )

    mem = _strict_load(out / "memory.json")
    for r in mem["rows"]:
        assert r["memory"] is None or r["memory"]["peak_bytes"] > 0
    names = {r["impl"] for r in mem["rows"]}
    assert "seqjax (default)" in names and "textbook lax.scan" in names
    if "gradient" in peers.unroll_options():
        assert {"seqjax Autodiff()", "seqjax Remat(1)", "seqjax Remat(⌈√T⌉)"} <= names

    spec = _strict_load(out / "spectrum.json")
    tables = {r["table"] for r in spec["rows"]}
    assert tables == {"step_jacobians", "lyapunov"}
    for r in spec["rows"]:
        assert TIMING_KEYS - {"compile_s"} <= set(r) and "ratio_median" in r

    tk = _strict_load(out / "tasks.json")
    if tk["rows"]:
        adding = [r for r in tk["rows"] if r["task"] == "adding"]
        copy = [r for r in tk["rows"] if r["task"] == "copy"]
        assert adding and copy
        for r in adding:
            assert {
                "test_mse",
                "baseline",
                "steps_to_0.01",
                "wall_s",
                "log10_grad_ratio",
                "H",
                "seed",
            } <= set(r)
            assert math.isclose(r["baseline"], 1 / 6)
            assert {"rho_J_mean", "lambda_max"} <= set(r)
        assert all("rho_Wh" in r for r in adding if r["cell"] in ("rnn", "irnn"))
        assert all({"accuracy", "baseline_accuracy"} <= set(r) for r in copy)
        real = {r["task"].split()[0] for r in tk["real_rows"]}
        assert {"digits", "sunspots", "char-LM"} <= real
        assert set(tk["budgets"]) == {"adding", "copy", "digits"}


# ---------------------------------------------------------------- task models (benchmarks/tasks.py)


@pytest.mark.bench
@pytest.mark.slow  # benchmark-suite plumbing (not the library); seconds of compiling
def test_task_model_readout_scale_and_cells_by_name():
    # the readout is N(0, 0.1^2 / H): over 64 x 50 weights the sample std is within 10% of 0.1/8
    model = btasks.task_model(sj.rnn(64), 50)
    p = model.init(jax.random.key(0), 3)
    assert float(np.std(np.asarray(p["head"]["w"]))) == pytest.approx(btasks.READOUT_SCALE / 8, rel=0.1)
    assert model.apply(p, jnp.zeros((2, 7, 3))).shape == (2, 7, 50)
    for kind in btasks.CELLS:
        assert btasks.make_cell(kind, 4).meta.hidden_size == 4
    with pytest.raises(ValueError, match="kind"):
        btasks.make_cell("mgu", 4)


@pytest.mark.bench
@pytest.mark.slow  # benchmark-suite plumbing (not the library); seconds of compiling
def test_compare_sunspot_models_tiny():
    pytest.importorskip("statsmodels")
    from seqjax.tasks import sunspots

    r = btasks.compare_sunspot_models(
        key=jax.random.key(0), models=("ar", "tdnn"), steps=4, hidden=4, lags=4, window=20
    )
    assert set(r) == {"persistence", "ar", "tdnn"}
    for v in r.values():
        assert set(v) == {"test_mse", "test_nmse", "train_mse", "seconds"}
        assert all(np.isfinite(list(v.values())))
    # AR(4) beats persistence one step ahead on held-out sunspot years (a property of the data)
    assert r["ar"]["test_mse"] < r["persistence"]["test_mse"]
    # persistence recomputed by hand
    d = sunspots()
    x = d.values.astype(np.float64)
    want = np.mean((x[d.n_train - 1 : d.n_test_end - 1] - x[d.n_train : d.n_test_end]) ** 2)
    assert r["persistence"]["test_mse"] == pytest.approx(want)


@pytest.mark.bench
@pytest.mark.slow  # benchmark-suite plumbing (not the library); seconds of compiling
def test_sample_text_uses_vocab_and_is_reproducible():
    from seqjax.tasks import char_corpus

    c = char_corpus(modules=("bisect",))
    V = len(c.vocab)
    cell = sj.lstm(8)
    p = btasks.task_model(cell, V).init(jax.random.key(0), V)
    a = btasks.sample_text(cell, p, c.vocab, "def ", 30, key=jax.random.key(1))
    b = btasks.sample_text(cell, p, c.vocab, "def ", 30, key=jax.random.key(1))
    assert a == b and len(a) == 30 and set(a) <= set(c.vocab)
    with pytest.raises(ValueError, match="vocabulary"):
        btasks.sample_text(cell, p, c.vocab, "\x00", 3, key=jax.random.key(1))


@pytest.mark.bench
@pytest.mark.slow
def test_train_char_lm_beats_unigram():
    from seqjax.tasks import char_corpus

    c = char_corpus(modules=("textwrap",))
    _, s = btasks.train_char_lm(c, sj.lstm(64, forget_bias=1.0), key=jax.random.key(0), seq_len=32, steps=300)
    assert s["valid_bpc"] < s["unigram_bpc"], s
