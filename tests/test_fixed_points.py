"""Tests of seqjax.spectrum.fixed_points.

Oracles: the origin of a zero-bias tanh RNN (Jacobian W_h^T, eigenvalues eig(W)); a 1-D map
with a known slow point; a trained 3-bit flip-flop network (fixture made by
scripts/make_flipflop_fixture.py) whose 8 memories must appear as 8 stable fixed points,
checked independently by the readout (all 8 sign patterns) and by iterating the map in NumPy.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj
from seqjax import initializers as inits
from seqjax.cells import Cell
from seqjax.spectrum import find_fixed_points, linearize, sample_states, speed

FIXTURE = pathlib.Path(__file__).parent / "data" / "flipflop_rnn.npz"


def test_origin_of_zero_bias_tanh_rnn(x64):
    H = 6
    cell = sj.rnn(H, bias_init=inits.zeros, recurrent_init=inits.scaled_gaussian(0.8))
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), cell.init(jax.random.key(0), 2))
    starts = 0.5 * jax.random.normal(jax.random.key(1), (16, H), jnp.float64)
    fps = find_fixed_points(cell, p, jnp.zeros(2), starts, steps=300, newton_steps=5)
    assert len(fps) == 1 and fps.num_duplicates == 15
    np.testing.assert_allclose(fps.states[0], 0.0, atol=1e-10)
    assert not fps.slow[0]
    W = np.asarray(p["w_h"])
    np.testing.assert_allclose(fps.jacobians[0], W.T, atol=1e-10)  # diag(tanh'(0)) W^T = W^T
    ref = np.linalg.eigvals(W)
    np.testing.assert_allclose(np.abs(fps.eigenvalues[0]), np.sort(np.abs(ref))[::-1], atol=1e-10)
    np.testing.assert_allclose(np.sort_complex(fps.eigenvalues[0]), np.sort_complex(ref), atol=1e-10)
    assert fps.stable[0] == (np.max(np.abs(ref)) < 1)
    # eigenvectors: J v = lambda v, u^H J = lambda u^H, u^H v = I
    J, w, vr, vl = fps.jacobians[0], fps.eigenvalues[0], fps.right_eigenvectors[0], fps.left_eigenvectors[0]
    np.testing.assert_allclose(J @ vr, vr * w[None, :], atol=1e-10)
    np.testing.assert_allclose(vl.conj().T @ J, w[:, None] * vl.conj().T, atol=1e-10)
    np.testing.assert_allclose(vl.conj().T @ vr, np.eye(H), atol=1e-9)
    assert "fixed point" in str(fps)


def _slow_cell(c):
    """1-D user cell s' = s + s^2 + c: no fixed point for c > 0, a slow point at s = 0 with q = c^2/2."""

    def init(key, input_size):
        return {"c": jnp.asarray([c])}

    def initial_carry(params, batch_shape=()):
        bs = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        return jnp.zeros(bs + (1,), params["c"].dtype)

    def step(params, s, x):
        s_new = s + s**2 + params["c"] + 0.0 * x
        return s_new, s_new

    return Cell(init, initial_carry, step)


def test_slow_point_reported_as_slow(x64):
    c = 1e-3
    cell = _slow_cell(c)
    p = cell.init(None, 1)
    starts = jnp.linspace(-0.3, 0.2, 8).reshape(8, 1)
    fps = find_fixed_points(cell, p, jnp.zeros(1), starts, steps=2000, learning_rate=1e-2, slow_tol=1e-4)
    assert len(fps) == 1
    # q(s) = (s^2 + c)^2 / 2 is minimal at s = 0 with q = c^2 / 2 (Adam reaches ~1e-4 of s)
    np.testing.assert_allclose(fps.states[0], 0.0, atol=1e-3)
    np.testing.assert_allclose(fps.q[0], c**2 / 2, rtol=1e-3)
    assert fps.slow[0]
    np.testing.assert_allclose(speed(cell, p, jnp.zeros((1,)), jnp.zeros(1)), c**2 / 2, rtol=1e-12)
    # a stricter slow_tol rejects it
    none = find_fixed_points(cell, p, jnp.zeros(1), starts, steps=2000, slow_tol=1e-8)
    assert len(none) == 0 and none.num_rejected == 8


