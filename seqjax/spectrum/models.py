r"""Whole models to the analysis tools: the recurrent cores of a model and the inputs each sees.

The spectrum tools take ``(cell, params, xs)``. A model (``many_to_one``, a
``bidirectional`` layer, a ``stack_layers`` network, an ``encoder_decoder``, an NNX module)
holds one or more recurrent cells, each fed its own inputs: the backward cell of a
bidirectional layer reads each sequence from its own end, layer ``l`` of a stack reads the
outputs of the layers below, a decoder starts from the encoder's final carry.
``recurrent_cores`` lists them as ``Core(cell, params, xs, carry, lengths)`` tuples ready
for any analysis function, and ``over_cores`` runs one function over all of them.

Each model says what its cores are through its ``cores`` capability:
``cores(params, xs, *, lengths=None, time_axis=-2) -> dict[str, Core]``, a field of
``seqjax.layers.Layer``, ``seqjax.seq2seq.SeqModel`` and ``seqjax.seq2seq.EncoderDecoder``
(set by the functions that build them; ``None`` on a model built by hand) and a method of
the ``seqjax.nnx`` modules. The helpers below (``_batch_major``, ``_check_lengths``,
``_reverse_within``, ``_prefixed``, ...) are what those capabilities are made of; this module
imports nothing of the model modules, which import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from seqjax._scan import time_axis_of
from seqjax.cells import Cell

__all__ = ["Core", "recurrent_cores", "over_cores"]

_SUPPORTED = (
    "a seqjax Cell; a Layer from as_layer, bidirectional or stack_layers; a SeqModel from many_to_one "
    "or many_to_many; an EncoderDecoder from encoder_decoder; a seqjax.nnx Recurrent, RNN, LSTM, GRU, "
    "Bidirectional or Stack module"
)


class Core(NamedTuple):
    """One recurrent core of a model: a cell and exactly what it reads.

    Attributes:
      cell: the recurrent ``Cell``.
      params: its params.
      xs: the inputs that cell sees, batch-major ``(*batch, T, I)``, in the order the cell
        reads them (a backward cell's inputs are each sequence reversed within its own
        valid length; padding stays at the end).
      carry: its initial carry (leaves ``(*batch, ...)``), or ``None`` for
        ``cell.initial_carry`` zeros.
      lengths: integer ``(*batch,)``, the valid steps of each sequence, or ``None`` (all
        ``T``).
    """

    cell: Cell
    params: Any
    xs: jax.Array
    carry: Any
    lengths: jax.Array | None


# --------------------------------------------------------------------------- helpers of the capabilities


def _require_params(params: Any, who: str) -> None:
    """``ValueError`` when ``params`` is ``None`` (only NNX modules hold their own)."""
    if params is None:
        raise ValueError(
            f"{who}: params is None but this model needs its params (make them with model.init(...)); "
            "only seqjax.nnx modules hold their own params (params=None there)."
        )


def _batch_major(xs: Any, time_axis: int, name: str = "xs") -> jax.Array:
    """``xs`` with time moved to axis ``-2``: ``(*batch, T, I)``."""
    xs = jnp.asarray(xs)
    ta = time_axis_of(time_axis, xs.ndim, name=f"{name} of shape {tuple(xs.shape)}")
    return jnp.moveaxis(xs, ta, -2)


def _check_lengths(lengths: Any, xs_bm: jax.Array, name: str = "lengths", of: str = "xs") -> jax.Array | None:
    """``lengths`` as an integer array of the batch shape of ``xs_bm`` (or ``None``); shapes
    and dtype only (values are checked by ``unroll`` when concrete: no host sync here)."""
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    want = tuple(xs_bm.shape[:-2])
    if tuple(lengths.shape) != want:
        raise ValueError(
            f"{name} has shape {tuple(lengths.shape)} but needs {want}, the batch shape of {of} "
            f"(batch-major shape {tuple(xs_bm.shape)})."
        )
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, got dtype {lengths.dtype}.")
    return lengths


def _reverse_within(xs_bm: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Each sequence reversed within its own valid length, padding left at the end:
    ``out[..., t, :] = xs[..., n - 1 - t, :]`` for ``t < n`` and ``xs[..., t, :]`` after
    (``n = lengths``, default ``T``). This is the order ``unroll(reverse=True, lengths=...)``
    reads the valid steps in, so a forward ``unroll`` of ``out`` with the same ``lengths``
    ends in the same carry."""
    if lengths is None:
        return jnp.flip(xs_bm, axis=-2)
    T = xs_bm.shape[-2]
    n = jnp.asarray(lengths)[..., None]  # (*batch, 1)
    t = jnp.broadcast_to(jnp.arange(T, dtype=n.dtype), n.shape[:-1] + (T,))  # (*batch, T)
    idx = jnp.where(t < n, n - 1 - t, t)
    return jnp.take_along_axis(xs_bm, idx[..., None], axis=-2)


