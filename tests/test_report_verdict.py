"""The verdict of ``gradient_flow_report``: decisive where theory knows the answer, undetermined
where the data cannot tell, consistent with what it prints, and its one estimator (the largest
Lyapunov exponent by the QR method, pooled over windows) equal to an independent NumPy one.

References used here, none of them the library:

* a linear cell ``h_t = x_t W_x + h_{t-1} W_h + b`` has ``J_t = W_h^T`` at every step, so
  ``lambda_1 = log rho(W_h)`` (closed form), and the pooled QR estimate over complete windows
  telescopes to ``(log ||J^T q_0|| - log ||J^fw q_0||) / (T - fw)``, computed here in NumPy;
* a rotation has ``lambda_1 = 0`` exactly;
* a tanh RNN's Jacobians ``diag(1 - h_t^2) W_h^T`` written by hand in NumPy float64;
* ``scipy.stats.t.ppf`` for the Student quantile;
* NumPy SVD / eigvals of ``w_h``'s column blocks sliced by hand in PyTorch's gate order.
"""

from __future__ import annotations

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from helpers import x64_enabled

import seqjax
from seqjax.spectrum import LyapunovSpectrum, gradient_flow_report, lyapunov_from_jacobians
from seqjax.spectrum.report import VERDICTS, _t_quantile

H = 3  # state size of the linear cells
B = 2  # sequences
I = 2  # input size


# --------------------------------------------------------------------------- references


def _q0(S):
    """The library's default initial frame direction (``_random_frame``: a float32 normal draw
    from ``jax.random.key(0)``, then QR), normalised in NumPy float64 (the sign is immaterial)."""
    v = np.asarray(jax.random.normal(jax.random.key(0), (S, 1), jnp.float32), np.float64)[:, 0]
    return v / np.linalg.norm(v)


def _telescoped_rate(W, T, fw):
    """Pooled QR estimate for constant ``J = W^T`` over complete windows (all windows of all
    sequences are the same): ``(log||J^T q0|| - log||J^fw q0||) / (T - fw)``, float64, with the
    scale kept apart (no underflow at long T)."""
    J = np.asarray(W, np.float64).T
    v, acc = _q0(J.shape[0]), 0.0
    at_fw = None
    for t in range(1, T + 1):
        v = J @ v
        n = np.linalg.norm(v)
        acc += math.log(n)
        v /= n
        if t == fw:
            at_fw = acc
    return (acc - at_fw) / (T - fw)


def _expected_regime(rep):
    """The verdict rule written out again, from the report's own interval and counts."""
    lo, hi = (float(v) for v in np.asarray(rep.interval))
    m = rep.margin
    if int(rep.windows) < 4 or int(np.min(np.asarray(rep.measured_steps))) < rep.min_steps:
        return "undetermined"
    if hi < -m:
        return "vanishing"
    if lo > m:
        return "exploding"
    if lo >= -m and hi <= m:
        return "neutral"
    return "undetermined"


