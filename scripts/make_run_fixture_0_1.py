"""Write the seqjax 0.1 run-directory fixture (run once, on the 0.1 code, before the layout moves).

    git worktree add /tmp/seqjax-0.1 168f500          # the last commit with 0.1's code
    PYTHONPATH=/tmp/seqjax-0.1 python scripts/make_run_fixture_0_1.py

writes ``tests/data/run_0_1/`` (a ``seqjax train`` run directory: config.json, history.json,
orbax checkpoints; the training figure is left out) and ``tests/data/run_0_1_params.npz``
(the params 0.1's own ``load_run`` read back from it). ``tests/test_migration.py`` checks
that the current code loads the directory to the same params and analyses it.
"""

import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np

import seqjax
from seqjax.cli import load_run, main

if __name__ == "__main__":
    root = pathlib.Path(__file__).resolve().parent.parent
    data = root / "tests" / "data"
    print(f"seqjax {seqjax.__version__} from {seqjax.__file__}")
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        rc = main(["train", "adding", "--cell", "lstm", "--hidden", "4", "--steps", "6", "--out", run])
        assert rc == 0, rc
        os.remove(os.path.join(run, "training.png"))
        config, cell, model, params, meta = load_run(run)
        target = data / "run_0_1"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(run, target)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in __import__("jax").tree_util.tree_flatten_with_path(params)[0]
    }
    np.savez(data / "run_0_1_params.npz", **flat)
    print(f"wrote {target} and {len(flat)} params")
    sys.exit(0)
