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
import time
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
from seqjax.train.options import Checkpoints, Evaluation, Logging, _old_keywords_error
from seqjax.train.state import TrainState, _as_key, init_train_state
from seqjax.train.step import _call_loss, _eval_step_on, evaluate, make_train_step

__all__ = ["fit", "FitResult", "NonFiniteError"]


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
        ``epoch``, ``loss``/``grad_norm`` (means over the interval), ``grad_norm_max``,
        ``clipped_frac``, ``skipped`` (total), ``steps_per_sec``, ``time``, and ``eval_*``
        where an evaluation ran (see ``History``).
    """

    state: TrainState
    history: list[dict]


# --------------------------------------------------------------------------- the parts


def _check_arguments(
    steps, epochs, steps_per_call, on_nonfinite, max_skipped, evaluation, checkpoints, logging
):
    """The checks that tie ``fit``'s arguments and option groups together; returns ``steps_per_call``."""
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
    intervals = [("Logging.every", logging.every)]
    if evaluation is not None:
        intervals.append(("Evaluation.every", evaluation.every))
    if checkpoints is not None:
        intervals.append(("Checkpoints.every", checkpoints.every))
    intervals.append(("steps", steps))
    for name, v in intervals:
        if v is not None and v % k:
            raise ValueError(f"{name}={v} must be a multiple of steps_per_call={k}.")
    if evaluation is not None and evaluation.every is not None and evaluation.every % logging.every:
        raise ValueError(
            f"Evaluation.every={evaluation.every} must be a multiple of Logging.every={logging.every} "
            "(evaluations are reported in the log rows)."
        )
    return k


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


def _check_loss_traces(loss_fn, params, batch, has_aux: bool, with_key: bool) -> None:
    """Trace ``loss_fn`` abstractly (``jax.eval_shape``) on ``batch``: a ``ValueError`` before any compute."""
    try:
        jax.eval_shape(
            lambda p, b: _call_loss(loss_fn, p, b, jax.random.key(0), has_aux, with_key), params, batch
        )
    except ValueError:
        raise
    except Exception as e:
        shapes = jax.tree_util.tree_map(lambda a: f"{np.shape(a)} {np.asarray(a).dtype}", batch)
        raise ValueError(
            f"loss_fn fails on the first training batch (leaves: {shapes}): {type(e).__name__}: {e}"
        ) from e


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
        _check_same(_spec(src.first()), ref, "Evaluation.data")
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
    history: History, ckpts: _RunCheckpoints | None, state, bad_step: int, epoch: int, why: str
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
    return NonFiniteError(
        f"non-finite loss/gradient/params at step {bad_step} (1-based; epoch {epoch}): {why}. "
        f"The update was not applied, so the params are those after step {bad_step - 1}{where}.",
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
    k = _check_arguments(
        steps, epochs, steps_per_call, on_nonfinite, max_skipped, evaluation, checkpoints, logging
    )
    data_key, state_key = jax.random.split(key)

    # the data, the mesh and the evaluation, all checked before any compute
    src = _source(train_data, batch_size, shuffle, data_key, "train_data")
    if epochs is not None and src.per_epoch is None and isinstance(src, _Fn):
        raise ValueError("epochs needs finite data; a batch function is endless: pass steps=.")
    if epochs is not None and src.per_epoch is not None and src.per_epoch % k:
        raise ValueError(f"the {src.per_epoch} batches per epoch must be a multiple of steps_per_call={k}.")
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

    train_step = make_train_step(
        loss_fn, optimizer, has_aux=has_aux, with_key=with_key, fused=k > 1, mesh=mesh
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
    history = History(logging, total=total, start_step=pos.step, rows=rows, start_time=t_start)
    try:
        for group in _batch_groups(src, k, pos, total, epochs):
            for j, b in enumerate(group):
                _check_same(_spec(b), ref, f"batch {pos.step + j} of train_data")
            batch = group[0] if k == 1 else jax.tree_util.tree_map(lambda *xs: np.stack(xs), *group)
            state, metrics = train_step(state, _place_batch(batch, mesh, k > 1))
            history.add(metrics, steps=k)
            if on_nonfinite == "stop":
                finite = np.reshape(_to_host(metrics["finite"]), (-1,))
                if not finite.all():
                    j = int(np.argmin(finite))
                    bad_loss = np.reshape(_to_host(metrics["loss"]), (-1,))[j]
                    raise _nonfinite_error(
                        history, ckpts, state, pos.step + 1 + j, pos.epoch, f"loss={bad_loss}"
                    )
            pos.advance(k, src.per_epoch)
            last = pos.finished(total, epochs)
            stop = False
            if pos.step % logging.every == 0 or last:
                stop = _log(history, state, pos, evaluator, final=last)
                if max_skipped is not None and int(state.skipped) > max_skipped:
                    why = f"{int(state.skipped)} steps skipped in all (max_skipped={max_skipped})"
                    raise _nonfinite_error(history, ckpts, state, pos.step, pos.epoch, why)
            if ckpts is not None and ckpts.due(pos.step) and not last:
                ckpts.save(state, pos, history.rows)
            if stop:
                break
        if history.pending:
            _log(history, state, pos, evaluator, final=True)
        if ckpts is not None:
            ckpts.save(state, pos, history.rows)
    finally:
        history.close()
    return FitResult(state, history.rows)
