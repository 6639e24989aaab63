"""Checkpoints of a ``TrainState`` with orbax-checkpoint (imported lazily).

A checkpoint ``step`` under ``directory`` is an orbax ``Composite`` of two items:

* ``state``: ``{"params", "opt_state", "step", "key": key_data(key), "skipped"}``
  (``StandardSave``; the typed key is stored as its raw ``uint32`` data);
* ``meta``: a JSON dict (``fit`` stores ``position: [epoch, index]``, ``history``,
  ``batch_size`` and ``steps_per_call``).

This layout is the one seqjax 0.1 wrote; runs made by 0.1 load unchanged
(``tests/test_migration.py``).
"""

from __future__ import annotations

import logging
import os

import jax

from seqjax.train.state import TrainState
from seqjax.train.step import _all_finite

__all__ = ["save_checkpoint", "restore_checkpoint"]

log = logging.getLogger("seqjax.train")


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


def save_checkpoint(
    directory: str | os.PathLike, state: TrainState, *, meta: dict | None = None, keep: int | None = 3
) -> bool:
    """Save ``state`` (and a JSON-able ``meta``) as checkpoint ``int(state.step)`` under ``directory``.

    Uses orbax-checkpoint (``CheckpointManager``; a checkpoint is written to a temporary
    directory and renamed when complete, so a crash never leaves a half-written "latest").
    Refuses non-finite states: returns ``False`` and writes nothing, so the last good
    checkpoint is never replaced by a bad one. A step already saved is not rewritten
    (``False``). Keeps the newest ``keep`` checkpoints.

    Args:
      directory: the checkpoint directory (created if missing).
      state: the ``TrainState`` (any shapes; the arrays are stored as they are).
      meta: extra JSON data (``fit`` stores the data position and the history).
      keep: how many checkpoints to keep (``None``: all).

    Returns:
      Whether a checkpoint was written.

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
    step = int(state.step)
    mngr = _manager(directory, keep)
    try:
        if step in mngr.all_steps():
            return False
        args = {"state": ocp.args.StandardSave(_ckpt_tree(state)), "meta": ocp.args.JsonSave(meta or {})}
        mngr.save(step, args=ocp.args.Composite(**args))
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return True


def restore_checkpoint(
    directory: str | os.PathLike, target: TrainState, *, step: int | None = None
) -> tuple[TrainState, dict] | None:
    """Restore the checkpoint ``step`` (default: the latest) into the structure of ``target``.

    Args:
      directory: the checkpoint directory.
      target: a ``TrainState`` with the right tree, shapes, dtypes and shardings (e.g.
        ``init_train_state`` of fresh params); its values are not used. The restored key
        uses ``target.key``'s PRNG implementation.
      step: which checkpoint; default the latest.

    Returns:
      ``(state, meta)``, or ``None`` when the directory holds no checkpoint.

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
