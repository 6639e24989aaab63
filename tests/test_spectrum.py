"""Tests of seqjax.spectrum against closed forms and independent NumPy references.

Oracles: Jacobians written from the cell equations in NumPy or by float64 central finite
differences; exponents of linear and diagonal systems (log|eig|, time averages); the volume
identity sum(lambda) = mean log|det J_t| (NumPy slogdet); explicit float64 products for
short windows (NumPy svd/eig/norm).
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj
from seqjax import initializers as inits
from seqjax.cells import Cell
from seqjax.spectrum import (
    eig,
    eigvals,
    flatten_state,
    gradient_flow_report,
    lag_log_norms,
    lyapunov_from_jacobians,
    lyapunov_spectrum,
    product_eigenvalues,
    product_singular_values,
    spectral_radii,
    state_size,
    step_jacobian,
    step_jacobians,
    step_spectra,
    top_eigenvalues,
    top_singular_values,
    unflatten_state,
)


def to64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def linear_cell(A, B):
    """User-defined cell (no meta): s_t = A s_{t-1} + B x_t in column convention."""
    A = jnp.asarray(A)
    B = jnp.asarray(B)
    S = A.shape[0]

    def init(key, input_size):
        return {"a": A, "b": B}

    def initial_carry(params, batch_shape=()):
        bs = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        return jnp.zeros(bs + (S,), params["a"].dtype)

    def step(params, s, x):
        s_new = s @ params["a"].T + x @ params["b"].T
        return s_new, s_new

    return Cell(init, initial_carry, step)


def diag_cell(S):
    """User-defined cell s_t = a_t * s_{t-1} + 1 where a_t = x_t (the input sets the multipliers)."""

    def init(key, input_size):
        return {"dummy": jnp.zeros((1,))}

    def initial_carry(params, batch_shape=()):
        bs = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        return jnp.ones(bs + (S,), params["dummy"].dtype)

    def step(params, s, x):
        s_new = x * s + 1.0
        return s_new, s_new

    return Cell(init, initial_carry, step)


def fd_jacobian(f, s, eps=1e-6):
    """Float64 central finite differences of f: (S,) -> (S,)."""
    s = np.asarray(s, np.float64)
    cols = []
    for j in range(s.size):
        e = np.zeros_like(s)
        e[j] = eps
        cols.append((np.asarray(f(s + e)) - np.asarray(f(s - e))) / (2 * eps))
    return np.stack(cols, axis=1)


# --------------------------------------------------------------------------- state vector


def test_flatten_roundtrip_matches_ravel_pytree():
    c = sj.LSTMState(jnp.arange(6.0).reshape(2, 3), 10 + jnp.arange(6.0).reshape(2, 3))
    s = flatten_state(c, batch_ndim=1)
    assert s.shape == (2, 6)
    ref0 = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(lambda a: a[0], c))[0]
    np.testing.assert_array_equal(s[0], ref0)
    back = unflatten_state(s, sj.LSTMState(jnp.zeros(3), jnp.zeros(3)))
    np.testing.assert_array_equal(back.c, c.c)
    assert state_size(sj.lstm(5), sj.lstm(5).init(jax.random.key(0), 2)) == 10
    with pytest.raises(ValueError, match="needs"):
        unflatten_state(jnp.zeros((2, 5)), sj.LSTMState(jnp.zeros(3), jnp.zeros(3)))


# --------------------------------------------------------------------------- step Jacobians


CELLS = {
    "rnn_tanh": lambda: sj.rnn(5),
    "rnn_relu_hb": lambda: sj.rnn(5, activation="relu", hidden_bias=True),
    "rnn_sigmoid": lambda: sj.rnn(5, activation="sigmoid"),
    "rnn_leaky": lambda: sj.rnn(5, activation="leaky_relu"),
    "rnn_identity": lambda: sj.rnn(5, activation="identity"),
    "irnn": lambda: sj.irnn(5),
    "lstm": lambda: sj.lstm(5, forget_bias=1.0),
    "lstm_hb": lambda: sj.lstm(5, hidden_bias=True),
    "gru": lambda: sj.gru(5),
    "mgu": lambda: sj.mgu(5),
    "janet": lambda: sj.janet(5),
    "janet_beta0": lambda: sj.janet(5, beta=0.0),
    "learnable_lstm": lambda: sj.learnable_carry(sj.lstm(4)),
}


@pytest.mark.parametrize("name", sorted(CELLS))
def test_analytic_equals_autodiff_and_finite_differences(name, x64):
    cell = CELLS[name]()
    params = to64(cell.init(jax.random.key(1), 3))
    like = cell.initial_carry(params, ())
    s = 0.5 * jax.random.normal(jax.random.key(2), (state_size(cell, params),), jnp.float64)
    x = jax.random.normal(jax.random.key(3), (3,), jnp.float64)
    carry = unflatten_state(s, like)
    an = step_jacobian(cell, params, carry, x, method="analytic")
    ad = step_jacobian(cell, params, carry, x, method="autodiff")
    # same maths two ways: agreement to float64 rounding
    np.testing.assert_allclose(an, ad, atol=1e-12, rtol=1e-10)
    # independent: central differences of the step itself
    f = lambda v: flatten_state(cell.step(params, unflatten_state(jnp.asarray(v), like), x)[0])
    # FD truncation ~ eps^2 |f^(3)| ~ 1e-12, rounding ~ 1e-16 / 1e-6 ~ 1e-10
    np.testing.assert_allclose(an, fd_jacobian(f, s), atol=1e-8)


@pytest.mark.slow
def test_analytic_jacobians_along_trajectory_under_jit():
    cell = sj.lstm(4)
    params = cell.init(jax.random.key(1), 3)
    xs = jax.random.normal(jax.random.key(2), (2, 6, 3))
    an = step_jacobians(cell, params, xs, method="analytic")
    ad = step_jacobians(cell, params, xs, method="autodiff")
    np.testing.assert_allclose(an.jacobians, ad.jacobians, atol=1e-6)  # float32 rounding
    jitted = jax.jit(lambda p, x: step_jacobians(cell, p, x).jacobians)(params, xs)
    np.testing.assert_allclose(jitted, an.jacobians, atol=1e-6)


def test_rnn_jacobian_from_equations_numpy(x64):
    """J_t = diag(1 - h_t^2) W_h^T (row-vector cell) along a NumPy-computed trajectory."""
    cell = sj.rnn(6)
    p = to64(cell.init(jax.random.key(0), 2))
    xs = np.asarray(jax.random.normal(jax.random.key(1), (7, 2), jnp.float64))
    W, Wx, b = (np.asarray(p[k]) for k in ("w_h", "w_x", "b"))
    h = np.zeros(6)
    ref = []
    for x in xs:
        h = np.tanh(x @ Wx + h @ W + b)
        ref.append(np.diag(1 - h**2) @ W.T)
    got = step_jacobians(cell, p, xs)
    np.testing.assert_allclose(got.jacobians, np.stack(ref), atol=1e-13)
    np.testing.assert_allclose(got.states[-1], h, atol=1e-13)


def test_lstm_jacobian_is_2h_and_has_cell_path(x64):
    """The LSTM state is (h, c): J is 2H x 2H and its c->c block is diag(f_t)."""
    H = 4
    cell = sj.lstm(H)
    p = to64(cell.init(jax.random.key(0), 3))
    xs = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
    out = step_jacobians(cell, p, xs)
    assert out.jacobians.shape == (5, 2 * H, 2 * H)
    aux = sj.trajectory(cell, p, xs, gates=True)
    for t in range(5):
        np.testing.assert_allclose(
            out.jacobians[t, H:, H:], np.diag(np.asarray(aux.gates["f"][t])), atol=1e-14
        )


def test_user_cell_generic_path_and_input_jacobians(x64):
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(4, 4)), rng.normal(size=(4, 2))
    cell = linear_cell(A, B)
    p = cell.init(None, 2)
    xs = jnp.asarray(rng.normal(size=(3, 5, 2)))
    out = step_jacobians(cell, p, xs, inputs=True)
    np.testing.assert_allclose(out.jacobians, np.broadcast_to(A, (3, 5, 4, 4)), atol=1e-14)
    np.testing.assert_allclose(out.input_jacobians, np.broadcast_to(B, (3, 5, 4, 2)), atol=1e-14)
    with pytest.raises(ValueError, match="no jacobian capability"):
        step_jacobians(cell, p, xs, method="analytic")
    J1 = step_jacobian(cell, p, jnp.zeros(4), xs[0, 0])
    np.testing.assert_allclose(J1, A, atol=1e-14)


def test_step_jacobians_batched_and_time_major():
    cell = sj.gru(3)
    p = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (2, 3, 4, 2))
    out = step_jacobians(cell, p, xs)
    assert out.jacobians.shape == (2, 3, 4, 3, 3)
    one = step_jacobians(cell, p, xs[1, 2])
    np.testing.assert_allclose(out.jacobians[1, 2], one.jacobians, atol=1e-6)
    tm = step_jacobians(cell, p, jnp.moveaxis(xs, -2, 0), time_axis=0)
    np.testing.assert_allclose(tm.jacobians, out.jacobians, atol=1e-6)
    with pytest.raises(ValueError, match="method"):
        step_jacobians(cell, p, xs, method="magic")


# --------------------------------------------------------------------------- eigen / singular spectra


def test_step_spectra_and_host_eig_match_numpy(x64):
    rng = np.random.default_rng(1)
    J = rng.normal(size=(3, 5, 5))
    w, sv = step_spectra(jnp.asarray(J))
    for t in range(3):
        ref = np.linalg.eigvals(J[t])
        np.testing.assert_allclose(np.sort(np.abs(w[t]))[::-1], np.sort(np.abs(ref))[::-1], rtol=1e-12)
        np.testing.assert_allclose(sv[t], np.linalg.svd(J[t], compute_uv=False), rtol=1e-12)
    np.testing.assert_allclose(spectral_radii(jnp.asarray(J)), np.abs(w[:, 0]), rtol=1e-12)
    # host fallback (what TPU uses) gives the same, under jit too
    wh = jax.jit(lambda a: eigvals(a, host=True))(jnp.asarray(J))
    np.testing.assert_allclose(
        np.sort_complex(np.asarray(wh)), np.sort_complex(np.asarray(eigvals(J))), atol=1e-12
    )
    for host in (False, True):
        lam, vr, vl = eig(jnp.asarray(J[0]), host=host)
        np.testing.assert_allclose(J[0] @ vr, vr * lam[None, :], atol=1e-10)
        np.testing.assert_allclose(vl.conj().T @ J[0], lam[:, None] * vl.conj().T, atol=1e-10)
        np.testing.assert_allclose(vl.conj().T @ vr, np.eye(5), atol=1e-10)


# --------------------------------------------------------------------------- products over time


def test_products_match_explicit_float64_products(x64):
    rng = np.random.default_rng(2)
    T, S = 6, 5
    J = rng.normal(size=(2, T, S, S)) * 0.8
    P = [np.eye(S) for _ in range(2)]
    for b in range(2):
        for t in range(T):
            P[b] = J[b, t] @ P[b]
    sv = product_singular_values(jnp.asarray(J), sweeps=40)
    for b in range(2):
        np.testing.assert_allclose(sv[b], np.log(np.linalg.svd(P[b], compute_uv=False)), atol=1e-8)
    lm, ang = product_eigenvalues(jnp.asarray(J))
    for b in range(2):
        ref = np.linalg.eigvals(P[b])
        np.testing.assert_allclose(lm[b], np.sort(np.log(np.abs(ref)))[::-1], atol=1e-9)
    # lag curve: ||J_T ... J_{T-L+1}||_2 for every lag
    ln = lag_log_norms(jnp.asarray(J))
    lnf = lag_log_norms(jnp.asarray(J), ord="fro")
    v = rng.normal(size=S)
    lv = lag_log_norms(jnp.asarray(J), cotangent=jnp.asarray(v))
    assert ln.shape == lnf.shape == lv.shape == (2, T + 1)  # lags 0..T, lag 0 first
    for b in range(2):
        G = np.eye(S)
        g = v.copy()
        for L in range(0, T + 1):
            if L:
                G = G @ J[b, T - L]
                g = g @ J[b, T - L]
            np.testing.assert_allclose(ln[b, L], np.log(np.linalg.norm(G, 2)), atol=1e-12)
            np.testing.assert_allclose(lnf[b, L], np.log(np.linalg.norm(G)), atol=1e-12)
            np.testing.assert_allclose(lv[b, L], np.log(np.linalg.norm(g)), atol=1e-12)


@pytest.mark.parametrize("gain", [3.0, pytest.param(0.5, marks=pytest.mark.slow)])
def test_10000_step_products_finite_in_float32(gain):
    """A chaotic (gain 3) and a contracting (gain 0.5) tanh network over 10,000 steps: the raw
    product would overflow/underflow float32 (e^{+-thousands}); the stable methods stay finite,
    agree with each other and respect the bound lambda_1 <= log ||W_h||_2 (|tanh'| <= 1)."""
    S, T = 32, 10_000
    cell = sj.rnn(S, recurrent_init=inits.scaled_gaussian(gain))
    p = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (T, 2))
    # top 4 (the full spectrum at gain 3 may honestly end in -inf: float32 tanh saturates to
    # exactly 1, so tanh' = 0 and J_t is exactly rank-deficient at some steps)
    spec = lyapunov_spectrum(cell, p, xs, k=4, rank_tol=0.0, warmup=100)
    assert spec.exponents.dtype == jnp.float32
    assert np.all(np.isfinite(spec.exponents)) and np.all(np.isfinite(spec.stderr))
    bound = np.log(np.linalg.norm(np.asarray(p["w_h"]), 2))
    assert spec.exponents[0] <= bound
    J = step_jacobians(cell, p, xs).jacobians
    ln = lag_log_norms(J)
    sv = product_singular_values(J, k=3, sweeps=1)
    assert np.all(np.isfinite(ln)) and np.all(np.isfinite(sv))
    assert abs(float(ln[-1])) > 80  # beyond float32 range (e^88): the raw product is not representable
    # the log norm of the whole product is its top log singular value
    np.testing.assert_allclose(sv[0], ln[-1], rtol=1e-3)
    # growth rate over the whole sequence ~ top exponent (finite-time; different start/window)
    assert abs(float(ln[-1]) / T - float(spec.exponents[0])) < 0.02
    assert np.sign(float(ln[-1])) == np.sign(float(spec.exponents[0])) == np.sign(gain - 1)


