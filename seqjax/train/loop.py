"""``fit``: the compiled step in a loop that is safe to interrupt, resume and diverge.

``fit`` is assembled from parts, each testable alone:

* the option groups ``Evaluation``, ``Checkpoints``, ``Logging`` (``options``), checked when
  built; ``_check_arguments`` checks what ties them to ``fit``'s own arguments;
* the data source and its checks (``data``), the batch groups of one compiled call
  (``_batch_groups``) and the position in the data (``_Position``);
* the compiled steps (``step``); evaluation is ``evaluate`` over the evaluation source
  (``_Evaluator``);
* the log (``History``) and the run's checkpoints and resume (``_RunCheckpoints``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from seqjax._util import positive_int
from seqjax.train.checkpoints import restore_checkpoint, save_checkpoint
from seqjax.train.data import (
    _Arrays,
    _check_batch_lengths,
    _check_finite_arrays,
    _check_same,
    _Fn,
    _leading_any,
    _place_batch,
    _replicate,
    _source,
    _spec,
    _to_host,
    data_parallel_mesh,
)
from seqjax.train.history import History
from seqjax.train.options import (
    Checkpoints,
    Evaluation,
    Flossing,
    Logging,
    _check_flossing_args,
    _old_keywords_error,
)
from seqjax.train.state import TrainState, _as_key, init_train_state
from seqjax.train.step import (
    _call_loss,
    _check_flossing_traces,
    _eval_step_on,
    _flossing_term,
    evaluate,
    make_train_step,
)

__all__ = ["fit", "FitResult", "NonFiniteError", "SkippedStepsWarning", "RetraceWarning", "floss"]

# more distinct batch shapes than this and fit warns that the step keeps recompiling
_MAX_QUIET_TRACES = 4
_DEFAULT_LOG_EVERY = 50
# compiled calls dispatched ahead of the device at most (each holds its batch in device memory)
_MAX_IN_FLIGHT = 3


class SkippedStepsWarning(UserWarning):
    """Warned by ``fit`` at a log row when steps of the interval were skipped (non-finite).

    The message names the steps and the batches they read; the rows keep them in
    ``skipped_steps``. ``fit`` raises ``NonFiniteError`` instead once too many were skipped
    (``max_skipped``, ``max_skipped_fraction``, or every step).
    """


class RetraceWarning(UserWarning):
    """Warned by ``fit`` when the train step has been traced for more than a few batch shapes.

    Each new shape compiles the step again; pad variable-length data to a few lengths with
    ``bucket_by_length``.
    """


class NonFiniteError(FloatingPointError):
    """Raised by ``fit(on_nonfinite="stop")`` (or when ``max_skipped`` is exceeded).

    Attributes:
      step: the 1-based number of the offending step.
      state: the state after it (its params and optimizer state are those before it).
      history: the history so far.
      checkpoint_step: the last good checkpoint's step, or ``None``.
    """

    def __init__(self, msg, step, state, history, checkpoint_step):
        super().__init__(msg)
        self.step, self.state, self.history, self.checkpoint_step = step, state, history, checkpoint_step


class FitResult(NamedTuple):
    """What ``fit`` returns.

    Attributes:
      state: the final ``TrainState`` (``state.params`` are the trained params).
      history: a list of rows (dicts) logged every ``Logging.every`` steps: ``step``,
        ``epoch``, ``loss``/``grad_norm`` (means over the finite steps of the interval),
        ``grad_norm_max``, ``clipped_frac``, ``skipped`` (total), ``skipped_steps`` (the
        interval's skipped steps), ``steps_per_sec``, ``time``, and ``eval_*`` where an
        evaluation ran (see ``History``).
    """

    state: TrainState
    history: list[dict]

    @property
    def skipped_steps(self) -> list[int]:
        """Every skipped (non-finite) step of the logged history, 1-based, in order."""
        return [t for row in self.history for t in row.get("skipped_steps", ())]


# --------------------------------------------------------------------------- the parts


def _default_log_every(k: int, eval_every: int | None) -> int:
    """``Logging.every`` when not given: about 50 steps, a multiple of ``k`` dividing ``eval_every``."""
    if eval_every is not None:
        fits = [d for d in range(k, eval_every + 1, k) if eval_every % d == 0]
        return min(fits, key=lambda d: (abs(d - _DEFAULT_LOG_EVERY), -d))
    return k * math.ceil(_DEFAULT_LOG_EVERY / k)


def _check_arguments(
    steps,
    epochs,
    steps_per_call,
    on_nonfinite,
    max_skipped,
    max_skipped_fraction,
    evaluation,
    checkpoints,
    logging,
):
    """The checks that tie ``fit``'s arguments and option groups together.

    Returns ``(steps_per_call, log_every)``; ``log_every`` is derived when ``Logging.every``
    is ``None`` (so a default never contradicts what the user gave).
    """
    if (steps is None) == (epochs is None):
        raise ValueError(f"fit needs exactly one of steps or epochs; got steps={steps!r}, epochs={epochs!r}.")
    for name, v in (("steps", steps), ("epochs", epochs)):
        if v is not None:
            positive_int(v, name)
    k = positive_int(steps_per_call, "steps_per_call")
    for name, v, cls in (
        ("evaluation", evaluation, Evaluation),
        ("checkpoints", checkpoints, Checkpoints),
        ("logging", logging, Logging),
    ):
        if v is not None and not isinstance(v, cls):
            raise ValueError(
                f"{name} must be a seqjax.train.{cls.__name__}(...) or None, got {type(v).__name__}."
            )
    if on_nonfinite not in ("skip", "stop"):
        raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}.")
    if max_skipped is not None and (
        not isinstance(max_skipped, (int, np.integer)) or isinstance(max_skipped, bool) or max_skipped < 0
    ):
        raise ValueError(f"max_skipped must be a non-negative integer or None, got {max_skipped!r}.")
    if max_skipped_fraction is not None and (
        isinstance(max_skipped_fraction, bool)
        or not isinstance(max_skipped_fraction, (int, float, np.floating))
        or not 0 <= max_skipped_fraction < 1
    ):
        raise ValueError(
            f"max_skipped_fraction must be a number in [0, 1) or None, got {max_skipped_fraction!r} "
            "(a run in which every step was skipped always raises)."
        )
    intervals = [("Logging.every", logging.every)]
    if evaluation is not None:
        intervals.append(("Evaluation.every", evaluation.every))
    if checkpoints is not None:
        intervals.append(("Checkpoints.every", checkpoints.every))
    intervals.append(("steps", steps))
    for name, v in intervals:
        if v is not None and v % k:
            raise ValueError(f"{name}={v} must be a multiple of steps_per_call={k}.")
    eval_every = evaluation.every if evaluation is not None else None
    if logging.every is None:
        return k, _default_log_every(k, eval_every)
    if eval_every is not None and eval_every % logging.every:
        raise ValueError(
            f"Evaluation.every={eval_every} must be a multiple of Logging.every={logging.every} "
            "(evaluations are reported in the log rows)."
        )
    return k, logging.every


def _resolve_mesh(mesh: Mesh | str | None, batch: int) -> Mesh | None:
    """``"auto"`` -> all devices when there are several; a mesh's ``"data"`` axis must divide ``batch``."""
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"mesh must be 'auto', None or a jax.sharding.Mesh, got {mesh!r}.")
        mesh = data_parallel_mesh() if jax.device_count() > 1 else None
    if mesh is not None:
        if "data" not in mesh.axis_names:
            raise ValueError(f"mesh needs an axis named 'data', got axes {mesh.axis_names}.")
        nd = mesh.shape["data"]
        if batch % nd:
            raise ValueError(
                f"the batch size {batch} must be divisible by the {nd} devices of the mesh's 'data' axis "
                "(or pass mesh=None for one device)."
            )
    return mesh


