"""How ``unroll`` walks the time axis: the ``solver=`` slot.

``Sequential`` (the default) is the one solver today: ``jax.lax.scan`` over time, ``T``
dependent steps. The slot is where parallel-in-time solvers (which solve for all ``T``
carries at once by fixed-point or Newton iterations) will plug in; a solver declares whether
a cell's fused kernel may run under it (``runs_kernels``), so gradient strategies never ask
a solver what kind it is.
"""

from __future__ import annotations

import dataclasses

from seqjax._scan import time_scan
from seqjax._util import positive_int

__all__ = ["Solver", "Sequential"]


class Solver:
    """Base class of the time-axis solvers.

    A solver provides ``scan(body, carry0, xs, *, reverse) -> (final, outs)`` with the
    semantics of ``jax.lax.scan`` over time-major ``xs`` (``None`` leaves allowed), and the
    attributes ``runs_kernels`` (whether ``unroll`` may hand the whole sequence to a cell's
    fused ``kernel``, which is itself a sequential scan) and ``unroll`` (passed to that kernel).
    """

    runs_kernels: bool = False
    unroll: int | bool = 1  # the ``unroll`` a kernel's own scan is given when ``runs_kernels``

    def scan(self, body, carry0, xs, *, reverse: bool = False):  # pragma: no cover - abstract
        """``(final, outs)`` of ``carry_t, out_t = body(carry_{t-1}, xs[t])`` over the leading
        (time) axis of ``xs``, as ``jax.lax.scan`` defines them."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Sequential(Solver):
    """``jax.lax.scan`` over time: ``carry_t = step(carry_{t-1}, x_t)`` for ``t = 1..T``.

    Attributes:
      unroll: ``lax.scan``'s ``unroll`` (steps per loop iteration of the compiled scan; ``True``
        unrolls fully). Values are unchanged; only compile time and speed move.
    """

    unroll: int | bool = 1

    runs_kernels = True

    def __post_init__(self):
        if not isinstance(self.unroll, bool):
            positive_int(self.unroll, "Sequential(unroll=...)", " or a bool")

    def scan(self, body, carry0, xs, *, reverse: bool = False):
        """``lax.scan(body, carry0, xs, reverse=reverse, unroll=self.unroll)``."""
        return time_scan(body, carry0, xs, reverse=reverse, unroll=self.unroll)


def resolve(solver) -> Solver:
    """``solver`` itself (``None`` means ``Sequential()``); a ``TypeError`` for anything else."""
    if solver is None:
        return Sequential()
    if not isinstance(solver, Solver):
        raise TypeError(
            f"solver must be a seqjax.solvers.Solver such as Sequential(unroll=1), got {solver!r}."
        )
    return solver