# --------------------------------------------------------------------------- Lyapunov spectra: oracles


def _matrix_with_eigs(eigs, rng):
    """Real matrix with the given eigenvalues (complex ones given once, as a pair's member)."""
    blocks = []
    for e in eigs:
        if np.iscomplexobj(e) and np.imag(e) != 0:
            a, b = np.real(e), np.imag(e)
            blocks.append(np.array([[a, -b], [b, a]]))
        else:
            blocks.append(np.array([[np.real(e)]]))
    n = sum(bl.shape[0] for bl in blocks)
    D = np.zeros((n, n))
    i = 0
    for bl in blocks:
        k = bl.shape[0]
        D[i : i + k, i : i + k] = bl
        i += k
    V = rng.normal(size=(n, n))
    return V @ D @ np.linalg.inv(V)


def test_linear_recurrence_exponents_are_log_abs_eigs(x64):
    rng = np.random.default_rng(3)
    A = _matrix_with_eigs([1.1, 0.9 + 0.3j, 0.5, 0.5, -0.3], rng)  # S = 6, repeated 0.5, complex pair
    ref = np.sort(np.log(np.abs(np.linalg.eigvals(A))))[::-1]
    cell = linear_cell(A, rng.normal(size=(6, 2)))
    p = cell.init(None, 2)
    xs = jnp.asarray(rng.normal(size=(3000, 2)))
    spec = lyapunov_spectrum(cell, p, xs, frame_warmup=200)
    # finite-time error ~ log(cond(V))/T ~ 1e-3 for T = 2800 measured steps
    np.testing.assert_allclose(spec.exponents, ref, atol=5e-3)
    assert np.all(spec.stderr < 5e-3)


