"""Tests of seqjax.bptt and the gradient strategies of unroll (``gradient=``: ``Auto()``,
``Fused()``, ``Autodiff()``, ``Remat(k)``, ``Truncate(k, base=...)``).

References: autodiff through the plain scan (``gradient=Autodiff()``, itself tested against NumPy
loops in the core tests), float64 NumPy loops written from the BPTT equations (truncation,
gradient norms of a linear RNN), explicit Python loops with ``stop_gradient`` (chunked TBPTT),
and per-step ``jax.grad`` of the loss as a function of one step's state (LSTM gradient norms).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj
from seqjax.bptt import GradientNorms, chunk_stream, fused_supported, gradient_norms, tbptt
from seqjax.gradients import Auto, Autodiff, Fused, Remat, Truncate
from seqjax.solvers import Sequential

B, T, I, H = 3, 7, 4, 5


def _rel(a, b):
    """Largest relative error over the leaves, relative to each leaf's largest entry."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)) for x, y in zip(la, lb))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def _setup(cell, dtype, *, batch=(B,), seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    p = _cast(cell.init(ks[0], I), dtype)
    xs = jax.random.normal(ks[1], batch + (T, I), dtype)
    c0 = jax.tree_util.tree_map(
        lambda a: jax.random.normal(ks[2], a.shape, dtype), cell.initial_carry(p, batch)
    )
    return p, xs, c0, ks


def _strategy(base, truncate=None):
    """``base``, or ``Truncate(truncate, base=base)`` (the option dicts below name truncation
    as ``truncate``: the same cut points, computed by each base)."""
    return base if truncate is None else Truncate(truncate, base=base)


def _unroll(cell, p, xs, base, *, truncate=None, **kw):
    return sj.unroll(cell, p, xs, gradient=_strategy(base, truncate), **kw)


def _grads(cell, p, xs, c0, base, w, **kw):
    """Gradients wrt params, xs and the initial carry of a loss using ys and the final carry."""

    def loss(p, xs, c0):
        c, ys = _unroll(cell, p, xs, base, carry=c0, **kw)
        return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree_util.tree_leaves(c))

    # jitted: one compile (eager value_and_grad through unroll compiles each op on its own)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(p, xs, c0)


OPTIONS = {
    "plain": {},
    "reverse": {"reverse": True},
    "lengths": {"lengths": np.array([7, 3, 0])},
    "lengths_reverse": {"lengths": np.array([2, 7, 5]), "reverse": True},
    "mask": {"mask": np.array([[1, 0, 1, 1, 0, 1, 1]] * B, bool)},
    "resets": {"resets": np.array([[0, 0, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0], [0] * 7], bool)},
    "resets_lengths_reverse": {
        "resets": np.array([[0, 0, 1, 0, 0, 1, 0]] * B, bool),
        "lengths": np.array([6, 2, 7]),
        "reverse": True,
    },
    "truncate": {"truncate": 3},
    "truncate_reverse": {"truncate": 2, "reverse": True},
    "unroll2": {"solver": Sequential(unroll=2)},
}


# --------------------------------------------------------------------------- fused == autodiff


# The default run covers every cell under the combined options, and each other option on one
# cell (the plain call of every cell: tests/test_contract.py's kernel[plain]); --runslow adds
# every option alone on every cell.
FAST_CASES = {
    ("rnn", "resets_lengths_reverse"),
    ("lstm", "resets_lengths_reverse"),
    ("gru", "resets_lengths_reverse"),
    ("rnn", "plain"),
    ("lstm", "mask"),
    ("gru", "truncate_reverse"),
}