def _prefixed(prefix: str, cores: Mapping[str, Core]) -> dict[str, Core]:
    """``{f"{prefix}.{name}": core}``."""
    return {f"{prefix}.{name}": core for name, core in cores.items()}


def _cores_of(part: Any, who: str) -> Callable[..., dict[str, Core]]:
    """The ``cores`` capability of a sub-model, or ``TypeError`` naming ``who``."""
    build = getattr(part, "cores", None)
    if build is None or not callable(build):
        raise TypeError(
            f"{who} is a {type(part).__name__} without the cores capability (built by hand?), so its "
            "recurrent cores are unknown; build it with seqjax.as_layer/bidirectional/stack_layers, or give "
            "it cores=(params, xs, *, lengths=None, time_axis=-2) -> dict[str, Core]."
        )
    return build


def _pair(value: Any, name: str, what: str, who: str) -> tuple[Any, Any]:
    """``value`` as a pair ``(a, b)``: a tuple or list of two, else ``ValueError``."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        if isinstance(value, (tuple, list)):
            got = f"a {type(value).__name__} of length {len(value)}"
        elif hasattr(value, "shape"):
            got = f"an array of shape {tuple(value.shape)}"
        else:
            got = f"a {type(value).__name__}"
        raise ValueError(f"{who}: {name} must be the pair {what}, got {got}.")
    return value[0], value[1]


# --------------------------------------------------------------------------- public


def recurrent_cores(
    model: Any,
    params: Any,
    xs: Any,
    *,
    lengths: Any = None,
    time_axis: int = -2,
) -> dict[str, Core]:
    r"""The recurrent cores of a model: each recurrent cell, its params and the inputs it sees.

    | model | cores | what is analysed |
    |---|---|---|
    | a ``Cell`` | ``"cell"`` | the cell on ``xs`` |
    | ``as_layer(cell)`` | ``"cell"`` | the cell on ``xs`` (``reverse=True``: reversed, below) |
    | ``bidirectional(fwd, bwd)`` | ``"fwd"``, ``"bwd"`` | ``fwd`` on ``xs``; ``bwd`` on ``xs`` reversed |
    | ``stack_layers([l0, l1])`` | ``"layer0.<sub>"``, ``"layer1.<sub>"`` | layer ``l`` on the layers below |
    | ``stack(cells)`` (a cell) | ``"cell"`` | the whole stack: one state, every layer's carry |
    | ``many_to_one``, ``many_to_many`` | ``"body.<sub>"`` | the body's cores (the head does not recur) |
    | ``encoder_decoder(enc, dec)`` | ``"encoder.<sub>"``, ``"decoder"`` | ``enc`` on ``src``, ``dec`` below |
    | NNX ``Recurrent``, ``RNN``, ``LSTM``, ``GRU`` | ``"cell"`` | ``module.cell`` on ``xs`` |
    | NNX ``Bidirectional``, ``Stack`` | as ``module.as_layer()`` | as ``bidirectional``, ``stack_layers`` |

    ``"<sub>"`` is a sub-layer's own core name (``"cell"``, ``"fwd"``, ...). A stack's layer
    ``l`` reads the outputs of layers ``0..l-1`` run without dropout (``deterministic=True``)
    with the same ``lengths``. An encoder-decoder's ``"decoder"`` core is
    ``Core(dec, params["decoder"], dec_inputs, model.encode(params, src, lengths=src_lengths),
    dec_lengths)``: the decoder on its teacher-forced inputs from the encoder's (bridged) final
    carry. NNX modules are analysed through their functional layer ``module.as_layer()`` with
    ``module.to_params()``.

    Reversed inputs (a backward cell, ``as_layer(cell, reverse=True)``):
    ``xs_rev[b, t] = xs[b, n_b - 1 - t]`` for ``t < n_b = lengths[b]`` (default ``T``), and
    padding stays at the end. That is the order ``unroll(reverse=True, lengths=...)`` reads
    them in, so a forward run of the core ends in the backward cell's final carry.

    Options ``mask``/``resets`` fixed on a layer (``as_layer(cell, mask=...)``) are refused:
    analyse the cell directly. Options that do not change the forward values (``gradient``,
    ``solver``) are ignored.

    Pure ``jnp`` throughout (no host syncs): it runs under ``jax.jit`` (return arrays, not
    cells, from a jitted function).

    Args:
      model: a model with the ``cores`` capability (see the table), or a ``Cell``.
      params: its params; ``None`` for an NNX module means ``module.to_params()``.
      xs: ``(*batch, T, I)`` inputs (time at ``time_axis``). For an encoder-decoder, the pair
        ``(src, dec_inputs)``.
      lengths: integer ``(*batch,)`` valid steps, or ``None``. For an encoder-decoder, the
        pair ``(src_lengths, dec_lengths)`` (either may be ``None``) or ``None``.
      time_axis: time axis of ``xs`` (of both arrays of a pair).

    Returns:
      ``{name: Core(cell, params, xs (*batch, T, I) batch-major, carry, lengths)}``, in the order
      the model runs them.

    Raises:
      TypeError: ``model`` has no ``cores`` capability (names its type and the supported models).
      ValueError: ``params`` is ``None`` for a functional model, ``xs``/``lengths`` is not a pair
        for an encoder-decoder, ``lengths`` does not have the batch shape of ``xs``, or a layer
        has ``mask``/``resets`` fixed.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.spectrum.models import recurrent_cores
      >>> model = seqjax.many_to_one(seqjax.bidirectional(seqjax.gru(4)), seqjax.dense(2))
      >>> params = model.init(jax.random.key(0), input_size=1)
      >>> xs = jnp.arange(10.0).reshape(2, 5, 1)                  # (B, T, I)
      >>> cores = recurrent_cores(model, params, xs, lengths=jnp.array([5, 3]))
      >>> list(cores)
      ['body.fwd', 'body.bwd']
      >>> print(cores["body.bwd"].xs[..., 0])      # each sequence backwards from its own end
      [[4. 3. 2. 1. 0.]
       [7. 6. 5. 8. 9.]]
    """
    if isinstance(model, Cell):
        _require_params(params, "recurrent_cores")
        xs_bm = _batch_major(xs, time_axis)
        return {"cell": Core(model, params, xs_bm, None, _check_lengths(lengths, xs_bm))}
    build = getattr(model, "cores", None)
    if build is None or not callable(build):
        why = (
            " (its cores field is None: built by hand rather than by the seqjax function that makes it)"
            if hasattr(model, "cores")
            else ""
        )
        raise TypeError(
            f"recurrent_cores: a {type(model).__name__} has no cores capability{why}. "
            f"Supported: {_SUPPORTED}."
        )
    return dict(build(params, xs, lengths=lengths, time_axis=time_axis))


def over_cores(
    fn: Callable[..., Any],
    model: Any,
    params: Any,
    xs: Any,
    *,
    lengths: Any = None,
    time_axis: int = -2,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run an analysis function on every recurrent core of a model.

    ``{name: fn(core.cell, core.params, core.xs, carry=core.carry, lengths=core.lengths,
    **kwargs)}`` over ``recurrent_cores(model, params, xs, lengths=lengths,
    time_axis=time_axis)``; ``lengths=`` is passed only for a core that has lengths, so a
    function without that keyword serves models run without lengths. The cores' inputs are
    batch-major, so ``fn`` runs with its default ``time_axis``.

    Args:
      fn: ``(cell, params, xs, *, carry, [lengths,] **kwargs) -> result``, e.g.
        ``seqjax.spectrum.lyapunov_spectrum`` or ``step_jacobians``.
      model: as in ``recurrent_cores``.
      params: as in ``recurrent_cores``.
      xs: as in ``recurrent_cores``.
      lengths: as in ``recurrent_cores``.
      time_axis: time axis of ``xs``.
      **kwargs: passed to ``fn`` (e.g. ``k=2``).

    Returns:
      ``{name: fn(...)}``, one entry per core.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.spectrum.models import over_cores
      >>> net = seqjax.stack_layers([seqjax.rnn(3), seqjax.rnn(2)])
      >>> params = net.init(jax.random.key(0), input_size=2)
      >>> def sizes(cell, params, xs, carry=None, **kwargs):   # any analysis function fits here
      ...     return xs.shape, seqjax.spectrum.state_size(cell, params)
      >>> over_cores(sizes, net, params, jnp.ones((4, 6, 2)))   # layer 1 reads layer 0's 3 outputs
      {'layer0.cell': ((4, 6, 2), 3), 'layer1.cell': ((4, 6, 3), 2)}

      ``lyapunov_spectrum(net, params, xs, k=1)`` does the same with the spectrum.
    """
    out = {}
    for name, core in recurrent_cores(model, params, xs, lengths=lengths, time_axis=time_axis).items():
        extra = {} if core.lengths is None else {"lengths": core.lengths}
        out[name] = fn(core.cell, core.params, core.xs, carry=core.carry, **extra, **kwargs)
    return out
