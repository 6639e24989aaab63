r"""Jacobian spectra of recurrent cells: step Jacobians, stable products, Lyapunov exponents.

The recurrent state ``s`` is the *whole* carry flattened to a vector (leaves in tree order,
each raveled): for the Elman RNN ``s = h`` (``S = H``), for the LSTM ``s = [h, c]``
(``S = 2H``; a Jacobian of ``h`` alone would miss the cell-state path
``dc_t/dc_{t-1} = diag(f_t)``), for a user's cell whatever its carry holds. Along a
trajectory ``s_t = F(s_{t-1}, x_t)`` the objects are::

    J_t   = ds_t/ds_{t-1}            (S, S)   step Jacobian, J[i, j] = ds_t[i]/ds_{t-1}[j]
    B_t   = ds_t/dx_t                (S, I)   input Jacobian
    ds_T/ds_k = J_T J_{T-1} ... J_{k+1}        the factor that carries gradients back in time

Our cells act on row vectors (``h_t = f(x_t W_x + h_{t-1} W_h + b)``), so for the Elman
RNN ``J_t = diag(f'(net_t)) W_h^T``. Backpropagated errors obey
``dE/ds_k = dE/ds_T · ds_T/ds_k``: the norms of these products decide whether gradients
vanish or explode (Pascanu, Mikolov & Bengio 2013). Their asymptotic growth rates are the
Lyapunov exponents ``lambda_1 >= ... >= lambda_S`` (per step, natural log), computed here by
the QR method of Benettin et al. (1980) and Shimada & Nagashima (1979), never by forming the
raw product, which overflows float32 within a few hundred steps of a chaotic network and
underflows for a contracting one.

Everything is a pure JAX function: it runs under ``jit`` on CPU and GPU, batched over
sequences, in float32 or float64 (``jax.config.update("jax_enable_x64", True)`` and float64
params). The trajectory comes from ``seqjax.unroll`` (the one place a cell is scanned over
a sequence); the functions here then scan over the precomputed states (QR iterations) or
``vmap`` over them (Jacobians).

General (non-symmetric) eigendecomposition exists in JAX on CPU and GPU only. On TPU,
``eigvals``/``eig`` here (and every function that uses them) compute it on the host
through ``jax.pure_callback`` and NumPy; pass ``host=True`` to force that anywhere.
Everything else (QR, SVD, Lyapunov exponents, norms) runs on every backend.

References:
  Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
  ICML 2013. Benettin, Galgani, Giorgilli & Strelcyn, Meccanica 15 (1980). Eckmann &
  Ruelle, Rev. Mod. Phys. 57 (1985). Engelken, Wolf & Abbott, "Lyapunov spectra of chaotic
  recurrent neural networks", 2020. Vogt et al., "On Lyapunov exponents for RNNs", 2022.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._util import promote
from seqjax.cells import Cell
from seqjax.unroll import unroll

__all__ = [
    "flatten_state",
    "unflatten_state",
    "state_size",
    "step_jacobian",
    "input_jacobian",
    "step_jacobians",
    "StepJacobians",
    "eigvals",
    "eig",
    "step_spectra",
    "spectral_radii",
    "lag_log_norms",
    "product_singular_values",
    "product_eigenvalues",
    "lyapunov_spectrum",
    "lyapunov_from_jacobians",
    "LyapunovSpectrum",
    "top_singular_values",
    "top_eigenvalues",
    "gradient_flow_report",
    "GradientFlowReport",
]

_METHODS = ("auto", "analytic", "autodiff")


# --------------------------------------------------------------------------- state vector


def flatten_state(carry: Any, *, batch_ndim: int = 0) -> jax.Array:
    """Flatten a carry pytree to the state vector ``s``.

    Each leaf ``(*batch, ...)`` is reshaped to ``(*batch, -1)`` and the leaves are
    concatenated in tree order (the order of ``jax.tree_util.tree_leaves``; for
    ``LSTMState(h, c)`` that is ``[h, c]``). With ``batch_ndim=0`` this equals
    ``jax.flatten_util.ravel_pytree(carry)[0]``.

    Args:
      carry: the carry, leaves ``(*batch, ...)``.
      batch_ndim: how many leading axes are batch axes.

    Returns:
      ``s: (*batch, S)``.
    """
    leaves = jax.tree_util.tree_leaves(carry)
    if not leaves:
        raise ValueError("flatten_state: the carry has no array leaves.")
    batch = tuple(leaves[0].shape[:batch_ndim])
    for leaf in leaves:
        if tuple(leaf.shape[:batch_ndim]) != batch:
            raise ValueError(
                f"flatten_state: leaves disagree on the batch shape: {tuple(leaf.shape[:batch_ndim])} "
                f"vs {batch} (batch_ndim={batch_ndim})."
            )
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([jnp.reshape(a, batch + (-1,)).astype(dtype) for a in leaves], axis=-1)


def unflatten_state(s: jax.Array, like: Any) -> Any:
    """Inverse of ``flatten_state``: split ``s: (*batch, S)`` into a carry shaped like ``like``.

    Args:
      s: state vectors ``(*batch, S)``.
      like: an *unbatched* carry (leaves without batch axes), e.g.
        ``cell.initial_carry(params, ())``; only its structure, shapes and dtypes are used.

    Returns:
      A carry with leaves ``(*batch, *leaf_shape)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [int(np.prod(np.shape(a), dtype=int)) for a in leaves]
    if s.shape[-1] != sum(sizes):
        raise ValueError(
            f"unflatten_state: s has shape {tuple(s.shape)} but the carry holds {sum(sizes)} numbers "
            f"(needs (*batch, {sum(sizes)}))."
        )
    batch = tuple(s.shape[:-1])
    out, start = [], 0
    for a, n in zip(leaves, sizes):
        out.append(
            jnp.reshape(s[..., start : start + n], batch + tuple(np.shape(a))).astype(jnp.result_type(a))
        )
        start += n
    return jax.tree_util.tree_unflatten(treedef, out)


def state_size(cell: Cell, params: Any) -> int:
    """``S``, the length of the flattened state of ``cell`` with ``params`` (``2H`` for the LSTM)."""
    like = jax.eval_shape(lambda p: cell.initial_carry(p, ()), params)
    return int(sum(int(np.prod(a.shape, dtype=int)) for a in jax.tree_util.tree_leaves(like)))


def _like(cell: Cell, params: Any) -> Any:
    return jax.eval_shape(lambda p: cell.initial_carry(p, ()), params)


