"""Elman, LSTM and GRU equal Flax linen's SimpleCell, LSTMCell/OptimizedLSTMCell and GRUCell
run by ``flax.linen.RNN``, given the same weights.

Weight mapping: Flax keeps one Dense per gate (``ii``, ``hi``, ...) with kernels ``(in, H)``;
seqjax fuses them column-wise in the same gate order. Flax's LSTM carry is ``(c, h)``;
seqjax's is ``LSTMState(h, c)``. Flax's GRU has biases on the input side for ``r, z``
and on both sides for ``n`` (``hn`` sits inside the reset product), so seqjax's
``b_h = [0, 0, b_hn]``. Both sides compute in float32: tolerance 2e-5 relative / 2e-6
absolute allows for different summation orders of the fused vs per-gate matmuls.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj

B, T, I, H = 3, 7, 4, 6
TOL = dict(rtol=2e-5, atol=2e-6)


def _xs():
    return jax.random.normal(jax.random.key(0), (B, T, I))


def _run_flax(flax_cell, xs, seq_lengths=None):
    model = nn.RNN(flax_cell, return_carry=True)
    variables = model.init(jax.random.key(1), xs)
    # random biases so a bias placed wrongly cannot hide behind zeros
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    variables = jax.tree_util.tree_unflatten(
        treedef,
        [
            0.3 * jax.random.normal(k, a.shape) if "bias" in jax.tree_util.keystr(path) else a
            for k, (path, a) in zip(keys, leaves)
        ],
    )
    carry, ys = model.apply(variables, xs, seq_lengths=seq_lengths)
    return variables["params"]["cell"], carry, ys


def _cat(p, names, leaf):
    return jnp.concatenate([p[n][leaf] for n in names], axis=-1)


@pytest.mark.parametrize("flax_cls", [nn.LSTMCell, nn.OptimizedLSTMCell])
def test_lstm_equals_flax(flax_cls):
    xs = _xs()
    fp, (c, h), ys_flax = _run_flax(flax_cls(H), xs)
    params = {
        "w_x": _cat(fp, ["ii", "if", "ig", "io"], "kernel"),
        "w_h": _cat(fp, ["hi", "hf", "hg", "ho"], "kernel"),
        "b": _cat(fp, ["hi", "hf", "hg", "ho"], "bias"),
    }
    final, ys = sj.unroll(sj.lstm(H), params, xs)
    np.testing.assert_allclose(ys, ys_flax, **TOL)
    np.testing.assert_allclose(final.h, h, **TOL)
    np.testing.assert_allclose(final.c, c, **TOL)


def test_gru_equals_flax():
    xs = _xs()
    fp, h, ys_flax = _run_flax(nn.GRUCell(H), xs)
    params = {
        "w_x": _cat(fp, ["ir", "iz", "in"], "kernel"),
        "w_h": _cat(fp, ["hr", "hz", "hn"], "kernel"),
        "b": _cat(fp, ["ir", "iz", "in"], "bias"),
        "b_h": jnp.concatenate([jnp.zeros(2 * H), fp["hn"]["bias"]]),
    }
    final, ys = sj.unroll(sj.gru(H), params, xs)
    np.testing.assert_allclose(ys, ys_flax, **TOL)
    np.testing.assert_allclose(final, h, **TOL)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_elman_equals_flax_simplecell(activation):
    xs = _xs()
    act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[activation]
    fp, h, ys_flax = _run_flax(nn.SimpleCell(H, activation_fn=act), xs)
    params = {"w_x": fp["i"]["kernel"], "w_h": fp["h"]["kernel"], "b": fp["i"]["bias"]}
    final, ys = sj.unroll(sj.rnn(H, activation=activation), params, xs)
    np.testing.assert_allclose(ys, ys_flax, **TOL)
    np.testing.assert_allclose(final, h, **TOL)


def test_lengths_equal_flax_seq_lengths():
    """unroll(lengths=...) keeps the final carry at each sequence's own last step, as Flax's
    seq_lengths does (Flax leaves outputs past the end unspecified, so only valid steps and
    the final carry are compared)."""
    xs = _xs()
    lengths = jnp.array([7, 3, 1])
    fp, (c, h), ys_flax = _run_flax(nn.LSTMCell(H), xs, seq_lengths=lengths)
    params = {
        "w_x": _cat(fp, ["ii", "if", "ig", "io"], "kernel"),
        "w_h": _cat(fp, ["hi", "hf", "hg", "ho"], "kernel"),
        "b": _cat(fp, ["hi", "hf", "hg", "ho"], "bias"),
    }
    final, ys = sj.unroll(sj.lstm(H), params, xs, lengths=lengths)
    np.testing.assert_allclose(final.h, h, **TOL)
    np.testing.assert_allclose(final.c, c, **TOL)
    valid = np.asarray(sj.sequence_mask(lengths, T))
    np.testing.assert_allclose(np.asarray(ys)[valid], np.asarray(ys_flax)[valid], **TOL)
