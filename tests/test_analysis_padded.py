"""Padded data in the analysis functions: every result against slicing by hand.

Each test runs a function on a padded batch (``lengths`` or ``mask``) and on each sequence
alone, unpadded (``xs[b:b+1, :len_b]``, or with a mask's holes deleted), and compares. The
semantics under test (as in ``seqjax.unroll``): at a step a sequence does not read the carry
holds still, and one lag convention everywhere: index ``L`` holds lag ``L``, lag 0 first,
lag ``L`` = the state ``L`` steps before the last step the sequence reads.

Everything runs in float64 (``x64_enabled`` around every test): the padded batch and the
slices are different XLA programs (other shapes, other batch sizes under ``vmap``, a QR per
step), so they agree to rounding only, not bit for bit; float64 makes that rounding
``~1e-15`` relative, and ``TOL = 1e-10`` leaves room for the few dozen steps of
accumulation while any real difference (a padded step leaking in, a lag off by one, a
window counted on the wrong steps) is of order 1e-2 or more. Where the two sides run the
*same* program on the same values (``lengths`` vs the equivalent ``mask``) or the carry is
held by construction (the identity at unread steps), equality is exact.

Padded steps hold inputs that differ from anything a slice sees (offset noise), so a
padded step that leaked into a result would change it.

Cost: compiling dominates (about a second of CPU per program, and each slice length is its
own program). The data, the slices and the padded results are computed once per module
(``_cached``), results are turned into NumPy at once (slicing a JAX array eagerly compiles a
small program per shape), and every call reuses the same static options, so each program
compiles once; the mask-with-holes cases are built so that the deleted sequences have the
lengths of the slices (24, 17, 9) and reuse their programs, the report's hand computation
reuses ``lyapunov_from_jacobians``' (k=1, same window) and the reverse pass is checked
against the forward programs on time-reversed inputs. The default tier (about 25 s on one
core) runs each function on one cell; the other cell and option cases are marked slow.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64_enabled

import seqjax as sj
from seqjax import spectrum as sp

B, T, I, H = 3, 24, 2, 3
LENGTHS = np.array([T, T - 7, 9])  # 24, 17, 9
CELL_NAMES = ("lstm", "rnn")
SLOW = pytest.mark.slow
TOL = 1e-10  # float64 rounding of two different programs over <= 24 steps (module docstring)

# lyapunov options shared by every call (one compile per shape): the shortest sequence has
# 9 - WARMUP - FRAME_WARMUP = 4 measured steps, i.e. two windows of WINDOW steps
WARMUP, FRAME_WARMUP, WINDOW = 2, 3, 2
# mask with holes: row 0 (24 steps) loses 7 -> 17 read, row 1 (length 17) loses 8 -> 9 read,
# row 2 reads all 24: the hand-deleted sequences have the slices' lengths (shared programs)
HOLES = {0: [0, 3, 4, 10, 15, 20, 23], 1: [1, 2, 5, 6, 7, 11, 12, 14]}


@pytest.fixture(autouse=True)
def _float64():
    with x64_enabled():
        yield


def _cached(fn):
    """Module-wide cache of a result (built under x64; float64 arrays stay float64)."""
    return functools.lru_cache(maxsize=None)(fn)


def _np(tree):
    """A result as NumPy: slicing it then costs no eager JAX op (each would compile)."""
    return jax.tree_util.tree_map(np.asarray, tree)


def _cell(name):
    return {"lstm": sj.lstm(H), "rnn": sj.rnn(H)}[name]


@_cached
def _params(name):
    # random normal params of the shapes cell.init makes (eval_shape: nothing compiles); scale
    # 1.5 / sqrt(H) gives non-trivial dynamics, neither collapsing nor saturated
    shapes = jax.eval_shape(lambda k: _cell(name).init(k, I), jax.random.key(0))
    rng = np.random.default_rng(10)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(1.5 / np.sqrt(H) * rng.standard_normal(a.shape), jnp.float64), shapes
    )


@_cached
def _xs_np():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((B, T, I))
    for b, n in enumerate(LENGTHS):  # padding unlike any real input: a leak would show
        xs[b, n:] = 3.0 + rng.standard_normal((T - n, I))
    return xs


def _xs():
    return jnp.asarray(_xs_np(), jnp.float64)


def _lengths():
    return jnp.asarray(LENGTHS)


def _len_mask():
    return np.arange(T)[None, :] < LENGTHS[:, None]


def _holes_mask():
    m = _len_mask().copy()
    for b, hole in HOLES.items():
        m[b, hole] = False
    return m


def _kept(mask_row):
    return np.flatnonzero(mask_row)


def _slice(b, keep=None):
    """Sequence ``b`` alone, unpadded: ``xs[b:b+1, :len_b]`` (or only the steps ``keep``)."""
    xs = _xs_np()
    if keep is None:
        return jnp.asarray(xs[b : b + 1, : LENGTHS[b]])
    return jnp.asarray(xs[b : b + 1, keep])


def _close(got, want, tol=TOL):
    chex.assert_trees_all_close(got, want, rtol=tol, atol=tol)


def _all_nan(a):
    a = np.asarray(a)
    assert np.all(np.isnan(a)), a


# --------------------------------------------------------------------------- step_jacobians


@_cached
def _sj_slice(name, b, keep=None):
    return _np(
        sp.step_jacobians(
            _cell(name), _params(name), _slice(b, None if keep is None else list(keep)), inputs=True
        )
    )


@_cached
def _sj_padded(name):
    return _np(sp.step_jacobians(_cell(name), _params(name), _xs(), lengths=_lengths(), inputs=True))


@pytest.mark.parametrize("name", CELL_NAMES)
def test_step_jacobians_lengths_vs_slices(name):
    got = _sj_padded(name)
    S = got.jacobians.shape[-1]
    np.testing.assert_array_equal(got.valid, _len_mask())
    for b, n in enumerate(LENGTHS):
        ref = _sj_slice(name, b)
        assert ref.valid is None
        _close(
            (got.jacobians[b, :n], got.input_jacobians[b, :n], got.states[b, :n], got.prev_states[b, :n]),
            (ref.jacobians[0], ref.input_jacobians[0], ref.states[0], ref.prev_states[0]),
        )
        # unread steps: the carry holds, exactly
        np.testing.assert_array_equal(got.jacobians[b, n:], np.broadcast_to(np.eye(S), (T - n, S, S)))
        np.testing.assert_array_equal(got.input_jacobians[b, n:], 0.0)
        np.testing.assert_array_equal(got.states[b, n:], np.broadcast_to(got.states[b, n - 1], (T - n, S)))
        np.testing.assert_array_equal(
            got.prev_states[b, n:], np.broadcast_to(got.states[b, n - 1], (T - n, S))
        )


def test_step_jacobians_mask_holes_vs_deleted_steps():
    name = "lstm"
    mask = _holes_mask()
    got = _np(sp.step_jacobians(_cell(name), _params(name), _xs(), mask=jnp.asarray(mask), inputs=True))
    np.testing.assert_array_equal(got.valid, mask)
    S = got.jacobians.shape[-1]
    for b in range(B):
        keep = _kept(mask[b])
        ref = _sj_slice(name, b, tuple(keep))
        _close((got.jacobians[b, keep], got.states[b, keep]), (ref.jacobians[0], ref.states[0]))
        drop = np.flatnonzero(~mask[b])
        np.testing.assert_array_equal(got.jacobians[b, drop], np.broadcast_to(np.eye(S), (drop.size, S, S)))
        np.testing.assert_array_equal(got.input_jacobians[b, drop], 0.0)


# --------------------------------------------------------------------------- lyapunov_spectrum


# a lyapunov_spectrum compile costs 1-2 s of CPU per shape (4 shapes a case: the batch and
# 3 slices), so one case runs by default and the others with --runslow
# the LSTM's padded steps are covered by step_jacobians and gradient_norms; its Lyapunov runs are
# left out to keep .ci/run in time
LYAP_CASES = [("rnn", False), pytest.param("rnn", True, marks=SLOW)]


def _lyap(name, xs, matrix_free, **kw):
    return _np_spec(
        sp.lyapunov_spectrum(
            _cell(name),
            _params(name),
            xs,
            warmup=WARMUP,
            frame_warmup=FRAME_WARMUP,
            window=WINDOW,
            matrix_free=matrix_free,
            **kw,
        )
    )


def _np_spec(spec):
    return _np(spec)


@_cached
def _lyap_slice(name, matrix_free, b, keep=None):
    return _lyap(name, _slice(b, None if keep is None else list(keep)), matrix_free)


@_cached
def _lyap_padded(name, matrix_free):
    return _lyap(name, _xs(), matrix_free, lengths=_lengths())


@_cached
def _lyap_holes(name, matrix_free):
    return _lyap(name, _xs(), matrix_free, mask=jnp.asarray(_holes_mask()))


def _check_against_hand(got, refs):
    """``got`` (a padded batch's spectrum) row by row against the hand-made ``refs``."""
    assert got.window == WINDOW
    nw = got.finite_time.shape[-2]
    for b, ref in enumerate(refs):
        assert ref.window == WINDOW
        nw_b = ref.finite_time.shape[-2]
        _close((got.exponents[b], got.stderr[b]), (ref.exponents[0], ref.stderr[0]))
        np.testing.assert_array_equal(got.steps[b], ref.steps[0])
        _close(got.finite_time[b, :nw_b], ref.finite_time[0])
        if nw_b < nw:
            _all_nan(got.finite_time[b, nw_b:])


@pytest.mark.parametrize("name, matrix_free", LYAP_CASES)
def test_lyapunov_spectrum_lengths_vs_slices(name, matrix_free):
    got = _lyap_padded(name, matrix_free)
    refs = [_lyap_slice(name, matrix_free, b) for b in range(B)]
    # the measured steps per sequence: (len - warmup - frame_warmup) // window whole windows
    want_steps = (LENGTHS - WARMUP - FRAME_WARMUP) // WINDOW * WINDOW
    assert got.steps.shape == (B,) and np.issubdtype(got.steps.dtype, np.integer)
    np.testing.assert_array_equal(got.steps, want_steps)
    assert got.finite_time.shape == (B, (T - WARMUP - FRAME_WARMUP) // WINDOW, got.exponents.shape[-1])
    _check_against_hand(got, refs)


@pytest.mark.parametrize("name", ["rnn", pytest.param("lstm", marks=SLOW)])
def test_lyapunov_spectrum_mask_equals_lengths(name):
    # the same valid steps: the same program on the same values, so exactly equal
    got = _lyap(name, _xs(), False, mask=jnp.asarray(_len_mask()))
    want = _lyap_padded(name, False)
    chex.assert_trees_all_equal(
        (got.exponents, got.stderr, got.finite_time, got.steps),
        (want.exponents, want.stderr, want.finite_time, want.steps),
    )


@pytest.mark.parametrize("name, matrix_free", LYAP_CASES)
def test_lyapunov_spectrum_mask_holes_vs_deleted_steps(name, matrix_free):
    mask = _holes_mask()
    got = _lyap_holes(name, matrix_free)
    refs = [_lyap_slice(name, matrix_free, b, tuple(_kept(mask[b]))) for b in range(B)]
    _check_against_hand(got, refs)


@pytest.mark.parametrize("name", ["rnn", pytest.param("lstm", marks=SLOW)])
def test_lyapunov_spectrum_time_major(name):
    xs_tm = jnp.swapaxes(_xs(), 0, 1)  # (T, B, I)
    got = _lyap(name, xs_tm, False, lengths=_lengths(), time_axis=0)
    want = _lyap_padded(name, False)
    _close((got.exponents, got.stderr, got.finite_time), (want.exponents, want.stderr, want.finite_time))
    np.testing.assert_array_equal(got.steps, want.steps)
    # a time-major mask (laid out like xs without features: (T, B)) with holes
    got = _lyap(name, xs_tm, False, mask=jnp.asarray(_holes_mask().T), time_axis=0)
    want = _lyap_holes(name, False)
    _close((got.exponents, got.stderr, got.finite_time), (want.exponents, want.stderr, want.finite_time))
    np.testing.assert_array_equal(got.steps, want.steps)


# --------------------------------------------------------------------------- lyapunov_from_jacobians


@_cached
def _garbage_jacobians(name):
    """The padded batch's Jacobians with random matrices at the unread steps (they must be skipped)."""
    J = _sj_padded(name).jacobians.copy()
    rng = np.random.default_rng(1)
    unread = ~_len_mask()
    J[unread] = 2.0 * rng.standard_normal(J[unread].shape)
    return jnp.asarray(J)


# k=1 with the options of test_gradient_flow_report_lengths_vs_slices: its hand computation
# reuses these programs; the full spectrum runs with --runslow
@pytest.mark.parametrize("name, k", [("rnn", 1), pytest.param("lstm", None, marks=SLOW)])
def test_lyapunov_from_jacobians_lengths_vs_slices(name, k):
    J = _garbage_jacobians(name)
    kw = dict(k=k, frame_warmup=FRAME_WARMUP, window=WINDOW)
    got = _np(sp.lyapunov_from_jacobians(J, lengths=_lengths(), **kw))
    refs = [_np(sp.lyapunov_from_jacobians(_sj_slice(name, b).jacobians, **kw)) for b in range(B)]
    # the same spectrum as lyapunov_spectrum's with warmup=0 would give: compare row by row
    assert got.window == WINDOW
    for b, ref in enumerate(refs):
        nw_b = ref.finite_time.shape[-2]
        _close(
            (got.exponents[b], got.stderr[b], got.finite_time[b, :nw_b]),
            (ref.exponents[0], ref.stderr[0], ref.finite_time[0]),
        )
        np.testing.assert_array_equal(got.steps[b], ref.steps[0])
        _all_nan(got.finite_time[b, nw_b:]) if nw_b < got.finite_time.shape[-2] else None
    # holes in a mask: those steps are skipped whatever their Jacobian = deleting them
    mask = _holes_mask()
    Jh = _sj_padded(name).jacobians.copy()
    rng = np.random.default_rng(2)
    Jh[~mask] = 2.0 * rng.standard_normal(Jh[~mask].shape)
    got = _np(sp.lyapunov_from_jacobians(jnp.asarray(Jh), mask=jnp.asarray(mask), **kw))
    Jp = _sj_padded(name).jacobians
    for b in range(B):
        keep = _kept(mask[b])
        ref = _np(sp.lyapunov_from_jacobians(jnp.asarray(Jp[b : b + 1, keep]), **kw))
        nw_b = ref.finite_time.shape[-2]
        _close(
            (got.exponents[b], got.stderr[b], got.finite_time[b, :nw_b]),
            (ref.exponents[0], ref.stderr[0], ref.finite_time[0]),
        )
        np.testing.assert_array_equal(got.steps[b], ref.steps[0])


# --------------------------------------------------------------------------- lag_log_norms


@pytest.mark.parametrize(
    "name, variant",
    [
        ("rnn", "ord2"),
        ("rnn", "cotangent"),
        pytest.param("rnn", "fro", marks=SLOW),
        pytest.param("lstm", "ord2", marks=SLOW),
    ],
)
def test_lag_log_norms_lengths_vs_slices(name, variant):
    J = _garbage_jacobians(name)
    S = J.shape[-1]
    kw = {}
    cot = None
    if variant == "fro":
        kw["ord"] = "fro"
    if variant == "cotangent":
        cot = np.random.default_rng(3).standard_normal((B, S))
    got = np.asarray(sp.lag_log_norms(J, lengths=_lengths(), cotangent=cot, **kw))
    assert got.shape == (B, T + 1)
    for b, n in enumerate(LENGTHS):
        ref = np.asarray(
            sp.lag_log_norms(
                _sj_slice(name, b).jacobians, cotangent=None if cot is None else cot[b : b + 1], **kw
            )
        )
        assert ref.shape == (1, n + 1)
        _close(got[b, : n + 1], ref[0])
        if n < T:
            _all_nan(got[b, n + 1 :])
    if variant == "ord2":  # the equivalent mask gives the same curves, exactly
        chex.assert_trees_all_equal(np.asarray(sp.lag_log_norms(J, mask=jnp.asarray(_len_mask()))), got)


# --------------------------------------------------------------------------- gradient_norms


def _last_loss(ys):  # an unpadded sequence: its last step is ys[:, -1]
    return jnp.sum(jnp.sin(ys[:, -1]) + ys[:, -1] ** 2)


def _padded_last_loss(ys):  # each sequence's own last valid output
    y = sj.last_step(ys, jnp.asarray(LENGTHS))
    return jnp.sum(jnp.sin(y) + y**2)


def _padded_last_loss_tm(ys):  # the same, time-major ys (T, B, O)
    y = sj.last_step(ys, jnp.asarray(LENGTHS), time_axis=0)
    return jnp.sum(jnp.sin(y) + y**2)


def _first_loss(ys):  # the last output of a reverse pass: the first step, padded or not
    return jnp.sum(jnp.sin(ys[:, 0]) + ys[:, 0] ** 2)


@_cached
def _gn_slice(name, b, by_lag, reverse=False):
    loss = _first_loss if reverse else _last_loss
    return _np(sj.gradient_norms(_cell(name), _params(name), _slice(b), loss, by_lag=by_lag, reverse=reverse))


@_cached
def _gn_padded(name, by_lag):
    return _np(
        sj.gradient_norms(
            _cell(name), _params(name), _xs(), _padded_last_loss, lengths=_lengths(), by_lag=by_lag
        )
    )


def _check_by_lag(got, name, reverse=False):
    """``got`` (batch-major, by lag) against each unpadded sequence's by-lag norms."""
    lag_ok = np.arange(T)[None, :] < LENGTHS[:, None]
    np.testing.assert_array_equal(got.valid, lag_ok)
    for b, n in enumerate(LENGTHS):
        ref = _gn_slice(name, b, True, reverse)
        assert ref.valid is None
        _close(got.norms[b, :n], ref.norms[0])
        _close(
            jax.tree_util.tree_map(lambda a: a[b, :n], got.leaf_norms),
            jax.tree_util.tree_map(lambda a: a[0], ref.leaf_norms),
        )
        if n < T:
            _all_nan(got.norms[b, n:])
            jax.tree_util.tree_map(lambda a: _all_nan(a[b, n:]), got.leaf_norms)


@pytest.mark.parametrize("name", ["lstm", pytest.param("rnn", marks=SLOW)])
def test_gradient_norms_by_lag_lengths_vs_slices(name):
    got = _gn_padded(name, True)
    _check_by_lag(got, name)
    if name == "lstm":  # per-leaf norms: LSTMState(h, c), each compared above; they compose the total
        assert isinstance(got.leaf_norms, sj.LSTMState)
        h, c = got.leaf_norms
        _close(np.sqrt(np.asarray(h) ** 2 + np.asarray(c) ** 2), got.norms)


def test_gradient_norms_time_order_lengths_vs_slices():
    name = "lstm"
    got = _gn_padded(name, False)
    np.testing.assert_array_equal(got.valid, _len_mask())
    for b, n in enumerate(LENGTHS):
        # the unpadded sequence's lag L is its time step n - 1 - L: its by-lag norms reversed
        ref = _gn_slice(name, b, True)
        _close(got.norms[b, :n], ref.norms[0, ::-1])
        _close(
            jax.tree_util.tree_map(lambda a: a[b, :n], got.leaf_norms),
            jax.tree_util.tree_map(lambda a: a[0, ::-1], ref.leaf_norms),
        )
        np.testing.assert_array_equal(got.norms[b, n:], 0.0)  # padded steps: the carry holds
        jax.tree_util.tree_map(lambda a: np.testing.assert_array_equal(a[b, n:], 0.0), got.leaf_norms)


def test_gradient_norms_reverse():
    # a reverse pass over a sequence is the forward pass over it reversed in time; the loss on
    # the reverse pass's last output (time step 0) is the last-step loss of the reversed
    # sequence. So by lag (lag L = L steps after the first step read) the padded batch must
    # match the unpadded, time-reversed sequence run forward (the programs of the by-lag test).
    name = "lstm"
    got = _np(
        sj.gradient_norms(
            _cell(name), _params(name), _xs(), _first_loss, lengths=_lengths(), by_lag=True, reverse=True
        )
    )
    np.testing.assert_array_equal(got.valid, _len_mask())
    for b, n in enumerate(LENGTHS):
        reversed_xs = jnp.asarray(_xs_np()[b : b + 1, :n][:, ::-1])
        ref = _np(
            sj.gradient_norms(_cell(name), _params(name), reversed_xs, _last_loss, by_lag=True, reverse=False)
        )
        _close(got.norms[b, :n], ref.norms[0])
        _close(
            jax.tree_util.tree_map(lambda a: a[b, :n], got.leaf_norms),
            jax.tree_util.tree_map(lambda a: a[0], ref.leaf_norms),
        )
        if n < T:
            _all_nan(got.norms[b, n:])


def test_gradient_norms_time_major():
    name = "lstm"
    xs_tm = jnp.swapaxes(_xs(), 0, 1)
    got = _np(
        sj.gradient_norms(
            _cell(name),
            _params(name),
            xs_tm,
            _padded_last_loss_tm,
            lengths=_lengths(),
            by_lag=True,
            time_axis=0,
        )
    )
    assert got.norms.shape == (T, B)  # the layout of xs without features: lag along axis 0
    want = _gn_padded(name, True)
    swap = functools.partial(jax.tree_util.tree_map, lambda a: np.swapaxes(a, 0, 1))
    _close(swap((got.norms, got.leaf_norms)), (want.norms, want.leaf_norms))
    np.testing.assert_array_equal(np.asarray(got.valid).T, want.valid)


def test_gradient_norms_mask_equals_lengths():
    name = "lstm"
    got = _np(
        sj.gradient_norms(
            _cell(name), _params(name), _xs(), _padded_last_loss, mask=jnp.asarray(_len_mask()), by_lag=True
        )
    )
    _check_by_lag(got, name)


# --------------------------------------------------------------------------- gradient_flow_report


@pytest.mark.parametrize("name", ["rnn"])
def test_gradient_flow_report_lengths_vs_slices(name):
    # frame_warmup and window passed explicitly (the defaults depend on T and the shortest length)
    fw, window = FRAME_WARMUP, WINDOW
    rep = _np(
        sp.gradient_flow_report(
            _cell(name), _params(name), _xs(), lengths=_lengths(), frame_warmup=fw, window=window
        )
    )
    assert rep.window == window
    curves = np.full((B, T + 1), np.nan)
    windows, steps, norms = [], [], []
    for b, n in enumerate(LENGTHS):
        J = _sj_slice(name, b).jacobians
        curves[b, : n + 1] = np.asarray(sp.lag_log_norms(J))[0]
        spec = _np(sp.lyapunov_from_jacobians(J, k=1, frame_warmup=fw, window=window))
        windows.append(np.asarray(spec.finite_time[0, :, 0]))
        steps.append(int(spec.steps[0]))
        norms.append(np.linalg.norm(J[0], ord=2, axis=(-2, -1)))
    assert rep.lag_log_norms.shape == (T + 1,)
    _close(rep.lag_log_norms, np.nanmean(curves, axis=0))  # each lag over the sequences that have it
    pooled = np.concatenate(windows)
    assert int(rep.windows) == pooled.size
    _close(rep.lyapunov_max, pooled.mean())
    _close(rep.lyapunov_stderr, pooled.std(ddof=1) / np.sqrt(pooled.size))
    assert rep.measured_steps.shape == (B,)  # per sequence
    np.testing.assert_array_equal(rep.measured_steps, steps)
    all_norms = np.concatenate(norms)
    _close((rep.step_norm_max, rep.step_norm_mean), (all_norms.max(), all_norms.mean()))


# --------------------------------------------------------------------------- sample_states


N_DRAWN = 2000  # one sample_states program for both tests (n is static)


def _match_index(drawn, states, tol=TOL):
    """For each drawn state, the index of the candidate state it equals (-1 if none)."""
    d = np.max(np.abs(drawn[:, None, :] - states[None, :, :]), axis=-1)
    return np.where(d.min(axis=1) <= tol, d.argmin(axis=1), -1)


def test_sample_states_lengths_never_past_the_end():
    name = "lstm"
    n = N_DRAWN
    drawn = np.asarray(
        sp.sample_states(_cell(name), _params(name), _xs(), n=n, key=jax.random.key(4), lengths=_lengths())
    )
    cand = np.concatenate([np.asarray(_sj_slice(name, b).states[0]) for b in range(B)])  # valid-step states
    idx = _match_index(drawn, cand)
    assert np.all(idx >= 0), "a drawn state is not a state of a step read"
    # held states past the end repeat the last state, so equality alone cannot tell them apart:
    # the last state of the shortest sequence must come up like any other state (1 in 50),
    # not like 16 of 72 (its own step plus the 15 padded ones)
    last_of_short = LENGTHS.sum() - 1
    count = int(np.sum(idx == last_of_short))
    expected = n / LENGTHS.sum()
    assert count < 2.5 * expected, (count, expected)


def test_sample_states_mask_leading_holes():
    # holes at the start: a sequence holds its initial carry (zeros) there, a state no step read
    # has. Row 0 skips its first 7 steps (17 read), row 1 its first 8 (9 read), row 2 none.
    name = "lstm"
    mask = _len_mask().copy()
    mask[0, :7] = False
    mask[1, :8] = False
    drawn = np.asarray(
        sp.sample_states(
            _cell(name), _params(name), _xs(), n=N_DRAWN, key=jax.random.key(5), mask=jnp.asarray(mask)
        )
    )
    cand = np.concatenate([np.asarray(_sj_slice(name, b, tuple(_kept(mask[b]))).states[0]) for b in range(B)])
    assert np.all(_match_index(drawn, cand) >= 0), "a drawn state is not a state of a step read"
    assert np.all(np.max(np.abs(drawn), axis=-1) > 0), "drew the held initial carry"


# --------------------------------------------------------------------------- errors


def _calls():
    """Every analysis function that takes ``lengths``, as ``f(lengths)``."""
    cell, p, xs = _cell("rnn"), _params("rnn"), _xs()
    J = _garbage_jacobians("rnn")
    return {
        "step_jacobians": lambda L: sp.step_jacobians(cell, p, xs, lengths=L),
        "lyapunov_spectrum": lambda L: sp.lyapunov_spectrum(cell, p, xs, lengths=L, window=1),
        "lyapunov_from_jacobians": lambda L: sp.lyapunov_from_jacobians(J, lengths=L, window=1),
        "lag_log_norms": lambda L: sp.lag_log_norms(J, lengths=L),
        "gradient_norms": lambda L: sj.gradient_norms(cell, p, xs, _padded_last_loss, lengths=L, by_lag=True),
        "gradient_flow_report": lambda L: sp.gradient_flow_report(cell, p, xs, lengths=L, window=1),
        "sample_states": lambda L: sp.sample_states(cell, p, xs, n=4, key=jax.random.key(0), lengths=L),
    }


FUNCTIONS = (
    "step_jacobians",
    "lyapunov_spectrum",
    "lyapunov_from_jacobians",
    "lag_log_norms",
    "gradient_norms",
    "gradient_flow_report",
    "sample_states",
)


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize(
    "bad",
    [np.array([T, 9]), np.array([[T, 17, 9]]), np.array([T + 1, 17, 9]), np.array([T, -1, 9])],
    ids=["short", "2d", "too-long", "negative"],
)
def test_bad_lengths_raise(fn, bad):
    with pytest.raises(ValueError, match="lengths"):
        _calls()[fn](jnp.asarray(bad))


@pytest.mark.parametrize("fn", ["lyapunov_spectrum", "lyapunov_from_jacobians", "gradient_flow_report"])
@pytest.mark.parametrize(
    "lengths, shortest", [((T, T - 7, 9), 2), ((T, 9, T - 7), 1)], ids=["last", "middle"]
)
def test_window_longer_than_shortest_sequence(fn, lengths, shortest):
    cell, p, xs = _cell("rnn"), _params("rnn"), _xs()
    J = _garbage_jacobians("rnn")
    L = jnp.asarray(lengths)
    window = 12  # the longer sequences have room for it, the shortest (9 steps) has not
    call = {
        "lyapunov_spectrum": lambda: sp.lyapunov_spectrum(cell, p, xs, lengths=L, window=window),
        "lyapunov_from_jacobians": lambda: sp.lyapunov_from_jacobians(J, lengths=L, window=window),
        "gradient_flow_report": lambda: sp.gradient_flow_report(
            cell, p, xs, lengths=L, window=window, frame_warmup=0
        ),
    }[fn]
    with pytest.raises(ValueError, match="window") as info:
        call()
    msg = str(info.value)
    assert "shortest sequence" in msg and "9 measured steps" in msg, msg
    # the sequence named by its index as a user writes it, (i,), not NumPy's repr (np.int64(i),)
    assert f"shortest sequence (index ({shortest},))" in msg, msg
