"""Masked losses (seqjax.losses) against float64 NumPy formulas, and exact invariance to
whatever sits in padded positions (losses and gradients compared with ``==``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.losses import accuracy, mse, softmax_cross_entropy, weights_from

B, T, C = 3, 5, 4
LENGTHS = np.array([5, 2, 0])  # includes an empty sequence


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, C))
    labels = rng.integers(0, C, size=(B, T))
    return logits, labels


def test_cross_entropy_matches_numpy(x64):
    logits, labels = _data()
    valid = np.arange(T)[None, :] < LENGTHS[:, None]
    nll = -np.take_along_axis(_np_log_softmax(logits), labels[..., None], -1)[..., 0]
    ref_sum = (nll * valid).sum()
    got = softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), lengths=jnp.asarray(LENGTHS))
    np.testing.assert_allclose(float(got), ref_sum / valid.sum(), rtol=1e-13)
    got_sum = softmax_cross_entropy(logits, labels, mask=valid, reduction="sum")
    np.testing.assert_allclose(float(got_sum), ref_sum, rtol=1e-13)
    per = softmax_cross_entropy(logits, labels, mask=valid, reduction="none")
    np.testing.assert_allclose(np.asarray(per), nll * valid, rtol=1e-13, atol=0)
    # ignore_index drops exactly those positions
    lab2 = np.where(valid, labels, -100)
    got_ign = softmax_cross_entropy(logits, jnp.asarray(lab2), ignore_index=-100)
    np.testing.assert_allclose(float(got_ign), ref_sum / valid.sum(), rtol=1e-13)


def test_mse_matches_numpy(x64):
    rng = np.random.default_rng(1)
    p, y = rng.normal(size=(B, T, 2)), rng.normal(size=(B, T, 2))
    valid = np.arange(T)[None, :] < LENGTHS[:, None]
    sq = (p - y) ** 2 * valid[..., None]
    got = mse(p, y, lengths=LENGTHS)
    np.testing.assert_allclose(float(got), sq.sum() / (valid.sum() * 2), rtol=1e-13)  # torch MSELoss on valid
    np.testing.assert_allclose(float(mse(p, y, mask=valid, reduction="sum")), sq.sum(), rtol=1e-13)
    entry = rng.random((B, T, 2)) > 0.5  # per-entry mask
    np.testing.assert_allclose(
        float(mse(p, y, mask=entry)), ((p - y) ** 2 * entry).sum() / entry.sum(), rtol=1e-13
    )


def _corrupt(a, valid, fill):
    """Same array with every padded position replaced by ``fill`` values."""
    v = valid.reshape(valid.shape + (1,) * (a.ndim - valid.ndim))
    return jnp.where(jnp.asarray(v), a, fill)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_ignores_padding_exactly(reduction):
    logits, labels = (jnp.asarray(a) for a in _data(2))
    logits = logits.astype(jnp.float32)
    lengths = jnp.asarray(LENGTHS)
    valid = np.arange(T)[None, :] < LENGTHS[:, None]

    def f(z, lab):
        out = softmax_cross_entropy(z, lab, lengths=lengths, reduction=reduction)
        return jnp.sum(out * jnp.arange(1, out.size + 1).reshape(out.shape)) if reduction == "none" else out

    vg = jax.jit(jax.value_and_grad(f))
    l0, g0 = vg(logits, labels)
    for fill_z, fill_y in [(1e30, -100), (jnp.nan, 10**6), (-jnp.inf, 3)]:
        l1, g1 = vg(_corrupt(logits, valid, fill_z), _corrupt(labels, valid, fill_y))
        assert np.array_equal(np.asarray(l0), np.asarray(l1))  # bitwise
        assert np.array_equal(np.asarray(g0), np.asarray(g1))
    assert np.all(np.asarray(g0)[~valid] == 0) and np.any(np.asarray(g0)[valid] != 0)


def test_mse_ignores_padding_exactly():
    rng = np.random.default_rng(3)
    p, y = (jnp.asarray(rng.normal(size=(B, T, 2)), jnp.float32) for _ in range(2))
    valid = np.arange(T)[None, :] < LENGTHS[:, None]
    vg = jax.jit(jax.value_and_grad(lambda a, b: mse(a, b, mask=jnp.asarray(valid)), argnums=(0, 1)))
    l0, g0 = vg(p, y)
    l1, g1 = vg(_corrupt(p, valid, jnp.inf), _corrupt(y, valid, jnp.nan))
    assert np.array_equal(np.asarray(l0), np.asarray(l1))
    for a, b in zip(g0, g1):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.all(np.asarray(g0[0])[~valid] == 0)


def test_all_masked_gives_zero_loss_and_gradient():
    logits, labels = _data(4)
    z = jnp.asarray(logits, jnp.float32)
    loss, g = jax.value_and_grad(lambda a: softmax_cross_entropy(a, labels, mask=jnp.zeros((B, T), bool)))(z)
    assert float(loss) == 0.0 and np.all(np.asarray(g) == 0)


def test_many_to_one_shapes_and_accuracy():
    logits = jnp.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    labels = jnp.array([0, 2])
    np.testing.assert_allclose(float(accuracy(logits, labels)), 0.5)
    ref = -np.mean([_np_log_softmax(np.asarray(logits))[i, int(labels[i])] for i in range(2)])
    np.testing.assert_allclose(float(softmax_cross_entropy(logits, labels)), ref, rtol=1e-6)
    lg, lb = _data(5)
    np.testing.assert_allclose(
        float(accuracy(lg, lb, lengths=LENGTHS)),
        ((lg.argmax(-1) == lb) * (np.arange(T) < LENGTHS[:, None])).sum() / LENGTHS.sum(),
        rtol=1e-6,
    )


def test_bad_shapes_raise():
    logits, labels = _data()
    with pytest.raises(ValueError, match="labels has shape"):
        softmax_cross_entropy(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="integers"):
        softmax_cross_entropy(logits, labels.astype(float))
    with pytest.raises(ValueError, match="lengths has shape"):
        softmax_cross_entropy(logits, labels, lengths=np.array([1, 2]))
    with pytest.raises(ValueError, match="mask has shape"):
        mse(logits, logits, mask=np.ones((B,), bool))
    with pytest.raises(ValueError, match="reduction"):
        mse(logits, logits, reduction="avg")
    assert weights_from((2, 3)).shape == (2, 3)
