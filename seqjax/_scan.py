"""Time-axis plumbing: the one ``jax.lax.scan`` over time in seqjax (imports nothing of seqjax).

Cells never scan; ``unroll`` and the fused kernels of ``seqjax.cells._fused`` scan through
``time_scan``. ``xs`` leaves are time-major; ``None`` leaves are allowed.
"""

from __future__ import annotations

import jax

__all__ = ["time_scan"]


def time_scan(body, init, xs, *, reverse=False, unroll=1):
    """``jax.lax.scan(body, init, xs, reverse=reverse, unroll=unroll)``."""
    return jax.lax.scan(body, init, xs, reverse=reverse, unroll=unroll)
