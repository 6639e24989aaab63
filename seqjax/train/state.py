"""The training state: ``TrainState``, ``init_train_state`` and the PRNG-key check.

The bottom of ``seqjax.train``: it imports nothing of seqjax.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "init_train_state"]


class TrainState(NamedTuple):
    """Everything a training step reads and writes (a pytree; donated to the step).

    Attributes:
      params: the model params (any pytree of arrays).
      opt_state: the optax state of ``optimizer.init(params)``.
      step: ``()`` int32, the number of steps taken (skipped non-finite steps included).
      key: ``()`` typed PRNG key; each step splits it, ``key, sub = split(key)``, and hands
        ``sub`` to ``loss_fn`` (``with_key``).
      skipped: ``()`` int32, how many steps were skipped because something was non-finite.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array
    skipped: jax.Array


def _as_key(key: Any, name: str = "key") -> jax.Array:
    """A typed PRNG key of shape ``()`` from ``key`` (a typed key, or raw ``(2,)`` uint32 data)."""
    if key is None:
        raise ValueError(f"{name} is required: pass {name}=jax.random.key(seed) (explicit randomness).")
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{name} must be a single PRNG key (shape ()), got shape {key.shape}.")
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(
        f"{name} must be a PRNG key from jax.random.key(seed), got dtype {key.dtype} shape {key.shape}."
    )


def init_train_state(params: Any, optimizer: optax.GradientTransformation, *, key: jax.Array) -> TrainState:
    """A fresh ``TrainState``: ``opt_state = optimizer.init(params)``, ``step = skipped = 0``.

    Args:
      params: the initial params pytree (kept as given: the state holds these arrays).
      optimizer: any ``optax.GradientTransformation``.
      key: ``()`` PRNG key (``jax.random.key(seed)``) for the per-step keys handed to
        ``loss_fn`` (dropout).

    Returns:
      ``TrainState(params, opt_state, step=0, key, skipped=0)``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from seqjax.train import init_train_state
      >>> state = init_train_state({"w": jnp.zeros((3, 2))}, optax.adam(1e-2), key=jax.random.key(0))
      >>> int(state.step), int(state.skipped), state.params["w"].shape
      (0, 0, (3, 2))
    """
    return TrainState(
        params,
        optimizer.init(params),
        jnp.zeros((), jnp.int32),
        _as_key(key),
        jnp.zeros((), jnp.int32),
    )
