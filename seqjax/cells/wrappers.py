r"""Cells made of cells: ``learnable_carry`` and ``stack``. Each composes the capabilities
of its inner cells, keeping what stays exact and dropping what does not.

* ``learnable_carry(cell)`` changes the params layout and the initial carry only: every
  capability passes through (``seqjax.cells.wrap``).
* ``stack(cells)``: the output rule composes (``y^l_t = out_l(carry^l_t, y^{l-1}_t)``), the
  Jacobian diagonal composes (the diagonal of the block lower-triangular stack Jacobian is
  made of each layer's own diagonal at its own input), the fused kernels compose layer by
  layer (accepting the options every layer accepts). The full Jacobian has off-diagonal
  blocks through the layers' input Jacobians: it falls back to autodiff. Dropout between
  layers changes the step: a dropout stack keeps the output rule and the gates (with its
  masks) and drops the kernels and the diagonal. Its masks take the batch shape the step
  sees, so analyse a stack built without dropout (the spectrum tools vmap single steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from seqjax._util import bind
from seqjax.cells._core import Cell, CellMeta, Kernel, batch_shape_of, param_dtype, wrap

__all__ = ["learnable_carry", "stack"]


# --------------------------------------------------------------------------- learnable_carry


def _get_cell(params):
    return params["cell"]


def _lc_init(key, input_size, *, cell, init):
    k_cell, k_c = jax.random.split(key)
    inner = cell.init(k_cell, input_size)
    c0 = cell.initial_carry(inner, ())
    if init is not None:
        c0 = init(k_c, c0)
    return {"cell": inner, "carry0": c0}


def _lc_initial_carry(params, batch_shape=()):
    bs = batch_shape_of(batch_shape)
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, bs + a.shape), params["carry0"])


def learnable_carry(cell: Cell, init: Callable | None = None) -> Cell:
    """Wrap ``cell`` so that its initial carry is a learned parameter.

    The new params are ``{"cell": inner_params, "carry0": carry}`` where ``carry0`` has the
    carry's tree with unbatched leaves (e.g. ``LSTMState(h: (H,), c: (H,))``); the initial
    carry broadcasts it over the batch, so ``jax.grad`` reaches it through ``unroll``.
    Every capability of ``cell`` (output rule, Jacobian, diagonal, fused kernel, gates) is
    kept: only the params layout and the initial carry change.

    Args:
      cell: any ``Cell``.
      init: optional ``(key, carry_like) -> carry0``; default zeros.

    Returns:
      A ``Cell``.
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"learnable_carry: cell must be a seqjax.Cell, got {type(cell).__name__}.")
    meta = None
    if cell.meta is not None:
        meta = CellMeta(f"learnable_carry({cell.meta.name})", cell.meta.hidden_size, cell.meta.options)
    return wrap(
        cell,
        params=bind(_get_cell),
        init=bind(_lc_init, cell=cell, init=init),
        initial_carry=bind(_lc_initial_carry),
        meta=meta,
    )


# --------------------------------------------------------------------------- stack


def _check_layers_params(params, n: int, what: str) -> None:
    if not isinstance(params, (tuple, list)) or len(params) != n:
        got = (
            f"a {type(params).__name__} of length {len(params)}"
            if isinstance(params, (tuple, list))
            else type(params).__name__
        )
        raise ValueError(
            f"{what}: params must be a tuple/list with one entry per layer ({n}), got {got}; "
            f"make them with {what}(...).init(key, input_size)."
        )


def _check_carry_tuple(carry, n: int, what: str) -> None:
    if not isinstance(carry, (tuple, list)) or len(carry) != n:
        raise ValueError(
            f"{what}: carry must be a tuple with one carry per layer ({n}); make it with "
            f"{what}(...).initial_carry(params, batch_shape)."
        )


_dtype_of = param_dtype


def cell_output_size(cell: Cell, params, input_size: int) -> int:
    """``O`` of ``cell`` fed ``input_size`` features (abstractly, no FLOPs)."""

    def run(p):
        return cell.step(p, cell.initial_carry(p, ()), jnp.zeros((input_size,), _dtype_of(p)))[1]

    return int(jax.eval_shape(run, params).shape[-1])


def _keep_mask(key, rate: float, shape, dtype) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, tuple(shape))
    return keep.astype(dtype) / jnp.asarray(1.0 - rate, dtype)


def _drop(y, l, rate, key):
    if l and rate:
        return y * _keep_mask(jax.random.fold_in(key, l), rate, y.shape, y.dtype)
    return y


def init_in_sequence(models, key, input_size: int, size_of=None) -> tuple:
    """Params of models applied one after another: model ``l`` is initialised for the output
    size of model ``l - 1`` (``size_of(model, params, input_size)``, default
    ``cell_output_size``); one split key per model."""
    size_of = cell_output_size if size_of is None else size_of
    params = []
    size = input_size
    for model, k in zip(models, jax.random.split(key, len(models)), strict=True):
        p = model.init(k, size)
        params.append(p)
        size = size_of(model, p, size)
    return tuple(params)


def _stack_init(key_init, input_size, *, cells):
    return init_in_sequence(cells, key_init, input_size)


def _stack_initial_carry(params, batch_shape=(), *, cells):
    _check_layers_params(params, len(cells), "stack")
    return tuple(c.initial_carry(p, batch_shape) for c, p in zip(cells, params, strict=True))


