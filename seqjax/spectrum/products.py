r"""Products of step Jacobians ``ds_T/ds_k = J_T J_{T-1} ... J_{k+1}`` without forming them.

Every product is accumulated with its scale divided out at each step (normalisation or
QR) and the log scale kept apart, so nothing overflows or underflows however long the
sequence: the lag curve ``log ||ds_T/ds_{T-L}||``, the singular values and the
eigenvalues of ``J_T ... J_1``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from seqjax.spectrum.linalg import eigvals
from seqjax.spectrum.state import _valid_steps, _vmap_lead

__all__ = [
    "lag_log_norms",
    "product_singular_values",
    "product_eigenvalues",
]


def _safe_normalise(m, n):
    """``m / n`` with ``n == 0`` mapped to ``m`` (zero stays zero: no NaN)."""
    n_safe = jnp.where(n > 0, n, jnp.ones_like(n))
    return m / n_safe


@functools.partial(jax.jit, static_argnames=("ord",))
def _lag_core(J, v, valid, *, ord):
    S = J.shape[-1]
    nb = J.ndim - 3
    if valid is not None:  # unread steps hold the carry: their Jacobian is the identity
        J = jnp.where(valid[..., None, None], J, jnp.eye(S, dtype=J.dtype))

    def single_v(Js, v0):
        n0 = jnp.linalg.norm(v0)

        def body(carry, Jt):
            g, ls = carry
            g = g @ Jt
            n = jnp.linalg.norm(g)
            ls = ls + jnp.log(n)
            return (_safe_normalise(g, n), ls), ls

        _, out = jax.lax.scan(body, (_safe_normalise(v0, n0), jnp.log(n0)), Js, reverse=True)
        return jnp.concatenate([jnp.log(n0)[None], out[::-1]])

    def single(Js):
        def body(carry, Jt):
            G, ls = carry
            G = G @ Jt
            n = jnp.linalg.norm(G, ord=2) if ord == 2 else jnp.linalg.norm(G)
            ls = ls + jnp.log(n)
            return (_safe_normalise(G, n), ls), ls

        eye = jnp.eye(S, dtype=Js.dtype)
        n0 = jnp.linalg.norm(eye, ord=2) if ord == 2 else jnp.linalg.norm(eye)
        _, out = jax.lax.scan(body, (eye, jnp.zeros((), Js.dtype)), Js, reverse=True)
        return jnp.concatenate([jnp.log(n0)[None], out[::-1]])

    # raw[..., j]: log-norm of the product of the last j Jacobians (j = 0..T)
    raw = _vmap_lead(single, nb)(J) if v is None else _vmap_lead(single_v, nb)(J, v)
    if valid is None:
        return raw
    T = J.shape[-3]
    t = jnp.arange(T).reshape((1,) * nb + (T,))
    last = jnp.max(jnp.where(valid, t, -1), axis=-1)  # (*batch,) last step read, -1 if none
    trailing = (T - 1 - last)[..., None]  # identity steps after it
    lag = jnp.arange(T + 1).reshape((1,) * nb + (T + 1,))
    idx = trailing + lag
    out = jnp.take_along_axis(raw, jnp.minimum(idx, T), axis=-1)
    return jnp.where(lag <= last[..., None] + 1, out, jnp.nan)


def lag_log_norms(
    jacobians: jax.Array,
    *,
    ord: str | int = 2,
    cotangent: jax.Array | None = None,
    lengths: Any = None,
    mask: Any = None,
) -> jax.Array:
    r"""``log ||ds_{T}/ds_{T-L}||`` for every lag ``L = 0..T``: the vanishing/exploding curve.

    ``ds_T/ds_{T-L} = J_T J_{T-1} ... J_{T-L+1}`` (the identity at ``L = 0``), accumulated
    backwards from ``T`` with the running product renormalised at every step and its log
    scale kept apart, so the result is finite (or ``-inf`` for an exactly zero product)
    however long the sequence: no overflow or underflow. With ``cotangent=v`` it returns
    ``log ||v^T ds_T/ds_{T-L}||`` instead: the norm of the backpropagated error
    ``dE/ds_{T-L}`` for ``dE/ds_T = v`` (Pascanu et al. 2013, eq. 5).

    The lag convention of every seqjax analysis function: **index ``L`` holds lag ``L``,
    lag 0 first**, lag ``L`` being the state ``L`` steps before the sequence's own last
    step (here ``s_{T-L}``; ``L = T`` is the initial state). Natural logs.

    Padded data: with ``lengths`` (or ``mask``) each sequence's lags count back from its
    own last valid step ``T_b``: entry ``L`` is ``log ||ds_{T_b}/ds_{T_b-L}||``, the steps it
    does not read are the identity (the carry holds still there, as in ``unroll``), and lags
    beyond its start (``L > T_b``) are NaN, so ``jnp.nanmean(curve, axis=0)`` averages each
    lag over the sequences that have it.

    Args:
      jacobians: ``(*batch, T, S, S)`` in time order ``J_1..J_T``.
      ord: ``2`` (spectral norm, default) or ``"fro"``; ignored with ``cotangent``.
      cotangent: optional ``(*batch, S)`` or ``(S,)``.
      lengths: ``(*batch,)`` valid steps of each sequence, or ``None``.
      mask: ``(*batch, T)`` bool, the steps each sequence reads, or ``None``.

    Returns:
      ``(*batch, T + 1)``: entry ``L`` is the log norm at lag ``L`` (entry 0: ``log ||I|| = 0``
      for ``ord=2``, ``log ||v||`` with a cotangent).

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> J = jnp.broadcast_to(0.5 * jnp.eye(3), (2, 10, 3, 3))    # (B, T, S, S)
      >>> curve = seqjax.spectrum.lag_log_norms(J)                 # log ||J_T ... J_{T-L+1}||_2
      >>> print(curve.shape)                                       # lags 0..T
      (2, 11)
      >>> bool(jnp.allclose(curve, jnp.arange(11) * jnp.log(0.5), atol=1e-5))
      True
      >>> padded = seqjax.spectrum.lag_log_norms(J, lengths=jnp.array([10, 4]))
      >>> ok = jnp.allclose(padded[1, :5], jnp.arange(5) * jnp.log(0.5), atol=1e-5)  # from its own end
      >>> bool(ok), bool(jnp.all(jnp.isnan(padded[1, 5:])))    # lags past its start: NaN
      (True, True)
    """
    J = jnp.asarray(jacobians)
    if J.ndim < 3 or J.shape[-1] != J.shape[-2]:
        raise ValueError(f"jacobians must be (*batch, T, S, S), got shape {tuple(J.shape)}.")
    if ord not in (2, "fro"):
        raise ValueError(f"ord must be 2 or 'fro', got {ord!r}.")
    S = J.shape[-1]
    batch = J.shape[:-3]
    valid = _valid_steps(lengths, mask, J[..., 0])
    v = None
    if cotangent is not None:
        v = jnp.asarray(cotangent)
        if v.shape not in ((S,), tuple(batch) + (S,)):
            raise ValueError(
                f"cotangent has shape {tuple(v.shape)} but needs ({S},) or {tuple(batch) + (S,)}."
            )
        dtype = jnp.result_type(J.dtype, v.dtype)
        J, v = J.astype(dtype), v.astype(dtype)
        v = jnp.broadcast_to(v.reshape((1,) * (len(batch) - v.ndim + 1) + v.shape), tuple(batch) + (S,))
    return _lag_core(J, v, valid, ord=ord)


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

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> J = jnp.broadcast_to(jnp.diag(jnp.array([2.0, 0.5])), (30, 2, 2))   # J_1 .. J_30
      >>> logs = seqjax.spectrum.product_singular_values(J)                     # log sigma_i(M)
      >>> bool(jnp.allclose(logs, 30 * jnp.log(jnp.array([2.0, 0.5])), rtol=1e-4))
      True
    """
    J = jnp.asarray(jacobians)
    if J.ndim < 3 or J.shape[-1] != J.shape[-2]:
        raise ValueError(f"jacobians must be (*batch, T, S, S), got shape {tuple(J.shape)}.")
    S = J.shape[-1]
    k = S if k is None else int(k)
    if not 1 <= k <= S:
        raise ValueError(f"k must lie in [1, S={S}], got {k}.")
    Q0 = _random_frame(jax.random.key(0) if key is None else key, S, k, J.dtype)
    return _product_sv_core(J, Q0, sweeps=int(sweeps))


@functools.partial(jax.jit, static_argnames=("sweeps",))
def _product_sv_core(J, Q0, *, sweeps):
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

    return _vmap_lead(single, J.ndim - 3)(J)


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
    P, ls = _product_core(J)
    w = eigvals(P, host=host)
    logm = jnp.log(jnp.abs(w)) + ls[..., None]
    order = jnp.argsort(-logm, axis=-1)
    return jnp.take_along_axis(logm, order, axis=-1), jnp.take_along_axis(jnp.angle(w), order, axis=-1)


@jax.jit
def _product_core(J):
    S = J.shape[-1]

    def single(Js):
        def body(carry, Jt):
            P, ls = carry
            P = Jt @ P
            n = jnp.linalg.norm(P)
            return (_safe_normalise(P, n), ls + jnp.log(n)), None

        (P, ls), _ = jax.lax.scan(body, (jnp.eye(S, dtype=Js.dtype), jnp.zeros((), Js.dtype)), Js)
        return P, ls

    return _vmap_lead(single, J.ndim - 3)(J)
