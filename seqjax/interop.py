"""PyTorch interop: ``torch.nn.RNN/LSTM/GRU`` state dicts <-> seqjax params and models.

``from_torch(module)`` (or a ``state_dict`` plus the module's arguments) returns
``(params, model)`` where ``model`` is a ``TorchRNN``: a seqjax network that computes what
the PyTorch module computes, to floating-point rounding:

```text
params, model = from_torch(torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True))
out, (h_n, c_n) = model(params, xs)             # xs laid out as the module expects
carries, ys = model.layer.apply(params, xs_bm)  # the same network as a seqjax Layer
state_dict = to_torch(params, model)            # back to torch tensors, bit for bit
```

Mapping (row-vector convention: seqjax kernels are PyTorch's transposed):

```text
weight_ih_l{k}{sfx}: (G*H, I)  <->  w_x: (I, G*H)
weight_hh_l{k}{sfx}: (G*H, P)  <->  w_h: (P, G*H)
bias_ih_l{k}{sfx}:   (G*H,)    <->  b
bias_hh_l{k}{sfx}:   (G*H,)    <->  b_h
weight_hr_l{k}{sfx}: (P, H)    <->  w_p: (H, P)      (LSTM with proj_size = P > 0)
```

with ``sfx = "_reverse"`` for the backward direction. Gate orders are PyTorch's in both
(LSTM ``i, f, g, o``; GRU ``r, z, n``), so blocks map one to one. Params are a tuple with
one entry per layer: the cell's params dict (unidirectional) or ``{"fwd": ..., "bwd": ...}``
(bidirectional). With ``bias=False`` the seqjax biases are zeros (``to_torch`` checks they
still are).

``torch`` is imported lazily: this module imports without it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._util import same_treedef
from seqjax.cells import Cell, LSTMState, gru, lstm, rnn
from seqjax.cells.wrappers import _check_key
from seqjax.layers import BiCarry, Layer, as_layer, bidirectional, stack, stack_layers

__all__ = ["TorchRNN", "from_torch", "to_torch"]

_MODES = {
    "rnn_tanh": "rnn_tanh",
    "tanh": "rnn_tanh",
    "rnn": "rnn_tanh",
    "rnn_relu": "rnn_relu",
    "relu": "rnn_relu",
    "lstm": "lstm",
    "gru": "gru",
}
_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
_MODULE_NAMES = {"rnn_tanh": "an RNN", "rnn_relu": "an RNN", "lstm": "an LSTM", "gru": "a GRU"}


class TorchRNN(NamedTuple):
    """A seqjax twin of a ``torch.nn.RNN/LSTM/GRU`` module.

    Calling it, ``model(params, xs, hx=None, *, lengths=None, key=None)``, takes and returns
    PyTorch's layouts: ``xs: (T, B, I)``, or ``(B, T, I)`` with ``batch_first``, or
    unbatched ``(T, I)``; returns ``(output, h_n)`` (RNN, GRU) or ``(output, (h_n, c_n))``
    (LSTM) with ``output: (..., T, D*H_out)`` in the input's layout and
    ``h_n: (L*D, B, H_out)``, ``c_n: (L*D, B, H)`` (index ``l*D + d``). ``lengths``
    (``(B,)``) plays the role of a packed sequence: outputs past a length are zero and the
    final states are taken at each sequence's own end, as ``pack_padded_sequence`` then
    ``pad_packed_sequence(total_length=T)``. ``key`` turns on dropout between layers
    (PyTorch's training mode); without it, no dropout (evaluation mode). To compile,
    wrap the call: ``jax.jit(lambda p, x: model(p, x))`` (a NamedTuple instance is not a
    function ``jax.jit`` can hold a weak reference to).

    Attributes:
      layer: the network as a seqjax ``Layer`` (``stack_layers`` of per-layer layers;
        batch-major by default).
      cell: for unidirectional modules, the same network as one ``stack`` ``Cell`` (one
        scan; use it with ``unroll``, ``generate``, spectra); ``None`` when bidirectional.
      mode: ``"rnn_tanh"``, ``"rnn_relu"``, ``"lstm"`` or ``"gru"``.
      input_size: the module's ``input_size``.
      hidden_size: its ``hidden_size``.
      num_layers: its ``num_layers``.
      bidirectional: its ``bidirectional``.
      proj_size: its ``proj_size`` (0: none).
      batch_first: its ``batch_first``.
      bias: its ``bias``.
      dropout: its ``dropout`` between layers.
    """

    layer: Layer
    cell: Cell | None
    mode: str
    input_size: int
    hidden_size: int
    num_layers: int
    bidirectional: bool
    proj_size: int
    batch_first: bool
    bias: bool
    dropout: float

    @property
    def num_directions(self) -> int:
        """``D``: 2 when bidirectional, else 1."""
        return 2 if self.bidirectional else 1

    def carry_from_torch(self, hx, *, batch_shape: tuple[int, ...] | None = None) -> tuple:
        """PyTorch's ``h_0`` (``(h_0, c_0)`` for the LSTM) to the carry of ``self.layer`` (a
        tuple per layer; ``BiCarry`` when bidirectional).

        Args:
          hx: ``h_0: (L*D, *batch, H_out)`` (RNN, GRU), or ``(h_0, c_0)`` with
            ``c_0: (L*D, *batch, H)`` (LSTM), index ``l*D + d`` (PyTorch's layout;
            ``H_out = proj_size or hidden_size``). Arrays or tensors, floating.
          batch_shape: the batch shape the leaves must have (``(B,)``, or ``()`` for an
            unbatched input); ``None`` accepts any (``h_0`` and ``c_0`` must still agree).

        Returns:
          The carry: a tuple with one entry per layer.

        Raises:
          TypeError: ``hx`` is not an array (a pair of arrays for the LSTM) or not floating.
          ValueError: ``hx`` has the wrong structure or shape; the message names ``hx`` (its
            part: ``hx[0]`` is ``h_0``, ``hx[1]`` is ``c_0``), what it got and the shape
            PyTorch's convention needs.
        """
        h, c = self._hx_arrays(hx, batch_shape)
        D = self.num_directions
        out = []
        for layer in range(self.num_layers):
            per = []
            for d in range(D):
                i = layer * D + d
                per.append(LSTMState(h[i], c[i]) if c is not None else h[i])
            out.append(BiCarry(*per) if D == 2 else per[0])
        return tuple(out)

    def _hx_arrays(self, hx, batch_shape: tuple[int, ...] | None):
        """``(h_0, c_0)`` (``c_0`` ``None`` but for the LSTM) as arrays, checked against PyTorch's
        convention; every error names ``hx``."""
        n = self.num_layers * self.num_directions
        H_out = self.proj_size or self.hidden_size
        batch = "*batch" if batch_shape is None else ("B" if batch_shape else None)
        dims = ", ".join(x for x in ("num_layers * num_directions", batch) if x)

        def need(size_name: str, size: int) -> str:
            shape = "" if batch_shape is None else str((n, *batch_shape, size))
            return f"({dims}, {size_name}){' = ' + shape if shape else ''}"

        need_h = need("proj_size" if self.proj_size else "hidden_size", H_out)
        sizes = f"num_layers = {self.num_layers}, num_directions = {self.num_directions}" + (
            "" if batch_shape is None else f", batch shape {tuple(batch_shape)} from xs"
        )
        if self.mode == "lstm":
            need_c = need("hidden_size", self.hidden_size)
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ValueError(
                    f"hx must be a pair (h_0, c_0) for an LSTM (PyTorch's convention), h_0: {need_h} "
                    f"and c_0: {need_c}; got {_describe(hx)}."
                )
            h = _hx_leaf(hx[0], "hx[0] (h_0)")
            c = _hx_leaf(hx[1], "hx[1] (c_0)")
            parts = [(h, "hx[0] (h_0)", need_h, H_out), (c, "hx[1] (c_0)", need_c, self.hidden_size)]
        else:
            if isinstance(hx, (tuple, list)):
                raise ValueError(
                    f"hx must be one array h_0 of shape {need_h} for {_MODULE_NAMES[self.mode]} "
                    f"(PyTorch's convention; a pair (h_0, c_0) is an LSTM's); got {_describe(hx)}."
                )
            h, c = _hx_leaf(hx, "hx"), None
            parts = [(h, "hx", need_h, H_out)]
        for a, name, needed, size in parts:
            ok = a.ndim >= 2 and a.shape[0] == n and a.shape[-1] == size
            if batch_shape is not None:
                ok = ok and tuple(a.shape[1:-1]) == tuple(batch_shape)
            if not ok:
                hint = ""
                if batch_shape == () and a.ndim == 3:
                    hint = " For an unbatched xs (T, I), hx has no batch axis either."
                elif batch_shape and a.ndim == 2:
                    hint = " For a batched xs, hx has a batch axis after the layer axis."
                raise ValueError(
                    f"{name} has shape {tuple(a.shape)} but PyTorch's convention needs {needed} "
                    f"({sizes}).{hint}"
                )
        if c is not None and h.shape[1:-1] != c.shape[1:-1]:
            raise ValueError(
                f"hx[0] (h_0) has batch shape {tuple(h.shape[1:-1])} but hx[1] (c_0) has "
                f"{tuple(c.shape[1:-1])}: they must agree."
            )
        return h, c

    def carry_to_torch(self, carry):
        """The carry of ``self.layer`` to PyTorch's ``h_n`` (``(h_n, c_n)`` for the LSTM)."""
        hs, cs = [], []
        for layer_carry in carry:
            dirs = tuple(layer_carry) if self.bidirectional else (layer_carry,)
            for c in dirs:
                if self.mode == "lstm":
                    hs.append(c.h)
                    cs.append(c.c)
                else:
                    hs.append(c)
        h_n = jnp.stack(hs, axis=0)
        return (h_n, jnp.stack(cs, axis=0)) if self.mode == "lstm" else h_n

    def __call__(self, params, xs, hx=None, *, lengths=None, key=None):
        """Run the network as the PyTorch module would (see the class docstring).

        Args:
          params: the tuple of per-layer params (``from_torch``'s).
          xs: ``(T, I)``, ``(T, B, I)``, or ``(B, T, I)`` with ``batch_first``. A torch
            tensor is copied (detached: no gradient reaches PyTorch).
          hx: ``h_0: (L*D, B, H_out)`` (``(L*D, H_out)`` unbatched), or ``(h_0, c_0)`` with
            ``c_0: (L*D, B, H)`` for the LSTM, ``H_out = proj_size or hidden_size``, floating
            arrays or tensors (copied as ``xs``); ``None``: zeros.
          lengths: integer ``(B,)`` or ``None``: each sequence's length (a packed sequence).
          key: PRNG key: dropout between layers (training mode); ``None``: no dropout.

        Returns:
          ``(output, h_n)`` (RNN, GRU) or ``(output, (h_n, c_n))`` (LSTM).

        Raises:
          TypeError: ``xs`` or ``hx`` is not a (floating, for ``hx``) array.
          ValueError: a wrong shape of ``xs``, ``hx`` or ``lengths``, ``params`` that are not
            one entry per layer, or a ``key`` that is not a PRNG key; each message names the
            argument.
        """
        if not isinstance(params, (tuple, list)) or len(params) != self.num_layers:
            raise ValueError(
                f"params must be a tuple of {self.num_layers} per-layer params (from_torch's), "
                f"got {_describe(params)}."
            )
        xs = _as_array(xs, "xs", "(T, I), (T, B, I) or, with batch_first, (B, T, I)")
        if xs.ndim == 2:
            time_axis = 0
        elif xs.ndim == 3:
            time_axis = 1 if self.batch_first else 0
        else:
            raise ValueError(
                f"xs has shape {tuple(xs.shape)} but PyTorch's recurrent modules take (T, I), (T, B, I) or, "
                "with batch_first, (B, T, I)."
            )
        if xs.shape[-1] != self.input_size:
            raise ValueError(
                f"xs has {xs.shape[-1]} features but the module has input_size={self.input_size}."
            )
        key = _check_key(key, "TorchRNN")
        batch_shape = () if xs.ndim == 2 else (xs.shape[1 - time_axis],)
        carry = None if hx is None else self.carry_from_torch(hx, batch_shape=batch_shape)
        final, ys = self.layer.apply(
            params, xs, carry=carry, lengths=lengths, time_axis=time_axis, key=key, deterministic=key is None
        )
        return ys, self.carry_to_torch(final)


