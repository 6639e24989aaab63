"""A tiny ``fit`` with checkpoints, and faults injected into orbax's save (issue 16).

``tests/test_checkpoint_faults.py`` runs this file in a fresh process::

    python tests/faults/checkpoint_run.py FAULT STEP DIRECTORY

(the run below, with ``FAULT`` hitting the save of checkpoint ``STEP``), imports ``run`` for
the uninterrupted reference and the resumed run, and ``install`` for in-process faults.
The faults:

* ``kill-before-finalize``: SIGKILL when orbax is about to finalize checkpoint ``STEP``
  (``CompositeCheckpointHandler.finalize``, which ``Checkpointer.save`` calls once every item,
  the arrays and the JSON, is written into ``<STEP>.orbax-checkpoint-tmp/``, and which merges
  the items' OCDBT manifests and renames their temporary directories);
* ``kill-before-rename``: SIGKILL just before the atomic rename
  ``<STEP>.orbax-checkpoint-tmp`` -> ``<STEP>`` (``AtomicRenameTemporaryPath.finalize`` of the
  step directory): everything is on disk but the commit;
* ``full-disk``: the JSON ``meta`` item of checkpoint ``STEP`` is opened on ``/dev/full``
  (the file itself is created empty first), so the kernel answers its write with
  ``ENOSPC``, as on a full disk (without ``/dev/full`` the open raises ``ENOSPC``);
* ``full-disk-arrays``: every array write of checkpoint ``STEP`` (orbax's tensorstore
  wrapper ``serialization.async_serialize_from_host``) fails with the error tensorstore
  raises on a full disk: a ``ValueError`` whose text carries ``os_error_code='28'`` (the
  text below is the one seen on a full tmpfs). Every write fails, as on a full disk: a
  tensorstore write left pending when orbax gives up would call back into a closed event
  loop later (an unraisable ``RuntimeError`` in some later test);
* ``none``: no fault.

The hooks patch orbax's (and etils') private modules; if those move, the hooks raise or
never fire, and the tests fail: they cannot pass without the fault happening.
"""

from __future__ import annotations

import errno
import os
import signal
import sys

EVERY, STEPS = 2, 6
TMP = ".orbax-checkpoint-tmp"
# tensorstore's error for a write to a full disk (seen on a full tmpfs), shortened
TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "{path}": '
    "Failed to write 353 bytes to file 11: No space left on device [os_error_code='28']"
)


def run(directory, *, resume: bool = False):
    """The run: a linear model, adam, 6 steps of batch 4, a checkpoint every 2 steps (all kept)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from seqjax.train import Checkpoints, Logging, fit

    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)
    params = {"w": jnp.zeros(3), "b": jnp.zeros(())}

    def loss(p, batch):
        xb, yb = batch
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    return fit(
        loss,
        optax.adam(0.1),
        params,
        (x, y),
        key=jax.random.key(3),
        steps=STEPS,
        batch_size=4,
        mesh=None,
        checkpoints=Checkpoints(directory, every=EVERY, keep=None, resume=resume),
        logging=Logging(every=1, progress=False),
    )


def _kill():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _path_in(spec, name: str):
    """The first ``path`` in a tensorstore spec (nested dicts) that contains ``name``."""
    if isinstance(spec, dict):
        if name in str(spec.get("path", "")):
            return spec["path"]
        for v in spec.values():
            if (found := _path_in(v, name)) is not None:
                return found
    return None


def install(fault: str, step: int, patch=setattr) -> None:
    """Install ``fault`` (see the module docstring) for the save of checkpoint ``step``.

    ``patch(obj, name, value)`` sets the hooks: ``setattr`` in a subprocess, pytest's
    ``monkeypatch.setattr`` in-process (undone after the test).
    """
    tmp_name = f"{step}{TMP}"
    if fault == "kill-before-finalize":
        from orbax.checkpoint._src.handlers import composite_checkpoint_handler as cch

        finalize = cch.CompositeCheckpointHandler.finalize

        def finalize_or_die(self, directory):
            if directory.name == tmp_name:
                _kill()
            return finalize(self, directory)

        patch(cch.CompositeCheckpointHandler, "finalize", finalize_or_die)
    elif fault == "kill-before-rename":
        from orbax.checkpoint._src.path import atomicity

        rename = atomicity.AtomicRenameTemporaryPath.finalize

        async def rename_or_die(self):
            if self.get().name == tmp_name:  # the step's directory (an item's is <item>.orbax-...)
                _kill()
            return await rename(self)

        patch(atomicity.AtomicRenameTemporaryPath, "finalize", rename_or_die)
    elif fault == "full-disk":
        from etils.epath import backend

        open_ = backend._OsPathBackend.open

        def open_on_full_disk(self, path, mode):
            p = os.fspath(path)
            if "w" in mode and p.endswith(os.path.join(tmp_name, f"meta{TMP}", "metadata")):
                open_(self, path, mode).close()  # the file is created, then the data does not fit
                if not os.path.exists("/dev/full"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), p)
                return open_(self, "/dev/full", mode)
            return open_(self, path, mode)

        patch(backend._OsPathBackend, "open", open_on_full_disk)
    elif fault == "full-disk-arrays":
        from orbax.checkpoint._src.serialization import serialization

        serialize = serialization.async_serialize_from_host

        async def serialize_on_full_disk(rslices, spec, *args, **kwargs):
            path = _path_in(spec, tmp_name)
            if path is not None:
                raise ValueError(TENSORSTORE_ENOSPC.format(path=path))
            return await serialize(rslices, spec, *args, **kwargs)

        patch(serialization, "async_serialize_from_host", serialize_on_full_disk)
    elif fault != "none":
        raise ValueError(f"unknown fault {fault!r}")


if __name__ == "__main__":
    fault, step, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    install(fault, step)
    run(directory)
    print("the run finished: the fault never happened", flush=True)
