r"""Fixed and slow points of a recurrent cell, and their linearisation.

For a constant input ``x`` the cell is an autonomous map ``s -> F(s, x)`` of the flattened
state (``seqjax.spectrum.flatten_state``). Its fixed points ``F(s*, x) = s*`` and slow
points (where ``F(s, x) - s`` is small but non-zero) organise the dynamics: memories of a
trained network sit at stable fixed points, decisions are made near saddles (Sussillo &
Barak 2013; Golub & Sussillo 2018).

``find_fixed_points`` minimises the speed

$$
q(s) = \tfrac12 \lVert F(s, x) - s \rVert^2
$$

from many starting states (typically sampled from trajectories with ``sample_states``) with
an optax optimiser, all starts at once (``vmap``) inside one ``jit``; optionally refines by
Newton steps ``s <- s - (J - I)^{-1} (F(s) - s)``; keeps points with ``q`` below a tolerance,
removes duplicates and outliers; and linearises ``F`` at each point: eigenvalues, right and
left eigenvectors of ``J = dF/ds``, and the discrete-time classification (stable iff the
spectral radius is below 1).

The eigendecomposition runs where JAX has one (CPU, GPU); on TPU it runs on the host (see
``seqjax.spectrum.eig``). Deduplication and filtering are NumPy on the host, so call
``find_fixed_points`` outside ``jit`` (its optimisation is jit-compiled inside).

References:
  Sussillo & Barak, "Opening the black box: low-dimensional dynamics in high-dimensional
  recurrent neural networks", Neural Computation 25 (2013). Golub & Sussillo,
  "FixedPointFinder: A Tensorflow toolbox", JOSS 3 (2018).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqjax._util import positive_int, promote
from seqjax.cells import Cell
from seqjax.spectrum.jacobians import _batch_major, _jacobian_fn, _trajectory
from seqjax.spectrum.linalg import eig
from seqjax.spectrum.state import (
    _flat_step,
    _for_model,
    _like,
    _mask_batch_major,
    _valid_steps,
    flatten_state,
    state_size,
    unflatten_state,
)
from seqjax.unroll import _is_concrete

__all__ = [
    "FixedPoints",
    "find_fixed_points",
    "sample_states",
    "speed",
    "linearize",
]


def _check_x(x, I_expected=None):
    x = jnp.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"x must be one constant input vector (I,), got shape {tuple(x.shape)}.")
    return x


def speed(cell: Cell, params: Any, states: jax.Array, x: jax.Array) -> jax.Array:
    r"""The fixed-point objective ``q(s) = 1/2 ||F(s, x) - s||^2``.

    Args:
      cell: the cell.
      params: its params.
      states: flattened states ``(..., S)``.
      x: the constant input ``(I,)``.

    Returns:
      ``(...)``.
    """
    x = _check_x(x)
    states = jnp.asarray(states)
    params, x, states, _ = promote(params, x, states)
    return _speed_core(cell, params, states, x)


@functools.partial(jax.jit, static_argnames=("cell",))
def _speed_core(cell, params, states, x):
    f = _flat_step(cell, params, _like(cell, params))
    flat = states.reshape((-1, states.shape[-1]))
    q = jax.vmap(lambda s: 0.5 * jnp.sum((f(s, x) - s) ** 2))(flat)
    return q.reshape(states.shape[:-1])


def linearize(
    cell: Cell, params: Any, states: jax.Array, x: jax.Array, *, host: bool | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""Jacobians ``J = dF/ds`` at states and their eigendecomposition.

    Args:
      cell: the cell.
      params: its params.
      states: ``(N, S)`` flattened states.
      x: constant input ``(I,)``.
      host: where the eigendecomposition runs (see ``seqjax.spectrum.eig``).

    Returns:
      ``(jacobians (N, S, S), eigenvalues (N, S), right (N, S, S), left (N, S, S))``,
      eigenvalues sorted by decreasing modulus, eigenvectors in matching columns, left
      ones normalised so that ``left^H right = I``.
    """
    x = _check_x(x)
    states = jnp.asarray(states)
    params, x, states, _ = promote(params, x, states)
    return _linearize_core(cell, params, states, x, host=host)


