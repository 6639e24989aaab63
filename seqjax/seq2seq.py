"""Sequence shapes: many-to-one, many-to-many, encoder-decoder, and generation.

* ``many_to_one(body, head)``: classify/regress a whole sequence from its last valid step
  (or a masked mean/max over steps).
* ``many_to_many(body, head)``: one output per step (tagging, language modelling).
* ``encoder_decoder(encoder, decoder, head)``: unaligned sequence to sequence (Sutskever,
  Vinyals & Le 2014; Cho et al. 2014). The encoder's final carry starts the decoder, which
  is trained with teacher forcing (its inputs are the true previous targets).
* ``generate``: one-to-many autoregressive sampling (greedy or with temperature, keyed),
  and ``closed_loop`` for continuous outputs fed back as inputs (free-running forecasts).

A *body* is a ``Cell`` or a ``Layer`` (``seqjax.layers``); a *head* is a ``Pointwise``
(``dense``) applied at every step, or ``None``. Models are ``SeqModel(init, apply)``
pairs with params ``{"body": ..., "head": ...}``. Every model built here also says what its
recurrent cores are (its ``cores`` field, read by ``seqjax.spectrum.models.recurrent_cores``).

Generation runs one scan over time through ``unroll`` (the only time scan in seqjax): the
step of a wrapped cell reads out the logits, samples a token, feeds it back and steps the
cell; the PRNG key travels in the carry, split once per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._scan import time_axis_of
from seqjax._util import positive_int
from seqjax.cells import Cell
from seqjax.layers import Layer, Pointwise, as_layer, output_size
from seqjax.spectrum.models import (
    Core,
    _batch_major,
    _check_lengths,
    _cores_of,
    _pair,
    _prefixed,
    _require_params,
)
from seqjax.unroll import check_carry, sequence_mask, unroll

__all__ = [
    "SeqModel",
    "EncoderDecoder",
    "GenCarry",
    "last_step",
    "pool",
    "many_to_one",
    "many_to_many",
    "encoder_decoder",
    "generate",
    "closed_loop",
]

Params = Any


class SeqModel(NamedTuple):
    """A sequence model: ``init(key, input_size) -> params``, ``apply(params, xs, **kw) -> outputs``.

    Attributes:
      init: ``(key, input_size) -> params``.
      apply: ``(params, xs, **kw) -> outputs``.
      cores: ``(params, xs, *, lengths=None, time_axis=-2) -> dict[str, Core]``, the model's
        recurrent cells with their params and inputs (``seqjax.spectrum.models.recurrent_cores``),
        or ``None`` (built by hand). Set by ``many_to_one`` and ``many_to_many``: the body's
        cores, named ``"body.<name>"``.
    """

    init: Callable[..., Params]
    apply: Callable[..., jax.Array]
    cores: Callable[..., dict[str, Core]] | None = None


class EncoderDecoder(NamedTuple):
    """An encoder-decoder model (see ``encoder_decoder``).

    Attributes:
      init: ``(key, src_size, dec_input_size) -> {"encoder", "decoder", "head"}``.
      apply: ``(params, src, dec_inputs, *, src_lengths=None, dec_lengths=None,
        time_axis=-2) -> outputs (*batch, T_dec, O)`` (teacher forcing).
      encode: ``(params, src, *, lengths=None, time_axis=-2) -> decoder initial carry``.
      decode: ``(params, carry, dec_inputs, *, lengths=None, time_axis=-2)
        -> (final_carry, outputs)``.
      decoder: the decoder ``Cell`` (for ``generate``).
      head: the ``Pointwise`` head or ``None``.
      cores: ``(params, (src, dec_inputs), *, lengths=None, time_axis=-2) -> dict[str, Core]``
        with ``lengths`` ``None`` or ``(src_lengths, dec_lengths)``: the encoder's cores named
        ``"encoder.<name>"`` and ``"decoder"``, the decoder on the teacher-forced inputs from
        ``encode(params, src)`` (``seqjax.spectrum.models.recurrent_cores``), or ``None``.
    """

    init: Callable[..., Params]
    apply: Callable[..., jax.Array]
    encode: Callable[..., Any]
    decode: Callable[..., Any]
    decoder: Cell
    head: Pointwise | None
    cores: Callable[..., dict[str, Core]] | None = None


class GenCarry(NamedTuple):
    """Carry of the generation scan.

    Attributes:
      carry: the cell's carry.
      y: the cell's last output ``(*batch, O)`` (read out at the next step).
      key: raw PRNG key data (``jax.random.key_data``), split once per step.
    """

    carry: Any
    y: jax.Array
    key: jax.Array


# --------------------------------------------------------------------------- pooling


def last_step(ys: jax.Array, lengths: jax.Array | None = None, *, time_axis: int = -2) -> jax.Array:
    """The output at each sequence's last valid step: ``ys[..., lengths - 1, :]``.

    Args:
      ys: ``(*batch, T, O)`` (time at ``time_axis``).
      lengths: integer ``(*batch,)``; default ``T`` for every sequence. A length of 0 gives
        zeros.

    Returns:
      ``(*batch, O)``.
    """
    ys = jnp.asarray(ys)
    ta = time_axis_of(time_axis, ys.ndim, name="ys")
    ys_b = jnp.moveaxis(ys, ta, -2)  # (*batch, T, O)
    if lengths is None:
        return ys_b[..., -1, :]
    lengths = jnp.asarray(lengths)
    if tuple(lengths.shape) != tuple(ys_b.shape[:-2]):
        raise ValueError(f"lengths has shape {tuple(lengths.shape)} but needs {tuple(ys_b.shape[:-2])}.")
    idx = jnp.clip(lengths - 1, 0, ys_b.shape[-2] - 1)
    out = jnp.take_along_axis(ys_b, idx[..., None, None], axis=-2)[..., 0, :]
    return jnp.where((lengths > 0)[..., None], out, jnp.zeros_like(out))


def pool(
    ys: jax.Array, lengths: jax.Array | None = None, *, how: str = "last", time_axis: int = -2
) -> jax.Array:
    """Reduce a sequence of outputs to one vector per sequence, over valid steps only.

    ``"last"``: ``y_{n}`` at the sequence's own last step ``n = lengths - 1``;
    ``"mean"``: ``(1/n) sum_{t<n} y_t``; ``"max"``: ``max_{t<n} y_t`` (0 for empty sequences).

    Args:
      ys: ``(*batch, T, O)``.
      lengths: integer ``(*batch,)`` or ``None`` (all ``T``).
      how: ``"last"``, ``"mean"`` or ``"max"``.
      time_axis: the time axis of ``ys``.

    Returns:
      ``(*batch, O)``.
    """
    if how == "last":
        return last_step(ys, lengths, time_axis=time_axis)
    if how not in ("mean", "max"):
        raise ValueError(f"how must be 'last', 'mean' or 'max', got {how!r}.")
    ys = jnp.asarray(ys)
    ys_b = jnp.moveaxis(ys, time_axis_of(time_axis, ys.ndim, name="ys"), -2)
    T = ys_b.shape[-2]
    if lengths is None:
        lengths = jnp.full(ys_b.shape[:-2], T, jnp.int32)
    lengths = jnp.asarray(lengths)
    if tuple(lengths.shape) != tuple(ys_b.shape[:-2]):
        raise ValueError(f"lengths has shape {tuple(lengths.shape)} but needs {tuple(ys_b.shape[:-2])}.")
    m = sequence_mask(lengths, T)[..., None]  # (*batch, T, 1)
    if how == "mean":
        s = jnp.sum(jnp.where(m, ys_b, jnp.zeros_like(ys_b)), axis=-2)
        n = jnp.maximum(lengths, 1).astype(ys_b.dtype)[..., None]
        return s / n
    neg = jnp.full_like(ys_b, -jnp.inf)
    out = jnp.max(jnp.where(m, ys_b, neg), axis=-2)
    return jnp.where((lengths > 0)[..., None], out, jnp.zeros_like(out))


# --------------------------------------------------------------------------- many-to-one / many-to-many


def _body_and_head(body, head):
    layer = as_layer(body)
    if head is not None and not isinstance(head, Pointwise):
        raise TypeError(
            f"head must be a seqjax.layers.Pointwise (e.g. dense(C)) or None, got {type(head).__name__}."
        )
    return layer


def _body_cores(layer: Layer, who: str) -> Callable[..., dict[str, Core]]:
    """The ``cores`` capability of a body-and-head model: the body's cores, ``"body."`` prefixed."""

    def cores(params, xs, *, lengths=None, time_axis=-2):
        _require_params(params, who)
        if not isinstance(params, dict) or "body" not in params:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"{who}: params must be a dict with keys ['body', 'head'], got {got}.")
        build = _cores_of(layer, f"{who}: the body")
        return _prefixed("body", build(params["body"], xs, lengths=lengths, time_axis=time_axis))

    return cores


