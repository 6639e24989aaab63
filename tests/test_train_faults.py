"""fit never fails silently: non-finite data, skipped steps, lengths, derived defaults, retracing.

References: a hand-written optax loop (skipped steps are exactly the batches absent), the
unpadded sequences run one by one (bucketed, padded training), the data's own indices.
Float32 comparisons at rtol 1e-6 are the same float32 ops in another order (sums over a
batch of 8).
"""

from __future__ import annotations

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import seqjax as sj
from seqjax.train import (
    Evaluation,
    Logging,
    NonFiniteError,
    PaddedBatch,
    RetraceWarning,
    SkippedStepsWarning,
    bucket_by_length,
    fit,
)
from seqjax.train.data import _Iter

KEY = jax.random.key(0)
DATA_KEY = jax.random.split(KEY)[0]  # fit's data key: split(key)[0]
QUIET = Logging(every=4, progress=False)


def linear_loss(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] - y) ** 2)


def params0():
    return {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)}


def batch_of(i):
    rng = np.random.default_rng(100 + i)
    return rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)


def nan_batch():
    x, y = batch_of(0)
    return np.full_like(x, np.nan), y


@functools.cache
def _draws() -> dict[bytes, int]:
    ks = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(DATA_KEY, i)))(jnp.arange(64))
    return {np.asarray(k).tobytes(): i for i, k in enumerate(ks)}


def draw_index(key) -> int:
    """Which draw ``fold_in(DATA_KEY, i)`` a batch function was called with (i < 64)."""
    return _draws()[np.asarray(jax.random.key_data(key)).tobytes()]


def data_fn(bad=()):
    def fn(key):
        i = draw_index(key)
        return nan_batch() if i in bad else batch_of(i)

    return fn


def manual(batches, opt=optax.sgd(0.1)):
    """A hand-written optax loop over the finite batches; returns params and gradient norms."""
    p = params0()
    s = opt.init(p)
    norms = []
    for b in batches:
        g = jax.grad(linear_loss)(p, b)
        norms.append(float(optax.tree.norm(g)))
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
    return p, norms


# --------------------------------------------------------------------------- non-finite data


def test_nan_array_data_is_refused_before_any_compute():
    x, y = (np.concatenate(a) for a in zip(*[batch_of(i) for i in range(4)], strict=True))
    x[13, 2] = np.nan
    x[20, 0] = np.inf
    calls = []

    def loss(p, b):
        calls.append(1)
        return linear_loss(p, b)

    with pytest.raises(
        ValueError,
        match=r"train_data\[0\] holds non-finite values in 2 of its 32 examples; "
        r"the first is example 13 \(value nan at index \(13, 2\)\).*check_finite=False",
    ):
        fit(loss, optax.sgd(0.1), params0(), (x, y), key=KEY, steps=2, batch_size=8)
    with pytest.raises(ValueError, match=r"Evaluation.data\[1\] holds non-finite .* example 3"):
        y_bad = y.copy()
        y_bad[3, 1] = np.nan
        fit(
            loss,
            optax.sgd(0.1),
            params0(),
            (x[:8], y[:8]),
            key=KEY,
            steps=2,
            batch_size=8,
            evaluation=Evaluation((x[:8], y_bad[:8])),
        )
    assert calls == []  # nothing traced, let alone run


def test_every_step_skipped_raises_with_the_untouched_state():
    with pytest.raises(
        NonFiniteError,
        match=r"every one of the 8 steps was skipped.*step 1: batch function "
        r"draw 0 \(key fold_in\(data_key, 0\)\)",
    ) as e:
        fit(
            linear_loss,
            optax.sgd(0.1),
            params0(),
            data_fn(bad=range(8)),
            key=KEY,
            steps=8,
            logging=Logging(progress=False),
            mesh=None,
            max_skipped_fraction=None,
        )
    chex.assert_trees_all_equal(e.value.state.params, params0())  # never updated, and said so
    assert e.value.history[-1]["skipped_steps"] == list(range(1, 9))
    # the default limit (half the steps) stops the same run at its first row
    with pytest.raises(
        NonFiniteError,
        match=r"8 of the 8 steps taken were skipped, more than "
        r"max_skipped_fraction=0.5",
    ):
        fit(
            linear_loss,
            optax.sgd(0.1),
            params0(),
            data_fn(bad=range(8)),
            key=KEY,
            steps=8,
            logging=Logging(progress=False),
            mesh=None,
        )


