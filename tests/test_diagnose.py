"""seqjax.diagnose: its numbers against the spectrum functions and autodiff on tiny models,
and the verdict and report text on hand-made diagnoses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj
from seqjax import diagnose as dg
from seqjax.layers import dense
from seqjax.seq2seq import many_to_one
from seqjax.spectrum import lag_log_norms, lyapunov_spectrum, step_jacobians

B, T, I = 2, 6, 2


def _model(cell, key=0):
    model = many_to_one(cell, dense(1))
    params = model.init(jax.random.key(key), I)
    xs = jax.random.normal(jax.random.key(key + 1), (B, T, I))
    ys = jax.random.uniform(jax.random.key(key + 2), (B, 1))
    return model, params, xs, ys


@pytest.mark.slow  # 4-6 s; the default run keeps the autodiff and forget-gate oracles of diagnose
def test_diagnose_without_targets_matches_the_spectrum_functions():
    cell = sj.rnn(3)
    _, params, xs, _ = _model(cell)
    d = dg.diagnose(cell, params, xs)
    body = params["body"]
    J = step_jacobians(cell, body, xs).jacobians
    assert not d.cotangent and d.grad_log10.shape == (T + 1,)  # lags 0..T
    np.testing.assert_allclose(
        d.grad_log10, np.mean(np.asarray(lag_log_norms(J)), 0) / math.log(10), rtol=1e-6
    )
    ly = lyapunov_spectrum(cell, body, xs, warmup=min(10, T // 5))
    np.testing.assert_allclose(d.lyapunov, np.mean(np.asarray(ly.exponents), 0), rtol=1e-6)
    J0 = np.asarray(J[0], np.float64)
    np.testing.assert_allclose(np.sort_complex(d.eig_jac[2]), np.sort_complex(np.linalg.eigvals(J0[2])))
    np.testing.assert_allclose(d.radius_jac, np.abs(np.linalg.eigvals(J0)).max(-1), rtol=1e-10)
    np.testing.assert_allclose(d.jac_norm, np.linalg.svd(J0, compute_uv=False)[:, 0], rtol=1e-10)
    w_h = np.asarray(body["w_h"])
    assert d.gate_names == ["net"] and len(d.eig_wh) == 1  # the tanh RNN names its one block
    np.testing.assert_allclose(
        np.sort_complex(d.eig_wh[0]), np.sort_complex(np.linalg.eigvals(w_h)), rtol=1e-6
    )
    assert d.sigma_blocks["net"] == pytest.approx(np.linalg.svd(w_h, compute_uv=False)[0], rel=1e-6)
    assert d.cell_log10 is None and d.cell_log10_units is None  # one carry leaf: no memory path


def test_gradient_ratio_with_targets_matches_autodiff():
    # dL/ds_{T-L} by autodiff: run the cell from the carry at T-L over the last L inputs and
    # read the many-to-one MSE loss from the final output (the tanh RNN's output is its carry).
    cell = sj.rnn(3)
    _, params, xs, ys = _model(cell, key=3)
    d = dg.diagnose(cell, params, xs, ys=ys)
    assert d.cotangent
    body, head = params["body"], params["head"]

    def carry_at(t):
        return sj.unroll(cell, body, xs[:, :t])[0] if t else cell.initial_carry(body, (B,))

    def loss_from(t):
        def f(c):
            h = sj.unroll(cell, body, xs[:, t:], carry=c)[0] if t < T else c
            return jnp.mean((h @ head["w"] + head["b"][None] - ys) ** 2)

        return f

    gT = jax.grad(loss_from(T))(carry_at(T))
    assert d.grad_log10[0] == 0.0  # lag 0: the ratio to itself
    for L in (1, 3, T):
        gL = jax.grad(loss_from(T - L))(carry_at(T - L))
        want = np.mean(np.log10(np.linalg.norm(gL, axis=-1) / np.linalg.norm(gT, axis=-1)))
        assert d.grad_log10[L] == pytest.approx(want, abs=1e-4), L


def test_lstm_memory_path_is_the_product_of_forget_gates():
    cell = sj.lstm(3, forget_bias=1.0)
    _, params, xs, ys = _model(cell, key=5)
    d = dg.diagnose(cell, params, xs, ys=ys)
    body = params["body"]
    carry = cell.initial_carry(body, (B,))
    logf = []
    for t in range(T):  # step by hand, reading the forget gate of every step
        logf.append(np.log10(np.asarray(cell.gates(body, carry, xs[:, t])["f"])))
        carry, _ = cell.step(body, carry, xs[:, t])
    logf = np.stack(logf, 1)  # (B, T, H)
    want = np.mean(np.cumsum(logf[:, ::-1], axis=1), axis=0)  # (T, H): lag L = 1..T
    want = np.concatenate([np.zeros((1, 3)), want])  # lag 0 first
    np.testing.assert_allclose(d.cell_log10_units, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d.cell_log10, want.max(-1), rtol=1e-4, atol=1e-6)
    assert d.gate_names == ["i", "f", "g", "o"] and len(d.eig_wh) == 4
    assert all(e.shape == (3,) for e in d.eig_wh)
    w_h = np.asarray(body["w_h"], np.float64)  # PyTorch's gate order i, f, g, o in column blocks
    for k, g in enumerate("ifgo"):
        block = w_h[:, 3 * k : 3 * (k + 1)]
        assert d.sigma_blocks[g] == pytest.approx(np.linalg.norm(block, 2), rel=1e-5)
    assert d.lyapunov.shape == (6,)  # the state [h, c]


def test_gate_names_follow_block_order():
    for cell, want in (
        (sj.lstm(3), ["i", "f", "g", "o"]),
        (sj.gru(3), ["r", "z", "n"]),
        (sj.janet(3), ["f", "c_tilde"]),
    ):
        p = cell.init(jax.random.key(0), 2)
        assert dg.gate_names(cell, p, 2, len(want)) == want
    # without a name per block: h, or h0, h1, ...
    p = sj.tdnn(3, 2).init(jax.random.key(0), 2)
    assert dg.gate_names(sj.tdnn(3, 2), p, 2, 1) == ["h"]
    assert dg.gate_names(sj.lstm(3), sj.lstm(3).init(jax.random.key(0), 2), 2, 2) == ["h0", "h1"]


# ---------------------------------------------------------------- verdict and reports (hand-made)


def _diag(grad_log10, lyap=(-0.2, -0.5), units=None, sigma=None, cotangent=True):
    g = np.asarray(grad_log10, float)
    n = len(g)
    memory = {}
    if units is not None:
        units = np.asarray(units, float)
        memory = {"cell_log10_units": units, "cell_log10": units.max(-1)}
    return dg.Diagnosis(
        grad_log10=g,
        cotangent=cotangent,
        lyapunov=np.asarray(lyap, float),
        eig_jac=np.zeros((n, 2), complex),
        radius_jac=np.full(n, 0.5),
        jac_norm=np.full(n, 0.75),
        sigma_blocks=None if sigma is None else {"net": sigma},
        **memory,
    )


def _score_text(mse, baseline=1 / 6):
    """The verdict's score clause, from the ratio computed here."""
    return f"test MSE {mse:.3f} = {mse / baseline:.3g} x baseline {baseline:.3f} (always answering 1)"