def _check_loss_traces(
    loss_fn, params, batch, has_aux: bool, with_key: bool, where: str = "the first training batch"
) -> None:
    """Trace ``loss_fn`` abstractly (``jax.eval_shape``) on ``batch``: a ``ValueError`` before any compute."""
    try:
        jax.eval_shape(
            lambda p, b: _call_loss(loss_fn, p, b, jax.random.key(0), has_aux, with_key), params, batch
        )
    except ValueError:
        raise
    except Exception as e:
        shapes = jax.tree_util.tree_map(lambda a: f"{np.shape(a)} {np.asarray(a).dtype}", batch)
        raise ValueError(f"loss_fn fails on {where} (leaves: {shapes}): {type(e).__name__}: {e}") from e


class _TraceCounter:
    """``loss_fn`` with a count of how often it was called from the train step's tracing.

    Python code runs under ``jit`` only while tracing, so ``traces`` counts compilations of
    the step (one per distinct batch shape; the fused step traces its body once per shape).
    """

    def __init__(self, loss_fn: Callable):
        self.loss_fn, self.traces = loss_fn, 0

    def __call__(self, *args):
        self.traces += 1
        return self.loss_fn(*args)


class _Batches:
    """The per-batch host checks of ``fit``: the tree, dtypes and ranks of the first batch,
    lengths within ``[0, T]``, a new shape traced abstractly before it compiles, and a
    ``RetraceWarning`` once the step has compiled for more than a few shapes.

    What the checks of a batch find, except its lengths, depends only on its tree structure
    and its leaves' shapes and dtypes, so a batch whose signature (``_signature``) passed
    before is not checked again: the lengths are (they are values), the rest costs one
    ``tree_flatten``.
    """

    def __init__(self, first, loss_fn, has_aux, with_key, counter: _TraceCounter, lengths_checked: bool):
        self.ref = _spec(first)
        self.loss_fn, self.has_aux, self.with_key = loss_fn, has_aux, with_key
        self.counter, self.lengths_checked = counter, lengths_checked
        self.seen = {self._shapes(self.ref)}
        self.passed: dict[Any, tuple] = {}  # signature -> shapes, for batches that passed
        self.warned = False

    @staticmethod
    def _shapes(spec):
        return tuple(s for _, s, _ in spec[1]) + (spec[2],)

    @staticmethod
    def _signature(batch) -> Any:
        """``(treedef, ((shape, dtype), ...))`` of a batch of arrays, else ``None`` (check in full)."""
        leaves, treedef = jax.tree_util.tree_flatten(batch)
        try:
            sig = treedef, tuple((tuple(x.shape), x.dtype) for x in leaves)
            hash(sig)
        except (AttributeError, TypeError):  # a leaf that is no array (a Python scalar, ...)
            return None
        return sig

    def _check_one(self, b, where: str, params) -> tuple:
        """The full checks of one batch (its lengths aside); returns its shapes."""
        spec = _spec(b)
        _check_same(spec, self.ref, where, same_shape=False)
        shapes = self._shapes(spec)
        if shapes not in self.seen:
            _check_loss_traces(self.loss_fn, params, b, self.has_aux, self.with_key, where=where)
            self.seen.add(shapes)
        return shapes

    def check(self, group: list, first_step: int, params) -> None:
        """Check the ``k`` host batches of one call (before they are placed)."""
        group_shapes = set()
        for j, b in enumerate(group):
            where = f"batch {first_step + j} of train_data"
            sig = self._signature(b)
            shapes = self.passed.get(sig) if sig is not None else None
            if shapes is None:
                shapes = self._check_one(b, where, params)
                if sig is not None:
                    self.passed[sig] = shapes
            if not self.lengths_checked:
                _check_batch_lengths(b, where)
            group_shapes.add(shapes)
        if len(group_shapes) > 1:
            raise ValueError(
                f"steps_per_call={len(group)} fuses batches {first_step}..{first_step + len(group) - 1} of "
                "train_data into one call, so they need one shape, but their shapes differ; use "
                "steps_per_call=1 for batches of varying shapes."
            )

    def after_call(self) -> None:
        if not self.warned and self.counter.traces > _MAX_QUIET_TRACES:
            self.warned = True
            shown = sorted(self.seen)[:6]
            warnings.warn(
                f"fit's train step has been traced and compiled {self.counter.traces} times: the batches "
                f"change shape (per-example shapes and batch sizes seen so far: {shown}"
                f"{' ...' if len(self.seen) > 6 else ''}). Every new shape compiles the step again; pad "
                "variable-length sequences to a few lengths with seqjax.train.bucket_by_length (and pass "
                "lengths), or pad all batches to one length.",
                RetraceWarning,
                stacklevel=3,
            )


