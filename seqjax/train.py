"""Training: one compiled optax step, a safe ``fit`` loop, checkpoints and data parallelism.

The contract, in one place::

    state = init_train_state(params, optimizer, key=key)   # TrainState(params, opt_state, step, key, skipped)
    step = make_train_step(loss_fn, optimizer)             # jitted, donates `state`, compiles once
    state, metrics = step(state, batch)                    # metrics: loss, grad_norm, finite, [clipped], aux
    result = fit(loss_fn, optimizer, params, data, key=key, steps=1000)   # the loop around it

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
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from seqjax._util import positive_int

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
    "save_checkpoint",
    "restore_checkpoint",
    "data_parallel_mesh",
]

log = logging.getLogger("seqjax.train")


# --------------------------------------------------------------------------- state


class TrainState(NamedTuple):
    """Everything a training step reads and writes (a pytree; donated to the step).

    Attributes:
      params: the model params (any pytree of arrays).
      opt_state: the optax state of ``optimizer.init(params)``.
      step: int32 scalar, the number of steps taken (skipped non-finite steps included).
      key: typed PRNG key; each step splits it and hands one half to ``loss_fn`` (``with_key``).
      skipped: int32 scalar, how many steps were skipped because something was non-finite.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    skipped: jax.Array


def _as_key(key, name="key"):
    if key is None:
        raise ValueError(f"{name} is required: pass {name}=jax.random.key(seed) (explicit randomness).")
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{name} must be a single PRNG key (shape ()), got shape {key.shape}.")
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(
        f"{name} must be a PRNG key from jax.random.key(seed), got dtype {key.dtype} shape {key.shape}."
    )


def init_train_state(params: Any, optimizer: optax.GradientTransformation, *, key: jax.Array) -> TrainState:
    """A fresh ``TrainState``: ``opt_state = optimizer.init(params)``, ``step = skipped = 0``.

    Args:
      params: the initial params pytree.
      optimizer: any ``optax.GradientTransformation``.
      key: PRNG key for the per-step keys handed to ``loss_fn`` (dropout).

    Returns:
      ``TrainState(params, opt_state, step, key, skipped)``.
    """
    return TrainState(
        params,
        optimizer.init(params),
        jnp.zeros((), jnp.int32),
        _as_key(key),
        jnp.zeros((), jnp.int32),
    )


# --------------------------------------------------------------------------- clipping


class ClipState(NamedTuple):
    """State of ``track_clipping``: the inner state and whether the last update was changed.

    Attributes:
      inner: the wrapped transformation's state.
      clipped: bool scalar, true when the last call changed any gradient entry.
    """

    inner: Any
    clipped: jax.Array