def _flat_step(cell: Cell, params: Any, like: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``F(s, x) -> s'`` on unbatched flat states."""

    def f(s, x):
        carry, _ = cell.step(params, unflatten_state(s, like), x)
        return flatten_state(carry).astype(s.dtype)

    return f


# ------------------------------------------------------------------ Jacobians: capability or autodiff


def _jacobian_fn(cell: Cell, params: Any, method: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``(s, x) -> J`` on unbatched flat states: the cell's ``jacobian`` capability (``"auto"``,
    ``"analytic"``) or ``jax.jacfwd`` of the flattened step (``"autodiff"``, or ``"auto"``
    for a cell without one)."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    like = _like(cell, params)
    if method in ("auto", "analytic"):
        if cell.jacobian is not None:

            def jac(s, x):
                return cell.jacobian(params, unflatten_state(s, like), x).astype(s.dtype)

            return jac
        if method == "analytic":
            name = cell.label
            raise ValueError(
                f"method='analytic': {name} has no jacobian capability (cell.jacobian is None); "
                "use method='autodiff' or 'auto', or give the cell one: "
                "Cell(..., jacobian=lambda params, carry, x: J)."
            )
    return jax.jacfwd(_flat_step(cell, params, like), argnums=0)


def _check_single(cell, params, carry, x_t, name="carry"):
    like = _like(cell, params)
    got = jax.tree_util.tree_structure(carry)
    if got != jax.tree_util.tree_structure(like):
        raise ValueError(
            f"{name} has the tree {got} but the cell's carry is {jax.tree_util.tree_structure(like)}."
        )
    for a, b in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(like)):
        if tuple(np.shape(a)) != tuple(b.shape):
            want = [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(like)]
            raise ValueError(
                f"{name} must be one unbatched carry (leaf shapes {want}), "
                f"got a leaf of shape {tuple(np.shape(a))}; vmap over the batch instead."
            )
    x_t = jnp.asarray(x_t)
    if x_t.ndim != 1:
        raise ValueError(f"x_t must be one input vector (I,), got shape {tuple(x_t.shape)}.")
    return x_t


def step_jacobian(cell: Cell, params: Any, carry: Any, x_t: jax.Array, *, method: str = "auto") -> jax.Array:
    r"""One step Jacobian ``J = ds_t/ds_{t-1}`` at ``(carry, x_t)``.

    ``J[i, j] = d s_t[i] / d s_{t-1}[j]`` with ``s = flatten_state(carry)``. For the Elman
    RNN ``J = diag(f'(net)) W_h^T`` (row-vector cells: ``net = x W_x + h W_h + b``).

    Args:
      cell: any ``Cell``.
      params: its params.
      carry: one *unbatched* carry (leaves without batch axes).
      x_t: one input ``(I,)``.
      method: ``"auto"`` (the cell's ``jacobian`` capability when it has one, autodiff
        otherwise), ``"analytic"`` (the capability, or an error) or ``"autodiff"``
        (``jax.jacfwd`` of the flattened step).

    Returns:
      ``J: (S, S)``.
    """
    x_t = _check_single(cell, params, carry, x_t)
    params, x_t, carry, _ = promote(params, x_t, carry)
    s = flatten_state(carry)
    return _jacobian_fn(cell, params, method)(s, x_t)


def input_jacobian(cell: Cell, params: Any, carry: Any, x_t: jax.Array) -> jax.Array:
    """Input Jacobian ``B = ds_t/dx_t: (S, I)`` at one unbatched ``(carry, x_t)`` (autodiff)."""
    x_t = _check_single(cell, params, carry, x_t)
    params, x_t, carry, _ = promote(params, x_t, carry)
    f = _flat_step(cell, params, _like(cell, params))
    return jax.jacfwd(f, argnums=1)(flatten_state(carry), x_t)


class StepJacobians(NamedTuple):
    """Step Jacobians along trajectories (all batch-major).

    Attributes:
      jacobians: ``(*batch, T, S, S)``, ``J_t = ds_t/ds_{t-1}`` for ``t = 1..T``.
      input_jacobians: ``(*batch, T, S, I)``, ``ds_t/dx_t``; ``None`` unless asked for.
      states: ``(*batch, T, S)``, ``s_t`` after each step.
      prev_states: ``(*batch, T, S)``, ``s_{t-1}`` before each step (``s_0`` first).
    """

    jacobians: jax.Array
    input_jacobians: jax.Array | None
    states: jax.Array
    prev_states: jax.Array


def _batch_major(xs, time_axis):
    xs = jnp.asarray(xs)
    if xs.ndim < 2:
        raise ValueError(
            f"xs has shape {tuple(xs.shape)} but needs at least 2 dims: (*batch, T, I) (time_axis=-2)."
        )
    ta = time_axis + xs.ndim if time_axis < 0 else time_axis
    if not 0 <= ta < xs.ndim - 1:
        raise ValueError(f"time_axis={time_axis} is not a valid time axis for xs of shape {tuple(xs.shape)}.")
    return jnp.moveaxis(xs, ta, -2)


def _trajectory(cell, params, xs_bm, carry):
    """Run ``unroll``; return ``(prev_states, states)`` both ``(*batch, T, S)``."""
    batch_shape = tuple(xs_bm.shape[:-2])
    c0 = cell.initial_carry(params, batch_shape) if carry is None else carry
    _, _, aux = unroll(cell, params, xs_bm, carry=c0, return_carries=True)
    nb = len(batch_shape)
    states = flatten_state(aux.carries, batch_ndim=nb + 1)
    s0 = flatten_state(c0, batch_ndim=nb).astype(states.dtype)
    prev = jnp.concatenate([s0[..., None, :], states[..., :-1, :]], axis=-2)
    return prev, states


def _vmap_lead(fn, nlead):
    for _ in range(nlead):
        fn = jax.vmap(fn)
    return fn


