"""``seqjax train``: resuming with the saved configuration (and refusing contradictions),
and every task of ``seqjax.tasks`` trained tiny end to end through ``seqjax.cli.main``
in-process, its baselines checked against the ``seqjax.tasks`` functions."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from seqjax import cli, tasks

DATA = os.path.join(os.path.dirname(__file__), "data")


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _saved_run(path, config, step=None):
    """A run directory with ``config`` and, with ``step``, an (empty) checkpoint folder of
    that step: enough for everything ``train --resume`` checks before training."""
    os.makedirs(path / "checkpoints" / str(step) if step is not None else path, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path / "config.json"


ADDING = {
    "task": "adding",
    "cell": "gru",
    "hidden": 64,
    "steps": 4,
    "batch": 8,
    "lr": 0.001,
    "clip": 1.0,
    "seed": 0,
    "checkpoint_every": None,
    "T": 50,
    "input_size": 2,
    "output_size": 1,
    "loss": "mse",
    "per_step": False,
    "log_every": 1,
    "eval_every": 1,
}


# ---------------------------------------------------------------- resume: no training (fast)


def test_resume_refuses_contradictions_and_names_both_values(capsys, tmp_path):
    run = tmp_path / "a"
    cfg = _saved_run(run, ADDING, step=4)
    resume = ["train", "--run-dir", run, "--resume"]
    code, _, err = _run([*resume, "--hidden", "32"], capsys)
    assert code == 2
    assert err.strip() == (
        f"seqjax: error: --hidden 32 contradicts the run's saved hidden=64 ({cfg}); "
        "drop the option or start a new run."
    )
    code, _, err = _run([*resume, "--lr", "1e-2"], capsys)
    assert code == 2 and "--lr 0.01 contradicts the run's saved lr=0.001" in err
    code, _, err = _run([*resume, "--cell", "lstm", "--hidden", "64"], capsys)  # the first contradiction
    assert code == 2 and "--cell lstm contradicts the run's saved cell=gru" in err
    code, _, err = _run(["train", "copy", "--run-dir", run, "--resume"], capsys)
    assert (
        code == 2 and "task copy contradicts the run's saved task=adding" in err and "leave out TASK" in err
    )
    code, _, err = _run([*resume, "--length", "3"], capsys)  # an option of another task
    assert code == 2 and "--length is an option of the copy task, not of adding" in err
    # explicit options equal to the saved ones are fine; the run is complete: nothing to do
    code, out, err = _run([*resume, "--hidden", "64", "--lr", "0.001", "--T", "50", "--cell", "gru"], capsys)
    assert code == 0 and "nothing to do" in out and "step 4 of its 4" in out, err
    # --steps is the total: below the checkpoint's step is an error
    code, _, err = _run([*resume, "--steps", "2"], capsys)
    assert code == 2 and "already at step 4, beyond --steps 2" in err
    # nothing to resume
    code, _, err = _run(["train", "--resume"], capsys)
    assert code == 2 and "--resume needs the run: pass --run-dir" in err
    code, _, err = _run(["train", "--resume", "--run-dir", tmp_path / "none"], capsys)
    assert code == 2 and "holds no run to resume" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2")
    code, _, err = _run(["train", "--resume", "--run-dir", tmp_path / "bad"], capsys)
    assert code == 2 and "cannot read" in err
    # without --resume an existing run is never overwritten
    code, _, err = _run(["train", "adding", "--run-dir", run], capsys)
    assert code == 2 and "already holds a run; pass --resume" in err


def test_resume_checks_task_options_and_derived_sizes(capsys, tmp_path):
    copy = {**ADDING, "task": "copy", "T": 40, "length": 10, "delay": 20, "symbols": 8}
    copy.update(input_size=10, output_size=9, loss="xent", per_step=True)
    run = tmp_path / "copy"
    _saved_run(run, copy, step=4)
    code, out, err = _run(["train", "--run-dir", run, "--resume", "--T", "40", "--length", "10"], capsys)
    assert code == 0 and "nothing to do" in out, err
    code, _, err = _run(["train", "--run-dir", run, "--resume", "--delay", "21"], capsys)
    assert code == 2 and "--delay 21 contradicts the run's saved delay=20" in err
    # a copy run of seqjax 0.1 saved only T: its length and delay are derived from it (10, 20)
    old = {k: v for k, v in copy.items() if k not in ("length", "delay", "symbols", "seed", "log_every")}
    _saved_run(tmp_path / "old", old, step=4)
    code, _, err = _run(["train", "--run-dir", tmp_path / "old", "--resume", "--length", "5"], capsys)
    assert code == 2 and "--length 5 contradicts the run's length=10 (derived from its saved options" in err
    code, out, err = _run(["train", "--run-dir", tmp_path / "old", "--resume", "--delay", "20"], capsys)
    assert code == 0 and "using seed=0, length=10, delay=20, symbols=8" in out, err
    # a saved size that the task no longer gives (a char corpus whose text changed)
    corpus = tasks.char_corpus(modules=["bisect"])
    V = len(corpus.vocab)
    char = {**ADDING, "task": "char", "T": 8, "modules": ["bisect"], "vocab": corpus.vocab[:-1] + "\x00"}
    char.update(input_size=V, output_size=V, loss="bits", per_step=True)
    _saved_run(tmp_path / "char", char, step=4)
    code, _, err = _run(["train", "--run-dir", tmp_path / "char", "--resume"], capsys)
    assert code == 2 and "the run's saved vocab=" in err and "Start a new run" in err


def test_resume_of_a_0_1_run_directory_fills_what_its_config_lacks(capsys, tmp_path):
    """seqjax 0.1's config.json has no seed, steps or cadence: those take the command line's
    value or the default, and the command says so."""
    run = tmp_path / "run"
    shutil.copytree(os.path.join(DATA, "run_0_1"), run)
    code, out, err = _run(["train", "--run-dir", run, "--resume", "--steps", "6"], capsys)
    assert code == 0, err
    assert "lacks options that seqjax now saves (written by an older seqjax): using seed=0." in out
    assert "nothing to do" in out and "step 6 of its 6" in out


def test_resume_trains_with_the_saved_configuration(capsys, tmp_path, monkeypatch):
    """What ``train --run-dir X --resume`` hands to the training loop: the saved config
    (non-default options included) with only ``--steps`` replaced; without ``--steps``, the
    saved total."""
    from seqjax.cli import commands

    calls = []

    def fake_train(config, run_dir, *, resume, progress, quiet):
        calls.append((config, run_dir, resume))
        raise KeyboardInterrupt  # stop here: the CLI exits with 130

    monkeypatch.setattr(commands, "_train", fake_train)
    saved = {**ADDING, "cell": "rnn", "hidden": 3, "lr": 0.02, "batch": 4, "seed": 7, "steps": 6}
    run = tmp_path / "a"
    _saved_run(run, saved, step=2)
    code, out, _ = _run(["train", "--run-dir", run, "--resume", "--no-progress"], capsys)
    assert code == 130 and calls[-1] == (saved, str(run), True)
    assert "rnn with 3 units, 6 steps (resuming at step 2)" in out
    code, _, _ = _run(
        ["train", "--run-dir", run, "--resume", "--steps", "10", "--checkpoint-every", "2"], capsys
    )
    assert code == 130 and calls[-1][0] == {**saved, "steps": 10, "checkpoint_every": 2}
    # a new run fills the defaults and the task's own (adding: T = 50)
    code, _, _ = _run(["train", "adding", "--run-dir", tmp_path / "new"], capsys)
    assert code == 130
    config = calls[-1][0]
    assert calls[-1][2] is False
    assert {k: config[k] for k in ("cell", "hidden", "steps", "batch", "lr", "clip", "seed", "T")} == {
        "cell": "lstm",
        "hidden": 128,
        "steps": 1000,
        "batch": 64,
        "lr": 1e-3,
        "clip": 1.0,
        "seed": 0,
        "T": 50,
    }


# ---------------------------------------------------------------- resume: training


@pytest.fixture
def no_figures(monkeypatch):
    """No training.png (matplotlib costs a second here; the figure is tested in test_cli.py)."""
    from seqjax import plot

    monkeypatch.setattr(plot, "matplotlib_available", lambda: False)


TINY = ["--cell", "rnn", "--hidden", "3", "--T", "5", "--batch", "4", "--lr", "0.02", "--seed", "3"]


@pytest.mark.slow  # three tiny trainings, about 8 s
def test_resume_continues_with_the_saved_options_bit_for_bit(capsys, tmp_path, no_figures):
    """``train --run-dir X --resume --steps 4`` after 2 steps, with none of the (non-default)
    options repeated, ends with the params of an uninterrupted 4-step run of those options:
    the saved options were used (the defaults would give other params)."""
    a, b = tmp_path / "a", tmp_path / "b"
    code, _, err = _run(["train", "adding", "--run-dir", a, "--steps", "2", "--no-progress", *TINY], capsys)
    assert code == 0, err
    saved = json.loads((a / "config.json").read_text())
    code, out, err = _run(["train", "--run-dir", a, "--resume", "--steps", "4", "--no-progress"], capsys)
    assert code == 0 and "resuming at step 2" in out and "done: step 4" in out, err
    assert json.loads((a / "config.json").read_text()) == {**saved, "steps": 4}  # only the total changed
    code, _, err = _run(["train", "adding", "--run-dir", b, "--steps", "4", "--no-progress", *TINY], capsys)
    assert code == 0, err
    pa, pb = cli.load_run(str(a))[3], cli.load_run(str(b))[3]
    for x, y in zip(_leaves(pa), _leaves(pb), strict=True):
        np.testing.assert_array_equal(x, y)
    hist = json.loads((a / "history.json").read_text())
    assert [r["step"] for r in hist] == [r["step"] for r in json.loads((b / "history.json").read_text())]
    # the run is complete: resuming it again does nothing
    code, out, _ = _run(["train", "--run-dir", a, "--resume"], capsys)
    assert code == 0 and "nothing to do" in out


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


# ---------------------------------------------------------------- every task, tiny, end to end


def _baselines_by_hand(task, config):
    """The baselines of each task from the ``seqjax.tasks`` functions, computed here."""
    if task == "adding":
        return {"eval_loss": [1.0 / 6.0]}
    if task == "copy":
        L, D, K = config["length"], config["delay"], config["symbols"]
        return {"eval_loss": [L * math.log(K) / (D + 2 * L)], "eval_recall_accuracy": [1.0 / K]}
    if task == "digits":
        d = tasks.digits(mode=config["mode"], test_fraction=config["test_fraction"], seed=0)
        counts = np.bincount(d.y_train, minlength=10)
        prior = counts / counts.sum()
        return {
            "eval_loss": [float(-np.mean(np.log(prior[d.y_test])))],
            "eval_accuracy": [float(np.mean(d.y_test == counts.argmax()))],
        }
    if task == "sunspots":
        s = tasks.sunspots(train_end=config["train_end"], test_end=config["test_end"])
        x, p = s.values.astype(np.float64), config["ar_order"]
        coef = tasks.ar_fit(x[: s.n_train], p)
        preds = [
            coef[0] + sum(coef[j] * x[t - j] for j in range(1, p + 1)) for t in range(s.n_train, s.n_test_end)
        ]
        y = x[s.n_train : s.n_test_end]
        persistence = x[s.n_train - 1 : s.n_test_end - 1]
        return {
            "eval_loss": [float(np.mean((np.array(preds) - y) ** 2)), float(np.mean((persistence - y) ** 2))]
        }
    c = tasks.char_corpus(modules=config["modules"])
    return {"eval_loss": [tasks.unigram_bits_per_char(c.train, c.valid, len(c.vocab))]}


TASK_ARGS = {
    "adding": ["--T", "6"],
    "copy": ["--length", "2", "--delay", "3", "--symbols", "3"],
    "digits": ["--test-fraction", "0.5"],
    "sunspots": ["--T", "12", "--ar-order", "3", "--train-end", "1900", "--test-end", "1910"],
    "char": ["--T", "8", "--modules", "bisect"],
}


# char runs in the default tier (no optional dependency; the most new code: one-hot inputs,
# windows, bits per char); each of the others adds about 2.5 s of compiling.
@pytest.mark.parametrize(
    "task", [t if t == "char" else pytest.param(t, marks=pytest.mark.slow) for t in TASK_ARGS]
)
def test_each_task_trains_tiny_end_to_end(task, capsys, tmp_path, no_figures):
    run = tmp_path / task
    argv = ["train", task, "--cell", "rnn", "--hidden", "3", "--steps", "2", "--batch", "4"]
    code, out, err = _run([*argv, *TASK_ARGS[task], "--run-dir", run, "--no-progress"], capsys)
    assert code == 0, err
    assert "done: step 2" in out
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == task and config["hidden"] == 3 and config["steps"] == 2
    assert "2" in os.listdir(run / "checkpoints")
    hist = json.loads((run / "history.json").read_text())
    assert hist[-1]["step"] == 2 and all(math.isfinite(r["loss"]) for r in hist)
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["step"] == 2 and summary["eval"] and all(math.isfinite(v) for v in summary["eval"].values())
    )
    want = _baselines_by_hand(task, config)
    got: dict[str, list] = {}
    for b in summary["baselines"]:
        got.setdefault(b["metric"], []).append(b["baseline"])
        assert b["model"] == pytest.approx(summary["eval"][b["metric"].removeprefix("eval_")])
        assert b["ratio"] == pytest.approx(b["model"] / b["baseline"])
        assert f"{b['model']:.4f} vs {b['baseline']:.4f} for {b['baseline_name']}" in out
    assert got.keys() == want.keys()
    for metric in want:
        np.testing.assert_allclose(got[metric], want[metric], rtol=1e-6, err_msg=metric)
    if task == "digits":  # a batch larger than the data set: an error before anything is written
        code, _, err = _run([*argv, "--batch", "5000", "--run-dir", tmp_path / "big"], capsys)
        assert code == 2 and "--batch 5000 is more than the 1348 training examples of digits" in err
        assert not (tmp_path / "big").exists()


BAD = [
    (["adding", "--length", "3"], "--length is an option of the copy task, not of adding"),
    (["adding", "--T", "1"], "--T must be at least 2"),
    (["adding", "--lr", "-1"], "argument --lr: expected a positive number, got '-1'"),
    (
        ["copy", "--T", "40", "--length", "10", "--delay", "30"],
        "--T 40 does not match --length 10 and --delay 30",
    ),
    (["copy", "--T", "12", "--length", "6"], "--length 6 needs T > 2 x length = 12"),
    (["copy", "--T", "12", "--delay", "5"], "--T 12 and --delay 5 leave T - delay = 7 steps"),
    (["copy", "--symbols", "1"], "--symbols must be at least 2"),
    (["copy", "--length", "0"], "argument --length: expected a positive integer, got '0'"),
    (["digits", "--T", "10"], "--T 10 does not apply to digits"),
    (["digits", "--mode", "columns"], "argument --mode: invalid choice: 'columns'"),
    (["digits", "--test-fraction", "1.5"], "--test-fraction must lie strictly between 0 and 1, got 1.5"),
    (["sunspots", "--train-end", "1600"], "--train-end/--test-end: need 1700 < train_end < test_end"),
    (["sunspots", "--T", "300"], "--T 300 leaves no training window"),
    (["char", "--modules", "sys"], "--modules: module 'sys' has no Python source file to read"),
    (["char", "--modules", "bisect", "--T", "400"], "--T 400 is longer than the validation text"),
]


def test_bad_task_options_are_clear_errors(capsys, tmp_path):
    for i, (argv, message) in enumerate(BAD):
        run = tmp_path / str(i)
        code, _, err = _run(["train", *argv, "--run-dir", run, "--no-progress"], capsys)
        assert code == 2 and message in err, (argv, err)
        assert not (run / "checkpoints").exists() and not (run / "config.json").exists(), argv


def test_a_missing_optional_extra_names_it(capsys, tmp_path, monkeypatch):
    """digits needs scikit-learn and sunspots statsmodels (the ``tasks`` extra): without
    them the command says which and how to install it, and writes no checkpoint."""
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "statsmodels.datasets", None)
    for task, module in (("digits", "scikit-learn"), ("sunspots", "statsmodels")):
        run = tmp_path / task
        code, _, err = _run(["train", task, "--hidden", "2", "--run-dir", run], capsys)
        assert code == 2, err
        assert f"the {task} task needs {module}, which is not installed: pip install 'seqjax[tasks]'" in err
        assert not (run / "checkpoints").exists()