def _copy_tree(t):
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), t)


class _Evaluator:
    """``Evaluation`` made concrete: its source of batches, its eval step and when it is due."""

    def __init__(self, evaluation: Evaluation, eval_step: Callable, ref, batch_size, key, mesh):
        data = evaluation.data
        n = _leading_any(data)
        if evaluation.batch_size is not None:
            bs = evaluation.batch_size
        else:  # one compiled eval call for small eval sets
            bs = n if n <= 4096 else (batch_size or ref[2])
        src = _source(data, min(bs, max(n, 1)), False, key, "Evaluation.data", drop_remainder=False)
        if isinstance(src, _Arrays):
            _check_finite_arrays(src.data, "Evaluation.data")  # always: a NaN mean says nothing
            _check_batch_lengths(src.data, "Evaluation.data")
        _check_same(_spec(src.first()), ref, "Evaluation.data", same_shape=False)
        if mesh is not None and jax.process_count() > 1 and isinstance(src, _Arrays):
            nd = mesh.shape["data"]
            if src.batch_size % nd or (src.n % src.batch_size) % nd:
                raise ValueError(
                    f"with several processes every eval batch must divide over the {nd} devices: "
                    f"{src.n} eval examples in batches of {src.batch_size} do not; set Evaluation.batch_size."
                )
        self.every, self.source, self.eval_step = evaluation.every, src, eval_step

    def due(self, step: int, *, final: bool) -> bool:
        return final or self.every is None or step % self.every == 0

    def __call__(self, params) -> dict[str, float]:
        """``{"eval_<name>": mean}`` over the evaluation data (``evaluate``)."""
        means = evaluate(self.eval_step, params, self.source.epoch(0, 0))
        return {"eval_" + k: v for k, v in means.items()}