def _init_body_head(layer, head, key, input_size):
    k_b, k_h = jax.random.split(key)
    pb = layer.init(k_b, input_size)
    ph = None if head is None else head.init(k_h, output_size(layer, pb, input_size))
    return {"body": pb, "head": ph}


def many_to_one(body: Cell | Layer, head: Pointwise | None = None, *, pool_by: str = "last") -> SeqModel:
    """Sequence to one output (classification/regression of a whole sequence).

    ``o = head(pool(body(xs)))`` with ``pool_by`` ``"last"`` (the output at each
    sequence's own last valid step), ``"mean"`` or ``"max"`` over valid steps.

    Args:
      body: a ``Cell`` or ``Layer``.
      head: a ``Pointwise`` readout (e.g. ``dense(num_classes)``) or ``None``.
      pool_by: ``"last"``, ``"mean"`` or ``"max"``.

    Returns:
      A ``SeqModel``: ``init(key, input_size) -> {"body", "head"}``;
      ``apply(params, xs, *, lengths=None, carry=None, time_axis=-2, key=None) -> (*batch, O)``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> model = seqjax.many_to_one(seqjax.gru(4), seqjax.dense(2))
      >>> params = model.init(jax.random.key(0), input_size=3)     # {"body": ..., "head": ...}
      >>> print(model.apply(params, jnp.ones((2, 5, 3)), lengths=jnp.array([5, 3])).shape)   # (B, O)
      (2, 2)
    """
    layer = _body_and_head(body, head)
    if pool_by not in ("last", "mean", "max"):
        raise ValueError(f"pool_by must be 'last', 'mean' or 'max', got {pool_by!r}.")

    def init(key, input_size):
        return _init_body_head(layer, head, key, input_size)

    def apply(params, xs, *, lengths=None, carry=None, time_axis=-2, key=None):
        _, ys = layer.apply(params["body"], xs, carry=carry, lengths=lengths, time_axis=time_axis, key=key)
        z = pool(ys, lengths, how=pool_by, time_axis=time_axis)
        return z if head is None else head.apply(params["head"], z)

    return SeqModel(init, apply, _body_cores(layer, "many_to_one"))


