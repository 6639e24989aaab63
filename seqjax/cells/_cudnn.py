r"""cuDNN's LSTM as an opt-in fused kernel of seqjax's LSTM (NVIDIA GPUs).

``cudnn_lstm_kernel(fallback, H)`` wraps the LSTM's own fused kernel (``fallback``) in a
``Kernel`` that, for a request cuDNN can serve, stages out both programs with
``jax.lax.platform_dependent``: cuDNN's LSTM (the ``rnn_fwd``/``rnn_bwd`` primitives behind
``jax.experimental.rnn.lstm``) on ``cuda``, ``fallback.run`` everywhere else. The platform
the program is lowered for picks the branch, so CPU and TPU programs are the fallback's, op
for op; no code asks what kind of cell or machine it runs on.

The maths is the LSTM's (``seqjax.cells.lstm``): with ``z = x_t W_x + h_{t-1} W_h + b
[+ b_h]`` in PyTorch's gate order ``i, f, g, o``,

```text
i, f, o = sigmoid(z_i, z_f, z_o)   g = tanh(z_g)
c_t = f * c_{t-1} + i * g          h_t = o * tanh(c_t)
```

which is cuDNN's ``CUDNN_LSTM`` with two biases. Its packed weight vector (one layer, one
direction; the layout ``jax.experimental.rnn.unpack_lstm_weights`` reads) is

```text
[ W_ih (4H, I) = w_x^T | W_hh (4H, H) = w_h^T | b_ih (4H,) = b | b_hh (4H,) = b_h or 0 ]
```

each flattened row-major, rows in gate blocks ``i, f, g, o`` (``pack_cudnn_lstm_weights``).

What runs on cuDNN, decided at trace time from static facts only (shapes, dtypes, which
options are present): a call without ``mask``/``lengths``, ``resets``, truncation (``keep``)
and ``trajectory``; ``reverse`` by flipping time; float32 params, carry and inputs; at least
one step and one sequence; a matmul precision cuDNN supports; and a process in which cuDNN's
LSTM can be traced (``cudnn_available``). Everything else runs ``fallback.run``, exact and
unchanged. Known defects of the cuDNN path and how each is avoided:

* Sequences of length 0 make cuDNN fail (jax-ml/jax#17966, open): seqjax never passes
  per-sequence lengths to cuDNN (every sequence has length ``T >= 1``); ``lengths``/``mask``
  run on the fallback, and ``T = 0`` never reaches a kernel.
* Bidirectional cuDNN layers with ``seq_lengths`` disagreed with the reference
  (jax-ml/jax#15183): seqjax never asks cuDNN for a bidirectional layer; a bidirectional
  seqjax layer runs two one-directional kernels, the backward one on flipped time.
* NaN gradients were reported (jax-ml/jax#15183, closed). cuDNN's weight-gradient call adds
  into its output buffer (apache/mxnet#3274), and the jaxlib lowering of this JAX version
  passes it a zero-filled buffer (``zeroed_dw`` in ``jaxlib/gpu_rnn.py``). The GPU benchmark
  (``python -m benchmarks.gpu``) checks that cuDNN's gradients are finite and equal to the
  fallback's before it times anything.
* The primitives have no batching rule, so ``jax.vmap`` of ``jax.experimental.rnn.lstm``
  fails to trace. This module wraps them in a ``jax.custom_vjp`` of its own whose forward
  and backward are ``jax.custom_batching.sequential_vmap`` functions: under ``vmap`` cuDNN
  runs once per mapped member (correct, sequential; fold the mapped axis into the batch for
  speed).
* cuDNN's backward primitive has no derivative rule: second derivatives (``grad`` of
  ``grad``, Hessian-vector products) fail to trace in a process where cuDNN is available.
  Use the LSTM's default kernel for them (its backward pass is plain JAX).
* ``jax.experimental.rnn`` implements the LSTM only (no GRU, no projection): the projected
  LSTM has no fused kernel at all and is refused here.
* cuDNN's LSTM takes float32 only (jax.experimental.rnn's TODO) and no bfloat16 matmul
  precision (``NotImplementedError`` there): other dtypes, and a
  ``jax_default_matmul_precision`` of ``"bfloat16"``/``"default"``, run on the fallback.
  Under the default precision cuDNN may use TF32 tensor cores, as XLA's matmuls may;
  ``jax.default_matmul_precision("highest")`` turns TF32 off for both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from seqjax._util import bind
from seqjax.cells._core import Kernel

__all__ = ["cudnn_lstm_kernel", "pack_cudnn_lstm_weights", "cudnn_available", "cudnn_fallback_reason"]

_LSTM_KEYS = frozenset({"w_x", "w_h", "b", "b_h"})


# --------------------------------------------------------------------------- weights


def _check_params(params: Any, hidden_size: int) -> tuple[int, int]:
    """``(I, H)`` of LSTM params, or a ``ValueError`` naming what is wrong."""
    if not isinstance(params, Mapping):
        raise TypeError(
            "cudnn_lstm_kernel: params must be the LSTM's dict (w_x, w_h, b[, b_h]), "
            f"got {type(params).__name__}."
        )
    if "w_p" in params:
        raise ValueError(
            "cudnn_lstm_kernel: params hold w_p (an LSTM with proj_size > 0); the projected LSTM has no "
            "fused kernel and cuDNN's LSTM in jax.experimental.rnn has no projection. Build the cell "
            "without cudnn=True."
        )
    missing = sorted({"w_x", "w_h", "b"} - set(params))
    extra = sorted(set(params) - _LSTM_KEYS)
    if missing or extra:
        raise ValueError(
            f"cudnn_lstm_kernel: params must have keys w_x, w_h, b and optionally b_h; "
            f"missing {missing}, unexpected {extra}."
        )
    H = int(hidden_size)
    w_x, w_h, b = params["w_x"], params["w_h"], params["b"]
    want = {"w_h": (H, 4 * H), "b": (4 * H,), "b_h": (4 * H,)}
    for name, shape in want.items():
        if name in params and tuple(params[name].shape) != shape:
            raise ValueError(
                f"cudnn_lstm_kernel: params[{name!r}] has shape {tuple(params[name].shape)}, needs {shape} "
                f"for hidden_size={H}."
            )
    if w_x.ndim != 2 or w_x.shape[1] != 4 * H:
        raise ValueError(
            f"cudnn_lstm_kernel: params['w_x'] has shape {tuple(w_x.shape)}, needs (I, {4 * H}) for "
            f"hidden_size={H}."
        )
    del w_h, b
    return int(w_x.shape[0]), H


def pack_cudnn_lstm_weights(params: Mapping[str, jax.Array], hidden_size: int) -> jax.Array:
    r"""seqjax's LSTM params as cuDNN's packed weight vector (one layer, one direction).

    ``[w_x^T (4H, I), w_h^T (4H, H), b (4H,), b_h (4H,) or zeros]``, each flattened
    row-major: the layout ``jax.experimental.rnn.unpack_lstm_weights`` reads and
    ``jax.experimental.rnn.lstm`` takes. Row block ``k`` of ``W_ih``/``W_hh`` is column block
    ``k`` of ``w_x``/``w_h``, gate ``"ifgo"[k]`` (PyTorch's and cuDNN's order). Differentiable.

    Args:
      params: ``w_x: (I, 4H)``, ``w_h: (H, 4H)``, ``b: (4H,)``, optional ``b_h: (4H,)``.
      hidden_size: ``H``.

    Returns:
      ``(4H (I + H) + 8H,)`` in the params' dtype.

    Examples:
      >>> import jax, seqjax
      >>> from jax.experimental import rnn
      >>> from seqjax.cells._cudnn import pack_cudnn_lstm_weights
      >>> p = seqjax.lstm(4).init(jax.random.key(0), input_size=3)
      >>> w = pack_cudnn_lstm_weights(p, 4)
      >>> w.shape == (rnn.get_num_params_in_lstm(3, 4, 1, False),)
      True
      >>> W_ih, W_hh, b_ih, b_hh = rnn.unpack_lstm_weights(w, 3, 4, 1, False)
      >>> bool((W_ih[0] == p["w_x"].T).all()), bool((b_hh[0] == 0).all())
      (True, True)
    """
    _check_params(params, hidden_size)
    b = params["b"]
    b_h = params["b_h"] if "b_h" in params else jnp.zeros_like(b)
    parts = (params["w_x"].T, params["w_h"].T, b, b_h)
    return jnp.concatenate([jnp.reshape(a, (-1,)) for a in parts])


# --------------------------------------------------------------------------- the cuDNN call


class _Impl(NamedTuple):
    """The cuDNN call, swappable for a CPU stand-in in tests (hashable: module-level functions).

    fwd: ``(x (B, T, I), h0 (1, B, H), c0 (1, B, H), w (P,), *, input_size, hidden_size)
    -> ((y (B, T, H), h_n (1, B, H), c_n (1, B, H)), residuals)``.
    bwd: ``(residuals, dy, dh_n, dc_n, *, input_size, hidden_size) -> (dx, dh0, dc0, dw)``.
    available: ``() -> bool``, whether ``fwd``/``bwd`` can be traced in this process.
    """

    fwd: Callable
    bwd: Callable
    available: Callable[[], bool]


def _rnn_module():
    from jax.experimental import rnn

    return rnn


def _cudnn_fwd(x, h0, c0, w, *, input_size, hidden_size):
    rnn = _rnn_module()
    seq_lengths = jnp.full((x.shape[0],), x.shape[1], jnp.int32)  # every sequence full: T >= 1
    # one layer, no dropout, one direction, precision from jax_default_matmul_precision
    return rnn.lstm_fwd(x, h0, c0, w, seq_lengths, input_size, hidden_size, 1, 0.0, False, None)


def _cudnn_bwd(res, dy, dh_n, dc_n, *, input_size, hidden_size):
    rnn = _rnn_module()
    dx, dh0, dc0, dw, _ = rnn.lstm_bwd(input_size, hidden_size, 1, 0.0, False, None, res, (dy, dh_n, dc_n))
    return dx, dh0, dc0, dw


def _probe_shapes():
    """Trace (never run) a 1-step cuDNN LSTM: its abstract evaluation asks cuDNN for the
    reserve-space size, which needs the CUDA plugin and a GPU."""
    rnn = _rnn_module()
    x = jax.ShapeDtypeStruct((1, 1, 1), jnp.float32)
    s = jax.ShapeDtypeStruct((1, 1, 1), jnp.float32)
    w = jax.ShapeDtypeStruct((rnn.get_num_params_in_lstm(1, 1, 1, False),), jnp.float32)
    return jax.eval_shape(lambda a, h, c, v: _cudnn_fwd(a, h, c, v, input_size=1, hidden_size=1), x, s, s, w)


@functools.cache
def cudnn_available() -> bool:
    """Whether cuDNN's LSTM can be traced in this process (checked once, then cached).

    True when ``jax.experimental.rnn`` has its ``lstm_fwd``/``lstm_bwd`` pair, a ``cuda``
    backend is present, and tracing a one-step cuDNN LSTM succeeds (its shape rule calls
    into the CUDA plugin). When False, ``cudnn_lstm_kernel`` is its fallback exactly (no
    ``platform_dependent`` is staged): no program of this process could lower cuDNN anyway.

    Examples:
      >>> from seqjax.cells._cudnn import cudnn_available
      >>> isinstance(cudnn_available(), bool)
      True
    """
    try:
        rnn = _rnn_module()
    except ImportError:
        return False
    if not (hasattr(rnn, "lstm_fwd") and hasattr(rnn, "lstm_bwd")):
        return False
    try:
        if not jax.devices("cuda"):
            return False
    except RuntimeError:  # no cuda backend in this process
        return False
    try:
        _probe_shapes()
    except Exception:  # noqa: BLE001 - a probe: any failure means cuDNN cannot be traced here
        return False
    return True


_CUDNN = _Impl(_cudnn_fwd, _cudnn_bwd, cudnn_available)


def _sequential(fn, input_size, hidden_size):
    """``fn`` with its static sizes bound, run once per member under ``jax.vmap`` (the cuDNN
    primitives have no batching rule)."""

    def call(*args):
        return fn(*args, input_size=input_size, hidden_size=hidden_size)

    return jax.custom_batching.sequential_vmap(call)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _cudnn_lstm(impl, input_size, hidden_size, x, h0, c0, w):
    """``(y (B, T, H), h_n (1, B, H), c_n (1, B, H))`` of cuDNN's one-layer LSTM."""
    out, _ = _sequential(impl.fwd, input_size, hidden_size)(x, h0, c0, w)
    return out


