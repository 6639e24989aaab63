"""How ``unroll`` computes gradients: one small strategy object, passed as ``gradient=``.

The forward values of ``unroll`` never depend on the strategy; only the backward pass (and its
memory and speed) does, and ``Truncate`` changes the gradient itself by design.

| strategy | backward pass |
| --- | --- |
| ``Auto()`` | default: ``Fused()`` when the kernel accepts every option of the call, else ``Autodiff()`` |
| ``Fused()`` | the cell's fused BPTT kernel (its ``kernel`` capability), or a ``ValueError`` saying why not |
| ``Autodiff()`` | ``jax.grad`` through the plain scan; residuals: ``O(T)`` carries and step intermediates |
| ``Remat(every=k)`` | autodiff, rematerialised: memory ``O(T/k + k)`` carries, about one extra forward pass |
| ``Truncate(every=k, base=...)`` | truncated BPTT: the gradient through the carry is cut every ``k`` steps |

``Autodiff()`` is the one that supports forward mode (``jax.jvp``, ``jax.jacfwd``,
``jax.hessian``), which a ``custom_vjp`` kernel does not. ``Remat(every=1)`` checkpoints every
step (residuals: the carry only); ``k > 1`` checkpoints segments of ``k`` steps (an outer scan
over ``ceil(T/k)`` checkpointed inner scans; ``k ~ sqrt(T)`` minimises memory). ``Truncate``
applies ``stop_gradient`` to the carry entering scan positions ``k, 2k, ...``, then the gradient
is computed by ``base`` (``Auto``, ``Fused``, ``Autodiff`` or ``Remat``).

What composes: ``Truncate`` wraps any of the others (with ``Fused`` it needs a kernel that
accepts ``"truncate"``, as every built-in kernel does). What does not, with the reason:

* ``Truncate(base=Truncate(...))``: two truncation periods are one schedule of cut points;
  give that schedule as one ``Truncate``.
* ``Remat`` of a kernel: a fused kernel stores its own compact residuals (the carries and
  gates it needs), so there is nothing for ``jax.checkpoint`` to save; ``Remat`` is an
  autodiff strategy and never runs a kernel.
* ``Fused`` with gates (``trajectory(..., gates=True)``), a cell without a ``kernel``
  capability, an option its kernel does not accept (``Kernel.accepts``), ``T = 0``, or a
  solver that cannot run kernels: a ``ValueError`` naming the reason.

Examples:
  Strategies change the memory of the backward pass, not the gradient (``Truncate`` aside);
  they compose, e.g. ``unroll(cell, params, xs, gradient=Truncate(50, base=Remat(10)))``.

  >>> import jax, jax.numpy as jnp, seqjax
  >>> from seqjax.gradients import Autodiff, Remat
  >>> cell = seqjax.rnn(4)
  >>> params = cell.init(jax.random.key(0), input_size=3)
  >>> xs = jax.random.normal(jax.random.key(1), (2, 8, 3))
  >>> def grad_w_h(gradient):
  ...     loss = lambda p: jnp.sum(seqjax.unroll(cell, p, xs, gradient=gradient)[1] ** 2)
  ...     return jax.grad(loss)(params)["w_h"]
  >>> bool(jnp.allclose(grad_w_h(Remat(every=4)), grad_w_h(Autodiff()), atol=1e-6))
  True
"""

from __future__ import annotations

import dataclasses

from seqjax._util import positive_int

__all__ = ["GradientStrategy", "Auto", "Fused", "Autodiff", "Remat", "Truncate"]


class GradientStrategy:
    """Base class of the gradient strategies (``Auto``, ``Fused``, ``Autodiff``, ``Remat``,
    ``Truncate``). Instances are frozen and hashable, so they can be static arguments of ``jit``.
    """

    def _plan(self) -> _Plan:  # pragma: no cover - every concrete strategy overrides it
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What ``unroll`` does with a strategy: ``kernel`` in ``{"auto", "require", "never"}``,
    ``truncate`` (steps or ``None``), ``remat`` (``None``, ``"step"`` or a segment length)."""

    kernel: str
    truncate: int | None = None
    remat: int | str | None = None
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Auto(GradientStrategy):
    """The cell's fused kernel when it accepts the call's options, else ``Autodiff()``."""

    def _plan(self) -> _Plan:
        return _Plan("auto", name=repr(self))


@dataclasses.dataclass(frozen=True)
class Fused(GradientStrategy):
    """The cell's fused BPTT kernel (``cell.kernel``), or a ``ValueError`` saying why not."""

    def _plan(self) -> _Plan:
        return _Plan("require", name=repr(self))


