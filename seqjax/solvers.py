r"""How ``unroll`` walks the time axis: the ``solver=`` slot.

| solver | what it does | memory of the solve |
| --- | --- | --- |
| ``Sequential()`` | default: ``jax.lax.scan`` over time, ``T`` dependent steps | ``O(T S)`` |
| ``DEER()`` | Newton on all ``T`` steps at once, a parallel scan per iteration, dense J_t | ``O(T S^2)`` |
| ``QuasiDEER()`` | the same with ``diag(J_t)``: cheaper iterations, more of them | ``O(T S)`` |
| ``ELK(damping=...)`` | Levenberg-Marquardt (damped) steps by a parallel Kalman smoother | ``O(T S^2)`` |
| ``QuasiELK(damping=...)`` | ELK with ``diag(J_t)`` | ``O(T S)`` |

The parallel solvers (Lim et al. 2024, "Parallelizing non-linear sequential models over the
sequence length"; Gonzalez et al. 2024, "Towards scalable and stable parallelization of
nonlinear RNNs") find all carries ``s_1..s_T`` as the root of the stacked residual
``r_t = s_t - F_t(s_{t-1})`` (``F_t`` the cell's step, with held and reset steps as
``unroll`` defines them). Each iteration linearises every step at the current guess,
``s_t ~ J_t s_{t-1} + (F_t(s~_{t-1}) - J_t s~_{t-1})``, and solves that linear recurrence
with ``jax.lax.associative_scan``: ``O(log T)`` depth instead of ``T``. The Jacobians come
from the cell's ``jacobian`` / ``jacobian_diagonal`` capabilities, or from ``S``
forward-mode passes of the step for a cell without them (exact, ``S`` times the cost of a
step). A cell with the ``linear_recurrence`` capability is solved by one undamped scan
with its own ``A_t`` (diagonal or dense), whatever the solver. Gradients come from the
adjoint recurrence at the solution (``custom_vjp``), one reverse scan with the same
Jacobians. ``docs/guides/parallel.md`` has the mathematics, the options and the failure
modes.

A solver declares what it can do, so ``unroll`` never asks what kind it is: ``runs_kernels``
(whether a cell's fused kernel, itself a sequential scan, may run under it) and
``parallel`` (whether it solves the whole sequence itself, through ``plan``, instead of
providing ``scan``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import numpy as np

from seqjax import _parallel
from seqjax._scan import time_scan
from seqjax._util import positive_int

__all__ = [
    "Solver",
    "Sequential",
    "DEER",
    "QuasiDEER",
    "ELK",
    "QuasiELK",
    "Solution",
    "default_tol",
    "dense_bytes",
]


class Solver:
    """Base class of the time-axis solvers.

    A sequential solver provides ``scan(body, carry0, xs, *, reverse) -> (final, outs)`` with
    the semantics of ``jax.lax.scan`` over time-major ``xs`` (``None`` leaves allowed). The
    attributes say what it can do: ``runs_kernels`` (whether ``unroll`` may hand the whole
    sequence to a cell's fused ``kernel``, which is itself a sequential scan), ``unroll``
    (passed to that kernel) and ``parallel`` (``True``: the solver solves a whole cell over
    the sequence itself; ``unroll`` calls the parallel engine with its ``plan`` and never its
    ``scan``).
    """

    runs_kernels: bool = False
    unroll: int | bool = 1  # the ``unroll`` a kernel's own scan is given when ``runs_kernels``
    parallel: bool = False

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


class Solution(NamedTuple):
    """What ``seqjax.unroll.solve`` returns: the run of a cell and how the solver got there.

    Attributes:
      final: the final carry, leaves ``(*batch, ...)`` (as ``unroll`` returns it).
      ys: the outputs, ``(*batch, T, O)`` with time at ``time_axis`` (as ``unroll``).
      carries: the carry after every step, leaves ``(*batch, T, ...)`` (as ``trajectory``);
        the last iterate when the solve did not converge (never NaN: a step that overflows is
        not taken). Pass it as the ``guess`` of a later solve to warm-start it.
      iterations: int32 ``(*batch,)``: the iterations each sequence took (a rejected
        adaptive ELK step counts; ``0`` for ``Sequential``).
      residuals: ``(*batch, max_iter + 1)``: ``residuals[..., k]`` is
        ``max_{t,i} |s_t - F_t(s_{t-1})|_i`` after ``k`` iterations (``k = 0``: the guess);
        entries past ``iterations`` repeat the last value. ``Sequential``: ``(*batch, 1)``
        zeros.
      converged: bool ``(*batch,)``: the residual is at most ``tol * max(1, max |s|)``
        (``True`` for ``Sequential``).
      nonfinite: bool ``(*batch,)``: the iteration stopped because a step produced inf or
        NaN (a diverging Newton step); ``carries`` holds the last finite iterate.
    """

    final: Any
    ys: Any
    carries: Any
    iterations: Any
    residuals: Any
    converged: Any
    nonfinite: Any


def default_tol(dtype) -> float:
    """The default relative residual tolerance: ``100 * eps`` of ``dtype`` (float32:
    ``1.2e-5``, float64: ``2.2e-14``). A converged Newton iterate sits at the rounding
    level of one step, a few ``eps`` of the state's scale; the factor leaves room for the
    rounding of the ``(S, S)`` matrix products of a step."""
    return float(100.0 * np.finfo(np.dtype(dtype)).eps)


def dense_bytes(T: int, S: int, *, batch: int = 1, itemsize: int = 4, damped: bool = False) -> int:
    """Estimated peak bytes of a dense (``DEER``/``ELK``) solve: ``k * batch * T * S^2 *
    itemsize`` with ``k = 4`` for DEER (the Jacobians, the scan's running products and the
    loop's copy) and ``k = 10`` for ELK (the Kalman filter's three matrices per element, the
    smoother's gains, their combinations). The diagonal variants hold ``O(T S)``.

    Examples:
      >>> from seqjax.solvers import dense_bytes
      >>> dense_bytes(10_000, 64, batch=16)          # GRU H = 64, float32: 10.5 GB
      10485760000
    """
    return _parallel.estimate_bytes(T, batch, S, itemsize, damped)


_ON_FAILURE = ("raise", "sequential")


@dataclasses.dataclass(frozen=True)
class _Parallel(Solver):
    """The options every parallel solver shares (see ``DEER``)."""

    tol: float | None = None
    max_iter: int | None = None
    guess: Any = dataclasses.field(default=None, repr=False)
    on_failure: str = "raise"
    memory_limit: int | None = 2**31

    parallel: ClassVar[bool] = True  # type: ignore[misc]
    runs_kernels: ClassVar[bool] = False  # type: ignore[misc]
    _structure: ClassVar[str] = "dense"
    _damped: ClassVar[bool] = False

    def __post_init__(self):
        name = type(self).__name__
        if self.tol is not None:
            ok = isinstance(self.tol, (int, float, np.floating)) and not isinstance(self.tol, bool)
            if not ok or not math.isfinite(self.tol) or self.tol <= 0:
                raise ValueError(f"{name}(tol=...) must be a positive float (or None), got {self.tol!r}.")
        if self.max_iter is not None:
            positive_int(self.max_iter, f"{name}(max_iter=...)", " (or None: T)")
        if self.on_failure not in _ON_FAILURE:
            raise ValueError(f"{name}(on_failure=...) must be one of {_ON_FAILURE}, got {self.on_failure!r}.")
        if self.memory_limit is not None:
            positive_int(self.memory_limit, f"{name}(memory_limit=...)", " (bytes, or None)")

    def scan(self, body, carry0, xs, *, reverse: bool = False):
        """Not available: a parallel solver solves a whole cell (``unroll``, ``trajectory``,
        ``seqjax.unroll.solve``), not an arbitrary scan body."""
        raise TypeError(
            f"{type(self).__name__} solves a cell over a whole sequence through seqjax.unroll, "
            "seqjax.trajectory or seqjax.unroll.solve; it has no scan(body, ...)."
        )

    def _damping(self) -> tuple[float, bool]:
        return 0.0, False

    def _default_max_iter(self, T: int) -> int:
        return T  # Newton on the triangular system: T iterations always suffice

    def plan(self, T: int, dtype) -> _parallel.Plan:
        """The static description of a solve over ``T`` steps in ``dtype``."""
        damping, adaptive = self._damping()
        return _parallel.Plan(
            name=type(self).__name__,
            structure=self._structure,
            damped=self._damped,
            damping=damping,
            adaptive=adaptive,
            tol=default_tol(dtype) if self.tol is None else float(self.tol),
            max_iter=self._default_max_iter(T) if self.max_iter is None else int(self.max_iter),
            linear=True,
            memory_limit=self.memory_limit,
        )


@dataclasses.dataclass(frozen=True)
class DEER(_Parallel):
    r"""Newton's method on the stacked residual with dense Jacobians (Lim et al. 2024).

    Each iteration computes ``J_t = dF_t/ds_{t-1}`` at the current guess and solves
    ``Delta_t = J_t Delta_{t-1} - r_t`` (``Delta_0 = 0``) by one associative scan whose
    combine is a ``(S, S)`` matrix product; ``s <- s + Delta``. From any guess, after ``k``
    iterations the first ``k`` carries are exact (Newton on a block-triangular system), so
    ``T`` iterations always suffice; contracting cells converge quadratically in far fewer.
    Memory: ``O(T S^2)`` (``dense_bytes``), refused above ``memory_limit``.

    Attributes:
      tol: converged when ``max_{t,i} |s_t - F_t(s_{t-1})| <= tol * max(1, max_{t,i} |s_t|)``
        (per sequence; ``None``: ``default_tol`` of the compute dtype).
      max_iter: the iteration cap (``None``: ``T``, which suffices for DEER and QuasiDEER;
        ``max(T, 100)`` for ELK and QuasiELK).
      guess: the starting trajectory: ``None`` (the initial carry at every step), or carries
        laid out as ``trajectory(...).carries`` / ``Solution.carries`` (leaves
        ``(*batch, T, ...)`` at ``time_axis``), or a ``Solution`` / ``Trajectory`` (its
        ``carries``): a warm start. A solver holding arrays cannot be hashed, so build it
        inside a jitted function rather than passing it as a static argument.
      on_failure: what ``unroll`` / ``trajectory`` do when a sequence has not converged
        within ``max_iter`` (or a step overflowed): ``"raise"`` (default; a ``ValueError``
        when the values are concrete, and under ``jit`` a ``jax.errors.JaxRuntimeError``
        carrying the same message, raised by a host callback when the result is computed),
        or ``"sequential"`` (run the sequential scan instead, in the graph, by
        ``lax.cond``). ``seqjax.unroll.solve`` never raises: it reports.
      memory_limit: bytes a dense solve may take (default 2 GiB; ``None``: no limit).
    """

    _structure: ClassVar[str] = "dense"


@dataclasses.dataclass(frozen=True)
class QuasiDEER(_Parallel):
    r"""Quasi-Newton DEER: ``diag(J_t)`` instead of ``J_t`` (Gonzalez et al. 2024).

    Each iteration's scan is elementwise (``O(T S)`` memory and work), from the cell's
    ``jacobian_diagonal`` (or the diagonal of its ``jacobian``). The fixed point is the same
    (the residual uses the true step), and after ``k`` iterations the first ``k`` carries are
    exact; convergence is linear, not quadratic. Gradients use the exact adjoint (see
    ``seqjax.unroll.solve``). Attributes as ``DEER``.
    """

    _structure: ClassVar[str] = "diag"


def _check_damping(name: str, damping: Any, adaptive: Any) -> None:
    ok = isinstance(damping, (int, float, np.floating)) and not isinstance(damping, bool)
    if not ok or not math.isfinite(damping) or damping <= 0:
        raise ValueError(
            f"{name}(damping=...) must be a positive float (lambda of the Levenberg-Marquardt "
            f"step; lambda -> 0 is DEER), got {damping!r}."
        )
    if not isinstance(adaptive, bool):
        raise ValueError(f"{name}(adaptive=...) must be a bool, got {adaptive!r}.")


@dataclasses.dataclass(frozen=True)
class ELK(_Parallel):
    r"""Levenberg-Marquardt steps evaluated by a parallel Kalman smoother (Gonzalez et al. 2024).

    Each iteration takes the damped step
    ``Delta = argmin sum_t |Delta_t - J_t Delta_{t-1} + r_t|^2 + damping * sum_t |Delta_t|^2``,
    i.e. ``(J_r^T J_r + damping I) Delta = -J_r^T r`` for the stacked residual ``r`` and its
    block-bidiagonal Jacobian ``J_r``. That is the posterior mean of a linear-Gaussian
    state-space model (dynamics ``J_t`` with unit noise, observations ``0`` of ``Delta_t``
    with variance ``1/damping``), computed by a parallel Kalman filter and smoother (two
    associative scans). Damping keeps steps bounded where undamped Newton overflows (chaotic
    cells), at the price of linear convergence. Memory ``O(T S^2)`` (about 2.5 times DEER's).

    Attributes:
      damping: ``lambda > 0`` (``lambda -> 0`` is DEER). Fixed unless ``adaptive``.
      adaptive: adapt ``lambda`` per sequence as classic Levenberg-Marquardt does: a step is
        taken only if ``sum r^2`` falls, and then ``lambda`` shrinks 3-fold; otherwise it is
        rejected (the iteration still counts) and ``lambda`` grows 4-fold. Steps then
        approach Newton's near the solution.
      max_iter: the iteration cap; ``None`` is ``max(T, 100)`` (damped iterations do not end
        after ``T`` by construction).
      tol, guess, on_failure, memory_limit: as ``DEER``.
    """

    damping: float = 1.0
    adaptive: bool = True

    _structure: ClassVar[str] = "dense"
    _damped: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        _check_damping(type(self).__name__, self.damping, self.adaptive)

    def _damping(self) -> tuple[float, bool]:
        return float(self.damping), bool(self.adaptive)

    def _default_max_iter(self, T: int) -> int:
        return max(T, 100)  # damped steps converge linearly and do not finish in T by design


@dataclasses.dataclass(frozen=True)
class QuasiELK(ELK):
    r"""ELK with ``diag(J_t)``: every Kalman quantity is diagonal, ``O(T S)`` memory.

    The damped step of the diagonal linearisation (``J_r`` built from ``diag(J_t)``).
    Attributes as ``ELK``.
    """

    _structure: ClassVar[str] = "diag"
    _damped: ClassVar[bool] = True


def resolve(solver) -> Solver:
    """``solver`` itself (``None`` means ``Sequential()``); a ``TypeError`` for anything else."""
    if solver is None:
        return Sequential()
    if not isinstance(solver, Solver):
        raise TypeError(
            f"solver must be a seqjax.solvers.Solver such as Sequential(unroll=1), got {solver!r}."
        )
    return solver
