"""Write ``tests/data/dropout_0_1.npz``: outputs of 0.1's ``unroll(input_dropout=,
recurrent_dropout=, key=)``, which ``seqjax.cells.dropout`` must reproduce.

Run on a checkout from before the dropout options left ``unroll`` (commit 3a0f204)::

    git worktree add /tmp/before 3a0f204
    PYTHONPATH=/tmp/before python scripts/make_dropout_fixture_0_1.py

Inputs and keys are fixed here and in ``tests/test_migration.py``.
"""

import pathlib

import jax
import numpy as np

import seqjax as sj

CASES = {"lstm": (0.3, 0.2), "gru": (0.3, 0.2), "rnn": (0.0, 0.4), "mgu": (0.5, 0.0)}


def main() -> None:
    out = {}
    xs = jax.random.normal(jax.random.key(1), (4, 6, 3))
    for name, (r_in, r_rec) in CASES.items():
        cell = getattr(sj, name)(5)
        params = cell.init(jax.random.key(0), 3)
        options = {"input_dropout": r_in, "recurrent_dropout": r_rec, "key": jax.random.key(7)}
        _, ys = sj.unroll(cell, params, xs, **options)  # the 0.1 options
        out[name] = np.asarray(ys)
    path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "dropout_0_1.npz"
    np.savez(path, **out)
    print("wrote", path, "with", sj.__file__)


if __name__ == "__main__":
    main()