@dataclasses.dataclass(frozen=True)
class Autodiff(GradientStrategy):
    """``jax.grad`` through the plain scan (any cell; forward mode works too)."""

    def _plan(self) -> _Plan:
        return _Plan("never", name=repr(self))


@dataclasses.dataclass(frozen=True)
class Remat(GradientStrategy):
    """Autodiff with rematerialisation.

    Attributes:
      every: ``1`` (default) checkpoints every step (residuals per step: the carry only);
        ``k > 1`` checkpoints segments of ``k`` steps: memory ``O(T/k + k)`` carries for about
        one extra forward pass.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.gradients import Autodiff, Remat
      >>> cell = seqjax.rnn(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jnp.ones((2, 5, 3))
      >>> def loss(p, gradient):
      ...     _, ys = seqjax.unroll(cell, p, xs, gradient=gradient)
      ...     return jnp.sum(ys**2)
      >>> g = jax.grad(loss)(params, Autodiff())
      >>> g_remat = jax.grad(loss)(params, Remat(every=2))     # segments of 2 steps, recomputed
      >>> bool(jnp.allclose(g["w_h"], g_remat["w_h"], atol=1e-6))
      True
    """

    every: int = 1

    def __post_init__(self):
        positive_int(self.every, "Remat(every=...)")

    def _plan(self) -> _Plan:
        return _Plan("never", remat="step" if self.every == 1 else int(self.every), name=repr(self))


@dataclasses.dataclass(frozen=True)
class Truncate(GradientStrategy):
    """Truncated BPTT every ``every`` steps, the rest computed by ``base``.

    ``stop_gradient`` is applied to the carry entering scan positions ``k, 2k, ...``
    (``k = every``; positions count in scan order, so from the end with ``reverse=True``); the
    initial carry still gets the gradient of the first ``k`` steps. Forward values are
    unchanged. For a loss that sums over steps this is the gradient ``seqjax.tbptt`` sums
    chunk by chunk.

    Attributes:
      every: the truncation period ``k`` (steps).
      base: how the truncated gradient is computed: ``Auto()`` (default), ``Fused()``,
        ``Autodiff()`` or ``Remat(...)``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.gradients import Autodiff, Truncate
      >>> cell = seqjax.rnn(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> def last(xs, gradient):                      # a loss on the last output only
      ...     _, ys = seqjax.unroll(cell, params, xs, gradient=gradient)
      ...     return jnp.sum(ys[:, -1])
      >>> xs = jnp.ones((2, 5, 3))
      >>> dx = jax.grad(last)(xs, Truncate(every=3))
      >>> (jnp.abs(dx[0]).sum(-1) > 0).tolist()         # steps 0-2 are cut off at position 3
      [False, False, False, True, True]
      >>> bool(jnp.allclose(dx[:, 3:], jax.grad(last)(xs, Autodiff())[:, 3:], atol=1e-6))
      True
    """

    every: int
    base: GradientStrategy = dataclasses.field(default_factory=Auto)

    def __post_init__(self):
        positive_int(self.every, "Truncate(every=...)")
        if isinstance(self.base, Truncate):
            raise ValueError(
                f"Truncate(every={self.every}, base=Truncate(every={self.base.every}, ...)): two "
                "truncation periods are one schedule of cut points; pass a single Truncate."
            )
        if not isinstance(self.base, GradientStrategy):
            raise TypeError(
                "Truncate(base=...) must be a gradient strategy (Auto(), Fused(), Autodiff() or "
                f"Remat(k)), got {self.base!r}."
            )

    def _plan(self) -> _Plan:
        inner = self.base._plan()
        return dataclasses.replace(inner, truncate=int(self.every), name=repr(self))


def resolve(gradient) -> _Plan:
    """The plan of ``gradient`` (``None`` means ``Auto()``); a ``TypeError`` for anything else."""
    if gradient is None:
        return Auto()._plan()
    if not isinstance(gradient, GradientStrategy):
        raise TypeError(
            "gradient must be a seqjax.gradients strategy: Auto(), Fused(), Autodiff(), Remat(every=k) "
            f"or Truncate(every=k, base=...); got {gradient!r}."
        )
    return gradient._plan()