def many_to_many(body: Cell | Layer, head: Pointwise | None = None) -> SeqModel:
    """Aligned sequence to sequence: one output per step, ``o_t = head(y_t)``.

    Outputs past each sequence's length are zero (mask the loss with the same lengths).

    Args:
      body: a ``Cell`` or ``Layer``.
      head: a ``Pointwise`` readout or ``None``.

    Returns:
      A ``SeqModel``: ``init(key, input_size) -> {"body", "head"}``;
      ``apply(params, xs, *, lengths=None, carry=None, time_axis=-2, key=None) -> (*batch, T, O)``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> model = seqjax.many_to_many(seqjax.lstm(4), seqjax.dense(2))
      >>> params = model.init(jax.random.key(0), input_size=3)
      >>> out = model.apply(params, jnp.ones((2, 5, 3)), lengths=jnp.array([5, 3]))
      >>> print(out.shape, bool(jnp.all(out[1, 3:] == 0)))      # (B, T, O); zero past the length
      (2, 5, 2) True
    """
    layer = _body_and_head(body, head)

    def init(key, input_size):
        return _init_body_head(layer, head, key, input_size)

    def apply(params, xs, *, lengths=None, carry=None, time_axis=-2, key=None):
        _, ys = layer.apply(params["body"], xs, carry=carry, lengths=lengths, time_axis=time_axis, key=key)
        if head is None:
            return ys
        out = head.apply(params["head"], ys)
        if lengths is not None:
            ta = time_axis_of(time_axis, out.ndim, name="ys")
            m = sequence_mask(jnp.asarray(lengths), out.shape[ta], time_axis=ta)
            out = jnp.where(m[..., None], out, jnp.zeros_like(out))
        return out

    return SeqModel(init, apply, _body_cores(layer, "many_to_many"))