def track_clipping(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap a clipping transformation so its state records whether it clipped.

    ``clipped = any(u_out != u_in)`` over all leaves: exact for every rule that passes an
    unclipped gradient through unchanged (``optax.clip_by_global_norm``, ``optax.clip``,
    ``optax.adaptive_grad_clip``, ``optax.clip_by_block_rms``, a user's own). The updates are
    exactly ``inner``'s. ``make_train_step`` finds every ``ClipState`` in the optimizer
    state and reports ``metrics["clipped"]`` (true if any of them clipped).

    Args:
      inner: an ``optax.GradientTransformation`` (typically a clipping one).

    Returns:
      An ``optax.GradientTransformation`` with state ``ClipState``.

    Example::

        opt = optax.chain(track_clipping(optax.clip(0.5)), optax.sgd(0.1))
    """

    def init_fn(params):
        return ClipState(inner.init(params), jnp.zeros((), bool))

    def update_fn(updates, state, params=None):
        new, inner_state = inner.update(updates, state.inner, params)
        changed = [
            jnp.any(a != b)
            for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(updates), strict=True)
        ]
        flag = jnp.any(jnp.stack(changed)) if changed else jnp.zeros((), bool)
        return new, ClipState(inner_state, flag)

    return optax.GradientTransformation(init_fn, update_fn)


def clipped(
    optimizer: optax.GradientTransformation,
    *,
    max_norm: float | None = None,
    clip_value: float | None = None,
    adaptive: float | None = None,
    adaptive_eps: float = 1e-3,
) -> optax.GradientTransformation:
    r"""``optax.chain(track_clipping(clip), optimizer)``: gradient clipping in front of any optimizer.

    Exactly one rule:

    * ``max_norm``: global-norm clipping (Pascanu, Mikolov & Bengio 2013),
      ``g <- g * min(1, max_norm / ||g||_2)`` with ``||g||_2`` over all leaves
      (``optax.clip_by_global_norm``).
    * ``clip_value``: element-wise value clipping ``g <- clip(g, -c, c)`` (``optax.clip``), the
      fixed-threshold clipping of the classical RNN literature (e.g. Graves 2013).
    * ``adaptive``: unit-wise adaptive clipping (Brock et al. 2021), ``g_i <- g_i *
      min(1, lambda max(||w_i||, eps) / ||g_i||)`` (``optax.adaptive_grad_clip``).

    Args:
      optimizer: the optax transformation applied after clipping.
      max_norm, clip_value, adaptive: the threshold of the chosen rule (positive).
      adaptive_eps: ``eps`` of adaptive clipping.

    Returns:
      An ``optax.GradientTransformation`` (an ordinary ``optax.chain``).
    """
    given = {
        k: v
        for k, v in (("max_norm", max_norm), ("clip_value", clip_value), ("adaptive", adaptive))
        if v is not None
    }
    if len(given) != 1:
        raise ValueError(
            f"clipped needs exactly one of max_norm, clip_value, adaptive; got {sorted(given) or 'none'}."
        )
    ((name, value),) = given.items()
    if not float(value) > 0:
        raise ValueError(f"{name} must be positive, got {value}.")
    if name == "max_norm":
        clip = optax.clip_by_global_norm(value)
    elif name == "clip_value":
        clip = optax.clip(value)
    else:
        clip = optax.adaptive_grad_clip(value, eps=adaptive_eps)
    return optax.chain(track_clipping(clip), optimizer)


def clipped_adam(
    learning_rate: float | optax.Schedule,
    *,
    max_norm: float | None = 1.0,
    clip_value: float | None = None,
    adaptive: float | None = None,
    **adam_kwargs,
) -> optax.GradientTransformation:
    """Adam behind gradient clipping: ``clipped(optax.adam(learning_rate, **adam_kwargs), ...)``.

    The default is global-norm clipping at 1; pass ``clip_value=`` or ``adaptive=`` (with
    ``max_norm=None``) for the other rules. See ``clipped``.

    Example::

        opt = clipped_adam(1e-2, max_norm=1.0)
        # == optax.chain(track_clipping(optax.clip_by_global_norm(1.0)), optax.adam(1e-2))
    """
    if clip_value is not None or adaptive is not None:
        if max_norm == 1.0:  # the default: the caller chose another rule
            max_norm = None
    return clipped(
        optax.adam(learning_rate, **adam_kwargs), max_norm=max_norm, clip_value=clip_value, adaptive=adaptive
    )


def _clip_flags(opt_state) -> list[jax.Array]:
    nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ClipState))
    return [n.clipped for n in nodes if isinstance(n, ClipState)]


# --------------------------------------------------------------------------- steps


def _all_finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.ones((), bool)


def _call_loss(loss_fn, params, batch, key, has_aux, with_key):
    out = loss_fn(params, batch, key) if with_key else loss_fn(params, batch)
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("has_aux=True needs loss_fn to return (loss, aux_dict).")
        loss, aux = out
    else:
        loss, aux = out, {}
    loss = jnp.asarray(loss)
    if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
        raise ValueError(
            f"loss_fn must return a float scalar loss, got shape {loss.shape} dtype {loss.dtype}"
            + (
                " (with has_aux=False; return (loss, aux) and pass has_aux=True for extras)."
                if not has_aux
                else "."
            )
        )
    if not isinstance(aux, dict):
        raise ValueError(f"aux must be a dict of scalars, got {type(aux).__name__}.")
    return loss, aux


def _shardings(mesh: Mesh | None, fused: bool):
    if mesh is None:
        return None, None
    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(None, "data") if fused else P("data"))
    return rep, data


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    with_key: bool = False,
    skip_nonfinite: bool = True,
    fused: bool = False,
    donate: bool = True,
    mesh: Mesh | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    r"""A ``jax.jit``-compiled training step ``(state, batch) -> (state, metrics)``.

    One step: ``(L, aux), g = value_and_grad(loss_fn)(params, batch)``;
    ``u, s' = optimizer.update(g, opt_state, params)``; ``params' = params + u``. It compiles
    once per batch shape (keep batch shapes fixed: ``fit`` drops the incomplete last batch)
    and donates the input state's buffers (``donate=False`` to keep them).

    Metrics (float32/bool scalars): ``loss``; ``grad_norm`` = :math:`\|g\|_2` over all
    leaves *before* any clipping; ``finite`` (loss, gradients and new params all finite);
    ``clipped`` when the optimizer contains a ``track_clipping`` stage; and ``loss_fn``'s aux.

    With ``skip_nonfinite`` (default) a non-finite step leaves params and optimizer state
    bit-for-bit unchanged and adds 1 to ``state.skipped``; ``state.step`` and ``state.key``
    advance either way.

    With ``fused=True`` the step takes a stack of batches (every leaf gains a leading axis
    of ``n`` steps) and runs ``n`` steps in one call with ``lax.scan``; metrics gain the
    same leading axis. The result equals ``n`` single steps.

    With ``mesh`` (a ``Mesh`` with a ``"data"`` axis) the batch axis is sharded over
    ``"data"`` and the state replicated (data parallelism; XLA all-reduces the gradient).

    Args:
      loss_fn: ``(params, batch) -> loss`` or ``(params, batch, key) -> loss`` (``with_key``),
        returning ``(loss, aux)`` with ``has_aux``.
      optimizer: any ``optax.GradientTransformation``.
      has_aux, with_key: see above.
      skip_nonfinite: skip (and count) non-finite updates.
      fused: run a stack of batches in one call.
      donate: donate the state argument.
      mesh: optional data-parallel mesh.

    Returns:
      The jitted step.
    """

    def one(state: TrainState, batch):
        key, sub = jax.random.split(state.key)

        def f(p):
            return _call_loss(loss_fn, p, batch, sub, has_aux, with_key)

        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(state.params)
        gnorm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
        metrics = {"loss": loss, "grad_norm": gnorm, "finite": finite}
        flags = _clip_flags(opt_state)
        if flags:
            metrics["clipped"] = jnp.any(jnp.stack(flags))
        for k, v in aux.items():
            if k in metrics:
                raise ValueError(f"aux key {k!r} clashes with a built-in metric; rename it.")
            metrics[k] = v
        skipped = state.skipped
        if skip_nonfinite:
            keep = lambda new, old: jnp.where(finite, new, old)
            params = jax.tree_util.tree_map(keep, params, state.params)
            opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
            skipped = skipped + (~finite).astype(jnp.int32)
        return TrainState(params, opt_state, state.step + 1, key, skipped), metrics

    fn = (lambda state, batches: jax.lax.scan(one, state, batches)) if fused else one
    rep, data = _shardings(mesh, fused)
    kw = {"donate_argnums": (0,) if donate else ()}
    if mesh is not None:
        kw.update(in_shardings=(rep, data), out_shardings=(rep, rep))
    return jax.jit(fn, **kw)


def make_eval_step(
    loss_fn: Callable,
    *,
    has_aux: bool = False,
    with_key: bool = False,
    mesh: Mesh | None = None,
) -> Callable[[Any, Any], dict]:
    """A jitted evaluation step ``(params, batch) -> {"loss": L, **aux}`` (no gradients).

    With ``with_key`` the loss is called as ``loss_fn(params, batch, None)``: ``key=None``
    means deterministic (no dropout).

    Args:
      loss_fn, has_aux, with_key: as in ``make_train_step``.
      mesh: optional data-parallel mesh (batch sharded on ``"data"``).

    Returns:
      The jitted eval step.
    """

    def ev(params, batch):
        loss, aux = _call_loss(loss_fn, params, batch, None, has_aux, with_key)
        return {"loss": loss, **aux}

    if mesh is None:
        return jax.jit(ev)
    rep, data = _shardings(mesh, False)
    return jax.jit(ev, in_shardings=(rep, data), out_shardings=rep)


def _leading(batch) -> int:
    return int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])


def evaluate(eval_step: Callable, params: Any, batches: Iterable) -> dict[str, float]:
    """Mean metrics over ``batches``, each batch weighted by its size (exact for per-example means).

    Args:
      eval_step: from ``make_eval_step``.
      params: the params.
      batches: an iterable of batches.

    Returns:
      ``{name: weighted mean}`` as Python floats.
    """
    totals: dict[str, Any] = {}
    n = 0
    for b in batches:
        m = eval_step(params, b)
        w = _leading(b)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + w * v
        n += w
    if n == 0:
        raise ValueError("evaluate got no batches.")
    return {k: float(v) / n for k, v in totals.items()}


# --------------------------------------------------------------------------- checkpoints


def _ckpt_tree(state: TrainState) -> dict:
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "key": jax.random.key_data(state.key),
        "skipped": state.skipped,
    }


def _manager(directory, keep):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=opts)


def save_checkpoint(
    directory: str | os.PathLike, state: TrainState, *, meta: dict | None = None, keep: int | None = 3
) -> bool:
    """Save ``state`` (and a JSON-able ``meta``) as checkpoint ``int(state.step)`` under ``directory``.

    Uses orbax-checkpoint (``CheckpointManager``; a checkpoint is written to a temporary
    directory and renamed when complete, so a crash never leaves a half-written "latest").
    Refuses non-finite states: returns ``False`` and writes nothing, so the last good
    checkpoint is never replaced by a bad one. Keeps the newest ``keep`` checkpoints.

    Args:
      directory: the checkpoint directory.
      state: the ``TrainState``.
      meta: extra JSON data (``fit`` stores the data position and the history).
      keep: how many checkpoints to keep (``None``: all).

    Returns:
      Whether a checkpoint was written.
    """
    import orbax.checkpoint as ocp

    if not bool(_all_finite((state.params, state.opt_state))):
        log.warning("not saving step %d: the state is not finite", int(state.step))
        return False
    step = int(state.step)
    mngr = _manager(directory, keep)
    try:
        if step in mngr.all_steps():
            return False
        args = {"state": ocp.args.StandardSave(_ckpt_tree(state)), "meta": ocp.args.JsonSave(meta or {})}
        mngr.save(step, args=ocp.args.Composite(**args))
        mngr.wait_until_finished()
    finally:
        mngr.close()
    return True


def restore_checkpoint(
    directory: str | os.PathLike, target: TrainState, *, step: int | None = None
) -> tuple[TrainState, dict] | None:
    """Restore the checkpoint ``step`` (default: the latest) into the structure of ``target``.

    Args:
      directory: the checkpoint directory.
      target: a ``TrainState`` with the right tree, shapes, dtypes and shardings (e.g.
        ``init_train_state`` of fresh params); its values are not used.
      step: which checkpoint; default the latest.

    Returns:
      ``(state, meta)``, or ``None`` when the directory holds no checkpoint.
    """
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        return None
    mngr = _manager(directory, None)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            return None
        tree = _ckpt_tree(target)
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
        )
        r = mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
    finally:
        mngr.close()
    t = r.state
    t = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), jax.tree_util.tree_leaves(t))
    key = jax.random.wrap_key_data(t["key"], impl=jax.random.key_impl(target.key))
    return TrainState(t["params"], t["opt_state"], t["step"], key, t["skipped"]), dict(r.meta or {})


# --------------------------------------------------------------------------- data


def data_parallel_mesh(*, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis ``Mesh`` named ``"data"`` over ``devices`` (default: ``jax.devices()``,
    all devices of all processes)."""
    devs = np.asarray(jax.devices() if devices is None else list(devices))
    return Mesh(devs, ("data",))


def _spec(batch):
    """(treedef, [(path, trailing shape, dtype)], batch size) of a host batch."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    if not leaves:
        raise ValueError("a batch must hold at least one array.")
    info = []
    sizes = []
    for path, x in leaves:
        shape = np.shape(x)
        if len(shape) == 0:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} is a scalar; every leaf needs a leading batch axis."
            )
        sizes.append(shape[0])
        info.append((jax.tree_util.keystr(path), tuple(shape[1:]), np.dtype(jnp.result_type(x))))
    if len(set(sizes)) != 1:
        desc = ", ".join(f"batch{p}: {(n,) + s}" for (p, s, _), n in zip(info, sizes, strict=True))
        raise ValueError(
            f"mismatched batch shapes: every leaf of a batch needs the same leading (batch) size, got {desc}."
        )
    return treedef, info, sizes[0]


def _check_same(spec, ref, where):
    treedef, info, _ = spec
    rdef, rinfo, _ = ref
    if treedef != rdef:
        raise ValueError(f"{where} has the tree {treedef} but the training batches have {rdef}.")
    for (p, s, d), (_, rs, rd) in zip(info, rinfo, strict=True):
        if s != rs:
            raise ValueError(
                f"{where}{p} has per-example shape {s} but the training batches have {rs} "
                "(shapes after the batch axis must match)."
            )
        if d != rd:
            raise ValueError(f"{where}{p} has dtype {d} but the training batches have {rd}; cast it.")


class _Arrays:
    """In-memory arrays: a pytree whose leaves share a leading example axis ``N``."""

    shuffleable = True

    def __init__(self, data, batch_size, shuffle, key, name, drop_remainder=True):
        leaves = jax.tree_util.tree_leaves(data)
        _, _, n = _spec(data) if leaves else (None, None, 0)
        if n == 0:
            raise ValueError(f"{name} is empty (0 examples); nothing to train on.")
        if batch_size is None or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer for array data, got {batch_size!r}.")
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} examples of {name}.")
        self.data = jax.tree_util.tree_map(np.asarray, data)
        self.n, self.batch_size, self.shuffle, self.key = n, int(batch_size), shuffle, key
        self.per_epoch = n // self.batch_size if drop_remainder else -(-n // self.batch_size)
        self._perm = (None, None)

    def _order(self, epoch):
        if not self.shuffle:
            return None
        if self._perm[0] != epoch:
            # NumPy PCG64 seeded by fold_in(key, epoch): no threefry kernel to compile per data size
            seed = np.asarray(jax.random.key_data(jax.random.fold_in(self.key, epoch))).ravel().tolist()
            self._perm = (epoch, np.random.default_rng(seed).permutation(self.n))
        return self._perm[1]

    def epoch(self, epoch, start):
        order = self._order(epoch)
        for i in range(start, self.per_epoch):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, self.n))
            idx = sl if order is None else order[sl]
            yield jax.tree_util.tree_map(lambda a, idx=idx: a[idx], self.data)

    def first(self):
        return next(self.epoch(0, 0))


class _Fn:
    """``fn(key) -> batch``: an endless stream; batch ``i`` uses ``fold_in(key, i)``."""

    shuffleable = False
    per_epoch = None

    def __init__(self, fn, key):
        self.fn, self.key = fn, key

    def epoch(self, epoch, start):
        for i in itertools.count(start):
            yield jax.tree_util.tree_map(np.asarray, self.fn(jax.random.fold_in(self.key, i)))

    def first(self):
        return jax.tree_util.tree_map(np.asarray, self.fn(jax.random.fold_in(self.key, 0)))


class _Iter:
    """An iterable of batches. Re-iterable ones (lists, objects with ``__iter__``) give one
    epoch per pass; a one-shot iterator is a single epoch. Resuming skips consumed batches."""

    shuffleable = False

    def __init__(self, data, name):
        self.name = name
        self.reiterable = iter(data) is not data
        if self.reiterable:
            self.data = data
            self._first = next(iter(data), None)
        else:
            head = next(data, None)
            self._first = head
            self.data = itertools.chain([head], data) if head is not None else data
        if self._first is None:
            raise ValueError(f"{name} is empty (it yielded no batches); nothing to train on.")
        self.per_epoch = len(data) if hasattr(data, "__len__") else None
        self._used = False

    def epoch(self, epoch, start):
        if not self.reiterable:
            if self._used:
                return iter(())
            self._used = True
        it = iter(self.data)
        return itertools.islice(it, start, None)

    def first(self):
        return self._first


def _source(data, batch_size, shuffle, key, name, drop_remainder=True):
    if callable(data) and not isinstance(data, (list, tuple, dict)):
        if shuffle:
            raise ValueError(
                f"shuffle=True needs array data; {name} is a batch function (it is random already)."
            )
        return _Fn(data, key)
    if isinstance(data, (np.ndarray, jax.Array)) or (
        isinstance(data, (tuple, dict))
        and all(isinstance(x, (np.ndarray, jax.Array)) for x in jax.tree_util.tree_leaves(data))
    ):
        return _Arrays(data, batch_size, True if shuffle is None else shuffle, key, name, drop_remainder)
    if isinstance(data, Iterable):
        if shuffle:
            raise ValueError(f"shuffle=True needs array data; {name} is an iterable of batches.")
        return _Iter(data, name)
    raise ValueError(
        f"{name} must be arrays (a pytree with a leading example axis), a function key -> batch, "
        f"or an iterable of batches; got {type(data).__name__}."
    )


# --------------------------------------------------------------------------- fit


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
      history: a list of rows (dicts) logged every ``log_every`` steps: ``step``, ``epoch``,
        ``loss``/``grad_norm`` (means over the interval), ``grad_norm_max``,
        ``clipped_frac``, ``skipped`` (total), ``steps_per_sec``, ``time``, and ``eval_*``
        where an evaluation ran.
    """

    state: TrainState
    history: list[dict]


def _to_host(x):
    return np.asarray(jax.device_get(x))


def _write_history(path, history):
    path = os.fspath(path)
    tmp = path + ".tmp"
    if path.endswith(".csv"):
        keys = list(dict.fromkeys(k for row in history for k in row))
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)
    else:
        with open(tmp, "w") as f:
            json.dump(history, f, indent=1)
    os.replace(tmp, path)


def _progress(enabled, total, initial):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _place_batch(batch, mesh, fused):
    if mesh is None:
        return batch
    sh = NamedSharding(mesh, P(None, "data") if fused else P("data"))
    pc, pi = jax.process_count(), jax.process_index()

    def put(a):
        if pc > 1:  # each process feeds its own slice of the global batch
            ax = 1 if fused else 0
            m = a.shape[ax] // pc
            a = np.take(a, np.arange(pi * m, (pi + 1) * m), axis=ax)
            shape = list(a.shape)
            shape[ax] *= pc
            return jax.make_array_from_process_local_data(sh, a, tuple(shape))
        return jax.device_put(a, sh)

    return jax.tree_util.tree_map(put, batch)


def _replicate(tree, mesh):
    """Place a host/single-device pytree replicated on every device of ``mesh`` (all processes)."""
    rep = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, rep)

    def put(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = jax.make_array_from_process_local_data(rep, np.asarray(jax.random.key_data(a)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        return jax.make_array_from_process_local_data(rep, np.asarray(a))

    return jax.tree_util.tree_map(put, tree)


def _copy_tree(t):
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), t)


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
    eval_data: Any = None,
    eval_every: int | None = None,
    eval_batch_size: int | None = None,
    log_every: int = 50,
    steps_per_call: int = 1,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int | None = 3,
    resume: bool = False,
    on_nonfinite: str = "skip",
    max_skipped: int | None = None,
    callbacks: Sequence[Callable] = (),
    history_path: str | os.PathLike | None = None,
    progress: bool | None = None,
    mesh: Mesh | str | None = "auto",
) -> FitResult:
    r"""Train ``params`` to minimise ``loss_fn`` with ``optimizer``: the compiled step in a loop.

    Data (``train_data``; the same kinds for ``eval_data``):

    * arrays: a pytree (array, tuple or dict) whose leaves share a leading example axis
      ``N``; batches of ``batch_size`` (the incomplete last batch is dropped, so the step
      compiles once), reshuffled every epoch with ``fold_in(data_key, epoch)``;
    * a function ``key -> batch`` (synthetic tasks): batch ``i`` uses ``fold_in(data_key, i)``;
    * an iterable of batches (one pass per epoch; resuming skips the batches already used).

    Before any compute, ``fit`` checks the data (non-empty; every leaf of a batch with the
    same batch size; every batch and the eval data with the tree, per-example shapes and
    dtypes of the first batch) and traces ``loss_fn`` abstractly on the first batch
    (``jax.eval_shape``), so a wrong label dtype or shape is a ``ValueError`` at once.

    Keys: ``data_key, state_key = split(key)``; the state's key feeds ``loss_fn`` (``with_key``).

    Logging: every ``log_every`` steps a history row (means over the interval) is appended,
    the progress bar (tqdm; on when stderr is a terminal, ``progress=`` to force) shows loss,
    gradient norm and steps/s, and each callback is called as ``cb(row, state)``; a callback
    returning ``True`` stops training. Evaluation runs every ``eval_every`` steps (a multiple
    of ``log_every``; default: at each log row) and at the end. ``history_path`` (``.json``
    or ``.csv``) is rewritten atomically at every log row.

    Checkpoints (``checkpoint_dir``): every ``checkpoint_every`` steps and at the end, with
    orbax: params, optimizer state, step, key, skipped count, the data position and the
    history. ``resume=True`` continues from the latest checkpoint; the result is bit-for-bit
    the uninterrupted run's (same batches, same keys, same compiled step). Non-finite states
    are never saved.

    Non-finite steps are never applied (see ``make_train_step``). ``on_nonfinite="skip"``
    counts them and goes on (``max_skipped``: raise ``NonFiniteError`` once more were
    skipped); ``"stop"`` checks every step and raises ``NonFiniteError`` naming the step.

    Data parallelism: ``mesh="auto"`` (default) uses all devices when there is more than
    one (``data_parallel_mesh()``), ``None`` a single device, or pass a ``Mesh`` with a
    ``"data"`` axis. The batch is sharded on its leading axis; params and optimizer state
    are replicated. Under ``jax.distributed.initialize`` each process feeds its slice of
    every global batch.

    Args:
      loss_fn: ``(params, batch) -> loss`` (see ``make_train_step`` for ``has_aux``/``with_key``).
      optimizer: any ``optax.GradientTransformation``.
      params: initial params, or a ``TrainState`` to continue from.
      train_data: see above.
      key: PRNG key (required).
      steps / epochs: how long (exactly one).
      batch_size: for array data.
      shuffle: reshuffle array data each epoch (default ``True`` for arrays).
      eval_data, eval_every, eval_batch_size: periodic evaluation; array eval data is read in
        batches of ``eval_batch_size`` (default: all at once up to 4096 examples, else
        ``batch_size``), the last one possibly smaller, and averaged weighted by size.
      log_every: steps between history rows.
      steps_per_call: fuse this many steps in one compiled call (``lax.scan``); must divide
        ``steps`` (or the batches per epoch) and the ``*_every`` intervals.
      checkpoint_dir, checkpoint_every, keep_checkpoints, resume: checkpointing.
      on_nonfinite, max_skipped: non-finite policy.
      callbacks: ``cb(row, state) -> bool | None``.
      history_path: where to write the history.
      progress: show a progress bar (default: only on a terminal).
      mesh: ``"auto"``, ``None`` or a ``Mesh``.

    Returns:
      ``FitResult(state, history)``.

    Raises:
      ValueError: bad data or arguments (before any compute).
      NonFiniteError: see above.

    Example::

        result = fit(loss, clipped_adam(1e-2), params, lambda k: adding_problem(k, 64, 30),
                     key=jax.random.key(0), steps=300, log_every=100)
        print(result.history[-1]["loss"])
    """
    t_start = time.perf_counter()
    key = _as_key(key)
    # ---------------------------------------------------------------- argument checks
    if (steps is None) == (epochs is None):
        raise ValueError(f"fit needs exactly one of steps or epochs; got steps={steps!r}, epochs={epochs!r}.")
    for name, v in (
        ("steps", steps),
        ("epochs", epochs),
        ("log_every", log_every),
        ("steps_per_call", steps_per_call),
        ("eval_every", eval_every),
        ("checkpoint_every", checkpoint_every),
    ):
        if v is not None:
            positive_int(v, name)
    if on_nonfinite not in ("skip", "stop"):
        raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}.")
    k = int(steps_per_call)
    for name, v in (
        ("log_every", log_every),
        ("eval_every", eval_every),
        ("checkpoint_every", checkpoint_every),
        ("steps", steps),
    ):
        if v is not None and v % k:
            raise ValueError(f"{name}={v} must be a multiple of steps_per_call={k}.")
    if eval_every is not None and eval_every % log_every:
        raise ValueError(
            f"eval_every={eval_every} must be a multiple of log_every={log_every} "
            "(evaluations are reported in the log rows)."
        )
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir.")
    data_key, state_key = jax.random.split(key)

    # ---------------------------------------------------------------- data checks
    src = _source(train_data, batch_size, shuffle, data_key, "train_data")
    if epochs is not None and src.per_epoch is None and isinstance(src, _Fn):
        raise ValueError("epochs needs finite data; a batch function is endless: pass steps=.")
    if epochs is not None and src.per_epoch is not None and src.per_epoch % k:
        raise ValueError(f"the {src.per_epoch} batches per epoch must be a multiple of steps_per_call={k}.")
    first = src.first()
    ref = _spec(first)
    if mesh == "auto":
        mesh = data_parallel_mesh() if jax.device_count() > 1 else None
    if mesh is not None:
        if "data" not in mesh.axis_names:
            raise ValueError(f"mesh needs an axis named 'data', got axes {mesh.axis_names}.")
        nd = mesh.shape["data"]
        if ref[2] % nd:
            raise ValueError(
                f"the batch size {ref[2]} must be divisible by the {nd} devices of the mesh's 'data' axis "
                "(or pass mesh=None for one device)."
            )
    ev_src = None
    if eval_data is not None:
        if callable(eval_data) and not isinstance(eval_data, (list, tuple, dict)):
            raise ValueError("eval_data must be arrays or an iterable of batches (finite), not a function.")
        n_ev = _leading_any(eval_data)
        if eval_batch_size is not None:
            ev_bs = eval_batch_size
        else:  # one compiled eval call for small eval sets
            ev_bs = n_ev if n_ev <= 4096 else (batch_size or ref[2])
        ev_src = _source(
            eval_data,
            min(ev_bs, max(_leading_any(eval_data), 1)),
            False,
            data_key,
            "eval_data",
            drop_remainder=False,
        )
        _check_same(_spec(ev_src.first()), ref, "eval_data")
        if mesh is not None and jax.process_count() > 1 and isinstance(ev_src, _Arrays):
            nd = mesh.shape["data"]
            if ev_src.batch_size % nd or (ev_src.n % ev_src.batch_size) % nd:
                raise ValueError(
                    f"with several processes every eval batch must divide over the {nd} devices: "
                    f"{ev_src.n} eval examples in batches of {ev_src.batch_size} do not; set eval_batch_size."
                )
    if isinstance(params, TrainState):
        state0 = params
    else:
        state0 = init_train_state(params, optimizer, key=state_key)
    state0 = _copy_tree(state0)  # the step donates its input: never the caller's arrays
    try:
        out = jax.eval_shape(
            lambda p, b: _call_loss(loss_fn, p, b, jax.random.key(0), has_aux, with_key), state0.params, first
        )
    except ValueError:
        raise
    except Exception as e:
        shapes = jax.tree_util.tree_map(lambda a: f"{np.shape(a)} {np.asarray(a).dtype}", first)
        raise ValueError(
            f"loss_fn fails on the first training batch (leaves: {shapes}): {type(e).__name__}: {e}"
        ) from e
    del out

    # ---------------------------------------------------------------- compiled steps
    train_step = make_train_step(
        loss_fn, optimizer, has_aux=has_aux, with_key=with_key, fused=k > 1, mesh=mesh
    )
    eval_step = make_eval_step(loss_fn, has_aux=has_aux, with_key=with_key, mesh=mesh)
    eval_step_local = (
        make_eval_step(loss_fn, has_aux=has_aux, with_key=with_key) if mesh is not None else eval_step
    )

    if mesh is not None:
        state0 = _replicate(state0, mesh)

    # ---------------------------------------------------------------- resume
    history: list[dict] = []
    epoch, index = 0, 0
    ckpt_step = None
    if resume:
        restored = restore_checkpoint(checkpoint_dir, state0)
        if restored is not None:
            state0, meta = restored
            epoch, index = meta["position"]
            history = list(meta.get("history", []))
            ckpt_step = int(state0.step)
            for name, v in (("batch_size", batch_size), ("steps_per_call", k)):
                if meta.get(name) != v:
                    raise ValueError(
                        f"resume: the checkpoint was made with {name}={meta.get(name)}, not {v}."
                    )
    state = state0
    start_step = int(state.step)
    total = steps if steps is not None else (epochs * src.per_epoch if src.per_epoch else None)

    def eval_now(params):
        def batches():
            for b in ev_src.epoch(0, 0):
                nd = mesh.shape["data"] if mesh is not None else 1
                if mesh is not None and _leading(b) % nd == 0:
                    yield eval_step, _place_batch(b, mesh, False)
                elif mesh is not None:  # a batch that does not divide: replicate it
                    yield eval_step_local, jax.device_put(b, NamedSharding(mesh, P()))
                else:
                    yield eval_step_local, b

        totals, n = {}, 0
        for fn, b in batches():
            m = fn(params, b)
            w = _leading(b)
            for kk, v in m.items():
                totals[kk] = totals.get(kk, 0.0) + w * _to_host(v).astype(np.float64)
            n += w
        return {"eval_" + kk: float(v / n) for kk, v in totals.items()}

    def save(st):
        nonlocal ckpt_step
        meta = {"position": [epoch, index], "history": history, "batch_size": batch_size, "steps_per_call": k}
        if save_checkpoint(checkpoint_dir, st, meta=meta, keep=keep_checkpoints):
            ckpt_step = int(st.step)

    bar = _progress(progress, total, start_step)
    pending: list[dict] = []
    t_last, s_last = time.perf_counter(), start_step

    def flush(st, gstep, force_eval=False):
        nonlocal t_last, s_last, pending
        ms = jax.device_get(pending)
        pending = []
        cat = {kk: np.concatenate([np.reshape(m[kk], (-1,)) for m in ms]) for kk in ms[0]} if ms else {}
        now = time.perf_counter()
        row: dict[str, Any] = {"step": gstep, "epoch": epoch}
        finite = cat.get("finite", np.ones(0, bool))
        for kk, v in cat.items():
            if kk == "finite":
                continue
            vals = v[finite] if kk in ("loss", "grad_norm") and finite.any() else v
            if kk == "clipped":
                row["clipped_frac"] = float(np.mean(v))
            else:
                row[kk] = float(np.mean(vals.astype(np.float64)))
        if "grad_norm" in cat:
            row["grad_norm_max"] = float(np.max(cat["grad_norm"]))
        row["skipped"] = int(st.skipped)
        row["steps_per_sec"] = (gstep - s_last) / max(now - t_last, 1e-9)
        row["time"] = now - t_start
        t_last, s_last = now, gstep
        if ev_src is not None and (force_eval or eval_every is None or gstep % eval_every == 0):
            row.update(eval_now(st.params))
        history.append(row)
        if bar is not None:
            post = {
                "loss": f"{row.get('loss', float('nan')):.4g}",
                "gnorm": f"{row.get('grad_norm', float('nan')):.3g}",
            }
            if "eval_loss" in row:
                post["eval"] = f"{row['eval_loss']:.4g}"
            bar.set_postfix(post, refresh=False)
        if history_path is not None:
            _write_history(history_path, history)
        stop = False
        for cb in callbacks:
            stop = bool(cb(row, st)) or stop
        return stop

    def raise_nonfinite(st, bad_step, why):
        if bar is not None:
            bar.close()
        if history_path is not None and history:
            _write_history(history_path, history)
        where = (
            f"; the last good checkpoint is step {ckpt_step} in {checkpoint_dir}"
            if ckpt_step is not None
            else ""
        )
        raise NonFiniteError(
            f"non-finite loss/gradient/params at step {bad_step} (1-based; epoch {epoch}): {why}. "
            f"The update was not applied, so the params are those after step {bad_step - 1}{where}.",
            bad_step,
            st,
            history,
            ckpt_step,
        )

    # ---------------------------------------------------------------- loop
    gstep = start_step
    stop = False
    try:
        while not stop:
            if (total is not None and gstep >= total) or (epochs is not None and epoch >= epochs):
                break
            it = src.epoch(epoch, index)
            got_any = exhausted = False
            while not stop and not (total is not None and gstep >= total):
                group = list(itertools.islice(it, k))
                if len(group) < k:
                    if group:
                        raise ValueError(
                            f"train_data ran out mid-group: {len(group)} batches left but steps_per_call={k}."
                        )
                    exhausted = True
                    break
                got_any = True
                for j, b in enumerate(group):
                    _check_same(_spec(b), ref, f"batch {gstep + j} of train_data")
                batch = group[0] if k == 1 else jax.tree_util.tree_map(lambda *xs: np.stack(xs), *group)
                state, m = train_step(state, _place_batch(batch, mesh, k > 1))
                gstep += k
                index += k
                pending.append(m)
                if bar is not None:
                    bar.update(k)
                if on_nonfinite == "stop":
                    fin = np.reshape(_to_host(m["finite"]), (-1,))
                    if not fin.all():
                        j = int(np.argmin(fin))
                        bad_loss = np.reshape(_to_host(m["loss"]), (-1,))[j]
                        raise_nonfinite(state, gstep - k + 1 + j, f"loss={bad_loss}")
                if src.per_epoch is not None and index >= src.per_epoch:
                    exhausted = True
                    epoch, index = epoch + 1, 0
                last = (total is not None and gstep >= total) or (epochs is not None and epoch >= epochs)
                if gstep % log_every == 0 or last:
                    stop = flush(state, gstep, force_eval=last)
                    if max_skipped is not None and int(state.skipped) > max_skipped:
                        raise_nonfinite(
                            state,
                            gstep,
                            f"{int(state.skipped)} steps skipped in all (max_skipped={max_skipped})",
                        )
                if (
                    checkpoint_dir is not None
                    and checkpoint_every
                    and gstep % checkpoint_every == 0
                    and not last
                ):
                    save(state)
                if exhausted:
                    break
            if not got_any:  # a one-shot iterator is used up, or an iterable gave nothing this time
                break
            if exhausted and (src.per_epoch is None):
                epoch, index = epoch + 1, 0
        if pending:
            flush(state, gstep, force_eval=True)
        if checkpoint_dir is not None:
            save(state)
    finally:
        if bar is not None:
            bar.close()
    return FitResult(state, history)


def _leading_any(data) -> int:
    leaves = jax.tree_util.tree_leaves(data)
    if leaves and all(isinstance(x, (np.ndarray, jax.Array)) for x in leaves):
        return int(np.shape(leaves[0])[0]) if np.ndim(leaves[0]) else 0
    return 1 << 30
