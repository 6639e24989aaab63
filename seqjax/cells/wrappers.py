r"""Cells made of cells: ``learnable_carry``, ``dropout`` and ``stack``. Each composes the
capabilities of its inner cells, keeping what stays exact and dropping what does not.

* ``learnable_carry(cell)`` changes the params layout and the initial carry only: every
  capability passes through (``seqjax.cells.wrap``).
* ``dropout(cell, input_rate=, recurrent_rate=, key=)``: variational dropout as a cell. The
  output rule and gates pass through with the masks; the Jacobian and its diagonal stay
  exact (``J = J_inner(m * s, x) diag(m)``); the fused kernel and ``recurrent_blocks`` are
  kept for input dropout only (a recurrent mask turns ``h W_h`` into ``(m * h) W_h``);
  ``jacobian_bound`` is dropped (the masks scale by ``1/(1 - rate)``), and so is
  ``linear_recurrence`` (see ``dropout``).
* ``stack(cells)``: the output rule composes (``y^l_t = out_l(carry^l_t, y^{l-1}_t)``), the
  Jacobian diagonal composes (the diagonal of the block lower-triangular stack Jacobian is
  made of each layer's own diagonal at its own input), the fused kernels compose layer by
  layer (accepting the options every layer accepts), the recurrent blocks are each layer's
  own, named ``"layer_<l>.<gate>"``. The full Jacobian has off-diagonal
  blocks through the layers' input Jacobians: it falls back to autodiff. Dropout between
  layers multiplies each layer's input by a fixed mask: a dropout stack keeps the output
  rule, the gates, the diagonal and the kernels, each with the masks. Its masks take the
  batch shape the step sees, so analyse a stack built without dropout (the spectrum tools
  vmap single steps). A stack has no ``linear_recurrence``, even of cells that have one:
  layer ``l`` reads ``y^{l-1}_t``, a function of layer ``l-1``'s new state, and its gates
  are nonlinear functions of that input, so the stack's step is not affine in its state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from seqjax._util import bind, is_floating
from seqjax.cells._core import Cell, CellMeta, Kernel, batch_shape_of, param_dtype, wrap

__all__ = ["learnable_carry", "dropout", "stack"]


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
    Every capability of ``cell`` (output rule, Jacobian, diagonal, fused kernel, gates,
    ``jacobian_bound``, ``recurrent_blocks``, ``linear_recurrence``) is kept: only the params
    layout and the initial carry change.

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


# --------------------------------------------------------------------------- dropout


def _check_rate(rate, name: str) -> float:
    if not (0.0 <= float(rate) < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got {rate}.")
    return float(rate)


def _check_key(key, where: str):
    """``key`` if it is a PRNG key (typed, or legacy ``uint32[2]``) or ``None``; else ``ValueError``."""
    if key is None:
        return None
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    legacy = dtype == jnp.uint32 and tuple(getattr(key, "shape", ())) == (2,)
    if not (typed or legacy):
        raise ValueError(
            f"{where}: key must be a PRNG key such as jax.random.key(0), got {type(key).__name__}"
            + (f" of dtype {dtype} and shape {tuple(key.shape)}" if dtype is not None else "")
            + "."
        )
    return key


def _recurrent_field(carry):
    """``"h"`` for a carry NamedTuple with an ``h`` field (recurrent dropout acts there), else
    ``None`` (it acts on every floating leaf)."""
    return "h" if hasattr(carry, "h") and hasattr(carry, "_replace") else None


def _carry_masks(carry, key, rate):
    """A pytree like ``carry``: keep masks (scaled by ``1/(1 - rate)``) on the leaves recurrent
    dropout acts on, ``None`` elsewhere. A plain tuple (a stack's carry) follows the rule per
    element, with the key folded with the element's index."""
    if type(carry) is tuple:
        return tuple(_carry_masks(c, jax.random.fold_in(key, i), rate) for i, c in enumerate(carry))
    field = _recurrent_field(carry)
    target = getattr(carry, field) if field else carry
    leaves, treedef = jax.tree_util.tree_flatten(target)
    ks = jax.random.split(key, max(len(leaves), 1))
    masks = jax.tree_util.tree_unflatten(
        treedef,
        [_keep_mask(k, rate, a.shape, a.dtype) if is_floating(a) else None for k, a in zip(ks, leaves)],
    )
    if not field:
        return masks
    none = jax.tree_util.tree_map(lambda _: None, carry)
    return none._replace(**{field: masks})


def _apply_masks(carry, masks):
    return jax.tree_util.tree_map(
        lambda a, m: a if m is None else a * m, carry, masks, is_leaf=lambda m: m is None
    )


def _input_mask(key, rate, shape, dtype):
    """``m_x`` for inputs of ``shape``: drawn from the first half of ``split(key)``."""
    return _keep_mask(jax.random.split(key)[0], rate, shape, dtype)


def _state_masks(carry, key, rate):
    """``m_s`` for this carry (a tree like it, ``None`` where no mask acts): the second half
    of ``split(key)``."""
    return _carry_masks(carry, jax.random.split(key)[1], rate)


def _dropped(carry, x, *, input_rate, recurrent_rate, key):
    """``(m_s * carry, m_x * x)`` with masks drawn from ``key`` for these shapes."""
    if input_rate:
        x = x * _input_mask(key, input_rate, x.shape, x.dtype)
    if recurrent_rate:
        carry = _apply_masks(carry, _state_masks(carry, key, recurrent_rate))
    return carry, x


def _dropout_step(params, carry, x, *, cell, **drop):
    c, x = _dropped(carry, x, **drop)
    return cell.step(params, c, x)


def _dropout_gates(params, carry, x, *, cell, **drop):
    c, x = _dropped(carry, x, **drop)
    return cell.gates(params, c, x)


def _dropout_output(params, carry, x, *, cell, input_rate, recurrent_rate, key):
    del recurrent_rate  # the output reads the new carry (undropped) and the masked input
    if input_rate:
        x = x * _input_mask(key, input_rate, x.shape, x.dtype)
    return cell.output(params, carry, x)


def _flat_mask(carry, masks):
    """The recurrent masks on the flattened (unbatched) carry, ones where none acts."""
    parts = [
        jnp.ones((a.size,), a.dtype) if m is None else jnp.reshape(m, (-1,))
        for a, m in zip(
            jax.tree_util.tree_leaves(carry),
            jax.tree_util.tree_leaves(masks, is_leaf=lambda m: m is None),
            strict=True,
        )
    ]
    return jnp.concatenate(parts) if parts else jnp.zeros((0,))


def _dropout_jacobian(params, carry, x, *, cell, diagonal, input_rate, recurrent_rate, key):
    fn = cell.jacobian_diagonal if diagonal else cell.jacobian
    if input_rate:
        x = x * _input_mask(key, input_rate, x.shape, x.dtype)
    if not recurrent_rate:
        return fn(params, carry, x)
    m_s = _state_masks(carry, key, recurrent_rate)  # drawn once: for the state and for diag(m_s)
    J = fn(params, _apply_masks(carry, m_s), x)
    d = _flat_mask(carry, m_s).astype(J.dtype)
    return J * d if diagonal else J * d[None, :]


def _dropout_run(params, carry0, xs, *, run, input_rate, key, **options):
    if not input_rate:
        return run(params, carry0, xs, **options)
    return run(params, carry0, xs * _input_mask(key, input_rate, xs.shape[1:], xs.dtype)[None], **options)


def dropout(cell: Cell, *, input_rate: float = 0.0, recurrent_rate: float = 0.0, key: jax.Array) -> Cell:
    r"""Variational dropout (Gal & Ghahramani 2016) as a cell transformation.

    One Bernoulli mask per sequence, shared by every step, on the input and on the state fed
    back into the step:

    ```text
    carry_t, y_t = cell.step(params, m_s * carry_{t-1}, m_x * x_t)
    ```

    with ``m_x ~ Bernoulli(1 - input_rate) / (1 - input_rate)`` of shape ``(*batch, I)`` and
    ``m_s`` likewise on the ``h`` field of a carry that has one (``LSTMState``: the cell state
    ``c`` is not dropped), else on every floating carry leaf; a stack's carry (a tuple) follows
    this rule layer by layer. The masks are drawn inside the
    step from ``key`` (``k_x, k_s = split(key)``), so every step draws the same ones. Held
    (masked) steps of ``unroll`` keep the undropped carry.

    Build it with a fresh key for each training step, inside the jitted loss; evaluate with
    the plain cell (the params are the same). Like ``stack(..., dropout=)``, the masks take the
    batch shape the step sees, so one sequence run alone draws other masks than in a batch:
    analyse the plain cell (and leave out the ``"vmap"`` check of ``seqjax.testing.check_cell``).

    Capabilities: ``output`` and ``gates`` with the masks; ``jacobian`` and
    ``jacobian_diagonal`` exact, ``J = J_cell(m_s * s, m_x * x) diag(m_s)``; the fused
    ``kernel`` when ``recurrent_rate == 0`` (it runs on the masked inputs); ``input_size``;
    ``recurrent_blocks`` when ``recurrent_rate == 0`` (an input mask leaves the recurrent
    term ``h_{t-1} W_h`` alone; a recurrent one makes it ``(m_s * h_{t-1}) W_h``, which
    depends on the masks); ``jacobian_bound`` is dropped. ``linear_recurrence`` is dropped
    too, although a masked linear step is still linear (``A diag(m_s)``, ``b(m_x x)``): it is
    defined for one unbatched input, and the masks drawn for that shape differ from those a
    batched step draws, so a solver that maps it over a batch with ``jax.vmap`` would not
    reproduce the batched ``unroll``.

    Args:
      cell: any ``Cell``.
      input_rate: dropout rate on the inputs, in ``[0, 1)``.
      recurrent_rate: dropout rate on the recurrent state, in ``[0, 1)``.
      key: PRNG key of the masks.

    Returns:
      A ``Cell`` with the params of ``cell``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.lstm(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jnp.ones((2, 5, 3))
      >>> noisy = seqjax.cells.dropout(cell, input_rate=0.2, recurrent_rate=0.25, key=jax.random.key(1))
      >>> _, ys = seqjax.unroll(noisy, params, xs)          # training: the same params
      >>> _, ys_eval = seqjax.unroll(cell, params, xs)      # evaluation: the plain cell
      >>> print(ys.shape, bool(jnp.allclose(ys, ys_eval)))
      (2, 5, 4) False

      In a loss, build it with a fresh key per step (inside the jitted function):

      >>> def loss(params, xs, ys, key):
      ...     cell_d = seqjax.cells.dropout(cell, recurrent_rate=0.25, key=key)
      ...     return jnp.mean((seqjax.unroll(cell_d, params, xs)[1] - ys) ** 2)
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"dropout: cell must be a seqjax.Cell, got {type(cell).__name__}.")
    drop = {
        "input_rate": _check_rate(input_rate, "input_rate"),
        "recurrent_rate": _check_rate(recurrent_rate, "recurrent_rate"),
        "key": _check_key(key, "dropout"),  # bind holds the key by identity
    }
    if key is None:
        raise ValueError(
            "dropout needs a PRNG key: seqjax.cells.dropout(cell, ..., key=jax.random.key(...))."
        )
    caps: dict[str, Any] = {}
    if cell.output is not None:
        caps["output"] = bind(_dropout_output, cell=cell, **drop)
    if cell.gates is not None:
        caps["gates"] = bind(_dropout_gates, cell=cell, **drop)
    if cell.jacobian is not None:
        caps["jacobian"] = bind(_dropout_jacobian, cell=cell, diagonal=False, **drop)
    if cell.jacobian_diagonal is not None:
        caps["jacobian_diagonal"] = bind(_dropout_jacobian, cell=cell, diagonal=True, **drop)
    if cell.kernel is not None and not drop["recurrent_rate"]:
        caps["kernel"] = Kernel(
            bind(_dropout_run, run=cell.kernel.run, input_rate=drop["input_rate"], key=key),
            cell.kernel.accepts,
        )
    if cell.input_size is not None:
        caps["input_size"] = cell.input_size
    if cell.recurrent_blocks is not None and not drop["recurrent_rate"]:
        caps["recurrent_blocks"] = cell.recurrent_blocks  # the params are the inner cell's
    inner = cell.meta
    meta = CellMeta(
        f"dropout({inner.name if inner is not None else 'cell'})",
        inner.hidden_size if inner is not None else 0,
        (("input_rate", drop["input_rate"]), ("recurrent_rate", drop["recurrent_rate"])),
    )
    return Cell(cell.init, cell.initial_carry, bind(_dropout_step, cell=cell, **drop), meta=meta, **caps)


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


def _stack_diagonal(params, carry, x, *, cells, rate=0.0, key=None):
    parts = []
    y = x
    for l, (c, p, h) in enumerate(zip(cells, params, carry, strict=True)):
        y = _drop(y, l, rate, key)
        parts.append(c.jacobian_diagonal(p, h, y))
        _, y = c.step(p, h, y)
    return jnp.concatenate(parts, axis=-1)


def _stack_run(params, carry0, xs, *, cells, rate=0.0, key=None, trajectory=False, **options):
    finals, carries = [], []
    ys = xs
    for l, (c, p, c0) in enumerate(zip(cells, params, carry0, strict=True)):
        if l and rate:  # the step's mask (one per sequence, every step): the same on all of ys
            ys = ys * _keep_mask(jax.random.fold_in(key, l), rate, ys.shape[1:], ys.dtype)[None]
        final, ys, cs = c.kernel.run(p, c0, ys, trajectory=trajectory, **options)
        finals.append(final)
        carries.append(cs)
    return tuple(finals), ys, (tuple(carries) if trajectory else None)


def _stack_input_size(params, *, cell):
    return cell.input_size(params[0])


def _stack_recurrent_blocks(params, *, cells):
    """Each layer's own blocks, ``"layer_<l>.<gate>"`` (the keys of the stack's ``gates``
    joined with a dot), layer by layer in each layer's gate order."""
    _check_layers_params(params, len(cells), "stack")
    return {
        f"layer_{l}.{name}": w
        for l, (c, p) in enumerate(zip(cells, params, strict=True))
        for name, w in c.recurrent_blocks(p).items()
    }