def _orthogonal(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((H, H)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q  # a rotation (det +1)


def _normal(eigs, seed=0):
    """Symmetric (normal) matrix with the given eigenvalues."""
    Q = _orthogonal(seed)
    return Q @ np.diag(eigs) @ Q.T


# Non-normal, diagonalisable: P diag(0.5, 0.3, -0.2) P^-1 with P far from orthogonal
# (sigma_max = 2.47 while rho = 0.5).
_P = np.array([[1.0, 3.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 1.0]])
_SIMILAR = _P @ np.diag([0.5, 0.3, -0.2]) @ np.linalg.inv(_P)
# Non-normal, defective: upper triangular with 0.5 on the diagonal (||W^n|| ~ n^2 0.5^n).
_JORDAN = np.array([[0.5, 1.0, 1.0], [0.0, 0.5, 1.0], [0.0, 0.0, 0.5]])
_STRADDLE_RATE = 1e-3  # the default margin (margin is static: another value would recompile)

# name -> (W_h, T, rho, report kwargs)
_LINEAR = {
    "vanish": (_normal([0.5, 0.3, 0.1]), 100, 0.5, {}),
    "explode": (_normal([1.2, 0.7, 0.3]), 100, 1.2, {}),
    "similar": (_SIMILAR, 100, 0.5, {}),
    "jordan": (_JORDAN, 100, 0.5, {}),
    "jordan_long": (_JORDAN, 1000, 0.5, {}),
    "rotation": (_orthogonal(1), 100, 1.0, {}),
    "vanish_short": (_normal([0.5, 0.3, 0.1]), 25, 0.5, {}),
    "explode_short": (_normal([1.2, 0.7, 0.3]), 25, 1.2, {}),
    "rotation_short": (_orthogonal(1), 25, 1.0, {}),
    # long enough (90 measured steps) but one window per sequence: 2 windows in all
    "few_windows": (_normal([0.5, 0.3, 0.1]), 100, 0.5, {"window": 90}),
    # rate exactly the margin, log rho = 1e-3: the transient of the second direction (ratio
    # 0.6) spreads the windows around 1e-3, so the interval cannot clear the boundary.
    "straddle": (
        _normal([math.exp(_STRADDLE_RATE), 0.6 * math.exp(_STRADDLE_RATE), 0.1]),
        100,
        math.exp(_STRADDLE_RATE),
        {},
    ),
}
_OTHER = ["antisymmetric_short", "tanh", "lstm", "gru", "user"]
ALL = [n for n in _LINEAR if n != "jordan_long"] + _OTHER  # jordan_long: slow test only


def _xs(T, seed, batch=B):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, T, I)), jnp.float32)


def _linear(W):
    cell = seqjax.rnn(H, activation="identity")
    params = cell.init(jax.random.key(0), input_size=I)
    params["w_h"] = jnp.asarray(W, jnp.float32)
    return cell, params


def _user_cell(Hu=3):
    """A cell with no capabilities at all: three plain functions."""

    def init(key, input_size):
        k1, k2 = jax.random.split(key)
        return {
            "w_x": jax.random.normal(k1, (input_size, Hu)) / math.sqrt(input_size),
            "w_h": 0.8 * jax.random.normal(k2, (Hu, Hu)) / math.sqrt(Hu),
        }

    def initial_carry(params, batch_shape=()):
        batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        return jnp.zeros(batch_shape + (Hu,), params["w_h"].dtype)

    def step(params, h, x):
        h = jnp.tanh(x @ params["w_x"] + h @ params["w_h"])
        return h, h

    return seqjax.Cell(init, initial_carry, step)


@functools.cache
def _case(name):
    """(cell, params, xs, report) for a named case; built once per module run."""
    if name in _LINEAR:
        W, T, _, kw = _LINEAR[name]
        cell, params = _linear(W)
        xs = _xs(T, 1)
    elif name == "antisymmetric_short":  # same cell and shapes as "tanh": one compile
        A = np.random.default_rng(2).standard_normal((4, 4)) / math.sqrt(4)
        cell = seqjax.rnn(4)
        params = cell.init(jax.random.key(0), input_size=I)
        params["w_h"] = jnp.asarray(1.0 * (A - A.T), jnp.float32)
        xs, kw = _xs(25, 3), {}
    elif name == "tanh":
        cell = seqjax.rnn(4)
        params = cell.init(jax.random.key(1), input_size=I)
        xs, kw = _xs(25, 4), {}
    elif name in ("lstm", "gru"):
        cell = getattr(seqjax, name)(3)
        params = cell.init(jax.random.key(0), input_size=I)
        xs, kw = _xs(20, 5), {}
    elif name == "user":
        cell = _user_cell()
        params = cell.init(jax.random.key(0), input_size=I)
        xs, kw = _xs(20, 6), {}
    else:
        raise KeyError(name)
    return cell, params, xs, gradient_flow_report(cell, params, xs, **kw)


@pytest.fixture(scope="module")
def case():
    return _case


# --------------------------------------------------------------------------- 1. decisive