def test_diagonal_time_varying_exponents_are_time_averages(x64):
    rng = np.random.default_rng(4)
    S, T = 4, 400
    a = rng.uniform(0.2, 1.5, size=(T, S)) * rng.choice([-1.0, 1.0], size=(T, S))
    a[:, 0] *= 2.0  # separate the means so a random frame converges too
    cell = diag_cell(S)
    p = cell.init(None, S)
    ref = np.sort(np.mean(np.log(np.abs(a)), axis=0))[::-1]
    exact = lyapunov_spectrum(cell, p, jnp.asarray(a), frame=jnp.eye(S), window=40)
    # identity frame: QR of a diagonal matrix is exact at every step
    np.testing.assert_allclose(exact.exponents, ref, rtol=1e-12, atol=1e-13)
    # finite-time exponents are the window averages, in the same (sorted) column order
    order = np.argsort(-np.mean(np.log(np.abs(a)), axis=0))
    win = np.log(np.abs(a)).reshape(10, 40, S).mean(axis=1)[:, order]
    np.testing.assert_allclose(exact.finite_time, win, atol=1e-12)
    np.testing.assert_allclose(exact.stderr, win.std(axis=0, ddof=1) / np.sqrt(10), atol=1e-12)
    # QR only every 5 steps: a product of diagonal matrices is still factored exactly
    r5 = lyapunov_spectrum(cell, p, jnp.asarray(a), frame=jnp.eye(S), window=40, reortho_every=5)
    np.testing.assert_allclose(r5.exponents, ref, rtol=1e-12, atol=1e-13)


