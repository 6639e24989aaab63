"""Errors of ``seqjax.interop.TorchRNN``'s call name the argument the user passed (issue 16).

A wrong ``hx`` is reported as ``hx`` (``hx[0] (h_0)``, ``hx[1] (c_0)`` for the LSTM) with
what was got and the shape PyTorch's convention needs, ``(num_layers * num_directions, B,
H_out)``, never as the internal "carry"; ``xs``, ``lengths``, ``params`` and ``key`` name
themselves too. Every error here is raised before any computation, so the file is fast.
"""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from seqjax.interop import from_torch

torch = pytest.importorskip("torch")

I, H, P, B, T = 3, 4, 2, 2, 5
NEED = "PyTorch's convention needs (num_layers * num_directions, B, hidden_size)"


@pytest.fixture(scope="module")
def gru2():
    """A 2-layer GRU (time-major): ``hx`` must be ``(2, B, H)``."""
    torch.manual_seed(0)
    return from_torch(torch.nn.GRU(I, H, num_layers=2))


@pytest.fixture(scope="module")
def lstm_proj():
    """A bidirectional LSTM with ``proj_size``: ``h_0: (2, B, P)``, ``c_0: (2, B, H)``."""
    torch.manual_seed(1)
    return from_torch(torch.nn.LSTM(I, H, proj_size=P, bidirectional=True, batch_first=True))


def _m(text):
    return re.escape(text)


XS = jnp.ones((T, B, I))


@pytest.mark.parametrize(
    "hx,message",
    [
        (jnp.zeros((2, 3, H)), f"hx has shape (2, 3, 4) but {NEED} = (2, 2, 4)"),  # batch
        (jnp.zeros((2, B, 5)), f"hx has shape (2, 2, 5) but {NEED} = (2, 2, 4)"),  # size
        (jnp.zeros((1, B, H)), f"hx has shape (1, 2, 4) but {NEED} = (2, 2, 4)"),  # layers
        (jnp.zeros((2, H)), "hx has shape (2, 4) but PyTorch's convention needs"),  # no batch axis
        (jnp.zeros(()), "hx has shape () but PyTorch's convention needs"),
        ((jnp.zeros((2, B, H)),) * 2, "hx must be one array h_0 of shape (num_layers * num_directions, B"),
    ],
    ids=["batch", "hidden", "layers", "missing-batch-axis", "scalar", "lstm-pair-for-gru"],
)
def test_gru_hx_errors_name_hx_and_torch_shape(gru2, hx, message):
    params, model = gru2
    with pytest.raises(ValueError, match=_m(message)) as info:
        model(params, XS, hx)
    assert "carry" not in str(info.value)


def test_gru_hx_type_dtype_and_unbatched_errors(gru2):
    params, model = gru2
    with pytest.raises(TypeError, match=r"hx must be an array .* got a value of type str"):
        model(params, XS, "h0")
    with pytest.raises(TypeError, match=r"hx has dtype int32 but must be floating"):
        model(params, XS, jnp.zeros((2, B, H), jnp.int32))
    with pytest.raises(
        ValueError,
        match=_m("hx has shape (2, 1, 4) but PyTorch's convention needs (num_layers * num_directions, ")
        + r"hidden_size\) = \(2, 4\).*unbatched xs \(T, I\), hx has no batch axis",
    ):
        model(params, XS[:, 0], jnp.zeros((2, 1, H)))


def test_lstm_hx_errors_name_h0_c0_and_proj_size(lstm_proj):
    params, model = lstm_proj
    xs = jnp.ones((B, T, I))  # batch_first
    h0, c0 = jnp.zeros((2, B, P)), jnp.zeros((2, B, H))
    with pytest.raises(
        ValueError, match=r"hx must be a pair \(h_0, c_0\) for an LSTM.*got one array of shape \(2, 2, 2\)"
    ):
        model(params, xs, h0)
    with pytest.raises(ValueError, match=r"hx must be a pair .* got a tuple of length 3"):
        model(params, xs, (h0, c0, c0))
    need_h = "(num_layers * num_directions, B, proj_size) = (2, 2, 2)"
    with pytest.raises(
        ValueError, match=_m(f"hx[0] (h_0) has shape (2, 2, 4) but PyTorch's convention needs {need_h}")
    ):
        model(params, xs, (jnp.zeros((2, B, H)), c0))
    with pytest.raises(ValueError, match=_m(f"hx[1] (c_0) has shape (2, 2, 2) but {NEED} = (2, 2, 4)")):
        model(params, xs, (h0, jnp.zeros((2, B, P))))
    # used to pass silently (only c_0[:2] was read)
    with pytest.raises(ValueError, match=_m(f"hx[1] (c_0) has shape (4, 2, 4) but {NEED} = (2, 2, 4)")):
        model(params, xs, (h0, jnp.zeros((4, B, H))))
    with pytest.raises(TypeError, match=_m("hx[1] (c_0) has dtype bool")):
        model(params, xs, (h0, jnp.zeros((2, B, H), bool)))
    # carry_from_torch on its own (no xs): any batch shape, but h_0 and c_0 must agree
    with pytest.raises(ValueError, match=_m("hx[0] (h_0) has batch shape (3,) but hx[1] (c_0) has (2,)")):
        model.carry_from_torch((jnp.zeros((2, 3, P)), c0))
    with pytest.raises(
        ValueError, match=_m("hx[0] (h_0) has shape (1, 2, 2) but PyTorch's convention needs")
    ):
        model.carry_from_torch((jnp.zeros((1, B, P)), c0))


def test_good_hx_from_torch_tensors(lstm_proj):
    """The PyTorch layout goes through, from tensors too (even ones that require grad)."""
    params, model = lstm_proj
    h0 = torch.randn(2, B, P, requires_grad=True)
    c0 = torch.randn(2, B, H)
    carry = model.carry_from_torch((h0, c0), batch_shape=(B,))
    np.testing.assert_array_equal(np.asarray(carry[0].bwd.h), h0.detach().numpy()[1])
    np.testing.assert_array_equal(np.asarray(carry[0].fwd.c), c0.numpy()[0])


def test_xs_lengths_params_key_errors_name_themselves(gru2):
    params, model = gru2
    with pytest.raises(
        TypeError, match=r"xs must be an array \(T, I\), \(T, B, I\).* got a value of type str"
    ):
        model(params, "xs")
    with pytest.raises(
        ValueError, match=_m("xs has shape (1, 5, 2, 3) but PyTorch's recurrent modules take")
    ):
        model(params, XS[None])
    with pytest.raises(ValueError, match=_m("xs has 4 features but the module has input_size=3")):
        model(params, jnp.ones((T, B, I + 1)))
    with pytest.raises(ValueError, match=_m("lengths has shape (3,) but needs the batch shape of xs, (2,)")):
        model(params, XS, lengths=jnp.array([5, 2, 4]))
    with pytest.raises(ValueError, match=r"lengths must be integers"):
        model(params, XS, lengths=jnp.array([5.0, 2.0]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\]"):
        model(params, XS, lengths=jnp.array([9, 2]))
    with pytest.raises(
        ValueError,
        match=_m("params must be a tuple of 2 per-layer params (from_torch's), got a tuple of length 1"),
    ):
        model(params[:1], XS)
    with pytest.raises(
        ValueError, match=r"TorchRNN: key must be a PRNG key such as jax.random.key\(0\), got int"
    ):
        model(params, XS, key=3)