@pytest.mark.parametrize(
    "name,opt",
    [
        (n, o) if (n, o) in FAST_CASES else pytest.param(n, o, marks=pytest.mark.slow)
        for o in OPTIONS
        for n in ("rnn", "lstm", "gru")
    ],
)
def test_fused_matches_autodiff_float64(name, opt, x64):
    """Float64: the custom VJP equals autodiff of the plain scan to rounding (~1e-15 relative),
    for gradients wrt params, inputs and the initial carry, and the forward values agree."""
    cell = {"rnn": sj.rnn(H), "lstm": sj.lstm(H, hidden_bias=True), "gru": sj.gru(H)}[name]
    assert fused_supported(cell)
    p, xs, c0, ks = _setup(cell, jnp.float64)
    w = jax.random.normal(ks[3], (B, T, H), jnp.float64)
    va, ga = _grads(cell, p, xs, c0, Autodiff(), w, **OPTIONS[opt])
    vf, gf = _grads(cell, p, xs, c0, Fused(), w, **OPTIONS[opt])
    assert abs(float(va - vf)) < 1e-12 * max(1.0, abs(float(va)))
    assert _rel(gf, ga) < 1e-12


@pytest.mark.parametrize(
    "cell",
    [
        pytest.param(sj.rnn(H, activation="relu"), marks=pytest.mark.slow),  # leaky_relu's kink, slope 0
        sj.rnn(H, activation="leaky_relu", hidden_bias=True),
        sj.rnn(H, activation="identity"),
        sj.rnn(H, activation="sigmoid"),
        pytest.param(sj.irnn(H), marks=pytest.mark.slow),  # relu with other init
        pytest.param(sj.lstm(H, forget_bias=1.0), marks=pytest.mark.slow),  # a bias value
    ],
    ids=["relu", "leaky_relu", "identity", "sigmoid", "irnn", "lstm_fb"],
)
def test_fused_other_variants_float64(cell, x64):
    p, xs, c0, ks = _setup(cell, jnp.float64, seed=1)
    w = jax.random.normal(ks[3], (B, T, H), jnp.float64)
    kw = {"lengths": np.array([7, 4, 1])}
    va, ga = _grads(cell, p, xs, c0, Autodiff(), w, **kw)
    vf, gf = _grads(cell, p, xs, c0, Fused(), w, **kw)
    assert _rel(gf, ga) < 1e-12