def _describe(x) -> str:
    """What ``x`` is, for an error message: type and, for arrays, shape and dtype."""
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of length {len(x)}"
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is not None:
        return f"one array of shape {tuple(shape)} and dtype {dtype}"
    return f"a value of type {type(x).__name__}"


def _as_array(x, name: str, layout: str) -> jax.Array:
    """``x`` (array, tensor, nested list) as a JAX array; a ``TypeError`` naming ``name`` else."""
    try:
        return jnp.asarray(_to_numpy(x) if hasattr(x, "detach") else x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array {layout}, got {_describe(x)} ({e}).") from None


def _hx_leaf(x, name: str) -> jax.Array:
    """One of ``h_0``, ``c_0`` as a floating JAX array."""
    a = _as_array(x, name, "(num_layers * num_directions, B, H) of floats")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} has dtype {a.dtype} but must be floating, as PyTorch's h_0 and c_0.")
    return a


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def _normalise_mode(mode) -> str:
    if not isinstance(mode, str) or mode.lower() not in _MODES:
        raise ValueError(
            "mode must be one of 'rnn_tanh', 'rnn_relu', 'lstm', 'gru' (PyTorch's module.mode), "
            f"got {mode!r}."
        )
    return _MODES[mode.lower()]


def _build(
    mode, input_size, hidden_size, num_layers, bidir, proj_size, batch_first, bias, dropout
) -> TorchRNN:
    if mode in ("rnn_tanh", "rnn_relu"):
        cell = rnn(hidden_size, activation="tanh" if mode == "rnn_tanh" else "relu", hidden_bias=bias)
    elif mode == "lstm":
        cell = lstm(hidden_size, proj_size=proj_size, hidden_bias=bias)
    else:
        cell = gru(hidden_size)
    if bidir:
        layers = [bidirectional(cell, cell, merge="concat") for _ in range(num_layers)]
        stacked = None
    else:
        layers = [as_layer(cell) for _ in range(num_layers)]
        stacked = stack([cell] * num_layers)
    return TorchRNN(
        stack_layers(layers, dropout=dropout),
        stacked,
        mode,
        int(input_size),
        int(hidden_size),
        int(num_layers),
        bool(bidir),
        int(proj_size),
        bool(batch_first),
        bool(bias),
        float(dropout),
    )