def test_verdict_quotes_the_numbers():
    lags = np.arange(0, 11)  # index L holds lag L, lag 0 first
    rnn = dg.TrainedModel(_diag(-0.5 * lags), test_mse=0.16, seconds=1.0)
    # 4 units: log10 at lag 10 of -0.3, -0.5, -2, -0.9 -> 3 keep more than 10%
    units = np.outer(lags / 10, [-0.3, -0.5, -2.0, -0.9])
    lstm = dg.TrainedModel(_diag(-0.1 * lags, units=units), test_mse=0.01, seconds=2.0)
    v = dg.verdict({"rnn": rnn, "lstm": lstm}, 10)
    assert len(v) == 3
    assert "shrink by about 10^-5.0 over 10 steps" in v[0] and "largest Lyapunov exponent -0.200" in v[0]
    assert ": too little reaches that far to learn dependencies that long; " in v[0]
    assert f"{_score_text(0.16)}; 'learned' needs < 0.1 x baseline: it did not learn the task" in v[0]
    assert "10^-1.0 over the same 10 steps" in v[1] and "best unit 10^-0.3; 3 of 4 units" in v[1]
    assert v[1].endswith(f"{_score_text(0.01)}; 'learned' needs < 0.1 x baseline: it learned the task.")
    assert "about 10^4.0 times the tanh RNN's" in v[2]
    # a short-memory RNN that learned; a lag beyond the curve reads its last entry
    ok = dg.TrainedModel(_diag(-0.1 * lags), test_mse=0.012)
    (line,) = dg.verdict({"rnn": ok}, 50)
    assert "10^-1.0 over 50 steps" in line and line.endswith(
        f"{_score_text(0.012)}; 'learned' needs < 0.1 x baseline: it learned the task."
    )
    assert "too little" not in line


def test_verdict_threshold_is_a_tenth_of_the_baseline():
    """``LEARNED_MSE_RATIO`` = 0.1: the run the issue quotes (test MSE 0.080 against 0.167,
    ratio 0.48, which the old rule of half the baseline called learned) is not learned;
    below 0.1 x is; the threshold is an argument."""
    assert dg.LEARNED_MSE_RATIO == 0.1
    lags = np.arange(0, 11)
    base = dg.TrainedModel(_diag(-0.1 * lags), test_mse=0.080)
    ratio = 0.080 / (1 / 6)
    assert f"{ratio:.3g}" == "0.48"
    for name in ("rnn", "lstm"):
        (line,) = dg.verdict({name: base}, 10)
        assert (
            "test MSE 0.080 = 0.48 x baseline 0.167 (always answering 1); 'learned' needs < 0.1 x baseline"
            in line
        )
        assert "it did not learn the task" in line and "learned the task." not in line
        assert "remembering only one of the two marked values already scores 0.5 x" in line
    for mse in (0.9 * 0.1 / 6, 1.1 * 0.1 / 6, 0.2):  # just below, just above, above the baseline
        (line,) = dg.verdict({"lstm": base._replace(test_mse=mse)}, 10)
        learned = mse / (1 / 6) < 0.1
        assert _score_text(mse) in line
        assert line.endswith("it learned the task.") == learned
        assert ("remembering only one" in line) == (not learned and mse < 1 / 6)
    # the threshold and the baseline are arguments
    (line,) = dg.verdict({"lstm": base}, 10, learned_ratio=0.5)
    assert "'learned' needs < 0.5 x baseline: it learned the task." in line
    (line,) = dg.verdict({"lstm": base._replace(test_mse=0.5)}, 10, baseline=2.0)
    assert "test MSE 0.500 = 0.25 x baseline 2.000; 'learned' needs < 0.1 x baseline" in line
    assert line.endswith(
        "it did not learn the task."
    )  # the notes on always answering 1 are the adding problem's


