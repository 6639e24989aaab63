"""``fit``'s option groups: ``Evaluation``, ``Checkpoints``, ``Logging``, ``Flossing``.

Each is a small frozen dataclass whose fields are checked when it is built, so a bad value
is a ``ValueError`` naming the field (``Logging.every must be a positive integer, got 0.``)
before any data is read. Constraints between groups and ``fit``'s own arguments (intervals
that must be multiples of ``steps_per_call``) are checked by ``fit``.

seqjax 0.1's ``fit`` took these as flat keywords; ``_old_keywords_error`` turns such a call
into a ``TypeError`` that spells out the new form. Imports nothing of ``seqjax.train``
(``Flossing`` refers to ``seqjax.cells.Cell`` only to check its model).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from seqjax._util import positive_int

__all__ = ["Evaluation", "Checkpoints", "Logging", "Flossing"]


def _optional_positive(value: Any, name: str) -> int | None:
    return None if value is None else positive_int(value, name)


def _check_bool(value: Any, name: str, *, optional: bool = False) -> None:
    if isinstance(value, bool) or (optional and value is None):
        return
    want = "True, False or None" if optional else "True or False"
    raise ValueError(f"{name} must be {want}, got {value!r}.")


def _check_path(value: Any, name: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)) or os.fspath(value) == "":
        raise ValueError(f"{name} must be a path (a non-empty str or os.PathLike), got {value!r}.")


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluation:
    r"""Periodic evaluation during ``fit``: ``Evaluation(data, every=None, batch_size=None)``.

    Each evaluation is ``evaluate(make_eval_step(loss_fn), params, batches of data)``: the
    size-weighted mean $\sum_j B_j M(b_j) / \sum_j B_j$ of every metric (the loss
    and the aux), reported in the history as ``eval_<name>``.

    Attributes:
      data: arrays (a pytree whose leaves share a leading example axis ``N``, with the
        per-example shapes and dtypes of the training batches) or a finite iterable of
        batches that can be read more than once (a list, not a generator); not a function
        (an endless stream has no mean).
      every: evaluate every ``every`` steps, a multiple of ``Logging.every`` (evaluations
        are reported in the log rows); default ``None``: at every log row. There is always
        an evaluation at the end.
      batch_size: array data is read in batches of ``batch_size`` (the last one possibly
        smaller); default: all at once up to 4096 examples, else ``fit``'s ``batch_size``.

    Examples:
      Pass it as ``fit(..., evaluation=Evaluation((x_val, y_val), every=500, batch_size=1024))``.

      >>> import numpy as np
      >>> from seqjax.train import Evaluation
      >>> x_val, y_val = np.zeros((10, 5, 3), np.float32), np.zeros((10, 1), np.float32)
      >>> evaluation = Evaluation((x_val, y_val), every=500, batch_size=4)
      >>> evaluation.every, evaluation.batch_size
      (500, 4)
    """

    data: Any
    every: int | None = None
    batch_size: int | None = None

    def __post_init__(self):
        if self.data is None:
            raise ValueError("Evaluation.data is required: arrays or a finite iterable of batches.")
        if callable(self.data) and not isinstance(self.data, (list, tuple, dict)):
            raise ValueError(
                "Evaluation.data must be arrays or a finite iterable of batches, not a function "
                "key -> batch (draw a fixed set once: Evaluation(make_batch(key, n)))."
            )
        if isinstance(self.data, Iterator):
            raise ValueError(
                "Evaluation.data is a one-shot iterator (a generator, or iter(...)): it would be "
                "empty at the second evaluation. Pass a list of batches, or arrays."
            )
        _optional_positive(self.every, "Evaluation.every")
        _optional_positive(self.batch_size, "Evaluation.batch_size")


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """Checkpointing during ``fit``: ``Checkpoints(directory, every=None, keep=3, resume=False)``.

    A checkpoint (orbax; see ``save_checkpoint``) holds params, optimizer state, step, key,
    skipped count, the data position and the history. It is written every ``every`` steps
    and at the end; a non-finite state is never written.

    Attributes:
      directory: where the checkpoints go (created if missing).
      every: steps between checkpoints (a multiple of ``fit``'s ``steps_per_call``);
        default ``None``: only at the end.
      keep: how many of the newest checkpoints to keep (``None``: all).
      resume: continue from the latest checkpoint in ``directory`` if there is one; the
        result is bit-for-bit the uninterrupted run's.

    Examples:
      Pass it as ``fit(..., checkpoints=Checkpoints("runs/a/checkpoints", every=1000, resume=True))``.

      >>> from seqjax.train import Checkpoints
      >>> ckpt = Checkpoints("runs/a/checkpoints", every=1000, resume=True)   # nothing is written yet
      >>> ckpt.every, ckpt.keep, ckpt.resume
      (1000, 3, True)
    """

    directory: str | os.PathLike
    every: int | None = None
    keep: int | None = 3
    resume: bool = False

    def __post_init__(self):
        _check_path(self.directory, "Checkpoints.directory", optional=False)
        _optional_positive(self.every, "Checkpoints.every")
        _optional_positive(self.keep, "Checkpoints.keep")
        _check_bool(self.resume, "Checkpoints.resume")


@dataclasses.dataclass(frozen=True)
class Logging:
    """What ``fit`` logs: ``Logging(every=None, history_path=None, progress=None, callbacks=())``.

    Every ``every`` steps ``History`` appends a row of interval means, rewrites
    ``history_path``, updates the progress bar and calls the callbacks.

    Attributes:
      every: steps between history rows (a multiple of ``fit``'s ``steps_per_call``).
        Default ``None``: ``fit`` derives it from what was given, about 50 steps: the
        multiple of ``steps_per_call`` nearest 50 that divides ``Evaluation.every`` when
        that is set, else the smallest multiple of ``steps_per_call`` that is at least 50.
      history_path: a ``.json`` (list of rows) or ``.csv`` file rewritten atomically at
        every row; default ``None``: not written.
      progress: show a tqdm progress bar; default ``None``: only when stderr is a terminal.
      callbacks: functions ``cb(row, state) -> bool | None`` called after each row; one
        returning ``True`` stops training (a sequence; stored as a tuple).

    Examples:
      Pass it as ``fit(..., logging=Logging(every=100, history_path="runs/a/history.csv"))``.

      >>> from seqjax.train import Logging
      >>> logging = Logging(every=100, history_path="runs/a/history.csv", progress=False)
      >>> logging.every, logging.callbacks
      (100, ())
    """

    every: int | None = None
    history_path: str | os.PathLike | None = None
    progress: bool | None = None
    callbacks: Sequence[Callable] = ()

    def __post_init__(self):
        _optional_positive(self.every, "Logging.every")
        _check_path(self.history_path, "Logging.history_path", optional=True)
        _check_bool(self.progress, "Logging.progress", optional=True)
        if callable(self.callbacks) or isinstance(self.callbacks, (str, bytes)):
            raise ValueError(
                "Logging.callbacks must be a sequence of functions cb(row, state); "
                "wrap a single one: callbacks=[cb]."
            )
        callbacks = tuple(self.callbacks)
        for i, cb in enumerate(callbacks):
            if not callable(cb):
                raise ValueError(f"Logging.callbacks[{i}] must be callable as cb(row, state), got {cb!r}.")
        object.__setattr__(self, "callbacks", callbacks)


def _check_flossing_args(
    model: Any, k: Any, weight: Any, every: Any, inputs: Any, warmup: Any, who: str
) -> None:
    """The checks of ``Flossing`` and ``floss``; messages name ``who`` + the field."""
    from seqjax.cells import Cell

    if model is None or not (isinstance(model, Cell) or callable(getattr(model, "cores", None))):
        raise ValueError(
            f"{who}model must be a seqjax Cell or a model with recurrent cores (many_to_one, many_to_many, "
            f"stack_layers, bidirectional, encoder_decoder, a seqjax.nnx module), got {type(model).__name__}."
        )
    positive_int(k, f"{who}k")
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float, np.integer, np.floating))
        or not math.isfinite(weight)
        or weight < 0
    ):
        raise ValueError(f"{who}weight must be a finite number >= 0, got {weight!r}.")
    positive_int(every, f"{who}every")
    if inputs is not None and not callable(inputs):
        raise ValueError(
            f"{who}inputs must be a function batch -> xs (e.g. lambda batch: batch['xs']) or None "
            f"(batch[0]), got {type(inputs).__name__}."
        )
    if not isinstance(warmup, (int, np.integer)) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"{who}warmup must be an integer >= 0, got {warmup!r}.")


@dataclasses.dataclass(frozen=True, eq=False)
class Flossing:
    r"""Gradient flossing during training: ``Flossing(model, k, weight=1.0, every=1, inputs=None, warmup=0)``.

    Pass it as ``make_train_step(..., flossing=Flossing(...))`` or ``fit(..., flossing=...)``.
    On a step with ``state.step % every == 0`` the objective differentiated is

    $$
    \ell(\theta, b) + w\, \mathcal{L}_{\mathrm{floss}}(\theta, b), \qquad
    \mathcal{L}_{\mathrm{floss}} = \frac{1}{B} \sum_b \sum_{i=1}^{k} \lambda_{b,i}^2
    $$

    (``seqjax.spectrum.flossing.flossing_loss(model, params, inputs(batch), k=k,
    warmup=warmup)``, $w$ = ``weight``); on the other steps it is $\ell$ alone, and the
    flossing loss is not computed (``jax.lax.cond``). Engelken (2023) flosses every step or
    every few steps with ``k`` from 1 up to a good fraction of the state size.

    The step's metrics gain ``flossing`` ($\mathcal{L}_{\mathrm{floss}}$ on a step that
    flossed, ``0`` on one that did not) and ``flossed`` (bool, whether it did); ``loss``
    stays $\ell$, the task loss, so runs with and without flossing compare directly.
    ``fit``'s history reports ``flossing`` averaged over the (finite) steps of the interval
    that flossed (NaN when none did) and ``flossed`` as the fraction of steps that did.

    Attributes:
      model: the model whose exponents are flossed: a ``Cell`` or anything
        ``seqjax.spectrum.recurrent_cores`` accepts (its cores' losses are summed); the
        params it reads are the training params.
      k: how many of the top exponents (``1 <= k <= S``, checked on the first batch).
      weight: $w \ge 0$.
      every: floss on the steps ``state.step % every == 0`` (a positive integer).
      inputs: ``batch -> xs (B, T, I)``, the inputs the model reads; default
        ``lambda batch: batch[0]`` (a batch ``(xs, ys)``).
      warmup: steps of each sequence that only move the state (not counted).

    Examples:
      >>> import seqjax
      >>> from seqjax.train import Flossing
      >>> model = seqjax.many_to_one(seqjax.rnn(8), seqjax.dense(1))
      >>> flossing = Flossing(model, k=4, weight=0.1, every=10)
      >>> flossing.k, flossing.weight, flossing.every
      (4, 0.1, 10)
      >>> Flossing(model, k=4, every=0)
      Traceback (most recent call last):
      ...
      ValueError: Flossing.every must be a positive integer, got 0.
    """

    model: Any
    k: int
    weight: float = 1.0
    every: int = 1
    inputs: Callable[[Any], Any] | None = None
    warmup: int = 0

    def __post_init__(self):
        _check_flossing_args(
            self.model, self.k, self.weight, self.every, self.inputs, self.warmup, "Flossing."
        )
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "weight", float(self.weight))
        object.__setattr__(self, "every", int(self.every))
        object.__setattr__(self, "warmup", int(self.warmup))

    def read_inputs(self, batch: Any) -> Any:
        """``inputs(batch)``, or ``batch[0]`` by default."""
        return batch[0] if self.inputs is None else self.inputs(batch)


# --------------------------------------------------------------------------- 0.1 keywords

# fit's 0.1 keyword -> (fit argument, option type, field)
_OLD_KEYWORDS: dict[str, tuple[str, type, str]] = {
    "eval_data": ("evaluation", Evaluation, "data"),
    "eval_every": ("evaluation", Evaluation, "every"),
    "eval_batch_size": ("evaluation", Evaluation, "batch_size"),
    "checkpoint_dir": ("checkpoints", Checkpoints, "directory"),
    "checkpoint_every": ("checkpoints", Checkpoints, "every"),
    "keep_checkpoints": ("checkpoints", Checkpoints, "keep"),
    "resume": ("checkpoints", Checkpoints, "resume"),
    "log_every": ("logging", Logging, "every"),
    "history_path": ("logging", Logging, "history_path"),
    "progress": ("logging", Logging, "progress"),
    "callbacks": ("logging", Logging, "callbacks"),
}


def _shown(value: Any) -> str:
    """A short literal for the suggested call: simple values as written, anything else ``...``."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str) and len(value) <= 60:
        return repr(value)
    return "..."


def _old_keywords_error(old: dict[str, Any]) -> TypeError:
    """The ``TypeError`` for keywords ``fit`` does not take, spelling out 0.2's form of 0.1's."""
    unknown = [k for k in old if k not in _OLD_KEYWORDS]
    if unknown:
        return TypeError(f"fit() got an unexpected keyword argument {unknown[0]!r}")
    groups: dict[str, tuple[type, dict[str, Any]]] = {}
    for name, value in old.items():
        arg, cls, field = _OLD_KEYWORDS[name]
        groups.setdefault(arg, (cls, {}))[1][field] = value
    parts = []
    for arg, (cls, given) in groups.items():
        order = [f.name for f in dataclasses.fields(cls)]
        fields = ", ".join(f"{f}={_shown(given[f])}" for f in order if f in given)
        parts.append(f"{arg}={cls.__name__}({fields})")
    renames = "; ".join(
        f"{name}= -> {arg}={cls.__name__}({field}=...)"
        for name, (arg, cls, field) in _OLD_KEYWORDS.items()
        if name in old
    )
    return TypeError(
        f"fit() no longer takes {', '.join(k + '=' for k in old)} (seqjax 0.1 keywords): since 0.2 "
        f"they are grouped in option types. Write fit(..., {', '.join(parts)}) "
        f"({renames}; the types import from seqjax.train)."
    )
