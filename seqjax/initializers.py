"""Initialisers for recurrent weights.

Every initialiser here is a factory returning ``init(key, shape, dtype) -> array``
(the signature of ``jax.nn.initializers``), so any ``jax.nn.initializers`` function
can be used in its place. Fused kernels such as an LSTM's ``w_h: (H, 4H)`` are made of
``gates`` square-or-rectangular blocks side by side; the ``gates`` argument makes an
initialiser act on each block separately, which matters: one orthogonal matrix over the
whole ``(H, 4H)`` kernel leaves every ``(H, H)`` gate block with singular values below 1,
while an orthogonal matrix *per block* gives every gate an exactly orthogonal recurrence.

Conventions: matrices act on row vectors (``h @ w_h``), so a kernel of shape
``(fan_in, fan_out)`` maps ``fan_in`` features to ``fan_out`` features.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._util import bind

__all__ = [
    "Initializer",
    "uniform",
    "pytorch_uniform",
    "glorot_uniform",
    "orthogonal",
    "identity",
    "scaled_gaussian",
    "zeros",
    "constant",
    "with_spectral_radius",
    "rescale_spectral_radius",
    "spectral_radius",
]

Initializer = Callable[..., jax.Array]
"""``init(key, shape, dtype=jnp.float32) -> array``."""


def _split_blocks(shape: tuple[int, ...], gates: int, name: str) -> int:
    if len(shape) != 2:
        raise ValueError(f"{name}: needs a 2-D shape (fan_in, gates * block), got {shape}.")
    if gates < 1 or shape[1] % gates:
        raise ValueError(
            f"{name}: shape {shape} cannot be split into gates={gates} equal column blocks "
            f"(shape[1] must be a multiple of gates)."
        )
    return shape[1] // gates


def _per_block_init(key, shape, dtype=jnp.float32, *, block, gates, name):
    shape = tuple(shape)
    width = _split_blocks(shape, gates, name)
    keys = jax.random.split(key, gates)
    blocks = [block(k, (shape[0], width), dtype) for k in keys]
    return jnp.concatenate(blocks, axis=1)


def _per_block(block_init: Callable, gates: int, name: str) -> Initializer:
    # A hashable value: initialisers built twice with the same arguments are equal, so the
    # cells that hold them are too.
    return bind(_per_block_init, block=block_init, gates=int(gates), name=name)


def _uniform(key, shape, dtype=jnp.float32, *, scale):
    return jax.random.uniform(key, tuple(shape), dtype, -scale, scale)


def _glorot_block(key, shape, dtype):
    a = float(np.sqrt(6.0 / (shape[0] + shape[1])))
    return jax.random.uniform(key, shape, dtype, -a, a)


def _orthogonal_block(key, shape, dtype, *, gain):
    return jax.nn.initializers.orthogonal(scale=gain)(key, shape, dtype)


def _identity_block(key, shape, dtype, *, gain):
    del key
    if shape[0] != shape[1]:
        raise ValueError(
            f"identity: each gate block must be square, got a block of shape {shape}; "
            "use it for recurrent kernels (H, gates * H)."
        )
    return gain * jnp.eye(shape[0], dtype=dtype)


def _scaled_gaussian(key, shape, dtype=jnp.float32, *, gain):
    shape = tuple(shape)
    std = gain / float(np.sqrt(shape[0]))
    return std * jax.random.normal(key, shape, dtype)


def _constant(key, shape, dtype=jnp.float32, *, value):
    del key
    return jnp.full(tuple(shape), value, dtype)


def _spectral_block(key, shape, dtype, *, radius, base):
    if shape[0] != shape[1]:
        raise ValueError(
            f"with_spectral_radius: each gate block must be square, got a block of shape {shape}."
        )
    return rescale_spectral_radius(base(key, shape, dtype), radius)


def uniform(scale: float) -> Initializer:
    """Uniform ``U(-scale, scale)`` entries.

    Args:
      scale: half-width of the interval.

    Returns:
      ``init(key, shape, dtype)`` returning an array of ``shape``.
    """

    return bind(_uniform, scale=scale)


def pytorch_uniform(hidden_size: int) -> Initializer:
    """PyTorch's default for ``nn.RNN/LSTM/GRU``: ``U(-1/sqrt(H), 1/sqrt(H))``.

    The same bound is used for input kernels, recurrent kernels and biases, as PyTorch
    does (``torch.nn.RNNBase.reset_parameters``).

    Args:
      hidden_size: ``H``, the number of hidden units.
    """
    if hidden_size < 1:
        raise ValueError(f"pytorch_uniform: hidden_size must be >= 1, got {hidden_size}.")
    return uniform(1.0 / float(np.sqrt(hidden_size)))


def glorot_uniform(gates: int = 1) -> Initializer:
    """Glorot/Xavier uniform per gate block: ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``.

    Args:
      gates: number of column blocks; each ``(fan_in, shape[1] // gates)`` block uses its
        own ``fan_out``.
    """

    return _per_block(bind(_glorot_block), gates, "glorot_uniform")


def orthogonal(gain: float = 1.0, gates: int = 1) -> Initializer:
    """Orthogonal matrix per gate block (Saxe, McClelland & Ganguli 2014), times ``gain``.

    For a square ``(H, H)`` block every singular value equals ``gain``; for a rectangular
    block the rows or columns (whichever are fewer) are orthonormal.

    Args:
      gain: multiplier applied to each orthogonal block.
      gates: number of column blocks; each block is orthogonal on its own.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from seqjax import initializers
      >>> w = initializers.orthogonal(gates=4)(jax.random.key(0), (4, 16), jnp.float32)
      >>> blocks = w.reshape(4, 4, 4).transpose(1, 0, 2)      # the four (H, H) gate blocks
      >>> bool(jnp.allclose(blocks[1] @ blocks[1].T, jnp.eye(4), atol=1e-5))
      True
    """
    return _per_block(bind(_orthogonal_block, gain=gain), gates, "orthogonal")


def identity(gain: float = 1.0, gates: int = 1) -> Initializer:
    """Identity per gate block, times ``gain`` (the IRNN of Le, Jaitly & Hinton 2015).

    Each block must be square: a recurrent kernel ``(H, gates * H)``.

    Args:
      gain: value on the diagonal.
      gates: number of square column blocks.
    """

    return _per_block(bind(_identity_block, gain=gain), gates, "identity")


def scaled_gaussian(gain: float = 1.0) -> Initializer:
    """Gaussian entries ``N(0, gain**2 / fan_in)`` with ``fan_in = shape[0]``.

    For a random ``(H, H)`` recurrent matrix this puts the spectral radius near ``gain``
    (circular law) as ``H`` grows: ``gain < 1`` gives contracting dynamics, ``gain > 1``
    chaotic dynamics for a tanh network (Sompolinsky, Crisanti & Sommers 1988).

    Args:
      gain: the gain ``g``.
    """

    return bind(_scaled_gaussian, gain=gain)


def zeros(key, shape, dtype=jnp.float32):
    """All zeros: ``(key, shape, dtype) -> zeros(shape, dtype)`` (an initialiser itself, not a
    factory; ``key`` is unused)."""
    del key
    return jnp.zeros(tuple(shape), dtype)


def constant(value: float) -> Initializer:
    """An initialiser ``(key, shape, dtype) -> array`` of ``shape`` with every entry ``value``."""

    return bind(_constant, value=value)


def spectral_radius(w: jax.Array) -> jax.Array:
    """Spectral radius ``max |eig(w)|`` of a square matrix ``w: (H, H)``.

    Uses the general eigendecomposition, which JAX provides on CPU and GPU only; on TPU
    call it on host arrays (``jax.device_get``).
    """
    w = jnp.asarray(w)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"spectral_radius: w must be a square matrix (H, H), got {w.shape}.")
    return jnp.max(jnp.abs(jnp.linalg.eigvals(w)))


def rescale_spectral_radius(w: jax.Array, radius: float) -> jax.Array:
    """Rescale a square matrix ``w: (H, H)`` so that its spectral radius equals ``radius``.

    Args:
      w: the matrix; must have a non-zero spectral radius.
      radius: the target spectral radius.

    Returns:
      ``w * radius / max|eig(w)|``, same shape and dtype as ``w``.
    """
    rho = spectral_radius(w)
    return (w * (radius / rho)).astype(w.dtype)


def with_spectral_radius(radius: float, base: Initializer | None = None, *, gates: int = 1) -> Initializer:
    """Wrap an initialiser so that each square gate block has spectral radius ``radius``.

    The usual tool of dynamics studies and echo-state networks: draw ``W`` from ``base``
    (default ``scaled_gaussian(1.0)``) and rescale it to a chosen spectral radius.

    Args:
      radius: the target spectral radius of each ``(H, H)`` block.
      base: the initialiser drawing the matrix before rescaling.
      gates: number of square column blocks.

    Examples:
      >>> import jax, seqjax
      >>> from seqjax import initializers
      >>> cell = seqjax.rnn(4, recurrent_init=initializers.with_spectral_radius(0.9))
      >>> w_h = cell.init(jax.random.key(0), input_size=3)["w_h"]
      >>> round(float(initializers.spectral_radius(w_h)), 4)
      0.9
    """
    base = scaled_gaussian(1.0) if base is None else base

    return _per_block(bind(_spectral_block, radius=radius, base=base), gates, "with_spectral_radius")


def _as_initializer(obj: Any, name: str) -> Initializer:
    if not callable(obj):
        raise TypeError(f"{name} must be an initialiser init(key, shape, dtype), got {obj!r}.")
    return obj