# --------------------------------------------------------------------------- encoder-decoder


def encoder_decoder(
    encoder: Cell | Layer,
    decoder: Cell,
    head: Pointwise | None = None,
    *,
    bridge: Callable[[Any], Any] | None = None,
) -> EncoderDecoder:
    r"""Encoder-decoder for unaligned sequence to sequence, trained with teacher forcing.

    ```text
    c^enc = encoder(src)                    final carry, at each source's own end
    s_0   = bridge(c^enc)                   default: the identity
    s_t, y_t = decoder.step(s_{t-1}, u_t)   u_t: decoder inputs (teacher forcing:
                                             the embedded previous target tokens)
    o_t   = head(y_t)
    ```

    With the identity bridge the encoder's carry must have the decoder's carry structure:
    same cell type and sizes, and for a ``stack`` encoder a ``stack`` decoder with the
    same layers (layer ``l`` of the decoder starts from layer ``l`` of the encoder).
    Give a ``bridge`` otherwise (e.g. ``lambda c: c.fwd`` for a bidirectional encoder).

    At inference, decode autoregressively with ``generate(model.decoder,
    params["decoder"], readout, bos, num_steps, carry=model.encode(params, src), ...)``.

    Args:
      encoder: a ``Cell`` or ``Layer``.
      decoder: a ``Cell`` (causal: it is also run step by step at inference).
      head: a ``Pointwise`` readout on the decoder's outputs, or ``None``.
      bridge: ``carry -> carry`` from the encoder's final carry to the decoder's initial one.

    Returns:
      An ``EncoderDecoder``.
    """
    enc = as_layer(encoder)
    if not isinstance(decoder, Cell):
        raise TypeError(f"decoder must be a seqjax.Cell, got {type(decoder).__name__}.")
    if head is not None and not isinstance(head, Pointwise):
        raise TypeError(f"head must be a Pointwise or None, got {type(head).__name__}.")
    bridge_fn = (lambda c: c) if bridge is None else bridge

    def init(key, src_size, dec_input_size):
        k_e, k_d, k_h = jax.random.split(key, 3)
        pd = decoder.init(k_d, dec_input_size)
        ph = None if head is None else head.init(k_h, output_size(decoder, pd, dec_input_size))
        return {"encoder": enc.init(k_e, src_size), "decoder": pd, "head": ph}

    def encode(params, src, *, lengths=None, time_axis=-2):
        c, _ = enc.apply(params["encoder"], src, lengths=lengths, time_axis=time_axis)
        return bridge_fn(c)

    def decode(params, carry, dec_inputs, *, lengths=None, time_axis=-2):
        dec_inputs = jnp.asarray(dec_inputs)
        ta = time_axis_of(time_axis, dec_inputs.ndim, name="dec_inputs")
        batch_shape = tuple(np.delete(np.array(dec_inputs.shape[:-1], dtype=np.int64), ta).tolist())
        check_carry(
            decoder,
            params["decoder"],
            carry,
            batch_shape,
            name="decoder initial carry (bridge(encoder carry))",
        )
        c, ys = unroll(
            decoder, params["decoder"], dec_inputs, carry=carry, lengths=lengths, time_axis=time_axis
        )
        if head is not None:
            ys = head.apply(params["head"], ys)
            if lengths is not None:
                m = sequence_mask(jnp.asarray(lengths), ys.shape[ta], time_axis=ta)
                ys = jnp.where(m[..., None], ys, jnp.zeros_like(ys))
        return c, ys

    def apply(params, src, dec_inputs, *, src_lengths=None, dec_lengths=None, time_axis=-2):
        carry = encode(params, src, lengths=src_lengths, time_axis=time_axis)
        return decode(params, carry, dec_inputs, lengths=dec_lengths, time_axis=time_axis)[1]

    def cores(params, xs, *, lengths=None, time_axis=-2):
        who = "encoder_decoder"
        _require_params(params, who)
        src, dec_inputs = _pair(xs, "xs", "(src, dec_inputs)", who)
        src_lengths, dec_lengths = (
            (None, None) if lengths is None else _pair(lengths, "lengths", "(src_lengths, dec_lengths)", who)
        )
        src_bm = _batch_major(src, time_axis, name="src")
        dec_bm = _batch_major(dec_inputs, time_axis, name="dec_inputs")
        src_lengths = _check_lengths(src_lengths, src_bm, name="src_lengths", of="src")
        dec_lengths = _check_lengths(dec_lengths, dec_bm, name="dec_lengths", of="dec_inputs")
        if src_bm.shape[:-2] != dec_bm.shape[:-2]:
            raise ValueError(
                f"{who}: src has batch shape {tuple(src_bm.shape[:-2])} but dec_inputs has "
                f"{tuple(dec_bm.shape[:-2])}; they need the same batch shape (the encoder's carry starts "
                "the decoder)."
            )
        out = _prefixed(
            "encoder", _cores_of(enc, f"{who}: the encoder")(params["encoder"], src_bm, lengths=src_lengths)
        )
        carry = encode(params, src_bm, lengths=src_lengths)
        check_carry(
            decoder,
            params["decoder"],
            carry,
            tuple(dec_bm.shape[:-2]),
            name="decoder initial carry (bridge(encoder carry))",
        )
        out["decoder"] = Core(decoder, params["decoder"], dec_bm, carry, dec_lengths)
        return out

    return EncoderDecoder(init, apply, encode, decode, decoder, head, cores)


