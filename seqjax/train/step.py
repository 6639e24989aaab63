"""The compiled steps: ``make_train_step``, ``make_eval_step`` and ``evaluate``.

``loss_fn(params, batch) -> loss`` (or ``-> (loss, aux)`` with ``has_aux``, and
``loss_fn(params, batch, key)`` with ``with_key``; evaluation passes ``key=None``). The
loss is a float scalar ``()``; ``aux`` a dict of scalars that joins the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from seqjax.train.clipping import _clip_flags
from seqjax.train.data import _batch_sharding, _leading, _place_batch
from seqjax.train.options import Flossing
from seqjax.train.state import TrainState

__all__ = ["make_train_step", "make_eval_step", "evaluate"]


def _all_finite(tree: Any) -> jax.Array:
    """``()`` bool: every inexact leaf of ``tree`` is finite (no NaN, no inf)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.ones((), bool)


def _call_loss(loss_fn, params, batch, key, has_aux: bool, with_key: bool):
    """``(loss: () float, aux: dict)`` from ``loss_fn``, with the contract checked."""
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


def _flossing_term(flossing: Flossing, params, batch) -> jax.Array:
    """``flossing_loss(model, params, inputs(batch), k=k, warmup=warmup)``, a ``()`` float."""
    from seqjax.spectrum.flossing import flossing_loss

    f = flossing
    return flossing_loss(f.model, params, f.read_inputs(batch), k=f.k, warmup=f.warmup)


def _check_flossing_traces(
    flossing: Flossing, params, batch, where: str = "the first training batch"
) -> None:
    """Trace the flossing loss abstractly on ``batch``: a ``ValueError`` (``k`` too large, the
    wrong ``inputs``) before any compute."""
    try:
        jax.eval_shape(lambda p, b: _flossing_term(flossing, p, b), params, batch)
    except ValueError as e:
        raise ValueError(f"Flossing on {where}: {e}") from e
    except Exception as e:
        how = (
            "" if flossing.inputs is not None else " (Flossing.inputs defaults to batch[0]; pass inputs=...)"
        )
        raise ValueError(f"Flossing fails on {where}{how}: {type(e).__name__}: {e}") from e


