"""Each initialiser against the property it promises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj
from seqjax import initializers as si

KEY = jax.random.key(0)


def test_orthogonal_per_gate_block():
    H = 16
    w = np.asarray(si.orthogonal(gates=4)(KEY, (H, 4 * H)), np.float64)
    for k in range(4):
        blk = w[:, k * H : (k + 1) * H]
        np.testing.assert_allclose(blk.T @ blk, np.eye(H), atol=1e-5)  # float32 rounding
    # the contrast the docstring promises: one orthogonal matrix over the whole (H, 4H)
    # kernel leaves each gate block with singular values below 1 (about 1/2 on average)
    whole = np.asarray(jax.nn.initializers.orthogonal()(KEY, (H, 4 * H)), np.float64)
    assert np.linalg.svd(whole[:, :H], compute_uv=False).max() < 1.0 - 1e-3


def test_orthogonal_gain_and_lstm_usage():
    H = 8
    cell = sj.lstm(H, recurrent_init=si.orthogonal(gain=0.5, gates=4))
    w = np.asarray(cell.init(KEY, 3)["w_h"], np.float64)
    for k in range(4):
        s = np.linalg.svd(w[:, k * H : (k + 1) * H], compute_uv=False)
        np.testing.assert_allclose(s, 0.5, atol=1e-5)


def test_identity_per_block():
    w = si.identity(gain=0.7, gates=3)(KEY, (4, 12))
    np.testing.assert_allclose(w, np.tile(np.float32(0.7) * np.eye(4, dtype=np.float32), (1, 3)))
    with pytest.raises(ValueError, match="square"):
        si.identity()(KEY, (4, 6))


def test_pytorch_uniform_bounds_and_variance():
    H = 64
    w = np.asarray(si.pytorch_uniform(H)(KEY, (400, 400)))
    bound = 1 / np.sqrt(H)
    assert np.abs(w).max() <= bound
    # variance of U(-a, a) is a^2/3; 160,000 samples: relative std error ~ 0.3%
    np.testing.assert_allclose(w.var(), bound**2 / 3, rtol=0.02)


def test_glorot_uniform_per_block_variance():
    fan_in, width = 300, 200
    w = np.asarray(si.glorot_uniform(gates=2)(KEY, (fan_in, 2 * width)))
    a = np.sqrt(6 / (fan_in + width))
    assert np.abs(w).max() <= a
    np.testing.assert_allclose(w.var(), a**2 / 3, rtol=0.02)


@pytest.mark.parametrize("gain", [0.5, 1.5])
def test_scaled_gaussian_variance_and_circular_law(gain):
    H = 400
    w = np.asarray(si.scaled_gaussian(gain)(KEY, (H, H)), np.float64)
    np.testing.assert_allclose(w.var(), gain**2 / H, rtol=0.02)  # 160,000 samples
    rho = np.abs(np.linalg.eigvals(w)).max()
    np.testing.assert_allclose(rho, gain, rtol=0.1)  # circular law: radius -> gain as H grows


def test_spectral_radius_rescaling():
    H = 20
    w = si.with_spectral_radius(1.3)(KEY, (H, H))
    np.testing.assert_allclose(np.abs(np.linalg.eigvals(np.asarray(w, np.float64))).max(), 1.3, rtol=1e-5)
    w2 = si.rescale_spectral_radius(jnp.asarray(np.diag(np.arange(1.0, H + 1)), jnp.float32), 2.0)
    np.testing.assert_allclose(np.diag(w2), np.arange(1.0, H + 1) * 2.0 / H, rtol=1e-6)
    np.testing.assert_allclose(si.spectral_radius(w2), 2.0, rtol=1e-6)
    # per gate block, on a GRU recurrent kernel
    wg = np.asarray(si.with_spectral_radius(0.9, gates=3)(KEY, (H, 3 * H)), np.float64)
    for k in range(3):
        np.testing.assert_allclose(
            np.abs(np.linalg.eigvals(wg[:, k * H : (k + 1) * H])).max(), 0.9, rtol=1e-5
        )


def test_uniform_and_constant():
    w = np.asarray(si.uniform(0.25)(KEY, (1000,)))
    assert w.min() >= -0.25 and w.max() <= 0.25 and w.min() < -0.2 and w.max() > 0.2
    np.testing.assert_array_equal(si.constant(3.0)(KEY, (2, 2)), 3.0 * np.ones((2, 2)))


def test_bad_block_shapes():
    with pytest.raises(ValueError, match="gates=3"):
        si.orthogonal(gates=3)(KEY, (4, 8))
    with pytest.raises(ValueError, match="square"):
        si.spectral_radius(jnp.ones((2, 3)))
