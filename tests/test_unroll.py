"""Each option of ``unroll`` against a loop-computed or hand-computed expectation; the
``trajectory`` run; dropout as a cell (``seqjax.cells.dropout``) against float64 NumPy loops;
the 0.1 keywords of ``unroll`` refused with their 0.2 spelling."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from helpers import assert_trees_close

import seqjax as sj
from seqjax.gradients import Auto, Autodiff, Fused
from seqjax.solvers import Sequential
from seqjax.testing import CHECKS, check_cell

B, T, I, H = 3, 6, 4, 5
TOL = dict(rtol=1e-6, atol=1e-6)


def _setup(cell=None, seed=0):
    cell = sj.lstm(H) if cell is None else cell
    params = cell.init(jax.random.key(seed), I)
    xs = jax.random.normal(jax.random.key(seed + 1), (B, T, I))
    return cell, params, xs


def _take(tree, b):
    return jax.tree_util.tree_map(lambda a: a[b], tree)


@pytest.mark.parametrize("reverse", [False, True])
def test_lengths_equal_running_each_sequence_alone(reverse):
    cell, params, xs = _setup()
    lengths = jnp.array([6, 2, 0])
    final, ys = sj.unroll(cell, params, xs, lengths=lengths, reverse=reverse)
    for b in range(B):
        n = int(lengths[b])
        f_b, y_b = sj.unroll(cell, params, xs[b, :n], reverse=reverse)
        assert_trees_close(_take(final, b), f_b, **TOL)
        np.testing.assert_allclose(ys[b, :n], y_b, **TOL)
        np.testing.assert_array_equal(ys[b, n:], 0.0)  # outputs past the end are zero


def test_mask_holds_carry_still():
    cell, params, xs = _setup(sj.gru(H))
    mask = jnp.array([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
    final, ys = sj.unroll(cell, params, xs, mask=mask)
    for b in range(B):
        h = jnp.zeros(H)
        for t in range(T):
            if mask[b, t]:
                h, y = cell.step(params, h, xs[b, t])
                np.testing.assert_allclose(ys[b, t], y, **TOL)
            else:
                np.testing.assert_array_equal(ys[b, t], 0.0)
        np.testing.assert_allclose(final[b], h, **TOL)


def test_resets_return_carry_to_initial_value():
    cell, params, xs = _setup()
    carry0 = sj.LSTMState(jnp.full((B, H), 0.3), jnp.full((B, H), -0.2))
    resets = jnp.zeros((B, T), bool).at[0, 3].set(True).at[2, 1].set(True).at[2, 4].set(True)
    final, ys = sj.unroll(cell, params, xs, carry=carry0, resets=resets)
    for b in range(B):
        c = _take(carry0, b)
        for t in range(T):
            if resets[b, t]:
                c = _take(carry0, b)
            c, y = cell.step(params, c, xs[b, t])
            np.testing.assert_allclose(ys[b, t], y, **TOL)
        assert_trees_close(_take(final, b), c, **TOL)
    # a reset at step 0 changes nothing; a reset elsewhere changes the outcome
    same = sj.unroll(cell, params, xs, carry=carry0, resets=jnp.zeros((B, T), bool).at[:, 0].set(True))
    assert_trees_close(same, sj.unroll(cell, params, xs, carry=carry0), **TOL)
    assert not np.allclose(final.h[0], sj.unroll(cell, params, xs, carry=carry0)[0].h[0])


def test_reverse_equals_flipped_input():
    cell, params, xs = _setup(sj.rnn(H))
    final, ys = sj.unroll(cell, params, xs, reverse=True)
    f_ref, ys_ref = sj.unroll(cell, params, xs[:, ::-1])
    np.testing.assert_allclose(final, f_ref, **TOL)
    np.testing.assert_allclose(ys, ys_ref[:, ::-1], **TOL)  # outputs stay in input order


def test_time_major_and_extra_batch_dims():
    cell, params, xs = _setup()
    final, ys = sj.unroll(cell, params, xs)
    final_tm, ys_tm = sj.unroll(cell, params, jnp.swapaxes(xs, 0, 1), time_axis=0)
    assert_trees_close(final, final_tm, **TOL)
    np.testing.assert_allclose(jnp.swapaxes(ys_tm, 0, 1), ys, **TOL)
    # two batch dims (1, B): same results
    f2, y2 = sj.unroll(cell, params, xs[None], lengths=jnp.array([[6, 2, 4]]))
    f1, y1 = sj.unroll(cell, params, xs, lengths=jnp.array([6, 2, 4]))
    assert_trees_close(_take(f2, 0), f1, **TOL)
    np.testing.assert_allclose(y2[0], y1, **TOL)


def test_trajectory_carries_and_gates():
    cell, params, xs = _setup()
    lengths = jnp.array([6, 4, 1])
    tr = sj.trajectory(cell, params, xs, lengths=lengths, gates=True)
    assert isinstance(tr, sj.Trajectory)
    final, ys = tr.carry, tr.ys
    assert tr.carries.h.shape == (B, T, H) and tr.carries.c.shape == (B, T, H)
    for b in range(B):
        c = cell.initial_carry(params)
        for t in range(int(lengths[b])):
            g = cell.gates(params, c, xs[b, t])
            c, _ = cell.step(params, c, xs[b, t])
            np.testing.assert_allclose(tr.carries.h[b, t], c.h, **TOL)
            np.testing.assert_allclose(tr.carries.c[b, t], c.c, **TOL)
            for k in "ifgo":
                np.testing.assert_allclose(tr.gates[k][b, t], g[k], **TOL)
        # past the end the trajectory holds the final carry
        for t in range(int(lengths[b]), T):
            np.testing.assert_allclose(tr.carries.c[b, t], final.c[b], **TOL)
    # the gates recompute the cell exactly: c_t = f c_{t-1} + i g
    c_prev = jnp.concatenate([jnp.zeros((B, 1, H)), tr.carries.c[:, :-1]], axis=1)
    g = tr.gates
    np.testing.assert_allclose(tr.carries.c[0], (g["f"] * c_prev + g["i"] * g["g"])[0], **TOL)
    np.testing.assert_allclose(ys[0], (g["o"] * jnp.tanh(tr.carries.c))[0], **TOL)
    with pytest.raises(ValueError, match="gates"):
        sj.trajectory(sj.tdnn(H, 2), sj.tdnn(H, 2).init(jax.random.key(0), I), xs, gates=True)
    # without gates=True there are none
    assert sj.trajectory(cell, params, xs).gates is None


@pytest.fixture(scope="module")
def traj_vs_unroll():
    """One compiled program: unroll and trajectory of an LSTM (lengths, a carry) under a
    gradient strategy, with the gradients of a loss of each."""

    def run(p, xs, c0, lengths, gradient):
        def loss(fn):
            def f(p):
                out = fn(sj.lstm(H), p, xs, carry=c0, lengths=lengths, gradient=gradient)
                return jnp.sum(out[1] ** 2) + jnp.sum(jnp.sin(out[0].c)), (out[0], out[1])

            return f

        (_, u), gu = jax.value_and_grad(loss(sj.unroll), has_aux=True)(p)
        (_, t), gt = jax.value_and_grad(loss(sj.trajectory), has_aux=True)(p)
        return u, t, gu, gt

    return jax.jit(run, static_argnums=4)


@pytest.mark.parametrize("gradient", [Auto(), Autodiff()], ids=["kernel", "autodiff"])
def test_trajectory_carry_and_ys_equal_unroll(traj_vs_unroll, gradient):
    """``trajectory(...).carry/.ys`` are ``unroll``'s, on the kernel path and on autodiff
    (values and gradients), and its last carry is the final carry of each full-length row."""
    cell, params, xs = _setup()
    c0 = sj.LSTMState(jnp.full((B, H), 0.2), jnp.full((B, H), -0.1))
    lengths = jnp.array([6, 3, 0])
    kernel_ran = "custom_vjp_call" in str(
        jax.make_jaxpr(lambda p: sj.trajectory(cell, p, xs, carry=c0, lengths=lengths, gradient=gradient))(
            params
        )
    )
    assert kernel_ran == isinstance(gradient, Auto)
    u, t, gu, gt = traj_vs_unroll(params, xs, c0, lengths, gradient)
    assert_trees_close(t, u, rtol=0, atol=0)
    assert_trees_close(gt, gu, **TOL)
    tr = sj.trajectory(cell, params, xs, carry=c0, lengths=lengths, gradient=gradient)
    assert_trees_close(_take(tr.carries, (0, -1)), _take(tr.carry, 0), rtol=0, atol=0)


def test_learnable_initial_carry_gets_gradients():
    cell = sj.learnable_carry(sj.lstm(H), init=lambda k, c: jax.tree_util.tree_map(lambda a: a + 0.5, c))
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    np.testing.assert_array_equal(params["carry0"].h, 0.5 * np.ones(H))
    final, ys = sj.unroll(cell, params, xs)
    # equals the inner cell started from the broadcast carry0
    c0 = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (B, H)), params["carry0"])
    assert_trees_close((final, ys), sj.unroll(sj.lstm(H), params["cell"], xs, carry=c0), **TOL)

    def loss(p):
        return jnp.sum(sj.unroll(cell, p, xs)[1] ** 2)

    g = jax.jit(jax.grad(loss))(params)
    loss = jax.jit(loss)  # one compile for the finite differences below
    # finite-difference check of the gradient wrt carry0.c[0]
    eps = 1e-3
    bump = lambda s: jax.tree_util.tree_map(
        lambda a: a, {**params, "carry0": params["carry0"]._replace(c=params["carry0"].c.at[0].add(s))}
    )
    fd = (loss(bump(eps)) - loss(bump(-eps))) / (2 * eps)
    np.testing.assert_allclose(g["carry0"].c[0], fd, rtol=2e-2)
    assert float(jnp.abs(g["carry0"].h).sum()) > 0


# --------------------------------------------------------------------------- dropout as a cell


@pytest.fixture(scope="module")
def run_dropout():
    """Compiled ``unroll(dropout(cell, ...), params, xs)`` (the key an argument: one program
    per cell, rates and gradient strategy)."""
    cache = {}

    def run(cell, params, xs, key, *, input_rate=0.0, recurrent_rate=0.0, gradient=None):
        sig = (cell, input_rate, recurrent_rate, gradient)
        if sig not in cache:

            def fn(p, x, k):
                d = sj.cells.dropout(cell, input_rate=input_rate, recurrent_rate=recurrent_rate, key=k)
                return sj.unroll(d, p, x, gradient=gradient)

            cache[sig] = jax.jit(fn)
        return cache[sig](params, xs, key)

    return run


def _snap(m, scale):
    """Recovered mask entries, checked to lie at 0 or ``scale``, snapped there."""
    np.testing.assert_allclose(np.minimum(np.abs(m), np.abs(m - scale)), 0.0, atol=1e-3)
    return np.where(np.abs(m) < 0.5 * scale, 0.0, scale)


def test_dropout_one_mask_per_sequence(run_dropout):
    """Masks recovered from identity RNNs are one {0, 1/(1-p)} vector per sequence, shared by
    every step; with them a float64 NumPy loop of a tanh RNN and an LSTM (recurrent dropout on
    h only, the cell state undropped) reproduces the dropout cells run with both rates."""
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    x = np.asarray(xs, np.float64)
    key = jax.random.key(7)
    # input dropout: zero recurrent weights, identity activation, so y_t = (x_t * m) W_x + b;
    # solve for m per sequence and step in least squares (W_x: (I, H) with H > I)
    cell = sj.rnn(H, activation="identity", recurrent_init=sj.initializers.zeros)
    params = cell.init(jax.random.key(0), I)
    _, ys = run_dropout(cell, params, xs, key, input_rate=0.5)
    m_x = np.zeros((B, I))
    for b in range(B):
        masks = []
        for t in range(T):
            sol = np.linalg.lstsq(
                np.asarray(params["w_x"]).T, np.asarray(ys[b, t] - params["b"]), rcond=None
            )[0]
            masks.append(sol / np.asarray(xs[b, t]))
        masks = np.array(masks)
        np.testing.assert_allclose(masks, np.broadcast_to(masks[0], masks.shape), atol=1e-3)
        m_x[b] = _snap(masks[0], 2.0)  # kept units scaled by 1/(1-p)
    assert 0 < np.count_nonzero(m_x) < m_x.size  # really drops some units and keeps some
    # recurrent dropout on an identity RNN: h_t = (h_{t-1} * m) W_h + x_t W_x + b, so
    # m = ((h_t - x_t W_x - b) W_h^{-1}) / h_{t-1} must be one fixed {0, 1/(1-p)} vector
    cell = sj.rnn(H, activation="identity")
    params = cell.init(jax.random.key(0), I)
    p64 = ref.np_params(params)
    _, ys = run_dropout(cell, params, xs, key, recurrent_rate=0.3)
    _, ys2 = run_dropout(cell, params, xs, key, recurrent_rate=0.3)
    np.testing.assert_array_equal(ys, ys2)  # same key, same masks
    _, ys_other = run_dropout(cell, params, xs, jax.random.key(8), recurrent_rate=0.3)
    assert not np.allclose(ys, ys_other)  # another key, other masks
    y = np.asarray(ys, np.float64)
    w_inv = np.linalg.inv(p64["w_h"])
    m_h = np.zeros((B, H))
    for b in range(B):
        ms = [((y[b, t] - x[b, t] @ p64["w_x"] - p64["b"]) @ w_inv) / y[b, t - 1] for t in range(1, T)]
        ms = np.array(ms)
        np.testing.assert_allclose(ms, np.broadcast_to(ms[0], ms.shape), atol=1e-3)
        m_h[b] = _snap(ms[0], 1 / 0.7)
    assert 0 < np.count_nonzero(m_h) < m_h.size
    # both rates at once draw the same two masks (k_x, k_h = split(key)): NumPy loops
    rates = dict(input_rate=0.5, recurrent_rate=0.3)
    cell = sj.rnn(H)
    params = cell.init(jax.random.key(2), I)
    p64 = ref.np_params(params)
    _, ys = run_dropout(cell, params, xs, key, **rates)
    h, want = np.zeros((B, H)), []
    for t in range(T):
        h = ref.rnn_step(p64, h * m_h, x[:, t] * m_x)
        want.append(h)
    np.testing.assert_allclose(ys, np.stack(want, 1), rtol=1e-5, atol=1e-5)
    cell = sj.lstm(H)
    params = cell.init(jax.random.key(3), I)
    p64 = ref.np_params(params)
    final, ys = run_dropout(cell, params, xs, key, **rates)
    h, c, want = np.zeros((B, H)), np.zeros((B, H)), []
    for t in range(T):
        h, c = ref.lstm_step(p64, h * m_h, c, x[:, t] * m_x)
        want.append(h)
    np.testing.assert_allclose(ys, np.stack(want, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.c, c, rtol=1e-5, atol=1e-5)


def test_dropout_input_rate_keeps_the_kernel(run_dropout, x64):
    """Input dropout keeps ``kernel`` (it runs on the masked inputs): values and gradients
    under ``Fused()`` equal ``Autodiff()`` of the dropout cell's own step; ``jacobian_bound``
    is dropped either way."""
    rnn = sj.rnn(H)
    assert rnn.jacobian_bound is not None
    assert sj.cells.dropout(rnn, input_rate=0.4, key=jax.random.key(0)).jacobian_bound is None
    cell = sj.gru(H)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), cell.init(jax.random.key(0), I))
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64)
    w = jax.random.normal(jax.random.key(2), (B, T, H), jnp.float64)
    key = jax.random.key(5)
    d = sj.cells.dropout(cell, input_rate=0.4, key=key)
    assert d.kernel is not None and d.kernel.accepts == cell.kernel.accepts

    def grads(gradient):
        def loss(p, xs):
            c, ys = run_dropout(cell, p, xs, key, input_rate=0.4, gradient=gradient)
            return jnp.sum(ys * w) + jnp.sum(jnp.sin(c)), (c, ys)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, xs)

    (_, out_f), g_f = grads(Fused())
    (_, out_a), g_a = grads(Autodiff())
    assert_trees_close(out_f, out_a, rtol=1e-12, atol=1e-12)
    assert_trees_close(g_f, g_a, rtol=1e-12, atol=1e-12)
    # the kernel ran on masked inputs: not the plain cell's values
    assert not np.allclose(out_f[1], sj.unroll(cell, params, xs)[1])


def test_dropout_recurrent_rate_drops_kernel_and_bound():
    assert sj.rnn(H).jacobian_bound is not None
    for cell in (sj.rnn(H), sj.lstm(H), sj.gru(H)):
        d = sj.cells.dropout(cell, recurrent_rate=0.2, key=jax.random.key(0))
        assert cell.kernel is not None and d.kernel is None
        assert d.jacobian_bound is None
        assert d.jacobian is not None and d.jacobian_diagonal is not None
        assert d.output is not None and d.gates is not None


@pytest.mark.parametrize(
    "make,rates",
    [
        (lambda: sj.lstm(3), dict(input_rate=0.3, recurrent_rate=0.4)),
        pytest.param(lambda: sj.gru(3), dict(input_rate=0.3), marks=pytest.mark.slow),
    ],
    ids=["lstm-both", "gru-input"],
)
def test_dropout_capabilities_match_their_fallbacks(make, rates):
    """``check_cell`` on the dropout cell: its output, gates, ``jacobian`` and
    ``jacobian_diagonal`` (exact: ``J_cell(m_s s, m_x x) diag(m_s)``) against ``jax.jacfwd``
    of its own step, gradients against finite differences, and the kernel (input dropout)
    against autodiff. Not ``vmap``: the masks take the batch shape the step sees (documented),
    so one sequence alone draws other masks than the batch."""
    cell = sj.cells.dropout(make(), key=jax.random.key(3), **rates)
    checks = [c for c in CHECKS if c != "vmap"]
    report = check_cell(cell, input_size=2, batch=2, steps=4, checks=checks, options=("mask", "trajectory"))
    passed = set(report.passed)
    assert {"loop", "grads", "output", "jacobian", "jacobian_diagonal"} <= passed
    if rates.get("recurrent_rate"):
        assert not any(name.startswith("kernel") for name in passed)
    else:
        assert {"kernel[plain]", "kernel[mask]", "kernel[trajectory]"} <= passed


def test_dropout_needs_key_and_valid_rate():
    cell = sj.lstm(H)
    with pytest.raises(ValueError, match="key"):
        sj.cells.dropout(cell, recurrent_rate=0.2, key=None)
    for kw in (dict(input_rate=1.0), dict(recurrent_rate=-0.1), dict(input_rate=1.5)):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            sj.cells.dropout(cell, key=jax.random.key(0), **kw)
    with pytest.raises(TypeError, match="seqjax.Cell"):
        sj.cells.dropout(cell.step, input_rate=0.2, key=jax.random.key(0))


# --------------------------------------------------------------------------- solver, 0.1 keywords


def test_solver_unroll_gives_same_result():
    cell, params, xs = _setup()
    want = sj.unroll(cell, params, xs)
    for solver in (Sequential(unroll=3), Sequential(unroll=True)):
        assert_trees_close(sj.unroll(cell, params, xs, solver=solver), want, **TOL)
        assert_trees_close(sj.unroll(cell, params, xs, solver=solver, gradient=Autodiff()), want, **TOL)
    with pytest.raises(ValueError, match="positive integer"):
        Sequential(unroll=0)
    with pytest.raises(TypeError, match="solver must be"):
        sj.unroll(cell, params, xs, solver="scan")


# each 0.1 keyword of unroll, a value it took, and a piece of the 0.2 spelling the error names
OLD_KEYWORDS = {
    "return_carries": (True, "seqjax.trajectory(cell, params, xs, ...).carries"),
    "return_gates": (True, "seqjax.trajectory(cell, params, xs, gates=True).gates"),
    "input_dropout": (0.2, "seqjax.cells.dropout(cell, input_rate=rate, key=key)"),
    "recurrent_dropout": (0.2, "seqjax.cells.dropout(cell, recurrent_rate=rate, key=key)"),
    "key": (None, "seqjax.cells.dropout(cell, ..., key=key)"),
    "unroll": (2, "solver=seqjax.solvers.Sequential(unroll=k)"),
    "bptt": ("fused", "gradient=seqjax.gradients.Auto()"),
    "truncate": (3, "gradient=seqjax.gradients.Truncate(every=k)"),
    "remat": (True, "gradient=seqjax.gradients.Remat(every=k)"),
}


@pytest.mark.parametrize("fn", [sj.unroll, sj.trajectory], ids=["unroll", "trajectory"])
@pytest.mark.parametrize("name", list(OLD_KEYWORDS))
def test_old_keywords_name_the_new_spelling(fn, name):
    cell, params, xs = _setup(sj.rnn(H))
    value, spelling = OLD_KEYWORDS[name]
    with pytest.raises(TypeError, match=rf"no longer takes {name}=.*{re.escape(spelling)}"):
        fn(cell, params, xs, **{name: value})
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        fn(cell, params, xs, bogus=1)


def test_sequence_mask():
    m = sj.sequence_mask(jnp.array([0, 2, 4]), 4)
    np.testing.assert_array_equal(m, np.array([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool))


def test_dropout_of_a_stack_drops_h_not_c_layer_by_layer():
    """The h rule holds per layer of a stack: with h = 0 and c != 0, recurrent dropout of the
    state changes nothing (c is never dropped), so the step equals the plain stack's."""
    cell = sj.stack([sj.lstm(3), sj.lstm(2)])
    params = cell.init(jax.random.key(0), 4)
    carry = cell.initial_carry(params, (5,))
    carry = tuple(c._replace(c=jnp.full(c.c.shape, 0.7)) for c in carry)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    dropped = sj.cells.dropout(cell, recurrent_rate=0.5, key=jax.random.key(2))
    step_d, step = jax.jit(dropped.step), jax.jit(cell.step)  # one compile each, two calls
    np.testing.assert_allclose(step_d(params, carry, x)[1], step(params, carry, x)[1], rtol=1e-6)
    carry_h = tuple(c._replace(h=jnp.ones(c.h.shape)) for c in carry)
    assert not np.allclose(step_d(params, carry_h, x)[1], step(params, carry_h, x)[1])


def test_dropout_keys_are_checked_when_built():
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        sj.cells.dropout(sj.lstm(3), input_rate=0.1, key=0)
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        sj.stack([sj.rnn(3), sj.rnn(3)], dropout=0.2, key=np.zeros(3))
    sj.cells.dropout(sj.lstm(3), input_rate=0.1, key=jax.random.PRNGKey(0))  # legacy keys work


def test_solver_and_nnx_messages():
    assert sj.solvers.Sequential(unroll=np.int64(2)).unroll == 2
    cell = sj.rnn(3)
    params = cell.init(jax.random.key(0), 2)
    with pytest.raises(TypeError, match=r"gates come from a trajectory"):
        sj.as_layer(cell).apply(params, jnp.ones((1, 4, 2)), gates=True)
