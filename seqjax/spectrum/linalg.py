"""Eigenvalues and singular values of (batches of) square matrices.

General (non-symmetric) eigendecomposition exists in JAX on CPU and GPU only. On TPU,
``eigvals``/``eig`` here (and every function that uses them) compute it on the host
through ``jax.pure_callback`` and NumPy; pass ``host=True`` to force that anywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "eigvals",
    "eig",
    "step_spectra",
    "spectral_radii",
]


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
