"""Recurrent cells as bundles of pure functions and the capabilities they carry.

The whole contract of a cell (``docs/design/cells.md`` has the reasoning):

```text
cell = Cell(init, initial_carry, step, *, output=..., jacobian=..., ...)
params = cell.init(key, input_size)              # a pytree of arrays
carry = cell.initial_carry(params, batch_shape)  # a pytree of zeros, leaves (*batch, ...)
carry, y_t = cell.step(params, carry, x_t)       # x_t: (*batch, input_size)
```

``step`` is exactly the body of a ``jax.lax.scan``; ``seqjax.unroll`` is the one place
that scans it. Params come first in every function so ``jax.grad`` differentiates them by
default. Matrices act on row vectors: ``x_t @ w_x`` with ``w_x: (I, G*H)``.

One module per family, each owning its step, its analytic Jacobian (and diagonal) and its
fused BPTT kernel: ``elman`` (rnn, irnn), ``lstm``, ``gru``, ``minimal`` (mgu, janet),
``windowed`` (tdnn, narx), ``linear`` (min_gru, min_lstm, lru: cells linear in their
state, with the ``linear_recurrence`` capability), ``wrappers`` (learnable_carry, dropout,
stack). A user's cell may carry none of the capabilities and still gets every feature of
seqjax through generic paths.
"""

from seqjax.cells._core import (
    CAPABILITIES,
    KERNEL_OPTIONS,
    Cell,
    CellMeta,
    Kernel,
    get_activation,
    wrap,
)
from seqjax.cells._fused import GateMath, affine_kernel
from seqjax.cells.elman import irnn, rnn
from seqjax.cells.gru import gru
from seqjax.cells.linear import LRUState, lru, min_gru, min_lstm
from seqjax.cells.lstm import LSTMState, lstm
from seqjax.cells.minimal import janet, mgu
from seqjax.cells.windowed import NARXState, narx, tdnn
from seqjax.cells.wrappers import dropout, learnable_carry, stack

__all__ = [
    "Cell",
    "CellMeta",
    "Kernel",
    "KERNEL_OPTIONS",
    "CAPABILITIES",
    "GateMath",
    "affine_kernel",
    "wrap",
    "LSTMState",
    "NARXState",
    "LRUState",
    "rnn",
    "irnn",
    "lstm",
    "gru",
    "mgu",
    "janet",
    "min_gru",
    "min_lstm",
    "lru",
    "tdnn",
    "narx",
    "learnable_carry",
    "dropout",
    "stack",
    "get_activation",
]
