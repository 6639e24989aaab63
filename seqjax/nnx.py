"""Flax NNX modules over seqjax cells: drop seqjax into an ``nnx.Module`` model.

Each module holds the functional params of its cell as ``nnx.Param`` attributes with the
same names and layouts (``module.w_x``, ``module.w_h``, ``module.b``, ...) and runs through
``seqjax.unroll``, so it equals the functional API given the same weights, and every
``unroll`` option (lengths, masks, resets, reversal, gradient strategies, solvers) is
forwarded as it is, and ``Recurrent.trajectory`` gives every step's carry and gates:

```text
from flax import nnx
import seqjax.nnx as sjnn

lstm = sjnn.LSTM(8, 32, rngs=nnx.Rngs(0))
carry, ys = lstm(xs)                       # xs: (B, T, 8) -> ys: (B, T, 32)
params = lstm.to_params()                  # {"w_x": (8, 128), "w_h": (32, 128), "b": (128,)}
same = sjnn.LSTM.from_params(params)       # and back
```

The GRU follows PyTorch's convention (``b_h``'s ``n`` block sits inside the reset product),
so weights ported from ``torch.nn.GRU`` reproduce PyTorch. Flax's own ``nnx.GRUCell`` has no
hidden-side bias inside the reset product, so ported PyTorch GRU weights do not reproduce
PyTorch there.

Modules:
  ``Recurrent``: any ``seqjax.Cell``. ``RNN``, ``LSTM``, ``GRU``: the built-in cells.
  ``Bidirectional``: two recurrent modules, one run backward in time, outputs merged.
  ``Stack``: layers applied in sequence (the outputs of one are the inputs of the next),
    with optional dropout between them that follows NNX's modes: ``model.train()`` turns
    it on, ``model.eval()`` off, and a call's ``deterministic=`` overrides both, as for
    ``flax.nnx.Dropout``.

Every module has ``cores(params, xs, ...)``, its recurrent cells and the inputs each reads
(those of its functional layer ``as_layer()``), so a module goes to the spectrum tools
whole: ``seqjax.spectrum.models.recurrent_cores(module, None, xs)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqjax import layers as _layers
from seqjax.cells import Cell, gru, lstm, rnn
from seqjax.cells.wrappers import _check_key
from seqjax.spectrum.models import Core, _cores_of
from seqjax.unroll import check_options, check_params, trajectory, unroll

__all__ = ["Recurrent", "RNN", "LSTM", "GRU", "Bidirectional", "Stack"]

_RESERVED = {"cell", "input_size", "hidden_size", "param_tree"}


def _module_cores(module: Any, params: Any, xs: Any, lengths: Any, time_axis: int) -> dict[str, Core]:
    """The cores of ``module.as_layer()`` with ``params`` (default ``module.to_params()``)."""
    build = _cores_of(module.as_layer(), f"{type(module).__name__}.as_layer()")
    return build(module.to_params() if params is None else params, xs, lengths=lengths, time_axis=time_axis)


def _is_flat(params: Any) -> bool:
    return isinstance(params, Mapping) and all(
        isinstance(k, str) and k.isidentifier() and isinstance(v, (jax.Array, jnp.ndarray))
        for k, v in params.items()
    )


class Recurrent(nnx.Module):
    """Any ``seqjax.Cell`` as an NNX module, its params held as ``nnx.Param``.

    A flat params dict (every built-in cell) becomes one ``nnx.Param`` attribute per key
    (``module.w_x`` ...); any other params pytree is held as ``module.param_tree`` with
    ``nnx.Param`` leaves.

    Args:
      cell: the ``Cell``.
      input_size: ``I``, the number of input features.
      rngs: ``nnx.Rngs``; its ``params`` stream seeds ``cell.init``. Needed unless ``params``.
      params: functional params to hold instead of initialising (checked against the cell).

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> from flax import nnx
      >>> from seqjax.nnx import Recurrent
      >>> mod = Recurrent(seqjax.mgu(4), 3, rngs=nnx.Rngs(0))
      >>> xs = jnp.ones((2, 5, 3))
      >>> carry, ys = mod(xs)
      >>> _, ys_fn = seqjax.unroll(seqjax.mgu(4), mod.to_params(), xs)     # the functional API
      >>> print(ys.shape, bool(jnp.allclose(ys, ys_fn)))
      (2, 5, 4) True
    """

    def __init__(self, cell: Cell, input_size: int, *, rngs: nnx.Rngs | None = None, params: Any = None):
        if not isinstance(cell, Cell):
            raise TypeError(f"cell must be a seqjax.Cell, got {type(cell).__name__}.")
        if params is None:
            if rngs is None:
                raise ValueError("Recurrent: pass rngs=nnx.Rngs(seed) to initialise, or params=... to wrap.")
            params = cell.init(rngs.params(), input_size)
        else:
            check_params(cell, params, input_size)
        self.cell = cell
        self.input_size = int(input_size)
        self.hidden_size = int(cell.meta.hidden_size) if cell.meta is not None else None
        self._keys: tuple[str, ...] | None  # the param names when flat, else None (param_tree)
        if _is_flat(params) and not (set(params) & (_RESERVED | set(dir(type(self))))):
            self._keys = tuple(params)
            for k, v in params.items():
                setattr(self, k, nnx.Param(jnp.asarray(v)))
        else:
            self._keys = None
            self.param_tree = nnx.data(jax.tree_util.tree_map(lambda a: nnx.Param(jnp.asarray(a)), params))

    @classmethod
    def wrap(cls, cell: Cell, params: Any) -> Recurrent:
        """A ``Recurrent`` holding ``params`` (functional params of ``cell``); input size read
        from ``params["w_x"]`` / ``params["w"]`` or found by ``check_params``-compatible probing.

        Args:
          cell: the ``Cell``.
          params: its params.

        Returns:
          ``Recurrent(cell, input_size, params=params)``.
        """
        return Recurrent(cell, _input_size_of(cell, params), params=params)

    def to_params(self) -> Any:
        """The functional params (plain arrays, same keys and layouts as ``cell.init``)."""
        if self._keys is not None:
            return {k: getattr(self, k)[...] for k in self._keys}
        return jax.tree_util.tree_map(
            lambda v: v[...], self.param_tree, is_leaf=lambda v: isinstance(v, nnx.Variable)
        )

    def as_layer(self) -> _layers.Layer:
        """The functional layer, ``seqjax.layers.as_layer(cell)`` (for ``Stack``)."""
        return _layers.as_layer(self.cell)

    def cores(self, params: Any, xs: Any, *, lengths: Any = None, time_axis: int = -2) -> dict[str, Core]:
        """The recurrent cores of this module: those of ``self.as_layer()``
        (``seqjax.spectrum.models.recurrent_cores``).

        Args:
          params: functional params of ``as_layer()``, or ``None`` for the module's own
            (``to_params()``).
          xs: ``(*batch, T, I)`` (time at ``time_axis``).
          lengths: integer ``(*batch,)`` or ``None``.
          time_axis: time axis of ``xs``.

        Returns:
          ``{name: Core(cell, params, xs, carry, lengths)}``: one, ``"cell"`` (``module.cell`` on
          ``xs``).
        """
        return _module_cores(self, params, xs, lengths, time_axis)

    def initial_carry(self, batch_shape: int | tuple[int, ...] = ()) -> Any:
        """``cell.initial_carry(params, batch_shape)``: zeros, leaves ``(*batch_shape, ...)``."""
        return self.cell.initial_carry(self.to_params(), batch_shape)

    def __call__(self, xs: jax.Array, **options):
        """Run the cell over ``xs``: ``seqjax.unroll(cell, self.to_params(), xs, **options)``.

        Args:
          xs: ``(*batch, T, I)`` (or time-major with ``time_axis=0``).
          **options: any option of ``seqjax.unroll`` (``carry``, ``lengths``, ``mask``,
            ``resets``, ``reverse``, ``time_axis``, ``gradient``, ``solver``). For dropout,
            unroll a dropout cell built with a fresh key inside the loss:
            ``seqjax.unroll(seqjax.cells.dropout(module.cell, recurrent_rate=r, key=k),
            module.to_params(), xs)``.

        Returns:
          ``(carry, ys)`` with ``ys: (*batch, T, H)``.
        """
        options = check_options("Recurrent.__call__", options, hints=_TRAJECTORY_HINTS)
        return unroll(self.cell, self.to_params(), xs, **options)

    def trajectory(self, xs: jax.Array, *, gates: bool = False, **options):
        """``seqjax.trajectory(cell, self.to_params(), xs, gates=gates, **options)``: every
        step's carry (and gates), a ``seqjax.Trajectory``."""
        options = check_options("Recurrent.trajectory", options)
        return trajectory(self.cell, self.to_params(), xs, gates=gates, **options)