def _infer(sd: dict) -> dict:
    """Read num_layers, bidirectional, bias, proj_size, sizes and gates off state-dict keys."""
    if "weight_ih_l0" not in sd or "weight_hh_l0" not in sd:
        raise ValueError(
            "state_dict has no 'weight_ih_l0'/'weight_hh_l0': not the state dict of torch.nn.RNN/LSTM/GRU "
            f"(keys: {sorted(sd)[:6]}...)."
        )
    num_layers = 0
    while f"weight_ih_l{num_layers}" in sd:
        num_layers += 1
    w_ih = _to_numpy(sd["weight_ih_l0"])
    w_hh = _to_numpy(sd["weight_hh_l0"])
    proj = "weight_hr_l0" in sd
    P = _to_numpy(sd["weight_hr_l0"]).shape[0] if proj else 0
    H = _to_numpy(sd["weight_hr_l0"]).shape[1] if proj else w_hh.shape[1]
    return {
        "num_layers": num_layers,
        "bidirectional": "weight_ih_l0_reverse" in sd,
        "bias": "bias_ih_l0" in sd,
        "proj_size": P,
        "hidden_size": H,
        "input_size": w_ih.shape[1],
        "gates": w_ih.shape[0] // H,
    }


def from_torch(
    module_or_state_dict: Any,
    *,
    mode: str | None = None,
    num_layers: int | None = None,
    bidirectional: bool | None = None,
    proj_size: int | None = None,
    batch_first: bool | None = None,
    bias: bool | None = None,
    dropout: float | None = None,
) -> tuple[tuple, TorchRNN]:
    """Import a ``torch.nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (module or ``state_dict``).

    From a module every setting is read off the module. From a state dict, ``mode`` is
    required (``"rnn_tanh"``, ``"rnn_relu"``, ``"lstm"``, ``"gru"``: a tanh and a ReLU
    RNN have the same keys); ``num_layers``, ``bidirectional``, ``bias``, ``proj_size`` and
    the sizes are read off the keys and shapes, and any of them you pass must agree.
    ``batch_first`` (default ``False``) and ``dropout`` (default 0) are not in a state dict.

    Weights keep their dtype (``.double()`` modules give float64 params when
    ``jax_enable_x64`` is on).

    Args:
      module_or_state_dict: an ``nn.RNN``/``nn.LSTM``/``nn.GRU``, or its ``state_dict()``
        (a mapping of names to tensors or arrays).
      mode: ``"rnn_tanh"``, ``"rnn_relu"``, ``"lstm"`` or ``"gru"`` (required for a state dict).
      num_layers: the module's ``num_layers`` (read off the keys).
      bidirectional: the module's ``bidirectional`` (read off the keys).
      proj_size: the LSTM's ``proj_size`` (read off the shapes).
      batch_first: the module's ``batch_first`` (default ``False`` for a state dict).
      bias: the module's ``bias`` (read off the keys).
      dropout: the module's ``dropout`` between layers (default 0 for a state dict).

    Returns:
      ``(params, model)``: a tuple of per-layer params and a ``TorchRNN``.

    Raises:
      ValueError: unknown mode, a state dict that is not a recurrent module's, or settings
        that contradict the weights.

    Examples:
      A state dict needs no PyTorch (arrays work as well as tensors):

      >>> import numpy as np, jax.numpy as jnp, seqjax
      >>> rng = np.random.default_rng(0)
      >>> shapes = {"weight_ih_l0": (12, 3), "weight_hh_l0": (12, 4),
      ...           "bias_ih_l0": (12,), "bias_hh_l0": (12,)}
      >>> sd = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
      >>> params, model = seqjax.from_torch(sd, mode="gru", batch_first=True)
      >>> print(model.mode, model.input_size, model.hidden_size, model.num_layers)
      gru 3 4 1
      >>> output, h_n = model(params, jnp.ones((2, 5, 3)))       # PyTorch's layouts
      >>> print(output.shape, h_n.shape)
      (2, 5, 4) (1, 2, 4)
    """
    given = {
        "num_layers": num_layers,
        "bidirectional": bidirectional,
        "proj_size": proj_size,
        "bias": bias,
    }
    if hasattr(module_or_state_dict, "state_dict") and hasattr(module_or_state_dict, "mode"):
        m = module_or_state_dict
        if mode is not None and _normalise_mode(mode) != _normalise_mode(m.mode):
            raise ValueError(f"mode={mode!r} contradicts the module's mode {m.mode!r}.")
        mode_n = _normalise_mode(m.mode)
        sd = m.state_dict()
        batch_first = bool(m.batch_first) if batch_first is None else batch_first
        dropout = float(m.dropout) if dropout is None else dropout
        if batch_first != bool(m.batch_first):
            raise ValueError(f"batch_first={batch_first} contradicts the module's {m.batch_first}.")
    else:
        if mode is None:
            raise ValueError("from_torch(state_dict) needs mode= ('rnn_tanh', 'rnn_relu', 'lstm' or 'gru').")
        mode_n = _normalise_mode(mode)
        sd = dict(module_or_state_dict)
        batch_first = bool(batch_first) if batch_first is not None else False
        dropout = 0.0 if dropout is None else float(dropout)
    info = _infer(sd)
    if info["gates"] != _GATES[mode_n]:
        raise ValueError(
            f"weight_ih_l0 has {info['gates']}*H rows but mode {mode_n!r} needs {_GATES[mode_n]}*H "
            f"(H = {info['hidden_size']})."
        )
    for name, value in given.items():
        if value is not None and value != info[name]:
            raise ValueError(f"{name}={value!r} contradicts the state dict, which has {name}={info[name]!r}.")
    model = _build(
        mode_n,
        info["input_size"],
        info["hidden_size"],
        info["num_layers"],
        info["bidirectional"],
        info["proj_size"],
        batch_first,
        info["bias"],
        dropout,
    )
    per_layer: list[dict] = []
    for layer in range(model.num_layers):
        per = []
        for d in range(model.num_directions):
            per.append(_layer_params(sd, model, layer, "_reverse" if d else ""))
        per_layer.append({"fwd": per[0], "bwd": per[1]} if model.bidirectional else per[0])
    params = tuple(per_layer)
    # the params must be exactly what the model's init makes (tree and shapes)
    expected = jax.eval_shape(lambda k: model.layer.init(k, model.input_size), jax.random.key(0))
    got = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    if not same_treedef(jax.tree_util.tree_structure(expected), jax.tree_util.tree_structure(got)) or any(
        e.shape != g.shape
        for e, g in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got), strict=True)
    ):
        raise ValueError("from_torch: the state dict's shapes do not form a consistent module.")
    return params, model


