"""Tests of seqjax.spectrum.dynamics against closed forms.

Oracles: the Kaplan–Yorke dimension and the sum of the positive exponents of diagonal linear
maps with chosen ``|w_i|`` (exact with the identity frame), written out in NumPy by a plain
loop; per-window values of a diagonal system with known time-varying exponents and their
batch-means standard error (NumPy ``std(ddof=1)/sqrt(n)``); the participation ratio of states
built to have an exact sample covariance with a chosen spectrum, and of a linear RNN whose
stationary covariance solves the discrete Lyapunov equation (NumPy, float64).
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64_enabled

import seqjax as sj
from seqjax.spectrum import lyapunov_from_jacobians
from seqjax.spectrum.dynamics import (
    Estimate,
    entropy_rate,
    kaplan_yorke_dimension,
    participation_ratio,
    participation_ratio_from_states,
)


def ky_reference(lam):
    """Kaplan–Yorke dimension by the textbook loop, and whether the spectrum was too short."""
    lam = np.sort(np.asarray(lam, np.float64))[::-1]
    if lam[0] < 0:
        return 0.0, False
    total = 0.0
    for j, x in enumerate(lam):
        if total + x < 0:
            return j + total / abs(x), False
        total += x
    return float(len(lam)), True


# Constant diagonal maps s_t = diag(w) s_{t-1} with chosen log|w_i| (signs alternate).
CASES = {
    "contracting": np.log([0.9, 0.5, 0.3, 0.1]),  # lambda_1 < 0: D = 0, H = 0
    "D=3.4": [0.3, 0.1, -0.2, -0.5],  # c = 0.3, 0.4, 0.2, -0.3: D = 3 + 0.2/0.5
    "D=2.25": [0.2, -0.1, -0.4, -0.7],  # c = 0.2, 0.1, -0.3: D = 2 + 0.1/0.4
    "D=1.25": [0.05, -0.2, -0.4, -0.7],  # D = 1 + 0.05/0.2
    "unsorted": [-0.5, 0.3, -0.2, 0.1],  # the coordinates out of order: as "D=3.4"
    "expanding": [0.4, 0.2, -0.1, -0.3],  # c_4 = 0.2 >= 0 with k = S: D = S, flagged
    "all positive": [0.3, 0.2, 0.1, 0.05],  # D = S and H flagged too (more exponents may be > 0)
}
T, S, WINDOW = 80, 4, 10
# Two time-varying diagonal systems, log|d_t,i| = a_t,i known; the second is 57 steps long.
A_TV = np.array([0.25, 0.05, -0.15, -0.85]) + np.random.default_rng(0).normal(0.0, 0.3, size=(2, T, S))
LENGTHS = np.array([T] * len(CASES) + [T, 57])


@pytest.fixture(scope="module")
def spectra():
    """One LyapunovSpectrum of all the diagonal systems (identity frame: the window exponents are
    the window means of log|d_t,i|, exactly), windows of 10 steps; one compilation."""
    logd = np.concatenate(
        [np.broadcast_to(np.array(list(CASES.values()))[:, None], (len(CASES), T, S)), A_TV]
    )
    d = np.exp(logd) * np.array([1.0, -1.0, 1.0, -1.0])
    with x64_enabled():
        J = jnp.asarray(np.einsum("btk,kl->btkl", d, np.eye(S)))
        spec = lyapunov_from_jacobians(J, window=WINDOW, lengths=jnp.asarray(LENGTHS), frame=jnp.eye(S))
    return spec


def test_closed_form_for_chosen_exponents(spectra):
    with x64_enabled():
        ky, h = kaplan_yorke_dimension(spectra), entropy_rate(spectra)
    assert isinstance(ky, Estimate) and isinstance(h, Estimate)
    chex.assert_shape((ky.value, ky.mean, ky.stderr, ky.truncated, h.value), (len(LENGTHS),))
    chex.assert_shape((ky.per_window, h.per_window), (len(LENGTHS), T // WINDOW))
    for b, (name, logw) in enumerate(CASES.items()):
        want_d, cut = ky_reference(logw)
        want_h = np.sum(np.maximum(logw, 0.0))
        chex.assert_trees_all_close(
            (ky.value[b], ky.mean[b], ky.per_window[b]), (want_d, want_d, np.full(8, want_d)), atol=1e-12
        )
        chex.assert_trees_all_close(
            (h.value[b], h.mean[b], h.per_window[b]), (want_h, want_h, np.full(8, want_h)), atol=1e-12
        )
        chex.assert_trees_all_close((ky.stderr[b], h.stderr[b]), (0.0, 0.0), atol=1e-12)  # windows alike
        assert bool(ky.truncated[b]) == cut == (name in ("expanding", "all positive")), name
        assert bool(h.truncated[b]) == (name == "all positive"), name
    np.testing.assert_allclose(ky.value[:7], [0.0, 3.4, 2.25, 1.25, 3.4, 4.0, 4.0], atol=1e-12)


def test_truncated_spectrum_is_flagged_not_extrapolated(spectra):
    """The top 3 exponents of "D=3.4" (0.3, 0.1, -0.2): c_3 = 0.2 >= 0, so D >= 3 and no more is
    known (3, flagged), while H = 0.3 + 0.1 is complete (lambda_3 < 0). Computed inside a user's jit."""
    b = list(CASES).index("D=3.4")
    with x64_enabled():
        top3 = dataclasses.replace(
            spectra, exponents=spectra.exponents[..., :3], finite_time=spectra.finite_time[..., :3]
        )
        ky, h = jax.jit(lambda s: (kaplan_yorke_dimension(s), entropy_rate(s)))(top3)
    np.testing.assert_allclose((ky.value[b], ky.mean[b]), (3.0, 3.0))
    assert bool(ky.truncated[b]) and not bool(h.truncated[b])
    np.testing.assert_allclose(h.value[b], 0.4, atol=1e-12)