def test_verdict_without_a_test_score():
    """``test_mse=None`` (not evaluated): the verdict says there is no test score instead of
    crashing, and does not call the model learned or not."""
    lags = np.arange(0, 11)
    units = np.outer(lags / 10, [-0.3, -0.5])
    results = {
        "rnn": dg.TrainedModel(_diag(-0.5 * lags), test_mse=None),
        "lstm": dg.TrainedModel(_diag(-0.1 * lags, units=units), test_mse=None),
    }
    v = dg.verdict(results, 10)
    assert len(v) == 3
    for line in v[:2]:
        assert line.endswith(
            "no test score (the model was not evaluated), so whether it learned the task is not judged."
        )
        assert "test MSE" not in line and "did not learn" not in line
    s = dg.demo_summary(results, v, T=10, steps=5, hidden=4, lag=10)
    assert s["rnn"]["test_mse"] is None and s["rnn"]["mse_ratio"] is None
    assert "| rnn | n/a |" in dg.demo_report(results, v, {}, T=10, steps=5, hidden=4, lag=10)
    assert dg.verdict({}, 10) == []


def test_reports_and_summary():
    lags = np.arange(0, 11)  # index L holds lag L, lag 0 first
    results = {
        "rnn": dg.TrainedModel(_diag(-0.5 * lags, sigma=1.25), 0.16, 1.0),
        "lstm": dg.TrainedModel(_diag(-0.1 * lags, units=np.outer(lags, [-0.05, -0.2])), 0.01, 2.0),
    }
    v = dg.verdict(results, 10)
    md = dg.demo_report(results, v, {}, T=10, steps=5, hidden=4, lag=10)
    assert "| rnn | 0.1600 | 1.0 | -5.00 | -0.2000 | net: 1.250 | 0.500 |" in md
    assert "| lstm | 0.0100 | 2.0 | -1.00 | -0.2000 | n/a | 0.500 |" in md
    assert "most persistent unit): -0.50." in md
    assert all(f"- {line}" in md for line in v)
    assert '(No figures: matplotlib is not installed; pip install "seqjax[plot]".)' in md
    md = dg.demo_report(results, v, {"lyapunov.png": "Lyapunov spectra"}, T=10, steps=5, hidden=4, lag=10)
    assert "### Lyapunov spectra\n\n![Lyapunov spectra](lyapunov.png)" in md and "No figures" not in md
    assert 'a model "learned" the task when its test MSE is below 0.1 x that' in md
    s = dg.demo_summary(results, v, T=10, steps=5, hidden=4, lag=10)
    assert s["learned_mse_ratio"] == 0.1 and s["baseline_mse"] == pytest.approx(1 / 6)
    assert s["rnn"]["mse_ratio"] == pytest.approx(0.16 * 6) and s["lstm"]["mse_ratio"] == pytest.approx(0.06)
    assert s["verdict"] == v and s["rnn"]["grad_log10_at_lag"] == -5.0 and "cell_log10_at_lag" not in s["rnn"]
    assert s["lstm"]["cell_log10_at_lag"] == pytest.approx(-0.5) and s["lstm"]["lyapunov_max"] == -0.2
    lines = dg.spectrum_report(
        results["rnn"].diagnosis, name="rnn", hidden=4, task="adding", T=10, lag=10, figures=["lyapunov.png"]
    )
    assert lines[0] == "# Spectrum report: rnn (4 units) on adding, T = 10"
    assert lines[2] == "- log10 ||dL/ds_(T-L)|| / ||dL/ds_T|| at lag 10: -5.00"
    assert (
        "- sigma_max of each recurrent block: net: 1.250" in lines
        and lines[-1] == "![lyapunov](lyapunov.png)\n"
    )
    lines = dg.spectrum_report(
        _diag(-0.5 * lags, cotangent=False), name="gru", hidden=4, task="copy", T=10, lag=10
    )
    assert lines[2].startswith("- log10 ||ds_T/ds_(T-L)||_2 at lag 10") and not any(
        "sigma" in x for x in lines
    )
    assert lines[-2] == "Lyapunov spectrum: -0.200, -0.500"