@functools.partial(jax.jit, static_argnames=("cell", "host"))
def _linearize_core(cell, params, states, x, *, host):
    jac = _jacobian_fn(cell, params, "auto")
    J = jax.vmap(lambda s: jac(s, x))(states)
    w, vr, vl = eig(J, host=host)
    order = jnp.argsort(-jnp.abs(w), axis=-1)
    w = jnp.take_along_axis(w, order, axis=-1)
    vr = jnp.take_along_axis(vr, order[..., None, :], axis=-1)
    vl = jnp.take_along_axis(vl, order[..., None, :], axis=-1)
    return J, w, vr, vl


@overload
def sample_states(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    *,
    n: int,
    key: jax.Array,
    noise: float = ...,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    time_axis: int = ...,
) -> jax.Array: ...


@overload
def sample_states(
    cell: object,
    params: Any,
    xs: jax.Array,
    *,
    n: int,
    key: jax.Array,
    noise: float = ...,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    time_axis: int = ...,
) -> dict[str, jax.Array]: ...


def sample_states(
    cell: Cell | Any,
    params: Any,
    xs: jax.Array,
    *,
    n: int,
    key: jax.Array,
    noise: float = 0.0,
    carry: Any = None,
    lengths: Any = None,
    mask: Any = None,
    time_axis: int = -2,
) -> jax.Array | dict[str, jax.Array]:
    """Draw ``n`` starting states from the trajectories of ``cell`` driven by ``xs``.

    Args:
      cell: the cell, or a whole model (see ``seqjax.spectrum.recurrent_cores``): then a
        dict, one ``(n, S)`` array per core.
      params: its params.
      xs: ``(*batch, T, I)`` inputs (e.g. a batch of task inputs).
      n: how many states (drawn uniformly over the steps read, with replacement).
      key: PRNG key.
      noise: standard deviation of Gaussian noise added to each sampled state.
      carry: initial carry for the unroll.
      lengths: ``(*batch,)`` valid steps of each sequence: states after padding are never
        drawn.
      mask: ``(*batch, T)`` bool, the steps read (laid out like ``xs`` without features).
      time_axis: time axis of ``xs``.

    Returns:
      ``(n, S)`` flattened states.
    """
    if not isinstance(cell, Cell):
        return _for_model(
            sample_states, cell, params, xs, carry, lengths, mask, time_axis, n=n, key=key, noise=noise
        )
    xs = jnp.asarray(xs)
    xs_bm = _batch_major(xs, time_axis)
    valid = _valid_steps(lengths, _mask_batch_major(mask, xs, time_axis), xs_bm)
    if valid is not None and _is_concrete(valid) and not bool(np.any(np.asarray(valid))):
        raise ValueError("sample_states: lengths/mask leave no step to draw a state from.")
    params, xs_bm, carry, _ = promote(params, xs_bm, carry)
    return _sample_core(cell, params, xs_bm, carry, valid, key, jnp.asarray(noise), n=positive_int(n, "n"))


@functools.partial(jax.jit, static_argnames=("cell", "n"))
def _sample_core(cell, params, xs_bm, carry, valid, key, noise, *, n):
    _, states = _trajectory(cell, params, xs_bm, carry, valid)
    flat = states.reshape((-1, states.shape[-1]))
    k_idx, k_noise = jax.random.split(key)
    if valid is None:
        idx = jax.random.randint(k_idx, (n,), 0, flat.shape[0])
    else:
        w = valid.reshape(-1).astype(flat.dtype)
        idx = jax.random.choice(k_idx, flat.shape[0], (n,), p=w / jnp.sum(w))
    out = flat[idx]
    eps = jax.random.normal(k_noise, out.shape, jnp.float32).astype(out.dtype)
    return out + noise.astype(out.dtype) * eps


