"""The GPU benchmark mode (``benchmarks/gpu.py``) in its CPU test mode, in-process.

The mode's own correctness checks are the oracles here: every implementation that takes
seqjax's weights (the cuDNN kernel, ``jax.experimental.rnn``'s reference on the packed
weights, PyTorch through ``benchmarks.peers.torch_module``) must match seqjax's outputs and
gradients to the CPU speed suite's float32 tolerances, so the weight packing and the gradient
mapping of the benchmark are checked against independent implementations. The timing
protocol and the budget are checked by counting what ran and what was written.
"""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import gpu  # noqa: E402


def _read(out):
    with open(os.path.join(out, "gpu.json")) as f:
        data = json.load(f)
    with open(os.path.join(out, "gpu.md")) as f:
        md = f.read()
    return data, md


def test_budget_exceeded_starts_nothing_and_still_writes(tmp_path):
    """A budget already spent: no row starts, each planned row is listed as skipped, and the
    files are written (complete, not partial) with the environment recorded."""
    out = str(tmp_path)
    res = gpu.run(
        cpu_test=True,
        budget_s=1e-9,
        spectrum_mode="tiny",
        libraries=["seqjax"],
        out_dir=out,
        log=lambda m: None,
    )
    assert res["rows"] == [] and res["eig_rows"] == [] and res["spectrum"]["rows"] == []
    budget_lines = [s for s in res["skipped"] if "budget" in s]
    assert len(budget_lines) == len(res["plan"]) > 0
    data, md = _read(out)
    assert data["partial"] is None and data["mode"] == "cpu-test"
    assert data["environment"]["jax"] and data["environment"]["device_used"]
    assert data["environment"]["cudnn_lstm_traceable"] is False or gpu._cudnn.cudnn_available()
    assert "CPU TEST" in md and "budget" in md


def test_cpu_test_lstm_row_weight_sharing_peers(tmp_path):
    """The LSTM row of the CPU test with the implementations that take seqjax's weights (the
    cuDNN kernel, jax.experimental.rnn's stand-in, PyTorch): each checked against seqjax
    (outputs and gradients) and then timed in both passes; the GPU-only peers said to be
    replaced. Flax (own weights, two more compiles) runs in the bench test below."""
    pytest.importorskip("torch")
    out = str(tmp_path)
    res = gpu.run(
        cpu_test=True,
        kinds=["lstm"],
        libraries=["seqjax", "jax", "torch"],
        spectrum_mode="none",
        rounds=2,
        out_dir=out,
        log=lambda m: None,
    )
    assert not res.get("errors"), res.get("errors")
    failed = [c for c in res["checks"] if not c["ok"]]
    assert not failed, failed
    checked = {c["what"] for c in res["checks"]}
    want = ["seqjax (cuDNN kernel)", "jax.experimental.rnn.lstm_ref (CPU stand-in)", "torch"]
    for name in want:
        assert f"forward: {name} vs seqjax" in checked
        assert f"gradients: {name} vs seqjax" in checked
    impls = {(r["impl"], r["pass"]) for r in res["rows"]}
    assert impls == {(n, p) for n in ["seqjax", *want] for p in ("forward", "forward+backward")}
    for r in res["rows"]:
        assert r["reps"] == 2 and r["median_s"] > 0
        if r["impl"] == "seqjax":
            assert r["ratio_median"] == 1.0
    data, md = _read(out)
    assert data["partial"] is None and len(data["rows"]) == len(res["rows"])
    assert "## tiny (B=2, T=6, I=3, H=4)" in md
    assert "replaced by its CPU reference lstm_ref" in md and "runs its fallback" in md


@pytest.mark.bench
def test_cpu_test_end_to_end(tmp_path):
    """``python -m benchmarks.gpu --cpu-test`` as the command line runs it: both cells with
    every peer (Flax too), the spectrum suite and the eigenvalue rows (backend against host),
    every check passing."""
    out = str(tmp_path)
    assert gpu.main(["--cpu-test", "--out", out, "--rounds", "2"]) == 0
    data, md = _read(out)
    assert {r["cell"] for r in data["rows"]} == {"lstm", "gru"}
    names = {r["impl"] for r in data["rows"]}
    assert {"flax LSTMCell", "flax OptimizedLSTMCell", "flax GRUCell", "seqjax (cuDNN kernel)"} <= names
    assert {r["impl"] for r in data["eig_rows"]} == {"backend", "host (NumPy via pure_callback)"}
    assert data["spectrum"]["rows"] and all(c["ok"] for c in data["spectrum"]["checks"])
    assert "# Spectrum suite on this device" in md