def step_jacobians(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    *,
    carry: Any = None,
    time_axis: int = -2,
    method: str = "auto",
    inputs: bool = False,
) -> StepJacobians:
    r"""Step Jacobians ``J_t = ds_t/ds_{t-1}`` (and optionally ``ds_t/dx_t``) along trajectories.

    The trajectory ``s_0, ..., s_T`` comes from one ``seqjax.unroll`` (``return_carries``);
    the ``T`` Jacobians are then evaluated at ``(s_{t-1}, x_t)`` in parallel (``vmap``).

    Args:
      cell: any ``Cell`` (a user's cell goes through autodiff of its flattened step).
      params: its params.
      xs: inputs ``(*batch, T, I)`` (or time at ``time_axis``).
      carry: initial carry, leaves ``(*batch, ...)``; default ``cell.initial_carry``.
      time_axis: time axis of ``xs``; results are batch-major regardless.
      method: ``"auto"``, ``"analytic"`` or ``"autodiff"`` (see ``step_jacobian``).
      inputs: also compute the input Jacobians ``(*batch, T, S, I)``.

    Returns:
      ``StepJacobians(jacobians, input_jacobians, states, prev_states)``. Memory is
      ``T * S**2`` per sequence: for large ``S`` use ``lyapunov_spectrum(matrix_free=True)``
      or ``top_singular_values`` instead.

    Example::

      cell = seqjax.lstm(16); params = cell.init(key, 4)
      J = step_jacobians(cell, params, xs).jacobians   # xs (B, T, 4) -> (B, T, 32, 32)
    """
    xs_bm = _batch_major(xs, time_axis)
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    params, xs_bm, carry, _ = promote(params, xs_bm, carry)
    nlead = xs_bm.ndim - 1

    def core(params, xs_bm, carry):
        prev, states = _trajectory(cell, params, xs_bm, carry)
        jac = _jacobian_fn(cell, params, method)
        J = _vmap_lead(jac, nlead)(prev, xs_bm)
        Jx = None
        if inputs:
            f = _flat_step(cell, params, _like(cell, params))
            Jx = _vmap_lead(jax.jacfwd(f, argnums=1), nlead)(prev, xs_bm)
        return StepJacobians(J, Jx, states, prev)

    if method == "analytic":
        _jacobian_fn(cell, params, method)  # raise outside jit when there is no closed form
    return jax.jit(core)(params, xs_bm, carry)


# --------------------------------------------------------------------------- eigen/singular spectra


def _complex_dtype(dtype):
    return jnp.result_type(dtype, jnp.complex64)


def _use_host(host):
    return jax.default_backend() == "tpu" if host is None else bool(host)


def eigvals(a: jax.Array, *, host: bool | None = None) -> jax.Array:
    """Eigenvalues of square matrices ``a: (..., n, n)`` -> complex ``(..., n)``.

    ``jnp.linalg.eigvals`` on CPU and GPU. JAX has no general eigendecomposition on TPU:
    there (or with ``host=True``) it runs NumPy's on the host through
    ``jax.pure_callback`` (works under ``jit`` and ``vmap``; not differentiable).

    Args:
      a: ``(..., n, n)``.
      host: ``None`` (host only on TPU), ``True`` or ``False``.
    """
    a = jnp.asarray(a)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"eigvals: a must be square matrices (..., n, n), got shape {tuple(a.shape)}.")
    if not _use_host(host):
        return jnp.linalg.eigvals(a)
    cd = _complex_dtype(a.dtype)
    out = jax.ShapeDtypeStruct(a.shape[:-1], cd)
    return jax.pure_callback(
        lambda m: np.linalg.eigvals(np.asarray(m)).astype(cd), out, a, vmap_method="broadcast_all"
    )


def eig(a: jax.Array, *, host: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Eigenvalues with right and left eigenvectors of ``a: (..., n, n)``.

    ``a v_i = w_i v_i`` and ``u_i^H a = w_i u_i^H``. Right eigenvectors have unit norm; left
    ones are the rows of ``V^{-1}`` (conjugated), so ``U^H V = I``: ``u_i^H \delta s`` is the
    coordinate of a perturbation along mode ``i`` (the biorthogonal normalisation of linear
    stability analysis).

    Args:
      a: ``(..., n, n)``.
      host: as in ``eigvals`` (host NumPy on TPU).

    Returns:
      ``(w: (..., n), v_right: (..., n, n), u_left: (..., n, n))``, eigenvectors in columns.
    """
    a = jnp.asarray(a)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"eig: a must be square matrices (..., n, n), got shape {tuple(a.shape)}.")
    if _use_host(host):
        cd = _complex_dtype(a.dtype)

        def cb(m):
            w, v = np.linalg.eig(np.asarray(m))
            return w.astype(cd), v.astype(cd)

        w, v = jax.pure_callback(
            cb,
            (jax.ShapeDtypeStruct(a.shape[:-1], cd), jax.ShapeDtypeStruct(a.shape, cd)),
            a,
            vmap_method="broadcast_all",
        )
    else:
        w, v = jnp.linalg.eig(a)
    u = jnp.conj(jnp.swapaxes(jnp.linalg.inv(v), -1, -2))
    return w, v, u


def step_spectra(jacobians: jax.Array, *, host: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues and singular values of each step Jacobian.

    Args:
      jacobians: ``(..., S, S)`` (e.g. ``step_jacobians(...).jacobians``).
      host: where to run the eigendecomposition (see ``eigvals``).

    Returns:
      ``(eigenvalues: complex (..., S) sorted by decreasing modulus,
      singular_values: (..., S) decreasing)``.
    """
    w = eigvals(jacobians, host=host)
    order = jnp.argsort(-jnp.abs(w), axis=-1)
    w = jnp.take_along_axis(w, order, axis=-1)
    sv = jnp.linalg.svd(jacobians, compute_uv=False)
    return w, sv


def spectral_radii(jacobians: jax.Array, *, host: bool | None = None) -> jax.Array:
    """Spectral radius ``max_i |eig_i(J_t)|`` of each Jacobian: ``(..., S, S) -> (...)``."""
    return jnp.max(jnp.abs(eigvals(jacobians, host=host)), axis=-1)


# --------------------------------------------------------------------------- stable products


def _safe_normalise(m, n):
    """``m / n`` with ``n == 0`` mapped to ``m`` (zero stays zero: no NaN)."""
    n_safe = jnp.where(n > 0, n, jnp.ones_like(n))
    return m / n_safe


def lag_log_norms(
    jacobians: jax.Array, *, ord: str | int = 2, cotangent: jax.Array | None = None
) -> jax.Array:
    r"""``log ||ds_T/ds_{T-L}||`` for every lag ``L = 1..T``: the vanishing/exploding curve.

    ``ds_T/ds_{T-L} = J_T J_{T-1} ... J_{T-L+1}``, accumulated backwards from ``T`` with the
    running product renormalised at every step and its log scale kept apart, so the result
    is finite (or ``-inf`` for an exactly zero product) however long the sequence: no
    overflow or underflow. With ``cotangent=v`` it returns ``log ||v^T ds_T/ds_{T-L}||``
    instead: the norm of the backpropagated error ``dE/ds_{T-L}`` for ``dE/ds_T = v``
    (Pascanu et al. 2013, eq. 5).

    Args:
      jacobians: ``(*batch, T, S, S)`` in time order ``J_1..J_T``.
      ord: ``2`` (spectral norm, default) or ``"fro"``; ignored with ``cotangent``.
      cotangent: optional ``(*batch, S)`` or ``(S,)``.

    Returns:
      ``(*batch, T)``: entry ``L - 1`` is the log norm at lag ``L`` (natural log).
    """
    J = jnp.asarray(jacobians)
    if J.ndim < 3 or J.shape[-1] != J.shape[-2]:
        raise ValueError(f"jacobians must be (*batch, T, S, S), got shape {tuple(J.shape)}.")
    if ord not in (2, "fro"):
        raise ValueError(f"ord must be 2 or 'fro', got {ord!r}.")
    S = J.shape[-1]
    batch = J.shape[:-3]

    if cotangent is not None:
        v = jnp.asarray(cotangent, J.dtype)
        if v.shape not in ((S,), tuple(batch) + (S,)):
            raise ValueError(
                f"cotangent has shape {tuple(v.shape)} but needs ({S},) or {tuple(batch) + (S,)}."
            )
        v = jnp.broadcast_to(v.reshape((1,) * (len(batch) - v.ndim + 1) + v.shape), tuple(batch) + (S,))

        def single_v(Js, v0):
            n0 = jnp.linalg.norm(v0)
            g0 = _safe_normalise(v0, n0)

            def body(carry, Jt):
                g, ls = carry
                g = g @ Jt
                n = jnp.linalg.norm(g)
                ls = ls + jnp.log(n)
                return (_safe_normalise(g, n), ls), ls

            _, out = jax.lax.scan(body, (g0, jnp.log(n0)), Js, reverse=True)
            return out[::-1]

        return jax.jit(_vmap_lead(single_v, len(batch)))(J, v)

    def single(Js):
        def body(carry, Jt):
            G, ls = carry
            G = G @ Jt
            n = jnp.linalg.norm(G, ord=2) if ord == 2 else jnp.linalg.norm(G)
            ls = ls + jnp.log(n)
            return (_safe_normalise(G, n), ls), ls

        init = (jnp.eye(S, dtype=Js.dtype), jnp.zeros((), Js.dtype))
        _, out = jax.lax.scan(body, init, Js, reverse=True)
        return out[::-1]

    return jax.jit(_vmap_lead(single, len(batch)))(J)


def _random_frame(key, S, k, dtype):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (S, k), dtype=jnp.float32).astype(dtype))
    return q


