"""Every built-in cell against a float64 NumPy loop written from its equations.

Compared in float64 (x64 fixture) so the only differences are rounding: tolerance 1e-10
relative, far above float64 epsilon accumulated over T = 6 steps of O(H) sums.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import seqjax as sj

B, T, I, H = 3, 6, 4, 5
RTOL, ATOL = 1e-10, 1e-12


def _xs(seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (B, T, I), dtype)


def _f64(params):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)


def _unroll(cell, params, xs, **kw):
    """``sj.unroll`` under ``jax.jit``: one compile (eagerly, the ops around the scan compile one by one)."""
    return jax.jit(lambda p, x, kw: sj.unroll(cell, p, x, **kw))(params, xs, kw)


def _random_params(params, seed=1, scale=0.7):
    """Replace every leaf by N(0, scale^2) entries so no weight is special (e.g. zero biases)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [scale * jax.random.normal(k, leaf.shape, jnp.float64) for k, leaf in zip(keys, leaves)]
    )


@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu", "identity"])
@pytest.mark.parametrize("hidden_bias", [False, True])
def test_rnn_matches_numpy(x64, activation, hidden_bias):
    cell = sj.rnn(H, activation=activation, hidden_bias=hidden_bias)
    params = _random_params(cell.init(jax.random.key(0), I))
    xs = _xs()
    h0 = 0.5 * jax.random.normal(jax.random.key(2), (B, H), jnp.float64)
    hT, ys = _unroll(cell, params, xs, carry=h0)
    hT_ref, ys_ref = ref.run_h(
        ref.rnn_step, ref.np_params(params), np.asarray(xs), np.asarray(h0), activation=activation
    )
    np.testing.assert_allclose(ys, ys_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(hT, hT_ref, rtol=RTOL, atol=ATOL)


def test_rnn_callable_activation(x64):
    cell = sj.rnn(H, activation=jnp.sin)
    params = _random_params(cell.init(jax.random.key(0), I))
    xs = _xs()
    _, ys = _unroll(cell, params, xs)
    p = ref.np_params(params)
    h = np.zeros((B, H))
    for t in range(T):
        h = np.sin(np.asarray(xs[:, t]) @ p["w_x"] + h @ p["w_h"] + p["b"])
        np.testing.assert_allclose(ys[:, t], h, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("hidden_bias", [False, True])
def test_lstm_matches_numpy(x64, proj_size, hidden_bias):
    cell = sj.lstm(H, proj_size=proj_size, hidden_bias=hidden_bias)
    params = _random_params(cell.init(jax.random.key(0), I))
    xs = _xs()
    P = proj_size or H
    carry0 = sj.LSTMState(
        0.5 * jax.random.normal(jax.random.key(3), (B, P), jnp.float64),
        0.5 * jax.random.normal(jax.random.key(4), (B, H), jnp.float64),
    )
    final, ys = _unroll(cell, params, xs, carry=carry0)
    p = ref.np_params(params)
    h, c = np.asarray(carry0.h), np.asarray(carry0.c)
    for t in range(T):
        h, c = ref.lstm_step(p, h, c, np.asarray(xs[:, t]))
        np.testing.assert_allclose(ys[:, t], h, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(final.h, h, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(final.c, c, rtol=RTOL, atol=ATOL)
    assert ys.shape == (B, T, P)


def test_lstm_forget_bias_init():
    cell = sj.lstm(H, forget_bias=1.0, bias_init=sj.initializers.zeros)
    b = cell.init(jax.random.key(0), I)["b"]
    np.testing.assert_array_equal(b[H : 2 * H], np.ones(H))
    np.testing.assert_array_equal(np.delete(np.asarray(b), np.s_[H : 2 * H]), np.zeros(3 * H))


@pytest.mark.parametrize(
    "name, make, step",
    [
        ("gru", lambda: sj.gru(H), ref.gru_step),
        ("mgu", lambda: sj.mgu(H), ref.mgu_step),
        ("janet", lambda: sj.janet(H), ref.janet_step),
        ("janet_beta0", lambda: sj.janet(H, beta=0.0), lambda p, h, x: ref.janet_step(p, h, x, beta=0.0)),
    ],
)
def test_gated_cells_match_numpy(x64, name, make, step):
    cell = make()
    params = _random_params(cell.init(jax.random.key(0), I))
    xs = _xs()
    h0 = 0.5 * jax.random.normal(jax.random.key(2), (B, H), jnp.float64)
    hT, ys = _unroll(cell, params, xs, carry=h0)
    hT_ref, ys_ref = ref.run_h(step, ref.np_params(params), np.asarray(xs), np.asarray(h0))
    np.testing.assert_allclose(ys, ys_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(hT, hT_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("K", [1, 3])
def test_tdnn_matches_numpy(x64, K):
    cell = sj.tdnn(H, K)
    params = _random_params(cell.init(jax.random.key(0), I))
    xs = _xs()
    window, ys = _unroll(cell, params, xs)
    np.testing.assert_allclose(
        ys, ref.tdnn_run(ref.np_params(params), np.asarray(xs), K), rtol=RTOL, atol=ATOL
    )
    # the carry is the window of the K-1 most recent inputs, oldest first
    np.testing.assert_array_equal(
        window, np.asarray(xs)[:, T - (K - 1) :, :] if K > 1 else np.zeros((B, 0, I))
    )


@pytest.mark.parametrize("K, L", [(1, 1), (3, 2)])
def test_narx_matches_numpy(x64, K, L):
    O = 2
    cell = sj.narx(O, K, output_window=L)
    params = _random_params(cell.init(jax.random.key(0), I))
    xs = _xs()
    final, ys = _unroll(cell, params, xs)
    ys_ref = ref.narx_run(ref.np_params(params), np.asarray(xs), K, L)
    np.testing.assert_allclose(ys, ys_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(final.y, ys_ref[:, T - L :, :], rtol=RTOL, atol=ATOL)


def test_irnn_initialisation():
    cell = sj.irnn(H, gain=0.9)
    p = cell.init(jax.random.key(0), I)
    np.testing.assert_array_equal(p["w_h"], np.float32(0.9) * np.eye(H, dtype=np.float32))
    np.testing.assert_array_equal(p["b"], np.zeros(H))
    assert cell.meta.option("activation") == "relu"
    # input weights are small Gaussians, std 1e-3 (loose bound: 20 entries)
    assert 0 < float(jnp.std(p["w_x"])) < 5e-3