def _cudnn_lstm_fwd(impl, input_size, hidden_size, x, h0, c0, w):
    return _sequential(impl.fwd, input_size, hidden_size)(x, h0, c0, w)


def _cudnn_lstm_bwd(impl, input_size, hidden_size, res, cts):
    dy, dh_n, dc_n = cts
    return tuple(_sequential(impl.bwd, input_size, hidden_size)(res, dy, dh_n, dc_n))


_cudnn_lstm.defvjp(_cudnn_lstm_fwd, _cudnn_lstm_bwd)


def _cudnn_run(params, carry0, xs, *, hidden_size, reverse, impl):
    """The cuDNN branch: ``(final LSTMState, ys (T, *batch, H), None)`` from time-major ``xs``."""
    H = hidden_size
    T, I = xs.shape[0], xs.shape[-1]
    batch = tuple(xs.shape[1:-1])
    B = math.prod(batch)
    x = xs.reshape(T, B, I)
    if reverse:  # a reverse-time kernel is the forward one on flipped time
        x = jnp.flip(x, axis=0)
    x = jnp.swapaxes(x, 0, 1)  # cuDNN here is batch-major: (B, T, I)
    h0 = carry0.h.reshape(1, B, H)
    c0 = carry0.c.reshape(1, B, H)
    w = pack_cudnn_lstm_weights(params, H)
    y, h_n, c_n = _cudnn_lstm(impl, I, H, x, h0, c0, w)
    ys = jnp.swapaxes(y, 0, 1)
    if reverse:
        ys = jnp.flip(ys, axis=0)
    ys = ys.reshape((T,) + batch + (H,))
    final = carry0._replace(h=h_n.reshape(batch + (H,)), c=c_n.reshape(batch + (H,)))
    return final, ys, None


