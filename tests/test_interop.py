"""seqjax.interop against PyTorch's own recurrent modules (skips cleanly without torch).

References: ``torch.nn.RNN`` (tanh, relu), ``nn.LSTM`` (with and without ``proj_size``),
``nn.GRU``, run in float64 on the same weights and inputs; unequal lengths go through
``pack_padded_sequence``/``pad_packed_sequence``. Gradients are PyTorch's autograd.

Tolerances: both sides compute in float64 with the same operations up to summation
order, so differences are a few ulps times the depth of the network; 1e-10 absolute
leaves a wide margin while any wrong weight, gate order or transpose gives O(0.1) errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqjax import LSTMState, unroll
from seqjax.interop import from_torch, to_torch

torch = pytest.importorskip("torch")

ATOL = 1e-10

MODULES = {
    "rnn_tanh": lambda I, H, **kw: torch.nn.RNN(I, H, nonlinearity="tanh", **kw),
    "rnn_relu": lambda I, H, **kw: torch.nn.RNN(I, H, nonlinearity="relu", **kw),
    "lstm": lambda I, H, **kw: torch.nn.LSTM(I, H, **kw),
    "gru": lambda I, H, **kw: torch.nn.GRU(I, H, **kw),
}

I, H, B, T = 3, 4, 3, 5
LENGTHS = [5, 2, 4]  # unequal, one full-length


def _np(t):
    return t.detach().cpu().numpy()


def _torch_run(m, x, lengths, hx, weights_out, weights_h):
    """Forward + backward in PyTorch through a packed sequence; returns outputs, states, grads."""
    x = x.clone().requires_grad_(True)
    m.zero_grad()
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        x, torch.tensor(lengths), batch_first=m.batch_first, enforce_sorted=False
    )
    out, state = m(packed, hx)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=m.batch_first, total_length=T)
    states = state if isinstance(state, tuple) else (state,)
    loss = (out * weights_out).sum() + sum((s * w).sum() for s, w in zip(states, weights_h))
    loss.backward()
    grads = {k: _np(p.grad) for k, p in m.named_parameters()}
    return _np(out), [_np(s) for s in states], _np(x.grad), grads


# Every (mode, layers, direction) runs under --runslow; the default run keeps a subset that
# still covers each mode, 1 and 2 layers, and both directions.
FAST = {("lstm", 2, True), ("gru", 1, True), ("rnn_relu", 2, False), ("rnn_tanh", 1, False)}
MATRIX = [
    pytest.param(mode, layers, bidir, marks=() if (mode, layers, bidir) in FAST else pytest.mark.slow)
    for mode in ["rnn_tanh", "rnn_relu", "lstm", "gru"]
    for layers in [1, 2]
    for bidir in [False, True]
]


@pytest.mark.parametrize("mode,num_layers,bidirectional", MATRIX)
def test_outputs_states_and_gradients_match_torch(x64, mode, num_layers, bidirectional):
    torch.manual_seed(hash((mode, num_layers, bidirectional)) % 1000)
    batch_first = bidirectional  # cover both layouts
    m = MODULES[mode](
        I, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first
    ).double()
    params, model = from_torch(m)
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float64

    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(*shape, dtype=torch.float64)
    D = 2 if bidirectional else 1
    out_shape = (B, T, D * H) if batch_first else (T, B, D * H)
    w_out = torch.randn(*out_shape, dtype=torch.float64)
    n_states = 2 if mode == "lstm" else 1
    w_h = [torch.randn(num_layers * D, B, H, dtype=torch.float64) for _ in range(n_states)]
    # a nonzero initial state checks the h_0 / c_0 layout too
    hx_t = tuple(0.5 * torch.randn(num_layers * D, B, H, dtype=torch.float64) for _ in range(n_states))
    hx_t = hx_t if mode == "lstm" else hx_t[0]

    out_t, states_t, gx_t, grads_t = _torch_run(m, x, LENGTHS, hx_t, w_out, w_h)

    lengths = jnp.asarray(LENGTHS)
    hx = jax.tree_util.tree_map(lambda t: jnp.asarray(_np(t)), hx_t)
    w_out_j = jnp.asarray(_np(w_out))
    w_h_j = [jnp.asarray(_np(w)) for w in w_h]

    def loss(p, xs):
        out, state = model(p, xs, hx, lengths=lengths)
        states = state if isinstance(state, tuple) else (state,)
        return jnp.sum(out * w_out_j) + sum(jnp.sum(s * w) for s, w in zip(states, w_h_j)), (out, states)

    (_, (out, states)), (g_p, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, jnp.asarray(_np(x))
    )
    np.testing.assert_allclose(np.asarray(out), out_t, rtol=0, atol=ATOL)
    for s, s_t in zip(states, states_t):
        np.testing.assert_allclose(np.asarray(s), s_t, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(g_x), gx_t, rtol=0, atol=ATOL)
    g_named = to_torch(g_p, model)  # the same name/transposition map as the weights
    assert set(g_named) == set(grads_t)
    for k, g in grads_t.items():
        np.testing.assert_allclose(g_named[k].numpy(), g, rtol=0, atol=ATOL, err_msg=k)


def test_lstm_projection_matches_torch(x64):
    torch.manual_seed(1)
    m = torch.nn.LSTM(I, 5, num_layers=2, proj_size=2, bidirectional=True).double()
    params, model = from_torch(m)
    assert params[0]["fwd"]["w_p"].shape == (5, 2)
    x = torch.randn(T, B, I, dtype=torch.float64)
    out_t, (h_t, c_t) = m(x)
    out, (h, c) = model(params, jnp.asarray(_np(x)))
    np.testing.assert_allclose(np.asarray(out), _np(out_t), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(h), _np(h_t), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(c), _np(c_t), rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", [pytest.param("rnn_tanh", marks=pytest.mark.slow), "lstm"])
def test_unidirectional_stack_cell_matches_torch_in_one_scan(x64, mode):
    """model.cell (one stack Cell, one scan) gives the module's outputs and final states."""
    torch.manual_seed(2)
    m = MODULES[mode](I, H, num_layers=2).double()
    params, model = from_torch(m)
    x = torch.randn(T, B, I, dtype=torch.float64)
    out_t, state_t = m(x)
    carry, ys = unroll(model.cell, params, jnp.asarray(_np(x)), time_axis=0)
    np.testing.assert_allclose(np.asarray(ys), _np(out_t), rtol=0, atol=ATOL)
    h_n = model.carry_to_torch(carry)
    h_n = h_n[0] if mode == "lstm" else h_n
    h_t = state_t[0] if mode == "lstm" else state_t
    np.testing.assert_allclose(np.asarray(h_n), _np(h_t), rtol=0, atol=ATOL)
    if mode == "lstm":
        assert isinstance(carry[1], LSTMState)


