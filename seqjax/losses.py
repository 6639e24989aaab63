"""Masked sequence losses.

Padded steps must not touch the loss nor its gradient, whatever values sit there (even
``inf`` or ``nan``). So every loss here first *replaces* the masked-out entries by safe
constants (``jnp.where``), then computes, then zeroes the masked terms: the loss is
bitwise independent of the padded values and the gradient there is exactly zero.

Shapes (batch-major sequences):

```text
logits: (*batch, T, C)   labels: (*batch, T) int   mask: (*batch, T)   lengths: (*batch,)
```

but nothing assumes a time axis: any ``(..., C)`` logits with ``(...)`` labels and a
``(...)`` mask work (e.g. many-to-one ``(B, C)`` with ``(B,)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqjax.unroll import sequence_mask

__all__ = ["softmax_cross_entropy", "mse", "accuracy", "weights_from"]

_REDUCTIONS = ("mean", "sum", "none")


def weights_from(shape: tuple[int, ...], *, mask=None, lengths=None, dtype=jnp.float32) -> jax.Array:
    """Per-position weights of shape ``shape`` from a mask and/or lengths.

    ``w = mask * (t < lengths)`` where ``t`` indexes the **last** axis of ``shape`` (so
    ``lengths: shape[:-1]``). A boolean mask gives 0/1 weights; a numeric mask is used as
    weights as is.

    Args:
      shape: the shape of the per-position losses, ``(*batch, T)``.
      mask: optional boolean or numeric ``shape``.
      lengths: optional integer ``shape[:-1]``.
      dtype: dtype of the result.

    Returns:
      ``(shape)`` weights (all ones when both are ``None``).

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> seqjax.weights_from((2, 4), lengths=jnp.array([4, 2])).tolist()
      [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    """
    w = jnp.ones(shape, dtype)
    if mask is not None:
        mask = jnp.asarray(mask)
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but needs {tuple(shape)}.")
        w = w * mask.astype(dtype)
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        if len(shape) < 1 or tuple(lengths.shape) != tuple(shape[:-1]):
            raise ValueError(
                f"lengths has shape {tuple(lengths.shape)} but needs {tuple(shape[:-1])} (one length per "
                f"sequence of the {tuple(shape)} positions, time last)."
            )
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be integers, got dtype {lengths.dtype}.")
        w = w * sequence_mask(lengths, shape[-1]).astype(dtype)
    return w


def _reduce(per: jax.Array, w: jax.Array, reduction: str) -> jax.Array:
    if reduction == "none":
        return per
    total = jnp.sum(per)
    if reduction == "sum":
        return total
    denom = jnp.sum(w)
    return total / jnp.maximum(denom, jnp.asarray(1e-12, denom.dtype)) * (denom > 0)


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
    lengths: jax.Array | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Masked softmax cross-entropy with integer labels.

    ``l_n = -log softmax(z_n)[y_n] = logsumexp(z_n) - z_n[y_n]`` at each position ``n``,
    weighted by ``w_n`` (mask, ``t < lengths``, ``y_n != ignore_index``):

    ```text
    mean: sum_n w_n l_n / sum_n w_n        (0 when every weight is 0)
    sum:  sum_n w_n l_n
    none: w_n l_n, shape (...)
    ```

    Logits and labels at positions of zero weight are replaced before use, so their values
    (even non-finite, or labels out of range such as ``-100``) change neither the loss nor
    the gradient.

    Args:
      logits: ``(..., C)``.
      labels: integer ``(...)`` in ``[0, C)`` where weighted.
      mask: boolean or numeric weights ``(...)``.
      lengths: integer ``(...)[:-1]``: positions ``t >= lengths`` along the last axis of
        ``labels`` (the time axis of batch-major sequences) get weight 0.
      ignore_index: label value that gets weight 0 (PyTorch's ``ignore_index``).
      reduction: ``"mean"`` (over weighted positions), ``"sum"`` or ``"none"``.

    Returns:
      A scalar, or ``(...)`` for ``reduction="none"``.

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> logits = jnp.zeros((2, 4, 5))                          # (B, T, C): uniform over 5 classes
      >>> labels = jnp.array([[0, 1, 2, 3], [4, 0, -100, -100]])
      >>> loss = seqjax.softmax_cross_entropy(logits, labels, ignore_index=-100)
      >>> bool(jnp.allclose(loss, jnp.log(5.0)))                 # -log(1/5) at the 6 weighted steps
      True
    """
    _check_reduction(reduction)
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 1 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but needs logits.shape[:-1] = "
            f"{tuple(logits.shape[:-1])} "
            "(one integer class per position; logits carry the classes last)."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers (class indices), got dtype {labels.dtype}.")
    w = weights_from(labels.shape, mask=mask, lengths=lengths, dtype=logits.dtype)
    if ignore_index is not None:
        w = w * (labels != ignore_index).astype(w.dtype)
    valid = w != 0
    safe_logits = jnp.where(valid[..., None], logits, jnp.zeros_like(logits))
    safe_labels = jnp.where(valid, labels, jnp.zeros_like(labels))
    logp = jax.nn.log_softmax(safe_logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe_labels[..., None], axis=-1)[..., 0]
    per = jnp.where(valid, w * nll, jnp.zeros_like(nll))
    return _reduce(per, w, reduction)


def mse(
    predictions: jax.Array,
    targets: jax.Array,
    *,
    mask: jax.Array | None = None,
    lengths: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Masked mean squared error.

    ``l_{n,f} = (p_{n,f} - y_{n,f})^2`` with per-position weights ``w_n`` (a mask or
    lengths over the positions ``n``, shared by the ``F`` features):

    ```text
    mean: sum_{n,f} w_n l_{n,f} / (F sum_n w_n)   (PyTorch's MSELoss over the valid entries)
    sum:  sum_{n,f} w_n l_{n,f}
    none: w_n l_{n,f}, shape (..., F)
    ```

    Entries of zero weight are replaced before use, so their values change neither the
    loss nor the gradient.

    Args:
      predictions: ``(..., F)``.
      targets: same shape.
      mask: boolean or numeric ``(...)`` (per position) or ``(..., F)`` (per entry).
      lengths: integer ``(...)[:-1]``: positions ``t >= lengths`` along the last position
        axis (time, batch-major) get weight 0.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
      A scalar, or ``(..., F)`` for ``reduction="none"``.

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> preds, targets = jnp.ones((2, 4, 3)), jnp.zeros((2, 4, 3))    # (B, T, F)
      >>> float(seqjax.mse(preds, targets))
      1.0
      >>> preds = preds.at[1, 2:].set(100.0)                     # padding past length 2
      >>> float(seqjax.mse(preds, targets, lengths=jnp.array([4, 2])))
      1.0
      >>> seqjax.mse(preds, targets, reduction="none").shape
      (2, 4, 3)
    """
    _check_reduction(reduction)
    p = jnp.asarray(predictions)
    y = jnp.asarray(targets)
    if p.shape != y.shape or p.ndim < 1:
        raise ValueError(
            f"targets has shape {tuple(y.shape)} but needs the shape of predictions, {tuple(p.shape)}."
        )
    if mask is not None and tuple(jnp.shape(mask)) == tuple(p.shape):
        w = weights_from(p.shape, mask=mask, dtype=p.dtype)
        if lengths is not None:
            w = w * weights_from(p.shape[:-1], lengths=lengths, dtype=p.dtype)[..., None]
    else:
        if mask is not None and tuple(jnp.shape(mask)) != tuple(p.shape[:-1]):
            raise ValueError(
                f"mask has shape {tuple(jnp.shape(mask))} but needs {tuple(p.shape[:-1])} (per position) "
                f"or {tuple(p.shape)} (per entry)."
            )
        w = weights_from(p.shape[:-1], mask=mask, lengths=lengths, dtype=p.dtype)[..., None]
        w = jnp.broadcast_to(w, p.shape)
    valid = w != 0
    d = jnp.where(valid, p, jnp.zeros_like(p)) - jnp.where(valid, y, jnp.zeros_like(y))
    per = jnp.where(valid, w * d * d, jnp.zeros_like(d))
    return _reduce(per, w, reduction)


def accuracy(
    logits: jax.Array, labels: jax.Array, *, mask: jax.Array | None = None, lengths: jax.Array | None = None
) -> jax.Array:
    """Masked accuracy: the weighted fraction of positions where ``argmax(logits) == labels``.

    Args:
      logits: ``(..., C)``.
      labels: integer ``(...)``.
      mask: boolean or numeric weights ``(...)``.
      lengths: integer ``(...)[:-1]``: positions ``t >= lengths`` along the last axis of
        ``labels`` get weight 0.

    Returns:
      A scalar in ``[0, 1]`` (0 when every weight is 0).

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> labels = jnp.array([[0, 1, 2], [2, 1, 0]])
      >>> logits = jnp.eye(3)[jnp.array([[0, 1, 1], [2, 1, 1]])]   # one wrong prediction per row
      >>> round(float(seqjax.accuracy(logits, labels)), 4)
      0.6667
      >>> float(seqjax.accuracy(logits, labels, lengths=jnp.array([2, 2])))
      1.0
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels has shape {tuple(labels.shape)} but needs {tuple(logits.shape[:-1])}.")
    w = weights_from(labels.shape, mask=mask, lengths=lengths, dtype=jnp.float32)
    hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _reduce(w * hit, w, "mean")