def product_singular_values(
    jacobians: jax.Array, *, k: int | None = None, sweeps: int = 3, key: jax.Array | None = None
) -> jax.Array:
    r"""Log singular values of the product ``M = J_T ... J_1``, without forming it.

    Orthogonal (subspace) iteration on ``M^T M`` with the product kept in factored form:
    each forward pass computes ``Q_t R_t = J_t Q_{t-1}`` and each backward pass
    ``Q_t R_t = J_t^T Q_{t-1}`` (every factor a QR, so nothing overflows). After ``sweeps``
    forward/backward passes the frame holds the top-``k`` right singular vectors; a final
    forward pass gives ``log sigma_i(M) = sum_t log |R_t[i, i]|``. Convergence per sweep is
    geometric in ``(sigma_{i+1}/sigma_i)^2``, so long products (whose singular values
    separate exponentially) converge in one or two sweeps; nearly degenerate ones need more.

    Args:
      jacobians: ``(*batch, T, S, S)``, ``J_1..J_T`` (slice a window to get its product).
      k: how many leading singular values (default ``S``).
      sweeps: forward/backward passes before the final one.
      key: PRNG key of the random initial frame (default ``jax.random.key(0)``).

    Returns:
      ``(*batch, k)`` natural logs, decreasing (``-inf`` for exact zeros).
    """
    J = jnp.asarray(jacobians)
    if J.ndim < 3 or J.shape[-1] != J.shape[-2]:
        raise ValueError(f"jacobians must be (*batch, T, S, S), got shape {tuple(J.shape)}.")
    S = J.shape[-1]
    k = S if k is None else int(k)
    if not 1 <= k <= S:
        raise ValueError(f"k must lie in [1, S={S}], got {k}.")
    Q0 = _random_frame(jax.random.key(0) if key is None else key, S, k, J.dtype)

    def single(Js):
        def fwd(Q, Jt):
            Q, R = jnp.linalg.qr(Jt @ Q)
            return Q, jnp.log(jnp.abs(jnp.diagonal(R)))

        def bwd(Q, Jt):
            Q, _ = jnp.linalg.qr(Jt.T @ Q)
            return Q, None

        def sweep(_, Q):
            Q, _ = jax.lax.scan(fwd, Q, Js)
            return jax.lax.scan(bwd, Q, Js, reverse=True)[0]

        Q = jax.lax.fori_loop(0, sweeps, sweep, Q0)
        _, logs = jax.lax.scan(fwd, Q, Js)
        return jnp.sort(jnp.sum(logs, axis=0))[::-1]

    return jax.jit(_vmap_lead(single, J.ndim - 3))(J)


def product_eigenvalues(jacobians: jax.Array, *, host: bool | None = None) -> tuple[jax.Array, jax.Array]:
    r"""Eigenvalues of ``M = J_T ... J_1`` as ``(log|lambda|, angle)``, sorted by modulus.

    The product is accumulated with its norm divided out at every step (log scale kept
    apart), so it never overflows; eigenvalues smaller than about ``eps * ||M||`` are
    rounding noise of that representation (``log|lambda|`` may be ``-inf`` for exact zeros).

    Args:
      jacobians: ``(*batch, T, S, S)``.
      host: where to run the eigendecomposition (see ``eigvals``).

    Returns:
      ``(log_modulus: (*batch, S), angle: (*batch, S))`` in radians.
    """
    J = jnp.asarray(jacobians)
    if J.ndim < 3 or J.shape[-1] != J.shape[-2]:
        raise ValueError(f"jacobians must be (*batch, T, S, S), got shape {tuple(J.shape)}.")
    S = J.shape[-1]

    def single(Js):
        def body(carry, Jt):
            P, ls = carry
            P = Jt @ P
            n = jnp.linalg.norm(P)
            return (_safe_normalise(P, n), ls + jnp.log(n)), None

        (P, ls), _ = jax.lax.scan(body, (jnp.eye(S, dtype=Js.dtype), jnp.zeros((), Js.dtype)), Js)
        return P, ls

    P, ls = jax.jit(_vmap_lead(single, J.ndim - 3))(J)
    w = eigvals(P, host=host)
    logm = jnp.log(jnp.abs(w)) + ls[..., None]
    order = jnp.argsort(-logm, axis=-1)
    return jnp.take_along_axis(logm, order, axis=-1), jnp.take_along_axis(jnp.angle(w), order, axis=-1)


# --------------------------------------------------------------------------- Lyapunov spectrum


