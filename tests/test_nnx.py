"""Flax NNX modules (seqjax.nnx): equal to the functional API, trainable under nnx.jit,
and the GRU reproduces torch.nn.GRU from ported weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_trees_close

import seqjax as sj
from seqjax.nnx import GRU, LSTM, RNN, Bidirectional, Recurrent, Stack

B, T, I, H = 3, 7, 4, 5
# float32, identical operations in the same order: agreement to a few ulps.
TOL = dict(rtol=1e-6, atol=1e-6)


def _xs(seed=0, shape=(B, T, I)):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize(
    "make_mod,make_cell",
    [
        (lambda r: RNN(I, H, rngs=r), lambda: sj.rnn(H)),
        (
            lambda r: RNN(I, H, activation="relu", hidden_bias=True, rngs=r),
            lambda: sj.rnn(H, activation="relu", hidden_bias=True),
        ),
        (lambda r: LSTM(I, H, rngs=r), lambda: sj.lstm(H)),
        (
            lambda r: LSTM(I, H, proj_size=2, hidden_bias=True, rngs=r),
            lambda: sj.lstm(H, proj_size=2, hidden_bias=True),
        ),
        (lambda r: GRU(I, H, rngs=r), lambda: sj.gru(H)),
        (lambda r: Recurrent(sj.mgu(H), I, rngs=r), lambda: sj.mgu(H)),
    ],
)
def test_module_equals_functional(make_mod, make_cell):
    mod = make_mod(nnx.Rngs(0))
    cell = make_cell()
    params = mod.to_params()
    # same keys and shapes as the functional init
    ref = cell.init(jax.random.key(1), I)
    assert set(params) == set(ref)
    for k in ref:
        assert params[k].shape == ref[k].shape
        assert isinstance(getattr(mod, k), nnx.Param)
    xs = _xs()
    lengths = jnp.array([7, 3, 0])
    for kw in [{}, {"lengths": lengths, "reverse": True}]:
        c_m, y_m = mod(xs, **kw)
        c_f, y_f = sj.unroll(cell, params, xs, **kw)
        assert_trees_close(y_m, y_f, **TOL)
        assert_trees_close(c_m, c_f, **TOL)
    # under nnx.jit too (for the gated cells; the plain RNN shares the code path)
    if not isinstance(mod, RNN):
        c_j, y_j = nnx.jit(lambda m, x: m(x, lengths=lengths))(mod, xs)
        # jit may fuse differently from eager: float32 rounding, a few ulps per step
        assert_trees_close(y_j, sj.unroll(cell, params, xs, lengths=lengths)[1], rtol=1e-5, atol=1e-5)


def test_module_forwards_unroll_options_and_trajectory():
    """``Recurrent.__call__`` forwards every option of ``unroll`` (``gradient``, ``solver``,
    ``mask``, ...), ``Recurrent.trajectory`` is ``seqjax.trajectory``, ``Bidirectional``
    forwards the options its layer takes; 0.1 keywords are refused with their new spelling."""
    mod = LSTM(I, H, rngs=nnx.Rngs(0))
    cell, params, xs = sj.lstm(H), mod.to_params(), _xs(6)
    mask = jnp.ones((B, T), bool).at[1, 2:5].set(False)
    kw = dict(mask=mask, resets=jnp.zeros((B, T), bool).at[0, 3].set(True), gradient=sj.gradients.Autodiff())
    assert_trees_close(mod(xs, **kw), sj.unroll(cell, params, xs, **kw), **TOL)
    solver = sj.solvers.Sequential(unroll=2)
    assert_trees_close(mod(xs, solver=solver), sj.unroll(cell, params, xs, solver=solver), **TOL)
    jaxpr = lambda **kw: str(jax.make_jaxpr(lambda x: mod(x, **kw)[1])(xs))
    assert "custom_vjp_call" in jaxpr() and "custom_vjp_call" not in jaxpr(gradient=sj.gradients.Autodiff())
    tr = mod.trajectory(xs, gates=True, lengths=jnp.array([7, 3, 5]))
    want = sj.trajectory(cell, params, xs, gates=True, lengths=jnp.array([7, 3, 5]))
    assert isinstance(tr, sj.Trajectory)
    assert_trees_close(tr, want, **TOL)
    assert mod.trajectory(xs).gates is None
    with pytest.raises(TypeError, match=r"no return_carries= option.*module.trajectory\(xs\)"):
        mod(xs, return_carries=True)
    with pytest.raises(TypeError, match=r"no gates= option.*module.trajectory\(xs, gates=True\)"):
        mod(xs, gates=True)
    with pytest.raises(TypeError, match=r"no longer takes recurrent_dropout=.*seqjax.cells.dropout"):
        mod(xs, recurrent_dropout=0.2, key=jax.random.key(0))
    bi = Bidirectional(GRU(I, H, rngs=nnx.Rngs(1)), GRU(I, H, rngs=nnx.Rngs(2)))
    _, y_bi = bi(xs, mask=mask, gradient=sj.gradients.Autodiff())
    _, y_f = sj.unroll(sj.gru(H), bi.fwd.to_params(), xs, mask=mask)
    _, y_b = sj.unroll(sj.gru(H), bi.bwd.to_params(), xs, mask=mask, reverse=True)
    # autodiff's scan against the kernel: float32 rounding apart
    assert_trees_close(y_bi, jnp.concatenate([y_f, y_b], -1), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"no longer takes bptt="):
        bi(xs, bptt="fused")


def test_from_params_roundtrip_and_weights_used():
    cell = sj.lstm(H, hidden_bias=True)
    params = cell.init(jax.random.key(3), I)
    mod = LSTM.from_params(params)
    for k in params:
        np.testing.assert_array_equal(np.asarray(mod.to_params()[k]), np.asarray(params[k]))
    xs = _xs(1)
    assert_trees_close(mod(xs)[1], sj.unroll(cell, params, xs)[1], **TOL)
    # a change to a Param changes the output (the module reads its Params, not a copy)
    mod.w_h[...] = mod.w_h[...] * 0.0
    assert_trees_close(mod(xs)[1], sj.unroll(cell, {**params, "w_h": params["w_h"] * 0.0}, xs)[1], **TOL)
    g = GRU.from_params(sj.gru(H).init(jax.random.key(0), I))
    assert g.hidden_size == H and g.input_size == I
    w = Recurrent.wrap(sj.rnn(H), sj.rnn(H).init(jax.random.key(0), I))
    assert w.input_size == I


def test_errors():
    with pytest.raises(ValueError, match="rngs"):
        LSTM(I, H)
    with pytest.raises(ValueError, match="shape"):
        Recurrent(sj.lstm(H), I + 1, params=sj.lstm(H).init(jax.random.key(0), I))
    with pytest.raises(ValueError, match="merge"):
        Bidirectional(RNN(I, H, rngs=nnx.Rngs(0)), RNN(I, H, rngs=nnx.Rngs(1)), merge="max")
    with pytest.raises(ValueError, match="key"):
        Stack([RNN(I, H, rngs=nnx.Rngs(0)), RNN(H, H, rngs=nnx.Rngs(0))], dropout=0.5)(
            _xs(), deterministic=False
        )


def test_nested_params_cell():
    cell = sj.learnable_carry(sj.rnn(H))
    mod = Recurrent(cell, I, rngs=nnx.Rngs(0))
    params = mod.to_params()
    xs = _xs(2)
    assert_trees_close(mod(xs)[1], sj.unroll(cell, params, xs)[1], **TOL)
    assert len(jax.tree_util.tree_leaves(nnx.state(mod, nnx.Param))) == len(jax.tree_util.tree_leaves(params))


def test_bidirectional_and_stack_equal_functional():
    rngs = nnx.Rngs(0)
    fwd, bwd = LSTM(I, H, rngs=rngs), GRU(I, H, rngs=rngs)
    bi = Bidirectional(fwd, bwd)
    top = RNN(2 * H, 3, rngs=rngs)
    net = Stack([bi, top])
    xs = _xs(4)
    lengths = jnp.array([7, 4, 1])
    carries, ys = net(xs, lengths=lengths)
    # reference written directly with unroll
    _, yf = sj.unroll(sj.lstm(H), fwd.to_params(), xs, lengths=lengths)
    _, yb = sj.unroll(sj.gru(H), bwd.to_params(), xs, lengths=lengths, reverse=True)
    c_top, y_top = sj.unroll(sj.rnn(3), top.to_params(), jnp.concatenate([yf, yb], -1), lengths=lengths)
    assert_trees_close(ys, y_top, **TOL)
    assert_trees_close(carries[1], c_top, **TOL)
    assert ys.shape == (B, T, 3)
    p = net.to_params()
    assert set(p[0]) == {"fwd", "bwd"}
    # and equals the functional layer given the module's params
    assert_trees_close(net.as_layer().apply(p, xs, lengths=lengths)[1], ys, **TOL)
    # sum merge
    bi_sum = Bidirectional(RNN(I, H, rngs=rngs), RNN(I, H, rngs=rngs), merge="sum")
    _, y_s = bi_sum(xs)
    y1 = sj.unroll(sj.rnn(H), bi_sum.fwd.to_params(), xs)[1]
    y2 = sj.unroll(sj.rnn(H), bi_sum.bwd.to_params(), xs, reverse=True)[1]
    assert_trees_close(y_s, y1 + y2, **TOL)


def test_stack_dropout():
    rngs = nnx.Rngs(0, dropout=1)
    net = Stack([RNN(I, H, rngs=rngs), RNN(H, H, rngs=rngs)], dropout=0.5, rngs=rngs)
    xs = _xs(5)
    net.eval()  # a fresh Stack is in training mode, as nnx.Dropout; eval() turns dropout off
    y_det = net(xs)[1]
    assert_trees_close(y_det, net.as_layer().apply(net.to_params(), xs, deterministic=True)[1], **TOL)
    y_r1, y_r2 = net(xs, deterministic=False)[1], net(xs, deterministic=False)[1]
    assert not np.allclose(np.asarray(y_r1), np.asarray(y_r2))  # rngs stream advances
    y_a = net(xs, deterministic=False, key=jax.random.key(0))[1]
    y_b = net(xs, deterministic=False, key=jax.random.key(0))[1]
    assert_trees_close(y_a, y_b, **TOL)
    assert not np.allclose(np.asarray(y_a), np.asarray(y_det))


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.rnn = LSTM(2, 8, forget_bias=1.0, rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, xs):
        carry, _ = self.rnn(xs)
        return self.out(carry.h)[:, 0]


def test_training_step_with_nnx_optimizer():
    model = _Model(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(16, 6, 2)), jnp.float32)
    ys = jnp.sum(xs[:, :, 0], axis=1) * 0.3
    traces = []

    @nnx.jit
    def step(model, opt, xs, ys):
        traces.append(1)

        def loss_fn(m):
            return jnp.mean((m(xs) - ys) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    # the gradient nnx computes equals jax.grad of the functional loss
    p_rnn = model.rnn.to_params()
    w, b = model.out.kernel[...], model.out.bias[...]

    def f_loss(p):
        carry, _ = sj.unroll(sj.lstm(8), p, xs)
        return jnp.mean(((carry.h @ w + b[None, :])[:, 0] - ys) ** 2)

    g_ref = jax.grad(f_loss)(p_rnn)
    g_nnx = nnx.grad(lambda m: jnp.mean((m(xs) - ys) ** 2))(model)
    for k in g_ref:
        assert_trees_close(g_nnx["rnn"][k][...], g_ref[k], rtol=1e-5, atol=1e-5)

    first = float(step(model, opt, xs, ys))
    for _ in range(20):
        last = float(step(model, opt, xs, ys))
    assert last < 0.5 * first
    assert len(traces) == 1  # compiled once


def test_gru_matches_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tg = torch.nn.GRU(I, H, batch_first=True).double()
    sd = {k: v.detach().numpy() for k, v in tg.state_dict().items()}
    params = {
        "w_x": jnp.asarray(sd["weight_ih_l0"].T),
        "w_h": jnp.asarray(sd["weight_hh_l0"].T),
        "b": jnp.asarray(sd["bias_ih_l0"]),
        "b_h": jnp.asarray(sd["bias_hh_l0"]),
    }
    xs = np.random.default_rng(0).normal(size=(B, T, I))
    with torch.no_grad():
        y_t, h_t = tg(torch.from_numpy(xs))
    from conftest import enable_x64

    with enable_x64():
        mod = GRU.from_params({k: v.astype(jnp.float64) for k, v in params.items()})
        carry, ys = mod(jnp.asarray(xs))
        # float64 on both sides: agreement to ~1e-12
        np.testing.assert_allclose(np.asarray(ys), y_t.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(carry), h_t.numpy()[0], rtol=1e-10, atol=1e-12)


def test_stack_module_forwards_unroll_options():
    """``Stack(...)(xs, mask=...)`` equals the functional ``stack_layers`` with the same option."""
    rngs = nnx.Rngs(0)
    net = Stack([LSTM(3, 4, rngs=rngs), GRU(4, 2, rngs=rngs)])
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
    mask = jnp.array([[1, 0, 1, 1, 1], [1, 1, 1, 0, 1]], bool)
    _, ys = net(xs, mask=mask)
    _, want = sj.stack_layers([sj.lstm(4), sj.gru(2)]).apply(net.to_params(), xs, mask=mask)
    assert_trees_close(ys, want, rtol=1e-6, atol=1e-6)
    _, plain = net(xs)
    assert not np.allclose(ys, plain)  # the mask reached the layers