def test_error_bars_from_windows_with_known_time_varying_exponents(spectra):
    """Per-window values, their mean and batch-means standard error against NumPy from the known
    window exponents; the shorter sequence's unfilled windows are NaN and left out."""
    with x64_enabled():
        ky, h = kaplan_yorke_dimension(spectra), entropy_rate(spectra)
    reordered = False
    for i, b in enumerate(range(len(CASES), len(LENGTHS))):
        n = LENGTHS[b] // WINDOW  # 8 and 5 complete windows
        windows = A_TV[i, : n * WINDOW].reshape(n, WINDOW, S).mean(1)  # the finite-time exponents
        pooled = windows.mean(0)
        reordered |= bool(np.any(np.argsort(-windows, axis=-1) != np.argsort(-pooled)))
        for est, q, cut in (
            (ky, lambda x: ky_reference(x)[0], lambda x: ky_reference(x)[1]),
            (h, lambda x: np.sum(np.maximum(x, 0)), lambda x: bool(np.min(x) > 0)),
        ):
            per = np.array([q(x) for x in windows])
            np.testing.assert_allclose(est.per_window[b, :n], per, atol=1e-12)
            assert np.all(np.isnan(est.per_window[b, n:]))
            np.testing.assert_allclose(est.mean[b], per.mean(), atol=1e-12)
            np.testing.assert_allclose(est.stderr[b], per.std(ddof=1) / np.sqrt(n), atol=1e-12)
            np.testing.assert_allclose(est.value[b], q(pooled), atol=1e-12)
            assert bool(est.truncated[b]) == (cut(pooled) or any(cut(x) for x in windows))
    assert reordered  # some window orders the exponents differently: the per-window sort matters


def test_single_window_stderr_is_inf_and_models_give_dicts(spectra):
    with x64_enabled():
        ft = spectra.finite_time
        one = dataclasses.replace(spectra, finite_time=ft.at[:, 1:].set(jnp.nan))  # one complete window
        ky = kaplan_yorke_dimension(one)
        both = entropy_rate({"a": spectra, "b": one})  # a whole model's dict of spectra
    assert np.all(np.isinf(ky.stderr)) and np.all(np.isfinite(ky.value))
    np.testing.assert_allclose(ky.mean, ky.per_window[:, 0])
    assert list(both) == ["a", "b"] and isinstance(both["b"], Estimate)
    with pytest.raises(TypeError, match="LyapunovSpectrum"):
        entropy_rate(jnp.ones(4))