# --------------------------------------------------------------------------- routing


def _matmul_precision() -> Any:
    """The current ``jax_default_matmul_precision`` (context managers included)."""
    return getattr(jax.config, "jax_default_matmul_precision")  # noqa: B009 - no type stub for it


def _precision_allows_cudnn() -> bool:
    """False when ``jax_default_matmul_precision`` asks for bfloat16 passes, which
    ``jax.experimental.rnn`` refuses (``NotImplementedError``)."""
    value = _matmul_precision()
    if value is None:
        return True
    try:
        return jax.lax.Precision(value) != jax.lax.Precision.DEFAULT
    except (ValueError, TypeError):  # a dot-algorithm preset: cuDNN picks TF32 or not itself
        return True


def _floating_dtypes(*trees) -> set:
    return {
        jnp.result_type(a)
        for t in trees
        for a in jax.tree_util.tree_leaves(t)
        if jnp.issubdtype(jnp.result_type(a), jnp.floating)
    }


def cudnn_fallback_reason(
    params: Any,
    carry0: Any,
    xs: jax.Array,
    *,
    mask: Any = None,
    resets: Any = None,
    keep: Any = None,
    trajectory: bool = False,
    available: Callable[[], bool] = cudnn_available,
) -> str | None:
    """Why a kernel call cannot run on cuDNN (``None``: it can, on a ``cuda`` platform).

    Decided from static facts only: which options are present, shapes, dtypes, the matmul
    precision setting, and ``available()``.

    Args:
      params: the LSTM's params.
      carry0: its ``LSTMState(h, c)``, leaves ``(*batch, H)``.
      xs: ``(T, *batch, I)``, time-major.
      mask: the call's ``mask`` (``None`` when absent); any mask runs on the fallback.
      resets: the call's ``resets``; any runs on the fallback.
      keep: the call's truncation flags; any run on the fallback.
      trajectory: whether every step's carry is asked for (the fallback's job).
      available: whether cuDNN can be traced in this process (``cudnn_available``).

    Returns:
      ``None``, or a sentence naming what runs on the fallback and why.

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> from seqjax.cells._cudnn import cudnn_fallback_reason
      >>> p = {"w_x": jnp.zeros((3, 16)), "w_h": jnp.zeros((4, 16)), "b": jnp.zeros((16,))}
      >>> c0 = seqjax.LSTMState(jnp.zeros((2, 4)), jnp.zeros((2, 4)))
      >>> xs = jnp.ones((5, 2, 3))                                   # (T, batch, I)
      >>> print(cudnn_fallback_reason(p, c0, xs, available=lambda: True))
      None
      >>> print(cudnn_fallback_reason(p, c0, xs, trajectory=True, available=lambda: True))
      trajectory=True (every step's carry): cuDNN returns the final carry only
    """
    if mask is not None:
        return (
            "mask (or lengths): cuDNN would need per-sequence lengths (zero lengths fail, jax-ml/jax#17966)"
        )
    if resets is not None:
        return "resets: cuDNN has no carry resets"
    if keep is not None:
        return "truncated BPTT (keep flags): cuDNN's backward cannot cut the gradient"
    if trajectory:
        return "trajectory=True (every step's carry): cuDNN returns the final carry only"
    T = xs.shape[0]
    B = math.prod(xs.shape[1:-1])
    if T == 0 or B == 0:
        return f"an empty sequence or batch (T={T}, batch={tuple(xs.shape[1:-1])})"
    dtypes = _floating_dtypes(params, carry0, xs)
    if dtypes != {jnp.dtype(jnp.float32)}:
        return (
            f"dtype {sorted(str(d) for d in dtypes)}: cuDNN's LSTM in jax.experimental.rnn takes float32 only"
        )
    if not _precision_allows_cudnn():
        return (
            f"jax_default_matmul_precision={_matmul_precision()!r}: jax.experimental.rnn has no bfloat16 LSTM"
        )
    if not available():
        return "cuDNN's LSTM cannot be traced in this process (no CUDA backend or no CUDA plugin)"
    return None


