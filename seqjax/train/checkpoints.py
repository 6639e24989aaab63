"""Checkpoints of a ``TrainState`` with orbax-checkpoint (imported lazily).

A checkpoint ``step`` under ``directory`` is an orbax ``Composite`` of two items:

* ``state``: ``{"params", "opt_state", "step", "key": key_data(key), "skipped"}``
  (``StandardSave``; the typed key is stored as its raw ``uint32`` data);
* ``meta``: a JSON dict (``fit`` stores ``position: [epoch, index]``, ``history``,
  ``batch_size`` and ``steps_per_call``).

This layout is the one seqjax 0.1 wrote; runs made by 0.1 load unchanged
(``tests/test_migration.py``).

Faults (``tests/test_checkpoint_faults.py``): orbax writes checkpoint ``step`` into
``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` when complete, so a process
killed in the middle of a save leaves only that temporary directory, which restoring
ignores and the next save removes. A save that fails (a full disk, ...) raises
``CheckpointError`` after removing its partial files; the earlier checkpoints are untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading

import jax

from seqjax.train.state import TrainState
from seqjax.train.step import _all_finite

__all__ = ["save_checkpoint", "restore_checkpoint", "CheckpointError"]

log = logging.getLogger("seqjax.train")

# orbax's AtomicRenameTemporaryPath: `<step>` is written as `<step>.orbax-checkpoint-tmp`
# (older orbax: with a `-<timestamp>` suffix) and renamed when complete
_TMP = ".orbax-checkpoint-tmp"
# how long a failed save waits for orbax's other writer threads before removing its files
_JOIN_TIMEOUT_S = 60.0


class CheckpointError(OSError):
    """A checkpoint could not be written: ``save_checkpoint`` (and so ``fit``) raises it.

    Whatever failed underneath (the OS, tensorstore, orbax; a full disk is the usual
    case) is the ``__cause__``. The message names the step, the directory, the cause and
    the checkpoints still intact, e.g. ``could not write checkpoint 6 to /x/ckpt: [Errno 28]
    No space left on device; the earlier checkpoints (steps 2, 4) are intact; the partial
    files of checkpoint 6 were removed``. A subclass of ``OSError``, so an ``except OSError``
    around a run sees it.

    Attributes:
      errno: the OS error number of the cause when one is known (``errno.ENOSPC`` for a full
        disk, also when tensorstore reports it), else ``None``.
      directory: the checkpoint directory.
      step: the step whose checkpoint was not written.
      intact_steps: the complete checkpoints in ``directory`` after the failure.
    """

    def __init__(
        self,
        message: str,
        *,
        directory: str | None = None,
        step: int | None = None,
        intact_steps: tuple[int, ...] = (),
        errno: int | None = None,
    ):
        super().__init__(message)
        self.errno = errno  # None when unknown, as OSError's
        self.directory, self.step, self.intact_steps = directory, step, tuple(intact_steps)


def _ckpt_tree(state: TrainState) -> dict:
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "key": jax.random.key_data(state.key),
        "skipped": state.skipped,
    }


def _manager(directory, keep):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=opts)


def _partial(directory: str, step: int | None = None) -> list[str]:
    """The temporary directories of unfinished saves in ``directory`` (of ``step``, or all)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    prefix = f"{step}{_TMP}" if step is not None else None
    return sorted(
        os.path.join(directory, n)
        for n in names
        if (n.startswith(prefix) if prefix is not None else _TMP in n)
    )


def _remove(paths: list[str]) -> list[str]:
    """Remove ``paths`` (directories or files); the descriptions of those that could not be."""
    failed = []
    for p in paths:
        try:
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            failed.append(f"{p} ({e})")
    return failed


def _errno_of(e: BaseException) -> int | None:
    """The OS error number behind ``e``: an ``OSError``'s, or the one tensorstore names in its text."""
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur.errno
        m = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(cur))
        if m:
            return int(m.group(1) or m.group(2))
        cur = cur.__cause__ or cur.__context__
    return None


