"""Tests of seqjax.train: the compiled step, clipping, fit, checkpoints and NaN safety.

Most tests use a tiny linear model (compiles in well under a second); one trains an LSTM on
the adding problem. References are hand-written optax loops and NumPy formulas.
"""

import csv
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close

import seqjax as sj
from seqjax.tasks import ADDING_BASELINE_MSE, adding_problem
from seqjax.train import (
    Checkpoints,
    ClipState,
    Evaluation,
    Logging,
    NonFiniteError,
    SkippedStepsWarning,
    TrainState,
    clipped,
    clipped_adam,
    evaluate,
    fit,
    init_train_state,
    make_eval_step,
    make_train_step,
    restore_checkpoint,
    save_checkpoint,
    track_clipping,
)

# --------------------------------------------------------------------------- a tiny model


def linear_params(seed, i=3, o=2):
    rng = np.random.default_rng(seed)  # NumPy: no threefry compile in every test
    return {
        "w": jnp.asarray(rng.normal(size=(i, o)), jnp.float32),
        "b": jnp.asarray(0.1 * rng.normal(size=o), jnp.float32),
    }


def linear_loss(p, batch):
    x, y = batch
    pred = x @ p["w"] + p["b"][None, :]
    return jnp.mean((pred - y) ** 2)


def regression_data(n=48, seed=0, i=3, o=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, i)).astype(np.float32)
    w = rng.normal(size=(i, o)).astype(np.float32)
    y = (x @ w + 0.05 * rng.normal(size=(n, o))).astype(np.float32)
    return x, y


def manual_run(loss_fn, opt, params, batches, skip=()):
    """A plain optax loop (the reference): value_and_grad, update, apply_updates."""

    @jax.jit
    def step(p, s, b):
        g = jax.grad(loss_fn)(p, b)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = opt.init(params)
    for i, b in enumerate(batches):
        if i in skip:
            continue
        params, s = step(params, s, b)
    return params


# --------------------------------------------------------------------------- the step


def test_step_compiles_once_and_donates():
    traces = []

    def loss(p, b):
        traces.append(1)
        return linear_loss(p, b)

    opt = clipped_adam(1e-2)
    x, y = regression_data()
    state = init_train_state(linear_params(0), opt, key=jax.random.key(1))
    step = make_train_step(loss, opt)
    old = state
    for i in range(25):
        sl = slice((i % 6) * 8, (i % 6) * 8 + 8)
        state, m = step(state, (x[sl], y[sl]))
    assert len(traces) == 1, "the step retraced"
    assert int(state.step) == 25
    assert old.params["w"].is_deleted(), "the input state should be donated"

    traces.clear()
    fused = make_train_step(loss, opt, fused=True)
    s2 = init_train_state(linear_params(0), opt, key=jax.random.key(1))
    for _ in range(5):
        s2, m2 = fused(s2, (x[:32].reshape(4, 8, 3), y[:32].reshape(4, 8, 2)))
    assert len(traces) == 1
    assert m2["loss"].shape == (4,) and int(s2.step) == 20


def test_step_equals_optax_loop_and_reports_grad_norm():
    opt = optax.adam(1e-2)
    x, y = regression_data()
    p0 = linear_params(0)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]
    ref = manual_run(linear_loss, opt, p0, batches)
    state = init_train_state(jax.tree.map(jnp.copy, p0), opt, key=jax.random.key(0))
    step = make_train_step(linear_loss, opt)
    for b in batches:
        g = jax.grad(linear_loss)(state.params, b)
        want = np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in jax.tree.leaves(g)))
        state, m = step(state, b)
        np.testing.assert_allclose(float(m["grad_norm"]), want, rtol=1e-6)  # float32 sum order
        assert bool(m["finite"]) and "clipped" not in m  # no track_clipping stage: no claim
    assert_trees_close(state.params, ref, rtol=1e-6, atol=1e-7)  # same ops; tolerance for XLA fusion order