@dataclasses.dataclass(frozen=True)
class LyapunovSpectrum:
    """Lyapunov exponents with block-means error bars.

    Attributes:
      exponents: ``(*batch, k)``, per step (natural log), decreasing; ``-inf`` where the
        product is (numerically) rank-deficient, never NaN.
      stderr: ``(*batch, k)``, standard error from the spread of the per-window
        exponents (batch means: ``std(ddof=1)/sqrt(num_windows)``); ``0`` where the
        exponent is ``-inf``; ``inf`` with a single window.
      finite_time: ``(*batch, num_windows, k)``, the finite-time (local) exponents of each
        window, columns in the order of ``exponents``.
      window: steps per window.
      steps: steps averaged over (``num_windows * window``).
    """

    exponents: jax.Array
    stderr: jax.Array
    finite_time: jax.Array
    window: int
    steps: int

    @property
    def max(self) -> jax.Array:
        """The largest exponent ``(*batch,)``."""
        return self.exponents[..., 0]

    def __str__(self) -> str:
        e = np.asarray(self.exponents)
        s = np.asarray(self.stderr)
        flat_e, flat_s = e.reshape(-1, e.shape[-1]), s.reshape(-1, s.shape[-1])
        lines = [f"Lyapunov spectrum ({self.steps} steps, windows of {self.window}); per step, natural log"]
        for b, (ee, ss) in enumerate(zip(flat_e, flat_s)):
            head = f"  seq {b}: " if flat_e.shape[0] > 1 else "  "
            lines.append(head + ", ".join(f"{x:+.4f}±{y:.1e}" for x, y in zip(ee[:8], ss[:8])))
            if ee.shape[0] > 8:
                lines[-1] += f", ... ({ee.shape[0]} exponents)"
        return "\n".join(lines)

    def plot(self, *, ax=None, **kwargs):
        """Plot the spectrum with error bars (``seqjax.plot.plot_lyapunov_spectrum``)."""
        from seqjax import plot

        return plot.plot_lyapunov_spectrum(self, ax=ax, **kwargs)


def _qr_logs(A, rank_tol):
    Q, R = jnp.linalg.qr(A)
    d = jnp.abs(jnp.diagonal(R))
    scale = jnp.max(jnp.linalg.norm(A, axis=0))
    d = jnp.where(d <= rank_tol * scale, jnp.zeros_like(d), d)
    return Q, jnp.log(d)


