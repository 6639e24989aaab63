"""Tests of fit's parts: the option groups, the 0.1-keyword errors, ``History`` and evaluation.

References are hand computations in float64 NumPy; nothing here trains for more than a few
steps of a tiny linear model.
"""

import csv
import dataclasses
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqjax._util import write_atomically
from seqjax.train import (
    Checkpoints,
    Evaluation,
    History,
    Logging,
    evaluate,
    fit,
    init_train_state,
    make_eval_step,
)


def linear_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
        "b": jnp.asarray(0.1 * rng.normal(size=2), jnp.float32),
    }


def linear_loss(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] + p["b"][None, :] - y) ** 2)


def regression_data(n=50, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ rng.normal(size=(3, 2))).astype(np.float32)
    return x, y


# --------------------------------------------------------------------------- the signature


def test_fit_signature_is_the_published_one():
    sig = inspect.signature(fit)
    want = [
        ("loss_fn", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("optimizer", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("params", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("train_data", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty),
        ("key", "KEYWORD_ONLY", inspect.Parameter.empty),
        ("steps", "KEYWORD_ONLY", None),
        ("epochs", "KEYWORD_ONLY", None),
        ("batch_size", "KEYWORD_ONLY", None),
        ("shuffle", "KEYWORD_ONLY", None),
        ("has_aux", "KEYWORD_ONLY", False),
        ("with_key", "KEYWORD_ONLY", False),
        ("steps_per_call", "KEYWORD_ONLY", 1),
        ("mesh", "KEYWORD_ONLY", "auto"),
        ("evaluation", "KEYWORD_ONLY", None),
        ("checkpoints", "KEYWORD_ONLY", None),
        ("logging", "KEYWORD_ONLY", None),
        ("on_nonfinite", "KEYWORD_ONLY", "skip"),
        ("max_skipped", "KEYWORD_ONLY", None),
        ("max_skipped_fraction", "KEYWORD_ONLY", 0.5),
        ("check_finite", "KEYWORD_ONLY", True),
        ("flossing", "KEYWORD_ONLY", None),
        ("old", "VAR_KEYWORD", inspect.Parameter.empty),
    ]
    got = [(p.name, p.kind.name, p.default) for p in sig.parameters.values()]
    assert got == want
    assert [f.name for f in dataclasses.fields(Evaluation)] == ["data", "every", "batch_size"]
    assert [f.name for f in dataclasses.fields(Checkpoints)] == ["directory", "every", "keep", "resume"]
    assert [f.name for f in dataclasses.fields(Logging)] == ["every", "history_path", "progress", "callbacks"]
    assert Logging() == Logging(every=None, history_path=None, progress=None, callbacks=())
    assert Checkpoints("d") == Checkpoints("d", every=None, keep=3, resume=False)


# --------------------------------------------------------------------------- option errors

X, Y = regression_data()

BAD_OPTIONS = [
    (lambda: Evaluation(None), r"Evaluation\.data is required"),
    (
        lambda: Evaluation(lambda k: (X, Y)),
        r"Evaluation\.data must be arrays or a finite iterable.*not a function",
    ),
    (lambda: Evaluation((X, Y), every=0), r"Evaluation\.every must be a positive integer, got 0"),
    (
        lambda: Evaluation((X, Y), batch_size=2.5),
        r"Evaluation\.batch_size must be a positive integer, got 2\.5",
    ),
    (lambda: Checkpoints(None), r"Checkpoints\.directory must be a path.*got None"),
    (lambda: Checkpoints(""), r"Checkpoints\.directory must be a path"),
    (lambda: Checkpoints("d", every=-1), r"Checkpoints\.every must be a positive integer, got -1"),
    (lambda: Checkpoints("d", keep=0), r"Checkpoints\.keep must be a positive integer, got 0"),
    (lambda: Checkpoints("d", resume="yes"), r"Checkpoints\.resume must be True or False, got 'yes'"),
    (lambda: Logging(every=0), r"Logging\.every must be a positive integer, got 0"),
    (lambda: Logging(every=True), r"Logging\.every must be a positive integer, got True"),
    (lambda: Logging(history_path=3), r"Logging\.history_path must be a path"),
    (lambda: Logging(progress="no"), r"Logging\.progress must be True, False or None, got 'no'"),
    (lambda: Logging(callbacks=print), r"Logging\.callbacks must be a sequence.*callbacks=\[cb\]"),
    (lambda: Logging(callbacks=[print, 1]), r"Logging\.callbacks\[1\] must be callable"),
]


@pytest.mark.parametrize("make,match", BAD_OPTIONS, ids=[m.split(" ")[0] for _, m in BAD_OPTIONS])
def test_option_fields_are_checked_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_options_are_frozen_and_normalised(tmp_path):
    lg = Logging(every=5, callbacks=[print])
    assert lg.callbacks == (print,) and hash(lg) == hash(Logging(every=5, callbacks=(print,)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        lg.every = 10
    ck = Checkpoints(tmp_path, keep=None)  # a PathLike directory; keep everything
    assert ck.keep is None and ck.directory == tmp_path
    ev = Evaluation([(X[:8], Y[:8])])  # an iterable of batches is fine
    assert ev.every is None and ev.batch_size is None


BAD_COMBINATIONS = [
    (
        dict(steps_per_call=2, logging=Logging(every=3)),
        r"Logging\.every=3 must be a multiple of steps_per_call=2",
    ),
    (
        dict(steps_per_call=2, logging=Logging(every=2), evaluation=Evaluation((X, Y), every=3)),
        r"Evaluation\.every=3 must be a multiple of steps_per_call=2",
    ),
    (
        dict(logging=Logging(every=2), evaluation=Evaluation((X, Y), every=3)),
        r"Evaluation\.every=3 must be a multiple of Logging\.every=2",
    ),
    (
        dict(steps_per_call=2, logging=Logging(every=2), checkpoints=Checkpoints("unused", every=3)),
        r"Checkpoints\.every=3 must be a multiple of steps_per_call=2",
    ),
    (
        dict(evaluation={"data": (X, Y)}),
        r"evaluation must be a seqjax\.train\.Evaluation\(\.\.\.\) or None, got dict",
    ),
    (dict(logging=50), r"logging must be a seqjax\.train\.Logging\(\.\.\.\) or None, got int"),
    (dict(checkpoints="runs/a"), r"checkpoints must be a seqjax\.train\.Checkpoints"),
    (dict(max_skipped=-1), r"max_skipped must be a non-negative integer or None, got -1"),
    (dict(on_nonfinite="ignore"), r"on_nonfinite must be 'skip' or 'stop'"),
    (dict(steps_per_call=0), r"steps_per_call must be a positive integer, got 0"),
]


@pytest.mark.parametrize("kw,match", BAD_COMBINATIONS, ids=[m.split(" ")[0] for _, m in BAD_COMBINATIONS])
def test_fit_checks_options_against_each_other_before_any_compute(kw, match):
    calls = []

    def loss(p, b):
        calls.append(1)
        return linear_loss(p, b)

    kw = {"steps": 4, **kw}
    with pytest.raises(ValueError, match=match):
        fit(
            loss,
            optax.sgd(0.1),
            linear_params(),
            (X, Y),
            key=jax.random.key(0),
            batch_size=8,
            mesh=None,
            **kw,
        )
    assert calls == []


# --------------------------------------------------------------------------- 0.1 keywords

OLD = {
    "eval_data": ("evaluation", "Evaluation", "data"),
    "eval_every": ("evaluation", "Evaluation", "every"),
    "eval_batch_size": ("evaluation", "Evaluation", "batch_size"),
    "checkpoint_dir": ("checkpoints", "Checkpoints", "directory"),
    "checkpoint_every": ("checkpoints", "Checkpoints", "every"),
    "keep_checkpoints": ("checkpoints", "Checkpoints", "keep"),
    "resume": ("checkpoints", "Checkpoints", "resume"),
    "log_every": ("logging", "Logging", "every"),
    "history_path": ("logging", "Logging", "history_path"),
    "progress": ("logging", "Logging", "progress"),
    "callbacks": ("logging", "Logging", "callbacks"),
}


@pytest.mark.parametrize("name", sorted(OLD))
def test_each_old_keyword_names_its_new_spelling(name):
    arg, cls, field = OLD[name]
    value = {"eval_data": (X, Y), "callbacks": [print], "resume": True, "checkpoint_dir": "runs/a"}.get(
        name, 10
    )
    with pytest.raises(TypeError) as e:
        fit(
            linear_loss,
            optax.sgd(0.1),
            linear_params(),
            (X, Y),
            key=jax.random.key(0),
            steps=4,
            **{name: value},
        )
    msg = str(e.value)
    assert f"no longer takes {name}=" in msg
    assert f"{arg}={cls}({field}=" in msg, msg
    assert f"{name}= -> {arg}={cls}({field}=...)" in msg, msg


def test_old_keywords_give_the_whole_new_call():
    calls = []

    def loss(p, b):
        calls.append(1)
        return linear_loss(p, b)

    with pytest.raises(TypeError) as e:
        fit(  # a typical 0.1 call; even the missing steps= is not reached
            loss,
            optax.sgd(0.1),
            linear_params(),
            (X, Y),
            key=jax.random.key(0),
            eval_data=(X, Y),
            eval_every=500,
            log_every=100,
            checkpoint_dir="runs/a",
            resume=True,
            progress=False,
        )
    msg = str(e.value)
    assert "evaluation=Evaluation(data=..., every=500)" in msg
    assert "checkpoints=Checkpoints(directory='runs/a', resume=True)" in msg
    assert "logging=Logging(every=100, progress=False)" in msg
    assert "from seqjax.train" in msg
    assert calls == []
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        fit(linear_loss, optax.sgd(0.1), linear_params(), (X, Y), key=jax.random.key(0), learning_rate=0.1)


# --------------------------------------------------------------------------- History


def _metrics(rng, n, fused):
    """One call's metrics as make_train_step returns them (``(n,)`` when fused)."""
    shape = (n,) if fused else ()
    return {
        "loss": rng.normal(size=shape).astype(np.float32),
        "grad_norm": np.abs(rng.normal(size=shape)).astype(np.float32),
        "finite": rng.random(size=shape) > 0.3,
        "clipped": rng.random(size=shape) > 0.5,
        "mae": rng.random(size=shape).astype(np.float32),
    }


def test_history_rows_are_interval_means():
    rng = np.random.default_rng(0)
    calls = [_metrics(rng, 1, False) for _ in range(3)] + [_metrics(rng, 4, True)]  # 3 + 4 = 7 steps
    calls[0]["loss"] = np.float32(np.nan)
    calls[0]["finite"] = np.asarray(False)
    h = History(Logging(progress=False), start_step=10, start_time=0.0)
    for m in calls:
        h.add({k: jnp.asarray(v) for k, v in m.items()}, steps=np.size(m["loss"]))
    assert h.pending == 4
    row = h.row(step=17, epoch=2, skipped=5)
    assert h.pending == 0

    cat = {k: np.concatenate([np.reshape(m[k], -1) for m in calls]) for k in calls[0]}
    f = cat["finite"]
    assert 0 < f.sum() < 7  # some steps are not finite
    want = {
        "step": 17,
        "epoch": 2,
        "loss": np.mean(cat["loss"][f].astype(np.float64)),  # finite steps only
        "grad_norm": np.mean(cat["grad_norm"][f].astype(np.float64)),
        "clipped_frac": np.mean(cat["clipped"]),  # all steps
        "mae": np.mean(cat["mae"].astype(np.float64)),  # aux: all steps
        "grad_norm_max": np.max(cat["grad_norm"][f]),  # finite steps only, like the mean
        "skipped": 5,
        "skipped_steps": [11 + int(i) for i in np.flatnonzero(~f)],  # the interval is steps 11..17
    }
    assert list(row) == ["step", "epoch", "clipped_frac", "grad_norm", "loss", "mae"] + [
        "grad_norm_max",
        "skipped",
        "skipped_steps",
        "steps_per_sec",
        "time",
    ]
    for k, v in want.items():
        assert row[k] == v, k  # the same float64 sums: exact
    assert row["time"] > 0 and row["steps_per_sec"] > 0
    assert all(type(v) in (int, float, list) for v in row.values())

    # no finite step at all: the finite-step means are NaN, and both steps are named
    h.add({"loss": jnp.asarray([1.0, 3.0]), "grad_norm": jnp.ones(2), "finite": jnp.zeros(2, bool)}, steps=2)
    row = h.row(step=19, epoch=2, skipped=7)
    assert np.isnan(row["loss"]) and np.isnan(row["grad_norm_max"]) and "clipped_frac" not in row
    assert row["skipped_steps"] == [18, 19]


def test_history_append_writes_files_and_calls_every_callback(tmp_path):
    seen = []
    cbs = [
        lambda row, st: seen.append(("a", row["step"], st)) or row["step"] >= 4,
        lambda row, st: seen.append("b"),
    ]
    h = History(Logging(history_path=tmp_path / "h.json", callbacks=cbs, progress=False))
    state = init_train_state({"w": jnp.zeros(2)}, optax.sgd(0.1), key=jax.random.key(0))
    stops = []
    for step in (2, 4):
        h.add({"loss": jnp.asarray(float(step)), "finite": jnp.asarray(True)})
        row = h.row(step=step, epoch=0, skipped=0)
        row["eval_loss"] = 0.5
        stops.append(h.append(row, state))
    assert stops == [False, True]  # the first callback asks to stop at step 4
    assert seen == [("a", 2, state), "b", ("a", 4, state), "b"]  # the second one still runs
    assert json.loads((tmp_path / "h.json").read_text()) == h.rows
    assert [r["loss"] for r in h.rows] == [2.0, 4.0]
    assert not (tmp_path / "h.json.tmp").exists()  # written to a temporary file, then renamed

    csv_h = History(Logging(history_path=tmp_path / "h.csv", progress=False), rows=h.rows)
    csv_h.write()
    with open(tmp_path / "h.csv") as f:
        got = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in got] == [2.0, 4.0] and "eval_loss" in got[0]
    csv_h.close()
    csv_h.close()  # closing twice is fine


def test_history_progress_bar(capsys):
    h = History(Logging(progress=True), total=4)
    for _ in range(4):
        h.add({"loss": jnp.asarray(1.0)})
    h.append(h.row(step=4, epoch=0, skipped=0))
    h.close()
    assert "4/4" in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluation


def test_fit_evaluation_is_evaluate_on_the_same_params():
    x, y = regression_data(n=50)

    def loss(p, b):
        xx, yy = b
        err = xx @ p["w"] + p["b"][None, :] - yy
        return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}

    ev = make_eval_step(loss, has_aux=True)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 50, 16)]
    seen = []  # (fit's row, evaluate on that row's params): taken before the next step donates them
    res = fit(
        loss,
        optax.adam(5e-2),
        linear_params(),
        (x, y),
        key=jax.random.key(0),
        steps=6,
        batch_size=8,
        has_aux=True,
        evaluation=Evaluation((x, y), every=3, batch_size=16),  # 16 + 16 + 16 + 2
        logging=Logging(
            every=3, callbacks=[lambda row, st: seen.append((row, evaluate(ev, st.params, batches)))]
        ),
        mesh=None,
    )
    assert [r["step"] for r in res.history] == [3, 6]
    assert len(seen) == 2
    for row, want in seen:
        assert set(want) == {"loss", "mae"}
        assert {k: row["eval_" + k] for k in want} == want  # exactly: the same function on the same batches
    p = res.state.params
    full = float(np.mean((x @ np.asarray(p["w"], np.float64) + np.asarray(p["b"], np.float64) - y) ** 2))
    np.testing.assert_allclose(res.history[-1]["eval_loss"], full, rtol=1e-5)  # float32 per-batch means


def test_evaluate_weights_batches_by_size_in_float64():
    calls = []

    def ev(params, batch):
        calls.append(len(batch))
        return {"loss": jnp.asarray(np.mean(batch), jnp.float32)}

    batches = [np.full(3, 1.0), np.full(1, 5.0)]
    assert evaluate(ev, None, batches) == {"loss": (3 * 1.0 + 1 * 5.0) / 4}
    assert calls == [3, 1]
    with pytest.raises(ValueError, match="no batches"):
        evaluate(ev, None, [])


def test_evaluation_refuses_one_shot_iterators():
    with pytest.raises(ValueError, match="one-shot iterator"):
        Evaluation(b for b in [1, 2])
    with pytest.raises(ValueError, match="one-shot iterator"):
        Evaluation(iter([1, 2]))
    assert Evaluation([1, 2]).data == [1, 2]


def test_atomic_writes_create_the_folder(tmp_path):
    path = tmp_path / "new" / "deeper" / "history.json"
    write_atomically(path, lambda f: f.write("[]"))
    assert path.read_text() == "[]" and not (path.parent / "history.json.tmp").exists()