def _np_clip(rule, thr, g, p):
    """The clipping formulas, in float64 NumPy, written from the definitions."""
    if rule == "max_norm":
        n = np.sqrt(sum(np.sum(a**2) for a in g.values()))
        return {k: a * min(1.0, thr / n) for k, a in g.items()}
    if rule == "clip_value":
        return {k: np.clip(a, -thr, thr) for k, a in g.items()}
    out = {}  # adaptive, unit-wise: norms over all axes but the last for matrices; vectors whole
    for k, a in g.items():
        axis = tuple(range(a.ndim - 1)) if a.ndim > 1 else None
        gn = np.sqrt(np.sum(a**2, axis=axis, keepdims=a.ndim > 1))
        pn = np.sqrt(np.sum(p[k] ** 2, axis=axis, keepdims=p[k].ndim > 1))
        mx = thr * np.maximum(pn, 1e-3)
        out[k] = np.where(gn > mx, a * mx / np.maximum(gn, 1e-6), a)
    return out


@pytest.mark.parametrize("rule", ["max_norm", "clip_value", "adaptive"])
def test_clipping_changes_updates_as_optax_says(rule, x64):
    x, y = regression_data()
    x, y = x.astype(np.float64) * 10, y.astype(np.float64) * 10  # big gradients
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), linear_params(0))
    g = {k: np.asarray(v) for k, v in jax.grad(linear_loss)(p, (x, y)).items()}
    gnorm = np.sqrt(sum(np.sum(a**2) for a in g.values()))
    lr = 0.1
    for thr, expect_clip in ((1e-2, True), (1e6, False)):
        opt = clipped(optax.sgd(lr), **{rule: thr})
        # the recipe is the plain optax chain
        plain = {
            "max_norm": optax.clip_by_global_norm(thr),
            "clip_value": optax.clip(thr),
            "adaptive": optax.adaptive_grad_clip(thr),
        }[rule]
        ref_opt = optax.chain(plain, optax.sgd(lr))
        state = init_train_state(jax.tree.map(jnp.copy, p), opt, key=jax.random.key(0))
        new, m = make_train_step(linear_loss, opt)(state, (x, y))
        want = {
            k: np.asarray(p[k]) - lr * v
            for k, v in _np_clip(rule, thr, g, {k: np.asarray(a) for k, a in p.items()}).items()
        }
        assert_trees_close(new.params, want, rtol=1e-12, atol=1e-12)  # float64, a few flops
        assert_trees_close(new.params, manual_run(linear_loss, ref_opt, p, [(x, y)]), rtol=1e-13, atol=1e-14)
        assert bool(m["clipped"]) == expect_clip
        np.testing.assert_allclose(float(m["grad_norm"]), gnorm, rtol=1e-12)  # before clipping


def test_track_clipping_finds_nested_state_and_clipped_adam_default():
    opt = clipped_adam(1e-3)
    st = opt.init({"w": jnp.ones(2)})
    assert isinstance(st[0], ClipState)
    with pytest.raises(ValueError, match="exactly one"):
        clipped(optax.sgd(0.1), max_norm=1.0, clip_value=1.0)
    inner = optax.chain(optax.sgd(0.1), track_clipping(optax.clip(1e-9)))
    s = init_train_state({"w": jnp.ones(2)}, inner, key=jax.random.key(0))
    _, m = make_train_step(lambda p, b: jnp.sum((p["w"] - b[0]) ** 2), inner)(s, jnp.zeros((1, 2)))
    assert bool(m["clipped"])


