"""Runs written by seqjax 0.1 still load (issue 13's migration fixture, made before the layout moves).

``tests/data/run_0_1/`` is a ``seqjax train adding --cell lstm --hidden 4 --steps 6`` run
directory written by the 0.1 code (``scripts/make_run_fixture_0_1.py``), and
``run_0_1_params.npz`` the params 0.1's own ``load_run`` read from it. The current code must
read the same params bit for bit, and analyse the run from the command line.
"""

import pathlib
import shutil

import jax
import numpy as np
import pytest

import seqjax as sj
from seqjax.cli import load_run, main

DATA = pathlib.Path(__file__).parent / "data"


def _flat(params):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def test_run_directory_of_0_1_loads_bit_for_bit():
    config, cell, model, params, meta = load_run(str(DATA / "run_0_1"))
    assert config["cell"] == "lstm" and config["hidden"] == 4
    with np.load(DATA / "run_0_1_params.npz") as f:
        want = dict(f)
    got = _flat(params)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the loaded body fits the cell the config describes, and runs
    sj.check_params(cell, params["body"], config["input_size"])
    _, ys = sj.unroll(cell, params["body"], np.zeros((2, 5, config["input_size"]), np.float32))
    assert ys.shape == (2, 5, 4) and np.all(np.isfinite(ys))


@pytest.mark.slow
def test_spectrum_command_on_a_0_1_run(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(DATA / "run_0_1", run)
    rc = main(["spectrum", str(run), "--out", str(tmp_path / "report"), "--T", "20", "--batch", "2"])
    assert rc == 0
    assert any((tmp_path / "report").iterdir())


def test_dropout_cell_reproduces_the_0_1_dropout_options():
    """``unroll(cells.dropout(cell, input_rate=r, recurrent_rate=q, key=k), ...)`` draws the
    masks 0.1's ``unroll(input_dropout=r, recurrent_dropout=q, key=k)`` drew
    (``tests/data/dropout_0_1.npz``, written by the 0.1 code: ``scripts/make_dropout_fixture_0_1.py``).
    Same float32 operations in the same order: equal to float32 rounding."""
    cases = {"lstm": (0.3, 0.2), "gru": (0.3, 0.2), "rnn": (0.0, 0.4), "mgu": (0.5, 0.0)}
    xs = jax.random.normal(jax.random.key(1), (4, 6, 3))
    with np.load(DATA / "dropout_0_1.npz") as f:
        want = dict(f)
    for name, (r_in, r_rec) in cases.items():
        cell = getattr(sj, name)(5)
        params = cell.init(jax.random.key(0), 3)
        dropped = sj.cells.dropout(cell, input_rate=r_in, recurrent_rate=r_rec, key=jax.random.key(7))
        _, ys = jax.jit(lambda p, x, c=dropped: sj.unroll(c, p, x))(params, xs)
        np.testing.assert_allclose(ys, want[name], rtol=1e-6, atol=1e-7, err_msg=name)