# --------------------------------------------------------------------------- generation


def _as_typed_key(key):
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _autoregress(
    cell, params, prompt, num_steps, *, readout, choose, feedback, key, carry, prompt_lengths, keep_outs
):
    """Shared engine of ``generate`` and ``closed_loop``: one ``unroll`` over the prompt, then
    one ``unroll`` of a wrapped cell over ``num_steps`` steps."""
    if not isinstance(cell, Cell):
        raise TypeError(f"cell must be a seqjax.Cell, got {type(cell).__name__}.")
    positive_int(num_steps, "num_steps")
    prompt = jnp.asarray(prompt)
    if prompt.ndim < 2:
        raise ValueError(
            f"prompt has shape {tuple(prompt.shape)} but needs (*batch, P, I) with P >= 1 steps "
            "(a single first input x_0 is prompt=x_0[..., None, :])."
        )
    if prompt_lengths is not None and _concrete_min(prompt_lengths) == 0:
        raise ValueError("prompt_lengths must be >= 1 (generation continues from the prompt's last step).")
    batch_shape = tuple(prompt.shape[:-2])
    input_size = prompt.shape[-1]
    c, ys = unroll(cell, params, prompt, carry=carry, lengths=prompt_lengths)
    y_last = last_step(ys, prompt_lengths)

    if key is None:
        key = jax.random.key(0)
    key = _as_typed_key(key)
    impl = jax.random.key_impl(key)
    kd = jax.random.key_data(key)
    y_struct = jax.ShapeDtypeStruct(y_last.shape, y_last.dtype)
    if isinstance(feedback, str):  # "one_hot": the vocabulary size is the readout's width
        V = jax.eval_shape(readout, y_struct).shape[-1]
        feedback = lambda token: jax.nn.one_hot(token, V, dtype=prompt.dtype)

    def init(k, _input_size):
        return cell.init(k, input_size)

    def initial_carry(p, bs=()):
        bs = (bs,) if isinstance(bs, int) else tuple(bs)
        return GenCarry(
            cell.initial_carry(p, bs),
            jnp.zeros(bs + y_struct.shape[len(batch_shape) :], y_struct.dtype),
            jnp.zeros(kd.shape, kd.dtype),
        )

    def step(p, gc, _x):
        k, sub = jax.random.split(jax.random.wrap_key_data(gc.key, impl=impl))
        out = readout(gc.y)
        token = choose(out, sub)
        x = feedback(token)
        if x.shape != batch_shape + (input_size,):
            raise ValueError(
                f"feedback returned shape {tuple(x.shape)} but the cell needs inputs "
                f"{batch_shape + (input_size,)} "
                "(the prompt's batch and feature shape)."
            )
        x = x.astype(prompt.dtype)
        c_new, y = cell.step(p, gc.carry, x)
        return GenCarry(c_new, y, jax.random.key_data(k)), (token, out if keep_outs else None)

    gen = Cell(init, initial_carry, step)
    dummy = jnp.zeros(batch_shape + (num_steps, 0), prompt.dtype)
    final, (tokens, outs) = unroll(gen, params, dummy, carry=GenCarry(c, y_last, kd))
    return final.carry, tokens, outs


