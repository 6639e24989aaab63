"""Time-axis plumbing: the one ``jax.lax.scan`` over time in seqjax, and the one reading of a
``time_axis`` argument (imports nothing of seqjax).

Cells never scan; ``seqjax.solvers.Sequential`` and the fused kernels of
``seqjax.cells._fused`` scan through ``time_scan``. ``xs`` leaves are time-major; ``None``
leaves are allowed.
"""

from __future__ import annotations

import jax

__all__ = ["time_scan", "time_axis_of", "batch_shape_of_xs"]


def time_scan(body, init, xs, *, reverse=False, unroll=1):
    """``jax.lax.scan(body, init, xs, reverse=reverse, unroll=unroll)``."""
    return jax.lax.scan(body, init, xs, reverse=reverse, unroll=unroll)


def time_axis_of(time_axis: int, ndim: int, *, name: str = "xs", features: bool = True) -> int:
    """``time_axis`` as a non-negative index into an array of ``ndim`` dims.

    With ``features=True`` the last axis holds features and cannot be the time axis (and the
    array needs at least 2 dims). Raises ``ValueError`` naming ``name`` otherwise.
    """
    if features and ndim < 2:
        raise ValueError(
            f"{name} has {ndim} dims but needs at least 2: (*batch, T, features) with "
            "time_axis=-2, or (T, *batch, features) with time_axis=0."
        )
    ta = time_axis + ndim if time_axis < 0 else time_axis
    last = ndim - 1 if features else ndim
    if not 0 <= ta < last:
        raise ValueError(
            f"time_axis={time_axis} is not a valid time axis for {name} with {ndim} dims"
            + (" (the last axis holds the features)." if features else ".")
        )
    return ta


def batch_shape_of_xs(shape: tuple[int, ...], ta: int) -> tuple[int, ...]:
    """The batch shape of inputs of ``shape`` (time at ``ta``, features last)."""
    return tuple(s for i, s in enumerate(shape[:-1]) if i != ta)