def test_eval_step_and_key_none_for_eval():
    seen = []

    def loss(p, b, key):
        seen.append(key is None)
        return linear_loss(p, b)

    x, y = regression_data()
    p = linear_params(0)
    m = make_eval_step(loss, with_key=True)(p, (x, y))
    np.testing.assert_allclose(float(m["loss"]), float(linear_loss(p, (x, y))), rtol=1e-6)
    assert seen == [True]
    ev = make_eval_step(linear_loss)
    got = evaluate(ev, p, [(x[:20], y[:20]), (x[20:], y[20:])])  # 20 + 28 examples, weighted
    np.testing.assert_allclose(got["loss"], float(linear_loss(p, (x, y))), rtol=1e-5)  # float32 sums


# --------------------------------------------------------------------------- fit


@pytest.mark.slow  # 400 training steps (10-17 s); the default run checks the step against optax loops
def test_lstm_learns_adding_problem_below_baseline():
    T, H = 10, 16
    cell = sj.lstm(H, forget_bias=1.0)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"cell": cell.init(k1, 2), "w": 0.1 * jax.random.normal(k2, (H, 1)), "b": jnp.ones((1,))}

    def loss(p, batch):
        xs, ys = batch
        c, _ = sj.unroll(cell, p["cell"], xs)
        return jnp.mean(((c.h @ p["w"])[:, 0] + p["b"][0] - ys) ** 2)

    test = adding_problem(jax.random.key(99), 512, T)
    res = fit(
        loss,
        clipped_adam(1e-2),
        params,
        lambda k: adding_problem(k, 32, T),
        key=jax.random.key(1),
        steps=400,
        steps_per_call=20,
        logging=Logging(every=100),
        evaluation=Evaluation(test),
        mesh=None,
    )
    h = res.history
    assert [r["step"] for r in h] == [100, 200, 300, 400]
    assert h[-1]["eval_loss"] < 0.5 * ADDING_BASELINE_MSE, h
    assert h[-1]["eval_loss"] < h[0]["eval_loss"]
    assert all(np.isfinite(r["grad_norm"]) for r in h)


def test_fit_arrays_shuffle_epochs_history_files(tmp_path):
    x, y = regression_data(n=50)
    rows = []
    res = fit(
        linear_loss,
        optax.adam(5e-2),
        linear_params(0),
        (x, y),
        key=jax.random.key(3),
        epochs=4,
        batch_size=8,  # 6 full batches per epoch; the last 2 examples are dropped
        evaluation=Evaluation((x, y), batch_size=16),  # 16+16+16+2: weighted mean = full-batch loss
        logging=Logging(
            every=3,
            callbacks=[lambda row, st: rows.append((row["step"], int(st.step)))],
            history_path=tmp_path / "h.json",
        ),
    )
    assert int(res.state.step) == 24
    assert [r["step"] for r in res.history] == list(range(3, 25, 3))
    assert [r["epoch"] for r in res.history] == [0, 1, 1, 2, 2, 3, 3, 4]
    assert rows == [(s, s) for s in range(3, 25, 3)]
    np.testing.assert_allclose(
        res.history[-1]["eval_loss"], float(linear_loss(res.state.params, (x, y))), rtol=1e-5
    )
    assert res.history[-1]["eval_loss"] < res.history[0]["eval_loss"]
    assert json.loads((tmp_path / "h.json").read_text()) == res.history
    fit(
        linear_loss,
        optax.sgd(0.1),
        linear_params(0),
        (x, y),
        key=jax.random.key(3),
        steps=4,
        batch_size=8,
        logging=Logging(every=2, history_path=tmp_path / "h.csv"),
    )
    with open(tmp_path / "h.csv") as f:
        got = list(csv.DictReader(f))
    assert [int(r["step"]) for r in got] == [2, 4]


def test_fit_shuffle_uses_each_example_once_per_epoch():
    n, bs = 12, 4
    x = np.arange(n, dtype=np.float32)[:, None]
    seen = []

    def loss(p, b):
        jax.debug.callback(lambda v: seen.append(np.asarray(v).ravel().copy()), b[0])
        return jnp.mean((b[0] * p["w"][None, :]) ** 2)

    fit(
        loss,
        optax.sgd(0.0),
        {"w": jnp.ones(1)},
        (x, x),
        key=jax.random.key(0),
        epochs=2,
        batch_size=bs,
        logging=Logging(every=3),
        mesh=None,
    )
    jax.effects_barrier()
    e0, e1 = np.concatenate(seen[:3]), np.concatenate(seen[3:6])
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n))
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, np.arange(n))