def _concrete_min(x):
    try:
        return int(np.min(np.asarray(x)))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def generate(
    cell: Cell,
    params: Params,
    readout: Callable[[jax.Array], jax.Array],
    prompt: jax.Array,
    num_steps: int,
    *,
    feedback: Callable[[jax.Array], jax.Array] | None = None,
    key: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    carry: Any = None,
    prompt_lengths: jax.Array | None = None,
    return_logits: bool = False,
):
    r"""Autoregressive sampling of tokens (one-to-many), jit-compatible.

    The cell first reads the prompt ``x_1..x_P`` (one ``unroll``; from ``carry`` if
    given, e.g. an encoder's final carry). Then, for ``k = 1..N``:

    ```text
    z_k   = readout(y_{k-1})                         logits (*batch, V); y_0 = last prompt output
    w_k   ~ Categorical(softmax(z_k / temperature))  argmax(z_k) when temperature == 0
    s_k, y_k = cell.step(s_{k-1}, feedback(w_k))
    ```

    ``top_k`` keeps the ``k`` largest logits before sampling. Each step splits the key once;
    one key samples every sequence of the batch independently. The loop is one scan
    (``unroll`` of a wrapped cell), so the whole call runs under ``jax.jit`` (``num_steps``,
    ``top_k`` and ``return_logits`` static).

    Args:
      cell: a causal ``Cell`` (a ``stack`` works).
      params: its params.
      readout: ``y (*batch, O) -> logits (*batch, V)``; close over its params, e.g.
        ``lambda y: head.apply(head_params, y)``.
      prompt: ``(*batch, P, I)``, the first inputs (features: for a token prompt pass
        ``feedback(prompt_tokens)``; for one start input ``x_0[..., None, :]``).
      num_steps: ``N``, tokens to generate.
      feedback: ``tokens (*batch,) int -> (*batch, I)``, the next input (e.g. an embedding
        lookup); default ``one_hot(token, V)`` (needs ``I == V``).
      key: PRNG key; needed unless ``temperature == 0``.
      temperature: ``> 0`` (softer above 1, sharper below), or ``0`` for greedy decoding.
        May be a traced scalar.
      top_k: sample among the ``k`` most likely tokens only.
      carry: initial carry of the cell (default zeros).
      prompt_lengths: integer ``(*batch,)`` in ``[1, P]`` for prompts of unequal lengths
        (left-aligned, padded after); generation continues from each prompt's own end.
      return_logits: also return the logits of every step.

    Returns:
      ``(final_carry, tokens)`` with ``tokens: (*batch, N)`` int32, or
      ``(final_carry, tokens, logits (*batch, N, V))``. ``final_carry`` has read every
      generated token.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> V = 3                                                   # vocabulary; one-hot feedback: I = V
      >>> cell, head = seqjax.gru(4), seqjax.dense(V)
      >>> params = cell.init(jax.random.key(0), input_size=V)
      >>> head_params = head.init(jax.random.key(1), 4)
      >>> prompt = jax.nn.one_hot(jnp.array([[1, 2], [0, 1]]), V)   # (B, P, V)
      >>> carry, tokens = seqjax.generate(
      ...     cell, params, lambda y: head.apply(head_params, y), prompt, 6, key=jax.random.key(2))
      >>> print(tokens.shape, tokens.dtype, carry.shape)
      (2, 6) int32 (2, 4)
      >>> bool(jnp.all((0 <= tokens) & (tokens < V)))
      True

      With an embedding, feed the tokens back through it (``feedback``) and pass the embedded
      prompt; ``temperature=0`` decodes greedily. Under ``jax.jit``:

      ```python
      f = jax.jit(lambda p, k: generate(cell, p["cell"], lambda y: head.apply(p["head"], y),
                                        emb.apply(p["emb"], bos)[..., None, :], 20,
                                        feedback=lambda w: emb.apply(p["emb"], w),
                                        key=k, temperature=0.8))
      ```
    """
    greedy = isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0
    if isinstance(temperature, (int, float)) and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if not greedy and key is None:
        raise ValueError("generate: sampling needs key=jax.random.key(...) (or temperature=0 for greedy).")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}.")

    def choose(logits, k):
        if logits.ndim < 1 or logits.shape[:-1] != prompt_batch:
            raise ValueError(
                f"readout returned shape {tuple(logits.shape)} but needs (*batch, V) "
                f"with batch {prompt_batch}."
            )
        best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if greedy:
            return best
        z = logits
        if top_k is not None and top_k < z.shape[-1]:
            kth = jax.lax.top_k(z, top_k)[0][..., -1:]
            z = jnp.where(z >= kth, z, jnp.full_like(z, -jnp.inf))
        t = jnp.asarray(temperature, z.dtype)
        positive = t > 0
        sample = jax.random.categorical(k, z / jnp.where(positive, t, jnp.ones_like(t)), axis=-1).astype(
            jnp.int32
        )
        return jnp.where(positive, sample, best)

    prompt_batch = tuple(jnp.shape(prompt)[:-2])
    c, tokens, logits = _autoregress(
        cell,
        params,
        prompt,
        num_steps,
        readout=readout,
        choose=choose,
        feedback="one_hot" if feedback is None else feedback,
        key=key,
        carry=carry,
        prompt_lengths=prompt_lengths,
        keep_outs=return_logits,
    )
    return (c, tokens, logits) if return_logits else (c, tokens)


