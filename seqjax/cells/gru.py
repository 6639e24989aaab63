r"""The GRU in PyTorch's convention: gate equations written once; step, Jacobian, diagonal
and fused kernel from them.

With gate order ``r, z, n``, ``a = x W_x + b`` and ``u = h W_h + b_h``:

```text
r = sigmoid(a_r + u_r)   z = sigmoid(a_z + u_z)   n = tanh(a_n + r * u_n)
h_t = (1 - z) * n + z * h_{t-1}
```

and their derivatives (``_bwd``):

```text
dn = d (1 - z)(1 - n^2)   dz = d (h_{t-1} - n) z(1-z)   dr = dn u_n r(1-r)
dL/da = [dr, dz, dn]      dL/du = [dr, dz, dn * r]      dL/dh_{t-1} = dL/du W_h^T + d * z
```
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax._util import bind
from seqjax.cells import _fused
from seqjax.cells._core import (
    Cell,
    CellMeta,
    check_carry_width,
    check_hidden,
    check_step_input,
    column_blocks,
    gated_params,
    zeros_carry,
)

__all__ = ["gru"]


def _weights(params):
    return params["w_x"], params["b"], params["w_h"], params["b_h"]


def _split(h):
    return (h,)


def _join(state):
    return state[0]


def _gate_values(a, u, H):
    rz = jax.nn.sigmoid(a[..., : 2 * H] + u[..., : 2 * H])
    u_n = u[..., 2 * H :]
    n = jnp.tanh(a[..., 2 * H :] + rz[..., :H] * u_n)
    return rz, n, u_n


def _fwd(a, u, state):
    (h,) = state
    H = h.shape[-1]
    rz, n, u_n = _gate_values(a, u, H)
    h_new = n + rz[..., H:] * (h - n)
    return (h_new,), jnp.concatenate([rz, n, u_n], axis=-1)


def _bwd(res, h_in, h_out, d):
    H = h_in.shape[-1]
    r, z, n, u_n = (res[..., k * H : (k + 1) * H] for k in range(4))
    d = d[0]
    dn = d * (1.0 - z) * (1.0 - n * n)
    dz = d * (h_in - n) * z * (1.0 - z)
    dr = dn * u_n * r * (1.0 - r)
    d_a = jnp.concatenate([dr, dz, dn], axis=-1)
    d_u = jnp.concatenate([dr, dz, dn * r], axis=-1)
    return d_a, d_u, (d * z,)


def _du_from_da(d_a, res):
    """``dL/du = [dr, dz, dn * r]`` from ``dL/da = [dr, dz, dn]`` and the saved ``r``."""
    H = d_a.shape[-1] // 3
    return jnp.concatenate([d_a[..., : 2 * H], d_a[..., 2 * H :] * res[..., :H]], axis=-1)


def _check(params, state, x, *, hidden_size):
    (h,) = state
    check_step_input("gru", x, params["w_x"].shape[0], h.shape[:-1])
    check_carry_width("gru", "h", h, hidden_size)


def _init(key, input_size, *, hidden_size, kernel_init, recurrent_init, bias_init):
    return gated_params(key, input_size, hidden_size, 3, kernel_init, recurrent_init, bias_init, True)


def _initial_carry(params, batch_shape=(), *, hidden_size):
    return zeros_carry(params, batch_shape, hidden_size)[0]


def _gates(params, carry, x, *, math):
    a, u, _ = _fused._project(math, params, x, carry)
    H = carry.shape[-1]
    rz, n, _ = _gate_values(a, u, H)
    return {"r": rz[..., :H], "z": rz[..., H:], "n": n}


def gru(hidden_size: int, *, kernel_init=None, recurrent_init=None, bias_init=None) -> Cell:
    r"""Gated recurrent unit in PyTorch's convention (Cho et al. 2014).

    With gate order ``r, z, n`` (PyTorch's):

    ```text
    r = sigmoid(x W_xr + b_r + h W_hr + b_hr)
    z = sigmoid(x W_xz + b_z + h W_hz + b_hz)
    n = tanh(x W_xn + b_n + r * (h W_hn + b_hn))     # reset applied after W_hn h + b_hn
    h_t = (1 - z) * n + z * h_{t-1}
    ```

    This is ``torch.nn.GRU`` exactly (and Flax's linen ``GRUCell``, which has
    ``b_hr = b_hz = 0``). The original paper applies the reset before the matmul,
    ``(r * h) W_hn``; that variant is not this cell.

    Params (a dict): ``w_x: (I, 3H)``, ``w_h: (H, 3H)``, ``b: (3H,)`` (input side),
    ``b_h: (3H,)`` (hidden side; its ``n`` block sits inside the reset product).

    Carry: ``h: (*batch, H)``. Capabilities: output, Jacobian, diagonal, fused kernel, gates,
    ``recurrent_blocks``: ``{"r": W_hr, "z": W_hz, "n": W_hn}``, the ``(H, H)`` column blocks
    of ``w_h``. For ``r`` and ``z`` the block is ``d net/d h_{t-1}`` transposed; the candidate's
    recurrent term is ``r * (h W_hn + b_hn)``, so its block ``W_hn`` is the matrix *inside*
    the reset product: ``d net_n / d h_{t-1} = diag(r) W_hn^T + diag(h W_hn + b_hn) dr/dh``,
    and ``W_hn`` is the part a fully open reset gate (``r = 1``) passes.

    Args:
      hidden_size: ``H``.
      kernel_init: initialiser ``(key, shape, dtype)`` of ``w_x``; default PyTorch's uniform.
      recurrent_init: initialiser of ``w_h``; default PyTorch's uniform.
      bias_init: initialiser of the biases; default PyTorch's uniform.

    Returns:
      A ``Cell``; ``gates`` returns ``{"r", "z", "n"}`` activations ``(*batch, H)``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.gru(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> print(params["w_x"].shape, params["w_h"].shape, params["b_h"].shape)   # blocks r, z, n
      (3, 12) (4, 12) (12,)
      >>> h, ys = seqjax.unroll(cell, params, jnp.ones((2, 5, 3)))
      >>> print(h.shape, ys.shape)
      (2, 4) (2, 5, 4)
      >>> sorted(cell.gates(params, h, jnp.ones((2, 3))))
      ['n', 'r', 'z']
    """
    H = check_hidden(hidden_size)
    math = _fused.GateMath(
        bind(_weights),
        bind(_split),
        bind(_join),
        bind(_fwd),
        bind(_bwd),
        du_from_da=bind(_du_from_da),
        uses_h_out=False,
    )
    return _fused.affine_cell(
        bind(
            _init, hidden_size=H, kernel_init=kernel_init, recurrent_init=recurrent_init, bias_init=bias_init
        ),
        bind(_initial_carry, hidden_size=H),
        math,
        check=bind(_check, hidden_size=H),
        gates=bind(_gates, math=math),
        recurrent_blocks=bind(column_blocks, names=("r", "z", "n")),
        meta=CellMeta("gru", H, ()),
    )
