"""Sequence shapes and generation (seqjax.seq2seq) against hand-written Python loops.

References are plain Python loops over ``cell.step`` (no scan, no ``unroll``), one
sequence at a time where lengths differ. float64 comparisons at 1e-12 (same operations,
different program structure); token sequences compared exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close

from seqjax import gru, lstm, rnn
from seqjax.layers import bidirectional, dense, embedding, stack
from seqjax.seq2seq import (
    closed_loop,
    encoder_decoder,
    generate,
    last_step,
    many_to_many,
    many_to_one,
    pool,
)

TOL = 1e-12


def _init(model, seed, *sizes):
    """Params with the tree and shapes ``model.init`` makes (``jax.eval_shape``: the real
    init code), filled with NumPy ``U(-0.6, 0.6)`` values: cheap (no PRNG compilation) and
    as good as any init for equivalence tests."""
    shapes = jax.eval_shape(lambda k: model.init(k, *sizes), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.uniform(-0.6, 0.6, s.shape), s.dtype), shapes)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), tree)


_JIT = {}


def _step(cell):
    """``jax.jit(cell.step)``, cached per cell object (only to keep the loops fast)."""
    if id(cell) not in _JIT:
        _JIT[id(cell)] = (cell, jax.jit(cell.step))
    return _JIT[id(cell)][1]


def _loop(cell, params, xs, carry=None):
    """Python loop over one unbatched sequence xs: (T, I)."""
    c = cell.initial_carry(params, ()) if carry is None else carry
    ys = []
    step = _step(cell)
    for t in range(xs.shape[0]):
        c, y = step(params, c, xs[t])
        ys.append(y)
    return c, (jnp.stack(ys) if ys else None)


def test_pool_and_last_step_against_numpy():
    ys = np.random.default_rng(0).normal(size=(3, 4, 2))
    n = np.array([4, 1, 0])
    np.testing.assert_allclose(
        np.asarray(last_step(ys, jnp.asarray(n))), [ys[0, 3], ys[1, 0], np.zeros(2)], rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(pool(ys, jnp.asarray(n), how="mean")), [ys[0].mean(0), ys[1, 0], np.zeros(2)], rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(pool(ys, jnp.asarray(n), how="max")), [ys[0].max(0), ys[1, 0], np.zeros(2)], rtol=1e-6
    )
    # time-major layout
    np.testing.assert_allclose(
        np.asarray(last_step(np.swapaxes(ys, 0, 1), jnp.asarray(n), time_axis=0)),
        np.asarray(last_step(ys, jnp.asarray(n))),
    )


def test_many_to_one_and_many_to_many_equal_per_sequence_loops(x64):
    cell, head = gru(4), dense(3)
    xs = _normal(0, (3, 5, 2))
    n = np.array([5, 2, 3])
    m1 = many_to_one(cell, head)
    params = _f64(_init(m1, 1, 2))
    logits = jax.jit(lambda p, x, l: m1.apply(p, x, lengths=l))(params, xs, jnp.asarray(n))
    m2 = many_to_many(cell, head)
    tags = jax.jit(lambda p, x, l: m2.apply(p, x, lengths=l))(params, xs, jnp.asarray(n))
    for b in range(3):
        _, ys = _loop(cell, params["body"], xs[b, : n[b]])
        assert_trees_close(logits[b], head.apply(params["head"], ys[-1]), rtol=0, atol=TOL)
        assert_trees_close(tags[b, : n[b]], head.apply(params["head"], ys), rtol=0, atol=TOL)
        assert np.all(np.asarray(tags[b, n[b] :]) == 0)
    # a bidirectional body with mean pooling
    r = rnn(3)
    m3 = many_to_one(bidirectional(r), dense(2), pool_by="mean")
    p3 = _f64(_init(m3, 2, 2))
    out = jax.jit(lambda p, x, l: m3.apply(p, x, lengths=l))(p3, xs, jnp.asarray(n))
    for b in range(3):
        x = xs[b, : n[b]]
        _, yf = _loop(r, p3["body"]["fwd"], x)
        _, yb = _loop(r, p3["body"]["bwd"], x[::-1])
        feats = jnp.concatenate([yf, yb[::-1]], -1).mean(0)
        assert_trees_close(out[b], dense(2).apply(p3["head"], feats), rtol=0, atol=TOL)


def test_encoder_decoder_teacher_forcing_equals_python_loop(x64):
    """Deep LSTM encoder -> deep LSTM decoder, layer-matched carries, unequal lengths."""
    cells = [lstm(4), lstm(3)]
    enc, dec, head = stack(cells), stack(cells), dense(5)
    model = encoder_decoder(enc, dec, head)
    params = _f64(_init(model, 0, 2, 6))
    src = _normal(1, (2, 5, 2))
    tgt = _normal(2, (2, 4, 6))
    ns, nt = np.array([5, 3]), np.array([4, 2])
    out = jax.jit(
        lambda p, s, t: model.apply(p, s, t, src_lengths=jnp.asarray(ns), dec_lengths=jnp.asarray(nt))
    )(params, src, tgt)
    assert out.shape == (2, 4, 5)
    for b in range(2):
        # hand-written: every layer of every step, encoder then decoder
        c = [cl.initial_carry(p, ()) for cl, p in zip(cells, params["encoder"])]
        for t in range(ns[b]):
            x = src[b, t]
            for l, (cl, p) in enumerate(zip(cells, params["encoder"])):
                c[l], x = _step(cl)(p, c[l], x)
        for t in range(nt[b]):
            x = tgt[b, t]  # teacher forcing: the given decoder input
            for l, (cl, p) in enumerate(zip(cells, params["decoder"])):
                c[l], x = _step(cl)(p, c[l], x)
            assert_trees_close(out[b, t], head.apply(params["head"], x), rtol=0, atol=TOL)
        assert np.all(np.asarray(out[b, nt[b] :]) == 0)


def test_encoder_decoder_bridge_and_carry_check():
    enc, dec = bidirectional(gru(3)), gru(3)
    model = encoder_decoder(enc, dec, dense(2))
    params = _init(model, 0, 2, 2)
    src = _normal(1, (2, 4, 2))
    tgt = _normal(2, (2, 3, 2))
    with pytest.raises(ValueError, match="decoder initial carry"):
        jax.eval_shape(model.apply, params, src, tgt)  # a BiCarry is not a GRU carry
    bridged = encoder_decoder(enc, dec, dense(2), bridge=lambda c: c.fwd + c.bwd)
    out, c = jax.jit(lambda p, s, t: (bridged.apply(p, s, t), enc.apply(p["encoder"], s)[0]))(
        params, src, tgt
    )
    c0 = c.fwd + c.bwd
    ref = jnp.stack([_loop(dec, params["decoder"], tgt[b], c0[b])[1] for b in range(2)])
    assert_trees_close(out, dense(2).apply(params["head"], ref), rtol=0, atol=1e-6)


def _greedy_python(cell, params, head_p, emb_p, prompt_tokens, num_steps):
    """Greedy decoding written as a Python loop (one unbatched sequence)."""
    c = cell.initial_carry(params, ())
    y = None
    step = _step(cell)
    for tok in prompt_tokens:
        c, y = step(params, c, emb_p["table"][tok])
    out = []
    for _ in range(num_steps):
        tok = int(np.argmax(np.asarray(y) @ np.asarray(head_p["w"]) + np.asarray(head_p["b"])))
        out.append(tok)
        c, y = step(params, c, emb_p["table"][tok])
    return out, c


def test_generate_greedy_equals_python_loop_under_jit(x64):
    V, E = 7, 3
    cell, head, emb = stack([gru(5), lstm(4)]), dense(V), embedding(V, E)
    p = {
        "cell": _f64(_init(cell, 10, E)),
        "head": _f64(_init(head, 11, 4)),
        "emb": _f64(emb.init(jax.random.key(12))),
    }
    p["head"]["w"] = 3.0 * p["head"]["w"]  # sharper logits: varied tokens
    prompts = jnp.array([[1, 4, 2], [6, 0, 0]])
    plen = jnp.array([3, 1])  # unequal prompts, padded after

    @jax.jit
    def run(p, prompts, plen):
        return generate(
            cell,
            p["cell"],
            lambda y: head.apply(p["head"], y),
            emb.apply(p["emb"], prompts),
            8,
            feedback=lambda w: emb.apply(p["emb"], w),
            temperature=0.0,
            prompt_lengths=plen,
        )

    carry, tokens = run(p, prompts, plen)
    assert tokens.shape == (2, 8) and tokens.dtype == jnp.int32
    for b in range(2):
        ref, c_ref = _greedy_python(cell, p["cell"], p["head"], p["emb"], prompts[b, : int(plen[b])], 8)
        assert np.asarray(tokens[b]).tolist() == ref
        assert_trees_close(jax.tree_util.tree_map(lambda a: a[b], carry), c_ref, rtol=0, atol=TOL)
    assert len(set(np.asarray(tokens).ravel().tolist())) > 1  # not a degenerate constant sequence
    # a traced temperature of 0 is greedy too
    t0 = jax.jit(
        lambda t: generate(
            cell,
            p["cell"],
            lambda y: head.apply(p["head"], y),
            emb.apply(p["emb"], prompts),
            8,
            feedback=lambda w: emb.apply(p["emb"], w),
            temperature=t,
            key=jax.random.key(0),
            prompt_lengths=plen,
        )[1]
    )(jnp.float64(0.0))
    assert np.array_equal(np.asarray(t0), np.asarray(tokens))


def test_generate_samples_from_the_tempered_softmax():
    """First sampled token over many identical prompts: frequencies match
    softmax(logits / T) within 5 binomial standard deviations; greedy as T -> 0;
    keyed (same key, same tokens); top_k never leaves the k best."""
    V, N = 4, 4000
    cell, head = rnn(3), dense(V)
    pc, ph = _init(cell, 0, V), _init(head, 1, 3)
    ph = {"w": 4.0 * ph["w"], "b": ph["b"]}
    prompt = jnp.tile(jax.nn.one_hot(jnp.array([[2]]), V), (N, 1, 1))  # (N, 1, V), one-hot feedback
    readout = lambda y: head.apply(ph, y)
    gen = jax.jit(
        lambda k, t: generate(cell, pc, readout, prompt, 2, key=k, temperature=t, return_logits=True)
    )
    T = 1.7
    _, tokens, logits = gen(jax.random.key(3), T)
    probs = np.asarray(jax.nn.softmax(logits[0, 0] / T))
    freq = np.bincount(np.asarray(tokens[:, 0]), minlength=V) / N
    assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / N) + 1e-9), (freq, probs)
    _, again, _ = gen(jax.random.key(3), T)
    assert np.array_equal(np.asarray(again), np.asarray(tokens))
    _, cold, _ = gen(jax.random.key(4), 1e-6)
    _, greedy = generate(cell, pc, readout, prompt, 2, temperature=0)
    assert np.array_equal(np.asarray(cold), np.asarray(greedy))
    _, top = generate(cell, pc, readout, prompt, 1, key=jax.random.key(5), temperature=5.0, top_k=2)
    best2 = set(np.argsort(np.asarray(logits[0, 0]))[-2:].tolist())
    assert set(np.asarray(top).ravel().tolist()) <= best2
    with pytest.raises(ValueError, match="key"):
        generate(cell, pc, readout, prompt, 2)


def test_closed_loop_equals_python_loop(x64):
    cell, head = lstm(4), dense(2)
    pc = _f64(_init(cell, 0, 2))
    ph = _f64(_init(head, 1, 4))
    prompt = _normal(2, (3, 2))
    _, outs = jax.jit(lambda: closed_loop(cell, pc, prompt[None], 5, readout=lambda y: head.apply(ph, y)))()
    c, ys = _loop(cell, pc, prompt)
    y, ref = ys[-1], []
    for _ in range(5):
        o = head.apply(ph, y)
        ref.append(o)
        c, y = _step(cell)(pc, c, o)
    assert_trees_close(outs[0], jnp.stack(ref), rtol=0, atol=TOL)
