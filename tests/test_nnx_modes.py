"""Training and evaluation modes of the seqjax.nnx modules, NNX's convention (issue 16).

``Stack(dropout=...)`` follows ``flax.nnx.Dropout``: a ``deterministic`` attribute that
``model.train()`` sets ``False`` and ``model.eval()`` sets ``True`` (nested modules
included), ``False`` on a fresh module, a per-call ``deterministic=`` that wins, and a
clear error when training mode has no random key.

References: evaluation mode against the dropout-free functional ``stack_layers`` /
``unroll`` on the module's params (same operations: agreement to float32 rounding);
training mode against masks drawn here with ``jax.random.bernoulli`` from the key the
module's forked ``dropout`` stream yields, on the schedule ``stack_layers`` documents
(``split(key, 2L)``, layer ``l``'s input mask from ``keys[2l]``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_trees_close

import seqjax as sj
from seqjax.nnx import RNN, Bidirectional, Stack

B, T, I, H = 2, 3, 2, 3
RATE = 0.5
TOL = dict(rtol=1e-6, atol=1e-6)


CELL = sj.rnn(H)


def _xs(seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, I)), jnp.float32)


def _layer(i, seed):
    """An ``RNN(i, H)`` module from NumPy-drawn params (no init to compile: keeps this fast)."""
    rng = np.random.default_rng(100 + seed)
    shapes = {"w_x": (i, H), "w_h": (H, H), "b": (H,)}
    return RNN.from_params({k: jnp.asarray(0.7 * rng.normal(size=v), jnp.float32) for k, v in shapes.items()})


def _net(seed=0, dropout=RATE, **kw):
    rngs = nnx.Rngs(dropout=seed)
    return Stack([_layer(I, 2 * seed), _layer(H, 2 * seed + 1)], dropout=dropout, rngs=rngs, **kw)


@jax.jit
def _rnn(params, xs):
    """One RNN layer, ``unroll``; jitted once per input width and reused by every test."""
    return sj.unroll(CELL, params, xs)[1]


def _plain(params, xs):
    """The dropout-free two-layer network, written with ``unroll``."""
    return _rnn(params[1], _rnn(params[0], xs))


def _dropped(params, xs, key):
    """The network with the mask drawn here from ``key`` on ``stack_layers``' schedule."""
    y0 = _rnn(params[0], xs)
    keep = jax.random.bernoulli(jax.random.split(key, 4)[2], 1.0 - RATE, y0.shape)
    return _rnn(params[1], jnp.where(keep, y0 / (1.0 - RATE), 0.0))


def _differ(a, b):
    return not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_fresh_stack_trains_like_nnx_dropout_and_masks_match_reference():
    """A fresh ``Stack`` is in training mode, as a fresh ``nnx.Dropout``; after ``train()``
    two calls draw fresh masks from the forked ``dropout`` stream, each equal to the
    network with a mask drawn independently from the same key."""
    net = _net()
    assert net.deterministic is nnx.Dropout(RATE).deterministic is False
    params, xs = net.to_params(), _xs()
    ref_stream = nnx.Rngs(dropout=0)["dropout"].fork()  # what Stack forked at construction
    net.eval()
    net.train()
    assert net.deterministic is False
    y1, y2 = net(xs)[1], net(xs)[1]
    assert_trees_close(y1, _dropped(params, xs, ref_stream()), **TOL)
    assert_trees_close(y2, _dropped(params, xs, ref_stream()), **TOL)
    y_eval = _plain(params, xs)
    assert _differ(y1, y2) and _differ(y1, y_eval) and _differ(y2, y_eval)


def test_eval_equals_dropout_free_network():
    """After ``eval()`` the output equals the dropout-free network written with ``unroll``
    on the same params; ``nnx.view(net, deterministic=True)`` sets the mode on a view."""
    net = _net()
    params, xs = net.to_params(), _xs(1)
    view = nnx.view(net, deterministic=True)
    assert view.deterministic is True and net.deterministic is False
    net.eval()
    assert net.deterministic is True
    assert_trees_close(net(xs)[1], _plain(params, xs), **TOL)


def test_per_call_override_wins_both_ways_and_key_wins_over_rngs():
    """``deterministic=`` in a call beats the attribute either way; a ``key`` beats the
    module's ``rngs`` (equal outputs, stream not advanced) and gives the mask drawn from it."""
    net = _net()
    params, xs, key = net.to_params(), _xs(2), jax.random.key(7)
    net.train()
    assert_trees_close(net(xs, deterministic=True)[1], _plain(params, xs), **TOL)
    net.eval()
    count = int(net.rngs.count[...])
    y_k = net(xs, deterministic=False, key=key)[1]
    assert_trees_close(y_k, _dropped(params, xs, key), **TOL)
    assert int(net.rngs.count[...]) == count
    assert _differ(net(xs, deterministic=False)[1], _plain(params, xs))  # from rngs
    assert int(net.rngs.count[...]) == count + 1
    assert net.deterministic is True  # an override does not change the mode


