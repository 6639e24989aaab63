"""Faults during checkpointing (issue 16, "never fail silently"): a process killed in the middle
of a save, and a write that fails (a full disk).

The faults are injected by ``tests/faults/checkpoint_run.py`` (see its docstring for where in
orbax's save path each one strikes); the subprocess tests run it in a fresh process on the
real file system. Every test checks that the fault really happened (the process died by
SIGKILL with the partial files on disk; the error was raised), so none can pass vacuously.
"""

import errno
import os
import re
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from faults import checkpoint_run as run_mod

from seqjax.train import init_train_state, restore_checkpoint, save_checkpoint
from seqjax.train.checkpoints import CheckpointError

SCRIPT = os.path.join(os.path.dirname(__file__), "faults", "checkpoint_run.py")
TMP = run_mod.TMP


def _target():
    """A state of the run's structure (``checkpoint_run.run``): what a checkpoint restores into."""
    return init_train_state({"w": jnp.zeros(3), "b": jnp.zeros(())}, optax.adam(0.1), key=jax.random.key(0))


def _state(step: int):
    """A distinct state for checkpoint ``step`` (params and optimizer moments depend on it)."""
    st = _target()
    g = {"w": jnp.arange(3.0) + step, "b": jnp.asarray(-float(step))}
    _, opt_state = optax.adam(0.1).update(g, st.opt_state, st.params)
    return st._replace(
        params=jax.tree.map(lambda a: a + 0.5 * step, st.params),
        opt_state=opt_state,
        step=jnp.asarray(step, jnp.int32),
        key=jax.random.key(step),
        skipped=jnp.asarray(step % 3, jnp.int32),
    )


def _assert_states_equal(a, b):
    """Exactly equal: params, optimizer state, step, key, skipped count."""
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.opt_state, b.opt_state)
    assert int(a.step) == int(b.step) and int(a.skipped) == int(b.skipped)
    np.testing.assert_array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))


def _restore(directory, step=None):
    restored = restore_checkpoint(directory, _target(), step=step)
    assert restored is not None, f"no checkpoint in {directory}"
    return restored


def _strip(history):
    """History rows without the wall-clock columns."""
    return [{k: v for k, v in row.items() if k not in ("time", "steps_per_sec")} for row in history]