@dataclasses.dataclass
class _Position:
    """Where a run is: ``epoch``, ``index`` (batches used in it) and ``step`` (steps taken)."""

    epoch: int
    index: int
    step: int

    def finished(self, total: int | None, epochs: int | None) -> bool:
        """Whether ``total`` steps or ``epochs`` epochs are done (``None``: no such limit)."""
        return (total is not None and self.step >= total) or (epochs is not None and self.epoch >= epochs)

    def advance(self, k: int, per_epoch: int | None) -> None:
        """After a call of ``k`` steps: ``step``/``index`` grow by ``k``; a full epoch rolls over."""
        self.step += k
        self.index += k
        if per_epoch is not None and self.index >= per_epoch:
            self.epoch, self.index = self.epoch + 1, 0


def _batch_groups(src, k: int, pos: _Position, total: int | None, epochs: int | None) -> Iterator[list]:
    """The groups of ``k`` host batches of one compiled call, from ``pos`` on, until it is finished.

    Each epoch's batches start at ``pos.index``. An epoch ends when the consumer rolls
    ``pos`` over (sources with ``per_epoch``) or when the source runs dry; a dry source of
    unknown length then starts the next epoch itself. A pass that yields nothing (a one-shot
    iterator used up) ends the run. A partial group is an error.
    """
    while not pos.finished(total, epochs):
        epoch = pos.epoch
        batches = src.epoch(pos.epoch, pos.index)
        got_any = exhausted = False
        while not pos.finished(total, epochs):
            group = list(itertools.islice(batches, k))
            if len(group) < k:
                if group:
                    raise ValueError(
                        f"train_data ran out mid-group: {len(group)} batches left but steps_per_call={k}."
                    )
                exhausted = True
                break
            got_any = True
            yield group
            if pos.epoch != epoch:  # the consumer finished a finite epoch
                exhausted = True
                break
        if not got_any:  # a one-shot iterator is used up, or an iterable gave nothing this time
            return
        if exhausted and src.per_epoch is None:
            pos.epoch, pos.index = pos.epoch + 1, 0


class _RunCheckpoints:
    """A run's checkpoints: resume from the latest, save every ``Checkpoints.every`` steps."""

    def __init__(self, options: Checkpoints, *, batch_size, steps_per_call: int):
        self.options = options
        self.batch_size, self.steps_per_call = batch_size, steps_per_call
        self.last_step: int | None = None  # the last good checkpoint of this run

    def restore(self, target: TrainState) -> tuple[TrainState, _Position, list[dict]] | None:
        restored = restore_checkpoint(self.options.directory, target)
        if restored is None:
            return None
        state, meta = restored
        epoch, index = meta["position"]
        rows = list(meta.get("history", []))
        self.last_step = int(state.step)
        for name, v in (("batch_size", self.batch_size), ("steps_per_call", self.steps_per_call)):
            if meta.get(name) != v:
                raise ValueError(f"resume: the checkpoint was made with {name}={meta.get(name)}, not {v}.")
        return state, _Position(epoch, index, int(state.step)), rows

    def due(self, step: int) -> bool:
        every = self.options.every
        return every is not None and every > 0 and step % every == 0

    def save(self, state: TrainState, pos: _Position, rows: list[dict]) -> None:
        meta = {
            "position": [pos.epoch, pos.index],
            "history": rows,
            "batch_size": self.batch_size,
            "steps_per_call": self.steps_per_call,
        }
        if save_checkpoint(self.options.directory, state, meta=meta, keep=self.options.keep):
            self.last_step = int(state.step)


def _nonfinite_error(
    history: History,
    ckpts: _RunCheckpoints | None,
    state,
    bad_step: int,
    epoch: int,
    why: str,
    *,
    limit: bool = False,
) -> NonFiniteError:
    """Close the log (writing what it has); the error names the step and the last good checkpoint."""
    history.close()
    if history.rows:
        history.write()
    ckpt_step = ckpts.last_step if ckpts is not None else None
    where = (
        f"; the last good checkpoint is step {ckpt_step} in {ckpts.options.directory}"
        if ckpts is not None and ckpt_step is not None
        else ""
    )
    msg = (
        f"fit stopped at step {bad_step} (1-based; epoch {epoch}): {why}. Skipped steps were never "
        f"applied; the state is the one after step {bad_step}{where}."
        if limit
        else f"non-finite loss/gradient/params at step {bad_step} (1-based; epoch {epoch}): {why}. "
        f"The update was not applied, so the params are those after step {bad_step - 1}{where}."
    )
    return NonFiniteError(
        msg,
        bad_step,
        state,
        history.rows,
        ckpt_step,
    )


def _log(history: History, state: TrainState, pos: _Position, evaluator: _Evaluator | None, final: bool):
    """One history row at ``pos.step``, with an evaluation when due; returns whether to stop."""
    row = history.row(step=pos.step, epoch=pos.epoch, skipped=int(state.skipped))
    if evaluator is not None and evaluator.due(pos.step, final=final):
        row.update(evaluator(state.params))
    return history.append(row, state)