def test_volume_identity_float64(x64):
    """sum_i lambda_i = mean_t log|det J_t| with J_t from a NumPy trajectory of the equations."""
    H, T = 8, 300
    cell = sj.rnn(H, recurrent_init=inits.scaled_gaussian(1.5))
    p = to64(cell.init(jax.random.key(0), 3))
    xs = np.asarray(jax.random.normal(jax.random.key(1), (T, 3), jnp.float64))
    W, Wx, b = (np.asarray(p[k]) for k in ("w_h", "w_x", "b"))
    h = np.zeros(H)
    logdets = []
    for x in xs:
        h = np.tanh(x @ Wx + h @ W + b)
        logdets.append(np.linalg.slogdet(np.diag(1 - h**2) @ W.T)[1])
    spec = lyapunov_spectrum(cell, p, xs, window=30)
    np.testing.assert_allclose(np.sum(spec.exponents), np.mean(logdets), rtol=1e-6)
    assert spec.exponents.dtype == jnp.float64


def test_tanh_rnn_at_origin_jacobian_is_w(x64):
    """Zero bias, zero input, h_0 = 0: h stays 0, J_t = W_h^T (the issue's J = W in column
    convention) exactly, exponents log|eig(W)|."""
    H = 6
    cell = sj.rnn(H, bias_init=inits.zeros, recurrent_init=inits.scaled_gaussian(1.2))
    p = to64(cell.init(jax.random.key(5), 2))
    W = np.asarray(p["w_h"])
    xs = jnp.zeros((2000, 2))
    J = step_jacobians(cell, p, xs[:5]).jacobians
    np.testing.assert_array_equal(J, np.broadcast_to(W.T, (5, H, H)))
    spec = lyapunov_spectrum(cell, p, xs, frame_warmup=200)
    ref = np.sort(np.log(np.abs(np.linalg.eigvals(W))))[::-1]
    np.testing.assert_allclose(spec.exponents, ref, atol=5e-3)  # O(1/T) frame transient


