"""Numerics frozen across the redesign: every built-in cell, stack, bidirectional layer and
``learnable_carry`` reproduces the float64 outputs, final carries, gradients (params and
inputs) and step Jacobians that seqjax 0.1 recorded (``tests/data/golden_0_1.npz``, made by
``scripts/make_golden.py``; what each case holds is in ``tests/golden.py``).

Tolerance 1e-12 (relative to each array's scale, float64): the maths is the same; only the
order of a few float additions changed (e.g. biases folded before the recurrent matmul),
which moves results by a few ulps (~1e-16), far below it.
"""

import pathlib

import numpy as np
import pytest
from golden import case_names, compute_all
from helpers import x64_enabled

DATA = pathlib.Path(__file__).parent / "data" / "golden_0_1.npz"
# Every case runs with --runslow (.ci/run): each takes seconds (every unroll option of the
# case, in float64). The cells' independent oracles run in the default suite
# (tests/test_cells_reference.py, tests/test_contract.py, tests/test_layers.py).


@pytest.fixture(scope="module")
def golden():
    with np.load(DATA) as f:
        return dict(f)


@pytest.mark.slow
@pytest.mark.parametrize("case", case_names())
def test_golden_0_1(golden, case):
    with x64_enabled():
        got = compute_all(only=case)
    want = {k: v for k, v in golden.items() if k.split("/")[0] == case}
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))[:5]
    for key, w in want.items():
        g = got[key]
        assert g.shape == w.shape, key
        scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12 * scale, err_msg=key)