@pytest.mark.parametrize(
    "name", ["lstm", pytest.param("rnn", marks=pytest.mark.slow), pytest.param("gru", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize(
    "opt",
    [
        "lengths_reverse",
        pytest.param("plain", marks=pytest.mark.slow),
        pytest.param("resets", marks=pytest.mark.slow),
    ],
)
def test_fused_matches_autodiff_float32(name, opt):
    """Float32 on random inputs: relative error < 1e-5 (the issue's bar; both paths round
    differently, ~1e-7 per operation over T = 7 steps)."""
    cell = {"rnn": sj.rnn(H), "lstm": sj.lstm(H), "gru": sj.gru(H)}[name]
    p, xs, c0, ks = _setup(cell, jnp.float32, seed=2)
    w = jax.random.normal(ks[3], (B, T, H))
    (_, ga), (_, gf) = (_grads(cell, p, xs, c0, m, w, **OPTIONS[opt]) for m in (Autodiff(), Fused()))
    assert _rel(gf, ga) < 1e-5
    # forward outputs of both paths agree
    ca, ya = jax.jit(lambda p, xs, c0: _unroll(cell, p, xs, Autodiff(), carry=c0, **OPTIONS[opt]))(p, xs, c0)
    cf, yf = jax.jit(lambda p, xs, c0: _unroll(cell, p, xs, Fused(), carry=c0, **OPTIONS[opt]))(p, xs, c0)
    assert _rel((cf, yf), (ca, ya)) < 1e-5


@pytest.mark.slow
def test_fused_trajectory_time_major_and_no_batch(x64):
    """trajectory (gradient through the whole carry trajectory), time_axis=0, and inputs
    with no batch axis or two batch axes, all against autodiff."""
    cell = sj.lstm(H)
    for batch, ta in [((), -2), ((2, 3), -2), ((2,), 0)]:
        p = _cast(cell.init(jax.random.key(0), I), jnp.float64)
        xs = jax.random.normal(jax.random.key(1), batch + (T, I), jnp.float64)
        if ta == 0:
            xs = jnp.moveaxis(xs, -2, 0)

        def loss(p, xs, mode):
            tr = sj.trajectory(cell, p, xs, gradient=mode, time_axis=ta)
            return jnp.sum(tr.ys**2) + jnp.sum(jnp.cos(tr.carries.c)) + jnp.sum(tr.carries.h)

        ga = jax.grad(loss, argnums=(0, 1))(p, xs, Autodiff())
        gf = jax.grad(loss, argnums=(0, 1))(p, xs, Fused())
        assert _rel(gf, ga) < 1e-12


def test_fused_input_dropout_matches_autodiff(x64):
    """Input dropout keeps the kernel (it runs on the masked inputs): Fused() == Autodiff()."""
    cell = sj.cells.dropout(sj.gru(H), input_rate=0.3, key=jax.random.key(5))
    assert cell.kernel is not None
    p, xs, c0, ks = _setup(cell, jnp.float64)
    w = jax.random.normal(ks[3], (B, T, H), jnp.float64)
    (_, ga), (_, gf) = (_grads(cell, p, xs, c0, m, w) for m in (Autodiff(), Fused()))
    assert _rel(gf, ga) < 1e-12


def test_fused_under_jit_and_vmap():
    cell = sj.lstm(H)
    p, xs, c0, ks = _setup(cell, jnp.float32)

    def loss(p, xs):
        return jnp.sum(sj.unroll(cell, p, xs)[1] ** 2)

    g_eager = jax.grad(loss)(p, xs)
    g_jit = jax.jit(jax.grad(loss))(p, xs)
    assert _rel(g_jit, g_eager) < 1e-6
    # vmap over a leading axis of sequences equals a Python loop over them
    per_seq = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(p, xs[:, None])
    grad_one = jax.jit(jax.grad(loss))  # one compile for the B single-sequence references
    for b in range(B):
        g_b = grad_one(p, xs[b : b + 1])
        assert _rel(jax.tree_util.tree_map(lambda a, b=b: a[b], per_seq), g_b) < 1e-5


def test_dispatch_auto_fused_and_fallbacks():
    """Auto() uses the custom VJP for built-in cells; user cells, gates, recurrent dropout,
    Remat and options the kernel does not accept fall back to autodiff; Fused() says why it
    cannot run."""
    cell = sj.gru(H)
    p, xs, _, _ = _setup(cell, jnp.float32)

    def jaxpr(c, run=sj.unroll, **kw):
        return str(jax.make_jaxpr(lambda p, xs: run(c, p, xs, **kw)[1])(p, xs))

    assert "custom_vjp_call" in jaxpr(cell)
    assert "custom_vjp_call" in jaxpr(cell, gradient=Auto())
    assert "custom_vjp_call" in jaxpr(cell, gradient=Truncate(2))
    assert "custom_vjp_call" in jaxpr(cell, run=sj.trajectory)  # trajectories of carries: kernel
    assert "custom_vjp_call" not in jaxpr(cell, gradient=Autodiff())
    assert "custom_vjp_call" not in jaxpr(cell, run=sj.trajectory, gates=True)
    assert "custom_vjp_call" not in jaxpr(cell, gradient=Remat())
    assert "custom_vjp_call" not in jaxpr(cell, gradient=Truncate(2, base=Remat(3)))
    rec = sj.cells.dropout(cell, recurrent_rate=0.3, key=jax.random.key(0))
    assert rec.kernel is None and "custom_vjp_call" not in jaxpr(rec)
    with pytest.raises(ValueError, match="no kernel capability"):
        sj.unroll(rec, p, xs, gradient=Fused())
    # a kernel that accepts no option: Auto() falls back when one is asked for, Fused() refuses
    narrow = cell._replace(kernel=sj.cells.Kernel(cell.kernel.run, frozenset()))
    mask = jnp.ones((B, T), bool)
    assert "custom_vjp_call" in jaxpr(narrow)
    assert "custom_vjp_call" not in jaxpr(narrow, mask=mask)
    with pytest.raises(ValueError, match=r"gradient=Fused\(\) cannot run here: .*does not accept 'mask'"):
        sj.unroll(narrow, p, xs, mask=mask, gradient=Fused())
    user = sj.Cell(cell.init, cell.initial_carry, cell.step)  # no meta: a user's cell
    assert not fused_supported(user)
    assert "custom_vjp_call" not in jaxpr(user)
    assert not fused_supported(sj.lstm(H, proj_size=2))
    # 0.2: a callable activation keeps the kernel (f' by a JVP at the saved pre-activation);
    # test_contract's check_cell compares its gradients with autodiff.
    assert fused_supported(sj.rnn(H, activation=jnp.sin))
    with pytest.raises(ValueError, match=r"gradient=Fused\(\) cannot run here: .*no kernel capability"):
        sj.unroll(user, p, xs, gradient=Fused())
    with pytest.raises(ValueError, match="gates were asked for"):
        sj.trajectory(cell, p, xs, gradient=Fused(), gates=True)
    with pytest.raises(TypeError, match="gradient must be a seqjax.gradients strategy"):
        sj.unroll(cell, p, xs, gradient="fast")
    with pytest.raises(ValueError, match=r"Truncate\(every=...\) must be a positive integer"):
        Truncate(0)
    with pytest.raises(ValueError, match=r"Remat\(every=...\) must be a positive integer"):
        Remat(-3)


def test_fused_stack(x64):
    layers = pytest.importorskip("seqjax.layers")
    cell = layers.stack([sj.lstm(5), sj.rnn(3)])
    assert fused_supported(cell)
    p = _cast(cell.init(jax.random.key(0), I), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64)
    c0 = jax.tree_util.tree_map(
        lambda a: jax.random.normal(jax.random.key(2), a.shape, jnp.float64), cell.initial_carry(p, (B,))
    )
    w = jax.random.normal(jax.random.key(3), (B, T, 3), jnp.float64)
    kw = {"lengths": np.array([7, 2, 5]), "reverse": True, "truncate": 2}
    (_, ga), (_, gf) = (_grads(cell, p, xs, c0, m, w, **kw) for m in (Autodiff(), Fused()))
    assert _rel(gf, ga) < 1e-12


def test_fused_bidirectional(x64):
    layers = pytest.importorskip("seqjax.layers")
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64)
    # bidirectional: two unroll calls (fused by default) == two autodiff unrolls by hand
    fwd_cell = bwd_cell = sj.lstm(H)
    bi = layers.bidirectional(fwd_cell, bwd_cell)
    pb = _cast(bi.init(jax.random.key(4), I), jnp.float64)
    lens = np.array([7, 3, 5])

    def loss_bi(pb, xs):
        return jnp.sum(jnp.tanh(bi.apply(pb, xs, lengths=lens)[1]))

    def loss_ref(pb, xs):
        _, yf = sj.unroll(fwd_cell, pb["fwd"], xs, lengths=lens, gradient=Autodiff())
        _, yb = sj.unroll(bwd_cell, pb["bwd"], xs, lengths=lens, reverse=True, gradient=Autodiff())
        return jnp.sum(jnp.tanh(jnp.concatenate([yf, yb], axis=-1)))

    g_bi = jax.jit(jax.grad(loss_bi, (0, 1)))(pb, xs)
    assert _rel(g_bi, jax.jit(jax.grad(loss_ref, (0, 1)))(pb, xs)) < 1e-12


# --------------------------------------------------------------------------- truncated BPTT


# every k and both bases with --runslow; by default each k once, each base twice
_FAST_TRUNCATE = {(1, "auto"), (2, "autodiff"), (3, "auto"), (7, "autodiff")}


def _linear_rnn(Hn=3, In=2, seed=0):
    cell = sj.rnn(Hn, activation="identity")
    p = _cast(cell.init(jax.random.key(seed), In), jnp.float64)
    return cell, p


@pytest.mark.parametrize(
    "k,base",
    [
        pytest.param(
            k, base, id=f"{k}-{name}", marks=() if (k, name) in _FAST_TRUNCATE else (pytest.mark.slow,)
        )
        for k in (1, 2, 3, 7)
        for base, name in ((Auto(), "auto"), (Autodiff(), "autodiff"))
    ],
)
def test_truncate_linear_rnn_hand_computation(base, k, x64):
    """Linear RNN h_t = h_{t-1} W + x_t U + b, loss sum_t <w_t, h_t>. The truncated error
    term restarts at every chunk boundary: delta_t = w_t + [t+1 inside the chunk] delta_{t+1} W^T,
    and dL/dW = sum_t h_{t-1}^T delta_t (NumPy float64 loop from these equations)."""
    cell, p = _linear_rnn()
    Tn = 7
    xs = np.asarray(jax.random.normal(jax.random.key(1), (2, Tn, 2), jnp.float64))
    w = np.asarray(jax.random.normal(jax.random.key(2), (2, Tn, 3), jnp.float64))

    def loss(p):
        return jnp.sum(sj.unroll(cell, p, xs, gradient=Truncate(k, base=base))[1] * w)

    g = jax.jit(jax.grad(loss))(p)
    W, U, b = (np.asarray(p[n]) for n in ("w_h", "w_x", "b"))
    hs = [np.zeros((2, 3))]
    for t in range(Tn):
        hs.append(hs[-1] @ W + xs[:, t] @ U + b)
    dW, dU, db = np.zeros_like(W), np.zeros_like(U), np.zeros_like(b)
    delta = np.zeros((2, 3))
    for t in reversed(range(Tn)):
        cut = (t + 1) % k == 0  # the carry entering step t+1 is stopped when (t+1) % k == 0
        delta = w[:, t] + (0.0 if cut else 1.0) * delta @ W.T
        dW += hs[t].T @ delta
        dU += xs[:, t].T @ delta
        db += delta.sum(0)
    np.testing.assert_allclose(g["w_h"], dW, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g["w_x"], dU, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g["b"], db, rtol=1e-12, atol=1e-12)
    if k < Tn:  # truncation really changed something
        g_full = jax.jit(jax.grad(lambda p: jnp.sum(sj.unroll(cell, p, xs)[1] * w)))(p)
        assert not np.allclose(g_full["w_h"], dW)
    # forward values are unchanged by truncation
    ys = jax.jit(lambda p: sj.unroll(cell, p, xs, gradient=Truncate(k))[1])(p)
    np.testing.assert_allclose(ys, np.stack(hs[1:], 1), rtol=1e-12)


def test_chunk_stream_shapes_and_errors():
    xs = jnp.arange(2 * 12 * 3.0).reshape(2, 12, 3)
    ch = chunk_stream(xs, 4)
    assert ch.shape == (3, 2, 4, 3)
    np.testing.assert_array_equal(ch[1], xs[:, 4:8])
    tm = chunk_stream(jnp.moveaxis(xs, 1, 0), 6, time_axis=0)
    assert tm.shape == (2, 6, 2, 3)
    np.testing.assert_array_equal(tm[1], jnp.moveaxis(xs[:, 6:], 1, 0))
    with pytest.raises(ValueError, match="does not divide"):
        chunk_stream(xs, 5)
    with pytest.raises(ValueError, match="positive integer"):
        chunk_stream(xs, 0)


@pytest.mark.parametrize("name", [pytest.param("lstm", marks=pytest.mark.slow), "rnn"])
def test_tbptt_matches_python_loop(name, x64):
    """Summed chunk gradients == a Python loop over chunks with an explicit stop_gradient on the
    carry (and == unroll(gradient=Truncate(chunk)) for a loss summed over steps)."""
    cell = sj.lstm(3) if name == "lstm" else sj.rnn(3)
    p = _cast(cell.init(jax.random.key(0), 2), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (2, 12, 2), jnp.float64)
    tg = jax.random.normal(jax.random.key(2), (2, 12, 3), jnp.float64)

    def loss_fn(ys, t):
        return jnp.sum((ys - t) ** 2)

    losses, grads, final = jax.jit(lambda p: tbptt(cell, p, xs, loss_fn, chunk=4, targets=tg))(p)
    c = cell.initial_carry(p, (2,))
    g_ref = jax.tree_util.tree_map(jnp.zeros_like, p)
    ref_losses = []

    def chunk_loss(p, c, x, t):
        c_new, ys = sj.unroll(cell, p, x, carry=jax.lax.stop_gradient(c), gradient=Autodiff())
        return loss_fn(ys, t), c_new

    chunk_grad = jax.jit(jax.value_and_grad(chunk_loss, has_aux=True))  # one compile, three chunks
    for n in range(3):
        sl = slice(4 * n, 4 * n + 4)
        (l_n, c), g_n = chunk_grad(p, c, xs[:, sl], tg[:, sl])
        ref_losses.append(l_n)
        g_ref = jax.tree_util.tree_map(jnp.add, g_ref, g_n)
    np.testing.assert_allclose(losses, np.array(ref_losses), rtol=1e-12)
    assert _rel(grads, g_ref) < 1e-12
    assert _rel(final, c) < 1e-12
    g_trunc = jax.jit(jax.grad(lambda p: loss_fn(sj.unroll(cell, p, xs, gradient=Truncate(4))[1], tg)))(p)
    assert _rel(grads, g_trunc) < 1e-12


def test_tbptt_with_update_runs_sgd_per_chunk(x64):
    cell = sj.gru(3)
    p = _cast(cell.init(jax.random.key(0), 2), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (2, 8, 2), jnp.float64)

    def loss_fn(ys):
        return jnp.sum(ys**2)

    def sgd(p, g, s):
        return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g), s + 1

    losses, p_new, steps, final = jax.jit(
        lambda p, xs: tbptt(cell, p, xs, loss_fn, chunk=4, update=sgd, state=jnp.asarray(0))
    )(p, xs)
    assert int(steps) == 2
    # reference: two explicit chunk updates
    c, q = cell.initial_carry(p, (2,)), p
    chunk_grad = jax.jit(
        jax.value_and_grad(
            lambda q, c, x: (lambda r: (loss_fn(r[1]), r[0]))(sj.unroll(cell, q, x, carry=c)), has_aux=True
        )
    )
    for n in range(2):
        sl = slice(4 * n, 4 * n + 4)
        (_, c), g = chunk_grad(q, jax.lax.stop_gradient(c), xs[:, sl])
        q = sgd(q, g, 0)[0]
    assert _rel(p_new, q) < 1e-12


# --------------------------------------------------------------------------- remat


@pytest.mark.parametrize(
    "remat",
    [
        Remat(),
        Remat(3),
        pytest.param(Remat(7), marks=pytest.mark.slow),
        pytest.param(Remat(10), marks=pytest.mark.slow),
    ],
    ids=["step", "3", "7", "10"],
)
def test_remat_gradients_identical(remat, x64):
    """Checkpointed gradients equal plain ones (k = 3 does not divide T = 7: padded segments)."""
    cell = sj.lstm(H)
    p, xs, c0, ks = _setup(cell, jnp.float64)
    w = jax.random.normal(ks[3], (B, T, H), jnp.float64)
    kw = {"lengths": np.array([7, 5, 2]), "reverse": True, "truncate": 3}
    va, ga = _grads(cell, p, xs, c0, Autodiff(), w, **kw)
    vr, gr = _grads(cell, p, xs, c0, remat, w, **kw)
    assert abs(float(va - vr)) < 1e-12
    assert _rel(gr, ga) < 1e-12
    # trajectories and time-major layout survive the segment reshapes
    tr_a = jax.jit(lambda p, xs: sj.trajectory(cell, p, xs, gradient=Autodiff()))(p, xs)
    tr_r = jax.jit(lambda p, xs: sj.trajectory(cell, p, xs, gradient=remat))(p, xs)
    assert _rel((tr_r.ys, tr_r.carries), (tr_a.ys, tr_a.carries)) < 1e-12


def _temp_bytes(cell, p, xs, **kw):
    def loss(p, xs):
        return jnp.sum(sj.unroll(cell, p, xs, **kw)[1] ** 2)

    return jax.jit(jax.grad(loss)).lower(p, xs).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_remat_memory_falls_at_T_10000():
    """Peak temporary memory of forward+backward at T = 10,000 (LSTM, H = 16, B = 4): plain
    autodiff keeps ~14 (T, B, H) arrays (gates, pre-activations, carries); per-step remat keeps
    the carries (h, c) plus what the loss needs; segments of 100 keep T/100 carries plus the
    O(T) arrays every variant needs (ys and its cotangent, 2 units). Expect >= 3x and >= 5x."""
    cell = sj.lstm(16)
    p = cell.init(jax.random.key(0), 4)
    xs = jnp.ones((4, 10_000, 4))
    plain = _temp_bytes(cell, p, xs, gradient=Autodiff())
    step = _temp_bytes(cell, p, xs, gradient=Remat())
    seg = _temp_bytes(cell, p, xs, gradient=Remat(100))
    unit = 10_000 * 4 * 16 * 4  # one (T, B, H) float32 array
    assert plain > 10 * unit
    assert plain / step > 3.0
    assert plain / seg > 5.0
    assert seg < 3 * unit


# --------------------------------------------------------------------------- gradient norms


def test_gradient_norms_linear_rnn_closed_form(x64):
    """Identity activation, h_t = h_{t-1} W + x_t U + b (row vectors).
    Sequence loss L = sum_t <w_t, h_t>: dL/dh_t = w_t + dL/dh_{t+1} W^T (float64 NumPy loop).
    Last-step loss L = <g, h_T>: dL/dh_t = g (W^T)^(T-t), so ||(W^T)^(T-t) applied to g||."""
    cell, p = _linear_rnn(Hn=4, In=2)
    Tn = 9
    xs = jax.random.normal(jax.random.key(1), (2, Tn, 2), jnp.float64)
    w = np.asarray(jax.random.normal(jax.random.key(2), (2, Tn, 4), jnp.float64))
    W = np.asarray(p["w_h"])
    gn = jax.jit(lambda p, xs: gradient_norms(cell, p, xs, lambda ys: jnp.sum(ys * w)))(p, xs)
    assert isinstance(gn, GradientNorms) and gn.norms.shape == (2, Tn)
    ref = np.zeros((2, Tn))
    d = np.zeros((2, 4))
    for t in reversed(range(Tn)):
        d = w[:, t] + d @ W.T
        ref[:, t] = np.linalg.norm(d, axis=-1)
    np.testing.assert_allclose(gn.norms, ref, rtol=1e-12)
    np.testing.assert_allclose(gn.leaf_norms, ref, rtol=1e-12)  # one leaf: h

    g = w[:, -1]
    gl = jax.jit(lambda p, xs: gradient_norms(cell, p, xs, lambda ys: jnp.sum(ys[:, -1] * g), by_lag=True))(
        p, xs
    )
    ref_lag = np.stack(
        [np.linalg.norm(g @ np.linalg.matrix_power(W.T, k), axis=-1) for k in range(Tn)], axis=-1
    )
    np.testing.assert_allclose(gl.norms, ref_lag, rtol=1e-12)


@pytest.mark.slow
def test_gradient_norms_lstm_against_per_step_grads(x64):
    """LSTM: dL/d(h_t, c_t) by differentiating the loss as a function of the state at step t
    (rerun the rest of the sequence from it): T separate gradients, compared with the one-pass
    result per leaf and for the whole carry."""
    cell = sj.lstm(3)
    p = _cast(cell.init(jax.random.key(0), 2), jnp.float64)
    Tn = 4
    xs = jax.random.normal(jax.random.key(1), (2, Tn, 2), jnp.float64)
    tg = jax.random.normal(jax.random.key(2), (2, Tn, 3), jnp.float64)

    def loss_fn(ys):
        return jnp.sum((ys - tg) ** 2)

    gn = gradient_norms(cell, p, xs, loss_fn)
    tr = sj.trajectory(cell, p, xs, gradient=Autodiff())
    ys = tr.ys
    for t in range(Tn):

        def loss_from(s, t=t):
            _, ys_after = sj.unroll(cell, p, xs[:, t + 1 :], carry=s, gradient=Autodiff())
            all_ys = jnp.concatenate([ys[:, :t], s.h[:, None], ys_after], axis=1)
            return loss_fn(all_ys)

        s_t = sj.LSTMState(tr.carries.h[:, t], tr.carries.c[:, t])
        d = jax.grad(loss_from)(s_t)
        np.testing.assert_allclose(gn.leaf_norms.h[:, t], np.linalg.norm(d.h, axis=-1), rtol=1e-10)
        np.testing.assert_allclose(gn.leaf_norms.c[:, t], np.linalg.norm(d.c, axis=-1), rtol=1e-10)
        full = np.sqrt(np.sum(d.h**2, -1) + np.sum(d.c**2, -1))
        np.testing.assert_allclose(gn.norms[:, t], full, rtol=1e-10)


def test_gradient_norms_masked_steps_are_zero_and_jit():
    cell = sj.gru(3)
    p = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (2, 6, 2))
    lens = jnp.array([6, 3])
    f = jax.jit(lambda p, xs: gradient_norms(cell, p, xs, lambda ys: jnp.sum(ys**2), lengths=lens).norms)
    n = f(p, xs)
    assert n.shape == (2, 6)
    np.testing.assert_array_equal(n[1, 3:], 0.0)
    assert np.all(n[0] > 0) and np.all(n[1, :3] > 0)