def test_orthogonal_w_zero_exponents_and_orthogonal_product(x64):
    H, T = 8, 1000
    cell = sj.rnn(H, bias_init=inits.zeros, recurrent_init=inits.orthogonal())
    p = to64(cell.init(jax.random.key(6), 2))
    W = np.linalg.qr(np.asarray(p["w_h"]))[0]  # orthogonal to float64 rounding
    p["w_h"] = jnp.asarray(W)
    np.testing.assert_allclose(W @ W.T, np.eye(H), atol=1e-12)
    xs = jnp.zeros((T, 2))
    spec = lyapunov_spectrum(cell, p, xs)
    np.testing.assert_allclose(spec.exponents, 0.0, atol=1e-12)
    J = step_jacobians(cell, p, xs).jacobians
    np.testing.assert_allclose(product_singular_values(J, sweeps=1), 0.0, atol=1e-11)
    np.testing.assert_allclose(lag_log_norms(J), 0.0, atol=1e-11)
    P = np.eye(H)
    for t in range(T):
        P = np.asarray(J[t]) @ P
    np.testing.assert_allclose(P.T @ P, np.eye(H), atol=1e-11)


def test_gru_zero_recurrent_weights_exponents_log_z(x64):
    H = 5
    cell = sj.gru(H, recurrent_init=inits.zeros)
    p = to64(cell.init(jax.random.key(7), 3))
    x = np.asarray(jax.random.normal(jax.random.key(8), (3,), jnp.float64))
    gx = x @ np.asarray(p["w_x"]) + np.asarray(p["b"])
    z = 1 / (1 + np.exp(-(gx[H : 2 * H] + np.asarray(p["b_h"])[H : 2 * H])))
    ref = np.sort(np.log(z))[::-1]
    xs = jnp.broadcast_to(jnp.asarray(x), (500, 3))
    # J_t = diag(z) exactly: with the identity frame every step is exact
    exact = lyapunov_spectrum(cell, p, xs, frame=jnp.eye(H))
    np.testing.assert_allclose(exact.exponents, ref, rtol=1e-12)
    rand = lyapunov_spectrum(cell, p, xs, frame_warmup=100)
    np.testing.assert_allclose(rand.exponents, ref, atol=5e-3)