def test_skipped_function_batches_are_named_and_kept_apart_from_the_means():
    with pytest.warns(SkippedStepsWarning) as w:
        res = fit(
            linear_loss,
            optax.sgd(0.1),
            params0(),
            data_fn(bad={2, 5}),
            key=KEY,
            steps=8,
            logging=QUIET,
            mesh=None,
        )
    msgs = [str(m.message) for m in w]
    assert len(msgs) == 2 and "skipped 1 of the last 4 steps" in msgs[0]
    assert "step 3: batch function draw 2 " in msgs[0] and "step 6: batch function draw 5 " in msgs[1]
    assert res.skipped_steps == [3, 6] and [r["skipped_steps"] for r in res.history] == [[3], [6]]
    assert [r["skipped"] for r in res.history] == [1, 2]
    p, norms = manual([batch_of(i) for i in range(8) if i not in (2, 5)])
    chex.assert_trees_all_close(res.state.params, p, rtol=1e-6)  # as if those batches were absent
    for row, ns in zip(res.history, (norms[:3], norms[3:]), strict=True):
        assert np.isfinite(row["grad_norm_max"])
        np.testing.assert_allclose(row["grad_norm_max"], max(ns), rtol=1e-5)
        np.testing.assert_allclose(row["grad_norm"], np.mean(ns), rtol=1e-5)


def test_skipped_iterable_batches_are_named_and_the_fraction_limit_raises():
    batches = [batch_of(0), nan_batch(), batch_of(2), batch_of(3)]
    with pytest.warns(SkippedStepsWarning, match=r"step 2: epoch 0 batch 1 of the iterable"):
        res = fit(
            linear_loss, optax.sgd(0.1), params0(), batches, key=KEY, epochs=1, logging=QUIET, mesh=None
        )
    assert res.skipped_steps == [2]
    bad = [batch_of(0), nan_batch(), nan_batch(), nan_batch()]
    with pytest.raises(
        NonFiniteError, match=r"3 of the 4 steps taken were skipped, more than max_skipped_fraction=0.5"
    ):
        fit(linear_loss, optax.sgd(0.1), params0(), bad, key=KEY, epochs=1, logging=QUIET, mesh=None)
    with pytest.raises(ValueError, match=r"max_skipped_fraction must be a number in \[0, 1\)"):
        fit(linear_loss, optax.sgd(0.1), params0(), bad, key=KEY, epochs=1, max_skipped_fraction=1.0)


def test_metrics_are_fetched_only_at_log_rows(monkeypatch):
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real(x))
    fit(linear_loss, optax.sgd(0.1), params0(), data_fn(), key=KEY, steps=12, logging=QUIET, mesh=None)
    assert len(calls) == 3  # one per row (steps 4, 8, 12), none per step


# --------------------------------------------------------------------------- lengths


def padded_arrays(n=16, T=5):
    rng = np.random.default_rng(1)
    return {
        "xs": rng.normal(size=(n, T, 3)).astype(np.float32),
        "lengths": rng.integers(1, T + 1, n).astype(np.int32),
        "ys": rng.normal(size=(n, 4)).astype(np.float32),
    }


CELL = sj.rnn(4)
CELL_PARAMS = CELL.init(jax.random.key(3), input_size=3)


def padded_loss(p, b):
    carry, _ = sj.unroll(CELL, p, b["xs"], lengths=b["lengths"])
    return jnp.mean((carry - b["ys"]) ** 2)


