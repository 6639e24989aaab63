"""Tests of seqjax.spectrum.clv (covariant Lyapunov vectors, Ginelli's method) against closed forms.

Oracles: the eigenvectors of a constant non-normal map (NumPy ``eig``, sorted by modulus), and
its ``log |eigenvalue|`` as the growth rates; the coordinate axes and the per-step
``log |d_i|`` of a time-varying diagonal system; the angle between the two eigenvectors of a
non-normal 2x2 map; SciPy's ``subspace_angles`` for random subspaces; the covariance
relation ``J_t v_{t-1} = gamma_t v_t`` with ``J_t`` written out in NumPy for a tanh RNN; the
exponents of ``lyapunov_from_jacobians`` from the same frame.
All in float64 (``x64_enabled``).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from helpers import x64_enabled

import seqjax as sj
from seqjax.spectrum import lyapunov_from_jacobians, step_jacobians
from seqjax.spectrum.clv import (
    CovariantLyapunovVectors,
    clv_angles,
    clvs_from_jacobians,
    covariant_lyapunov_vectors,
)

# One shape for the 4x4 systems (one compilation): T steps, transients of W each side.
T, S, W = 130, 4, 50


def _nonnormal(seed, w):
    """A = P diag(w) P^{-1} with a random (non-orthogonal) eigenvector basis P."""
    P = np.random.default_rng(seed).normal(size=(len(w), len(w)))
    return P @ np.diag(w) @ np.linalg.inv(P)


def _abs_cos(v, e):
    """|cos| of the angle between vectors ``v (..., S)`` and ``e (S,)``."""
    return np.abs(v @ e) / (np.linalg.norm(v, axis=-1) * np.linalg.norm(e))


def test_constant_nonnormal_map_clvs_are_its_eigenvectors():
    w = np.array([2.0, -1.0, 0.5, -0.25])  # real, distinct moduli, mixed signs
    with x64_enabled():
        A = np.stack([_nonnormal(0, w), _nonnormal(1, w)])  # a batch of two maps
        assert np.linalg.norm(A[0] @ A[0].T - A[0].T @ A[0]) > 1.0  # non-normal
        J = jnp.asarray(np.broadcast_to(A[:, None], (2, T, S, S)))
        clv = clvs_from_jacobians(J, warmup=W, backward_warmup=W)
        chex.assert_shape(clv.vectors, (2, T - 2 * W, S, S))
        chex.assert_shape(clv.growth, (2, T - 2 * W, S))
        assert clv.first_step == W
        V = np.asarray(clv.vectors)
        for b in range(2):
            lam, E = np.linalg.eig(A[b])  # the independent oracle
            order = np.argsort(-np.abs(lam))
            lam, E = lam[order].real, E[:, order].real
            for i in range(S):
                np.testing.assert_allclose(_abs_cos(V[b, :, :, i], E[:, i]), 1.0, atol=1e-12)
            # each CLV is mapped onto itself, stretched by its eigenvalue's modulus
            np.testing.assert_allclose(
                clv.growth[b], np.broadcast_to(np.log(np.abs(lam)), (T - 2 * W, S)), atol=1e-10
            )
            np.testing.assert_allclose(clv.exponents[b], np.log(np.abs(lam)), atol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(V, axis=-2), 1.0, atol=1e-12)


def _diagonal_system(seed, batch):
    """Time-varying diagonal ``J_t = diag(d_t)``, ``log|d_t,i| = mu_i + U(-0.3, 0.3)``, random signs;
    the exponents are not in coordinate order."""
    rng = np.random.default_rng(seed)
    mu = np.array([-0.5, 0.5, -2.5, -1.5])
    logs = mu + rng.uniform(-0.3, 0.3, size=(batch, T, S))
    d = np.exp(logs) * rng.choice([-1.0, 1.0], size=(batch, T, S))
    J = np.einsum("btk,kl->btkl", d, np.eye(S))
    return J, logs, np.argsort(-mu)


def test_time_varying_diagonal_clvs_are_the_axes_and_growth_is_exact():
    with x64_enabled():
        J, logs, order = _diagonal_system(2, batch=2)
        clv = clvs_from_jacobians(jnp.asarray(J), warmup=W, backward_warmup=W)
        V = np.asarray(clv.vectors)  # (2, T', S, k)
        axes = np.eye(S)[:, order]  # column i: the axis of the i-th largest exponent
        np.testing.assert_allclose(np.abs(V), np.broadcast_to(axes, V.shape), atol=1e-12)
        # growth[u, i] = log |d_{t, order[i]}| at step t = first_step + u, exactly
        steps = slice(clv.first_step, clv.first_step + V.shape[1])
        np.testing.assert_allclose(clv.growth, logs[:, steps][..., order], atol=1e-12)
        # the forward exponents: the time average of log|d| over the steps after warmup
        np.testing.assert_allclose(clv.exponents, logs[:, W:].mean(1)[:, order], atol=1e-12)
        # the key (random frame and start) changes nothing intrinsic
        other = clvs_from_jacobians(jnp.asarray(J), warmup=W, backward_warmup=W, key=jax.random.key(7))
        np.testing.assert_allclose(np.abs(other.vectors), np.abs(V), atol=1e-12)


@jax.jit
def _clvs_and_angles(J):
    """The whole pipeline inside one user jit (static options)."""
    clv = clvs_from_jacobians(J, warmup=40, backward_warmup=40)
    return clv, clv_angles(clv)


@pytest.mark.parametrize("phi", [0.3, 1.2])
def test_angle_of_a_nonnormal_2x2_map_is_the_angle_between_its_eigenvectors(phi):
    with x64_enabled():
        P = np.array([[1.0, np.cos(phi)], [0.0, np.sin(phi)]])  # unit eigenvectors phi apart
        A = P @ np.diag([1.5, -0.6]) @ np.linalg.inv(P)
        # transients of 40 steps: the frame converges like (0.6 / 1.5)^40 ~ 1e-16
        clv, theta = _clvs_and_angles(jnp.asarray(np.broadcast_to(A, (100, 2, 2))))
        chex.assert_shape(theta, (20,))  # m = 1: one positive exponent (log 1.5)
        np.testing.assert_allclose(theta, phi, rtol=1e-12)
        np.testing.assert_allclose(clv_angles(clv, m=1), phi, rtol=1e-12)
        np.testing.assert_allclose(clv_angles(clv.vectors, m=1), phi, rtol=1e-12)
        assert np.all(np.isnan(clv_angles(clv, m=0))) and np.all(np.isnan(clv_angles(clv, m=2)))


def test_angles_match_scipy_subspace_angles_and_are_accurate_when_tiny():
    with x64_enabled():
        V = np.random.default_rng(3).normal(size=(5, 6, 4))  # five frames of k = 4 vectors in S = 6
        for m in (1, 2, 3):
            want = [scipy.linalg.subspace_angles(v[:, :m], v[:, m:]).min() for v in V]
            np.testing.assert_allclose(clv_angles(jnp.asarray(V), m=m), want, rtol=1e-10)
        # m per frame (an integer array, broadcast like the batch); frame 0 a near-tangency at which
        # arccos of the cosine would return 0 (or sqrt(eps)): the arctan2 of sine and cosine keeps it
        eps = 1e-9
        V[0] = 0.0
        V[0, [0, 0, 1, 2, 3], [0, 1, 1, 2, 3]] = [1.0, np.cos(eps), np.sin(eps), 1.0, 1.0]
        ms = np.array([1, 2, 3, 1, 2])
        want = [scipy.linalg.subspace_angles(v[:, :m], v[:, m:]).min() for v, m in zip(V, ms)]
        got = clv_angles(jnp.asarray(V), m=jnp.asarray(ms))
        np.testing.assert_allclose(got[1:], want[1:], rtol=1e-10)
        np.testing.assert_allclose(got[0], eps, rtol=1e-6)


def test_angle_arguments_are_checked():
    V = jnp.ones((3, 4, 2))
    with pytest.raises(ValueError, match="m .* is required"):
        clv_angles(V)
    with pytest.raises(ValueError, match="does not broadcast"):
        clv_angles(V, m=jnp.ones(4, int))
    with pytest.raises(ValueError, match="integer"):
        clv_angles(V, m=1.0)


def _tanh_rnn(H=5, gain=1.6):
    """A tanh RNN with W_h ~ N(0, gain^2 / H) (float64 NumPy params: no init to compile)."""
    rng = np.random.default_rng(0)
    p = {
        "w_x": rng.normal(size=(2, H)),
        "w_h": gain / np.sqrt(H) * rng.normal(size=(H, H)),
        "b": 0.1 * rng.normal(size=H),
    }
    return sj.rnn(H), p


def _numpy_jacobians(p, xs):
    """J_t = diag(1 - h_t^2) W_h^T of the tanh RNN h_t = tanh(x_t W_x + h_{t-1} W_h + b), in NumPy."""
    h = np.zeros(xs.shape[:-2] + (p["w_h"].shape[0],))
    J = []
    for t in range(xs.shape[-2]):
        h = np.tanh(xs[..., t, :] @ p["w_x"] + h @ p["w_h"] + p["b"])
        J.append((1 - h**2)[..., :, None] * p["w_h"].T)
    return np.stack(J, axis=-3)


def test_nonlinear_cell_vectors_are_covariant_with_the_step_jacobians():
    """J_t v_{t-1}^i = gamma_t^i v_t^i with log|gamma_t^i| = growth, J_t written out in NumPy: pins
    the time alignment of vectors and growth with the steps of xs."""
    cell, p = _tanh_rnn()
    xs = 0.5 * np.random.default_rng(1).normal(size=(2, 160, 2))
    with x64_enabled():
        frame = jnp.asarray(np.linalg.qr(np.random.default_rng(4).normal(size=(5, 3)))[0])
        clv = covariant_lyapunov_vectors(cell, p, jnp.asarray(xs), warmup=60, backward_warmup=60, frame=frame)
    assert isinstance(clv, CovariantLyapunovVectors) and clv.first_step == 60
    chex.assert_shape(clv.vectors, (2, 40, 5, 3))
    J = _numpy_jacobians(p, xs)
    V, g = np.asarray(clv.vectors), np.asarray(clv.growth)
    t = clv.first_step + np.arange(1, 40)  # steps whose predecessor has a vector too
    image = np.einsum("btij,btjk->btik", J[:, t], V[:, :-1])  # J_t v_{t-1}
    np.testing.assert_allclose(np.linalg.norm(image, axis=-2), np.exp(g[:, 1:]), rtol=1e-10)
    cos = np.sum(image * V[:, 1:], axis=-2) / np.linalg.norm(image, axis=-2)
    np.testing.assert_allclose(np.abs(cos), 1.0, atol=1e-10)


@pytest.mark.slow
def test_cell_paths_agree_and_whole_models_give_a_dict():
    """Dense (analytic Jacobian), autodiff and matrix-free paths, the Jacobians path, and a model."""
    with x64_enabled():
        cell, p = _tanh_rnn(H=6)
        xs = 0.5 * jax.random.normal(jax.random.key(1), (2, 400, 2), jnp.float64)
        opts = dict(k=4, warmup=150, backward_warmup=150)
        dense = covariant_lyapunov_vectors(cell, p, xs, **opts)
        J = step_jacobians(cell, p, xs).jacobians
        for other in (
            covariant_lyapunov_vectors(cell, p, xs, method="autodiff", **opts),
            covariant_lyapunov_vectors(cell, p, xs, matrix_free=True, **opts),
            clvs_from_jacobians(J, **opts),
        ):
            np.testing.assert_allclose(other.vectors, dense.vectors, atol=1e-9)
            np.testing.assert_allclose(other.growth, dense.growth, atol=1e-9)
        # the exponents are those of the QR method from the same frame over the same steps
        frame = jnp.asarray(np.linalg.qr(np.random.default_rng(4).normal(size=(6, 4)))[0])
        clv = covariant_lyapunov_vectors(cell, p, xs, frame=frame, **opts)
        spec = lyapunov_from_jacobians(J, frame=frame, frame_warmup=150, window=250)
        np.testing.assert_allclose(-np.sort(-np.asarray(clv.exponents)), spec.exponents, atol=1e-10)
        # ... and by default from the frame lyapunov_spectrum draws for the same (default) key
        spec = lyapunov_from_jacobians(J, k=4, frame_warmup=150, window=250)
        np.testing.assert_allclose(-np.sort(-np.asarray(dense.exponents)), spec.exponents, atol=1e-10)
        # the vectors are intrinsic: another random frame and start converge to the same ones
        again = covariant_lyapunov_vectors(cell, p, xs, key=jax.random.key(5), **opts)
        np.testing.assert_allclose(
            np.abs(again.vectors[:, 10:-10]), np.abs(dense.vectors[:, 10:-10]), atol=1e-5
        )
        model = sj.many_to_one(cell, sj.dense(1))
        mp = {"body": p, "head": None}  # only the body recurs
        out = covariant_lyapunov_vectors(model, mp, xs, **opts)
        assert list(out) == ["body.cell"]
        np.testing.assert_allclose(out["body.cell"].vectors, dense.vectors, atol=1e-12)
        with pytest.raises(ValueError, match="padded data"):
            covariant_lyapunov_vectors(model, mp, xs, lengths=jnp.array([400, 150]), **opts)


def test_arguments_are_checked():
    J = jnp.ones((10, 3, 3))
    with pytest.raises(ValueError, match="leave 0"):
        clvs_from_jacobians(J, warmup=5, backward_warmup=5)
    with pytest.raises(ValueError, match="k must lie"):
        clvs_from_jacobians(J, k=4)
    with pytest.raises(ValueError, match="non-negative"):
        clvs_from_jacobians(J, warmup=-1)
    with pytest.raises(ValueError, match=r"\(\*batch, T, S, S\)"):
        clvs_from_jacobians(jnp.ones((10, 3, 2)))
    cell = sj.rnn(3)
    p = {"w_x": jnp.zeros((2, 3)), "w_h": jnp.zeros((3, 3)), "b": jnp.zeros(3)}
    with pytest.raises(ValueError, match="padded data"):
        covariant_lyapunov_vectors(cell, p, jnp.ones((2, 10, 2)), lengths=jnp.array([10, 5]))