def _cudnn_or_fallback(
    params,
    carry0,
    xs,
    *,
    fallback,
    hidden_size,
    impl,
    mask=None,
    resets=None,
    keep=None,
    reverse=False,
    unroll=1,
    trajectory=False,
):
    _check_params(params, hidden_size)
    options = {
        "mask": mask,
        "resets": resets,
        "keep": keep,
        "reverse": reverse,
        "unroll": unroll,
        "trajectory": trajectory,
    }
    why = cudnn_fallback_reason(
        params,
        carry0,
        xs,
        mask=mask,
        resets=resets,
        keep=keep,
        trajectory=trajectory,
        available=impl.available,
    )
    if why is not None:
        return fallback.run(params, carry0, xs, **options)

    def default(p, c, x):
        return fallback.run(p, c, x, **options)

    cuda = functools.partial(_cudnn_run, hidden_size=hidden_size, reverse=bool(reverse), impl=impl)
    return jax.lax.platform_dependent(params, carry0, xs, cuda=cuda, default=default)


def _kernel(fallback: Kernel, hidden_size: int, impl: _Impl) -> Kernel:
    if not isinstance(fallback, Kernel):
        raise TypeError(
            "cudnn_lstm_kernel: fallback must be the LSTM's seqjax.Kernel (seqjax.lstm(H).kernel), "
            f"got {type(fallback).__name__}; a projected LSTM (proj_size > 0) has no kernel to fall back on."
        )
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"cudnn_lstm_kernel: hidden_size must be a positive integer, got {hidden_size!r}.")
    run = bind(_cudnn_or_fallback, fallback=fallback, hidden_size=int(hidden_size), impl=impl)
    return Kernel(run, fallback.accepts)