def test_fit_fused_equals_single_and_fn_and_iterable_data():
    x, y = regression_data()
    p = linear_params(0)
    kw = dict(key=jax.random.key(5), steps=12, batch_size=8, logging=Logging(every=6), mesh=None)
    a = fit(linear_loss, optax.adam(1e-2), p, (x, y), **kw)
    b = fit(linear_loss, optax.adam(1e-2), p, (x, y), steps_per_call=3, **kw)
    assert_trees_close(a.state.params, b.state.params, rtol=1e-6, atol=1e-7)  # scan vs calls: fusion order
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]
    c = fit(
        linear_loss,
        optax.adam(1e-2),
        p,
        batches,
        key=jax.random.key(0),
        epochs=2,
        logging=Logging(every=6),
        mesh=None,
    )
    assert_trees_close(
        c.state.params, manual_run(linear_loss, optax.adam(1e-2), p, batches * 2), rtol=1e-6, atol=1e-7
    )
    d = fit(
        linear_loss,
        optax.adam(1e-2),
        p,
        iter(batches),
        key=jax.random.key(0),
        steps=100,
        logging=Logging(every=2),
        mesh=None,
    )
    assert int(d.state.step) == 6  # a one-shot iterator ends the run when it runs out
    e = fit(
        linear_loss,
        optax.adam(1e-2),
        p,
        lambda k: (jax.random.normal(k, (8, 3)), jnp.zeros((8, 2))),
        key=jax.random.key(0),
        steps=4,
        logging=Logging(every=2),
        mesh=None,
    )
    assert int(e.state.step) == 4


def test_fit_bad_input_raises_before_compute():
    x, y = regression_data()
    p = linear_params(0)
    calls = []

    def loss(p, b):
        calls.append(1)
        return linear_loss(p, b)

    with pytest.raises(ValueError, match="mismatched batch shapes"):
        fit(loss, optax.sgd(0.1), p, (x, y[:-1]), key=jax.random.key(0), steps=2, batch_size=8)
    with pytest.raises(ValueError, match="empty"):
        fit(loss, optax.sgd(0.1), p, (x[:0], y[:0]), key=jax.random.key(0), steps=2, batch_size=8)
    with pytest.raises(ValueError, match="empty"):
        fit(loss, optax.sgd(0.1), p, [], key=jax.random.key(0), steps=2)
    with pytest.raises(ValueError, match="dtype"):
        fit(
            loss,
            optax.sgd(0.1),
            p,
            (x, y),
            key=jax.random.key(0),
            steps=2,
            batch_size=8,
            evaluation=Evaluation((x, y.astype(np.int32))),
        )
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        fit(loss, optax.sgd(0.1), p, (x, y), key=jax.random.key(0), batch_size=8)
    assert calls == []  # nothing traced, let alone run

    def ce(p, b):
        calls.append(1)
        xx, labels = b
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(xx @ p["w"], labels))

    with pytest.raises(ValueError, match="loss_fn fails on the first training batch.*integer"):
        fit(
            ce, optax.sgd(0.1), p, (x, np.zeros(48, np.float32)), key=jax.random.key(0), steps=2, batch_size=8
        )
    assert len(calls) == 1  # one abstract trace (jax.eval_shape), no compiled step
    bad = [(x[:8], y[:8]), (x[:8], y[:8]), (x[:8, :2], y[:8])]
    with pytest.raises(ValueError, match="batch 2 of train_data"):
        fit(linear_loss, optax.sgd(0.1), p, bad, key=jax.random.key(0), epochs=1, mesh=None)


