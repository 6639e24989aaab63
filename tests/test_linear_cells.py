"""Cells linear in their state (``seqjax.cells.linear``: minGRU, minLSTM, LRU) and the
``linear_recurrence`` capability.

Oracles: float64 NumPy loops written from the papers' equations (complex NumPy for the
LRU), ``jax.jacfwd`` of the flattened step, the closed-form eigenvalues ``lambda`` and
``conj(lambda)`` of the LRU, and the distribution of the ring initialisation. Every float64
comparison runs inside ``helpers.x64_enabled()`` (switched on in the test, restored after).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64_enabled

import seqjax as sj
from seqjax.gradients import Autodiff
from seqjax.spectrum import flatten_state, unflatten_state
from seqjax.testing import CellCheckError, check_cell

B, T, I, H = 2, 6, 3, 4

CELLS = {
    "min_gru": lambda: sj.min_gru(H),
    "min_lstm": lambda: sj.min_lstm(H),
    "lru": lambda: sj.lru(H, r_min=0.5, r_max=0.95),
}
NAMES = sorted(CELLS)

# Exactness: the step and every reference do the same few float64 operations per step over
# T = 6 steps on O(1) numbers, so they agree to a few ulps (~1e-15); 1e-12 leaves room for
# XLA's reassociation and for exp/log/sigmoid differing from NumPy's by an ulp.
TOL = 1e-12


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


# The documented params layouts (each cell's docstring), filled by NumPy: no eager init to
# compile per test. ``test_init_layouts`` checks that ``init`` makes exactly these shapes.
_RNG = np.random.default_rng(0)
PARAMS64 = {
    "min_gru": {"w_x": _RNG.standard_normal((I, 2 * H)), "b": _RNG.standard_normal(2 * H)},
    "min_lstm": {"w_x": _RNG.standard_normal((I, 3 * H)), "b": _RNG.standard_normal(3 * H)},
    "lru": {
        "nu_log": np.log(-np.log(_RNG.uniform(0.5, 0.95, H))),  # |lambda| in (0.5, 0.95)
        "theta_log": np.log(_RNG.uniform(0.1, 3.0, H)),
        "gamma_log": 0.3 * _RNG.standard_normal(H),  # a free parameter, not sqrt(1 - |lambda|^2)
        "b_re": _RNG.standard_normal((I, H)),
        "b_im": _RNG.standard_normal((I, H)),
        "c_re": _RNG.standard_normal((H, I)),
        "c_im": _RNG.standard_normal((H, I)),
        "d": _RNG.standard_normal(I),
    },
}


@pytest.fixture(scope="module")
def params64():
    return PARAMS64


def _p32(name):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), PARAMS64[name])


@pytest.mark.parametrize("name", NAMES)
def test_init_layouts(name):
    """``init`` makes the documented keys, shapes and dtype (abstractly: nothing compiles)."""
    got = jax.eval_shape(lambda k: CELLS[name]().init(k, I), jax.random.key(0))
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
        k: (v.shape, jnp.float32) for k, v in PARAMS64[name].items()
    }


def _min_gru_ref(p, h0, xs):
    """minGRU, Feng et al. 2024 (sequential mode): z = sigmoid(x W_z + b_z), h~ = x W_h + b_h,
    h_t = (1 - z) h_{t-1} + z h~."""
    h, ys = h0.copy(), []
    for t in range(xs.shape[1]):
        a = xs[:, t] @ p["w_x"] + p["b"]
        z, h_tilde = _sigmoid(a[:, :H]), a[:, H:]
        h = (1.0 - z) * h + z * h_tilde
        ys.append(h)
    return h, np.stack(ys, axis=1)


def _min_lstm_ref(p, h0, xs):
    """minLSTM: f, i = sigmoid(.), f' = f / (f + i), i' = i / (f + i), h~ = x W_h + b_h,
    h_t = f' h_{t-1} + i' h~ (the ratio written as the paper writes it)."""
    h, ys = h0.copy(), []
    for t in range(xs.shape[1]):
        a = xs[:, t] @ p["w_x"] + p["b"]
        f, i, h_tilde = _sigmoid(a[:, :H]), _sigmoid(a[:, H : 2 * H]), a[:, 2 * H :]
        h = f / (f + i) * h + i / (f + i) * h_tilde
        ys.append(h)
    return h, np.stack(ys, axis=1)


def _lru_lambda_ref(p):
    return np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))


def _lru_ref(p, h0, xs):
    """LRU, Orvieto et al. 2023, in complex arithmetic: h_t = lambda h_{t-1} + gamma (x B),
    y_t = Re(h_t C) + d x_t (row vectors; B: (I, N), C: (N, I))."""
    lam = _lru_lambda_ref(p)
    b_mat, c_mat = p["b_re"] + 1j * p["b_im"], p["c_re"] + 1j * p["c_im"]
    gamma = np.exp(p["gamma_log"])
    h, ys = h0.re + 1j * h0.im, []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        h = lam * h + gamma * (x @ b_mat)
        ys.append((h @ c_mat).real + p["d"] * x)
    return sj.LRUState(h.real, h.imag), np.stack(ys, axis=1)


REFERENCES = {"min_gru": _min_gru_ref, "min_lstm": _min_lstm_ref, "lru": _lru_ref}


def _random_carry(cell, params, batch_shape, seed):
    rng = np.random.default_rng(seed)
    like = cell.initial_carry(params, batch_shape)
    return jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape), like)


@pytest.mark.parametrize("name", NAMES)
def test_unroll_equals_numpy_reference(name, params64):
    cell = CELLS[name]()
    p = params64[name]
    with x64_enabled():
        xs = np.random.default_rng(1).standard_normal((B, T, I))
        c0 = _random_carry(cell, p, (B,), seed=2)  # not zero: the decay A_t acts on it
        run = jax.jit(lambda p, xs, c0: sj.unroll(cell, p, xs, carry=c0, gradient=Autodiff()))
        final, ys = run(p, xs, c0)
        want_final, want_ys = REFERENCES[name](p, c0, xs)
        want_final = jax.tree_util.tree_map(jnp.asarray, want_final)
        chex.assert_trees_all_close(final, want_final, rtol=TOL, atol=TOL)
        chex.assert_trees_all_close(ys, want_ys, rtol=TOL, atol=TOL)
        assert ys.dtype == jnp.float64


@pytest.mark.parametrize("name", NAMES)
def test_linear_recurrence_is_the_step_and_its_jacobian(name, params64):
    """``A s + b`` equals the step at random carries (the same ``A, b`` for every carry), and
    ``A`` equals ``jax.jacfwd`` of the flattened step, and the ``jacobian`` and
    ``jacobian_diagonal`` capabilities."""
    cell = CELLS[name]()
    p = params64[name]
    with x64_enabled():
        like = cell.initial_carry(p, ())
        carries = _random_carry(cell, p, (3,), seed=3)  # 3 unbatched carries, stacked
        x = np.random.default_rng(4).standard_normal((I,))

        @jax.jit
        def parts(p, carries, x):
            def flat_step(s):
                return flatten_state(cell.step(p, unflatten_state(s, like), x)[0])

            s = jax.vmap(flatten_state)(carries)  # (3, S)
            A, b = cell.linear_recurrence(p, x)
            return {
                "A": A,
                "b": b,
                "s": s,
                "step": jax.vmap(flat_step)(s),
                "jacfwd": jax.vmap(jax.jacfwd(flat_step))(s),
                "jacobian": jax.vmap(lambda c: cell.jacobian(p, c, x))(carries),
                "diagonal": jax.vmap(lambda c: cell.jacobian_diagonal(p, c, x))(carries),
            }

        out = jax.tree_util.tree_map(np.asarray, parts(p, carries, x))
        S = out["s"].shape[1]
        A = out["A"]
        dense = A if A.ndim == 2 else np.diag(A)
        assert dense.shape == (S, S) and out["b"].shape == (S,)
        assert A.ndim == (2 if name == "lru" else 1)  # the LRU's real form is dense, minGRU/LSTM diagonal
        np.testing.assert_allclose(out["s"] @ dense.T + out["b"], out["step"], rtol=TOL, atol=TOL)
        for k in range(3):
            np.testing.assert_allclose(dense, out["jacfwd"][k], rtol=TOL, atol=TOL)
            np.testing.assert_allclose(out["jacobian"][k], dense, rtol=TOL, atol=TOL)
            np.testing.assert_allclose(out["diagonal"][k], np.diag(dense), rtol=TOL, atol=TOL)


def test_lru_jacobian_eigenvalues_are_lambda_and_its_conjugate(params64):
    cell = CELLS["lru"]()
    p = params64["lru"]
    with x64_enabled():
        carry = _random_carry(cell, p, (), seed=6)
        x = np.random.default_rng(7).standard_normal((I,))
        J = sj.spectrum.step_jacobian(cell, p, carry, x, method="autodiff")  # jacfwd, not the capability
        eig = np.asarray(sj.spectrum.eigvals(J))
        lam = _lru_lambda_ref(p)
        want = np.concatenate([lam, lam.conj()])
        # sort both by (real, imag); the 2H eigenvalues are distinct (random phases)
        key = np.lexsort((eig.imag, eig.real)), np.lexsort((want.imag, want.real))
        # eigenvalues of a 10x10 matrix with distinct eigenvalues: LAPACK's backward error
        # ~ 1e-15 times the condition number of each (1 here: the real form is normal)
        np.testing.assert_allclose(eig[key[0]], want[key[1]], rtol=0, atol=1e-12)


def test_lru_ring_initialisation():
    """``|lambda|`` in ``[r_min, r_max)``, phases in ``[0, max_phase)``, ``gamma =
    sqrt(1 - |lambda|^2)``, and ``|lambda|^2`` uniform on ``[r_min^2, r_max^2)`` (uniform on
    the ring's area): its sample mean within 5 standard errors of the closed form."""
    r_min, r_max, max_phase, N = 0.4, 0.8, math.pi / 10, 4096
    p = jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float64),
        sj.lru(N, r_min=r_min, r_max=r_max, max_phase=max_phase).init(jax.random.key(8), I),
    )
    lam = _lru_lambda_ref(p)
    r, phase = np.abs(lam), np.angle(lam)
    # float32 params: |lambda| = exp(-exp(nu_log)) carries a relative error ~1e-7
    assert r.min() >= r_min - 1e-6 and r.max() < r_max + 1e-6, (r.min(), r.max())
    assert phase.min() >= -1e-7 and phase.max() < max_phase + 1e-6
    np.testing.assert_allclose(np.exp(p["gamma_log"]), np.sqrt(1 - r**2), rtol=1e-5)
    lo, hi = r_min**2, r_max**2
    mean, se = (lo + hi) / 2, (hi - lo) / math.sqrt(12 * N)
    assert abs(np.mean(r**2) - mean) < 5 * se, (np.mean(r**2), mean, se)
    # B, C scaled as in the paper: Var(b_re) = 1 / (2I), Var(c_re) = 1 / N (loose: 4096 samples of c)
    assert abs(np.var(p["c_re"]) * N - 1) < 0.1 and abs(np.var(p["b_re"]) * 2 * I - 1) < 0.25