def _check_bool_arg(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")


class _SkipLimits:
    """What ``fit`` does about skipped steps at each row: name them (``SkippedStepsWarning``),
    and raise ``NonFiniteError`` past ``max_skipped``, past ``max_skipped_fraction`` of the
    steps taken, or when every step of the run was skipped (at its end)."""

    def __init__(self, max_skipped, max_fraction, src):
        self.max_skipped, self.max_fraction, self.src = max_skipped, max_fraction, src

    def describe(self, epoch: int, index: int) -> str:
        """The batch that a step read, in the words of its source."""
        src = self.src
        if isinstance(src, _Fn):
            return f"batch function draw {index} (key fold_in(data_key, {index}))"
        if isinstance(src, _Arrays):
            order = src._order(epoch)
            sl = slice(index * src.batch_size, (index + 1) * src.batch_size)
            ex = np.arange(src.n)[sl] if order is None else order[sl]
            shown = ", ".join(str(int(v)) for v in ex[:8]) + (", ..." if len(ex) > 8 else "")
            return f"epoch {epoch} batch {index} (examples {shown})"
        return f"epoch {epoch} batch {index} of the iterable"

    def after_row(self, history: History, ckpts, state, pos: _Position, read, *, final: bool) -> None:
        row = history.rows[-1] if history.rows else {}
        bad = row.get("skipped_steps", [])
        skipped = int(row.get("skipped", int(state.skipped)))
        taken = pos.step
        named = "; ".join(f"step {t}: {self.describe(*read[t])}" for t in bad[:10] if t in read)
        if len(bad) > 10:
            named += f"; and {len(bad) - 10} more"
        why = None
        if self.max_skipped is not None and skipped > self.max_skipped:
            why = f"{skipped} steps skipped in all (max_skipped={self.max_skipped})"
        elif self.max_fraction is not None and skipped > self.max_fraction * taken:
            why = (
                f"{skipped} of the {taken} steps taken were skipped, more than "
                f"max_skipped_fraction={self.max_fraction} (pass a larger one, or None, to go on)"
            )
        elif final and taken and skipped >= taken:
            why = f"every one of the {taken} steps was skipped: the params were never updated"
        if why is not None:
            where = f"; skipped in the last interval: {named}" if named else ""
            raise _nonfinite_error(history, ckpts, state, pos.step, pos.epoch, why + where, limit=True)
        if named:
            warnings.warn(
                f"fit skipped {len(bad)} of the last {len(read)} steps (non-finite loss, gradient or "
                f"params; the update was not applied): {named}. {skipped} of {taken} steps "
                "skipped so far. The rows list them in 'skipped_steps'.",
                SkippedStepsWarning,
                stacklevel=4,
            )


class _FlossingHistory(History):
    """``History`` whose ``flossing`` column is the mean over the finite steps of the interval
    that flossed (NaN when none did), not over all of them (the step reports ``0`` where it
    did not floss); ``flossed`` stays the plain mean: the fraction of steps that flossed."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._flossing: list[tuple[Any, Any, Any]] = []

    def add(self, metrics, *, steps: int = 1) -> None:
        self._flossing.append((metrics["flossing"], metrics["flossed"], metrics["finite"]))
        super().add(metrics, steps=steps)

    def row(self, *, step: int, epoch: int, skipped: int) -> dict[str, Any]:
        got = jax.device_get(self._flossing)
        self._flossing = []
        row = super().row(step=step, epoch=epoch, skipped=skipped)
        if got:
            value = np.concatenate([np.reshape(v, (-1,)) for v, _, _ in got]).astype(np.float64)
            did = np.concatenate([np.reshape(o, (-1,)) & np.reshape(f, (-1,)) for _, o, f in got])
            row["flossing"] = float(np.mean(value[did])) if did.any() else float("nan")
        return row


# --------------------------------------------------------------------------- fit


def fit(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    params: Any,
    train_data: Any,
    *,
    key: jax.Array,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    shuffle: bool | None = None,
    has_aux: bool = False,
    with_key: bool = False,
    steps_per_call: int = 1,
    mesh: Mesh | str | None = "auto",
    evaluation: Evaluation | None = None,
    checkpoints: Checkpoints | None = None,
    logging: Logging | None = None,
    on_nonfinite: str = "skip",
    max_skipped: int | None = None,
    max_skipped_fraction: float | None = 0.5,
    check_finite: bool = True,
    flossing: Flossing | None = None,
    **old: Any,
) -> FitResult:
    r"""Train ``params`` to minimise ``loss_fn`` with ``optimizer``: the compiled step in a loop.

    Each step is ``make_train_step``'s: with $\ell$ = ``loss_fn``,
    $g = \nabla_\theta \ell(\theta, b)$, ``u, s' = optimizer.update(g, s, θ)``,
    $\theta \leftarrow \theta + u$ (not applied when anything is non-finite).

    Data (``train_data``; the same kinds, finite, for ``Evaluation.data``):

    * arrays: a pytree (array, tuple or dict) whose leaves share a leading example axis
      ``N``; batches of ``batch_size`` (the incomplete last batch is dropped, so the step
      compiles once), reshuffled every epoch with ``fold_in(data_key, epoch)``;
    * a function ``key -> batch`` (synthetic tasks): batch ``i`` uses ``fold_in(data_key, i)``;
    * an iterable of batches (one pass per epoch; resuming skips the batches already used).

    A batch is any pytree of arrays with a shared leading batch axis ``(B, ...)``. Before
    any compute ``fit`` checks the data (non-empty; every leaf of a batch with the same
    ``B``; every batch and the evaluation data with the tree, per-example shapes and dtypes
    of the first batch) and traces ``loss_fn`` abstractly on the first batch
    (``jax.eval_shape``), so a wrong label dtype or shape is a ``ValueError`` at once.

    Keys: ``data_key, state_key = split(key)``; the state's key feeds ``loss_fn`` (``with_key``).

    Speed: between log rows nothing waits for the device. The next batches are drawn and
    checked on the host while the device runs the step (at most 3 compiled calls ahead, so
    at most that many batches wait in device memory); a batch function's keys are computed
    a block at a time, so reading its key never waits for the step in flight. The checks of
    a batch are done once per tree, shapes and dtypes (its ``lengths`` every time).

    Options (see each type): ``logging=Logging(every=50, history_path, progress, callbacks)``:
    every ``every`` steps a ``History`` row of interval means is appended and written, the
    progress bar updated and the callbacks called (one returning ``True`` stops training).
    ``evaluation=Evaluation(data, every, batch_size)``: ``evaluate`` over the data every
    ``every`` steps (default: at each row) and at the end, as ``eval_*`` keys of the rows.
    ``checkpoints=Checkpoints(directory, every, keep, resume)``: orbax checkpoints every
    ``every`` steps and at the end (params, optimizer state, step, key, skipped count, data
    position and history); ``resume=True`` continues from the latest and is bit-for-bit the
    uninterrupted run (same batches, same keys, same compiled step). Non-finite states are
    never saved.

    Non-finite steps are never applied (see ``make_train_step``). ``on_nonfinite="skip"``
    counts them and goes on (``max_skipped``: raise ``NonFiniteError`` once more were
    skipped, checked at each row); ``"stop"`` checks every step and raises
    ``NonFiniteError`` naming the step.

    Data parallelism: ``mesh="auto"`` (default) uses all devices when there is more than
    one (``data_parallel_mesh()``), ``None`` a single device, or pass a ``Mesh`` with a
    ``"data"`` axis. The batch is sharded on its leading axis; params and optimizer state
    are replicated. Under ``jax.distributed.initialize`` each process feeds its slice of
    every global batch.

    Args:
      loss_fn: ``(params, batch) -> loss`` (``()`` float; see ``make_train_step`` for
        ``has_aux``/``with_key``).
      optimizer: any ``optax.GradientTransformation``.
      params: initial params, or a ``TrainState`` to continue from (never modified: the
        step donates a copy).
      train_data: see above.
      key: ``()`` PRNG key (required).
      steps: how many steps (give exactly one of ``steps`` and ``epochs``).
      epochs: how many passes over array data.
      batch_size: ``B`` for array data.
      shuffle: reshuffle array data each epoch (default ``True`` for arrays).
      has_aux: ``loss_fn`` returns ``(loss, aux)`` (see ``make_train_step``).
      with_key: ``loss_fn`` takes a PRNG key (see ``make_train_step``).
      steps_per_call: fuse this many steps in one compiled call (``lax.scan``); must divide
        ``steps`` (or the batches per epoch) and every ``*.every`` interval.
      mesh: ``"auto"``, ``None`` or a ``Mesh``.
      evaluation: an ``Evaluation``, or ``None``.
      checkpoints: a ``Checkpoints``, or ``None``.
      logging: a ``Logging`` (default ``Logging()``: a row every 50 steps).
      on_nonfinite: ``"skip"`` (default) or ``"stop"``: the non-finite policy (see above).
      max_skipped: with ``"skip"``, raise ``NonFiniteError`` once more steps than this were
        skipped (``None``: never).
      flossing: a ``Flossing`` (gradient flossing on every ``every``-th step, see
        ``make_train_step``), or ``None``. The rows then hold ``flossing``, averaged over the
        finite steps of the interval that flossed, and ``flossed``, the fraction that did.
      **old: seqjax 0.1's flat keywords (``eval_data=``, ``log_every=``,
        ``checkpoint_dir=``, ...) are refused with a ``TypeError`` that spells out the
        option types to use instead.

    Returns:
      ``FitResult(state, history)``.

    Raises:
      TypeError: an unknown keyword, or a 0.1 keyword (the message gives the new form).
      ValueError: bad data or arguments (before any compute).
      NonFiniteError: see above.

    Examples:
      >>> import jax, seqjax
      >>> from seqjax.tasks import adding_problem
      >>> from seqjax.train import Logging, clipped_adam, fit
      >>> model = seqjax.many_to_one(seqjax.rnn(4), seqjax.dense(1))
      >>> params = model.init(jax.random.key(0), input_size=2)
      >>> def loss(params, batch):
      ...     xs, ys = batch
      ...     return seqjax.mse(model.apply(params, xs), ys[:, None])
      >>> data = adding_problem(0, n=16, length=10)            # arrays: (xs, ys)
      >>> result = fit(loss, clipped_adam(1e-2), params, data, key=jax.random.key(1), steps=4,
      ...              batch_size=8, logging=Logging(every=2, progress=False))
      >>> [row["step"] for row in result.history], int(result.state.step)
      ([2, 4], 4)
    """
    t_start = time.perf_counter()
    if old:
        raise _old_keywords_error(old)
    key = _as_key(key)
    logging = Logging() if logging is None else logging
    k, log_every = _check_arguments(
        steps,
        epochs,
        steps_per_call,
        on_nonfinite,
        max_skipped,
        max_skipped_fraction,
        evaluation,
        checkpoints,
        logging,
    )
    _check_bool_arg(check_finite, "check_finite")
    if flossing is not None and not isinstance(flossing, Flossing):
        raise ValueError(
            f"flossing must be a seqjax.train.Flossing(...) or None, got {type(flossing).__name__}."
        )
    data_key, state_key = jax.random.split(key)

    # the data, the mesh and the evaluation, all checked before any compute
    src = _source(train_data, batch_size, shuffle, data_key, "train_data")
    if isinstance(src, _Arrays):  # array data: scanned once, whole
        if check_finite:
            _check_finite_arrays(src.data, "train_data")
        _check_batch_lengths(src.data, "train_data")
    if epochs is not None and src.per_epoch is None and isinstance(src, _Fn):
        raise ValueError("epochs needs finite data; a batch function is endless: pass steps=.")
    if epochs is not None and src.per_epoch is not None and src.per_epoch % k:
        how = f" ({src.n} examples // batch_size={src.batch_size})" if isinstance(src, _Arrays) else ""
        raise ValueError(
            f"epochs: the {src.per_epoch} batches per epoch{how} must be a multiple of steps_per_call={k}."
        )
    first = src.first()
    ref = _spec(first)
    mesh = _resolve_mesh(mesh, ref[2])
    evaluator = None
    if evaluation is not None:
        eval_step = _eval_step_on(loss_fn, has_aux=has_aux, with_key=with_key, mesh=mesh)
        evaluator = _Evaluator(evaluation, eval_step, ref, batch_size, data_key, mesh)
    state = params if isinstance(params, TrainState) else init_train_state(params, optimizer, key=state_key)
    state = _copy_tree(state)  # the step donates its input: never the caller's arrays
    _check_loss_traces(loss_fn, state.params, first, has_aux, with_key)
    if flossing is not None:
        _check_flossing_traces(flossing, state.params, first)
    if evaluator is not None and _spec(evaluator.source.first())[1] != ref[1]:
        _check_loss_traces(
            loss_fn,
            state.params,
            evaluator.source.first(),
            has_aux,
            with_key,
            where="the first batch of Evaluation.data",
        )

    counter = _TraceCounter(loss_fn)
    batches = _Batches(first, loss_fn, has_aux, with_key, counter, lengths_checked=isinstance(src, _Arrays))
    train_step = make_train_step(
        counter, optimizer, has_aux=has_aux, with_key=with_key, fused=k > 1, mesh=mesh, flossing=flossing
    )
    if mesh is not None:
        state = _replicate(state, mesh)

    # where the run starts: fresh, or the latest checkpoint
    ckpts = (
        None if checkpoints is None else _RunCheckpoints(checkpoints, batch_size=batch_size, steps_per_call=k)
    )
    pos = _Position(0, 0, int(state.step))
    rows: list[dict] = []
    if ckpts is not None and ckpts.options.resume:
        restored = ckpts.restore(state)
        if restored is not None:
            state, pos, rows = restored
    total = steps if steps is not None else (epochs * src.per_epoch if src.per_epoch else None)

    # the loop
    history_type = History if flossing is None else _FlossingHistory
    history = history_type(logging, total=total, start_step=pos.step, rows=rows, start_time=t_start)
    read: dict[int, tuple[int, int]] = {}  # step (1-based) -> (epoch, batch index) since the last row
    limits = _SkipLimits(max_skipped, max_skipped_fraction, src)
    # Nothing below waits for the device between log rows, so the host draws and dispatches
    # the next batches while the device computes; ``in_flight`` keeps it at most
    # ``_MAX_IN_FLIGHT`` calls ahead.
    in_flight: deque = deque()
    try:
        for group in _batch_groups(src, k, pos, total, epochs):
            batches.check(group, pos.step, state.params)
            batch = group[0] if k == 1 else jax.tree_util.tree_map(lambda *xs: np.stack(xs), *group)
            state, metrics = train_step(state, _place_batch(batch, mesh, k > 1))
            batches.after_call()
            history.add(metrics, steps=k)
            in_flight.append(metrics["loss"])
            if len(in_flight) > _MAX_IN_FLIGHT:  # bound the run-ahead (and the batches it holds)
                jax.block_until_ready(in_flight.popleft())
            for j in range(k):
                read[pos.step + 1 + j] = (pos.epoch, pos.index + j)
            if on_nonfinite == "stop":
                finite = np.reshape(_to_host(metrics["finite"]), (-1,))
                if not finite.all():
                    j = int(np.argmin(finite))
                    bad_loss = np.reshape(_to_host(metrics["loss"]), (-1,))[j]
                    e, i = read[pos.step + 1 + j]
                    why = f"loss={bad_loss} on {limits.describe(e, i)}"
                    raise _nonfinite_error(history, ckpts, state, pos.step + 1 + j, pos.epoch, why)
            pos.advance(k, src.per_epoch)
            last = pos.finished(total, epochs)
            stop = False
            if pos.step % log_every == 0 or last:
                stop = _log(history, state, pos, evaluator, final=last)
                limits.after_row(history, ckpts, state, pos, read, final=last)
                read.clear()
            if ckpts is not None and ckpts.due(pos.step) and not last:
                ckpts.save(state, pos, history.rows)
            if stop:
                break
        if history.pending:
            _log(history, state, pos, evaluator, final=True)
            limits.after_row(history, ckpts, state, pos, read, final=True)
        elif stop:
            limits.after_row(history, ckpts, state, pos, {}, final=True)
        if ckpts is not None:
            ckpts.save(state, pos, history.rows)
    finally:
        history.close()
    return FitResult(state, history.rows)


def floss(
    model: Any,
    params: Any,
    train_data: Any,
    *,
    k: int,
    steps: int,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    inputs: Callable[[Any], Any] | None = None,
    warmup: int = 0,
    batch_size: int | None = None,
    logging: Logging | None = None,
) -> FitResult:
    r"""Pre-flossing (Engelken 2023): ``steps`` optimiser steps on the flossing loss alone.

    ``fit`` with the loss
    $F(\theta, b) = \frac{1}{B}\sum_b \sum_{i \le k} \lambda_{b,i}^2$
    (``seqjax.spectrum.flossing.flossing_loss(model, θ, inputs(b), k=k, warmup=warmup)``),
    so the data kinds, checks, keys and history are ``fit``'s; the rows' ``loss`` (and the
    aux ``flossing``, the same number) is $F$. Only the params the exponents depend on (the
    recurrent cores') change; a readout keeps its initial values. Continue with the task:
    ``fit(task_loss, optimizer, result.state.params, ...)``.

    Args:
      model: a ``Cell`` or a model with recurrent cores (see ``Flossing``).
      params: its initial params (or a ``TrainState``).
      train_data: as in ``fit`` (arrays, a function ``key -> batch``, or an iterable); only
        the inputs are read.
      k: how many of the top exponents (``1 <= k <= S``).
      steps: optimiser steps.
      optimizer: any ``optax.GradientTransformation``.
      key: ``()`` PRNG key (data order, as in ``fit``).
      inputs: ``batch -> xs``; default ``batch[0]``.
      warmup: steps of each sequence that only move the state.
      batch_size: ``B`` for array data.
      logging: a ``Logging`` (default: ``fit``'s).

    Returns:
      ``fit``'s ``FitResult(state, history)``.

    Examples:
      >>> import jax, optax, seqjax
      >>> from seqjax.tasks import adding_problem
      >>> from seqjax.train import Logging, floss
      >>> model = seqjax.many_to_one(seqjax.rnn(8), seqjax.dense(1))
      >>> params = model.init(jax.random.key(0), input_size=2)
      >>> result = floss(model, params, adding_problem(0, n=16, length=20), k=2, steps=4,
      ...                optimizer=optax.adam(1e-2), key=jax.random.key(1), batch_size=8,
      ...                logging=Logging(every=2, progress=False))
      >>> [row["step"] for row in result.history], sorted(result.state.params)
      ([2, 4], ['body', 'head'])
    """
    _check_flossing_args(model, k, 1.0, 1, inputs, warmup, "floss: ")
    options = Flossing(model, k, inputs=inputs, warmup=warmup)

    def loss_fn(p, batch):
        F = _flossing_term(options, p, batch)
        return F, {"flossing": F}

    return fit(
        loss_fn,
        optimizer,
        params,
        train_data,
        key=key,
        steps=steps,
        batch_size=batch_size,
        has_aux=True,
        logging=logging,
    )