@pytest.mark.parametrize("bad, shown", [(6, "6 is outside \\[0, T=5\\]"), (-3, "-3 is outside \\[0, T=5\\]")])
def test_out_of_range_lengths_in_array_data_are_refused(bad, shown):
    data = padded_arrays()
    data["lengths"][3] = bad
    with pytest.raises(ValueError, match=rf"train_data\['lengths'\]\[3\] = {shown} \(T = xs.shape\[1\]\)"):
        fit(padded_loss, optax.sgd(0.1), CELL_PARAMS, data, key=KEY, steps=2, batch_size=8)


def test_out_of_range_lengths_in_function_data_name_the_batch():
    data = padded_arrays()

    def fn(key):
        b = dict(data)
        if draw_index(key) == 2:
            b["lengths"] = np.where(np.arange(16) == 5, 9, data["lengths"]).astype(np.int32)
        return b

    with pytest.raises(
        ValueError, match=r"batch 2 of train_data\['lengths'\]\[5\] = 9 is outside \[0, T=5\]"
    ):
        fit(padded_loss, optax.sgd(0.1), CELL_PARAMS, fn, key=KEY, steps=4, logging=QUIET, mesh=None)


# --------------------------------------------------------------------------- defaults


def test_defaults_are_derived_from_what_was_given():
    with pytest.raises(ValueError, match=r"^steps=10 must be a multiple of steps_per_call=3\.$"):
        fit(linear_loss, optax.sgd(0.1), params0(), data_fn(), key=KEY, steps=10, steps_per_call=3)
    res = fit(
        linear_loss,
        optax.sgd(0.1),
        params0(),
        data_fn(),
        key=KEY,
        steps=12,
        steps_per_call=3,
        logging=Logging(progress=False),
        mesh=None,
    )
    assert [r["step"] for r in res.history] == [12]  # a row every 51 steps (the default), and at the end
    x, y = batch_of(0)
    res = fit(
        linear_loss,
        optax.sgd(0.1),
        params0(),
        data_fn(),
        key=KEY,
        steps=12,
        steps_per_call=3,
        logging=Logging(progress=False),
        evaluation=Evaluation((x, y), every=6),
        mesh=None,
    )
    assert [r["step"] for r in res.history] == [6, 12] and all("eval_loss" in r for r in res.history)
    with pytest.raises(ValueError, match=r"Evaluation\.every=6 must be a multiple of Logging\.every=4"):
        fit(
            linear_loss,
            optax.sgd(0.1),
            params0(),
            data_fn(),
            key=KEY,
            steps=12,
            logging=QUIET,
            evaluation=Evaluation((x, y), every=6),
        )


# --------------------------------------------------------------------------- shapes and buckets


def varlen(n=40, seed=0, lo=2, hi=30):
    rng = np.random.default_rng(seed)
    seqs = [rng.normal(size=(int(t), 3)).astype(np.float32) for t in rng.integers(lo, hi, n)]
    return seqs, rng.normal(size=(n, 4)).astype(np.float32)


def test_bucket_by_length_pads_each_sequence_once_per_epoch():
    seqs, ys = varlen()
    steps = [s.shape[0] for s in seqs]
    data = bucket_by_length(seqs, ys, batch_size=4, num_buckets=3, drop_remainder=False, pad_value=-7.0)
    assert len(data.shapes) <= 4 and len({T for _, T in data.shapes}) <= 3  # one smaller last batch
    kept = bucket_by_length(seqs, ys, batch_size=6, num_buckets=3)  # drop_remainder=True
    assert len(kept.shapes) <= 3 and len(kept) == len(seqs) // 6  # fewer than 6 sequences dropped
    for epoch in (0, 1):
        seen = []
        for b in data.iter_epoch(epoch):
            assert isinstance(b, PaddedBatch) and b.xs.shape[1] in data.edges
            for row, L in enumerate(b.lengths):
                # find the sequence by content: the padded row holds it, then pad_value
                i = next(j for j, s in enumerate(seqs) if steps[j] == L and np.array_equal(s, b.xs[row, :L]))
                assert np.all(b.xs[row, L:] == -7.0) and np.array_equal(b.ys[row], ys[i])
                seen.append(i)
        assert sorted(seen) == list(range(len(seqs)))  # each sequence exactly once
    firsts = (
        [b.lengths.tolist() for b in data.iter_epoch(0)],
        [b.lengths.tolist() for b in data.iter_epoch(1)],
    )
    assert firsts[0] != firsts[1]  # reshuffled per epoch ...
    assert firsts[0] == [b.lengths.tolist() for b in data.iter_epoch(0)]  # ... deterministically
    it = _Iter(data, "train_data")  # fit reads epoch e through iter_epoch(e), from any position
    got = [b.lengths.tolist() for b in it.epoch(1, 2)]
    assert got == firsts[1][2:]