# --------------------------------------------------------------------------- checkpoints and resume


def noisy_loss(p, b, key):
    """Uses the step key (like dropout), so resuming must restore the key too."""
    x, y = b
    x = x + 0.1 * jax.random.normal(key, x.shape) if key is not None else x
    return linear_loss(p, (x, y))


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    x, y = regression_data(n=40)
    p = linear_params(0)
    kw = dict(
        key=jax.random.key(7),
        steps=14,
        batch_size=8,
        with_key=True,
        mesh=None,
        evaluation=Evaluation((x, y)),
    )  # 5 batches per epoch: the run crosses epoch boundaries
    full = fit(noisy_loss, clipped_adam(3e-2), p, (x, y), logging=Logging(every=2), **kw)

    def crash(row, state):
        if row["step"] == 10:
            raise Interrupt

    d = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        fit(
            noisy_loss,
            clipped_adam(3e-2),
            p,
            (x, y),
            checkpoints=Checkpoints(d, every=4),
            logging=Logging(every=2, callbacks=[crash]),
            **kw,
        )
    st, meta = restore_checkpoint(d, init_train_state(p, clipped_adam(3e-2), key=jax.random.key(0)))
    assert int(st.step) == 8 and meta["position"] == [1, 3]
    resumed = fit(
        noisy_loss,
        clipped_adam(3e-2),
        p,
        (x, y),
        checkpoints=Checkpoints(d, every=4, resume=True),
        logging=Logging(every=2),
        **kw,
    )
    chex.assert_trees_all_equal(resumed.state.params, full.state.params)
    chex.assert_trees_all_equal(resumed.state.opt_state, full.state.opt_state)
    assert np.array_equal(jax.random.key_data(resumed.state.key), jax.random.key_data(full.state.key))
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("time", "steps_per_sec")} for r in h]
    assert strip(resumed.history) == strip(full.history)