def test_lstm_zero_recurrent_weights_log_f_and_minus_inf(x64):
    """J = [[0, diag(o tanh'(c) f)], [0, diag(f)]]: rank H. H exponents log f_i, H are -inf."""
    H = 4
    cell = sj.lstm(H, recurrent_init=inits.zeros)
    p = to64(cell.init(jax.random.key(9), 3))
    x = np.asarray(jax.random.normal(jax.random.key(10), (3,), jnp.float64))
    zf = x @ np.asarray(p["w_x"])[:, H : 2 * H] + np.asarray(p["b"])[H : 2 * H]
    ref = np.sort(np.log(1 / (1 + np.exp(-zf))))[::-1]
    xs = jnp.broadcast_to(jnp.asarray(x), (2000, 3))
    spec = lyapunov_spectrum(cell, p, xs, frame_warmup=200)
    e = np.asarray(spec.exponents)
    assert not np.any(np.isnan(e)) and not np.any(np.isnan(np.asarray(spec.stderr)))
    np.testing.assert_allclose(e[:H], ref, atol=5e-3)
    assert np.all(np.isneginf(e[H:]))
    # same with the identity frame (exact zeros, no threshold needed) and with r = 4
    spec_id = lyapunov_spectrum(cell, p, xs, frame=jnp.eye(2 * H), rank_tol=0.0, reortho_every=4, window=200)
    assert np.all(np.isneginf(np.asarray(spec_id.exponents)[H:]))
    assert not np.any(np.isnan(np.asarray(spec_id.finite_time)))


def test_relu_units_off_give_minus_inf_not_nan():
    """All ReLU units switched off (large negative bias): J_t = 0, every exponent -inf."""
    cell = sj.rnn(6, activation="relu", bias_init=inits.constant(-50.0))
    p = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (2, 60, 2))
    spec = lyapunov_spectrum(cell, p, xs, reortho_every=3, window=15)
    assert np.all(np.isneginf(spec.exponents))
    assert np.all(spec.stderr == 0)
    assert not np.any(np.isnan(spec.finite_time))
    J = step_jacobians(cell, p, xs).jacobians
    curve = lag_log_norms(J)
    assert np.all(curve[..., 0] == 0) and np.all(np.isneginf(curve[..., 1:]))  # lag 0: log ||I||
    assert np.all(np.isneginf(product_singular_values(J, k=2)))


def test_lyapunov_from_jacobians_matches_cell_path_and_jit():
    cell = sj.lstm(4)
    p = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (3, 200, 2))
    a = lyapunov_spectrum(cell, p, xs, frame_warmup=20, window=45)
    J = step_jacobians(cell, p, xs).jacobians
    b = lyapunov_from_jacobians(J, frame_warmup=20, window=45)
    # float32: J is evaluated in two vmapped contexts (rounding only)
    np.testing.assert_allclose(a.exponents, b.exponents, rtol=1e-4, atol=1e-5)
    assert a.exponents.shape == (3, 8) and a.finite_time.shape == (3, 4, 8)
    jit = jax.jit(lambda p, x: lyapunov_spectrum(cell, p, x, frame_warmup=20, window=45).exponents)(p, xs)
    np.testing.assert_allclose(jit, a.exponents, rtol=1e-4, atol=1e-5)
    text = str(a)  # a batch is summarised (mean and spread), not printed sequence by sequence
    assert "Lyapunov spectrum" in text and "mean over 3 sequences" in text and "seq 2" not in text
    mean = np.asarray(a.exponents).mean(0)
    assert f"{mean[0]:+.4f}" in text


