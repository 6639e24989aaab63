"""Deep stacks, bidirectional layers and readouts (seqjax.layers).

References: layer-by-layer ``unroll`` (one full sequence per layer) for the one-scan
``stack``; each sequence run alone, unpadded, with the backward direction computed on the
explicitly reversed sequence, for ``bidirectional`` under ``lengths``; NumPy for ``dense``.
Comparisons run in float64; the same operations are performed in a different
program structure (one scan vs several), so results agree to rounding: 1e-12.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close

from seqjax import CellMeta, LSTMState, check_params, gru, lstm, rnn, trajectory, unroll
from seqjax.gradients import Autodiff, Fused, Remat
from seqjax.layers import (
    BiCarry,
    Layer,
    as_layer,
    bidirectional,
    dense,
    embedding,
    output_size,
    stack,
    stack_layers,
)
from seqjax.testing import CHECKS, check_cell

TOL = 1e-12


def _init(model, seed, *sizes):
    """Params with the tree and shapes ``model.init`` makes (``jax.eval_shape``: the real
    init code), filled with NumPy ``U(-0.6, 0.6)`` values: cheap (no PRNG compilation) and
    as good as any init for equivalence tests."""
    shapes = jax.eval_shape(lambda k: model.init(k, *sizes), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.uniform(-0.6, 0.6, s.shape), s.dtype), shapes)


def _xs(seed, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _cast(tree, dtype=jnp.float64):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def test_stack_is_a_cell_with_the_documented_params_and_meta():
    cells = [lstm(5, proj_size=3), gru(4), rnn(6)]
    cell = stack(cells)
    assert cell.meta == CellMeta("stack(lstm,gru,rnn)", 6, (("dropout", 0.0),))
    assert cell == stack(cells) and hash(cell) == hash(stack(cells))  # equal when rebuilt
    params = _init(cell, 0, 2)
    assert isinstance(params, tuple) and len(params) == 3
    sizes = [2, 3, 4]  # input of each layer: I, then the previous layer's output size
    for c, p, n in zip(cells, params, sizes):
        check_params(c, p, n)  # exactly what cells[l].init makes
    assert output_size(cell, params, 2) == 6
    carry = cell.initial_carry(params, (7,))
    assert isinstance(carry[0], LSTMState) and carry[0].h.shape == (7, 3) and carry[2].shape == (7, 6)


def test_stack_equals_layer_by_layer_unrolling(x64):
    cells = [lstm(5), gru(4), rnn(3, activation="relu")]
    cell = stack(cells)
    params = _cast(_init(cell, 1, 2))
    xs = _xs(2, (3, 6, 2))
    lengths = jnp.array([6, 1, 4])

    carry, ys = jax.jit(lambda p, x: unroll(cell, p, x, lengths=lengths))(params, xs)

    @jax.jit
    def layer_by_layer(params, xs):
        ys, carries = xs, []
        for c, p in zip(cells, params):
            h, ys = unroll(c, p, ys, lengths=lengths)
            carries.append(h)
        return tuple(carries), ys

    ref_carry, ref_ys = layer_by_layer(params, xs)
    assert_trees_close(ys, ref_ys, rtol=0, atol=TOL)
    assert_trees_close(carry, ref_carry, rtol=0, atol=TOL)
    assert np.all(np.asarray(ys)[1, 1:] == 0)  # zero past the length, as unroll

    # and so does stack_layers on the same params (layer by layer by construction)
    carry2, ys2 = jax.jit(lambda p, x: stack_layers(cells).apply(p, x, lengths=lengths))(params, xs)
    assert_trees_close(ys2, ref_ys, rtol=0, atol=TOL)
    assert_trees_close(carry2, ref_carry, rtol=0, atol=TOL)


def test_stack_gates_are_per_layer_and_work_with_unroll():
    cell = stack([lstm(4), gru(3)])
    params = _init(cell, 0, 2)
    xs = _xs(0, (2, 5, 2), jnp.float32)
    aux = trajectory(cell, params, xs, gates=True)
    assert set(aux.gates) == {"layer_0", "layer_1"}
    assert set(aux.gates["layer_0"]) == {"i", "f", "g", "o"} and aux.gates["layer_1"]["r"].shape == (2, 5, 3)
    # layer 1's gates are those of the GRU fed layer 0's outputs
    _, ys0 = unroll(lstm(4), params[0], xs)
    aux1 = trajectory(gru(3), params[1], ys0, gates=True)
    assert_trees_close(aux.gates["layer_1"], aux1.gates, rtol=0, atol=1e-6)


def test_stack_dropout_is_keyed_shared_over_time_and_documented(x64):
    rate = 0.5
    cells = [rnn(6), rnn(3)]
    params = _cast(_init(stack(cells), 0, 2))
    xs = _xs(3, (4, 5, 2))
    key = jax.random.key(42)
    cell = stack(cells, dropout=rate, key=key)
    assert cell.kernel is not None and cell.meta.option("dropout") == rate  # masks on each layer's input
    other = stack(cells, dropout=rate, key=jax.random.key(7))
    ys, ys_plain, ys_other = jax.jit(
        lambda p, x: (
            unroll(cell, p, x, gradient=Fused())[1],
            unroll(cell, p, x, gradient=Autodiff())[1],
            unroll(other, p, x)[1],
        )
    )(params, xs)
    # reference: layer by layer, one Bernoulli mask per sequence from fold_in(key, 1),
    # the same at every step (variational dropout)
    keep = jax.random.bernoulli(jax.random.fold_in(key, 1), 1 - rate, (4, 6)).astype(jnp.float64) / (1 - rate)

    @jax.jit
    def ref_fn(p, x):
        _, y1 = unroll(cells[0], p[0], x)
        return unroll(cells[1], p[1], y1 * keep[:, None, :])[1]

    assert_trees_close(ys, ref_fn(params, xs), rtol=0, atol=TOL)
    assert_trees_close(ys_plain, ref_fn(params, xs), rtol=0, atol=TOL)
    assert 0 < float(jnp.mean(keep == 0)) < 1
    assert not np.allclose(np.asarray(ys), np.asarray(ys_other))
    with pytest.raises(ValueError, match="key"):
        stack(cells, dropout=rate)
    with pytest.raises(ValueError, match="dropout"):
        stack(cells, dropout=1.0, key=key)


_JIT = {}


def _loop(cell, params, xs):
    """Python loop over one unbatched sequence ``xs: (T, I)`` with a jitted step."""
    if id(cell) not in _JIT:
        _JIT[id(cell)] = (cell, jax.jit(cell.step))
    step = _JIT[id(cell)][1]
    c, ys = cell.initial_carry(params, ()), []
    for t in range(xs.shape[0]):
        c, y = step(params, c, xs[t])
        ys.append(y)
    return c, jnp.stack(ys)


def test_bidirectional_under_lengths_equals_each_sequence_alone(x64):
    fwd, bwd = lstm(4), lstm(4)
    user_merge = lambda a, b: jnp.tanh(a - 2.0 * b) + 1.0
    layers = {m: bidirectional(fwd, bwd, merge=m) for m in ("concat", "sum")}
    layers["callable"] = bidirectional(fwd, bwd, merge=user_merge)
    params = _cast(_init(layers["concat"], 3, 3))
    xs = _xs(4, (3, 6, 3))
    lengths = np.array([6, 2, 4])
    run = jax.jit(lambda p, x, n: {m: layer.apply(p, x, lengths=n) for m, layer in layers.items()})
    results = run(params, xs, jnp.asarray(lengths))

    for b, n in enumerate(lengths):
        x = xs[b, :n]  # this sequence alone, no padding
        h_f, y_f = _loop(fwd, params["fwd"], x)
        h_b, y_b_rev = _loop(bwd, params["bwd"], x[::-1])  # explicit reversal
        y_b = y_b_rev[::-1]
        refs = {
            "concat": jnp.concatenate([y_f, y_b], axis=-1),
            "sum": y_f + y_b,
            "callable": user_merge(y_f, y_b),
        }
        for m, (carry, ys) in results.items():
            assert isinstance(carry, BiCarry)
            assert_trees_close(ys[b, :n], refs[m], rtol=0, atol=TOL)
            assert np.all(np.asarray(ys[b, n:]) == 0), m
            assert_trees_close(
                jax.tree_util.tree_map(lambda a: a[b], carry), BiCarry(h_f, h_b), rtol=0, atol=TOL
            )


def test_bidirectional_defaults_and_errors():
    layer = bidirectional(gru(3))
    params = layer.init(jax.random.key(0), 2)  # the real init: two independent draws
    assert not np.allclose(params["fwd"]["w_x"], params["bwd"]["w_x"])  # independent weights
    assert output_size(layer, params, 2) == 6
    with pytest.raises(ValueError, match="merge"):
        bidirectional(gru(3), merge="max")
    with pytest.raises(ValueError, match="fwd"):
        layer.apply({"fwd": params["fwd"]}, jnp.zeros((4, 2)))


def test_stack_layers_bidirectional_with_initial_carry_and_time_major(x64):
    net = stack_layers([bidirectional(gru(3)), bidirectional(gru(2), merge="sum")])
    params = _cast(_init(net, 5, 2))
    xs = _xs(6, (4, 3, 2))  # time-major (T, B, I)
    c0 = jax.tree_util.tree_map(lambda a: a + 0.3, net.initial_carry(params, (3,)))
    l1, l2 = bidirectional(gru(3)), bidirectional(gru(2), merge="sum")

    @jax.jit
    def both(p, x):
        got = net.apply(p, x, carry=c0, time_axis=0)
        # reference: batch-major, layer by layer by hand
        c1, y1 = l1.apply(p[0], jnp.swapaxes(x, 0, 1), carry=c0[0])
        c2, y2 = l2.apply(p[1], y1, carry=c0[1])
        return got, (c1, c2, y2)

    (carry, ys), (c1, c2, y2) = both(params, xs)
    assert ys.shape == (4, 3, 2)
    assert_trees_close(ys, jnp.swapaxes(y2, 0, 1), rtol=0, atol=TOL)
    assert_trees_close(carry, (c1, c2), rtol=0, atol=TOL)


def test_stack_layers_dropout_needs_a_key_and_is_pytorch_style():
    net = stack_layers([rnn(8), rnn(3)], dropout=0.25)
    params = _init(net, 0, 2)
    xs = _xs(1, (2, 7, 2), jnp.float32)
    with pytest.raises(ValueError, match="key"):
        net.apply(params, xs)
    y_eval, y_ref = jax.jit(
        lambda p, x: (net.apply(p, x, deterministic=True)[1], unroll(stack([rnn(8), rnn(3)]), p, x)[1])
    )(params, xs)
    assert_trees_close(y_eval, y_ref, rtol=0, atol=1e-6)
    apply = jax.jit(lambda p, x, k: net.apply(p, x, key=k)[1])
    y_a, y_b = apply(params, xs, jax.random.key(1)), apply(params, xs, jax.random.key(1))
    assert np.array_equal(np.asarray(y_a), np.asarray(y_b))
    assert not np.allclose(np.asarray(y_a), np.asarray(y_eval))


def test_as_layer_reverse_and_layer_type():
    cell = rnn(3)
    layer = as_layer(cell, reverse=True)
    assert isinstance(layer, Layer) and as_layer(layer) is layer
    params = _init(cell, 0, 2)
    xs = _xs(2, (5, 2), jnp.float32)
    assert_trees_close(layer.apply(params, xs)[1], unroll(cell, params, xs, reverse=True)[1], rtol=0, atol=0)


def _fused(fn, *args):
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


def test_as_layer_and_bidirectional_forward_unroll_options():
    """Options given to ``as_layer``/``bidirectional`` are fixed for the layer; ``apply``
    forwards any per call (a per-call value winning); 0.1 keywords and options a layer owns
    itself are refused."""
    cell = gru(3)
    params = _init(cell, 0, 2)
    xs = _xs(2, (2, 5, 2), jnp.float32)
    mask = jnp.array([[1, 0, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
    layer = as_layer(cell, gradient=Autodiff())
    assert layer.meta.option("gradient") == Autodiff()
    assert not _fused(lambda p: layer.apply(p, xs)[1], params)
    assert _fused(lambda p: as_layer(cell).apply(p, xs)[1], params)
    # (the layer runs autodiff's scan, unroll the kernel: float32 rounding apart)
    assert_trees_close(
        layer.apply(params, xs, mask=mask), unroll(cell, params, xs, mask=mask), rtol=0, atol=1e-6
    )
    rev = as_layer(cell, reverse=True, gradient=Remat(2))
    assert_trees_close(rev.apply(params, xs, reverse=False), unroll(cell, params, xs), rtol=0, atol=1e-6)
    assert_trees_close(rev.apply(params, xs), unroll(cell, params, xs, reverse=True), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match=r"no longer takes bptt=.*gradient=seqjax.gradients"):
        as_layer(cell, bptt="autodiff")
    with pytest.raises(TypeError, match=r"no longer takes remat=.*Remat"):
        layer.apply(params, xs, remat=True)
    with pytest.raises(TypeError, match="unexpected option 'carry'"):
        as_layer(cell, carry=None)
    # bidirectional: both directions get the options
    bi = bidirectional(cell, gru(3), gradient=Autodiff())
    pb = _init(bi, 1, 2)
    assert not _fused(lambda p: bi.apply(p, xs)[1], pb)
    assert _fused(lambda p: bidirectional(cell, gru(3)).apply(p, xs)[1], pb)
    _, y_f = unroll(cell, pb["fwd"], xs, mask=mask)
    _, y_b = unroll(gru(3), pb["bwd"], xs, mask=mask, reverse=True)
    assert_trees_close(bi.apply(pb, xs, mask=mask)[1], jnp.concatenate([y_f, y_b], -1), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="unexpected option 'reverse'"):
        bidirectional(cell, reverse=True)
    with pytest.raises(TypeError, match=r"no longer takes truncate=.*Truncate"):
        bi.apply(pb, xs, truncate=2)


def test_dense_and_embedding_against_numpy():
    d = dense(4)
    p = d.init(jax.random.key(0), 3)
    assert p["w"].shape == (3, 4) and p["b"].shape == (4,)
    assert float(jnp.max(jnp.abs(p["w"]))) <= 1 / np.sqrt(3)  # PyTorch Linear's U(-1/sqrt(I), 1/sqrt(I))
    y = np.asarray(_xs(1, (2, 5, 3), jnp.float32))
    ref = y @ np.asarray(p["w"]) + np.asarray(p["b"])
    np.testing.assert_allclose(np.asarray(jax.jit(d.apply)(p, y)), ref, rtol=1e-6, atol=1e-6)
    nb = dense(2, use_bias=False)
    assert set(_init(nb, 0, 3)) == {"w"}
    with pytest.raises(ValueError, match="features"):
        d.apply(p, jnp.zeros((2, 5)))
    e = embedding(10, 3)
    pe = e.init(jax.random.key(1))
    ids = jnp.array([[1, 9], [0, 1]])
    np.testing.assert_array_equal(np.asarray(e.apply(pe, ids)), np.asarray(pe["table"])[np.asarray(ids)])
    with pytest.raises(ValueError, match="integers"):
        e.apply(pe, jnp.zeros((2,)))


def test_stack_layers_forwards_unroll_options():
    """``stack_layers(...).apply(..., mask=, gradient=)`` hands the options to every layer:
    equal to unrolling each layer with them, one after the other (float32, 1e-6)."""
    cells = [lstm(3), gru(2)]
    net = stack_layers(cells)
    params = net.init(jax.random.key(0), 4)
    xs = jax.random.normal(jax.random.key(1), (2, 6, 4))
    mask = jnp.array([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 1]], bool)
    _, ys = jax.jit(lambda p, x: net.apply(p, x, mask=mask, gradient=Remat(2)))(params, xs)
    _, y0 = unroll(cells[0], params[0], xs, mask=mask)
    _, y1 = unroll(cells[1], params[1], y0, mask=mask)
    assert_trees_close(ys, y1, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="solver=seqjax.solvers.Sequential"):
        net.apply(params, xs, unroll=2)


def test_bidirectional_resets_start_each_episode_in_both_directions():
    """``resets`` mark the first step of an episode; a bidirectional layer over two episodes
    equals the layer run on each episode alone (the backward cell starts each episode from
    zeros at the episode's last step). Float32, 1e-6."""
    layer = bidirectional(gru(3), lstm(2))
    params = layer.init(jax.random.key(0), 4)
    xs = jax.random.normal(jax.random.key(1), (2, 9, 4))
    resets = np.zeros((2, 9), bool)
    resets[:, 5] = True
    _, ys = jax.jit(lambda p, x: layer.apply(p, x, resets=resets))(params, xs)
    _, first = layer.apply(params, xs[:, :5])
    _, second = layer.apply(params, xs[:, 5:])
    assert_trees_close(ys, jnp.concatenate([first, second], axis=1), rtol=1e-6, atol=1e-6)


def test_as_layer_of_a_layer_refuses_options():
    layer = as_layer(rnn(3))
    assert as_layer(layer) is layer
    with pytest.raises(TypeError, match="already a Layer"):
        as_layer(layer, reverse=True)
    with pytest.raises(TypeError, match="unexpected option 'bogus'"):
        as_layer(layer, bogus=1)


@pytest.mark.slow  # check_cell with every kernel option (6-14 s); the keyed-mask test runs by default
def test_dropout_stack_keeps_every_capability_exact():
    """``check_cell`` on ``stack(..., dropout=)``: the kernel (every option) against autodiff,
    the diagonal against ``jax.jacfwd``, output and gates against the step. Not ``vmap``: the
    masks take the batch shape the step sees (documented)."""
    cell = stack([lstm(3), rnn(2)], dropout=0.4, key=jax.random.key(3))
    checks = [c for c in CHECKS if c not in ("vmap", "grads")]  # grads: the step's own autodiff
    report = check_cell(cell, input_size=2, batch=2, steps=4, checks=checks, options=("mask", "truncate"))
    assert "kernel[combined]" in report.passed and "jacobian_diagonal" in report.passed
