"""What makes ``fit`` as fast as a bare loop, checked for exactness (issue 18).

* The keys of a batch function are made a block at a time and handed over as typed keys
  built from host data; the reference is the eager ``jax.random.fold_in(data_key, i)`` of
  each index (bit-for-bit key data), across block boundaries, from a resumed position, near
  the ``uint32`` limit, and inside ``fit``.
* ``fit`` dispatches at most ``_MAX_IN_FLIGHT`` calls ahead of the device: counted by the
  waits (``jax.block_until_ready``) before each draw of the data; without the bound a run
  with no log row before its end waits for nothing.
* Batch checks are cached per signature (tree, shapes, dtypes) and stay exact: a later batch
  with a new dtype or a fused group of mixed shapes is still refused, naming the batch.

Speed itself is measured by ``python -m benchmarks.fit_speed``, not here.
"""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax.train import Logging, fit
from seqjax.train import data as train_data
from seqjax.train import loop as train_loop

KEY = jax.random.key(0)
DATA_KEY = jax.random.split(KEY)[0]  # fit's data key: split(key)[0]
QUIET = Logging(every=4, progress=False)


def eager_key_data(key, i: int) -> np.ndarray:
    return np.asarray(jax.random.key_data(jax.random.fold_in(key, i)))


def drawn_key_data(key, start: int, n: int) -> list[np.ndarray]:
    """Key data of the first ``n`` batches a batch-function source draws from ``start`` on."""
    src = train_data._Fn(lambda k: (np.asarray(jax.random.key_data(k))[None],), key)
    batches = src.epoch(0, start)
    return [next(batches)[0][0] for _ in range(n)]


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_batch_function_keys_equal_eager_fold_in_across_blocks(impl):
    key = jax.random.key(7, impl=impl)
    block = train_data._KEY_BLOCK
    start = 5  # a resumed run starts mid-stream; three blocks are read
    got = drawn_key_data(key, start, 2 * block + 3)
    want = [eager_key_data(key, i) for i in range(start, start + len(got))]
    # exact: fold_in is an integer hash, the batched and the eager call give the same bits
    np.testing.assert_array_equal(np.stack(got), np.stack(want))


def test_batch_function_keys_near_the_uint32_limit_fall_back_to_eager_fold_in():
    block = train_data._KEY_BLOCK
    start = 2**32 - block - 2  # one block fits; the last two indices are made eagerly
    src = train_data._Fn(lambda k: (np.asarray(jax.random.key_data(k))[None],), KEY)
    batches = src.epoch(0, start)
    got = [next(batches)[0][0] for _ in range(block + 2)]
    want = [eager_key_data(KEY, i) for i in range(start, 2**32)]
    np.testing.assert_array_equal(np.stack(got), np.stack(want))
    with pytest.raises(OverflowError):  # index 2**32, as the eager fold_in refuses it
        next(batches)


def linear_loss(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] - y) ** 2)


def params0():
    return {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)}


def batch_of(i, n=8, d=3):
    rng = np.random.default_rng(100 + i)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, 2)).astype(np.float32)


def test_fit_hands_the_batch_function_fold_in_keys_across_blocks(monkeypatch):
    monkeypatch.setattr(train_data, "_KEY_BLOCK", 4)  # 10 steps cross two block boundaries
    seen = []

    def fn(key):
        seen.append(np.asarray(jax.random.key_data(key)))
        return batch_of(0)

    fit(linear_loss, optax.sgd(0.1), params0(), fn, key=KEY, steps=10, logging=QUIET, mesh=None)
    # draw 0 is read twice: once for fit's checks (first batch), once to train on
    want = [eager_key_data(DATA_KEY, i) for i in [0, *range(10)]]
    np.testing.assert_array_equal(np.stack(seen), np.stack(want))


def test_fit_dispatches_at_most_a_few_calls_ahead_of_the_device(monkeypatch):
    waits, drawn = [], []
    real = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: waits.append(1) or real(x))

    class Recorded:  # an iterable of batches recording, per draw, how many waits came before
        def __len__(self):
            return 12

        def __iter__(self):
            for i in range(12):
                drawn.append(len(waits))
                yield batch_of(i)

    # no row before the end: nothing but the bound makes fit wait for the device
    every12 = Logging(every=12, progress=False)
    fit(linear_loss, optax.sgd(0.1), params0(), Recorded(), key=KEY, epochs=1, logging=every12, mesh=None)
    bound = train_loop._MAX_IN_FLIGHT
    # drawn[0] is fit's first look at the data; drawn[1 + i] is batch i, drawn once calls
    # 0..i-1 were dispatched: at most `bound` of them may still be running, so fit must have
    # waited for (the metrics of) calls 0..i-1-bound, one wait each, in order
    late = [(i, n) for i, n in enumerate(drawn[1:]) if n < i - bound]
    assert late == [], f"(batch, calls waited for) drawn too far ahead of the device: {late}"
    assert len(waits) == 12 - bound  # and no more: the run-ahead is kept up to the bound


def test_cached_batch_checks_still_refuse_a_new_dtype_or_mixed_fused_shapes():
    ok = batch_of(0)
    bad_dtype = (ok[0].astype(np.int32), ok[1])
    with pytest.raises(ValueError, match=r"batch 2 of train_data\[0\] has dtype int32 but the training"):
        fit(linear_loss, optax.sgd(0.1), params0(), [ok, ok, bad_dtype], key=KEY, epochs=1, mesh=None)
    wider = batch_of(1, n=16)  # another batch size: a new shape, allowed alone, not fused with ok
    with pytest.raises(ValueError, match=r"fuses batches 2\.\.3 of train_data into one call"):
        fit(
            linear_loss,
            optax.sgd(0.1),
            params0(),
            [ok, ok, ok, wider],
            key=KEY,
            epochs=1,
            steps_per_call=2,
            logging=Logging(every=2, progress=False),
            mesh=None,
        )
    # the same signature again after a refused one: the cache holds only batches that passed
    result = fit(linear_loss, optax.sgd(0.1), params0(), [ok, wider, ok, wider], key=KEY, epochs=1, mesh=None)
    chex.assert_trees_all_equal(int(result.state.step), 4)


@pytest.mark.bench
def test_fit_speed_benchmark_tiny(tmp_path):
    # the suite's plumbing at toy sizes (bench: runs with --runbench only): every way ran each
    # round, the paired ratios are the rounds' rate ratios, fit matches the bare loop, files
    from benchmarks import fit_speed

    assert fit_speed.main(["--tiny", "--ways", "bare,bare_seeds,fit", "--out", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "fit_speed.json").read_text())
    assert d["command"] == "python -m benchmarks.fit_speed --tiny --ways bare,bare_seeds,fit"
    assert [r["way"] for r in d["rows"]] == ["bare", "bare_seeds", "fit"]
    rate = {r["way"]: r["whole_steps_per_s"] for r in d["rows"]}
    fit_row = next(s for s in d["summary"] if s["way"] == "fit")
    assert fit_row["whole_ratio_to_bare"]["median"] == pytest.approx(rate["fit"] / rate["bare"])
    assert all(c["ok"] for c in d["checks"]) and len(d["checks"]) == 2
    assert "| fit |" in (tmp_path / "fit_speed.md").read_text()