def _describe(e: BaseException, code: int | None) -> str:
    """``[Errno 28] No space left on device`` (plus the original text when it says more)."""
    text = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
    if code is None or (isinstance(e, OSError) and e.errno == code):
        return text
    return f"[Errno {code}] {os.strerror(code)} ({text})"


def _wait_for_writers(before: set[threading.Thread]) -> None:
    """Join orbax's writer threads started by a save that failed: when one item fails, the
    others may still be writing into the temporary directory."""
    for t in threading.enumerate():
        if t not in before and type(t).__module__.startswith("orbax.") and t.is_alive():
            threading.Thread.join(t, _JOIN_TIMEOUT_S)


def _complete_steps(directory: str) -> tuple[int, ...] | None:
    try:
        mngr = _manager(directory, None)
        try:
            return tuple(sorted(mngr.all_steps()))
        finally:
            mngr.close()
    except Exception:  # noqa: BLE001 - listing is only for the message
        return None


def _save_failed(directory: str, step: int, e: Exception, before: set[threading.Thread]) -> CheckpointError:
    """Wait for the save's writers, remove its partial files, and describe the failure."""
    _wait_for_writers(before)
    partial = _partial(directory, step) if jax.process_index() == 0 else []
    leftovers = _remove(partial)
    steps = _complete_steps(directory)
    code = _errno_of(e)
    cause = _describe(e, code)
    if steps is not None and step in steps:  # the rename happened: the failure came after it
        msg = f"checkpoint {step} was written to {directory}, but the save then failed: {cause}"
    else:
        msg = f"could not write checkpoint {step} to {directory}: {cause}"
        earlier = [s for s in steps if s != step] if steps is not None else None
        if earlier is None:
            msg += "; the earlier checkpoints could not be listed"
        elif not earlier:
            msg += "; there is no earlier checkpoint"
        elif len(earlier) == 1:
            msg += f"; the earlier checkpoint (step {earlier[0]}) is intact"
        else:
            msg += f"; the earlier checkpoints (steps {', '.join(map(str, earlier))}) are intact"
        if leftovers:
            msg += f"; could not remove its partial files: {'; '.join(leftovers)}"
        elif partial:
            msg += f"; the partial files of checkpoint {step} were removed"
    return CheckpointError(msg, directory=directory, step=step, intact_steps=steps or (), errno=code)