def _states_with_spectrum(mu, N, seed):
    """N states whose sample covariance is exactly U diag(mu) U^T (centred orthonormal scores)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, len(mu)))
    Z, _ = np.linalg.qr(X - X.mean(0))  # orthonormal columns, each orthogonal to the ones vector
    U, _ = np.linalg.qr(rng.normal(size=(len(mu), len(mu))))
    return 3.0 + np.sqrt(N) * Z * np.sqrt(mu) @ U.T


def test_participation_ratio_of_states_with_a_chosen_covariance_spectrum():
    mu = np.array([4.0, 2.0, 1.0, 0.5, 0.0])
    want = mu.sum() ** 2 / (mu**2).sum()
    with x64_enabled():
        states = _states_with_spectrum(mu, 200, 0)
        np.testing.assert_allclose(participation_ratio_from_states(jnp.asarray(states)), want, rtol=1e-12)
        # per sequence with a mask: the masked states (huge values) must not count
        other = _states_with_spectrum(np.array([1.0, 1.0, 1.0, 0.0, 0.0]), 150, 1)
        batch = np.stack([states, np.concatenate([other, np.full((50, 5), 1e6)])])
        mask = np.arange(200)[None, :] < np.array([200, 150])[:, None]
        pr = participation_ratio_from_states(jnp.asarray(batch), mask=jnp.asarray(mask), per_sequence=True)
        np.testing.assert_allclose(pr, [want, 3.0], rtol=1e-12)


def _numpy_pr(states, mask):
    """PR from the eigenvalues of the sample covariance of the masked states (NumPy, float64)."""
    x = states[mask]
    mu = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    return mu.sum() ** 2 / (mu**2).sum()


def test_participation_ratio_of_a_linear_rnn_matches_the_stationary_covariance():
    """h_t = h_{t-1} W_h + x_t W_x with white-noise x: the stationary covariance solves
    Sigma = A Sigma A^T + W_x^T W_x, A = W_h^T (discrete Lyapunov equation, NumPy kron solve).
    Padded sequences: the cell path equals NumPy's PR of the states it should use, exactly."""
    H, I, B, T, warmup = 4, 3, 8, 6000, 50
    rng = np.random.default_rng(2)
    w_h = np.array([[0.8, 0.3, 0.0, 0.0], [0.0, 0.5, 0.2, 0.0], [0.0, 0.0, -0.4, 0.1], [0.1, 0.0, 0.0, 0.2]])
    w_x = rng.normal(size=(I, H)) * np.array([1.0, 0.6, 0.3, 0.1])
    A, Q = w_h.T, w_x.T @ w_x
    sigma = np.linalg.solve(np.eye(H * H) - np.kron(A, A), Q.reshape(-1)).reshape(H, H)
    mu = np.linalg.eigvalsh(sigma)
    stationary = mu.sum() ** 2 / (mu**2).sum()

    xs = rng.normal(size=(B, T, I))
    lengths = np.array([T, T - 1000, T, T - 2500, T, T, 300, T])
    states, h = np.zeros((B, T, H)), np.zeros((B, H))
    for t in range(T):
        h = h @ w_h + xs[:, t] @ w_x
        states[:, t] = h
    steps = np.arange(T)[None, :]
    use = (steps < lengths[:, None]) & (steps >= warmup)
    cell = sj.rnn(H, activation="identity")
    with x64_enabled():
        p = {"w_h": jnp.asarray(w_h), "w_x": jnp.asarray(w_x), "b": jnp.zeros(H)}
        pr = participation_ratio(cell, p, jnp.asarray(xs), warmup=warmup, lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(pr, _numpy_pr(states, use), rtol=1e-10)
    np.testing.assert_allclose(pr, stationary, rtol=0.03)  # sampling error of ~40,000 correlated states


def test_participation_ratio_arguments_are_checked():
    with pytest.raises(ValueError, match="mask has shape"):
        participation_ratio_from_states(jnp.ones((3, 5, 2)), mask=jnp.ones((3, 4), bool))
    with pytest.raises(ValueError, match="states must be"):
        participation_ratio_from_states(jnp.ones(5))
    p = {"w_x": jnp.zeros((2, 3)), "w_h": jnp.zeros((3, 3)), "b": jnp.zeros(3)}
    with pytest.raises(ValueError, match="warmup"):
        participation_ratio(sj.rnn(3), p, jnp.ones((2, 10, 2)), warmup=-1)


@pytest.mark.slow
def test_whole_models_give_one_result_per_core():
    """A bidirectional model: the forward core equals the cell on xs, the backward core the cell
    on each sequence reversed within its length (what recurrent_cores says it reads)."""
    model = sj.many_to_one(sj.bidirectional(sj.rnn(5)), sj.dense(1))
    params = model.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (3, 120, 2))
    lengths = jnp.array([120, 90, 60])
    out = participation_ratio(model, params, xs, lengths=lengths, warmup=10, per_sequence=True)
    assert list(out) == ["body.fwd", "body.bwd"]
    cell, body = sj.rnn(5), params["body"]
    fwd = participation_ratio(cell, body["fwd"], xs, lengths=lengths, warmup=10, per_sequence=True)
    np.testing.assert_allclose(out["body.fwd"], fwd, rtol=1e-6)
    for b, n in enumerate([120, 90, 60]):
        rev = participation_ratio(cell, body["bwd"], xs[b, :n][::-1], warmup=10)
        np.testing.assert_allclose(out["body.bwd"][b], rev, rtol=1e-5)