def _benettin(apply, ops, Q0, *, frame_warmup, r, window, rank_tol):
    """QR iteration over operands ``ops`` (pytree, leading axis time).

    Returns per-window sums of logs ``(num_windows, k)``.
    """

    def one(Q, op):
        return _qr_logs(apply(Q, op), rank_tol)[0], None

    tree = jax.tree_util.tree_map
    if frame_warmup:
        Q0, _ = jax.lax.scan(one, Q0, tree(lambda a: a[:frame_warmup], ops))
    T = jax.tree_util.tree_leaves(ops)[0].shape[0] - frame_warmup
    nw = T // window
    used = nw * window
    blocks = tree(
        lambda a: a[frame_warmup : frame_warmup + used].reshape((nw, window // r, r) + a.shape[1:]), ops
    )

    def group(Q, ops_g):
        def inner(A, op):
            return apply(A, op), None

        A, _ = jax.lax.scan(inner, Q, ops_g)
        return _qr_logs(A, rank_tol)

    def block(Q, ops_b):
        Q, logs = jax.lax.scan(group, Q, ops_b)
        return Q, jnp.sum(logs, axis=0)

    _, sums = jax.lax.scan(block, Q0, blocks)
    return sums


def _summarise(sums, window):
    """``sums: (*batch, nw, k)`` -> LyapunovSpectrum fields (sorted)."""
    nw = sums.shape[-2]
    ft = sums / window
    expo = jnp.sum(sums, axis=-2) / (nw * window)
    order = jnp.argsort(-expo, axis=-1)
    expo = jnp.take_along_axis(expo, order, axis=-1)
    ft = jnp.take_along_axis(ft, order[..., None, :], axis=-1)
    finite = jnp.isfinite(expo)
    if nw > 1:
        ft_safe = jnp.where(finite[..., None, :], ft, jnp.zeros_like(ft))
        err = jnp.std(ft_safe, axis=-2, ddof=1) / math.sqrt(nw)
        err = jnp.where(finite, err, jnp.zeros_like(err))
    else:
        err = jnp.where(finite, jnp.full_like(expo, jnp.inf), jnp.zeros_like(expo))
    return expo, err, ft


def _check_lyap_args(T, k, S, warmup, frame_warmup, reortho_every, window):
    if not isinstance(reortho_every, (int, np.integer)) or reortho_every < 1:
        raise ValueError(f"reortho_every must be a positive integer, got {reortho_every!r}.")
    if warmup < 0 or frame_warmup < 0:
        raise ValueError(f"warmup and frame_warmup must be >= 0, got {warmup} and {frame_warmup}.")
    k = S if k is None else int(k)
    if not 1 <= k <= S:
        raise ValueError(f"k must lie in [1, S={S}] (S is the flattened state size), got {k}.")
    avail = T - warmup - frame_warmup
    if avail < reortho_every:
        raise ValueError(
            f"the sequence has T={T} steps but warmup={warmup} + frame_warmup={frame_warmup} leave {avail}, "
            f"fewer than reortho_every={reortho_every}; pass a longer xs."
        )
    if window is None:
        window = max(reortho_every, (avail // 10) // reortho_every * reortho_every)
    window = int(window)
    if window < 1 or window % reortho_every or window > avail:
        raise ValueError(
            f"window must be a positive multiple of reortho_every={reortho_every} and at most the {avail} "
            f"measured steps, got {window}."
        )
    return k, window


def _initial_frame(key, frame, S, k, dtype):
    if frame is None:
        return _random_frame(jax.random.key(0) if key is None else key, S, k, dtype)
    frame = jnp.asarray(frame, dtype)
    if frame.shape != (S, k):
        raise ValueError(f"frame has shape {tuple(frame.shape)} but needs (S, k) = ({S}, {k}).")
    return frame


def _default_tol(dtype, S):
    return float(S * np.finfo(np.dtype(dtype)).eps)


def lyapunov_from_jacobians(
    jacobians: jax.Array,
    *,
    k: int | None = None,
    frame_warmup: int = 0,
    reortho_every: int = 1,
    window: int | None = None,
    rank_tol: float | None = None,
    key: jax.Array | None = None,
    frame: jax.Array | None = None,
) -> LyapunovSpectrum:
    r"""Lyapunov spectrum of a given sequence of Jacobians by the QR (Benettin) method.

    See ``lyapunov_spectrum`` for the method; this variant takes the Jacobians
    ``(*batch, T, S, S)`` directly (e.g. from ``step_jacobians`` or any linear
    time-varying system ``s_t = J_t s_{t-1}``). Arguments as there; ``jacobians``:
    ``(*batch, T, S, S)`` in time order.

    Returns:
      ``LyapunovSpectrum``.
    """
    J = jnp.asarray(jacobians)
    if J.ndim < 3 or J.shape[-1] != J.shape[-2]:
        raise ValueError(f"jacobians must be (*batch, T, S, S), got shape {tuple(J.shape)}.")
    T, S = J.shape[-3], J.shape[-1]
    if frame is not None and k is None:
        k = int(np.shape(frame)[-1])
    k, window = _check_lyap_args(T, k, S, 0, frame_warmup, reortho_every, window)
    tol = _default_tol(J.dtype, S) if rank_tol is None else float(rank_tol)
    Q0 = _initial_frame(key, frame, S, k, J.dtype)

    def single(Js):
        return _benettin(
            lambda Q, Jt: Jt @ Q,
            Js,
            Q0,
            frame_warmup=frame_warmup,
            r=reortho_every,
            window=window,
            rank_tol=tol,
        )

    e, err, ft = jax.jit(lambda J: _summarise(_vmap_lead(single, J.ndim - 3)(J), window))(J)
    return LyapunovSpectrum(e, err, ft, window, ft.shape[-2] * window)


def lyapunov_spectrum(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    *,
    carry: Any = None,
    k: int | None = None,
    warmup: int = 0,
    frame_warmup: int = 0,
    reortho_every: int = 1,
    window: int | None = None,
    matrix_free: bool = False,
    method: str = "auto",
    rank_tol: float | None = None,
    key: jax.Array | None = None,
    frame: jax.Array | None = None,
    time_axis: int = -2,
) -> LyapunovSpectrum:
    r"""Lyapunov exponents of a cell driven by inputs ``xs``, by the QR (Benettin) method.

    With ``Q_0`` a random orthonormal ``S x k`` frame, iterate
    ``Q_t R_t = J_t Q_{t-1}`` (QR every ``r = reortho_every`` steps; in between
    ``Q <- J_t Q``) and average the logs of the diagonal of ``R``::

        lambda_i = (1/N) sum_t log |R_t[i, i]|          (per step, natural log)

    The exponents measure the asymptotic growth of ``ds_T/ds_k`` along nested subspaces:
    ``lambda_1`` is the rate at which the largest gradient component grows (> 0: exploding,
    chaotic) or decays (< 0: vanishing); ``sum_i lambda_i`` is the mean of
    ``log|det J_t|`` (volume contraction).

    Procedure: ``unroll`` the cell over ``xs`` for the trajectory; drop the first ``warmup``
    steps (state warm-up: forget the initial condition); evolve the frame for
    ``frame_warmup`` more steps without recording (it aligns with the Lyapunov vectors); then
    record per-window log sums over windows of ``window`` steps. The windows give the
    finite-time exponents and the standard error. Trailing steps that do not fill a window
    are dropped.

    Rank deficiency: a diagonal entry with ``|R_ii| <= rank_tol * max_j ||A[:, j]||`` (``A`` the
    matrix being factorised) counts as an exact zero, as ``numpy.linalg.matrix_rank`` decides
    numerical rank; its log is ``-inf`` and so is the exponent (never NaN). Default
    ``rank_tol = S * eps(dtype)``; ``rank_tol=0`` keeps the raw values.

    Dense or matrix-free: by default ``J_t`` is formed (the cell's ``jacobian`` capability,
    else ``jax.jacfwd``) and multiplied into the frame. With ``matrix_free=True`` the frame is
    pushed through ``jax.linearize`` of the step (``k`` JVPs per step) and no ``S x S`` matrix
    exists: memory ``O(T S + S k)`` and time ``O(T k * cost(step) + T S k^2)``, usable at
    ``H = 4096`` for modest ``k``.

    Args:
      cell: any ``Cell``.
      params: its params.
      xs: ``(*batch, T, I)`` (or time at ``time_axis``); one spectrum per sequence.
      carry: initial carry ``(*batch, ...)``; default ``cell.initial_carry``.
      k: number of exponents (default all ``S``).
      warmup: steps of the trajectory discarded before the frame starts.
      frame_warmup: steps the frame evolves before logs are recorded.
      reortho_every: ``r``, steps between QR re-orthonormalisations.
      window: steps per finite-time window (a multiple of ``r``); default about a tenth of
        the measured steps.
      matrix_free: push the frame through JVPs instead of dense Jacobians.
      method: Jacobian method for the dense path (see ``step_jacobian``).
      rank_tol: relative threshold below which a ``|R_ii|`` is an exact zero.
      key: PRNG key of the random initial frame (default ``jax.random.key(0)``).
      frame: an explicit orthonormal initial frame ``(S, k)`` instead (e.g. the identity,
        which makes a diagonal system's exponents exact at every step).
      time_axis: time axis of ``xs``.

    Returns:
      ``LyapunovSpectrum(exponents (*batch, k), stderr, finite_time (*batch, nw, k), window, steps)``.

    Example::

      cell = seqjax.rnn(64); params = cell.init(key, 1)
      spec = lyapunov_spectrum(cell, params, xs, warmup=100, frame_warmup=100)
      print(spec)            # exponents with error bars

    References: Benettin et al. (1980); Eckmann & Ruelle (1985); Engelken, Wolf & Abbott (2020).
    """
    xs_bm = _batch_major(xs, time_axis)
    params, xs_bm, carry, _ = promote(params, xs_bm, carry)
    T = xs_bm.shape[-2]
    S = state_size(cell, params)
    if frame is not None and k is None:
        k = int(np.shape(frame)[-1])
    k, window = _check_lyap_args(T, k, S, warmup, frame_warmup, reortho_every, window)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(_like(cell, params)))
    tol = _default_tol(dtype, S) if rank_tol is None else float(rank_tol)
    Q0 = _initial_frame(key, frame, S, k, dtype)
    if method == "analytic" and not matrix_free:
        _jacobian_fn(cell, params, method)  # raise outside jit when there is no closed form
    elif method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")

    def core(params, xs_bm, carry, Q0):
        prev, _ = _trajectory(cell, params, xs_bm, carry)
        xs_w = xs_bm[..., warmup:, :]
        prev_w = prev[..., warmup:, :]
        if matrix_free:
            f = _flat_step(cell, params, _like(cell, params))

            def apply(Q, op):
                s, x = op
                _, lin = jax.linearize(lambda v: f(v, x), s)
                return jax.vmap(lin, in_axes=1, out_axes=1)(Q)

        else:
            jac = _jacobian_fn(cell, params, method)

            def apply(Q, op):
                s, x = op
                return jac(s, x) @ Q

        def single(p, x):
            return _benettin(
                apply, (p, x), Q0, frame_warmup=frame_warmup, r=reortho_every, window=window, rank_tol=tol
            )

        return _summarise(_vmap_lead(single, xs_bm.ndim - 2)(prev_w, xs_w), window)

    e, err, ft = jax.jit(core)(params, xs_bm, carry, Q0)
    return LyapunovSpectrum(e, err, ft, window, ft.shape[-2] * window)


# --------------------------------------------------------------------------- matrix-free spectra of one J


def _single_linear(cell, params, carry, x_t):
    x_t = _check_single(cell, params, carry, x_t)
    params, x_t, carry, _ = promote(params, x_t, carry)
    f = _flat_step(cell, params, _like(cell, params))
    s = flatten_state(carry)
    _, lin = jax.linearize(lambda v: f(v, x_t), s)
    return s, lin


def top_singular_values(
    cell: Cell,
    params: Any,
    carry: Any,
    x_t: jax.Array,
    *,
    k: int = 1,
    iters: int = 50,
    key: jax.Array | None = None,
) -> jax.Array:
    r"""Top-``k`` singular values of ``J = ds_t/ds_{t-1}`` without forming ``J``.

    Subspace iteration on ``J^T J`` with products from ``jax.linearize`` (``J v``) and its
    transpose (``J^T u``, ``jax.linear_transpose``), then a Rayleigh-Ritz step: the singular
    values of ``J V`` for the final orthonormal ``V: (S, k)``. Cost per iteration: ``2k``
    matrix-vector products; memory ``O(S k)``.

    Args:
      cell, params: the cell.
      carry: one unbatched carry; ``x_t``: ``(I,)``.
      k: how many singular values.
      iters: subspace iterations (convergence ~ ``(sigma_{k+1}/sigma_k)^(2 iters)``).
      key: PRNG key of the start frame.

    Returns:
      ``(k,)`` decreasing.
    """
    s, lin = _single_linear(cell, params, carry, x_t)
    S = s.shape[0]
    if not 1 <= k <= S:
        raise ValueError(f"k must lie in [1, S={S}], got {k}.")
    lin_t = jax.linear_transpose(lin, s)
    mv = jax.vmap(lin, in_axes=1, out_axes=1)
    rmv = jax.vmap(lambda u: lin_t(u)[0], in_axes=1, out_axes=1)
    V0 = _random_frame(jax.random.key(0) if key is None else key, S, k, s.dtype)

    def body(_, V):
        return jnp.linalg.qr(rmv(mv(V)))[0]

    V = jax.lax.fori_loop(0, iters, body, V0)
    return jnp.linalg.svd(mv(V), compute_uv=False)


def top_eigenvalues(
    cell: Cell,
    params: Any,
    carry: Any,
    x_t: jax.Array,
    *,
    k: int = 1,
    krylov_dim: int | None = None,
    key: jax.Array | None = None,
    host: bool | None = None,
) -> jax.Array:
    r"""Eigenvalues of largest modulus of ``J = ds_t/ds_{t-1}`` by Arnoldi iteration, matrix-free.

    ``m = krylov_dim`` steps of Arnoldi with full (twice-applied) Gram-Schmidt build
    ``J V_m = V_m H_m + h_{m+1,m} v_{m+1} e_m^T`` from JVPs only; the Ritz values
    (eigenvalues of the small ``m x m`` Hessenberg ``H_m``) of largest modulus approximate
    those of ``J``. With ``m = S`` they are exact (up to rounding); for ``m < S``, well
    separated outer eigenvalues converge first. No restarts: raise ``m`` for accuracy.

    Args:
      cell, params: the cell.
      carry: one unbatched carry; ``x_t``: ``(I,)``.
      k: how many eigenvalues.
      krylov_dim: ``m`` (default ``min(S, max(2k + 20, 40))``).
      key: PRNG key of the start vector.
      host: where the small eigendecomposition runs (see ``eigvals``).

    Returns:
      complex ``(k,)`` sorted by decreasing modulus.
    """
    s, lin = _single_linear(cell, params, carry, x_t)
    S = s.shape[0]
    m = min(S, max(2 * k + 20, 40)) if krylov_dim is None else int(krylov_dim)
    if not 1 <= k <= m <= S:
        raise ValueError(f"need 1 <= k <= krylov_dim <= S={S}, got k={k}, krylov_dim={m}.")
    key = jax.random.key(0) if key is None else key
    v0 = jax.random.normal(key, (S,), jnp.float32).astype(s.dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    V = jnp.zeros((m + 1, S), s.dtype).at[0].set(v0)
    Hm = jnp.zeros((m + 1, m), s.dtype)

    def body(j, carry):
        V, Hm = carry
        w = lin(V[j])
        mask = (jnp.arange(m + 1) <= j).astype(s.dtype)
        h = (V @ w) * mask
        w = w - h @ V
        h2 = (V @ w) * mask  # second Gram-Schmidt pass
        w = w - h2 @ V
        h = h + h2
        beta = jnp.linalg.norm(w)
        h = h.at[j + 1].set(beta)
        V = V.at[j + 1].set(_safe_normalise(w, beta))
        return V, Hm.at[:, j].set(h)

    V, Hm = jax.lax.fori_loop(0, m, body, (V, Hm))
    ritz = eigvals(Hm[:m, :m], host=host)
    order = jnp.argsort(-jnp.abs(ritz))
    return ritz[order[:k]]


# --------------------------------------------------------------------------- gradient-flow report


def _recurrent_bound(cell, params):
    """``(sigma_max, gamma)`` from the cell's ``jacobian_bound`` capability (``None`` when absent)."""
    if cell.jacobian_bound is None:
        return None, None
    return cell.jacobian_bound(params)


@dataclasses.dataclass(frozen=True)
class GradientFlowReport:
    r"""Gradient propagation of a recurrent network in the terms of Pascanu, Mikolov & Bengio (2013).

    For ``h_t = f(x_t W_x + h_{t-1} W_h + b)`` with ``|f'| <= gamma``:
    ``||J_t|| <= ||W_h|| gamma``, so ``sigma_max(W_h) < 1/gamma`` is *sufficient* for
    gradients to vanish (``||ds_T/ds_k|| <= (sigma_max gamma)^(T-k)``) and
    ``sigma_max(W_h) > 1/gamma`` is *necessary* for them to explode.

    Attributes (floats unless noted; logs natural, rates per step):
      cell: the cell's label (``Cell.label``), for display.
      state_size: ``S``.
      steps: ``T``.
      sigma_max: largest singular value of the recurrent matrix (from the cell's
        ``jacobian_bound`` capability; ``None`` for a cell without one, e.g. gated cells,
        whose Jacobians have no bound of this form).
      gamma: bound on ``|f'|`` (1 for tanh/ReLU, 1/4 for sigmoid; the ``gamma`` argument,
        else the capability's; ``None`` if unknown).
      critical: ``1/gamma``.
      step_bound: ``sigma_max * gamma``, the bound on every ``||J_t||``.
      step_norm_max, step_norm_mean: measured ``||J_t||_2`` over steps and sequences.
      lag_log_norms: ``(T,)``, mean over sequences of ``log ||ds_T/ds_{T-L}||``, ``L = 1..T``.
      growth_rate: least-squares slope of ``lag_log_norms`` against ``L``.
      bound_rate: ``log(step_bound)``, the slope the bound allows.
      lyapunov_max: mean over sequences of the largest Lyapunov exponent.
      tol: the tolerance of the memory horizon.
      memory_horizon: first lag with ``||ds_T/ds_{T-L}|| < tol`` (``None`` if not reached).
      horizon_estimate: ``log(tol) / growth_rate`` when the rate is negative, else ``inf``.
      regime: ``"vanishing"``, ``"exploding"`` or ``"marginal"`` (from ``lyapunov_max``
        against ``+-margin``).
    """

    cell: str
    state_size: int
    steps: int
    sigma_max: float | None
    gamma: float | None
    critical: float | None
    step_bound: float | None
    step_norm_max: float
    step_norm_mean: float
    lag_log_norms: np.ndarray
    growth_rate: float
    bound_rate: float | None
    lyapunov_max: float
    tol: float
    memory_horizon: int | None
    horizon_estimate: float
    regime: str

    def __str__(self) -> str:
        def f(v, fmt="{:.4g}"):
            return "n/a" if v is None else fmt.format(v)

        lines = [
            "Gradient flow (Pascanu, Mikolov & Bengio 2013): "
            f"cell={self.cell}, S={self.state_size}, T={self.steps}",
            f"  sigma_max(W_h) = {f(self.sigma_max)}   gamma = {f(self.gamma)}"
            f"   1/gamma = {f(self.critical)}",
        ]
        if self.sigma_max is not None and self.critical is not None:
            if self.sigma_max < self.critical:
                cond = "sigma_max < 1/gamma: gradients provably vanish (sufficient condition)"
            else:
                cond = "sigma_max >= 1/gamma: exploding gradients possible (necessary condition met)"
            lines.append(f"  {cond}")
        lines += [
            f"  per-step bound ||J_t|| <= sigma_max*gamma = {f(self.step_bound)}"
            f"   measured: max {self.step_norm_max:.4g}, mean {self.step_norm_mean:.4g}",
            f"  growth rate of ||ds_T/ds_(T-L)||: measured {self.growth_rate:+.4g}/step, "
            f"bound {f(self.bound_rate, '{:+.4g}')}/step, "
            f"largest Lyapunov exponent {self.lyapunov_max:+.4g}/step",
            f"  memory horizon (||ds_T/ds_(T-L)|| < {self.tol:g}): observed {f(self.memory_horizon, '{}')}, "
            f"estimated {self.horizon_estimate:.4g} steps",
            f"  regime: {self.regime}",
        ]
        return "\n".join(lines)

    def plot(self, *, ax=None, **kwargs):
        """Gradient norm against lag, with the bound (``seqjax.plot.plot_gradient_flow``)."""
        from seqjax import plot

        return plot.plot_gradient_flow(self, ax=ax, **kwargs)


def gradient_flow_report(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    *,
    carry: Any = None,
    gamma: float | None = None,
    tol: float = 1e-3,
    margin: float = 1e-3,
    time_axis: int = -2,
) -> GradientFlowReport:
    r"""One-call report on vanishing/exploding gradients of ``cell`` driven by ``xs``.

    Computes the step Jacobians along the trajectories, the lag curve
    ``log ||ds_T/ds_{T-L}||`` (``lag_log_norms``), its growth rate (least-squares slope), the
    largest Lyapunov exponent (``lyapunov_from_jacobians``, ``k=1``), the per-step bound
    ``||J_t|| <= sigma_max(W_h) gamma`` and the memory horizon. Memory ``O(B T S^2)``: meant
    for small and medium ``S``.

    Args:
      cell: any ``Cell`` (the bound ``||J_t|| <= sigma_max gamma`` needs the cell's
        ``jacobian_bound`` capability, which the Elman cells carry).
      params: its params.
      xs: ``(*batch, T, I)``.
      carry: initial carry.
      gamma: bound on ``|f'|``; default the one the cell's ``jacobian_bound`` gives (for an
        Elman cell with a callable activation, give it here).
      tol: gradient-norm tolerance defining the memory horizon.
      margin: ``|lyapunov_max| <= margin`` is called ``"marginal"``.
      time_axis: time axis of ``xs``.

    Returns:
      ``GradientFlowReport`` (``print`` it; ``.plot()`` it).

    Reference: Pascanu, Mikolov & Bengio, ICML 2013, sections 2-3.
    """
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}.")
    sj = step_jacobians(cell, params, xs, carry=carry, time_axis=time_axis)
    J = sj.jacobians
    T, S = J.shape[-3], J.shape[-1]
    if T < 2:
        raise ValueError(f"gradient_flow_report needs at least 2 time steps in xs, got T={T}.")
    sigma, g_default = _recurrent_bound(cell, params)
    gamma = g_default if gamma is None else float(gamma)
    sigma = None if sigma is None else float(sigma)
    critical = None if gamma in (None, 0) else 1.0 / gamma
    bound = None if (sigma is None or gamma is None) else sigma * gamma
    norms = np.asarray(jnp.linalg.norm(J, ord=2, axis=(-2, -1)))
    lag = np.asarray(lag_log_norms(J)).reshape(-1, T)
    finite = np.all(np.isfinite(lag), axis=0)
    curve = np.where(finite, np.mean(np.where(np.isfinite(lag), lag, 0.0), axis=0), -np.inf)
    L = np.arange(1, T + 1, dtype=np.float64)
    ok = np.isfinite(curve)
    if ok.sum() >= 2:
        rate = float(np.polyfit(L[ok], curve[ok], 1)[0])
    else:
        rate = -np.inf
    lyap = float(np.mean(np.asarray(lyapunov_from_jacobians(J, k=1, window=T).exponents)))
    below = np.nonzero(curve < math.log(tol))[0]
    horizon = int(below[0] + 1) if below.size else None
    est = math.log(tol) / rate if rate < 0 else math.inf
    regime = "marginal" if abs(lyap) <= margin else ("vanishing" if lyap < 0 else "exploding")
    return GradientFlowReport(
        cell=cell.label,
        state_size=S,
        steps=T,
        sigma_max=sigma,
        gamma=gamma,
        critical=critical,
        step_bound=bound,
        step_norm_max=float(norms.max()),
        step_norm_mean=float(norms.mean()),
        lag_log_norms=curve,
        growth_rate=rate,
        bound_rate=None if not bound else math.log(bound),
        lyapunov_max=lyap,
        tol=float(tol),
        memory_horizon=horizon,
        horizon_estimate=est,
        regime=regime,
    )