def _files(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


def _child(fault: str, step: int, directory) -> subprocess.CompletedProcess:
    """``checkpoint_run.py FAULT STEP DIRECTORY`` in a fresh Python process."""
    return subprocess.run(
        [sys.executable, SCRIPT, fault, str(step), str(directory)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in this process), with its checkpoints 2, 4, 6."""
    d = tmp_path_factory.mktemp("reference") / "ckpt"
    result = run_mod.run(d)
    assert sorted(os.listdir(d)) == ["2", "4", "6"]
    return result, d


# --------------------------------------------------------------------------- in-process (default tier)


def test_partial_checkpoint_is_ignored_by_restore_and_removed_by_the_next_save(tmp_path, caplog):
    """What a kill just before orbax's final rename leaves (``<step>.orbax-checkpoint-tmp``,
    complete but uncommitted): restore takes the latest complete checkpoint, and saving the
    same step again works and removes the leftovers (with a warning in the log)."""
    d = tmp_path / "ckpt"
    assert save_checkpoint(d, _state(2), meta={"at": 2}, keep=None)
    assert save_checkpoint(d, _state(4), meta={"at": 4}, keep=None)
    os.rename(d / "4", d / f"4{TMP}")  # the save of 4 "died" before its commit
    assert (d / f"4{TMP}" / "state").is_dir()
    state, meta = _restore(d)
    _assert_states_equal(state, _state(2))
    assert meta == {"at": 2}
    new4 = _state(4)._replace(params={"w": jnp.full(3, 7.0), "b": jnp.asarray(7.0)})
    with caplog.at_level("WARNING", logger="seqjax.train"):
        assert save_checkpoint(d, new4, meta={"at": "4 again"}, keep=None)
    assert f"4{TMP}" in caplog.text and "interrupted save" in caplog.text
    assert sorted(os.listdir(d)) == ["2", "4"]
    state, meta = _restore(d)
    _assert_states_equal(state, new4)
    assert meta == {"at": "4 again"}
    _assert_states_equal(_restore(d, step=2)[0], _state(2))


def test_meta_that_is_not_json_is_refused_before_anything_is_written(tmp_path):
    d = tmp_path / "ckpt"
    with pytest.raises(TypeError, match="JSON serializable"):
        save_checkpoint(d, _state(2), meta={"loss": np.float32(1.0)})
    assert not d.exists() or os.listdir(d) == []


@pytest.mark.parametrize("fault", ["full-disk", "full-disk-arrays"])
def test_full_disk_raises_checkpoint_error_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, fault):
    """A full disk while writing checkpoint 6, after 2 and 4: the JSON item's write gets
    ENOSPC from the kernel (``/dev/full``), or an array write gets tensorstore's
    RESOURCE_EXHAUSTED error. Either way: a ``CheckpointError`` (an ``OSError`` with
    ``errno.ENOSPC``) naming the step, the directory, the cause and the intact checkpoints;
    no partial files; checkpoints 2 and 4 restore to exactly what was saved; once there is
    room again, 6 saves."""
    d = tmp_path / "ckpt"
    assert save_checkpoint(d, _state(2), meta={"at": 2}, keep=None)
    assert save_checkpoint(d, _state(4), meta={"at": 4}, keep=None)
    run_mod.install(fault, 6, patch=monkeypatch.setattr)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(d, _state(6), meta={"at": 6}, keep=None)
    err = e.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert (err.step, err.intact_steps, err.directory) == (6, (2, 4), str(d))
    assert re.fullmatch(
        rf"could not write checkpoint 6 to {re.escape(str(d))}: \[Errno 28\] No space left on device"
        r"( \(ValueError: RESOURCE_EXHAUSTED: .*\[os_error_code='28'\]\))?"
        r"; the earlier checkpoints \(steps 2, 4\) are intact"
        r"; the partial files of checkpoint 6 were removed",
        str(err),
    ), str(err)
    assert isinstance(err.__cause__, OSError if fault == "full-disk" else ValueError)
    assert sorted(os.listdir(d)) == ["2", "4"]  # no `6`, no `6.orbax-checkpoint-tmp`
    for step in (2, 4):
        state, meta = _restore(d, step=step)
        _assert_states_equal(state, _state(step))
        assert meta == {"at": step}
    monkeypatch.undo()  # room on the disk again
    assert save_checkpoint(d, _state(6), meta={"at": 6}, keep=None)
    _assert_states_equal(_restore(d)[0], _state(6))


# --------------------------------------------------------------------------- in a subprocess (slow)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill-before-finalize", "kill-before-rename"])
def test_killed_mid_save_resumes_bit_exactly(tmp_path, reference, fault):
    """A run SIGKILLed in the middle of saving checkpoint 4 (its arrays and JSON written into
    ``4.orbax-checkpoint-tmp``; killed before orbax finalizes it, or just before the final
    rename), then resumed: it restarts from checkpoint 2, ignoring the partial files, saves 4
    again over the leftovers, and ends bit for bit where the uninterrupted run ends."""
    ref, ref_dir = reference
    d = tmp_path / "ckpt"
    proc = _child(fault, 4, d)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    # killed mid-save: checkpoint 2 complete, 4 only as partial files (arrays and JSON written)
    assert sorted(os.listdir(d)) == ["2", f"4{TMP}"]
    partial = _files(d / f"4{TMP}")
    assert any(re.search(r"(^|/)d/[0-9a-f]+$", f) for f in partial), partial  # array data
    assert any(f.endswith("metadata") and f.startswith("meta") for f in partial), partial  # the JSON item
    state, meta = _restore(d)
    _assert_states_equal(state, _restore(ref_dir, step=2)[0])
    assert meta["position"] == _restore(ref_dir, step=2)[1]["position"]

    resumed = run_mod.run(d, resume=True)  # in this process: the restore is what is tested
    _assert_states_equal(resumed.state, ref.state)
    assert _strip(resumed.history) == _strip(ref.history)  # losses etc. of all 6 steps, exact
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in ref.history]
    assert sorted(os.listdir(d)) == ["2", "4", "6"]  # 4 saved again; the leftovers are gone
    for step in (4, 6):
        (got, got_meta), (want, want_meta) = _restore(d, step=step), _restore(ref_dir, step=step)
        _assert_states_equal(got, want)
        assert got_meta["position"] == want_meta["position"]


@pytest.mark.slow
def test_full_disk_in_fit_stops_with_checkpoint_error(tmp_path, reference):
    """``fit`` whose final checkpoint (6) meets a full disk (ENOSPC from the kernel on the JSON
    item's write): the process ends with the ``CheckpointError`` (no silent success), the
    partial files of 6 are removed, and checkpoints 2 and 4 are exactly the uninterrupted
    run's."""
    _, ref_dir = reference
    d = tmp_path / "ckpt"
    proc = _child("full-disk", 6, d)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the fault never happened" not in proc.stdout
    want = (
        f"CheckpointError: could not write checkpoint 6 to {d}: "
        "[Errno 28] No space left on device; the earlier checkpoints (steps 2, 4) are intact; "
        "the partial files of checkpoint 6 were removed"
    )
    assert want in proc.stderr, proc.stderr
    assert sorted(os.listdir(d)) == ["2", "4"]
    for step in (2, 4):
        (got, got_meta), (ref, ref_meta) = _restore(d, step=step), _restore(ref_dir, step=step)
        _assert_states_equal(got, ref)
        assert got_meta["position"] == ref_meta["position"]
        assert _strip(got_meta["history"]) == _strip(ref_meta["history"])