def test_bucket_by_length_rejects_bad_input():
    seqs, ys = varlen()
    with pytest.raises(ValueError, match=r"xs\[1\] has shape \(\d+, 2\)"):
        bucket_by_length([seqs[0], seqs[1][:, :2]], batch_size=2)
    with pytest.raises(ValueError, match=r"ys has shape \(3, 4\) but needs \(40, \*target\)"):
        bucket_by_length(seqs, ys[:3], batch_size=2)
    with pytest.raises(ValueError, match=r"boundaries end at 10 but the longest sequence has"):
        bucket_by_length(seqs, boundaries=[5, 10], batch_size=2)
    with pytest.raises(ValueError, match="equal-length data needs no bucketing"):
        bucket_by_length(np.zeros((4, 5, 3)), batch_size=2)


def test_bucketed_training_equals_the_unpadded_sequences_one_by_one():
    seqs, ys = varlen(n=8, lo=2, hi=5)  # three distinct lengths: three reference compilations
    data = bucket_by_length(seqs, ys, batch_size=8, boundaries=[4], shuffle=False)  # one batch

    def loss(p, b):
        carry, _ = sj.unroll(CELL, p, b.xs, lengths=b.lengths)
        return jnp.mean(jnp.sum((carry - b.ys) ** 2, -1))

    res = fit(loss, optax.sgd(0.1), CELL_PARAMS, data, key=KEY, steps=1, logging=QUIET, mesh=None)

    @jax.jit
    @jax.grad
    def one(p, x, y):  # one sequence at its own length: no padding, no lengths
        carry, _ = sj.unroll(CELL, p, x[None])
        return jnp.sum((carry[0] - y) ** 2)

    (b,) = list(data.iter_epoch(0))
    assert b.lengths.tolist() == [len(s) for s in seqs]  # shuffle=False: input order
    grads = [one(CELL_PARAMS, s, y) for s, y in zip(seqs, ys, strict=True)]
    want = jax.tree.map(lambda p, *g: p - 0.1 * sum(g) / len(g), CELL_PARAMS, *grads)
    chex.assert_trees_all_close(res.state.params, want, rtol=1e-5, atol=1e-7)


def test_changing_shapes_warn_and_buckets_do_not():
    seqs, ys = varlen(n=24, lo=2, hi=9)

    def loss(p, b):
        return jnp.mean((b.xs.sum(1) @ p["w"][:, :4] - b.ys) ** 2)

    per_batch = [  # each batch padded to its own longest sequence: a new shape almost every batch
        PaddedBatch(np.zeros((2, T, 3), np.float32), np.full(2, T, np.int32), ys[:2]) for T in range(2, 8)
    ]
    w = {"w": jnp.ones((3, 4))}
    with pytest.warns(RetraceWarning, match=r"traced and compiled 5 times.*bucket_by_length"):
        fit(loss, optax.sgd(0.1), w, per_batch, key=KEY, epochs=1, logging=QUIET, mesh=None)
    data = bucket_by_length(seqs, ys, batch_size=2, num_buckets=3)
    assert len(data) >= 8 and len(data.shapes) <= 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", RetraceWarning)
        fit(loss, optax.sgd(0.1), w, data, key=KEY, epochs=2, logging=QUIET, mesh=None)