def test_matrix_free_equals_dense_moderate_size():
    H = 48
    cell = sj.rnn(H, recurrent_init=inits.scaled_gaussian(1.5))
    p = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (300, 3))
    d = lyapunov_spectrum(cell, p, xs, k=5, warmup=50)
    m = lyapunov_spectrum(cell, p, xs, k=5, warmup=50, matrix_free=True)
    # same frame, same algorithm; only the J·Q product differs in summation order
    np.testing.assert_allclose(m.exponents, d.exponents, atol=1e-4)


@pytest.mark.slow
def test_matrix_free_at_h4096():
    H = 4096
    cell = sj.rnn(H, recurrent_init=inits.scaled_gaussian(2.0), kernel_init=inits.scaled_gaussian(1.0))
    p = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (12, 2))
    spec = lyapunov_spectrum(cell, p, xs, k=3, matrix_free=True, warmup=2, window=5)
    assert spec.exponents.shape == (3,)
    assert np.all(np.isfinite(spec.exponents))
    # ||J_t|| <= ||W_h||_2 bounds every finite-time exponent; ||W||_2 <= 2 * 2 (circular law edge)
    assert np.all(np.asarray(spec.finite_time) <= np.log(4.5))
    sv = top_singular_values(cell, p, cell.initial_carry(p), xs[0], k=2, iters=10)
    assert np.all(np.isfinite(sv))


def test_lyapunov_argument_errors():
    cell = sj.rnn(3)
    p = cell.init(jax.random.key(0), 1)
    xs = jnp.zeros((10, 1))
    with pytest.raises(ValueError, match="k must"):
        lyapunov_spectrum(cell, p, xs, k=4)
    with pytest.raises(ValueError, match="warmup"):
        lyapunov_spectrum(cell, p, xs, warmup=8, frame_warmup=3)
    with pytest.raises(ValueError, match="window"):
        lyapunov_spectrum(cell, p, xs, reortho_every=2, window=3)
    with pytest.raises(ValueError, match="frame"):
        lyapunov_spectrum(cell, p, xs, frame=jnp.eye(2))


# --------------------------------------------------------------------------- matrix-free spectra of one J


def test_top_singular_and_eigenvalues_matrix_free(x64):
    H = 30
    cell = sj.rnn(H, recurrent_init=inits.scaled_gaussian(1.3))
    p = to64(cell.init(jax.random.key(0), 2))
    c = 0.3 * jax.random.normal(jax.random.key(1), (H,), jnp.float64)
    x = jnp.asarray([0.2, -0.1], jnp.float64)
    J = np.asarray(step_jacobian(cell, p, c, x))
    # jitted: one compile each (eagerly, every op of the iteration compiles on its own)
    sv = jax.jit(lambda p, c, x: top_singular_values(cell, p, c, x, k=3, iters=300))(p, c, x)
    np.testing.assert_allclose(sv, np.linalg.svd(J, compute_uv=False)[:3], rtol=1e-6)
    # full Krylov space: exact
    ev = jax.jit(lambda p, c, x: top_eigenvalues(cell, p, c, x, k=3, krylov_dim=H))(p, c, x)
    ref = np.linalg.eigvals(J)
    ref = ref[np.argsort(-np.abs(ref))]
    np.testing.assert_allclose(np.abs(ev), np.abs(ref[:3]), rtol=1e-8)


@pytest.mark.slow
def test_top_eigenvalues_separated_spectrum_small_krylov(x64):
    rng = np.random.default_rng(0)
    A = _matrix_with_eigs([3.0, -2.5, 2.0] + list(rng.uniform(-0.5, 0.5, size=57)), rng)
    cell = linear_cell(A, np.zeros((60, 1)))
    p = cell.init(None, 1)
    ev = top_eigenvalues(cell, p, jnp.zeros(60), jnp.zeros(1), k=3, krylov_dim=30)
    np.testing.assert_allclose(np.sort(np.real(ev)), [-2.5, 2.0, 3.0], rtol=1e-6)