def _optimise_core_impl(cell, params, x, s0, lr, *, steps, newton_steps, optimizer):
    """Minimise the speed from every start (vmapped), then Newton-refine."""
    S = s0.shape[-1]
    f = _flat_step(cell, params, _like(cell, params))
    opt = optax.adam(lr) if optimizer is None else optimizer

    def q_fn(s):
        return 0.5 * jnp.sum((f(s, x) - s) ** 2)

    def optimise_one(s):
        state = opt.init(s)

        def body(_, c):
            s, st = c
            g = jax.grad(q_fn)(s)
            upd, st = opt.update(g, st, s)
            return optax.apply_updates(s, upd), st

        s, _ = jax.lax.fori_loop(0, steps, body, (s, state))

        def newton(_, s):
            J = jax.jacfwd(lambda v: f(v, x))(s)
            r = f(s, x) - s
            step = jnp.linalg.solve(J - jnp.eye(S, dtype=J.dtype), r)
            s_new = s - step
            ok = jnp.all(jnp.isfinite(s_new)) & (q_fn(s_new) < q_fn(s))
            return jnp.where(ok, s_new, s)

        s = jax.lax.fori_loop(0, newton_steps, newton, s)
        return s, q_fn(s)

    return jax.vmap(optimise_one)(s0)


# The optimiser is static: an optax transformation is a tuple of functions, hashed by identity,
# so a user's optimiser object reused across calls hits the cache; the default Adam is built
# inside from a traced learning rate and never recompiles.
_optimise_core = jax.jit(_optimise_core_impl, static_argnames=("cell", "steps", "newton_steps", "optimizer"))


@dataclasses.dataclass(frozen=True)
class FixedPoints:
    """Fixed and slow points with their linearisation (N points, state size S).

    Attributes:
      states: ``(N, S)`` flattened points.
      carries: the same points as a carry pytree with leaves ``(N, ...)``.
      q: ``(N,)`` the speed ``1/2 ||F(s) - s||^2`` at each point.
      slow: ``(N,)`` bool: ``q > fixed_tol`` (a slow point, not a fixed point).
      jacobians: ``(N, S, S)``.
      eigenvalues: ``(N, S)`` complex, decreasing modulus.
      right_eigenvectors, left_eigenvectors: ``(N, S, S)``, columns match ``eigenvalues``.
      spectral_radius: ``(N,)``.
      stable: ``(N,)`` bool, ``spectral_radius < 1`` (discrete time).
      x: the constant input.
      num_starts: how many starts were optimised; ``num_rejected``: how many did not reach
        ``slow_tol``; ``num_duplicates``, ``num_outliers``: how many were removed as such.
    """

    states: np.ndarray
    carries: Any
    q: np.ndarray
    slow: np.ndarray
    jacobians: np.ndarray
    eigenvalues: np.ndarray
    right_eigenvectors: np.ndarray
    left_eigenvectors: np.ndarray
    spectral_radius: np.ndarray
    stable: np.ndarray
    x: np.ndarray
    num_starts: int
    num_rejected: int
    num_duplicates: int
    num_outliers: int

    def __len__(self) -> int:
        return int(self.states.shape[0])

    @property
    def num_stable(self) -> int:
        """Number of stable *fixed* points (slow points excluded)."""
        return int(np.sum(self.stable & ~self.slow))

    def __str__(self) -> str:
        lines = [
            f"{len(self)} points from {self.num_starts} starts "
            f"({self.num_rejected} not converged, {self.num_duplicates} duplicates, "
            f"{self.num_outliers} outliers)"
        ]
        for i in range(len(self)):
            kind = "slow point" if self.slow[i] else "fixed point"
            stab = "stable" if self.stable[i] else "unstable"
            n_unstable = int(np.sum(np.abs(self.eigenvalues[i]) >= 1))
            lines.append(
                f"  #{i}: {kind:11s} q={self.q[i]:.2e}  |lambda|_max={self.spectral_radius[i]:.4f} "
                f"{stab} ({n_unstable} unstable modes)"
            )
        return "\n".join(lines)

    def plot(self, *, ax=None, **kwargs):
        """Eigenvalues at every point in the complex plane (``seqjax.plot.plot_eigenvalues``)."""
        from seqjax import plot

        return plot.plot_eigenvalues(self.eigenvalues, ax=ax, **kwargs)


