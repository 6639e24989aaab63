"""seqjax: functional recurrent networks in JAX.

Pure cells (``Cell(init, initial_carry, step)`` plus optional capabilities), one scan-based
``unroll``, and the tools
built on them: sequence architectures, fast BPTT, Jacobian spectra, training loops. The
names below are re-exported here and listed in ``__all__``; every submodule (``seqjax.spectrum``,
``seqjax.train``, ``seqjax.tasks``, ...) lists its own in its ``__all__``. ``seqjax.plot``
(matplotlib) and ``seqjax.nnx`` (Flax NNX modules) are imported explicitly.
"""

from seqjax import (
    bptt,
    cells,
    fixed_points,
    initializers,
    interop,
    layers,
    losses,
    seq2seq,
    spectrum,
    tasks,
    testing,
    train,
)
from seqjax.bptt import GradientNorms, chunk_stream, fused_supported, gradient_norms, tbptt
from seqjax.cells import (
    KERNEL_OPTIONS,
    Cell,
    CellMeta,
    Kernel,
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
    wrap,
)
from seqjax.fixed_points import FixedPoints, find_fixed_points
from seqjax.interop import TorchRNN, from_torch, to_torch
from seqjax.layers import (
    BiCarry,
    Layer,
    Pointwise,
    as_layer,
    bidirectional,
    dense,
    embedding,
    output_size,
    stack,
    stack_layers,
)
from seqjax.losses import accuracy, mse, softmax_cross_entropy, weights_from
from seqjax.seq2seq import (
    EncoderDecoder,
    GenCarry,
    SeqModel,
    closed_loop,
    encoder_decoder,
    generate,
    last_step,
    many_to_many,
    many_to_one,
    pool,
)
from seqjax.spectrum import (
    GradientFlowReport,
    LyapunovSpectrum,
    StepJacobians,
    gradient_flow_report,
    input_jacobian,
    lag_log_norms,
    lyapunov_spectrum,
    step_jacobian,
    step_jacobians,
)
from seqjax.train import (
    FitResult,
    NonFiniteError,
    TrainState,
    clipped,
    clipped_adam,
    fit,
    init_train_state,
    make_eval_step,
    make_train_step,
    restore_checkpoint,
    save_checkpoint,
)
from seqjax.unroll import UnrollAux, check_carry, check_params, learnable_carry, sequence_mask, unroll

__version__ = "0.1.0"

__all__ = [
    # cells
    "Cell",
    "CellMeta",
    "Kernel",
    "KERNEL_OPTIONS",
    "wrap",
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
    # layers and architectures
    "Layer",
    "Pointwise",
    "BiCarry",
    "stack",
    "stack_layers",
    "as_layer",
    "bidirectional",
    "dense",
    "embedding",
    "output_size",
    "SeqModel",
    "EncoderDecoder",
    "GenCarry",
    "last_step",
    "pool",
    "many_to_one",
    "many_to_many",
    "encoder_decoder",
    "generate",
    "closed_loop",
    # losses
    "softmax_cross_entropy",
    "mse",
    "accuracy",
    "weights_from",
    # BPTT
    "fused_supported",
    "tbptt",
    "chunk_stream",
    "gradient_norms",
    "GradientNorms",
    # spectrum
    "step_jacobian",
    "step_jacobians",
    "StepJacobians",
    "input_jacobian",
    "lag_log_norms",
    "lyapunov_spectrum",
    "LyapunovSpectrum",
    "gradient_flow_report",
    "GradientFlowReport",
    "find_fixed_points",
    "FixedPoints",
    # training
    "TrainState",
    "init_train_state",
    "make_train_step",
    "make_eval_step",
    "fit",
    "FitResult",
    "NonFiniteError",
    "clipped",
    "clipped_adam",
    "save_checkpoint",
    "restore_checkpoint",
    # interop
    "from_torch",
    "to_torch",
    "TorchRNN",
    # submodules
    "cells",
    "initializers",
    "layers",
    "losses",
    "seq2seq",
    "bptt",
    "spectrum",
    "fixed_points",
    "train",
    "tasks",
    "testing",
    "interop",
]
