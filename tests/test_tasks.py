"""Tests of seqjax.tasks: documented shapes, dtypes, generators and closed-form baselines.

(The models trained on these tasks are tested with the benchmark suite that holds them:
``tests/test_benchmarks.py``.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import tasks as T

# --------------------------------------------------------------------------- adding problem


def test_adding_problem_structure():
    n, L = 256, 20
    xs, ys = T.adding_problem(jax.random.key(0), n, L)
    assert xs.shape == (n, L, 2) and xs.dtype == jnp.float32
    assert ys.shape == (n,) and ys.dtype == jnp.float32
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    v, m = x[..., 0], x[..., 1]
    assert (v >= 0).all() and (v < 1).all()
    assert set(np.unique(m)) == {0.0, 1.0}
    assert (m[:, : L // 2].sum(1) == 1).all() and (m[:, L // 2 :].sum(1) == 1).all()
    np.testing.assert_allclose(y, (v * m).sum(1), rtol=1e-6)  # float32 sum of two values
    again = T.adding_problem(jax.random.key(0), n, L)
    assert np.array_equal(np.asarray(again[0]), np.asarray(xs))
    with pytest.raises(ValueError, match="length"):
        T.adding_problem(jax.random.key(0), 4, 1)


def test_adding_problem_baseline_is_one_sixth():
    # always-1 predictor: (S - 1)^2 with S - 1 triangular on [-1, 1]: mean 1/6 and
    # Var = E[Z^4] - 1/36 = 1/15 - 1/36 = 7/180, so the standard error with n samples is
    # sqrt(7/180/n); allow 4 standard errors.
    n = 20000
    _, ys = T.adding_problem(jax.random.key(1), n, 10)
    mse = float(np.mean((1.0 - np.asarray(ys, np.float64)) ** 2))
    se = math.sqrt(7 / 180 / n)
    assert abs(mse - 1 / 6) < 4 * se, (mse, se)
    assert T.ADDING_BASELINE_MSE == 1 / 6


# --------------------------------------------------------------------------- copy task


def test_copy_task_structure():
    n, L, D, K = 64, 5, 7, 4
    xs, ys = T.copy_task(jax.random.key(0), n, length=L, delay=D, num_symbols=K)
    assert xs.shape == (n, D + 2 * L, K + 2) and xs.dtype == jnp.float32
    assert ys.shape == (n, D + 2 * L) and ys.dtype == jnp.int32
    tok = np.argmax(np.asarray(xs), -1)
    assert np.array_equal(np.asarray(xs).sum(-1), np.ones((n, D + 2 * L)))  # one-hot
    sym = tok[:, :L]
    assert (sym >= 1).all() and (sym <= K).all()
    assert (
        (tok[:, L : L + D - 1] == 0).all()
        and (tok[:, L + D - 1] == K + 1).all()
        and (tok[:, L + D :] == 0).all()
    )
    y = np.asarray(ys)
    assert (y[:, : D + L] == 0).all() and np.array_equal(y[:, D + L :], sym)


def test_copy_task_memoryless_baseline():
    # The best memoryless predictor uses only the position: estimate its per-position
    # target distribution on one sample and score it on another. Its cross-entropy per step
    # must match L ln K / (D + 2L). Sampling error: on the recalled steps, -log p_hat(s)
    # with p_hat from 8000 sequences deviates from ln K by O(sqrt(K/8000)) ~ 0.03 per
    # position; averaged over 4000 test sequences and L positions, and divided by
    # (D+2L)/L, the error is well below the 0.01 tolerance (plus a (K-1)/(2n) bias ~ 4e-4).
    L, D, K = 6, 10, 5
    _, ya = T.copy_task(jax.random.key(0), 8000, length=L, delay=D, num_symbols=K)
    _, yb = T.copy_task(jax.random.key(1), 4000, length=L, delay=D, num_symbols=K)
    ya, yb = np.asarray(ya), np.asarray(yb)
    steps = D + 2 * L
    probs = np.stack([np.bincount(ya[:, t], minlength=K + 2) / len(ya) for t in range(steps)])  # (T, K+2)
    ce = -np.mean(np.log(probs[np.arange(steps)[None, :], yb]))
    assert abs(ce - T.copy_task_baseline(L, D, K)) < 0.01, (ce, T.copy_task_baseline(L, D, K))
    acc = np.mean(np.argmax(probs, -1)[None, D + L :] == yb[:, D + L :])
    assert abs(acc - 1 / K) < 0.03  # binomial, n = 24000: sd ~ 0.003 for one fixed guess
    assert T.copy_task_baseline(10, 100, 8) == pytest.approx(10 * math.log(8) / 120)


# --------------------------------------------------------------------------- digits


def test_digits_rows_and_pixels():
    pytest.importorskip("sklearn")
    rows = T.digits(mode="rows", seed=0)
    pix = T.digits(mode="pixels", seed=0)
    assert rows.x_train.shape == (1348, 8, 8) and rows.x_test.shape == (449, 8, 8)
    assert pix.x_train.shape == (1348, 64, 1) and pix.x_test.shape == (449, 64, 1)
    assert rows.x_train.dtype == np.float32 and rows.y_train.dtype == np.int32
    assert rows.x_train.min() >= 0 and rows.x_train.max() == 1.0
    assert np.array_equal(pix.x_train.reshape(-1, 8, 8), rows.x_train) and np.array_equal(
        pix.y_test, rows.y_test
    )
    assert set(np.unique(rows.y_train)) == set(range(10))
    from sklearn.datasets import load_digits

    d = load_digits()  # the split is a permutation of the original data
    assert sorted(np.concatenate([rows.y_train, rows.y_test]).tolist()) == sorted(d.target.tolist())
    majority = np.bincount(rows.y_train).argmax()
    assert np.mean(rows.y_test == majority) < 0.15  # ten nearly balanced classes


# --------------------------------------------------------------------------- sunspots


def test_sunspots_split_and_ar_matches_statsmodels():
    pytest.importorskip("statsmodels")
    from statsmodels.tsa.ar_model import AutoReg

    d = T.sunspots()
    assert d.years[0] == 1700 and d.years[-1] == 2008 and d.values.dtype == np.float32
    assert d.n_train == 221 and d.years[d.n_train - 1] == 1920 and d.years[d.n_test_end - 1] == 1955
    assert d.values[: d.n_train].max() == 1.0
    x = d.values[: d.n_train].astype(np.float64)
    coef = T.ar_fit(x, 9)
    ref = AutoReg(x, lags=9, trend="c").fit().params
    np.testing.assert_allclose(coef, ref, rtol=1e-8, atol=1e-10)  # both OLS in float64
    pred = T.ar_predict(coef, x)
    np.testing.assert_allclose(pred, AutoReg(x, lags=9, trend="c").fit().fittedvalues, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- characters


def test_char_corpus_roundtrip_windows_and_baseline():
    c = T.char_corpus(modules=("textwrap", "bisect"))
    text = T.stdlib_text(("textwrap", "bisect"))
    assert "".join(c.vocab[i] for i in np.concatenate([c.train, c.valid])) == text
    assert list(c.vocab) == sorted(set(text)) and c.train.dtype == np.int32
    assert "Python 3" in c.source
    x, y = T.char_windows(c.train, 16)
    assert x.shape == y.shape == ((len(c.train) - 1) // 16, 16) and x.dtype == np.int32
    assert np.array_equal(x.ravel()[1:], y.ravel()[:-1])
    V = len(c.vocab)
    counts = np.bincount(c.train, minlength=V) + 1.0
    want = -np.mean(np.log2(counts[c.valid] / counts.sum()))
    assert T.unigram_bits_per_char(c.train, c.valid, V) == pytest.approx(want)
    assert T.unigram_bits_per_char(c.train, c.valid, V) < math.log2(V)  # beats uniform


def test_bits_per_char_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tg = rng.integers(0, 7, (2, 5)).astype(np.int32)
    lp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    want = -np.mean(np.take_along_axis(lp, tg[..., None], -1)) / np.log(2)
    np.testing.assert_allclose(float(T.bits_per_char(jnp.asarray(logits), tg)), want, rtol=1e-5)  # float32
    assert float(T.bits_per_char(jnp.zeros((3, 4, 16)), np.zeros((3, 4), np.int32))) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="integer"):
        T.bits_per_char(jnp.zeros((3, 4, 16)), np.zeros((3, 4), np.float32))


def test_tasks_is_data_only():
    """seqjax.tasks holds data and untrained baselines: it imports nothing that runs or trains
    a model."""
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(T.__file__).read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    seqjax_mods = {m for m in mods if m.split(".")[0] == "seqjax"}
    assert seqjax_mods <= {"seqjax._util"}, seqjax_mods
