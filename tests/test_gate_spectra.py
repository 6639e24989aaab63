"""The ``recurrent_blocks`` capability and ``seqjax.spectrum.gates.gate_spectra``.

Oracles, each independent of the code under test:

* the column blocks of ``params["w_h"]`` sliced by hand in the gate order of the equations
  (PyTorch's documented layouts: ``weight_hh_l0 = (W_hi|W_hf|W_hg|W_ho)`` for ``nn.LSTM``,
  ``(W_hr|W_hz|W_hn)`` for ``nn.GRU``; the papers' ``f, c~`` for JANET and ``f, n`` for the
  MGU), then float64 ``np.linalg.svd`` / ``np.linalg.eigvals``;
* the cell's own step: ``jax.jacfwd`` of each gate's pre-activation (recovered from
  ``cell.gates`` by the inverse of the gate's activation, written here from the equations)
  with respect to ``h_{t-1}`` equals the block transposed (times the Jacobian of the gated
  state where the block multiplies one: the MGU's ``f * h``);
* zeroing one column block of ``w_h`` changes that gate's activation and only the gates
  the equations say depend on it.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64_enabled

import seqjax as sj
from seqjax.cells import CAPABILITIES, CellMeta
from seqjax.spectrum.gates import GateSpectrum, gate_spectra
from seqjax.testing import CellCheckError, check_cell

H, I, P = 5, 3, 3

CELLS = {
    "rnn": lambda: sj.rnn(H),
    "lstm": lambda: sj.lstm(H),
    "lstm_proj": lambda: sj.lstm(H, proj_size=P),
    "gru": lambda: sj.gru(H),
    "janet": lambda: sj.janet(H),
    "mgu": lambda: sj.mgu(H),
}

# The column blocks of w_h, in order, from the equations / PyTorch's documentation.
ORDER = {
    "rnn": ("net",),
    "lstm": ("i", "f", "g", "o"),
    "lstm_proj": ("i", "f", "g", "o"),
    "gru": ("r", "z", "n"),
    "janet": ("f", "c_tilde"),
    "mgu": ("f", "n"),
}

# The inverse of each gate's activation: the pre-activation from the activation.
_LOGIT = "logit"  # sigmoid gates
_ATANH = "atanh"  # tanh gates
_NONE = "none"  # the Elman cell's gates report the pre-activation itself
INVERSE = {
    "rnn": {"net": _NONE},
    "lstm": {"i": _LOGIT, "f": _LOGIT, "g": _ATANH, "o": _LOGIT},
    "lstm_proj": {"i": _LOGIT, "f": _LOGIT, "g": _ATANH, "o": _LOGIT},
    "gru": {"r": _LOGIT, "z": _LOGIT, "n": _ATANH},
    "janet": {"f": _LOGIT, "c_tilde": _ATANH},
    "mgu": {"f": _LOGIT, "n": _ATANH},
}

# Which gates a recurrent block reaches (GRU: n = tanh(a_n + r * u_n); MGU: n reads f * h).
REACHES = {"gru": {"r": {"r", "n"}}, "mgu": {"f": {"f", "n"}}}


def _invert(kind, a):
    if kind == _LOGIT:
        return jnp.log(a) - jnp.log1p(-a)
    if kind == _ATANH:
        return jnp.arctanh(a)
    return a


def _params(cell, seed=0, dtype=np.float64):
    """Params of the layout ``cell.init`` makes (traced abstractly, nothing compiled), entries
    N(0, 1/4) from NumPy."""
    rng = np.random.default_rng(seed)
    like = jax.eval_shape(lambda key: cell.init(key, I), jax.random.key(0))
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray((0.5 * rng.standard_normal(a.shape)).astype(dtype)), like
    )


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _numpy_spectrum(w):
    w = np.asarray(w, np.float64)
    sigma = np.linalg.svd(w, compute_uv=False)[0]
    rho = np.max(np.abs(np.linalg.eigvals(w))) if w.shape[0] == w.shape[1] else np.nan
    return np.array([sigma, rho])


def _numpy_blocks(w_h, names):
    w = np.asarray(w_h, np.float64)
    width = w.shape[1] // len(names)
    assert width == H
    return {name: w[:, k * width : (k + 1) * width] for k, name in enumerate(names)}


def _assert_matches_numpy(spectra, blocks):
    assert list(spectra) == list(blocks)  # names and the cell's gate order
    for name, w in blocks.items():
        s = spectra[name]
        assert isinstance(s, GateSpectrum)
        chex.assert_shape([s.sigma_max, s.spectral_radius], ())
        chex.assert_type([s.sigma_max, s.spectral_radius], jnp.float64)
        got = np.array([float(s.sigma_max), float(s.spectral_radius)])
        np.testing.assert_allclose(got, _numpy_spectrum(w), rtol=1e-12, atol=1e-14, equal_nan=True)


# --------------------------------------------------------------------------- against NumPy


@pytest.mark.parametrize("name", sorted(CELLS))
def test_gate_spectra_match_numpy(name):
    with x64_enabled():
        cell = CELLS[name]()
        params = _params(cell)
        blocks = _numpy_blocks(params["w_h"], ORDER[name])
        got = cell.recurrent_blocks(params)
        assert list(got) == list(ORDER[name])
        chex.assert_trees_all_equal({k: np.asarray(v) for k, v in got.items()}, blocks)
        _assert_matches_numpy(gate_spectra(cell, params), blocks)
        rows = P if name == "lstm_proj" else H
        chex.assert_shape(list(got.values()), (rows, H))


def test_gate_spectra_under_jit_equal_eager():
    with x64_enabled():
        cell = sj.gru(H)
        params = _params(cell)
        eager = gate_spectra(cell, params)
        jitted = jax.jit(lambda p: gate_spectra(cell, p))(params)
        assert sorted(jitted) == sorted(eager)  # a dict through jit comes back with sorted keys
        chex.assert_trees_all_close(
            {k: tuple(v) for k, v in jitted.items()}, {k: tuple(v) for k, v in eager.items()}, rtol=1e-12
        )
        chex.assert_type(jax.tree_util.tree_leaves(jitted), jnp.float64)


def test_wrapped_and_stacked_cells():
    with x64_enabled():
        lstm, gru = sj.lstm(H), sj.gru(H)
        # a stack: each layer's blocks, "layer_<l>.<gate>", layer by layer
        stacked = sj.stack([lstm, gru])
        params = _params(stacked)
        want = {f"layer_0.{k}": v for k, v in _numpy_blocks(params[0]["w_h"], ORDER["lstm"]).items()}
        want |= {f"layer_1.{k}": v for k, v in _numpy_blocks(params[1]["w_h"], ORDER["gru"]).items()}
        _assert_matches_numpy(gate_spectra(stacked, params), want)
        # dropout between layers masks inputs only: the blocks stay
        dropped = sj.stack([lstm, gru], dropout=0.3, key=jax.random.key(1))
        assert list(dropped.recurrent_blocks(params)) == list(want)
        # learnable_carry (params {"cell": ..., "carry0": ...}) and wrap(inputs=) keep them
        lc = sj.learnable_carry(gru)
        p_lc = _params(lc)
        _assert_matches_numpy(gate_spectra(lc, p_lc), _numpy_blocks(p_lc["cell"]["w_h"], ORDER["gru"]))
        doubled = sj.cells.wrap(lstm, inputs=lambda x: 2.0 * x)
        p = _params(lstm)
        _assert_matches_numpy(gate_spectra(doubled, p), _numpy_blocks(p["w_h"], ORDER["lstm"]))
        # input dropout keeps them; recurrent dropout makes the term (m * h) W_h: dropped
        key = jax.random.key(2)
        assert sj.cells.dropout(lstm, input_rate=0.5, key=key).recurrent_blocks is not None
        assert sj.cells.dropout(lstm, recurrent_rate=0.5, key=key).recurrent_blocks is None
        # a stack with a layer that has none has none; a new step drops it
        assert sj.stack([lstm, sj.tdnn(H, 2)]).recurrent_blocks is None
        assert lstm._replace(step=gru.step).recurrent_blocks is None
        assert "recurrent_blocks" in CAPABILITIES and "recurrent_blocks" in lstm.capabilities()


# --------------------------------------------------------------------------- against the step


def _carry_with_h(cell, params, h, seed):
    """An unbatched carry whose ``h`` is ``h`` (random other leaves)."""
    carry = cell.initial_carry(params, ())
    if isinstance(carry, sj.LSTMState):
        c = _normal(seed, carry.c.shape)
        return sj.LSTMState(h, c)
    return h


def _pre_activations(name, cell, params, x, seed):
    """``h -> {gate: net_g}`` recovered from ``cell.gates`` (the GRU's ``n``: ``net_n / r``)."""

    def pre(h):
        g = cell.gates(params, _carry_with_h(cell, params, h, seed), x)
        out = {k: _invert(INVERSE[name][k], g[k]) for k in ORDER[name]}
        if name == "gru":  # atanh(n) = a_n + r * (h W_hn + b_hn) with a_n = 0 here
            out["n"] = out["n"] / g["r"]
        return out

    return pre


@pytest.mark.parametrize("name", sorted(CELLS))
def test_blocks_are_the_recurrent_jacobians_of_the_gates(name):
    """``d net_g / d h_{t-1} = (W_h^g)^T`` (MGU ``n``: ``W_hn^T d(f * h)/dh``), by jax.jacfwd."""
    with x64_enabled():
        cell = CELLS[name]()
        params = _params(cell, seed=1)
        rows = P if name == "lstm_proj" else H
        h = 0.5 * _normal(3, (rows,))
        x = _normal(4, (I,))
        if name in ("gru", "mgu"):  # the candidate's input term a_n = x W_xn + b_n is zero
            x = jnp.zeros_like(x)
            params["b"] = params["b"].at[-H:].set(0.0)
        pre = _pre_activations(name, cell, params, x, seed=5)
        jac = jax.jit(jax.jacfwd(pre))(h)  # {gate: (H, rows)}
        blocks = cell.recurrent_blocks(params)
        want = {k: blocks[k].T for k in ORDER[name]}
        if name == "mgu":  # n's block multiplies the gated state f * h
            f_h = jax.jit(jax.jacfwd(lambda h: cell.gates(params, h, x)["f"] * h))(h)
            want["n"] = blocks["n"].T @ f_h
        chex.assert_trees_all_close(jac, want, rtol=1e-9, atol=1e-11)


def test_stack_blocks_are_each_layers_recurrent_jacobians():
    with x64_enabled():
        cells = [sj.lstm(H), sj.janet(H)]
        stacked = sj.stack(cells)
        params = _params(stacked, seed=2)
        carry = jax.tree_util.tree_map(lambda a: 0.5 * _normal(6, a.shape), stacked.initial_carry(params, ()))
        x = _normal(7, (I,))
        blocks = stacked.recurrent_blocks(params)
        for l, name in enumerate(("lstm", "janet")):

            def pre(h, l=l, name=name):
                c = list(carry)
                c[l] = c[l]._replace(h=h) if isinstance(c[l], sj.LSTMState) else h
                g = stacked.gates(params, tuple(c), x)[f"layer_{l}"]
                return {k: _invert(INVERSE[name][k], g[k]) for k in ORDER[name]}

            h_l = carry[l].h if isinstance(carry[l], sj.LSTMState) else carry[l]
            jac = jax.jit(jax.jacfwd(pre))(h_l)
            want = {k: blocks[f"layer_{l}.{k}"].T for k in ORDER[name]}
            chex.assert_trees_all_close(jac, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_zeroing_a_block_changes_only_its_gates(name):
    with x64_enabled():
        cell = CELLS[name]()
        params = _params(cell, seed=3)
        rows = P if name == "lstm_proj" else H
        h = _normal(8, (rows,))
        carry = _carry_with_h(cell, params, h, seed=9)
        x = _normal(10, (I,))
        gates = jax.jit(cell.gates)
        before = gates(params, carry, x)
        for k, gate in enumerate(ORDER[name]):
            zeroed = dict(params, w_h=params["w_h"].at[:, k * H : (k + 1) * H].set(0.0))
            after = gates(zeroed, carry, x)
            reached = REACHES.get(name, {}).get(gate, {gate})
            for other in ORDER[name]:
                moved = float(jnp.max(jnp.abs(after[other] - before[other])))
                if other in reached:
                    assert moved > 1e-6, (gate, other)
                else:
                    assert moved == 0.0, (gate, other, moved)
            assert not bool(jnp.any(cell.recurrent_blocks(zeroed)[gate]))


# --------------------------------------------------------------------------- refusals and checks


def _user_cell(**kw):
    def init(key, n):
        return {"w": jnp.ones((n, 4)), "u": 0.5 * jnp.eye(4)}

    def initial_carry(p, batch_shape=()):
        return jnp.zeros(tuple(batch_shape) + (4,), p["w"].dtype)

    def step(p, h, x):
        h = jnp.tanh(x @ p["w"] + h @ p["u"])
        return h, h

    return sj.Cell(init, initial_carry, step, **kw)


def test_refuses_a_cell_without_the_capability():
    cell = _user_cell()
    params = cell.init(jax.random.key(0), 2)
    with pytest.raises(
        ValueError, match=r"'Cell' has no recurrent_blocks capability.*recurrent_blocks=lambda"
    ):
        gate_spectra(cell, params)
    named = _user_cell(meta=CellMeta("leaky", 4))
    with pytest.raises(ValueError, match=r"'leaky' has no recurrent_blocks"):
        gate_spectra(named, params)
    tdnn = sj.tdnn(H, 2)
    with pytest.raises(ValueError, match=r"'tdnn' has no recurrent_blocks"):
        gate_spectra(tdnn, _params(tdnn, dtype=np.float32))
    assert sj.narx(2, 3).recurrent_blocks is None
    with pytest.raises(TypeError, match="must be a seqjax.Cell"):
        gate_spectra(params, params)
    # given the capability, a user's cell works (and a non-matrix block is refused)
    with_blocks = _user_cell(recurrent_blocks=lambda p: {"h": p["u"]})
    s = gate_spectra(with_blocks, params)["h"]
    chex.assert_trees_all_close((s.sigma_max, s.spectral_radius), (0.5, 0.5), rtol=1e-6)
    with pytest.raises(ValueError, match=r"'bad' of shape \(4,\)"):
        gate_spectra(_user_cell(recurrent_blocks=lambda p: {"bad": p["u"][0]}), params)


def test_check_cell_checks_the_blocks_structure():
    only = {"checks": ("recurrent_blocks",), "input_size": I}
    stacked = sj.stack([sj.rnn(H), sj.gru(H)])  # names "layer_0.net", "layer_1.r", ...
    report = check_cell(stacked, params=_params(stacked, dtype=np.float32), **only)
    assert report.passed == ("recurrent_blocks",)
    rnn = sj.rnn(H)
    misnamed = rnn._replace(recurrent_blocks=lambda p: {"h": p["w_h"]})  # gates names it "net"
    with pytest.raises(CellCheckError, match="recurrent_blocks") as err:
        check_cell(misnamed, params=_params(rnn, dtype=np.float32), **only)
    assert err.value.capability == "recurrent_blocks"