def _layer_params(sd, model: TorchRNN, layer: int, sfx: str) -> dict:
    def get(name):
        key = f"{name}_l{layer}{sfx}"
        if key not in sd:
            raise ValueError(f"state_dict lacks {key!r}.")
        return _to_numpy(sd[key])

    p = {"w_x": jnp.asarray(get("weight_ih").T), "w_h": jnp.asarray(get("weight_hh").T)}
    if model.bias:
        p["b"] = jnp.asarray(get("bias_ih"))
        p["b_h"] = jnp.asarray(get("bias_hh"))
    else:
        zeros = jnp.zeros((p["w_x"].shape[1],), p["w_x"].dtype)
        p["b"] = zeros
        if model.mode == "gru":
            p["b_h"] = zeros
    if model.mode == "lstm" and model.proj_size:
        p["w_p"] = jnp.asarray(get("weight_hr").T)
    return p


def to_torch(params, model: TorchRNN) -> OrderedDict:
    """seqjax params of a ``TorchRNN`` back to a PyTorch ``state_dict`` (torch tensors).

    Keys and order are those of the module's own ``state_dict()``; values are the params
    transposed back, in their dtype, so ``to_torch(*from_torch(m))`` equals
    ``m.state_dict()`` exactly. Load it with ``module.load_state_dict(...)``.

    Args:
      params: the tuple of per-layer params (e.g. trained from ``from_torch``'s).
      model: the ``TorchRNN`` from ``from_torch``.

    Returns:
      An ``OrderedDict`` of ``torch.Tensor``.

    Raises:
      ValueError: params that do not fit the model, or nonzero biases for ``bias=False``.
    """
    import torch

    if not isinstance(params, (tuple, list)) or len(params) != model.num_layers:
        raise ValueError(f"params must be a tuple of {model.num_layers} per-layer params.")

    def t(a, transpose=False):
        arr = np.asarray(a)
        if transpose:
            arr = arr.T
        return torch.from_numpy(np.ascontiguousarray(arr).copy())

    out = OrderedDict()
    for layer in range(model.num_layers):
        p_layer = params[layer]
        dirs = [p_layer["fwd"], p_layer["bwd"]] if model.bidirectional else [p_layer]
        for d, p in enumerate(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            out["weight_ih" + sfx] = t(p["w_x"], True)
            out["weight_hh" + sfx] = t(p["w_h"], True)
            if model.bias:
                out["bias_ih" + sfx] = t(p["b"])
                out["bias_hh" + sfx] = t(p["b_h"])
            else:
                for name in ("b", "b_h"):
                    if name in p and np.any(np.asarray(p[name]) != 0):
                        where = f"params[{layer}]" + (
                            ["['fwd']", "['bwd']"][d] if model.bidirectional else ""
                        )
                        raise ValueError(
                            f"{where}[{name!r}] is nonzero but the module has bias=False: "
                            "PyTorch cannot hold it."
                        )
            if model.mode == "lstm" and model.proj_size:
                out["weight_hr" + sfx] = t(p["w_p"], True)
    return out