@pytest.mark.slow  # a trained network, many Newton solves; the default run keeps the closed-form cases
def test_flipflop_has_8_stable_fixed_points():
    d = np.load(FIXTURE)
    H = d["w_h"].shape[0]
    cell = sj.rnn(H)
    p = {k: jnp.asarray(d[k]) for k in ("w_x", "w_h", "b")}
    # inputs with pulses on every channel so trajectories visit all memories
    key = jax.random.key(1)
    k_on, k_sign = jax.random.split(key)
    on = jax.random.bernoulli(k_on, 0.05, (32, 200, 3))
    xs = jnp.where(on, jnp.where(jax.random.bernoulli(k_sign, 0.5, on.shape), 1.0, -1.0), 0.0)
    starts = sample_states(cell, p, xs, n=256, key=jax.random.key(2), noise=0.05)
    fps = find_fixed_points(cell, p, jnp.zeros(3), starts, steps=200, newton_steps=10, outlier_distance=1.0)
    stable = fps.states[fps.stable & ~fps.slow]
    assert fps.num_stable == 8
    # independent check 1: the readout of the 8 stable points gives the 8 sign patterns
    out = stable @ d["w_out"] + d["b_out"]
    patterns = {tuple(np.sign(o).astype(int)) for o in out}
    assert len(patterns) == 8
    assert np.all(np.abs(out) > 0.5)
    # independent check 2: iterate the map in NumPy from a perturbed point: it returns
    W, Wx, b = (np.asarray(d[k], np.float64) for k in ("w_h", "w_x", "b"))
    rng = np.random.default_rng(0)
    for s in stable:
        h = s + 0.05 * rng.normal(size=H)
        for _ in range(200):
            h = np.tanh(h @ W + b)
        np.testing.assert_allclose(h, s, atol=1e-4)
    # and the unstable ones found are saddles (some eigenvalue outside the unit circle)
    assert np.all(fps.spectral_radius[~fps.stable] >= 1)


@pytest.mark.slow
def test_lstm_fixed_points_pytree_carry_and_linearize():
    cell = sj.lstm(3)
    p = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (4, 30, 2))
    starts = sample_states(cell, p, xs, n=8, key=jax.random.key(2))
    assert starts.shape == (8, 6)
    x = jnp.asarray([0.3, -0.2])
    fps = find_fixed_points(cell, p, x, starts, steps=300, newton_steps=5)
    assert len(fps) >= 1
    assert isinstance(fps.carries, sj.LSTMState) and fps.carries.h.shape == (len(fps), 3)
    # the point is fixed: one step of the cell maps it to itself
    c1, _ = cell.step(p, fps.carries, jnp.broadcast_to(x, (len(fps), 2)))
    np.testing.assert_allclose(c1.h, fps.carries.h, atol=1e-5)
    np.testing.assert_allclose(c1.c, fps.carries.c, atol=1e-5)
    J, w, _, _ = linearize(cell, p, jnp.asarray(fps.states), x)
    np.testing.assert_allclose(J, fps.jacobians, atol=1e-6)


def test_bad_arguments():
    cell = sj.rnn(3)
    p = cell.init(jax.random.key(0), 2)
    with pytest.raises(ValueError, match="x must be"):
        find_fixed_points(cell, p, jnp.zeros((1, 2)), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="fixed_tol"):
        find_fixed_points(cell, p, jnp.zeros(2), jnp.zeros((4, 3)), fixed_tol=1.0, slow_tol=0.1)
    with pytest.raises(ValueError, match="initial_states"):
        find_fixed_points(cell, p, jnp.zeros(2), jnp.zeros((4, 5)))