@pytest.mark.parametrize("name", NAMES)
def test_check_cell_passes(name):
    """Every capability against its fallback (the step's own checks and gradients are
    ``tests/test_contract.py``'s, where these cells are listed)."""
    cell = CELLS[name]()
    checks = ("input_size", "output", "gates", "jacobian", "jacobian_diagonal", "linear_recurrence")
    report = check_cell(cell, _p32(name), input_size=I, checks=checks)
    want = {c for c in checks if getattr(cell, c) is not None}
    assert set(report.passed) == want, str(report)
    assert report.max_errors["linear_recurrence"] < 1e-12


def test_check_cell_catches_a_wrong_linear_recurrence():
    lru = sj.lru(H)

    def transposed(params, x):  # A^T rotates the other way: a slip check_cell must catch
        A, b = lru.linear_recurrence(params, x)
        return A.T, b

    def wrong_shape(params, x):
        A, b = lru.linear_recurrence(params, x)
        return A[:-1], b

    gru = sj.min_gru(H)

    def missing_drive(params, x):
        A, b = gru.linear_recurrence(params, x)
        return A, 0.5 * b

    for cell, name, fn, match in (
        (lru, "lru", transposed, "A_t s \\+ b_t vs the flattened step"),
        (lru, "lru", wrong_shape, "A_t has shape"),
        (gru, "min_gru", missing_drive, "A_t s \\+ b_t vs the flattened step"),
    ):
        with pytest.raises(CellCheckError, match=match) as err:
            check_cell(
                cell._replace(linear_recurrence=fn), _p32(name), input_size=I, checks=("linear_recurrence",)
            )
        assert err.value.capability == "linear_recurrence"