def test_under_nnx_jit():
    """Under ``nnx.jit`` training mode draws fresh masks per call (the rng state advances
    through the transform), the mode set outside is followed, and evaluation is plain."""
    net = _net(3)
    params, xs = net.to_params(), _xs(4)
    ref_stream = nnx.Rngs(dropout=3)["dropout"].fork()
    step = nnx.jit(lambda m, x: m(x)[1])
    net.train()
    j1, j2 = step(net, xs), step(net, xs)
    # jit may fuse differently from the eager reference: float32 rounding
    assert_trees_close(j1, _dropped(params, xs, ref_stream()), rtol=1e-5, atol=1e-6)
    assert_trees_close(j2, _dropped(params, xs, ref_stream()), rtol=1e-5, atol=1e-6)
    net.eval()
    assert_trees_close(step(net, xs), _plain(params, xs), rtol=1e-5, atol=1e-6)


class _Model(nnx.Module):
    """A user model: ``Stack([Bidirectional, Stack(dropout)], dropout)`` and an ``nnx.Dropout``
    (held only to compare its mode)."""

    def __init__(self, rngs):
        bi = Bidirectional(_layer(I, 10), _layer(I, 11), merge="sum")
        inner = Stack([_layer(H, 12), _layer(H, 13)], dropout=RATE, rngs=rngs)
        self.encoder = Stack([bi, inner], dropout=RATE, rngs=rngs)
        self.drop = nnx.Dropout(RATE, rngs=rngs)

    def __call__(self, xs, **kw):
        return self.encoder(xs, **kw)[1]


def _model_plain(params, xs):
    net = sj.stack_layers([sj.bidirectional(CELL, merge="sum"), sj.stack_layers([CELL, CELL])])
    return net.apply(params, xs)[1]


def test_nested_modules_follow_parent_train_and_eval():
    """``model.train()`` / ``model.eval()`` reach a ``Stack`` nested in a ``Stack`` (next to a
    ``Bidirectional``) and an ``nnx.Dropout`` alike; the inner one follows its own attribute
    and rngs, and a call's ``deterministic=`` overrides it too."""
    model = _Model(nnx.Rngs(dropout=5))
    inner = model.encoder.layers[1]
    xs = _xs(5)
    model.eval()
    assert (model.encoder.deterministic, inner.deterministic, model.drop.deterministic) == (True,) * 3
    y_eval = model(xs)
    assert_trees_close(y_eval, _model_plain(model.encoder.to_params(), xs), **TOL)
    counts = lambda: (int(model.encoder.rngs.count[...]), int(inner.rngs.count[...]))  # noqa: E731
    inner.train()  # only the inner Stack in training mode: it draws from its own rngs
    assert _differ(model(xs), y_eval) and counts() == (0, 1)
    assert_trees_close(model(xs, deterministic=True), y_eval, **TOL)  # the override reaches it
    model.train()
    assert (model.encoder.deterministic, inner.deterministic, model.drop.deterministic) == (False,) * 3
    # the outer Stack draws the key and hands the inner one a key split from it
    assert _differ(model(xs), y_eval) and counts() == (1, 1)


def test_mode_errors_name_what_is_missing():
    """Training mode with no rng source, a mode given nowhere, and bad arguments each raise
    an error that names what to pass."""
    layers = [_layer(I, 0), _layer(H, 1)]
    xs = _xs()
    no_rngs = Stack(layers, dropout=RATE)
    with pytest.raises(
        ValueError, match=r"training mode .* needs a random key.*rngs=nnx.Rngs.*key=.*model.eval"
    ):
        no_rngs(xs)
    no_rngs.eval()
    assert_trees_close(no_rngs(xs)[1], _plain(no_rngs.to_params(), xs), **TOL)
    assert Stack(layers[:1])(xs, deterministic=False)[1].shape == (B, T, H)  # no dropout: no key
    with pytest.raises(ValueError, match=r"deterministic is None.*model.train\(\) or model.eval\(\)"):
        Stack(layers, dropout=RATE, deterministic=None)(xs)
    with pytest.raises(TypeError, match=r"deterministic must be True, False or None, got str"):
        no_rngs(xs, deterministic="yes")
    with pytest.raises(TypeError, match=r"deterministic must be True, False or None"):
        Stack(layers, deterministic=1)
    with pytest.raises(ValueError, match=r"key must be a PRNG key"):
        no_rngs(xs, deterministic=False, key=3)
    with pytest.raises(TypeError, match=r"rngs must be an nnx.Rngs, an nnx.RngStream or None, got int"):
        Stack(layers, dropout=RATE, rngs=0)
    with pytest.raises(ValueError, match=r"neither a 'dropout' nor a 'default' stream"):
        Stack(layers, dropout=RATE, rngs=nnx.Rngs(params=0))
    stream = nnx.Rngs(dropout=2)["dropout"]
    assert isinstance(Stack(layers, dropout=RATE, rngs=stream).rngs, nnx.RngStream)  # forked
    assert int(stream.count[...]) == 1