@pytest.mark.parametrize(
    "name, regime",
    [("vanish", "vanishing"), ("explode", "exploding"), ("similar", "vanishing"), ("jordan", "vanishing")],
)
def test_linear_decisive_at_log_rho(case, name, regime):
    W, T, rho, _ = _LINEAR[name]
    rep = case(name)[3]
    assert rep.regime == regime
    assert rep.steps == T and rep.window == 9 and int(rep.windows) == 20
    np.testing.assert_array_equal(np.asarray(rep.measured_steps), [90, 90])
    # the finite-T value of the estimator, exactly (telescoping), and its limit log rho
    np.testing.assert_allclose(float(rep.lyapunov_max), _telescoped_rate(W, T, 10), atol=2e-5)
    tol = 0.06 if name == "jordan" else 1e-3  # defective: converges like 2 log(T / fw) / (T - fw)
    assert abs(float(rep.lyapunov_max) - math.log(rho)) < tol
    assert str(rep).splitlines()[2] == f"  verdict: {regime}"


def test_linear_normal_interval_contains_log_rho(case):
    for name in ("vanish", "explode"):
        rep = case(name)[3]
        lo, hi = np.asarray(rep.interval, np.float64)
        assert lo <= math.log(_LINEAR[name][2]) <= hi, (name, lo, hi)


def test_linear_normal_lag_curve_closed_form(case):
    """Symmetric W: ||W^L||_2 = rho^L, so the lag curve is L log rho and the memory horizon
    the first L with L log 0.5 < log 1e-3 (L = 10); the estimate log(1e-3)/log(0.5)."""
    rep = case("vanish")[3]
    L = np.arange(101)
    np.testing.assert_allclose(np.asarray(rep.lag_log_norms), L * math.log(0.5), atol=2e-4)
    assert rep.memory_horizon == 10
    assert rep.horizon_estimate == pytest.approx(math.log(1e-3) / math.log(0.5), rel=1e-3)
    up = case("explode")[3]
    np.testing.assert_allclose(np.asarray(up.lag_log_norms), L * math.log(1.2), rtol=1e-5, atol=1e-5)
    assert up.memory_horizon is None and up.horizon_estimate == math.inf


def test_non_normal_sigma_max_above_one_still_vanishing(case):
    """sigma_max(W_h) > 1 (the Pascanu bound allows growth) but rho = 0.5: vanishing."""
    for name in ("similar", "jordan"):
        rep = case(name)[3]
        W = _LINEAR[name][0]
        assert np.linalg.norm(W, 2) > 1.0
        np.testing.assert_allclose(float(rep.sigma_max), np.linalg.norm(W, 2), rtol=1e-5)
        assert "exploding gradients possible" in str(rep)
        assert rep.regime == "vanishing"


@pytest.mark.slow  # its own compile (T = 1000)
def test_defective_converges_to_log_rho(case):
    """Upper triangular with 0.5 on the diagonal: the finite-T rate tends to log 0.5 (like
    log(T)/T); at T = 1000 the report is much closer than at T = 100. In float32 the frame of a
    defective product stops aligning once the per-step change of direction (O(1/n^2)) reaches
    rounding level, so at T = 1000 the estimate sits 1.5e-3 above the exact finite-T rate
    (float64 agrees with it to 1e-12); hence the looser tolerance there."""
    short, long = case("jordan")[3], case("jordan_long")[3]
    np.testing.assert_allclose(float(long.lyapunov_max), _telescoped_rate(_JORDAN, 1000, 10), atol=3e-3)
    d_short = float(short.lyapunov_max) - math.log(0.5)
    d_long = float(long.lyapunov_max) - math.log(0.5)
    assert 0 < d_long < d_short / 4
    assert long.regime == "vanishing"


def test_rotation_neutral(case):
    rep = case("rotation")[3]
    assert rep.regime == "neutral"
    assert abs(float(rep.lyapunov_max)) < 1e-6  # exactly 0 in theory; float32 rounding
    lo, hi = np.asarray(rep.interval)
    assert -rep.margin <= lo <= hi <= rep.margin
    assert rep.horizon_estimate == math.inf and rep.memory_horizon is None
    np.testing.assert_allclose(np.asarray(rep.lag_log_norms), 0.0, atol=1e-5)


# --------------------------------------------------------------------------- 2. undetermined


@pytest.mark.parametrize("name", ["vanish_short", "explode_short", "rotation_short"])
def test_short_linear_undetermined(case, name):
    rep = case(name)[3]
    assert rep.steps == 25
    assert int(np.min(np.asarray(rep.measured_steps))) < rep.min_steps == 50
    assert int(rep.windows) >= 4  # enough windows: it is the length that is lacking
    assert rep.regime == "undetermined"
    assert "too short" in str(rep)
    assert math.isnan(rep.horizon_estimate)