@pytest.mark.slow
def test_unbatched_input_matches_torch(x64):
    torch.manual_seed(3)
    m = torch.nn.GRU(I, H, num_layers=2, bidirectional=True).double()
    params, model = from_torch(m)
    x = torch.randn(T, I, dtype=torch.float64)
    out_t, h_t = m(x)
    out, h = model(params, jnp.asarray(_np(x)))
    np.testing.assert_allclose(np.asarray(out), _np(out_t), rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(h), _np(h_t), rtol=0, atol=ATOL)


CONFIGS = [
    ("rnn_tanh", dict(num_layers=2, bidirectional=True)),
    ("rnn_relu", dict(num_layers=1, bias=False)),
    ("lstm", dict(num_layers=2, bidirectional=True, proj_size=2)),
    ("lstm", dict(num_layers=3, bias=False)),
    ("gru", dict(num_layers=2, bidirectional=True)),
    ("gru", dict(num_layers=1, bias=False)),
]


@pytest.mark.parametrize("mode,kw", CONFIGS)
def test_round_trip_gives_back_the_same_state_dict(x64, mode, kw):
    torch.manual_seed(4)
    m = MODULES[mode](I, H, **kw).double()
    ref = m.state_dict()
    for source in (m, ref):
        params, model = from_torch(source, mode=mode)
        sd = to_torch(params, model)
        assert list(sd) == list(ref)  # same keys, same order
        for k in ref:
            assert sd[k].dtype == ref[k].dtype and sd[k].shape == ref[k].shape, k
            assert torch.equal(sd[k], ref[k]), k
    # and it loads into a fresh module
    fresh = MODULES[mode](I, H, **kw).double()
    fresh.load_state_dict(sd)
    x = torch.randn(T, B, I, dtype=torch.float64)
    assert torch.equal(fresh(x)[0], m(x)[0])


def test_float32_module_gives_float32_params_and_close_outputs():
    torch.manual_seed(5)
    m = torch.nn.LSTM(I, H, num_layers=2, batch_first=True)
    params, model = from_torch(m)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
    x = torch.randn(B, T, I)
    out_t, _ = m(x)
    out, _ = jax.jit(lambda p, xs: model(p, xs))(params, jnp.asarray(_np(x)))
    # float32 on both sides, different summation orders: ~1e-7 relative per op
    np.testing.assert_allclose(np.asarray(out), _np(out_t), rtol=1e-5, atol=1e-6)
    sd = to_torch(params, model)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_from_state_dict_checks_its_arguments():
    m = torch.nn.LSTM(I, H, num_layers=2)
    sd = m.state_dict()
    with pytest.raises(ValueError, match="mode"):
        from_torch(sd)
    with pytest.raises(ValueError, match="num_layers"):
        from_torch(sd, mode="lstm", num_layers=3)
    with pytest.raises(ValueError, match="4\\*H rows but mode 'gru'"):
        from_torch(sd, mode="gru")
    with pytest.raises(ValueError, match="mode"):
        from_torch(sd, mode="transformer")
    params, model = from_torch(sd, mode="lstm", num_layers=2, batch_first=True)
    assert model.batch_first and model.num_layers == 2 and not model.bidirectional


def test_to_torch_refuses_nonzero_bias_for_biasless_module():
    m = torch.nn.GRU(I, H, bias=False)
    params, model = from_torch(m)
    bad = ({**params[0], "b": params[0]["b"] + 1.0},)
    with pytest.raises(ValueError, match="bias=False"):
        to_torch(bad, model)


def test_dropout_only_with_a_key(x64):
    """Without a key the model is in evaluation mode (equals torch's eval()); with a key,
    dropout between layers changes the output and is reproducible."""
    torch.manual_seed(6)
    m = torch.nn.GRU(I, H, num_layers=2, dropout=0.5).double().eval()
    params, model = from_torch(m)
    assert model.dropout == 0.5
    x = torch.randn(T, B, I, dtype=torch.float64)
    out_t, _ = m(x)
    xj = jnp.asarray(_np(x))
    out, _ = model(params, xj)
    np.testing.assert_allclose(np.asarray(out), _np(out_t), rtol=0, atol=ATOL)
    train = jax.jit(lambda p, xs, k: model(p, xs, key=k)[0])
    out_a, out_b, out_c = (train(params, xj, jax.random.key(s)) for s in (0, 0, 1))
    assert np.array_equal(np.asarray(out_a), np.asarray(out_b))
    assert not np.allclose(np.asarray(out_a), np.asarray(out))
    assert not np.allclose(np.asarray(out_a), np.asarray(out_c))