def _stack_step(params, carry, x, *, cells, rate, key):
    _check_layers_params(params, len(cells), "stack")
    _check_carry_tuple(carry, len(cells), "stack")
    new = []
    y = x
    for l, (c, p, h) in enumerate(zip(cells, params, carry, strict=True)):
        h, y = c.step(p, h, _drop(y, l, rate, key))
        new.append(h)
    return tuple(new), y


def _stack_gates(params, carry, x, *, cells, rate, key):
    out = {}
    y = x
    for l, (c, p, h) in enumerate(zip(cells, params, carry, strict=True)):
        y = _drop(y, l, rate, key)
        out[f"layer_{l}"] = c.gates(p, h, y)
        _, y = c.step(p, h, y)
    return out


def _stack_output(params, carry, x, *, cells, rate, key):
    y = x
    for l, (c, p, h) in enumerate(zip(cells, params, carry, strict=True)):
        y = c.output(p, h, _drop(y, l, rate, key))
    return y


def _stack_diagonal(params, carry, x, *, cells):
    parts = []
    y = x
    for c, p, h in zip(cells, params, carry, strict=True):
        parts.append(c.jacobian_diagonal(p, h, y))
        _, y = c.step(p, h, y)
    return jnp.concatenate(parts, axis=-1)


def _stack_run(params, carry0, xs, *, cells, trajectory=False, **options):
    finals, carries = [], []
    ys = xs
    for c, p, c0 in zip(cells, params, carry0, strict=True):
        final, ys, cs = c.kernel.run(p, c0, ys, trajectory=trajectory, **options)
        finals.append(final)
        carries.append(cs)
    return tuple(finals), ys, (tuple(carries) if trajectory else None)


def _stack_input_size(params, *, cell):
    return cell.input_size(params[0])


def stack(cells: Sequence[Cell], *, dropout: float = 0.0, key: jax.Array | None = None) -> Cell:
    r"""Deep recurrent network as one ``Cell``: layer ``l`` reads the output of layer ``l-1``.

    At each step ``t``::

        carry^l_t, y^l_t = cell_l.step(params[l], carry^l_{t-1}, y^{l-1}_t),   y^0_t = x_t

    and the stack's output is ``y^L_t``. The carry is the tuple ``(carry^1, ..., carry^L)``,
    so ``unroll(stack(cells), params, xs)`` runs all layers in one scan over time. This is
    mathematically the same as unrolling layer 1 over the whole sequence, then layer 2 over
    its outputs, and so on (``stack_layers``), for causal cells; the fused kernel (when
    every layer has one) runs exactly that way.

    Params: a tuple, ``params[l]`` exactly what ``cells[l].init`` makes for the output size
    of layer ``l-1``. Carry: a tuple of the cells' carries.

    Capabilities (each when every layer has it): output rule, Jacobian diagonal and fused
    kernel (both not with dropout), gates (``{"layer_0": gates_0, ...}``); ``input_size``
    from the first layer.

    Args:
      cells: one or more ``Cell``.
      dropout: rate in ``[0, 1)`` of dropout on the input of layers ``2..L`` (the outputs
        of layers ``1..L-1``): one mask per sequence, shared by all time steps
        (variational), drawn from ``fold_in(key, l)``.
      key: PRNG key, needed when ``dropout > 0``. Build the stack with a fresh key for each
        training step (inside the jitted loss is fine); build it without dropout for
        evaluation. Params are the same either way. The masks have the batch shape the
        step sees: under ``jax.vmap`` over sequences, build the stack inside the mapped
        function with a per-sequence key, or every sequence shares one mask.

    Returns:
      A ``Cell``.

    Example::

      cell = stack([seqjax.lstm(64), seqjax.lstm(64)])
      params = cell.init(jax.random.key(0), input_size=8)     # (params_0, params_1)
      (c1, c2), ys = seqjax.unroll(cell, params, xs)            # ys: (B, T, 64)
    """
    cells = tuple(cells)
    if not cells:
        raise ValueError("stack: cells must hold at least one Cell, got an empty sequence.")
    for i, c in enumerate(cells):
        if not isinstance(c, Cell):
            raise TypeError(f"stack: cells[{i}] must be a seqjax.Cell, got {type(c).__name__}.")
    if not (0.0 <= float(dropout) < 1.0):
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
    rate = float(dropout)
    if rate and key is None:
        raise ValueError("stack: dropout > 0 needs a PRNG key: stack(cells, dropout=rate, key=key).")
    drop = {"cells": cells, "rate": rate, "key": key if rate else None}  # bind holds the key by identity
    caps = {}
    if all(c.output is not None for c in cells):
        caps["output"] = bind(_stack_output, **drop)
    if all(c.gates is not None for c in cells):
        caps["gates"] = bind(_stack_gates, **drop)
    if not rate:
        if all(c.jacobian_diagonal is not None for c in cells):
            caps["jacobian_diagonal"] = bind(_stack_diagonal, cells=cells)
        if all(c.kernel is not None for c in cells):
            accepts = frozenset.intersection(*(c.kernel.accepts for c in cells))
            caps["kernel"] = Kernel(bind(_stack_run, cells=cells), accepts)
    if cells[0].input_size is not None:
        caps["input_size"] = bind(_stack_input_size, cell=cells[0])
    last = cells[-1].meta
    names = ",".join(c.meta.name if c.meta is not None else "cell" for c in cells)
    meta = CellMeta(f"stack({names})", last.hidden_size if last is not None else 0, (("dropout", rate),))
    return Cell(
        bind(_stack_init, cells=cells),
        bind(_stack_initial_carry, cells=cells),
        bind(_stack_step, **drop),
        meta=meta,
        **caps,
    )
