"""Smoke tests of examples/ on tiny sizes (each example's ``main``), plus fast checks of the
data the examples generate against what the docstrings say."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- generated data (fast)


@pytest.mark.parametrize("task", ["reverse", "sort"])
def test_seq2seq_batches_are_what_the_docstring_says(task):
    m = _load("seq2seq_reverse")
    src, src_len, dec_in, tgt, tgt_len = (
        np.asarray(a) for a in m.make_batch(jax.random.key(0), 16, min_len=2, max_len=6, task=task)
    )
    for i in range(16):
        n = int(src_len[i])
        digits = list(src[i, :n])
        want = digits[::-1] if task == "reverse" else sorted(digits)
        assert list(tgt[i, :n]) == want
        assert tgt[i, n] == m.EOS and tgt_len[i] == n + 1
        assert dec_in[i, 0] == m.BOS and list(dec_in[i, 1 : n + 1]) == list(tgt[i, :n])


def test_slot_grammar_tags_follow_the_cues():
    m = _load("slot_filling")
    rng = np.random.default_rng(0)
    depart_verbs = {v[-1] for v in m.DEPART}
    for _ in range(200):
        words, tags = m.sentence(rng)
        assert len(words) == len(tags)
        verb = next(w for w in words if w in depart_verbs or w in {v[-1] for v in m.ARRIVE})
        for i, (w, t) in enumerate(zip(words, tags)):
            if w in m.CITIES:
                assert t == {"from": "from_city", "to": "to_city"}[words[i - 1]]
            if w in m.TIMES:
                assert t == ("depart_time" if verb in depart_verbs else "arrive_time")
    ids, tags, lengths, vocab = m.dataset(50, 0)
    assert ids.shape == tags.shape and np.all(ids[np.arange(ids.shape[1])[None, :] >= lengths[:, None]] == 0)


# ---------------------------------------------------------------- each example's main on tiny sizes


@pytest.mark.slow
def test_char_lm_tiny():
    m = _load("char_lm")
    r = m.main(steps=3, hidden=8, seq_len=16, batch=4, max_chars=3000, gen_chars=20, progress=False)
    assert len(r["sample"]) == 20
    assert np.isfinite(r["valid_bpc"]) and r["valid_bpc"] > 0
    assert 0 < r["unigram_bpc"] < np.log2(128)


@pytest.mark.slow
def test_seq2seq_tiny():
    m = _load("seq2seq_reverse")
    r = m.main(steps=3, hidden=8, batch=8, max_len=4, progress=False)
    assert 0.0 <= r["sequence_accuracy"] <= 1.0 and 0.0 <= r["token_accuracy"] <= 1.0
    assert len(r["examples"]) == 3 and all("->" in e for e in r["examples"])


@pytest.mark.slow
def test_slot_filling_tiny():
    m = _load("slot_filling")
    r = m.main(steps=3, hidden=4, embed=4, batch=8, train_size=64, test_size=32)
    for k in ("slot_accuracy", "time_accuracy", "city_accuracy", "baseline_time_accuracy"):
        assert 0.0 <= r[k] <= 1.0
    assert isinstance(r["example"], str) and len(r["example"].split()) >= 3


@pytest.mark.slow
def test_spectrum_analysis_tiny(tmp_path):
    m = _load("spectrum_analysis")
    r = m.main(
        "lstm",
        hidden=4,
        T=8,
        steps=3,
        batch=8,
        analysis_batch=2,
        fixed_point_starts=4,
        out=str(tmp_path),
        progress=False,
    )
    lyap = r["lyapunov"]
    assert lyap.shape == (8,) and np.all(np.diff(lyap[np.isfinite(lyap)]) <= 1e-6)  # decreasing
    assert r["spectral_radius"].shape == (8,)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "spectrum.png").exists()


@pytest.mark.slow
def test_multi_device_one_device_in_process():
    m = _load("multi_device")
    r = m.main(steps=2, hidden=4, T=6, batch=8, progress=False)
    assert r["devices"] == len(jax.devices())
    # float32 rounding only: both runs see the same batches and keys
    assert r["max_param_diff"] < 1e-4


@pytest.mark.slow
def test_multi_device_four_cpu_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "multi_device.py"), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "4 device(s)" in p.stdout and "params live on 4 device(s)" in p.stdout
    diff = float(re.search(r"largest parameter difference ([0-9.e+-]+)", p.stdout).group(1))
    assert diff < 1e-4  # the sharded step equals the single-device step up to float32 rounding
