"""Gradient clipping as plain optax chains, made visible in the metrics.

``track_clipping(t)`` wraps any transformation ``t`` and records in its state (``ClipState``)
whether the last update changed the gradient; ``make_train_step`` reports that flag as
``metrics["clipped"]``. The recipes ``clipped`` and ``clipped_adam`` only build ordinary
``optax.chain(track_clipping(clip), optimizer)``.

Imports nothing of seqjax.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["ClipState", "track_clipping", "clipped", "clipped_adam"]


class ClipState(NamedTuple):
    """State of ``track_clipping``: the inner state and whether the last update was changed.

    Attributes:
      inner: the wrapped transformation's state.
      clipped: ``()`` bool, true when the last call changed any gradient entry.
    """

    inner: Any
    clipped: jax.Array


def track_clipping(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    r"""Wrap a clipping transformation so its state records whether it clipped.

    With ``u_out, s' = inner.update(u_in, s, params)``, the flag is

    $$
    \mathrm{clipped} = \bigvee_{\ell} \bigvee_i\, u^{out}_{\ell,i} \ne u^{in}_{\ell,i}
    $$

    over the leaves $\ell$ and their entries $i$. It is exact for every rule
    that passes an unclipped gradient through unchanged (``optax.clip_by_global_norm``,
    ``optax.clip``, ``optax.adaptive_grad_clip``, ``optax.clip_by_block_rms``, a user's own).
    The updates are exactly ``inner``'s (same tree, shapes and dtypes). ``make_train_step``
    finds every ``ClipState`` in the optimizer state and reports ``metrics["clipped"]``
    (true if any of them clipped).

    Args:
      inner: an ``optax.GradientTransformation`` (typically a clipping one).

    Returns:
      An ``optax.GradientTransformation`` with state ``ClipState(inner_state, clipped: () bool)``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from seqjax.train import track_clipping
      >>> opt = optax.chain(track_clipping(optax.clip(0.5)), optax.sgd(0.1))
      >>> params = jnp.zeros(3)
      >>> _, state = opt.update(jnp.array([0.1, 0.2, 0.3]), opt.init(params), params)
      >>> bool(state[0].clipped)
      False
      >>> _, state = opt.update(jnp.array([0.1, 0.2, 0.9]), state, params)
      >>> bool(state[0].clipped)                          # 0.9 was clipped to 0.5
      True
    """

    def init_fn(params):
        return ClipState(inner.init(params), jnp.zeros((), bool))

    def update_fn(updates, state, params=None):
        new, inner_state = inner.update(updates, state.inner, params)
        changed = [
            jnp.any(a != b)
            for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(updates), strict=True)
        ]
        flag = jnp.any(jnp.stack(changed)) if changed else jnp.zeros((), bool)
        return new, ClipState(inner_state, flag)

    return optax.GradientTransformation(init_fn, update_fn)


def clipped(
    optimizer: optax.GradientTransformation,
    *,
    max_norm: float | None = None,
    clip_value: float | None = None,
    adaptive: float | None = None,
    adaptive_eps: float = 1e-3,
) -> optax.GradientTransformation:
    r"""``optax.chain(track_clipping(clip), optimizer)``: gradient clipping in front of any optimizer.

    Exactly one rule, applied to the gradient pytree ``g`` (leaves of any shape):

    * ``max_norm``: global-norm clipping (Pascanu, Mikolov & Bengio 2013),
      $g \leftarrow g \cdot \min(1, c / \|g\|_2)$ with $\|g\|_2$ over all leaves
      (``optax.clip_by_global_norm``).
    * ``clip_value``: element-wise value clipping $g \leftarrow \mathrm{clip}(g, -c, c)$
      (``optax.clip``), the fixed-threshold clipping of the classical RNN literature (e.g.
      Graves 2013).
    * ``adaptive``: unit-wise adaptive clipping (Brock et al. 2021),
      $g_i \leftarrow g_i \cdot \min(1, \lambda \max(\|w_i\|, \epsilon) / \|g_i\|)$
      (``optax.adaptive_grad_clip``).

    Args:
      optimizer: the optax transformation applied after clipping.
      max_norm: the threshold ``c`` of global-norm clipping (positive), or ``None``.
      clip_value: the threshold ``c`` of element-wise clipping (positive), or ``None``.
      adaptive: the factor ``lambda`` of adaptive clipping (positive), or ``None``.
      adaptive_eps: $\epsilon$ of adaptive clipping.

    Returns:
      An ``optax.GradientTransformation`` (an ordinary ``optax.chain``).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from seqjax.train import clipped
      >>> opt = clipped(optax.sgd(1.0), max_norm=1.0)          # g <- g min(1, 1 / ||g||_2)
      >>> params = {"w": jnp.zeros(2)}
      >>> updates, state = opt.update({"w": jnp.array([3.0, 4.0])}, opt.init(params), params)
      >>> bool(jnp.allclose(updates["w"], jnp.array([-0.6, -0.8])))   # ||g|| = 5 -> 1; sgd: -g
      True
      >>> bool(state[0].clipped)                               # the ClipState of track_clipping
      True
    """
    given = {
        k: v
        for k, v in (("max_norm", max_norm), ("clip_value", clip_value), ("adaptive", adaptive))
        if v is not None
    }
    if len(given) != 1:
        raise ValueError(
            f"clipped needs exactly one of max_norm, clip_value, adaptive; got {sorted(given) or 'none'}."
        )
    ((name, value),) = given.items()
    if not float(value) > 0:
        raise ValueError(f"{name} must be positive, got {value}.")
    if name == "max_norm":
        clip = optax.clip_by_global_norm(value)
    elif name == "clip_value":
        clip = optax.clip(value)
    else:
        clip = optax.adaptive_grad_clip(value, eps=adaptive_eps)
    return optax.chain(track_clipping(clip), optimizer)


def clipped_adam(
    learning_rate: float | optax.Schedule,
    *,
    max_norm: float | None = 1.0,
    clip_value: float | None = None,
    adaptive: float | None = None,
    **adam_kwargs,
) -> optax.GradientTransformation:
    r"""Adam behind gradient clipping: ``clipped(optax.adam(learning_rate, **adam_kwargs), ...)``.

    The default is global-norm clipping at 1, $g \leftarrow g \min(1, 1/\|g\|_2)$; pass
    ``clip_value=`` or ``adaptive=`` (with ``max_norm=None``) for the other rules. See
    ``clipped``.

    Args:
      learning_rate: Adam's step size (a float or an optax schedule).
      max_norm: global-norm threshold (default 1; ``None`` for another rule).
      clip_value: element-wise threshold (see ``clipped``).
      adaptive: unit-wise adaptive threshold (see ``clipped``).
      **adam_kwargs: passed to ``optax.adam`` (``b1``, ``b2``, ``eps``, ...).

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      ``clipped_adam(1e-2, max_norm=1.0)`` is
      ``optax.chain(track_clipping(optax.clip_by_global_norm(1.0)), optax.adam(1e-2))``:

      >>> import jax.numpy as jnp
      >>> from seqjax.train import clipped_adam
      >>> opt = clipped_adam(1e-2, max_norm=1.0)
      >>> params = {"w": jnp.zeros(2)}
      >>> _, state = opt.update({"w": jnp.array([3.0, 4.0])}, opt.init(params), params)
      >>> bool(state[0].clipped)                          # the norm 5 was clipped to 1
      True
    """
    if clip_value is not None or adaptive is not None:
        if max_norm == 1.0:  # the default: the caller chose another rule
            max_norm = None
    return clipped(
        optax.adam(learning_rate, **adam_kwargs), max_norm=max_norm, clip_value=clip_value, adaptive=adaptive
    )


def _clip_flags(opt_state: Any) -> list[jax.Array]:
    """The ``()`` bool ``clipped`` flag of every ``ClipState`` inside ``opt_state``."""
    nodes = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ClipState))
    return [n.clipped for n in nodes if isinstance(n, ClipState)]