def save_checkpoint(
    directory: str | os.PathLike, state: TrainState, *, meta: dict | None = None, keep: int | None = 3
) -> bool:
    """Save ``state`` (and a JSON-able ``meta``) as checkpoint ``int(state.step)`` under ``directory``.

    Uses orbax-checkpoint (a ``CheckpointManager``, synchronous). Refuses non-finite
    states: returns ``False`` and writes nothing, so the last good checkpoint is never
    replaced by a bad one. A step already saved is not rewritten (``False``). Keeps the
    newest ``keep`` checkpoints (the older ones are deleted only once the new one is
    complete).

    What a fault leaves behind:

    * **The process dies mid-save** (killed, power cut): the checkpoint is written into
      ``<directory>/<step>.orbax-checkpoint-tmp`` and renamed to ``<step>`` only when
      complete, so the partial files never count as a checkpoint: ``restore_checkpoint``
      (and ``fit``'s resume) takes the latest complete one. The next ``save_checkpoint``
      into ``directory`` removes the leftovers (logged as a warning) and can save the same
      step again.
    * **A write fails** (a full disk, a read-only or vanished file system): raises
      ``CheckpointError`` (an ``OSError``) naming the step, the directory, the cause (with its
      ``errno``, also when tensorstore reports it) and the checkpoints still intact, after
      removing this save's partial files. The earlier checkpoints are not touched.

    Args:
      directory: the checkpoint directory (created if missing). One writer at a time: a save
        removes the unfinished saves it finds there.
      state: the ``TrainState`` (any shapes; the arrays are stored as they are).
      meta: extra JSON data (``fit`` stores the data position and the history).
      keep: how many checkpoints to keep (``None``: all).

    Returns:
      Whether a checkpoint was written.

    Raises:
      CheckpointError: the checkpoint could not be written (see above).
      TypeError: ``meta`` is not JSON-serialisable (checked before anything is written).

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp, optax
      >>> from seqjax.train import init_train_state, save_checkpoint
      >>> state = init_train_state({"w": jnp.ones(3)}, optax.sgd(0.1), key=jax.random.key(0))
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     first = save_checkpoint(tmp, state, meta={"note": "warm start"})
      ...     again = save_checkpoint(tmp, state)             # step 0 is already saved
      >>> first, again
      (True, False)
    """
    import orbax.checkpoint as ocp

    if not bool(_all_finite((state.params, state.opt_state))):
        log.warning("not saving step %d: the state is not finite", int(state.step))
        return False
    meta = meta or {}
    json.dumps(meta)  # a TypeError here, before any file is written
    step = int(state.step)
    path = os.path.abspath(os.fspath(directory))
    before = set(threading.enumerate())
    try:
        mngr = _manager(path, keep)
        try:
            if step in mngr.all_steps():
                return False
            if jax.process_index() == 0:
                for p in _partial(path):
                    log.warning("removing %s: the partial files of an interrupted save", p)
                    for failed in _remove([p]):
                        log.warning("could not remove %s", failed)
            args = {"state": ocp.args.StandardSave(_ckpt_tree(state)), "meta": ocp.args.JsonSave(meta)}
            mngr.save(step, args=ocp.args.Composite(**args))
            mngr.wait_until_finished()
        finally:
            mngr.close()
    except Exception as e:
        raise _save_failed(path, step, e, before) from e
    return True


def restore_checkpoint(
    directory: str | os.PathLike, target: TrainState, *, step: int | None = None
) -> tuple[TrainState, dict] | None:
    """Restore the checkpoint ``step`` (default: the latest) into the structure of ``target``.

    Only complete checkpoints count: the partial files of a save that was interrupted (a
    ``<step>.orbax-checkpoint-tmp`` directory, see ``save_checkpoint``) are ignored, so
    after a crash mid-save the latest complete checkpoint is restored. Nothing is written.

    Args:
      directory: the checkpoint directory.
      target: a ``TrainState`` with the right tree, shapes, dtypes and shardings (e.g.
        ``init_train_state`` of fresh params); its values are not used. The restored key
        uses ``target.key``'s PRNG implementation.
      step: which checkpoint; default the latest complete one.

    Returns:
      ``(state, meta)``, or ``None`` when the directory holds no complete checkpoint.

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp, optax
      >>> from seqjax.train import init_train_state, restore_checkpoint, save_checkpoint
      >>> opt = optax.sgd(0.1)
      >>> state = init_train_state({"w": jnp.arange(3.0)}, opt, key=jax.random.key(0))
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     _ = save_checkpoint(tmp, state, meta={"note": "warm start"})
      ...     target = init_train_state({"w": jnp.zeros(3)}, opt, key=jax.random.key(1))
      ...     restored, meta = restore_checkpoint(tmp, target)
      >>> restored.params["w"].tolist(), meta
      ([0.0, 1.0, 2.0], {'note': 'warm start'})
    """
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        return None
    mngr = _manager(directory, None)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            return None
        tree = _ckpt_tree(target)
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
        )
        r = mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
    finally:
        mngr.close()
    t = r.state
    t = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), jax.tree_util.tree_leaves(t))
    key = jax.random.wrap_key_data(t["key"], impl=jax.random.key_impl(target.key))
    return TrainState(t["params"], t["opt_state"], t["step"], key, t["skipped"]), dict(r.meta or {})