def stack(cells: Sequence[Cell], *, dropout: float = 0.0, key: jax.Array | None = None) -> Cell:
    r"""Deep recurrent network as one ``Cell``: layer ``l`` reads the output of layer ``l-1``.

    At each step ``t``:

    ```text
    carry^l_t, y^l_t = cell_l.step(params[l], carry^l_{t-1}, y^{l-1}_t),   y^0_t = x_t
    ```

    and the stack's output is ``y^L_t``. The carry is the tuple ``(carry^1, ..., carry^L)``,
    so ``unroll(stack(cells), params, xs)`` runs all layers in one scan over time. This is
    mathematically the same as unrolling layer 1 over the whole sequence, then layer 2 over
    its outputs, and so on (``stack_layers``), for causal cells; the fused kernel (when
    every layer has one) runs exactly that way.

    Params: a tuple, ``params[l]`` exactly what ``cells[l].init`` makes for the output size
    of layer ``l-1``. Carry: a tuple of the cells' carries.

    Capabilities (each when every layer has it): output rule, Jacobian diagonal and fused
    kernel (with dropout too: the masks are applied to each layer's input), gates
    (``{"layer_0": gates_0, ...}``), ``recurrent_blocks`` (each layer's own, named
    ``"layer_<l>.<gate>"``, e.g. ``"layer_0.i"``: the path of the gate in ``gates`` joined
    with a dot; dropout between layers masks inputs only, so they stay exact);
    ``input_size`` from the first layer.

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

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.cells.stack([seqjax.lstm(4), seqjax.gru(4)])
      >>> params = cell.init(jax.random.key(0), input_size=3)     # (params_0, params_1)
      >>> print(params[1]["w_x"].shape)                            # layer 1 reads layer 0's 4 outputs
      (4, 12)
      >>> xs = jnp.ones((2, 5, 3))
      >>> (c0, c1), ys = seqjax.unroll(cell, params, xs)
      >>> print(c0.c.shape, c1.shape, ys.shape)
      (2, 4) (2, 4) (2, 5, 4)
      >>> _, ys0 = seqjax.unroll(seqjax.lstm(4), params[0], xs)    # the same, layer by layer
      >>> _, ys1 = seqjax.unroll(seqjax.gru(4), params[1], ys0)
      >>> bool(jnp.allclose(ys, ys1, atol=1e-6))
      True
    """
    cells = tuple(cells)
    if not cells:
        raise ValueError("stack: cells must hold at least one Cell, got an empty sequence.")
    for i, c in enumerate(cells):
        if not isinstance(c, Cell):
            raise TypeError(f"stack: cells[{i}] must be a seqjax.Cell, got {type(c).__name__}.")
    rate = _check_rate(dropout, "dropout")
    if rate and key is None:
        raise ValueError("stack: dropout > 0 needs a PRNG key: stack(cells, dropout=rate, key=key).")
    _check_key(key if rate else None, "stack")
    drop = {"cells": cells, "rate": rate, "key": key if rate else None}  # bind holds the key by identity
    caps: dict[str, Any] = {}
    if all(c.output is not None for c in cells):
        caps["output"] = bind(_stack_output, **drop)
    if all(c.gates is not None for c in cells):
        caps["gates"] = bind(_stack_gates, **drop)
    if all(c.jacobian_diagonal is not None for c in cells):
        caps["jacobian_diagonal"] = bind(_stack_diagonal, **drop)
    kernels = [c.kernel for c in cells if c.kernel is not None]
    if len(kernels) == len(cells):
        accepts = frozenset.intersection(*(k.accepts for k in kernels))
        caps["kernel"] = Kernel(bind(_stack_run, **drop), accepts)
    if cells[0].input_size is not None:
        caps["input_size"] = bind(_stack_input_size, cell=cells[0])
    if all(c.recurrent_blocks is not None for c in cells):
        caps["recurrent_blocks"] = bind(_stack_recurrent_blocks, cells=cells)
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
