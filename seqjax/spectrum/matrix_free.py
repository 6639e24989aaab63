r"""Spectra of one step Jacobian ``J = ds_t/ds_{t-1}`` without forming it.

Products ``J v`` come from ``jax.linearize`` of the flattened step and ``J^T u`` from its
transpose, so memory is ``O(S k)``: subspace iteration for the top singular values,
Arnoldi iteration for the eigenvalues of largest modulus.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from seqjax._util import promote
from seqjax.cells import Cell
from seqjax.spectrum.jacobians import _check_single
from seqjax.spectrum.linalg import eigvals
from seqjax.spectrum.products import _random_frame, _safe_normalise
from seqjax.spectrum.state import _flat_step, _like, flatten_state, state_size

__all__ = [
    "top_singular_values",
    "top_eigenvalues",
]


def _prepare(cell, params, carry, x_t):
    x_t = _check_single(cell, params, carry, x_t)
    params, x_t, carry, _ = promote(params, x_t, carry)
    return params, carry, x_t


def _single_linear(cell, params, carry, x_t):
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
      cell: the cell.
      params: its params.
      carry: one unbatched carry.
      x_t: the input ``(I,)``.
      k: how many singular values.
      iters: subspace iterations (convergence ~ ``(sigma_{k+1}/sigma_k)^(2 iters)``).
      key: PRNG key of the start frame.

    Returns:
      ``(k,)`` decreasing.
    """
    params, carry, x_t = _prepare(cell, params, carry, x_t)
    S = state_size(cell, params)
    if not 1 <= k <= S:
        raise ValueError(f"k must lie in [1, S={S}], got {k}.")
    key = jax.random.key(0) if key is None else key
    return _top_sv_core(cell, params, carry, x_t, key, k=int(k), iters=int(iters))


@functools.partial(jax.jit, static_argnames=("cell", "k", "iters"))
def _top_sv_core(cell, params, carry, x_t, key, *, k, iters):
    s, lin = _single_linear(cell, params, carry, x_t)
    S = s.shape[0]
    lin_t = jax.linear_transpose(lin, s)
    mv = jax.vmap(lin, in_axes=1, out_axes=1)
    rmv = jax.vmap(lambda u: lin_t(u)[0], in_axes=1, out_axes=1)
    V0 = _random_frame(key, S, k, s.dtype)

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
      cell: the cell.
      params: its params.
      carry: one unbatched carry.
      x_t: the input ``(I,)``.
      k: how many eigenvalues.
      krylov_dim: ``m`` (default ``min(S, max(2k + 20, 40))``).
      key: PRNG key of the start vector.
      host: where the small eigendecomposition runs (see ``eigvals``).

    Returns:
      complex ``(k,)`` sorted by decreasing modulus.
    """
    params, carry, x_t = _prepare(cell, params, carry, x_t)
    S = state_size(cell, params)
    m = min(S, max(2 * k + 20, 40)) if krylov_dim is None else int(krylov_dim)
    if not 1 <= k <= m <= S:
        raise ValueError(f"need 1 <= k <= krylov_dim <= S={S}, got k={k}, krylov_dim={m}.")
    key = jax.random.key(0) if key is None else key
    return _top_eig_core(cell, params, carry, x_t, key, k=int(k), m=m, host=host)


@functools.partial(jax.jit, static_argnames=("cell", "k", "m", "host"))
def _top_eig_core(cell, params, carry, x_t, key, *, k, m, host):
    s, lin = _single_linear(cell, params, carry, x_t)
    S = s.shape[0]
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
