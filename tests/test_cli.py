"""The ``seqjax`` command: every subcommand on tiny sizes writes what it says; error paths
exit with code 2 and a message that says what to do."""

import json
import os
import sys
import types

import numpy as np
import pytest

from seqjax import cli

TINY_TRAIN = ["--hidden", "4", "--steps", "4", "--T", "6", "--batch", "8", "--no-progress"]


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- argument errors (fast)


def test_usage_errors(capsys, tmp_path):
    code, out, err = _run([], capsys)
    assert code == 2 and "demo" in out  # help lists the commands
    code, _, err = _run(["train"], capsys)  # missing TASK
    assert code == 2 and "train needs a TASK: one of adding, copy, digits, sunspots, char" in err
    code, _, err = _run(["frobnicate"], capsys)
    assert code == 2 and "invalid choice" in err
    code, _, err = _run(["demo", "--steps", "0"], capsys)
    assert code == 2 and "positive integer" in err
    code, _, err = _run(["train", "nosuchtask", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "unknown task 'nosuchtask'" in err and "adding" in err
    code, _, err = _run(["train", "adding", "--cell", "transformer", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "unknown cell 'transformer'" in err and "lstm" in err
    code, _, err = _run(["train", "adding", "--hidden", "0", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "argument --hidden: expected a positive integer, got '0'" in err
    code, _, err = _run(["train", "adding", "--resume", "--out", str(tmp_path / "none")], capsys)
    assert code == 2 and "no run to resume" in err
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and "seqjax" in out


def test_missing_matplotlib_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = _run(["train", "adding", "--plot", "--out", str(tmp_path / "r"), *TINY_TRAIN], capsys)
    assert code == 2
    assert 'pip install "seqjax[plot]"' in err
    assert not os.path.exists(tmp_path / "r" / "checkpoints")  # failed before training


def test_unreadable_runs(capsys, tmp_path):
    code, _, err = _run(["spectrum", str(tmp_path / "missing")], capsys)
    assert code == 2 and "not a directory" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(["spectrum", str(empty)], capsys)
    assert code == 2 and "no config.json" in err
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    code, _, err = _run(["spectrum", str(bad)], capsys)
    assert code == 2 and "cannot read" in err
    # a valid config but a corrupted checkpoint directory
    run = tmp_path / "corrupt"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "checkpoints" / "4" / "garbage").write_text("xx")
    cfg = {
        "task": "adding",
        "cell": "rnn",
        "hidden": 4,
        "input_size": 2,
        "output_size": 1,
        "loss": "mse",
        "per_step": False,
        "T": 6,
        "lr": 0.01,
        "clip": 1.0,
    }
    (run / "config.json").write_text(json.dumps(cfg))
    code, _, err = _run(["spectrum", str(run)], capsys)
    assert code == 2 and "checkpoint" in err


def test_bench_delegates_or_explains(capsys, monkeypatch):
    calls = []
    fake = types.ModuleType("benchmarks.cli")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "benchmarks", types.ModuleType("benchmarks"))
    monkeypatch.setitem(sys.modules, "benchmarks.cli", fake)
    code, _, _ = _run(["bench", "speed", "--tiny"], capsys)
    assert code == 0 and calls == [["speed", "--tiny"]]
    code, _, _ = _run(["bench", "--quick", "speed"], capsys)  # a leading option is the suite's too
    assert code == 0 and calls[-1] == ["--quick", "speed"]
    monkeypatch.setitem(sys.modules, "benchmarks.cli", None)
    code, _, err = _run(["bench"], capsys)
    assert code == 2 and "benchmarks/" in err and "source checkout" in err
    # --help outside a source checkout: what the command does, and why the suite is not there
    code, out, _ = _run(["bench", "--help"], capsys)
    assert code == 0 and "python -m benchmarks ARGS" in out and "not importable here" in out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bench_help_shows_the_suites_options(flag, capsys):
    """In this source checkout ``seqjax bench --help`` (and ``-h``) prints what the command
    does, then the suite's own help (``python -m benchmarks --help``), and exits 0."""
    code, out, err = _run(["bench", flag], capsys)
    assert code == 0, err
    assert out.startswith("usage: seqjax bench [ARGS ...]")
    assert "usage: python -m benchmarks" in out and "--quick" in out and "--tiny" in out
    assert "unrecognized arguments" not in err


def test_bench_finds_the_suite_from_a_console_script(capsys, tmp_path, monkeypatch):
    """The ``seqjax`` console script does not put the checkout on ``sys.path``: the suite is
    found next to the (editable) ``seqjax`` package, from any working directory."""
    import pathlib

    root = str(pathlib.Path(cli.__file__).resolve().parents[2])
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", root)])
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["bench", "--help"], capsys)
    assert code == 0 and "usage: python -m benchmarks" in out, err


def test_train_help_lists_the_tasks_and_their_options(capsys):
    from seqjax.cli.tasks import TASKS

    code, out, _ = _run(["train", "--help"], capsys)
    assert code == 0
    assert set(TASKS) == {"adding", "copy", "digits", "sunspots", "char"}
    for name, task in TASKS.items():
        assert f"\n  {name} " in out, name  # the task table
        if task.options:
            assert f"options of the {name} task" in out
        for option in task.options:
            assert option.flag in out, option.flag
    for flag in ("--length", "--delay", "--symbols", "--mode", "--test-fraction", "--modules", "--ar-order"):
        assert flag in out
    # what --resume may change is stated
    assert "options --resume may change" in out and "--steps" in out and "--checkpoint-every" in out
    assert "--run-dir" in out


def test_entry_points():
    """The console script ``seqjax = seqjax.cli:main`` (pyproject) and ``python -m seqjax.cli``."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    assert 'seqjax = "seqjax.cli:main"' in (root / "pyproject.toml").read_text()
    from importlib.metadata import entry_points

    for ep in entry_points(group="console_scripts", name="seqjax"):  # when installed
        assert ep.load() is cli.main
    r = subprocess.run(
        [sys.executable, "-m", "seqjax.cli", "--version"], capture_output=True, text=True, cwd=root
    )
    assert r.returncode == 0 and r.stdout.startswith("seqjax "), r.stderr


def test_cli_draws_nothing_itself():
    """Figures come from seqjax.plot, analyses from seqjax.diagnose: no module of the CLI
    imports matplotlib or the spectrum tools."""
    import ast
    import pathlib

    for path in pathlib.Path(cli.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in mods if m.startswith(("matplotlib", "seqjax.spectrum"))}, path.name


# ---------------------------------------------------------------- commands on tiny sizes


@pytest.mark.slow
def test_demo_writes_report_and_spectrum_reads_it(capsys, tmp_path):
    out = tmp_path / "demo"
    code, stdout, _ = _run(["demo", "--tiny", "--out", str(out), "--no-progress"], capsys)
    assert code == 0
    assert "Verdict" in stdout and "tanh RNN" in stdout and "LSTM" in stdout
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "Lyapunov" in report
    summary = json.loads((out / "summary.json").read_text())
    for name in ("rnn", "lstm"):
        assert np.isfinite(summary[name]["grad_log10_at_lag"])
        assert np.isfinite(summary[name]["lyapunov_max"])
        assert (out / name / "config.json").exists()
        assert os.listdir(out / name / "checkpoints")
    # the verdict quotes the measured numbers
    assert f"10^{summary['rnn']['grad_log10_at_lag']:.1f}" in summary["verdict"][0]
    pytest.importorskip("matplotlib")
    for png in ("training", "gradient_vs_lag", "lyapunov", "eigenvalues_wh", "eigenvalues_jacobians"):
        assert (out / f"{png}.png").stat().st_size > 1000
        assert f"({png}.png)" in report

    code, stdout, _ = _run(["spectrum", str(out / "lstm"), "--batch", "2", "--plot"], capsys)
    assert code == 0 and "Lyapunov" in stdout
    spec = json.loads((out / "lstm" / "spectrum" / "spectrum.json").read_text())
    assert spec["cell"] == "lstm" and len(spec["grad_log10"]) == spec["T"] + 1  # lags 0..T
    assert len(spec["lyapunov"]) == 8  # state [h, c] of 4 + 4 units
    assert (out / "lstm" / "spectrum" / "report.md").exists()
    assert (out / "lstm" / "spectrum" / "lyapunov.png").exists()


@pytest.mark.slow
def test_train_checkpoints_resume_and_refuse_overwrite(capsys, tmp_path):
    run = tmp_path / "run"
    code, stdout, _ = _run(["train", "adding", "--cell", "gru", "--out", str(run), *TINY_TRAIN], capsys)
    assert code == 0 and "done: step 4" in stdout
    assert (run / "config.json").exists() and (run / "history.json").exists()
    assert "4" in os.listdir(run / "checkpoints")
    # same run again without --resume: refused
    code, _, err = _run(["train", "adding", "--cell", "gru", "--out", str(run), *TINY_TRAIN], capsys)
    assert code == 2 and "--resume" in err
    # resume with different options: refused, names the difference
    args = ["train", "adding", "--cell", "gru", "--out", str(run), "--resume"]
    code, _, err = _run([*args, "--hidden", "4", "--steps", "8", "--T", "6", "--batch", "16"], capsys)
    assert code == 2 and "--batch 16 contradicts the run's saved batch=8" in err
    # resume to 8 steps, repeating the saved options (allowed): continues from step 4
    more = ["--hidden", "4", "--steps", "8", "--T", "6", "--batch", "8", "--no-progress"]
    code, stdout, err = _run([*args, *more], capsys)
    assert code == 0 and "done: step 8" in stdout, err
    assert "8" in os.listdir(run / "checkpoints")
    hist = json.loads((run / "history.json").read_text())
    assert max(row["step"] for row in hist) == 8
    # the copy task (per-step classification) also trains, and spectrum reads it
    run2 = tmp_path / "copy"
    code, _, _ = _run(
        ["train", "copy", "--cell", "lstm", "--T", "8", "--out", str(run2), *TINY_TRAIN[:4]], capsys
    )
    assert code == 0
    code, _, _ = _run(["spectrum", str(run2), "--batch", "2"], capsys)
    assert code == 0 and "||ds_T/ds_(T-L)||_2" in (run2 / "spectrum" / "report.md").read_text()
    pytest.importorskip("matplotlib")
    code, _, _ = _run(
        ["train", "adding", "--cell", "rnn", "--plot", "--out", str(tmp_path / "p"), *TINY_TRAIN], capsys
    )
    assert code == 0 and (tmp_path / "p" / "training.png").exists()
