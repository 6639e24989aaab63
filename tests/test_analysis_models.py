"""Whole models to the analysis tools: ``seqjax.spectrum.models.recurrent_cores`` / ``over_cores``.

References, each computed without ``recurrent_cores``: the inputs a core sees rebuilt by hand
(NumPy slicing per sequence for reversals; ``seqjax.unroll`` of each lower layer for a stack;
``model.encode`` for a decoder's carry); the final carries of the model's own run
(``Layer.apply``'s ``BiCarry``, ``seqjax.trajectory(..., reverse=True, lengths=...)``) for the
claim that a forward run of a core reads what the model's cell reads; the functional twin
(``as_layer()`` and ``to_params()``) for the NNX modules; the spectrum tools called by hand on
each cell for ``over_cores``. Float32, H <= 4, T <= 6.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax
from seqjax import spectrum
from seqjax.layers import Layer, as_layer, bidirectional, dense, stack_layers
from seqjax.seq2seq import encoder_decoder, many_to_many, many_to_one
from seqjax.spectrum.models import Core, over_cores, recurrent_cores

B, T, I, H = 3, 6, 2, 4
LENGTHS = np.array([6, 4, 1], np.int32)
TOL = dict(rtol=1e-5, atol=1e-6)


def _init(model, seed, *sizes):
    """Params with the tree and shapes ``model.init`` makes, filled with NumPy ``U(-0.6, 0.6)``."""
    shapes = jax.eval_shape(lambda k: model.init(k, *sizes), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.uniform(-0.6, 0.6, s.shape), s.dtype), shapes)


def _xs(seed=0, shape=(B, T, I)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _reverse_by_hand(xs, lengths):
    """Each sequence reversed within its own length with NumPy slicing; padding left in place."""
    xs = np.asarray(xs)
    out = xs.copy()
    n_all = np.full(xs.shape[:-2], xs.shape[-2]) if lengths is None else np.asarray(lengths)
    for b in np.ndindex(*xs.shape[:-2]):
        n = int(n_all[b])
        out[b][:n] = xs[b][:n][::-1]
    return out


def _valid(a, lengths):
    """``a (*batch, T, ...)`` with steps past each length zeroed (NumPy)."""
    a = np.array(a)
    for b in np.ndindex(*a.shape[:1]):
        a[b][int(lengths[b]) :] = 0
    return a


def _final_carry(cell, params, xs, lengths=None, carry=None):
    return seqjax.trajectory(cell, params, xs, lengths=lengths, carry=carry).carry


# --------------------------------------------------------------------------- cells and single layers


def test_cell_is_one_core_batch_major():
    cell = seqjax.lstm(H)
    params = _init(cell, 0, I)
    xs = _xs()
    cores = recurrent_cores(cell, params, jnp.swapaxes(xs, 0, 1), lengths=LENGTHS, time_axis=0)
    assert list(cores) == ["cell"]
    core = cores["cell"]
    assert isinstance(core, Core) and core.cell is cell and core.params is params and core.carry is None
    chex.assert_trees_all_equal(core.xs, xs)
    chex.assert_trees_all_equal(core.lengths, jnp.asarray(LENGTHS))


def test_stack_cell_is_one_core():
    cell = seqjax.stack([seqjax.rnn(3), seqjax.gru(H)])
    params = _init(cell, 1, I)
    xs = _xs(1)
    (name, core), *_ = recurrent_cores(cell, params, xs).items()
    assert name == "cell" and core.cell is cell and core.lengths is None
    cores = recurrent_cores(many_to_one(cell, dense(2)), {"body": params, "head": None}, xs)
    assert list(cores) == ["body.cell"] and cores["body.cell"].cell is cell


@pytest.mark.parametrize("lengths", [None, LENGTHS, np.array([6, 0, 3], np.int32)])
def test_as_layer_reverse_reads_each_sequence_from_its_own_end(lengths):
    cell = seqjax.gru(H)
    layer = as_layer(cell, reverse=True, gradient=seqjax.gradients.Remat(2))
    params = _init(layer, 2, I)
    xs = _xs(2)
    (name, core), *rest = recurrent_cores(layer, params, xs, lengths=lengths).items()
    assert name == "cell" and not rest and core.cell is cell and core.carry is None
    np.testing.assert_array_equal(np.asarray(core.xs), _reverse_by_hand(xs, lengths))
    n = np.full(B, T) if lengths is None else lengths
    # step t of the core's forward run is step n - 1 - t of the layer's backward run
    fwd = seqjax.trajectory(cell, params, core.xs, lengths=core.lengths)
    bwd = seqjax.trajectory(cell, params, xs, lengths=lengths, reverse=True)
    for b in range(B):
        idx = np.arange(n[b])
        np.testing.assert_allclose(fwd.carries[b, idx], bwd.carries[b, n[b] - 1 - idx], **TOL)
    carry, _ = layer.apply(params, xs, lengths=lengths)
    chex.assert_trees_all_close(fwd.carry, carry, **TOL)


def test_as_layer_forward_and_time_major():
    cell = seqjax.rnn(H)
    layer = as_layer(cell)
    params = _init(layer, 3, I)
    xs = _xs(3)
    core = recurrent_cores(layer, params, jnp.swapaxes(xs, 0, 1), lengths=LENGTHS, time_axis=0)["cell"]
    chex.assert_trees_all_equal(core.xs, xs)
    chex.assert_trees_all_equal(core.lengths, jnp.asarray(LENGTHS))


def test_bidirectional_cores_end_in_the_layers_carries():
    f_cell, b_cell = seqjax.lstm(H), seqjax.gru(3)
    layer = bidirectional(f_cell, b_cell, merge="concat")
    params = _init(layer, 4, I)
    xs = _xs(4)
    cores = recurrent_cores(layer, params, xs, lengths=LENGTHS)
    assert list(cores) == ["fwd", "bwd"]
    fwd, bwd = cores["fwd"], cores["bwd"]
    assert (fwd.cell, bwd.cell) == (f_cell, b_cell) and fwd.carry is None and bwd.carry is None
    assert fwd.params is params["fwd"] and bwd.params is params["bwd"]
    np.testing.assert_array_equal(np.asarray(fwd.xs), np.asarray(xs))
    np.testing.assert_array_equal(np.asarray(bwd.xs), _reverse_by_hand(xs, LENGTHS))
    carry, _ = layer.apply(params, xs, lengths=LENGTHS)
    chex.assert_trees_all_close(_final_carry(b_cell, bwd.params, bwd.xs, bwd.lengths), carry.bwd, **TOL)
    chex.assert_trees_all_close(_final_carry(f_cell, fwd.params, fwd.xs, fwd.lengths), carry.fwd, **TOL)


def test_bidirectional_multiple_batch_dims_under_jit():
    cell = seqjax.rnn(H)
    layer = bidirectional(cell)
    params = _init(layer, 5, I)
    xs = _xs(5, (2, 2, T, I))
    lengths = np.array([[6, 2], [0, 5]], np.int32)

    @jax.jit
    def run(p, x, n):
        return {k: (c.xs, c.lengths) for k, c in recurrent_cores(layer, p, x, lengths=n).items()}

    got = run(params, xs, lengths)
    np.testing.assert_array_equal(np.asarray(got["bwd"][0]), _reverse_by_hand(xs, lengths))
    np.testing.assert_array_equal(np.asarray(got["fwd"][0]), np.asarray(xs))
    chex.assert_trees_all_equal(got["bwd"][1], jnp.asarray(lengths))


def test_unbatched_sequence():
    cell = seqjax.gru(3)
    layer = bidirectional(cell)
    params = _init(layer, 18, I)
    xs = _xs(18, (T, I))  # no batch axes: lengths is a scalar
    n = jnp.asarray(4, jnp.int32)
    bwd = recurrent_cores(layer, params, xs, lengths=n)["bwd"]
    np.testing.assert_array_equal(np.asarray(bwd.xs), np.concatenate([np.asarray(xs)[:4][::-1], xs[4:]]))
    carry, _ = layer.apply(params, xs, lengths=n)
    chex.assert_trees_all_close(_final_carry(cell, bwd.params, bwd.xs, bwd.lengths), carry.bwd, **TOL)


# --------------------------------------------------------------------------- stacks and models


def test_stack_layers_feed_each_layer_the_outputs_below():
    bi, mid, top = seqjax.gru(3), seqjax.lstm(H), seqjax.rnn(H)
    net = stack_layers([bidirectional(bi), mid, as_layer(top, reverse=True)], dropout=0.5)
    params = _init(net, 6, I)
    xs = _xs(6)
    got = recurrent_cores(net, params, xs, lengths=LENGTHS)
    assert list(got) == ["layer0.fwd", "layer0.bwd", "layer1.cell", "layer2.cell"]
    assert [c.cell for c in got.values()] == [bi, bi, mid, top]
    # by hand: layer 0 is two unrolls, concatenated; layer 1 one unroll; layer 2 reads it reversed
    p0, p1, p2 = params
    _, y_f = seqjax.unroll(bi, p0["fwd"], xs, lengths=LENGTHS)
    _, y_b = seqjax.unroll(bi, p0["bwd"], xs, lengths=LENGTHS, reverse=True)
    ys0 = jnp.concatenate([y_f, y_b], axis=-1)
    _, ys1 = seqjax.unroll(mid, p1, ys0, lengths=LENGTHS)
    np.testing.assert_array_equal(np.asarray(got["layer0.bwd"].xs), _reverse_by_hand(xs, LENGTHS))
    np.testing.assert_allclose(got["layer1.cell"].xs, ys0, **TOL)
    np.testing.assert_allclose(got["layer2.cell"].xs, _reverse_by_hand(ys1, LENGTHS), **TOL)
    assert got["layer2.cell"].params is p2
    for c in got.values():
        chex.assert_trees_all_equal(c.lengths, jnp.asarray(LENGTHS))
    # and the top core ends where the network's own (deterministic) run ends
    carries, _ = net.apply(params, xs, lengths=LENGTHS, deterministic=True)
    top_core = got["layer2.cell"]
    chex.assert_trees_all_close(
        _final_carry(top, p2, top_core.xs, top_core.lengths), carries[2], rtol=1e-5, atol=1e-5
    )


def test_stack_layers_under_jit_matches_eager():
    net = stack_layers([seqjax.gru(3), bidirectional(seqjax.rnn(2))])
    params = _init(net, 7, I)
    xs = _xs(7)

    def arrays(p, x, n):
        return {k: (c.xs, c.lengths) for k, c in recurrent_cores(net, p, x, lengths=n).items()}

    chex.assert_trees_all_close(jax.jit(arrays)(params, xs, LENGTHS), arrays(params, xs, LENGTHS), **TOL)


@pytest.mark.parametrize("make", [many_to_one, many_to_many])
def test_body_and_head_models_list_the_bodys_cores(make):
    body = stack_layers([bidirectional(seqjax.gru(3)), seqjax.rnn(H)])
    model = make(body, dense(2))
    params = _init(model, 8, I)
    xs = _xs(8)
    got = recurrent_cores(model, params, xs, lengths=LENGTHS)
    want = recurrent_cores(body, params["body"], xs, lengths=LENGTHS)
    assert list(got) == ["body." + k for k in want]
    for k, core in want.items():
        mine = got["body." + k]
        assert mine.cell is core.cell and mine.carry is None
        chex.assert_trees_all_equal(
            (mine.params, mine.xs, mine.lengths), (core.params, core.xs, core.lengths)
        )


def test_encoder_decoder_decoder_core_reproduces_decode():
    enc_cell, dec_cell = seqjax.gru(H), seqjax.gru(H)
    model = encoder_decoder(bidirectional(enc_cell), dec_cell, dense(3), bridge=lambda c: c.bwd)
    params = _init(model, 9, I, 3)
    src, dec_in = _xs(9), _xs(10, (B, 5, 3))
    src_len, dec_len = LENGTHS, np.array([5, 2, 3], np.int32)
    # time-major input, as apply accepts it
    tm = (jnp.swapaxes(src, 0, 1), jnp.swapaxes(dec_in, 0, 1))
    got = recurrent_cores(model, params, tm, lengths=(src_len, dec_len), time_axis=0)
    assert list(got) == ["encoder.fwd", "encoder.bwd", "decoder"]
    dec = got["decoder"]
    assert dec.cell is dec_cell and dec.params is params["decoder"]
    np.testing.assert_array_equal(np.asarray(dec.xs), np.asarray(dec_in))
    chex.assert_trees_all_equal(dec.lengths, jnp.asarray(dec_len))
    np.testing.assert_array_equal(np.asarray(got["encoder.bwd"].xs), _reverse_by_hand(src, src_len))
    # the carry is the model's own encoding, and, by hand, the backward encoder's final carry
    chex.assert_trees_all_close(dec.carry, model.encode(params, src, lengths=src_len), **TOL)
    by_hand = _final_carry(enc_cell, params["encoder"]["bwd"], _reverse_by_hand(src, src_len), src_len)
    chex.assert_trees_all_close(dec.carry, by_hand, **TOL)
    # unrolling the core reproduces decode before the head (a head-less twin of the model)
    bare = encoder_decoder(bidirectional(enc_cell), dec_cell, None, bridge=lambda c: c.bwd)
    c_want, ys_want = bare.decode({**params, "head": None}, dec.carry, dec_in, lengths=dec_len)
    c_got, ys_got = seqjax.unroll(dec.cell, dec.params, dec.xs, carry=dec.carry, lengths=dec.lengths)
    chex.assert_trees_all_close((c_got, ys_got), (c_want, ys_want), **TOL)
    np.testing.assert_allclose(
        _valid(dense(3).apply(params["head"], ys_got), dec_len),
        model.decode(params, dec.carry, dec_in, lengths=dec_len)[1],
        **TOL,
    )


@pytest.mark.parametrize(
    "lengths", [None, (None, None), (LENGTHS, None), (None, np.array([5, 2, 3], np.int32))]
)
def test_encoder_decoder_lengths_pairs(lengths):
    cell = seqjax.lstm(H)
    model = encoder_decoder(cell, cell)
    params = _init(model, 11, I, I)
    src, dec_in = _xs(11), _xs(12, (B, 5, I))
    got = recurrent_cores(model, params, (src, dec_in), lengths=lengths)
    assert list(got) == ["encoder.cell", "decoder"]
    src_len, dec_len = (None, None) if lengths is None else lengths
    chex.assert_trees_all_close(
        got["decoder"].carry, _final_carry(cell, params["encoder"], src, src_len), **TOL
    )
    assert (got["decoder"].lengths is None) == (dec_len is None)
    assert (got["encoder.cell"].lengths is None) == (src_len is None)


# --------------------------------------------------------------------------- NNX modules


def _nnx_module(kind):
    from flax import nnx

    import seqjax.nnx as sjnn

    rngs = nnx.Rngs(0)
    if kind == "recurrent":
        return sjnn.Recurrent(seqjax.mgu(H), I, rngs=rngs)
    if kind == "lstm":
        return sjnn.LSTM(I, H, rngs=rngs)
    if kind == "bidirectional":
        return sjnn.Bidirectional(sjnn.GRU(I, 3, rngs=rngs), sjnn.RNN(I, 2, rngs=rngs))
    bi = sjnn.Bidirectional(sjnn.GRU(I, 3, rngs=rngs), sjnn.GRU(I, 3, rngs=rngs))
    return sjnn.Stack([bi, sjnn.LSTM(6, H, rngs=rngs)])


@pytest.mark.parametrize("kind", ["recurrent", "lstm", "bidirectional", "stack"])
def test_nnx_modules_match_their_functional_layer(kind):
    module = _nnx_module(kind)
    xs = _xs(13)
    got = recurrent_cores(module, None, xs, lengths=LENGTHS)
    want = recurrent_cores(module.as_layer(), module.to_params(), xs, lengths=LENGTHS)
    assert list(got) == list(want)
    for k in want:
        assert got[k].cell == want[k].cell
        chex.assert_trees_all_close(
            (got[k].params, got[k].xs, got[k].lengths), (want[k].params, want[k].xs, want[k].lengths), **TOL
        )
    if kind in ("recurrent", "lstm"):
        assert list(got) == ["cell"] and got["cell"].cell is module.cell
    # explicit params win over the module's own
    other = jax.tree_util.tree_map(lambda a: a + 1.0, module.to_params())
    first = next(iter(recurrent_cores(module, other, xs).values()))
    chex.assert_trees_all_close(
        first.params, next(iter(recurrent_cores(module.as_layer(), other, xs).values())).params
    )


# --------------------------------------------------------------------------- over_cores


def test_over_cores_passes_carry_lengths_and_kwargs():
    model = encoder_decoder(seqjax.rnn(H), seqjax.rnn(H))
    params = _init(model, 14, I, I)
    src, dec_in = _xs(14), _xs(15, (B, 4, I))

    def record(cell, params, xs, **kw):
        return kw

    got = over_cores(record, model, params, (src, dec_in), lengths=(LENGTHS, None), k=2)
    assert set(got["encoder.cell"]) == {"carry", "lengths", "k"} and got["encoder.cell"]["carry"] is None
    assert set(got["decoder"]) == {"carry", "k"} and got["decoder"]["k"] == 2  # no lengths: not passed
    chex.assert_trees_all_close(got["decoder"]["carry"], model.encode(params, src, lengths=LENGTHS), **TOL)


def _fields(spec):
    return spec.exponents, spec.stderr, spec.finite_time


def test_over_cores_lyapunov_of_a_bidirectional_classifier():
    cell = seqjax.rnn(3)
    model = many_to_one(bidirectional(cell), dense(2))
    params = _init(model, 16, I)
    xs = _xs(16)
    got = over_cores(spectrum.lyapunov_spectrum, model, params, xs, k=2)
    assert list(got) == ["body.fwd", "body.bwd"]
    fwd = spectrum.lyapunov_spectrum(cell, params["body"]["fwd"], xs, k=2)
    bwd = spectrum.lyapunov_spectrum(cell, params["body"]["bwd"], _reverse_by_hand(xs, None), k=2)
    chex.assert_trees_all_close(_fields(got["body.fwd"]), _fields(fwd), **TOL)
    chex.assert_trees_all_close(_fields(got["body.bwd"]), _fields(bwd), **TOL)


def test_over_cores_lyapunov_with_lengths():
    cell = seqjax.rnn(3)
    model = many_to_one(bidirectional(cell), dense(2))
    params = _init(model, 17, I)
    xs = _xs(17)
    lengths = np.array([6, 5, 4], np.int32)

    def lyapunov(*args, **kwargs):
        # JAX's default rank promotion inside the spectrum tool only (its lengths path
        # broadcasts (T,) against (*batch, 1)); recurrent_cores still runs under "raise".
        with jax.numpy_rank_promotion("allow"):
            return spectrum.lyapunov_spectrum(*args, **kwargs)

    got = over_cores(lyapunov, model, params, xs, lengths=lengths, k=2)
    assert list(got) == ["body.fwd", "body.bwd"]
    fwd = lyapunov(cell, params["body"]["fwd"], xs, k=2, lengths=lengths)
    bwd = lyapunov(cell, params["body"]["bwd"], _reverse_by_hand(xs, lengths), k=2, lengths=lengths)
    chex.assert_trees_all_close(_fields(got["body.fwd"]), _fields(fwd), **TOL)
    chex.assert_trees_all_close(_fields(got["body.bwd"]), _fields(bwd), **TOL)


# --------------------------------------------------------------------------- refusals


def test_refuses_models_without_the_capability():
    with pytest.raises(TypeError, match=r"a dict has no cores capability.*Supported: a seqjax Cell"):
        recurrent_cores({"w": 1}, None, _xs())
    cell = seqjax.rnn(H)
    hand = Layer(cell.init, lambda p, xs, **kw: seqjax.unroll(cell, p, xs), cell.initial_carry)
    params = _init(cell, 0, I)
    with pytest.raises(TypeError, match=r"a Layer has no cores capability \(its cores field is None"):
        recurrent_cores(hand, params, _xs())
    with pytest.raises(TypeError, match=r"stack_layers: layers\[1\] is a Layer without the cores capability"):
        recurrent_cores(stack_layers([cell, hand]), (params, _init(cell, 1, H)), _xs())
    with pytest.raises(TypeError, match=r"many_to_one: the body is a Layer without the cores capability"):
        recurrent_cores(many_to_one(hand), {"body": params, "head": None}, _xs())


def test_refuses_fixed_mask_and_resets():
    cell = seqjax.rnn(H)
    params = _init(cell, 0, I)
    mask = jnp.ones((B, T), bool)
    with pytest.raises(ValueError, match=r"as_layer: this layer has mask= fixed.*analyse the cell directly"):
        recurrent_cores(as_layer(cell, mask=mask), params, _xs())
    bi = bidirectional(cell, resets=jnp.zeros((B, T), bool))
    with pytest.raises(ValueError, match=r"bidirectional: this layer has resets= fixed"):
        recurrent_cores(bi, {"fwd": params, "bwd": params}, _xs())


def test_refuses_bad_inputs():
    cell = seqjax.rnn(H)
    params = _init(cell, 0, I)
    with pytest.raises(ValueError, match=r"lengths has shape \(2,\) but needs \(3,\), the batch shape of xs"):
        recurrent_cores(bidirectional(cell), {"fwd": params, "bwd": params}, _xs(), lengths=np.array([1, 2]))
    with pytest.raises(ValueError, match=r"lengths must be integers, got dtype float32"):
        recurrent_cores(as_layer(cell), params, _xs(), lengths=np.array([1.0, 2.0, 3.0], np.float32))
    with pytest.raises(ValueError, match=r"as_layer: params is None"):
        recurrent_cores(as_layer(cell), None, _xs())
    model = encoder_decoder(cell, cell)
    p = {"encoder": params, "decoder": params, "head": None}
    with pytest.raises(
        ValueError, match=r"xs must be the pair \(src, dec_inputs\), got an array of shape \(3, 6, 2\)"
    ):
        recurrent_cores(model, p, _xs())
    with pytest.raises(ValueError, match=r"xs must be the pair \(src, dec_inputs\), got a tuple of length 3"):
        recurrent_cores(model, p, (_xs(), _xs(), _xs()))
    with pytest.raises(ValueError, match=r"lengths must be the pair \(src_lengths, dec_lengths\)"):
        recurrent_cores(model, p, (_xs(), _xs()), lengths=LENGTHS)
    with pytest.raises(
        ValueError, match=r"dec_lengths has shape \(2,\) but needs \(3,\), the batch shape of dec"
    ):
        recurrent_cores(model, p, (_xs(), _xs()), lengths=(LENGTHS, np.array([1, 2], np.int32)))
    with pytest.raises(ValueError, match=r"src has batch shape \(3,\) but dec_inputs has \(2,\)"):
        recurrent_cores(model, p, (_xs(), _xs(1, (2, T, I))))