def test_fewer_than_four_windows_undetermined(case):
    rep = case("few_windows")[3]
    assert rep.window == 90 and int(rep.windows) == 2
    np.testing.assert_array_equal(np.asarray(rep.measured_steps), [90, 90])  # >= min_steps
    assert float(rep.interval[1]) < -rep.margin  # the interval alone would say "vanishing"
    assert rep.regime == "undetermined"
    assert "only 2 windows" in str(rep) and "too short" in str(rep)


def test_antisymmetric_tanh_short_undetermined(case):
    """The old report called this cell "exploding" from a 25-step estimate."""
    rep = case("antisymmetric_short")[3]
    assert rep.regime == "undetermined" and rep.regime != "exploding"
    assert "too short" in str(rep)
    assert math.isnan(rep.horizon_estimate)


def test_interval_straddles_margin(case):
    rep = case("straddle")[3]
    assert rep.margin == _STRADDLE_RATE
    assert int(np.min(np.asarray(rep.measured_steps))) >= rep.min_steps  # long enough
    lo, hi = (float(v) for v in np.asarray(rep.interval))
    assert lo < rep.margin < hi  # the interval covers +margin
    assert abs(float(rep.lyapunov_max) - _STRADDLE_RATE) < 1e-3
    assert rep.regime == "undetermined"
    assert "straddles" in str(rep) and "too short" not in str(rep)


# --------------------------------------------------------------------------- 3. consistency


@pytest.mark.parametrize("name", ALL)
def test_report_self_consistent(case, name):
    rep = case(name)[3]
    assert rep.regime == VERDICTS[int(rep.verdict_code)]
    assert rep.regime == _expected_regime(rep)
    lo, hi = (float(v) for v in np.asarray(rep.interval))
    est, se = float(rep.lyapunov_max), float(rep.lyapunov_stderr)
    assert lo <= est <= hi
    q = float(_t_quantile(0.5 + rep.confidence / 2, int(rep.windows) - 1))
    np.testing.assert_allclose([lo, hi], [est - q * se, est + q * se], rtol=1e-5, atol=1e-7)
    m = rep.margin
    if rep.regime == "vanishing":
        assert hi < -m
        assert rep.horizon_estimate == pytest.approx(math.log(rep.tol) / est, rel=1e-12)
    elif rep.regime == "exploding":
        assert lo > m and rep.horizon_estimate == math.inf
    elif rep.regime == "neutral":
        assert -m <= lo and hi <= m and rep.horizon_estimate == math.inf
    else:
        assert math.isnan(rep.horizon_estimate)
    # the lag curve and the observed memory horizon, by hand from the field
    curve = np.asarray(rep.lag_log_norms)
    assert curve.shape == (rep.steps + 1,)
    assert curve[0] == 0.0
    below = np.nonzero(curve < math.log(rep.tol))[0]
    expected = int(below[0]) if below.size else None
    assert rep.memory_horizon == expected
    assert int(rep.memory_horizon_index) == (-1 if expected is None else expected)
    # the text says what the fields say
    s = str(rep)
    assert f"verdict: {rep.regime}" in s
    assert f"[{lo:+.4g}, {hi:+.4g}]" in s
    assert f"{est:+.4g}" in s
    assert f"{int(rep.windows)} windows of {rep.window} steps" in s
    h = "n/a" if expected is None else f"{expected:.0f}"
    assert f"observed at lag {h}," in s


# --------------------------------------------------------------------------- 4. independent estimator


