"""Training: one compiled optax step, a safe ``fit`` loop, checkpoints and data parallelism.

The contract, in one place:

```text
state = init_train_state(params, optimizer, key=key)   # TrainState(params, opt_state, step, key, skipped)
step = make_train_step(loss_fn, optimizer)             # jitted, donates `state`, compiles once
state, metrics = step(state, batch)                    # metrics: loss, grad_norm, finite, [clipped], aux
result = fit(loss_fn, optimizer, params, data, key=key, steps=1000,          # the loop around it
             evaluation=Evaluation(val), checkpoints=Checkpoints("ckpt"), logging=Logging(every=100))
```

``loss_fn(params, batch) -> loss`` (or ``-> (loss, aux_dict)`` with ``has_aux=True``, and
``loss_fn(params, batch, key)`` with ``with_key=True`` for dropout; evaluation then passes
``key=None``). ``batch`` is any pytree of arrays whose leaves share a leading batch axis.

The optimizer is any ``optax.GradientTransformation``; the recipes here (``clipped``,
``clipped_adam``) only build ordinary optax chains. Clipping becomes visible in the metrics
when the clipping stage is wrapped in ``track_clipping`` (the recipes do this): its state
records whether the last update changed the gradient, for any clipping rule.

Non-finite safety: every step checks the loss, the gradients and the updated params; if any
is NaN/inf the update is not applied (params and optimizer state are kept bit-for-bit) and
``state.skipped`` counts it, as ``optax.apply_if_finite`` does. ``fit`` then either keeps
going (``on_nonfinite="skip"``) or stops with ``NonFiniteError`` naming the step
(``"stop"``), and it never writes a checkpoint of a non-finite state.

Modules (each imports only those above it in this list):

```text
state        TrainState, init_train_state, the PRNG-key check
clipping     ClipState, track_clipping, clipped, clipped_adam
data         data_parallel_mesh; the array / function / iterable sources, batch checks
             (non-finite values, lengths), placing batches on a mesh, replicating the state
buckets      bucket_by_length, PaddedBatch, Buckets: variable-length data in a few shapes
step         make_train_step, make_eval_step, evaluate; the finite check, the loss call
checkpoints  save_checkpoint, restore_checkpoint, CheckpointError (orbax, imported lazily)
options      Evaluation, Checkpoints, Logging, Flossing (fit's option groups); 0.1 keyword errors
history      History: interval means, the history file, progress bar, callbacks
loop         fit, floss, FitResult, NonFiniteError, SkippedStepsWarning, RetraceWarning
             (the module is not called `fit`: that name is the function, re-exported here)
```
"""

from seqjax.train.buckets import Buckets, PaddedBatch, bucket_by_length
from seqjax.train.checkpoints import CheckpointError, restore_checkpoint, save_checkpoint
from seqjax.train.clipping import ClipState, clipped, clipped_adam, track_clipping
from seqjax.train.data import data_parallel_mesh
from seqjax.train.history import History
from seqjax.train.loop import FitResult, NonFiniteError, RetraceWarning, SkippedStepsWarning, fit, floss
from seqjax.train.options import Checkpoints, Evaluation, Flossing, Logging
from seqjax.train.state import TrainState, init_train_state
from seqjax.train.step import evaluate, make_eval_step, make_train_step

__all__ = [
    "TrainState",
    "init_train_state",
    "make_train_step",
    "make_eval_step",
    "evaluate",
    "ClipState",
    "track_clipping",
    "clipped",
    "clipped_adam",
    "fit",
    "FitResult",
    "NonFiniteError",
    "SkippedStepsWarning",
    "RetraceWarning",
    "Evaluation",
    "Checkpoints",
    "Logging",
    "Flossing",
    "floss",
    "History",
    "save_checkpoint",
    "restore_checkpoint",
    "CheckpointError",
    "data_parallel_mesh",
    "bucket_by_length",
    "PaddedBatch",
    "Buckets",
]