_TRAJECTORY_HINTS = {
    "return_carries": "use module.trajectory(xs) for every step's carries",
    "return_gates": "use module.trajectory(xs, gates=True) for every step's gates",
    "gates": "use module.trajectory(xs, gates=True) for every step's gates",
}


def _input_size_of(cell: Cell, params: Any) -> int:
    if cell.input_size is not None:
        return int(cell.input_size(params))
    raise ValueError(
        "cannot read the input size from these params (the cell has no input_size capability); "
        "use Recurrent(cell, input_size, params=params)."
    )


def _params_arg(params, rngs, name):
    if params is None and rngs is None:
        raise ValueError(
            f"{name}: pass rngs=nnx.Rngs(seed) to initialise, or use {name}.from_params(params)."
        )
    return params


class RNN(Recurrent):
    r"""Elman RNN module: ``h_t = f(x_t W_x + h_{t-1} W_h + b)`` (``seqjax.rnn``).

    Params (``nnx.Param``): ``w_x: (I, H)``, ``w_h: (H, H)``, ``b: (H,)``, and ``b_h: (H,)``
    with ``hidden_bias=True``.

    Args:
      input_size: ``I``.
      hidden_size: ``H``.
      activation: as in ``seqjax.rnn``.
      hidden_bias: as in ``seqjax.rnn``.
      kernel_init: as in ``seqjax.rnn``.
      recurrent_init: as in ``seqjax.rnn``.
      bias_init: as in ``seqjax.rnn``.
      rngs: ``nnx.Rngs`` (its ``params`` stream).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        activation: str | Callable = "tanh",
        hidden_bias: bool = False,
        kernel_init=None,
        recurrent_init=None,
        bias_init=None,
        rngs: nnx.Rngs | None = None,
        params: Any = None,
    ):
        cell = rnn(
            hidden_size,
            activation=activation,
            hidden_bias=hidden_bias,
            kernel_init=kernel_init,
            recurrent_init=recurrent_init,
            bias_init=bias_init,
        )
        super().__init__(cell, input_size, rngs=rngs, params=_params_arg(params, rngs, "RNN"))

    @classmethod
    def from_params(cls, params: Mapping[str, jax.Array], *, activation: str | Callable = "tanh") -> RNN:
        """An ``RNN`` holding functional ``seqjax.rnn`` params (sizes read from ``w_x: (I, H)``)."""
        I, H = params["w_x"].shape
        return cls(I, H, activation=activation, hidden_bias="b_h" in params, params=dict(params))


class LSTM(Recurrent):
    r"""LSTM module (``seqjax.lstm``): gates ``i, f, g, o`` from one fused map,
    ``c_t = f * c_{t-1} + i * g``, ``h_t = o * tanh(c_t)``; carry ``LSTMState(h, c)``.

    Params (``nnx.Param``): ``w_x: (I, 4H)``, ``w_h: (P, 4H)``, ``b: (4H,)``, optional
    ``b_h: (4H,)`` and ``w_p: (H, P)``; gate order ``i, f, g, o`` (PyTorch's).

    Args:
      input_size: ``I``.
      hidden_size: ``H``.
      proj_size: as in ``seqjax.lstm``.
      forget_bias: as in ``seqjax.lstm``.
      hidden_bias: as in ``seqjax.lstm``.
      kernel_init: as in ``seqjax.lstm``.
      recurrent_init: as in ``seqjax.lstm``.
      bias_init: as in ``seqjax.lstm``.
      rngs: ``nnx.Rngs`` (its ``params`` stream).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        proj_size: int = 0,
        forget_bias: float = 0.0,
        hidden_bias: bool = False,
        kernel_init=None,
        recurrent_init=None,
        bias_init=None,
        rngs: nnx.Rngs | None = None,
        params: Any = None,
    ):
        cell = lstm(
            hidden_size,
            proj_size=proj_size,
            forget_bias=forget_bias,
            hidden_bias=hidden_bias,
            kernel_init=kernel_init,
            recurrent_init=recurrent_init,
            bias_init=bias_init,
        )
        super().__init__(cell, input_size, rngs=rngs, params=_params_arg(params, rngs, "LSTM"))

    @classmethod
    def from_params(cls, params: Mapping[str, jax.Array]) -> LSTM:
        """An ``LSTM`` holding functional ``seqjax.lstm`` params (sizes read from the arrays)."""
        I = params["w_x"].shape[0]
        H = params["b"].shape[0] // 4
        P = params["w_p"].shape[1] if "w_p" in params else 0
        return cls(I, H, proj_size=P, hidden_bias="b_h" in params, params=dict(params))