def cudnn_lstm_kernel(fallback: Kernel, hidden_size: int) -> Kernel:
    r"""The LSTM's kernel with cuDNN's LSTM as its ``cuda`` branch.

    A ``Kernel`` accepting what ``fallback`` accepts. Its ``run`` calls ``fallback.run``
    whenever ``cudnn_fallback_reason`` names a reason (masks and lengths, resets, truncation,
    trajectories, a dtype other than float32, a bfloat16 matmul precision, an empty sequence
    or batch, a process without cuDNN); otherwise it returns
    ``jax.lax.platform_dependent(..., cuda=<cuDNN>, default=fallback.run)``, so a program
    lowered for ``cuda`` runs cuDNN and one lowered for CPU or TPU runs the fallback.

    The cuDNN branch: time-major ``xs: (T, *batch, I)`` is flattened to ``(B, T, I)``
    (``B = prod(batch)``; flipped in time when ``reverse``), the carry ``LSTMState(h, c)``
    to ``(1, B, H)``, the params packed by ``pack_cudnn_lstm_weights``; it returns
    ``(final LSTMState (*batch, H), ys (T, *batch, H), None)``. Gradients come from cuDNN's
    backward (a ``jax.custom_vjp``; ``jax.vmap`` runs it once per member). Sequence lengths
    are never passed to cuDNN, which avoids its failures on zero lengths (jax-ml/jax#17966)
    and with bidirectional layers and lengths (jax-ml/jax#15183); the module docstring lists
    every known defect and how it is handled.

    Args:
      fallback: the kernel of ``seqjax.lstm(H)`` (no projection): what runs off ``cuda``
        and for every request cuDNN cannot serve.
      hidden_size: ``H``; params are checked against it (``w_h: (H, 4H)``).

    Returns:
      A ``Kernel(run, fallback.accepts)``; equal arguments give equal kernels (hashable).

    Raises:
      TypeError: ``fallback`` is not a ``Kernel`` (a projected LSTM has none).
      ValueError: ``hidden_size`` is not a positive integer; at call time, params that are
        not an unprojected LSTM's of size ``H``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.cells._cudnn import cudnn_lstm_kernel
      >>> base = seqjax.lstm(4)
      >>> cell = base._replace(kernel=cudnn_lstm_kernel(base.kernel, 4))
      >>> p = cell.init(jax.random.key(0), 3)
      >>> xs = jnp.ones((2, 5, 3))                      # off cuda: the fallback runs
      >>> a = seqjax.unroll(cell, p, xs)[1]
      >>> b = seqjax.unroll(base, p, xs)[1]
      >>> bool(jnp.allclose(a, b, atol=1e-6))
      True
    """
    return _kernel(fallback, hidden_size, _CUDNN)