def test_estimator_against_numpy_qr_float64():
    """A tanh RNN's Jacobians by hand, the QR iteration with k = 1 from the same initial vector,
    frame warm-up min(10, T // 10), windows of (T - fw) // 10 steps pooled over both sequences."""
    Hn, T = 4, 100
    rng = np.random.default_rng(7)
    Wx = rng.standard_normal((I, Hn)) / math.sqrt(I)
    Wh = 1.1 * rng.standard_normal((Hn, Hn)) / math.sqrt(Hn)
    b = 0.1 * rng.standard_normal(Hn)
    xs = rng.standard_normal((B, T, I))
    with x64_enabled():
        cell = seqjax.rnn(Hn)
        params = {"w_x": jnp.asarray(Wx), "w_h": jnp.asarray(Wh), "b": jnp.asarray(b)}
        rep = gradient_flow_report(cell, params, jnp.asarray(xs))
        assert rep.lyapunov_max.dtype == jnp.float64
    fw = min(10, T // 10)
    w = (T - fw) // 10
    assert rep.window == w
    q0 = _q0(Hn)
    windows, curves = [], []
    for seq in xs:
        h = np.zeros(Hn)
        Js = []
        for x in seq:
            h = np.tanh(x @ Wx + h @ Wh + b)
            Js.append(np.diag(1 - h**2) @ Wh.T)
        q, logs = q0.copy(), []
        for t, J in enumerate(Js):
            v = J @ q
            r = np.linalg.norm(v)  # |R_11| of the QR of one column
            q = v / r
            if t >= fw:
                logs.append(math.log(r))
        windows.append(np.asarray(logs[: 10 * w]).reshape(10, w).sum(1) / w)
        G, curve = np.eye(Hn), [0.0]
        for L in range(1, T + 1):
            G = G @ Js[T - L]
            curve.append(math.log(np.linalg.norm(G, 2)))
        curves.append(curve)
    pooled = np.concatenate(windows)
    n = pooled.size
    est, se = pooled.mean(), pooled.std(ddof=1) / math.sqrt(n)
    assert int(rep.windows) == n == 20
    np.testing.assert_array_equal(np.asarray(rep.measured_steps), [10 * w, 10 * w])
    np.testing.assert_allclose(float(rep.lyapunov_max), est, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(float(rep.lyapunov_stderr), se, rtol=1e-9, atol=1e-9)
    q = scipy.stats.t.ppf(0.975, n - 1)
    np.testing.assert_allclose(np.asarray(rep.interval), [est - q * se, est + q * se], atol=1e-3 * se)
    np.testing.assert_allclose(np.asarray(rep.lag_log_norms), np.mean(curves, axis=0), atol=1e-9)
    assert rep.regime == _expected_regime(rep)


def test_t_quantile_against_scipy():
    dof = np.arange(3, 201)
    with x64_enabled():
        got = np.asarray(_t_quantile(0.975, jnp.asarray(dof)))
        assert got.dtype == np.float64
    err = np.abs(got - scipy.stats.t.ppf(0.975, dof))
    assert err[0] < 0.01  # dof = 3
    assert np.all(np.diff(err) <= 0)  # shrinking with dof
    assert np.all(err <= dof**-5.0)  # the documented order dof^-5
    # float32 (the default): as accurate as float32 allows
    got32 = np.asarray(_t_quantile(0.975, jnp.asarray(dof)))
    np.testing.assert_allclose(got32, scipy.stats.t.ppf(0.975, dof), atol=0.01)


# --------------------------------------------------------------------------- 5. per-gate spectra


@pytest.mark.parametrize("name, gates", [("lstm", ("i", "f", "g", "o")), ("gru", ("r", "z", "n"))])
def test_gate_spectra_by_hand(case, name, gates):
    _, params, _, rep = case(name)
    Wh = np.asarray(params["w_h"], np.float64)
    Hc = Wh.shape[1] // len(gates)
    assert Hc == 3 and rep.gate_names == gates
    sig, rho = {}, {}
    for k, g in enumerate(gates):
        block = Wh[:, k * Hc : (k + 1) * Hc]  # PyTorch's gate order, sliced by hand
        sig[g] = np.linalg.svd(block, compute_uv=False)[0]
        rho[g] = np.max(np.abs(np.linalg.eigvals(block)))
    assert set(rep.gate_sigma_max) == set(gates) == set(rep.gate_spectral_radius)
    chex.assert_trees_all_close(
        {g: np.float64(rep.gate_sigma_max[g]) for g in gates}, sig, rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(
        {g: np.float64(rep.gate_spectral_radius[g]) for g in gates}, rho, rtol=1e-5, atol=1e-6
    )
    assert rep.sigma_max is None and rep.gamma is None  # a gated cell has no Pascanu bound
    line = [ln for ln in str(rep).splitlines() if "recurrent blocks" in ln]
    assert len(line) == 1
    listed = re.findall(r"(\w+): [0-9.e+-]+/[0-9.e+-]+", line[0].split(":", 1)[1])
    assert tuple(listed) == gates
    want = ", ".join(f"{g}: {sig[g]:.3g}/{rho[g]:.3g}" for g in gates)
    assert line[0] == "  recurrent blocks, sigma_max/spectral radius: " + want
    assert "sigma_max(W_h)" not in str(rep)


def test_elman_bound_and_block(case):
    _, params, _, rep = case("tanh")
    Wh = np.asarray(params["w_h"], np.float64)
    s = np.linalg.svd(Wh, compute_uv=False)[0]
    np.testing.assert_allclose(float(rep.sigma_max), s, rtol=1e-5)
    assert float(rep.gamma) == 1.0 and rep.critical == 1.0
    assert rep.gate_names == ("net",)
    np.testing.assert_allclose(float(rep.gate_sigma_max["net"]), s, rtol=1e-5)
    np.testing.assert_allclose(
        float(rep.gate_spectral_radius["net"]), np.max(np.abs(np.linalg.eigvals(Wh))), rtol=1e-5
    )
    assert float(rep.step_norm_max) <= rep.step_bound * (1 + 1e-5)
    assert "sigma_max(W_h) = " in str(rep) and "recurrent blocks, sigma_max/spectral radius: net: " in str(
        rep
    )


def test_user_cell_without_capabilities(case):
    cell, _, _, rep = case("user")
    assert cell.jacobian_bound is None and cell.recurrent_blocks is None
    assert rep.cell == "Cell"
    assert rep.sigma_max is None and rep.gamma is None
    assert rep.gate_sigma_max is None and rep.gate_spectral_radius is None
    assert rep.gate_names == ()
    assert rep.step_bound is None and rep.critical is None and rep.bound_rate is None
    s = str(rep)
    assert "sigma_max(W_h)" not in s and "recurrent blocks" not in s
    assert "||J_t||_2 measured" in s


# --------------------------------------------------------------------------- 6. LyapunovSpectrum.__str__


def test_lyapunov_spectrum_str_batch_summary():
    J = 0.6 * jax.random.normal(jax.random.key(3), (5, 40, 3, 3))
    spec = lyapunov_from_jacobians(J, window=10)
    e = np.asarray(spec.exponents, np.float64)
    se = np.asarray(spec.stderr, np.float64)
    assert e.shape == (5, 3) and np.all(np.isfinite(e))
    s = str(spec)
    assert "mean over 5 sequences" in s
    first = f"{e[:, 0].mean():+.4f}±{e[:, 0].std(ddof=1):.1e}"
    assert first in s
    assert f"median per-sequence stderr: {np.median(se[:, 0]):.1e}" in s
    assert f"min {e[:, 0].min():+.4f}, max {e[:, 0].max():+.4f}" in s
    assert "seq 4" not in s and "seq 0" not in s
    # the summary does not grow with the batch: 40 sequences (the 5 tiled) print as many lines
    tile = lambda a: np.tile(np.asarray(a), (8,) + (1,) * (np.ndim(a) - 1))
    big = LyapunovSpectrum(
        *(tile(a) for a in (spec.exponents, spec.stderr, spec.finite_time, spec.steps)), spec.window
    )
    assert len(str(big).splitlines()) == len(s.splitlines())
    assert "mean over 40 sequences" in str(big) and "seq 39" not in str(big)
    # one sequence (what a call on J[0] returns: the batch axis dropped) prints value ± stderr
    one = LyapunovSpectrum(spec.exponents[0], spec.stderr[0], spec.finite_time[0], spec.steps[0], spec.window)
    s1 = str(one)
    assert ", ".join(f"{x:+.4f}±{y:.1e}" for x, y in zip(e[0], se[0])) in s1
    assert "mean over" not in s1


# --------------------------------------------------------------------------- 7. pytree / jit


def test_report_through_jit(case):
    cell, params, xs, eager = case("tanh")
    jitted = jax.jit(lambda p: gradient_flow_report(cell, p, xs))(params)
    assert type(jitted) is type(eager)
    assert jitted.regime == eager.regime
    assert jitted.gate_names == eager.gate_names == ("net",)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-7)
    assert str(jitted) == str(eager)
