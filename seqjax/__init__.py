"""seqjax: functional recurrent networks in JAX.

Pure cells (``Cell(init, initial_carry, step)``), one scan-based ``unroll``, and the
tools built on them. Everything public is re-exported here and listed in ``__all__``.
"""

from seqjax import initializers
from seqjax.cells import (
    Cell,
    CellMeta,
    LSTMState,
    NARXState,
    get_activation,
    gru,
    irnn,
    janet,
    lstm,
    mgu,
    narx,
    rnn,
    tdnn,
)
from seqjax.unroll import UnrollAux, check_carry, check_params, learnable_carry, sequence_mask, unroll

__version__ = "0.1.0"

__all__ = [
    # cells
    "Cell",
    "CellMeta",
    "LSTMState",
    "NARXState",
    "get_activation",
    "rnn",
    "irnn",
    "lstm",
    "gru",
    "mgu",
    "janet",
    "tdnn",
    "narx",
    # unrolling
    "unroll",
    "UnrollAux",
    "sequence_mask",
    "learnable_carry",
    "check_params",
    "check_carry",
    # modules
    "initializers",
]