def test_fused_grad_of_grad_and_forward_mode(x64):
    """Reverse-over-reverse works through the custom VJP and matches autodiff; forward mode
    is not available on the fused path (custom_vjp) but is on gradient=Autodiff()."""
    cell = sj.gru(3)
    p = _cast(cell.init(jax.random.key(0), 2), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 2), jnp.float64)

    def loss(p, mode):
        return jnp.sum(sj.unroll(cell, p, xs, gradient=mode)[1] ** 2)

    def gnorm(p, mode):
        return sum(jnp.sum(a**2) for a in jax.tree_util.tree_leaves(jax.grad(loss)(p, mode)))

    hess_f = jax.jit(jax.grad(lambda p: gnorm(p, Fused())))(p)
    assert _rel(hess_f, jax.jit(jax.grad(lambda p: gnorm(p, Autodiff())))(p)) < 1e-10
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda p: loss(p, Fused()), (p,), (p,))
    _, tangent = jax.jit(lambda p: jax.jvp(lambda p: loss(p, Autodiff()), (p,), (p,)))(p)
    assert np.isfinite(float(tangent))


def test_fused_learnable_carry(x64):
    """learnable_carry(gru): the gradient reaches the learned initial carry on the fused path."""
    cell = sj.learnable_carry(sj.gru(3), init=lambda key, c: jax.random.normal(key, c.shape, jnp.float64))
    assert fused_supported(cell)
    p = _cast(cell.init(jax.random.key(0), 2), jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 2), jnp.float64)

    def loss(p, mode):
        return jnp.sum(jnp.sin(sj.unroll(cell, p, xs, gradient=mode, lengths=jnp.array([5, 2]))[1]))

    ga = jax.jit(jax.grad(lambda p: loss(p, Autodiff())))(p)
    gf = jax.jit(jax.grad(lambda p: loss(p, Fused())))(p)
    assert float(jnp.max(jnp.abs(ga["carry0"]))) > 0
    assert _rel(gf, ga) < 1e-12


def test_gradient_norms_takes_autodiff_strategies():
    """``gradient_norms(..., gradient=Remat(k))`` equals the default (the same sums); a
    ``Truncate`` gives the truncated ``dL/ds_t`` (zero before the last cut for a last-step
    loss); ``Fused()`` is refused with a message."""
    cell = sj.lstm(3)
    p = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (2, 6, 2))

    def loss(ys):
        return jnp.sum(ys[:, -1] ** 2)

    def norms(**kw):
        return jax.jit(lambda p, xs: gradient_norms(cell, p, xs, loss, **kw).norms)(p, xs)

    base = norms()
    np.testing.assert_allclose(norms(gradient=Remat(2)), base, rtol=1e-6)
    cut = norms(gradient=Truncate(2, base=Autodiff()))
    np.testing.assert_allclose(cut[:, 4:], base[:, 4:], rtol=1e-6)
    assert np.all(cut[:, :4] == 0) and np.all(base[:, :4] > 0)
    with pytest.raises(ValueError, match="never a fused kernel"):
        gradient_norms(cell, p, xs, loss, gradient=Fused())