def test_which_wrappers_keep_linear_recurrence():
    cell = sj.min_lstm(H)
    new_step = sj.mgu(H).step
    assert cell._replace(step=new_step).linear_recurrence is None  # written for the old step
    assert cell._replace(init=cell.init).linear_recurrence is cell.linear_recurrence
    assert sj.learnable_carry(cell).linear_recurrence is not None
    assert sj.cells.dropout(cell, input_rate=0.1, key=jax.random.key(0)).linear_recurrence is None
    assert sj.cells.stack([cell, sj.min_lstm(H)]).linear_recurrence is None
    # wrap keeps it with the same substitution of params and inputs: still exact
    scaled = sj.cells.wrap(sj.lru(H), inputs=lambda x: 2.0 * x)
    report = check_cell(scaled, _p32("lru"), input_size=I, checks=("linear_recurrence",))
    assert report.passed == ("linear_recurrence",)


def test_min_lstm_gates_stay_finite_where_both_underflow():
    """f + i underflows to 0 in float32 for pre-activations below about -104; the normalised
    gates are computed as sigmoid(log f - log i), equal to f / (f + i) (float64 reference)."""
    cell = sj.min_lstm(H)
    a_f, a_i = np.array([-200.0, -120.0, -90.0, 3.0]), np.array([-210.0, -120.0, -100.0, -3.0])
    b = jnp.asarray(np.concatenate([a_f, a_i, np.ones(H)]), jnp.float32)
    p = {"w_x": jnp.zeros((I, 3 * H)), "b": b}
    g = jax.jit(cell.gates)(p, jnp.zeros(H), jnp.zeros(I))
    want = _sigmoid(a_f) / (_sigmoid(a_f) + _sigmoid(a_i))  # float64: no underflow at -210
    np.testing.assert_allclose(np.asarray(g["f"]), want, rtol=1e-6)  # float32 rounding
    np.testing.assert_allclose(np.asarray(g["f"] + g["i"]), 1.0, rtol=1e-6)


def test_errors_and_hashing():
    with pytest.raises(ValueError, match="r_min=0.9, r_max=0.5"):
        sj.lru(4, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match="max_phase"):
        sj.lru(4, max_phase=0.0)
    cell, p = sj.lru(H), _p32("lru")
    with pytest.raises(ValueError, match="LRUState"):
        cell.step(p, jnp.zeros(H), jnp.zeros(I))
    with pytest.raises(ValueError, match="3 features"):
        cell.linear_recurrence(p, jnp.zeros(I + 1))
    for make in (lambda: sj.min_gru(4), lambda: sj.min_lstm(4), lambda: sj.lru(4, r_min=0.5)):
        assert make() == make() and hash(make()) == hash(make())
    assert sj.lru(4, r_min=0.5) != sj.lru(4, r_min=0.6)
