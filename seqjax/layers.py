"""Sequence architectures built from cells: deep stacks, bidirectional layers, readouts.

Two kinds of building block live here.

* A ``Cell`` (causal, one step at a time). ``stack(cells)`` is a ``Cell`` whose carry is
  the tuple of the layers' carries, so ``unroll`` runs a whole deep network in **one**
  scan over time, and everything that takes a cell (``generate``, Jacobian spectra,
  ``learnable_carry``) takes a stack.
* A ``Layer`` (a whole sequence at a time):

    ```text
    layer = Layer(init, apply, initial_carry)
    params = layer.init(key, input_size)
    carry, ys = layer.apply(params, xs, carry=None, lengths=None, time_axis=-2, key=None)
    cores = layer.cores(params, xs, lengths=None)   # its cells and their inputs (None: by hand)
    ```

  A bidirectional layer is not causal (``y_t`` depends on ``x_{t+1..T}``), so it cannot
  be a ``Cell``; it is a ``Layer`` made of two ``unroll`` calls. ``stack_layers`` chains
  layers *layer by layer* (each layer sees the whole output sequence of the one below),
  which is what PyTorch's ``nn.LSTM(num_layers=2, bidirectional=True)`` computes.
  ``as_layer(cell)`` turns any cell into a layer.

``Pointwise(init, apply)`` is a map applied independently at every step: ``dense`` (the
per-step readout ``o_t = y_t W + b``) and ``embedding`` (token ids to vectors).

Dropout between layers (keyed and pure):

* ``stack(cells, dropout=rate, key=key)``: a cell's step receives no key, so the key is
  closed over when the stack is built (build it inside your loss function, with a fresh
  key per training step). Each layer boundary draws one Bernoulli mask per sequence from
  ``fold_in(key, layer)``, **shared by every time step** (variational dropout, Gal &
  Ghahramani 2016); the mask is a function of the key only, so it is identical at every
  step of the scan.
* ``stack_layers(layers, dropout=rate)`` with ``apply(..., key=key)``: standard dropout
  on the whole output sequence of each layer but the last, a fresh mask per step and
  unit, as ``torch.nn.LSTM(dropout=rate)`` in training mode.

Kept units are scaled by ``1 / (1 - rate)`` in both.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import initializers as inits
from seqjax._scan import time_axis_of
from seqjax._util import positive_int
from seqjax.cells import Cell, CellMeta, stack
from seqjax.cells.wrappers import (
    _check_carry_tuple,
    _check_layers_params,
    _check_rate,
    _dtype_of,
    _keep_mask,
    cell_output_size,
    init_in_sequence,
)
from seqjax.spectrum.models import (
    Core,
    _batch_major,
    _check_lengths,
    _cores_of,
    _prefixed,
    _require_params,
    _reverse_within,
)
from seqjax.unroll import UNROLL_OPTIONS, check_options, sequence_mask, unroll

_LAYER_OPTIONS = tuple(o for o in UNROLL_OPTIONS if o not in ("carry", "lengths", "time_axis"))
_BI_OPTIONS = tuple(o for o in _LAYER_OPTIONS if o != "reverse")

__all__ = [
    "Layer",
    "Pointwise",
    "BiCarry",
    "stack",
    "as_layer",
    "bidirectional",
    "stack_layers",
    "dense",
    "embedding",
    "output_size",
]

Params = Any
Carry = Any


class Layer(NamedTuple):
    """A sequence layer: pure functions over whole sequences.

    Attributes:
      init: ``(key, input_size) -> params``.
      apply: ``(params, xs, *, carry=None, lengths=None, time_axis=-2, key=None, **options)
        -> (final_carry, ys)`` with ``xs: (*batch, T, I)`` (time at ``time_axis``),
        ``ys: (*batch, T, O)``, ``lengths: (*batch,)``; outputs past each sequence's length
        are zero, as in ``unroll``. ``options`` are options of ``unroll`` (``mask``,
        ``resets``, ``gradient``, ``solver``, and ``reverse`` for a cell's layer).
      initial_carry: ``(params, batch_shape=()) -> carry`` (zeros).
      meta: a ``CellMeta`` describing the layer for people (``name`` ``"recurrent"``,
        ``"bidirectional"`` or ``"stack_layers"``), or ``None``; never read to choose a path.
      cores: ``(params, xs, *, lengths=None, time_axis=-2) -> dict[str, Core]``, the layer's
        recurrent cells with their params and the inputs each one reads
        (``seqjax.spectrum.models.recurrent_cores``), or ``None`` (a layer built by hand:
        the analysis tools cannot see inside it). Set by ``as_layer``, ``bidirectional``
        and ``stack_layers``.
    """

    init: Callable[..., Params]
    apply: Callable[..., tuple[Carry, jax.Array]]
    initial_carry: Callable[..., Carry]
    meta: CellMeta | None = None
    cores: Callable[..., dict[str, Core]] | None = None


class Pointwise(NamedTuple):
    """A map applied independently at every step (no carry).

    Attributes:
      init: ``(key, input_size) -> params``.
      apply: ``(params, x) -> y`` acting on the last axis of ``x: (..., input_size)``.
    """

    init: Callable[..., Params]
    apply: Callable[[Params, jax.Array], jax.Array]


class BiCarry(NamedTuple):
    """Carry of a bidirectional layer.

    Attributes:
      fwd: the forward cell's carry, leaves ``(*batch, ...)`` (after the last valid step of
        each sequence).
      bwd: the backward cell's carry, leaves ``(*batch, ...)`` (after step 0, having read
        each sequence from its own end back to its start). PyTorch's ``h_n[2k]`` and
        ``h_n[2k + 1]``.
    """

    fwd: Any
    bwd: Any


# --------------------------------------------------------------------------- helpers


_as_int = positive_int


def output_size(model: Cell | Layer, params: Params, input_size: int) -> int:
    """The number of output features ``O`` of a cell or layer fed ``input_size`` features.

    Computed abstractly (``jax.eval_shape``: no FLOPs) from one step of a cell or one
    step-long sequence through a layer.

    Args:
      model: a ``Cell`` or ``Layer``.
      params: its params (arrays or ``jax.ShapeDtypeStruct``).
      input_size: ``I``.

    Returns:
      ``O`` as a Python int.
    """
    if isinstance(model, Cell):
        return cell_output_size(model, params, input_size)
    if isinstance(model, Layer):

        def run(p):
            return model.apply(p, jnp.zeros((1, input_size), _dtype_of(p)))[1]

        return int(jax.eval_shape(run, params).shape[-1])
    raise TypeError(f"model must be a seqjax Cell or Layer, got {type(model).__name__}.")


def _init_in_sequence(models, key, input_size: int) -> tuple:
    """Params of cells or layers applied one after another: model ``l`` is initialised for
    the output size of model ``l - 1``; one split key per model."""
    return init_in_sequence(models, key, input_size, output_size)


def _time_mask(lengths, ys: jax.Array, time_axis: int) -> jax.Array:
    """Boolean ``(*ys.shape[:-1])`` mask ``t < lengths`` with time at ``time_axis`` of ``ys``."""
    ta = time_axis_of(time_axis, ys.ndim, name="ys")
    T = ys.shape[ta]
    return sequence_mask(jnp.asarray(lengths), T, time_axis=ta)


# --------------------------------------------------------------------------- layers


def _refuse_fixed(options: dict, who: str) -> None:
    """``ValueError`` when ``mask`` or ``resets`` is fixed on a layer: its recurrent cores would
    not be the plain cell driven by inputs (held or reset steps), so they are not listed."""
    fixed = sorted(k for k in ("mask", "resets") if options.get(k) is not None)
    if fixed:
        raise ValueError(
            f"{who}: this layer has {' and '.join(f'{k}=' for k in fixed)} fixed, so its recurrent cores "
            "are not a cell driven by its inputs; analyse the cell directly with those inputs "
            "(e.g. seqjax.trajectory(cell, params, xs, mask=...) and the spectrum tools on the cell)."
        )


def _shown(options: dict) -> tuple:
    """``options`` as sorted ``(name, value)`` pairs for a ``CellMeta``, arrays as ``"array"``."""
    return tuple((k, v if isinstance(v, Hashable) else "array") for k, v in sorted(options.items()))


def as_layer(cell: Cell | Layer, **options) -> Layer:
    """A cell as a sequence layer: ``apply`` is ``unroll(cell, ...)``.

    Args:
      cell: any ``Cell`` (a ``Layer`` is returned as it is, when no options are given).
      **options: options of ``unroll`` fixed for this layer: ``reverse``, ``mask``,
        ``resets``, ``gradient``, ``solver`` (``carry``, ``lengths`` and ``time_axis`` are
        arguments of ``apply``), e.g. ``reverse=True`` (read each sequence backwards, from its
        own last valid step when ``lengths`` is given; outputs stay in input order) or
        ``gradient=seqjax.gradients.Remat(8)``. ``apply`` also forwards any
        of them per call (``mask=``, ``resets=``, ...), a per-call value winning.

    Returns:
      A ``Layer`` with the cell's params and carry;
      ``meta = CellMeta("recurrent", H, (("cell", cell), *options))`` (arrays shown as
      ``"array"``: the meta is for display). ``cores`` gives one core ``"cell"`` (with
      ``reverse=True``, on each sequence reversed within its own length; refused when
      ``mask`` or ``resets`` is fixed).

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> layer = seqjax.as_layer(seqjax.lstm(4), reverse=True, gradient=seqjax.gradients.Remat(2))
      >>> params = layer.init(jax.random.key(0), input_size=3)
      >>> carry, ys = layer.apply(params, jnp.ones((2, 5, 3)), lengths=jnp.array([5, 3]))
      >>> print(ys.shape, carry.h.shape)                  # (B, T, H); the LSTM's carry
      (2, 5, 4) (2, 4)
    """
    fixed = check_options("as_layer", options, _LAYER_OPTIONS)
    if isinstance(cell, Layer):
        if fixed:
            raise TypeError(
                f"as_layer: options ({', '.join(sorted(fixed))}) are fixed when a Cell becomes a Layer; "
                "this is already a Layer: pass them to its apply(...) instead."
            )
        return cell
    if not isinstance(cell, Cell):
        raise TypeError(f"as_layer: cell must be a seqjax.Cell, got {type(cell).__name__}.")

    def apply(params, xs, *, carry=None, lengths=None, time_axis=-2, key=None, **call):
        del key
        kw = {**fixed, **check_options("Layer.apply", call, _LAYER_OPTIONS)}
        return unroll(cell, params, xs, carry=carry, lengths=lengths, time_axis=time_axis, **kw)

    reverse = bool(fixed.get("reverse", False))

    def cores(params, xs, *, lengths=None, time_axis=-2):
        _refuse_fixed(fixed, "as_layer")
        _require_params(params, "as_layer")
        xs_bm = _batch_major(xs, time_axis)
        lengths = _check_lengths(lengths, xs_bm)
        return {
            "cell": Core(cell, params, _reverse_within(xs_bm, lengths) if reverse else xs_bm, None, lengths)
        }

    H = cell.meta.hidden_size if cell.meta is not None else 0
    return Layer(
        cell.init,
        apply,
        cell.initial_carry,
        CellMeta("recurrent", H, (("cell", cell), *_shown(options))),
        cores,
    )


_MERGES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "concat": lambda a, b: jnp.concatenate([a, b], axis=-1),
    "sum": lambda a, b: a + b,
    "mean": lambda a, b: 0.5 * (a + b),
    "mul": lambda a, b: a * b,
}


def _episode_ends(resets, ta: int) -> jax.Array:
    """Resets for the backward pass: ``resets[t + 1]`` (false at the last step). A forward
    reset before step ``t + 1`` ends an episode at ``t``, where the backward pass, reading
    from the end, must start from the initial carry."""
    r = jnp.moveaxis(jnp.asarray(resets, bool), ta, -1)
    r = jnp.concatenate([r[..., 1:], jnp.zeros_like(r[..., :1])], axis=-1)
    return jnp.moveaxis(r, -1, ta)


def bidirectional(
    fwd_cell: Cell,
    bwd_cell: Cell | None = None,
    *,
    merge: str | Callable[[jax.Array, jax.Array], jax.Array] = "concat",
    **options,
) -> Layer:
    r"""Bidirectional layer (Schuster & Paliwal 1997): two independent cells, one per direction.

    ```text
    s_t  = fwd.step(s_{t-1},  x_t)     for t = 1 .. n      (n: the sequence's own length)
    s'_t = bwd.step(s'_{t+1}, x_t)     for t = n .. 1      (starts at the sequence's end)
    y_t  = merge(y^fwd_t, y^bwd_t)
    ```

    Under ``lengths`` the backward cell starts at each sequence's own last valid step
    (``unroll(..., reverse=True, lengths=...)``), exactly as PyTorch's packed sequences,
    and outputs past the length are zero (also after a user ``merge``). The two directions
    share no weights. ``y_t = g(V s_t + V' s'_t)`` is ``merge="concat"`` followed by
    ``dense`` (a dense map of ``[s_t, s'_t]`` is ``s_t V + s'_t V'``).

    Params: ``{"fwd": fwd_params, "bwd": bwd_params}``. Carry: ``BiCarry(fwd, bwd)``.

    Args:
      fwd_cell: the forward cell.
      bwd_cell: the backward cell; default the same architecture as ``fwd_cell`` (its own,
        independently initialised params).
      merge: ``"concat"`` (``[y_fwd, y_bwd]``, features ``O_f + O_b``), ``"sum"``,
        ``"mean"``, ``"mul"``, or a callable ``(y_fwd, y_bwd) -> y`` acting on
        ``(*batch, T, O)`` arrays.
      **options: options of ``unroll`` for both directions (``mask``, ``resets``,
        ``gradient``, ``solver``); ``apply`` forwards them per call too. ``resets`` mark the
        first step of each episode (as in ``unroll``); the backward cell starts each episode
        from the initial carry at the episode's last step.

    Returns:
      A ``Layer``. ``apply``'s ``carry`` is a ``BiCarry`` (or ``None``: zeros). ``cores``
      gives ``"fwd"`` (on ``xs``) and ``"bwd"`` (on each sequence reversed within its own
      length, the order the backward cell reads it).

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> layer = seqjax.bidirectional(seqjax.gru(4))
      >>> params = layer.init(jax.random.key(0), input_size=3)     # {"fwd": ..., "bwd": ...}
      >>> xs = jnp.ones((2, 5, 3))
      >>> carry, ys = layer.apply(params, xs, lengths=jnp.array([5, 3]))
      >>> print(ys.shape, carry.fwd.shape, carry.bwd.shape)         # "concat": 4 + 4 features
      (2, 5, 8) (2, 4) (2, 4)
      >>> _, ys_bwd = seqjax.unroll(seqjax.gru(4), params["bwd"], xs, reverse=True)
      >>> bool(jnp.allclose(ys[0, :, 4:], ys_bwd[0], atol=1e-6))    # the backward half
      True
    """
    bwd_cell = fwd_cell if bwd_cell is None else bwd_cell
    for name, c in (("fwd_cell", fwd_cell), ("bwd_cell", bwd_cell)):
        if not isinstance(c, Cell):
            raise TypeError(f"bidirectional: {name} must be a seqjax.Cell, got {type(c).__name__}.")
    if callable(merge):
        merge_fn = merge
    elif merge in _MERGES:
        merge_fn = _MERGES[merge]
    else:
        raise ValueError(
            f"bidirectional: merge must be one of {sorted(_MERGES)} or a callable, got {merge!r}."
        )

    def init(key, input_size):
        k_f, k_b = jax.random.split(key)
        return {"fwd": fwd_cell.init(k_f, input_size), "bwd": bwd_cell.init(k_b, input_size)}

    def _check(params):
        if not isinstance(params, dict) or set(params) != {"fwd", "bwd"}:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"bidirectional: params must be a dict with keys ['bwd', 'fwd'], got {got}.")

    def initial_carry(params, batch_shape=()):
        _check(params)
        return BiCarry(
            fwd_cell.initial_carry(params["fwd"], batch_shape),
            bwd_cell.initial_carry(params["bwd"], batch_shape),
        )

    fixed = check_options("bidirectional", options, _BI_OPTIONS)

    def apply(params, xs, *, carry=None, lengths=None, time_axis=-2, key=None, **call):
        del key
        kw = {**fixed, **check_options("Layer.apply", call, _BI_OPTIONS)}
        _check(params)
        if carry is not None and (not isinstance(carry, tuple) or len(carry) != 2):
            raise ValueError("bidirectional: carry must be a BiCarry(fwd, bwd) (or None for zeros).")
        c_f, c_b = (None, None) if carry is None else carry
        kw_b = dict(kw)
        if kw.get("resets") is not None:  # the backward pass starts each episode at its last step
            kw_b["resets"] = _episode_ends(kw["resets"], time_axis_of(time_axis, jnp.ndim(xs), name="xs"))
        h_f, y_f = unroll(fwd_cell, params["fwd"], xs, carry=c_f, lengths=lengths, time_axis=time_axis, **kw)
        h_b, y_b = unroll(
            bwd_cell, params["bwd"], xs, carry=c_b, lengths=lengths, time_axis=time_axis, reverse=True, **kw_b
        )
        ys = merge_fn(y_f, y_b)
        if merge_fn not in _MERGES.values() and (lengths is not None or kw.get("mask") is not None):
            m = jnp.ones(ys.shape[:-1], bool)
            if lengths is not None:
                m = m & _time_mask(lengths, ys, time_axis)
            if kw.get("mask") is not None:
                m = m & jnp.asarray(kw["mask"], bool)
            ys = jnp.where(m[..., None], ys, jnp.zeros_like(ys))
        return BiCarry(h_f, h_b), ys

    def cores(params, xs, *, lengths=None, time_axis=-2):
        _refuse_fixed(fixed, "bidirectional")
        _require_params(params, "bidirectional")
        _check(params)
        xs_bm = _batch_major(xs, time_axis)
        lengths = _check_lengths(lengths, xs_bm)
        return {
            "fwd": Core(fwd_cell, params["fwd"], xs_bm, None, lengths),
            "bwd": Core(bwd_cell, params["bwd"], _reverse_within(xs_bm, lengths), None, lengths),
        }

    H = fwd_cell.meta.hidden_size if fwd_cell.meta is not None else 0
    meta = CellMeta("bidirectional", H, (("fwd", fwd_cell), ("bwd", bwd_cell), ("merge", merge)))
    return Layer(init, apply, initial_carry, meta, cores)


def stack_layers(layers: Sequence[Layer | Cell], *, dropout: float = 0.0) -> Layer:
    r"""Chain sequence layers, layer by layer: layer ``l`` reads the whole output sequence of
    layer ``l - 1``.

    ``ys^0 = xs``, ``(carry^l, ys^l) = layers[l].apply(params[l], drop(ys^{l-1}))``; the
    output is ``ys^L``. This is how PyTorch's multi-layer ``nn.RNN/LSTM/GRU`` compute (with
    ``bidirectional=True`` every layer is a ``bidirectional`` layer). For purely causal
    layers ``stack(cells)`` gives the same numbers in one scan.

    Params: a tuple, one entry per layer. Carry: a tuple of the layers' carries.

    Args:
      layers: ``Layer``s (a ``Cell`` is wrapped with ``as_layer``).
      dropout: rate in ``[0, 1)`` of standard dropout on the outputs of every layer but the
        last: an independent mask per sequence, step and unit (PyTorch's ``dropout``).

    Returns:
      A ``Layer`` whose ``apply(params, xs, *, carry=None, lengths=None, time_axis=-2,
      key=None, deterministic=False, **options)`` needs ``key`` when ``dropout > 0`` unless
      ``deterministic=True`` (evaluation: no dropout). Sub-layers receive keys split from
      ``key``, and ``options`` (options of ``unroll`` such as ``mask=`` or ``gradient=``) as
      they are. ``cores`` gives layer ``l``'s cores as ``"layer{l}.<name>"``, on the outputs
      of layers ``0..l-1`` run without dropout.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> net = seqjax.stack_layers([seqjax.bidirectional(seqjax.gru(4)), seqjax.gru(4)])
      >>> params = net.init(jax.random.key(0), input_size=3)
      >>> carries, ys = net.apply(params, jnp.ones((2, 5, 3)), lengths=jnp.array([5, 3]))
      >>> print(ys.shape, len(carries))                   # (B, T, H); one carry per layer
      (2, 5, 4) 2
    """
    parts: tuple[Layer, ...] = tuple(as_layer(layer) for layer in layers)
    if not parts:
        raise ValueError("stack_layers: layers must hold at least one Layer or Cell.")
    rate = _check_rate(dropout, "dropout")
    L = len(parts)

    def init(key, input_size):
        return _init_in_sequence(parts, key, input_size)

    def initial_carry(params, batch_shape=()):
        _check_layers_params(params, L, "stack_layers")
        return tuple(layer.initial_carry(p, batch_shape) for layer, p in zip(parts, params, strict=True))

    def apply(
        params, xs, *, carry=None, lengths=None, time_axis=-2, key=None, deterministic=False, **options
    ):
        _check_layers_params(params, L, "stack_layers")
        if carry is not None:
            _check_carry_tuple(carry, L, "stack_layers")
        if deterministic:
            key = None
        elif rate and key is None:
            raise ValueError(
                "stack_layers: dropout > 0 needs key=jax.random.key(...) in apply "
                "(or deterministic=True for evaluation)."
            )
        keys = [None] * (2 * L) if key is None else list(jax.random.split(key, 2 * L))
        finals = []
        ys = xs
        for l, (layer, p) in enumerate(zip(parts, params, strict=True)):
            if l and rate and key is not None:
                ys = ys * _keep_mask(keys[2 * l], rate, ys.shape, ys.dtype)
            c = None if carry is None else carry[l]
            h, ys = layer.apply(
                p, ys, carry=c, lengths=lengths, time_axis=time_axis, key=keys[2 * l + 1], **options
            )
            finals.append(h)
        return tuple(finals), ys

    def cores(params, xs, *, lengths=None, time_axis=-2):
        _require_params(params, "stack_layers")
        _check_layers_params(params, L, "stack_layers")
        builds = [_cores_of(layer, f"stack_layers: layers[{l}]") for l, layer in enumerate(parts)]
        ys = _batch_major(xs, time_axis)
        lengths = _check_lengths(lengths, ys)
        out: dict[str, Core] = {}
        for l, (layer, p, build) in enumerate(zip(parts, params, builds, strict=True)):
            out.update(_prefixed(f"layer{l}", build(p, ys, lengths=lengths)))
            if l < L - 1:  # what apply(..., deterministic=True) feeds layer l + 1
                ys = layer.apply(p, ys, lengths=lengths)[1]
        return out

    last = parts[-1].meta
    meta = CellMeta("stack_layers", last.hidden_size if last else 0, (("layers", parts), ("dropout", rate)))
    return Layer(init, apply, initial_carry, meta, cores)


# --------------------------------------------------------------------------- pointwise maps


def dense(
    features: int,
    *,
    use_bias: bool = True,
    kernel_init: Callable | None = None,
    bias_init: Callable | None = None,
) -> Pointwise:
    r"""Per-step affine readout ``o_t = y_t W + b``.

    Params: ``{"w": (I, O), "b": (O,)}`` (no ``b`` when ``use_bias=False``). Default
    initialisation: PyTorch's ``nn.Linear``, ``U(-1/sqrt(I), 1/sqrt(I))`` for both.

    Args:
      features: ``O``.
      use_bias: include ``b``.
      kernel_init: initialiser ``(key, shape, dtype) -> array`` of the ``(I, O)`` kernel.
      bias_init: initialiser of the ``(O,)`` bias.

    Returns:
      A ``Pointwise`` whose ``apply(params, y)`` maps ``(..., I) -> (..., O)``.
    """
    O = _as_int(features, "features")

    def init(key, input_size):
        I = _as_int(input_size, "input_size")
        default = inits.uniform(1.0 / float(np.sqrt(I)))
        k_w, k_b = jax.random.split(key)
        w = (kernel_init or default)(k_w, (I, O), jnp.float32)
        if not use_bias:
            return {"w": w}
        return {"w": w, "b": (bias_init or default)(k_b, (O,), jnp.float32)}

    def apply(params, y):
        w = params["w"]
        if y.ndim < 1 or y.shape[-1] != w.shape[0]:
            raise ValueError(
                f"dense: input has shape {tuple(y.shape)} but the params expect (..., {w.shape[0]}) features."
            )
        out = y @ w
        if "b" in params:
            out = out + params["b"].reshape((1,) * (out.ndim - 1) + (O,))
        return out

    return Pointwise(init, apply)


def embedding(num_embeddings: int, features: int, *, init_scale: float = 1.0) -> Pointwise:
    """Token embedding: ``apply(params, ids)`` returns ``params["table"][ids]``.

    Params: ``{"table": (V, E)}`` initialised ``N(0, init_scale^2)`` (PyTorch's
    ``nn.Embedding``). ``init``'s ``input_size`` is ignored (pass ``V`` or anything).

    Args:
      num_embeddings: vocabulary size ``V``.
      features: ``E``.
      init_scale: standard deviation of the initial entries.

    Returns:
      A ``Pointwise`` mapping integer ``(...)`` to ``(..., E)``.
    """
    V = _as_int(num_embeddings, "num_embeddings")
    E = _as_int(features, "features")

    def init(key, input_size=None):
        del input_size
        return {"table": init_scale * jax.random.normal(key, (V, E), jnp.float32)}

    def apply(params, ids):
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"embedding: ids must be integers, got dtype {ids.dtype}.")
        return jnp.take(params["table"], ids, axis=0)

    return Pointwise(init, apply)