def _shardings(mesh: Mesh | None, fused: bool):
    """``(replicated, batch)`` shardings on ``mesh``, or ``(None, None)``."""
    if mesh is None:
        return None, None
    return NamedSharding(mesh, P()), _batch_sharding(mesh, fused)


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
    flossing: Flossing | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    r"""A ``jax.jit``-compiled training step ``(state, batch) -> (state, metrics)``.

    One step, with ``k, k' = split(state.key)``:

    $$
    (L, \mathrm{aux}),\, g = \mathrm{value\_and\_grad}(\ell)(\theta, b, k'), \qquad
    u, s' = \mathrm{optimizer.update}(g, s, \theta), \qquad \theta' = \theta + u.
    $$

    It compiles once per batch shape (keep batch shapes fixed: ``fit`` drops the incomplete
    last batch) and donates the input state's buffers (``donate=False`` to keep them).

    Metrics (``()`` float32/bool each): ``loss`` $L$; ``grad_norm``
    $\|g\|_2 = (\sum_\ell \sum_i g_{\ell,i}^2)^{1/2}$ over all leaves *before* any
    clipping; ``finite`` ($L$, $g$ and $\theta'$ all finite); ``clipped``
    when the optimizer contains a ``track_clipping`` stage; and ``loss_fn``'s aux.

    With ``skip_nonfinite`` (default) a non-finite step leaves params and optimizer state
    bit-for-bit unchanged and adds 1 to ``state.skipped``; ``state.step`` and ``state.key``
    advance either way.

    With ``fused=True`` the step takes a stack of batches (every leaf ``(B, ...)`` becomes
    ``(n, B, ...)``) and runs ``n`` steps in one call with ``lax.scan``; every metric becomes
    ``(n,)``. The result equals ``n`` single steps.

    With ``mesh`` (a ``Mesh`` with a ``"data"`` axis) the batch axis is sharded over
    ``"data"`` and the state replicated (data parallelism; XLA all-reduces the gradient).

    With ``flossing=Flossing(model, k, weight, every, inputs, warmup)`` (gradient flossing,
    Engelken 2023), on a step with ``state.step % every == 0`` the gradient is that of
    $L + w F$, $F$ = ``flossing_loss(model, θ, inputs(batch), k=k, warmup=warmup)``
    ($\frac{1}{B}\sum_b \sum_{i \le k} \lambda_{b,i}^2$), and of $L$ alone on the others
    (a ``jax.lax.cond``: $F$ is not computed there). The metrics gain ``flossing`` ($F$ on a
    step that flossed, ``0`` otherwise) and ``flossed`` (bool); ``loss`` stays $L$ and
    ``finite`` covers $F$ too.

    Args:
      loss_fn: ``(params, batch) -> loss`` or ``(params, batch, key) -> loss`` (``with_key``),
        returning ``(loss, aux)`` with ``has_aux``; ``loss`` a float ``()``.
      optimizer: any ``optax.GradientTransformation``.
      has_aux: ``loss_fn`` returns ``(loss, aux)`` with ``aux`` a dict of ``()`` metrics.
      with_key: ``loss_fn`` takes a third argument, a PRNG key.
      skip_nonfinite: skip (and count) non-finite updates.
      fused: run a stack of batches in one call.
      donate: donate the state argument.
      mesh: optional data-parallel mesh.
      flossing: a ``seqjax.train.Flossing``, or ``None``.

    Returns:
      The jitted step ``(TrainState, batch) -> (TrainState, metrics)``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.train import clipped_adam, init_train_state, make_train_step
      >>> model = seqjax.many_to_one(seqjax.rnn(4), seqjax.dense(1))
      >>> params = model.init(jax.random.key(0), input_size=3)
      >>> batch = {"xs": jnp.ones((2, 5, 3)), "ys": jnp.zeros((2, 1))}
      >>> def loss_fn(params, batch):
      ...     return seqjax.mse(model.apply(params, batch["xs"]), batch["ys"])
      >>> optimizer = clipped_adam(1e-2, max_norm=1.0)
      >>> step = make_train_step(loss_fn, optimizer)
      >>> state, metrics = step(init_train_state(params, optimizer, key=jax.random.key(1)), batch)
      >>> sorted(metrics), int(state.step), bool(metrics["finite"])
      (['clipped', 'finite', 'grad_norm', 'loss'], 1, True)
    """

    if flossing is not None and not isinstance(flossing, Flossing):
        raise ValueError(
            f"flossing must be a seqjax.train.Flossing(...) or None, got {type(flossing).__name__}."
        )

    def one(state: TrainState, batch):
        key, sub = jax.random.split(state.key)

        def f(p):
            return _call_loss(loss_fn, p, batch, sub, has_aux, with_key)

        if flossing is None:
            (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(state.params)
            extra: dict[str, jax.Array] = {}
            finite_extra = jnp.ones((), bool)
        else:
            on = state.step % flossing.every == 0

            def objective(p):
                loss, aux = f(p)

                def floss(p):
                    return _flossing_term(flossing, p, batch).astype(loss.dtype)

                if flossing.every == 1:
                    F = floss(p)
                else:
                    F = jax.lax.cond(on, floss, lambda p: jnp.zeros((), loss.dtype), p)
                return loss + flossing.weight * F, (loss, F, aux)

            (_, (loss, F, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
            extra = {"flossing": F, "flossed": jnp.asarray(on, bool)}
            finite_extra = jnp.isfinite(F)
        gnorm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & finite_extra & _all_finite(grads) & _all_finite(params)
        metrics = {"loss": loss, "grad_norm": gnorm, "finite": finite, **extra}
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
    kw: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
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
      loss_fn: as in ``make_train_step``.
      has_aux: as in ``make_train_step``.
      with_key: as in ``make_train_step``.
      mesh: optional data-parallel mesh (batch ``(B, ...)`` sharded on ``"data"``; ``B`` must
        divide over it).

    Returns:
      The jitted eval step; every metric is a ``()`` array.
    """

    def ev(params, batch):
        loss, aux = _call_loss(loss_fn, params, batch, None, has_aux, with_key)
        return {"loss": loss, **aux}

    if mesh is None:
        return jax.jit(ev)
    rep, data = _shardings(mesh, False)
    return jax.jit(ev, in_shardings=(rep, data), out_shardings=rep)


def evaluate(eval_step: Callable, params: Any, batches: Iterable) -> dict[str, float]:
    r"""Mean metrics over ``batches``, each batch weighted by its size.

    For batches $b_1, \dots, b_m$ of sizes $B_j$ (leading axis of the first
    leaf) and a per-batch metric $M(b_j)$ from ``eval_step``,

    $$
    \bar M = \frac{\sum_j B_j\, M(b_j)}{\sum_j B_j},
    $$

    accumulated in float64 on the host: exact for per-example means, whatever the batch
    sizes (a smaller last batch included). ``fit`` evaluates with this function.

    Args:
      eval_step: ``(params, batch) -> {name: () array}``, e.g. from ``make_eval_step``.
      params: the params.
      batches: an iterable of batches (each a pytree with leaves ``(B_j, ...)``).

    Returns:
      ``{name: weighted mean}`` as Python floats.

    Raises:
      ValueError: ``batches`` is empty.

    Examples:
      >>> import jax.numpy as jnp
      >>> from seqjax.train import evaluate, make_eval_step
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return jnp.mean((w * x - y) ** 2)
      >>> x, y = jnp.arange(5.0), jnp.ones(5)
      >>> metrics = evaluate(make_eval_step(loss_fn), jnp.array(2.0), [(x[:3], y[:3]), (x[3:], y[3:])])
      >>> round(metrics["loss"], 4), float(loss_fn(2.0, (x, y)))     # batches of 3 and 2: the full mean
      (17.0, 17.0)
    """
    outs, sizes = [], []
    for b in batches:
        outs.append(eval_step(params, b))  # dispatched asynchronously; fetched once below
        sizes.append(_leading(b))
    if not outs:
        raise ValueError("evaluate got no batches.")
    totals: dict[str, Any] = {}
    for m, w in zip(jax.device_get(outs), sizes, strict=True):
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + w * np.asarray(v).astype(np.float64)
    n = sum(sizes)
    return {k: float(v / n) for k, v in totals.items()}


def _eval_step_on(loss_fn: Callable, *, has_aux: bool, with_key: bool, mesh: Mesh | None) -> Callable:
    """An eval step ``(params, host batch) -> metrics`` that places the batch itself.

    Without a mesh it is ``make_eval_step``'s. With one, a batch whose size divides over the
    ``"data"`` axis is sharded on it; any other batch (a smaller last one) is replicated and
    evaluated by an unsharded step.
    """
    local = make_eval_step(loss_fn, has_aux=has_aux, with_key=with_key)
    if mesh is None:
        return local
    sharded = make_eval_step(loss_fn, has_aux=has_aux, with_key=with_key, mesh=mesh)
    nd = mesh.shape["data"]

    def step(params, batch):
        if _leading(batch) % nd == 0:
            return sharded(params, _place_batch(batch, mesh, False))
        return local(params, jax.device_put(batch, NamedSharding(mesh, P())))

    return step