def test_nan_skip_leaves_params_as_if_batch_absent(tmp_path):
    x, y = regression_data()
    x_bad = x.copy()
    x_bad[24] = np.nan  # in batch 3 (0-based) without shuffling
    p = linear_params(0)
    opt = optax.adam(1e-2)
    with pytest.warns(SkippedStepsWarning, match=r"step 4: epoch 0 batch 3 \(examples 24, 25,"):
        res = fit(
            linear_loss,
            opt,
            p,
            (x_bad, y),
            key=jax.random.key(0),
            epochs=1,
            batch_size=8,
            shuffle=False,
            logging=Logging(every=2),
            mesh=None,
            checkpoints=Checkpoints(tmp_path / "c", every=2),
            check_finite=False,  # the up-front scan would refuse this data; test the skip
        )
    assert int(res.state.skipped) == 1 and int(res.state.step) == 6
    assert res.skipped_steps == [4] and res.history[1]["skipped_steps"] == [4]
    assert [r["skipped"] for r in res.history] == [0, 1, 1]
    batches = [(x_bad[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]
    assert_trees_close(
        res.state.params, manual_run(linear_loss, opt, p, batches, skip={3}), rtol=1e-6, atol=1e-7
    )
    assert np.isfinite(res.history[1]["loss"])  # means over finite steps
    restored, _ = restore_checkpoint(tmp_path / "c", res.state)
    chex.assert_trees_all_equal(restored.params, res.state.params)


def test_nan_stop_names_step_and_last_good_checkpoint_survives(tmp_path):
    x, y = regression_data()
    x_bad = x.copy()
    x_bad[33] = np.inf  # batch 4 (0-based) -> step 5 (1-based)
    p = linear_params(0)
    opt = optax.adam(1e-2)
    d = tmp_path / "c"
    kw = dict(
        key=jax.random.key(0), epochs=1, batch_size=8, shuffle=False, logging=Logging(every=1), mesh=None
    )
    with pytest.raises(NonFiniteError, match=r"at step 5 .*last good checkpoint is step 4") as e:
        fit(
            linear_loss,
            opt,
            p,
            (x_bad, y),
            checkpoints=Checkpoints(d, every=2),
            on_nonfinite="stop",
            check_finite=False,
            **kw,
        )
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]
    good = manual_run(linear_loss, opt, p, batches[:4])
    assert e.value.step == 5 and e.value.checkpoint_step == 4
    assert_trees_close(e.value.state.params, good, rtol=1e-6, atol=1e-7)
    st, _ = restore_checkpoint(d, init_train_state(p, opt, key=jax.random.key(0)))
    assert int(st.step) == 4
    assert_trees_close(st.params, good, rtol=1e-6, atol=1e-7)
    # a bad state is refused: the latest checkpoint stays the good one
    bad = st._replace(params=jax.tree.map(lambda a: a * jnp.nan, st.params), step=jnp.asarray(6, jnp.int32))
    assert save_checkpoint(d, bad) is False
    again, _ = restore_checkpoint(d, st)
    assert int(again.step) == 4
    chex.assert_trees_all_equal(again.params, st.params)


def test_max_skipped_raises():
    x, y = regression_data()
    x = x.copy()
    x[::8] = np.nan  # every batch
    with pytest.raises(NonFiniteError, match="max_skipped=2"), pytest.warns(SkippedStepsWarning):
        fit(
            linear_loss,
            optax.sgd(0.1),
            linear_params(0),
            (x, y),
            key=jax.random.key(0),
            steps=6,
            batch_size=8,
            logging=Logging(every=3),
            max_skipped=2,
            max_skipped_fraction=None,  # the count alone is under test
            mesh=None,
            check_finite=False,  # the up-front scan would refuse this data; test the skip limit
        )


def test_train_state_is_a_pytree_and_progress_bar_is_optional(capsys):
    s = init_train_state({"w": jnp.ones(2)}, optax.sgd(0.1), key=jax.random.key(0))
    assert isinstance(s, TrainState) and len(jax.tree.leaves(s)) == 4
    x, y = regression_data()
    fit(
        linear_loss,
        optax.sgd(0.1),
        linear_params(0),
        (x, y),
        key=jax.random.key(0),
        steps=4,
        batch_size=8,
        logging=Logging(every=2),
        mesh=None,
    )
    assert capsys.readouterr().err == ""  # quiet when stderr is not a terminal
    fit(
        linear_loss,
        optax.sgd(0.1),
        linear_params(0),
        (x, y),
        key=jax.random.key(0),
        steps=4,
        batch_size=8,
        logging=Logging(every=2, progress=True),
        mesh=None,
    )
    assert "4/4" in capsys.readouterr().err


def test_float64_training(x64):
    x, y = regression_data()
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), linear_params(0))
    res = fit(
        linear_loss,
        optax.sgd(0.1),
        p,
        (x.astype(np.float64), y.astype(np.float64)),
        key=jax.random.key(0),
        steps=4,
        batch_size=8,
        logging=Logging(every=2),
        mesh=None,
    )
    assert res.state.params["w"].dtype == jnp.float64


def test_aux_metrics_reach_history_and_eval():
    x, y = regression_data()

    def loss(p, b):
        xx, yy = b
        err = xx @ p["w"] + p["b"][None, :] - yy
        return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}

    res = fit(
        loss,
        optax.sgd(0.05),
        linear_params(0),
        (x, y),
        key=jax.random.key(0),
        steps=4,
        batch_size=8,
        logging=Logging(every=2),
        has_aux=True,
        evaluation=Evaluation((x, y)),
        mesh=None,
    )
    p = res.state.params
    want = float(np.mean(np.abs(x @ np.asarray(p["w"]) + np.asarray(p["b"])[None, :] - y)))
    assert "mae" in res.history[0]
    np.testing.assert_allclose(res.history[-1]["eval_mae"], want, rtol=1e-5)  # float32 mean