def closed_loop(
    cell: Cell,
    params: Params,
    prompt: jax.Array,
    num_steps: int,
    *,
    readout: Callable[[jax.Array], jax.Array] | None = None,
    feedback: Callable[[jax.Array], jax.Array] | None = None,
    carry: Any = None,
    prompt_lengths: jax.Array | None = None,
):
    r"""Free-running (closed-loop) prediction: each output is fed back as the next input.

    After reading the prompt, for ``k = 1..N``: ``o_k = readout(y_{k-1})``,
    ``s_k, y_k = cell.step(s_{k-1}, feedback(o_k))``. Deterministic (no sampling): the
    continuous counterpart of ``generate``, e.g. multi-step forecasting of a time series.

    Args:
      cell: a causal ``Cell``.
      params: its params.
      prompt: ``(*batch, P, I)``.
      num_steps: ``N``.
      readout: ``(*batch, O) -> (*batch, D)``; default the identity.
      feedback: ``(*batch, D) -> (*batch, I)``; default the identity (needs ``D == I``).
      carry: initial carry (default zeros).
      prompt_lengths: integer ``(*batch,)`` in ``[1, P]``.

    Returns:
      ``(final_carry, outputs)`` with ``outputs: (*batch, N, D)``.
    """
    ident = lambda a: a
    c, outs, _ = _autoregress(
        cell,
        params,
        prompt,
        num_steps,
        readout=readout or ident,
        choose=lambda o, k: o,
        feedback=feedback or ident,
        key=None,
        carry=carry,
        prompt_lengths=prompt_lengths,
        keep_outs=False,
    )
    return c, outs