# --------------------------------------------------------------------------- gradient-flow report


def test_gradient_flow_report_against_numpy(x64):
    H, T = 10, 120
    cell = sj.rnn(H, recurrent_init=inits.scaled_gaussian(0.4))
    p = to64(cell.init(jax.random.key(0), 2))
    xs = np.asarray(0.3 * jax.random.normal(jax.random.key(1), (T, 2), jnp.float64))
    rep = gradient_flow_report(cell, p, xs, tol=1e-4)
    W, Wx, b = (np.asarray(p[k]) for k in ("w_h", "w_x", "b"))
    np.testing.assert_allclose(rep.sigma_max, np.linalg.svd(W, compute_uv=False)[0], rtol=1e-12)
    assert rep.gamma == 1.0 and rep.critical == 1.0
    # independent trajectory and lag curve
    h = np.zeros(H)
    Js = []
    for x in xs:
        h = np.tanh(x @ Wx + h @ W + b)
        Js.append(np.diag(1 - h**2) @ W.T)
    G = np.eye(H)
    curve = [0.0]  # lag 0: log ||I||
    for L in range(1, T + 1):
        G = G @ Js[T - L]
        curve.append(np.log(np.linalg.norm(G, 2)))
    np.testing.assert_allclose(rep.lag_log_norms, curve, atol=1e-10)
    np.testing.assert_allclose(rep.step_norm_max, max(np.linalg.norm(J, 2) for J in Js), rtol=1e-12)
    # Pascanu et al.: ||J_t|| <= sigma_max * gamma, and the product decays at least as fast
    assert rep.step_norm_max <= rep.step_bound + 1e-12
    assert all(c <= L * rep.bound_rate + 1e-9 for L, c in enumerate(curve))
    below = [L for L, c in enumerate(curve) if c < np.log(1e-4)]
    assert rep.memory_horizon == below[0]
    # the estimator: the largest Lyapunov exponent, pooled over windows after the frame warm-up
    # (min(10, T // 10) = 10 steps), by an independent QR iteration over the NumPy Jacobians
    fw, w = 10, (T - 10) // 10
    q = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(0), (H, 1), jnp.float32), np.float64))[0]
    logs = []
    for t, J in enumerate(Js):
        q, r = np.linalg.qr(J @ q)
        if t >= fw:
            logs.append(np.log(abs(r[0, 0])))
    wins = np.asarray(logs[: 10 * w]).reshape(10, w).mean(1)
    np.testing.assert_allclose(rep.lyapunov_max, wins.mean(), rtol=1e-9)
    np.testing.assert_allclose(rep.lyapunov_stderr, wins.std(ddof=1) / np.sqrt(10), rtol=1e-9)
    assert rep.regime == "vanishing" and rep.interval[1] < 0
    assert np.isfinite(rep.horizon_estimate) and rep.horizon_estimate > 0
    s = str(rep)
    assert "sigma_max < 1/gamma" in s and "memory horizon" in s


@pytest.mark.slow
def test_gradient_flow_report_sigmoid_gamma_and_generic_cell():
    cell = sj.rnn(4, activation="sigmoid")
    p = cell.init(jax.random.key(0), 1)
    rep = gradient_flow_report(cell, p, jnp.zeros((20, 1)))
    assert rep.gamma == 0.25 and rep.critical == 4.0
    lin = linear_cell(0.5 * np.eye(3), np.ones((3, 1)))
    rep2 = gradient_flow_report(lin, lin.init(None, 1), jnp.zeros((15, 1), jnp.float32))
    assert rep2.sigma_max is None and rep2.step_bound is None
    assert rep2.lyapunov_max == pytest.approx(np.log(0.5), rel=1e-5)
    # 15 steps are fewer than min_steps=50: the verdict says it cannot tell, however tight the bar
    assert rep2.regime == "undetermined" and "too short" in str(rep2) and "sigma_max(W_h)" not in str(rep2)