def find_fixed_points(
    cell: Cell,
    params: Any,
    x: jax.Array,
    initial_states: Any,
    *,
    steps: int = 2000,
    learning_rate: float = 1e-2,
    optimizer: optax.GradientTransformation | None = None,
    newton_steps: int = 0,
    fixed_tol: float | None = None,
    slow_tol: float = 1e-6,
    unique_tol: float = 1e-3,
    outlier_distance: float | None = None,
    host: bool | None = None,
) -> FixedPoints:
    r"""Find fixed and slow points of ``s -> F(s, x)`` for a constant input ``x``.

    Minimises ``q(s) = 1/2 ||F(s, x) - s||^2`` from every row of ``initial_states`` (all at
    once, one ``jit``), optionally refines each by up to ``newton_steps`` Newton steps
    ``s <- s - (J(s) - I)^{-1} (F(s, x) - s)`` (a step is kept only if it lowers ``q``), then:

    * rejects points with ``q > slow_tol`` (not converged);
    * marks points with ``fixed_tol < q <= slow_tol`` as slow points;
    * removes duplicates: points within ``unique_tol`` (Euclidean) of a point with smaller
      ``q`` are dropped;
    * removes outliers: with ``outlier_distance`` set, points farther than that from every
      initial state (a point the trajectories never visit);
    * linearises at every remaining point (``linearize``) and classifies it: stable iff the
      spectral radius of ``J`` is below 1.

    Args:
      cell: the cell.
      params: its params.
      x: constant input ``(I,)`` (zeros for the autonomous dynamics).
      initial_states: ``(N, S)`` flattened states, or a carry with leaves ``(N, ...)``
        (e.g. from ``sample_states``).
      steps: optimiser steps.
      learning_rate: of the default optimiser ``optax.adam``.
      optimizer: any optax transformation (overrides ``learning_rate``).
      newton_steps: Newton refinement steps after the optimiser.
      fixed_tol: ``q`` at or below which a point counts as a fixed point; default
        ``max(1e-12, 100 S eps^2)``, about the rounding floor of ``q`` in the state's dtype.
      slow_tol: ``q`` above which a point is rejected.
      unique_tol: distance below which two points are duplicates.
      outlier_distance: optional distance to the nearest initial state beyond which a
        point is an outlier.
      host: where the eigendecomposition runs (see ``seqjax.spectrum.eig``).

    Returns:
      ``FixedPoints`` sorted by ``q`` (``print`` it for a summary).

    Compilation: the optimisation is one ``jax.jit`` with the cell, ``steps``,
    ``newton_steps`` and ``optimizer`` static (the default Adam takes ``learning_rate``
    traced), so a sweep over checkpoints compiles it once; the linearisation runs on the
    kept points padded to a power of two, so at most ``log2(N) + 1`` shapes compile.

    Examples:
      A tanh RNN with small recurrent weights (a contraction) has one fixed point for a
      constant input, a stable one: every start converges to it, the duplicates are removed.
      (For a trained network, start from visited states:
      ``starts = sample_states(cell, params, xs, n=256, key=key, noise=0.01)``.)

      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.spectrum import find_fixed_points
      >>> cell = seqjax.rnn(4, recurrent_init=jax.nn.initializers.normal(0.1))
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> starts = 0.5 * jax.random.normal(jax.random.key(1), (8, 4))     # (N, S)
      >>> fps = find_fixed_points(cell, params, jnp.zeros(2), starts, steps=50, newton_steps=2)
      >>> len(fps.states), fps.num_stable, fps.num_duplicates, bool(fps.slow[0])
      (1, 1, 7, False)
    """
    x = _check_x(x)
    S = state_size(cell, params)
    s0 = initial_states
    if not (isinstance(s0, (jax.Array, np.ndarray)) and np.ndim(s0) == 2 and np.shape(s0)[-1] == S):
        s0 = flatten_state(s0, batch_ndim=1)
    s0 = jnp.asarray(s0)
    params, x, s0, _ = promote(params, x, s0)  # the dtype rule
    like = _like(cell, params)
    if s0.ndim != 2 or s0.shape[-1] != S:
        raise ValueError(f"initial_states must be (N, {S}) flattened states, got shape {tuple(s0.shape)}.")
    if fixed_tol is None:
        eps = float(np.finfo(np.dtype(s0.dtype)).eps) if jnp.issubdtype(s0.dtype, jnp.floating) else 1e-7
        fixed_tol = min(max(1e-12, 100.0 * S * eps**2), slow_tol)
    if not 0 <= fixed_tol <= slow_tol:
        raise ValueError(f"need 0 <= fixed_tol <= slow_tol, got {fixed_tol} and {slow_tol}.")
    if optimizer is None:
        opt_key, lr = None, jnp.asarray(learning_rate, s0.dtype)
    else:
        opt_key, lr = optimizer, None
    pts, qs = _optimise_core(
        cell, params, x, s0, lr, steps=int(steps), newton_steps=int(newton_steps), optimizer=opt_key
    )
    pts, qs = np.asarray(pts), np.asarray(qs)
    n_start = pts.shape[0]
    keep = np.isfinite(qs) & (qs <= slow_tol)
    n_rej = int(n_start - keep.sum())
    pts, qs = pts[keep], qs[keep]
    order = np.argsort(qs, kind="stable")
    pts, qs = pts[order], qs[order]
    kept: list[int] = []
    for i in range(pts.shape[0]):
        if all(np.linalg.norm(pts[i] - pts[j]) > unique_tol for j in kept):
            kept.append(i)
    n_dup = pts.shape[0] - len(kept)
    pts, qs = pts[kept], qs[kept]
    n_out = 0
    if outlier_distance is not None and pts.shape[0]:
        s0_np = np.asarray(s0)
        dmin = np.min(np.linalg.norm(pts[:, None, :] - s0_np[None, :, :], axis=-1), axis=1)
        inl = dmin <= outlier_distance
        n_out = int((~inl).sum())
        pts, qs = pts[inl], qs[inl]
    if pts.shape[0]:
        # How many points survive depends on the params; padding to a power of two bounds the
        # shapes the linearisation compiles for (at most log2(num_starts) + 1 programs in a sweep).
        n = pts.shape[0]
        padded = np.concatenate([pts, np.repeat(pts[:1], (1 << (n - 1).bit_length()) - n, axis=0)])
        lin = linearize(cell, params, jnp.asarray(padded), x, host=host)
        J, w, vr, vl = (np.asarray(a)[:n] for a in lin)
    else:
        cd = np.result_type(pts.dtype, np.complex64)
        J = np.zeros((0, S, S), pts.dtype)
        w, vr, vl = np.zeros((0, S), cd), np.zeros((0, S, S), cd), np.zeros((0, S, S), cd)
    rho = np.max(np.abs(w), axis=-1) if pts.shape[0] else np.zeros((0,), pts.dtype)
    return FixedPoints(
        states=pts,
        carries=unflatten_state(jnp.asarray(pts), like),
        q=qs,
        slow=qs > fixed_tol,
        jacobians=J,
        eigenvalues=w,
        right_eigenvectors=vr,
        left_eigenvectors=vl,
        spectral_radius=rho,
        stable=rho < 1,
        x=np.asarray(x),
        num_starts=n_start,
        num_rejected=n_rej,
        num_duplicates=n_dup,
        num_outliers=n_out,
    )