class GRU(Recurrent):
    r"""GRU module in PyTorch's convention (``seqjax.gru``):

    ```text
    r = sigmoid(x W_xr + b_r + h W_hr + b_hr)
    z = sigmoid(x W_xz + b_z + h W_hz + b_hz)
    n = tanh(x W_xn + b_n + r * (h W_hn + b_hn))
    h_t = (1 - z) * n + z * h_{t-1}
    ```

    Params (``nnx.Param``): ``w_x: (I, 3H)``, ``w_h: (H, 3H)``, ``b: (3H,)``, ``b_h: (3H,)``,
    gate order ``r, z, n``. Porting ``torch.nn.GRU``: ``w_x = weight_ih_l0.T``,
    ``w_h = weight_hh_l0.T``, ``b = bias_ih_l0``, ``b_h = bias_hh_l0``. (Flax's ``nnx.GRUCell``
    lacks ``b_hn`` inside the reset product, so it cannot reproduce such weights.)

    Args:
      input_size: ``I``.
      hidden_size: ``H``.
      kernel_init: as in ``seqjax.gru``.
      recurrent_init: as in ``seqjax.gru``.
      bias_init: as in ``seqjax.gru``.
      rngs: ``nnx.Rngs`` (its ``params`` stream).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        kernel_init=None,
        recurrent_init=None,
        bias_init=None,
        rngs: nnx.Rngs | None = None,
        params: Any = None,
    ):
        cell = gru(hidden_size, kernel_init=kernel_init, recurrent_init=recurrent_init, bias_init=bias_init)
        super().__init__(cell, input_size, rngs=rngs, params=_params_arg(params, rngs, "GRU"))

    @classmethod
    def from_params(cls, params: Mapping[str, jax.Array]) -> GRU:
        """A ``GRU`` holding functional ``seqjax.gru`` params (sizes read from the arrays)."""
        return cls(params["w_x"].shape[0], params["b"].shape[0] // 3, params=dict(params))


class Bidirectional(nnx.Module):
    r"""Two independent recurrent modules, one run forward in time and one backward
    (``seqjax.layers.bidirectional``).

    ``s_t = fwd(xs)_t``, ``s'_t = bwd(xs, reverse=True)_t`` and ``y_t = merge(s_t, s'_t)``:
    concatenation (default, ``(*batch, T, H + H')``), ``"sum"``, ``"mean"``, ``"mul"`` or a
    callable ``(y_fwd, y_bwd) -> y``. With ``lengths`` the backward module reads each
    sequence from its own last step (as PyTorch's packed sequences).

    Params: ``{"fwd": ..., "bwd": ...}`` (``to_params``), exactly the params of
    ``seqjax.layers.bidirectional(fwd.cell, bwd.cell)``. Carry: ``BiCarry(fwd, bwd)``.

    Args:
      fwd: a ``Recurrent`` module (``RNN``, ``LSTM``, ``GRU``, ...).
      bwd: another one, with its own weights.
      merge: as in ``seqjax.layers.bidirectional``.

    Reference: Schuster & Paliwal, "Bidirectional recurrent neural networks", IEEE TSP (1997).
    """

    def __init__(self, fwd: Recurrent, bwd: Recurrent, *, merge: str | Callable = "concat"):
        for name, m in (("fwd", fwd), ("bwd", bwd)):
            if not isinstance(m, Recurrent):
                raise TypeError(
                    f"Bidirectional: {name} must be a seqjax.nnx.Recurrent module, got {type(m).__name__}."
                )
        self.fwd = fwd
        self.bwd = bwd
        self.merge = merge
        self.as_layer()  # validates merge
        self.input_size = fwd.input_size

    def as_layer(self) -> _layers.Layer:
        """The functional layer, ``seqjax.layers.bidirectional(fwd.cell, bwd.cell, merge=...)``."""
        return _layers.bidirectional(self.fwd.cell, self.bwd.cell, merge=self.merge)

    def cores(self, params: Any, xs: Any, *, lengths: Any = None, time_axis: int = -2) -> dict[str, Core]:
        """The recurrent cores of this module: those of ``self.as_layer()``
        (``seqjax.spectrum.models.recurrent_cores``).

        Args:
          params: functional params of ``as_layer()``, or ``None`` for the module's own
            (``to_params()``).
          xs: ``(*batch, T, I)`` (time at ``time_axis``).
          lengths: integer ``(*batch,)`` or ``None``.
          time_axis: time axis of ``xs``.

        Returns:
          ``{name: Core(cell, params, xs, carry, lengths)}``: ``"fwd"`` on ``xs`` and ``"bwd"``
          on each sequence reversed within its own length.
        """
        return _module_cores(self, params, xs, lengths, time_axis)

    def to_params(self) -> dict:
        """``{"fwd": ..., "bwd": ...}``: each direction's functional params."""
        return {"fwd": self.fwd.to_params(), "bwd": self.bwd.to_params()}

    def initial_carry(self, batch_shape: int | tuple[int, ...] = ()) -> _layers.BiCarry:
        """``BiCarry(fwd.initial_carry(batch_shape), bwd.initial_carry(batch_shape))``."""
        return _layers.BiCarry(self.fwd.initial_carry(batch_shape), self.bwd.initial_carry(batch_shape))

    def __call__(self, xs: jax.Array, **options):
        """Run both directions and merge per step: the functional layer's ``apply``.

        Args:
          xs: ``(*batch, T, I)``.
          **options: ``carry`` (a ``BiCarry(fwd, bwd)``; default zeros), ``lengths``,
            ``time_axis`` and the options of ``seqjax.unroll`` both directions share
            (``mask``, ``resets``, ``gradient``, ``solver``).

        Returns:
          ``(BiCarry(fwd, bwd), ys)``.
        """
        return self.as_layer().apply(self.to_params(), xs, **options)


class _SequenceModule(Protocol):
    """What ``Stack`` needs of a layer module (``Recurrent``, ``Bidirectional``, ``Stack``)."""

    input_size: int

    def as_layer(self) -> _layers.Layer: ...

    def to_params(self) -> Any: ...

    def initial_carry(self, batch_shape: int | tuple[int, ...] = ()) -> Any: ...


class Stack(nnx.Module):
    r"""Deep recurrent network, layer by layer: ``ys^l = layer_l(ys^{l-1})``, ``ys^0 = xs``
    (``seqjax.layers.stack_layers``; PyTorch's multi-layer ``nn.LSTM`` computes this).

    Dropout follows ``flax.nnx.Dropout``: the ``deterministic`` attribute says whether a call
    drops (``False``, training) or not (``True``, evaluation); ``model.train()`` sets it to
    ``False`` and ``model.eval()`` to ``True`` in every ``Stack`` of a model (nested ones
    included), ``nnx.view(model, deterministic=...)`` likewise on a view, and
    ``deterministic=`` in a call overrides it for that call (the call's own dropout and that
    of every ``Stack`` inside it). A fresh ``Stack`` is in training mode, as ``nnx.Dropout``.

    Args:
      layers: ``Recurrent``, ``Bidirectional`` or ``Stack`` modules, each taking the previous
        layer's output width as its input size.
      dropout: rate in ``[0, 1)`` of standard dropout on the outputs of every layer but the
        last (a fresh mask per sequence, step and unit, as ``torch.nn.LSTM(dropout=...)``).
      deterministic: the initial mode: ``False`` (default, as ``nnx.Dropout``) drops,
        ``True`` does not; ``None`` leaves it to every call's ``deterministic=``.
      rngs: ``nnx.Rngs`` (its ``dropout`` stream, else its ``default`` one) or an
        ``nnx.RngStream``, forked into ``self.rngs`` as ``nnx.Dropout`` does; it feeds the
        dropout when a call gives no ``key``. Needed for training mode unless every call
        passes ``key=``; unused (not forked) when ``dropout == 0``.

    Attributes:
      deterministic: ``True`` (evaluation: no dropout), ``False`` (training) or ``None``.
      dropout: the rate.
      rngs: the forked ``nnx.RngStream``, or ``None``.

    Params: a tuple, one entry per layer (``to_params``), exactly those of
    ``stack_layers([layer.as_layer() ...])``. Carry: a tuple of the layers' carries.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from seqjax.nnx import LSTM, Stack
      >>> rngs = nnx.Rngs(0)
      >>> net = Stack([LSTM(3, 4, rngs=rngs), LSTM(4, 4, rngs=rngs)], dropout=0.5, rngs=rngs)
      >>> xs = jnp.ones((2, 5, 3))
      >>> carries, ys = net(xs)                           # fresh: training mode, drops
      >>> print(ys.shape, len(carries))                   # (B, T, H); one carry per layer
      (2, 5, 4) 2
      >>> net.eval()                                      # evaluation: no dropout
      >>> ys_eval = net(xs)[1]
      >>> ys_plain = net.as_layer().apply(net.to_params(), xs, deterministic=True)[1]
      >>> print(net.deterministic, bool(jnp.allclose(ys_eval, ys_plain)))
      True True
      >>> ys_train = net(xs, deterministic=False)[1]     # a per-call override wins
      >>> print(bool(jnp.allclose(ys_train, ys_plain)))
      False
    """

    def __init__(
        self,
        layers: Sequence[_SequenceModule],
        *,
        dropout: float = 0.0,
        deterministic: bool | None = False,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ):
        if len(layers) == 0:
            raise ValueError("Stack needs at least one layer.")
        for i, m in enumerate(layers):
            if not hasattr(m, "as_layer"):
                raise TypeError(
                    f"Stack: layers[{i}] must be a Recurrent, Bidirectional or Stack module, "
                    f"got {type(m).__name__}."
                )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
        self.layers = nnx.List(list(layers))
        self.dropout = float(dropout)
        self.deterministic = _check_deterministic(deterministic, "Stack(deterministic=...)")
        self.rngs = _fork_rngs(rngs) if dropout else nnx.data(None)
        self.input_size = layers[0].input_size

    def set_view(self, deterministic: bool | None = None) -> None:
        """Set the mode for ``nnx.view(model, deterministic=...)`` (``None``: unchanged).

        Args:
          deterministic: ``True`` (evaluation), ``False`` (training) or ``None``.
        """
        if deterministic is not None:
            self.deterministic = _check_deterministic(deterministic, "nnx.view(deterministic=...)")

    def as_layer(self) -> _layers.Layer:
        """The functional layer, ``seqjax.layers.stack_layers([...], dropout=...)``."""
        return _layers.stack_layers([m.as_layer() for m in self.layers], dropout=self.dropout)

    def cores(self, params: Any, xs: Any, *, lengths: Any = None, time_axis: int = -2) -> dict[str, Core]:
        """The recurrent cores of this module: those of ``self.as_layer()``
        (``seqjax.spectrum.models.recurrent_cores``).

        Args:
          params: functional params of ``as_layer()``, or ``None`` for the module's own
            (``to_params()``).
          xs: ``(*batch, T, I)`` (time at ``time_axis``).
          lengths: integer ``(*batch,)`` or ``None``.
          time_axis: time axis of ``xs``.

        Returns:
          ``{name: Core(cell, params, xs, carry, lengths)}``: layer ``l``'s cores as
          ``"layer{l}.<name>"``, on the outputs of the layers below (run without dropout).
        """
        return _module_cores(self, params, xs, lengths, time_axis)

    def to_params(self) -> tuple:
        """``tuple(layer.to_params() for layer in layers)``."""
        return tuple(layer.to_params() for layer in self.layers)

    def initial_carry(self, batch_shape: int | tuple[int, ...] = ()) -> tuple:
        """One initial carry per layer."""
        return tuple(layer.initial_carry(batch_shape) for layer in self.layers)

    def __call__(
        self,
        xs: jax.Array,
        *,
        carry: Sequence | None = None,
        deterministic: bool | None = None,
        key: jax.Array | None = None,
        **options,
    ):
        """Run the layers in order, with dropout between them in training mode.

        Args:
          xs: ``(*batch, T, I)``.
          carry: a tuple with one carry per layer, or ``None`` (zeros).
          deterministic: ``None`` (default) uses ``self.deterministic`` (set by
            ``model.train()`` / ``model.eval()``); ``True`` runs without dropout and
            ``False`` with it, here and in every ``Stack`` among the layers, whatever
            their attributes say.
          key: PRNG key of the dropout, taking precedence over ``self.rngs`` (default: a
            fresh key from ``self.rngs``); ``Stack`` layers receive keys split from it.
          **options: passed to every layer as they are: ``lengths``, ``time_axis`` and the
            options of ``seqjax.unroll`` (``mask``, ``resets``, ``gradient``, ``solver``).

        Returns:
          ``(carries, ys)``: a tuple of final carries and the last layer's outputs,
          ``ys: (*batch, T, O)``.

        Raises:
          ValueError: training mode with ``dropout > 0`` and neither ``key`` nor ``rngs``;
            or ``deterministic`` is ``None`` both here and on the module.
        """
        return self._apply(
            self.to_params(),
            xs,
            carry=None if carry is None else tuple(carry),
            deterministic=deterministic,
            key=key,
            **options,
        )

    def _apply(self, params, xs, *, deterministic: bool | None, key: Any, **options):
        """``as_layer().apply`` in this module's mode (``deterministic`` overrides it here and in
        the nested ``Stack`` layers), drawing the dropout key from ``self.rngs`` when needed."""
        override = _check_deterministic(deterministic, "Stack(...)(deterministic=...)")
        key = _check_key(key, "Stack")
        train = False
        if self.dropout:
            mode = self.deterministic if override is None else override
            if mode is None:
                raise ValueError(
                    "Stack: deterministic is None on the module and in the call, so whether to "
                    "apply dropout is unknown: call model.train() or model.eval(), pass "
                    "deterministic=True/False to the call, or build Stack(..., deterministic=...)."
                )
            train = not mode
        if train and key is None:
            if self.rngs is None:
                raise ValueError(
                    f"Stack: training mode (deterministic=False) with dropout={self.dropout} needs "
                    "a random key, and there is none: build the Stack with rngs=nnx.Rngs(dropout=seed) "
                    "or pass key=jax.random.key(...) to the call; for evaluation call model.eval() "
                    "or pass deterministic=True."
                )
            key = self.rngs()
        parts = [_bound_layer(m, override) for m in self.layers]
        # rate 0 outside training: the key (if any) only feeds the nested Stack layers
        layer = _layers.stack_layers(parts, dropout=self.dropout if train else 0.0)
        return layer.apply(params, xs, key=key, deterministic=False, **options)


def _bound_layer(module: Any, override: bool | None) -> _layers.Layer:
    """``module.as_layer()``; for a ``Stack``, one whose ``apply`` runs in the module's own
    mode (or ``override``) and draws from its own ``rngs`` when given no key."""
    layer = module.as_layer()
    if not isinstance(module, Stack):
        return layer

    def apply(params, xs, *, key=None, **call):
        return module._apply(params, xs, deterministic=override, key=key, **call)

    return layer._replace(apply=apply)


def _check_deterministic(value: Any, where: str) -> bool | None:
    """``value`` as ``bool`` or ``None``; a ``TypeError`` naming ``where`` for anything else
    (a traced array cannot choose whether to drop)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(
        f"{where}: deterministic must be True, False or None, got {type(value).__name__} {value!r}."
    )


def _fork_rngs(rngs: Any) -> nnx.RngStream | None:
    """The ``dropout`` stream of ``rngs`` forked, as ``nnx.Dropout`` does."""
    if isinstance(rngs, nnx.Rngs):
        try:
            stream = rngs["dropout"]
        except KeyError:
            raise ValueError(
                "Stack: rngs has neither a 'dropout' nor a 'default' stream to draw dropout masks "
                "from; pass rngs=nnx.Rngs(0, dropout=1) or nnx.Rngs(0)."
            ) from None
        return stream.fork()
    if isinstance(rngs, nnx.RngStream):
        return rngs.fork()
    if rngs is None:
        return nnx.data(None)
    raise TypeError(f"Stack: rngs must be an nnx.Rngs, an nnx.RngStream or None, got {type(rngs).__name__}.")
