"""Gradient flossing (issue 17): differentiable Lyapunov exponents, ``flossing_loss``,
``Flossing`` in the train step and ``fit``, and ``floss``.

Oracles: central finite differences in float64 (the gradients of the QR iteration); the
closed form of a diagonal linear recurrence (exponents $\\log|w_i|$, gradient
$2 \\log|w_i| / w_i$, and the gradient-descent iteration it implies); a hand-written optax
loop (the ``Flossing`` step); ``lyapunov_spectrum`` (the flossing exponents).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_like, x64_enabled

import seqjax
from seqjax.spectrum import lyapunov_spectrum, recurrent_cores
from seqjax.spectrum.flossing import _exponents_core, flossing_exponents, flossing_loss
from seqjax.spectrum.lyapunov import _qr_pos
from seqjax.train import Logging, fit, init_train_state, make_train_step
from seqjax.train.loop import floss
from seqjax.train.options import Flossing

# --------------------------------------------------------------------------- helpers


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _tanh_rnn(H=4, I=2, gain=1.5, seed=0, dtype=jnp.float32):
    cell = seqjax.rnn(H)
    params = cell.init(jax.random.key(seed), I)
    rng = np.random.default_rng(seed)
    params["w_h"] = jnp.asarray(gain * rng.standard_normal((H, H)) / np.sqrt(H))
    params["b"] = jnp.asarray(0.1 * rng.standard_normal(H))
    return cell, jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)


def _gru(H=3, I=2, seed=0, dtype=jnp.float32):
    cell = seqjax.gru(H)
    params = cell.init(jax.random.key(seed), I)
    params = jax.tree_util.tree_map(lambda a: 2.0 * a, params)  # livelier dynamics than the default
    return cell, jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)


def _inputs(B, T, I, seed=1, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, I)), dtype)


W_DIAG = [-3.0, 0.5, 0.3, -0.1]  # top 2 by |w|: -3.0 and 0.5, on the first two axes
LINEAR_XS = (2, 10, 1)  # (B, T, I) of the linear tests: one compiled loss and gradient serve them all


def _linear_cell(w, I=1, dtype=jnp.float64):
    """``h_t = h_{t-1} W_h + x_t W_x`` with ``W_h = diag(w)``: ``J_t = W_h^T``."""
    cell = seqjax.rnn(len(w), activation="identity")
    params = cell.init(jax.random.key(0), I)
    params["w_h"] = jnp.diag(jnp.asarray(w))
    return cell, jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)


# --------------------------------------------------------------------------- the QR


@pytest.mark.slow
def test_qr_pos_positive_diagonal_and_tangent_matches_fd():
    with x64_enabled():
        A = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)))
        dA = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)))
        Q, R = _qr_pos(A, 1e-12)
        assert bool(jnp.all(jnp.diagonal(R) > 0))
        np.testing.assert_allclose(Q @ R, A, atol=1e-12)
        np.testing.assert_allclose(Q.T @ Q, np.eye(3), atol=1e-12)
        _, (dQ, dR) = jax.jvp(lambda a: _qr_pos(a, 1e-12), (A,), (dA,))
        eps = 1e-6
        Qp, Rp = _qr_pos(A + eps * dA, 1e-12)
        Qm, Rm = _qr_pos(A - eps * dA, 1e-12)
        np.testing.assert_allclose(dQ, (Qp - Qm) / (2 * eps), atol=1e-8)
        np.testing.assert_allclose(dR, (Rp - Rm) / (2 * eps), atol=1e-8)
        # rank deficient (third column in the span of the first two): finite, first columns exact
        B = A.at[:, 2].set(A[:, 0] - 2 * A[:, 1])
        _, (dQ, dR) = jax.jvp(lambda a: _qr_pos(a, 1e-12), (B,), (dA,))
        assert bool(jnp.all(jnp.isfinite(dQ)) & jnp.all(jnp.isfinite(dR)))
        Qp, Rp = _qr_pos(B + eps * dA, 1e-12)
        Qm, Rm = _qr_pos(B - eps * dA, 1e-12)
        np.testing.assert_allclose(dR[:, :2], (Rp - Rm)[:, :2] / (2 * eps), atol=1e-7)
        np.testing.assert_allclose(dQ[:, :2], (Qp - Qm)[:, :2] / (2 * eps), atol=1e-7)
        # one column (k = 1: a normalisation, no LAPACK call), and a zero column (-> e_1, finite)
        a, da = A[:, :1], dA[:, :1]
        (q, r), (dq, dr) = jax.jvp(lambda x: _qr_pos(x, 1e-12), (a,), (da,))
        np.testing.assert_allclose(q * r[0, 0], a, atol=1e-12)
        np.testing.assert_allclose(
            dr, (_qr_pos(a + eps * da, 1e-12)[1] - _qr_pos(a - eps * da, 1e-12)[1]) / (2 * eps), atol=1e-8
        )
        np.testing.assert_allclose(
            dq, (_qr_pos(a + eps * da, 1e-12)[0] - _qr_pos(a - eps * da, 1e-12)[0]) / (2 * eps), atol=1e-8
        )
        (q, r), (dq, dr) = jax.jvp(lambda x: _qr_pos(x, 1e-12), (jnp.zeros_like(a),), (da,))
        np.testing.assert_array_equal(q[:, 0], np.eye(5)[0])
        assert float(r[0, 0]) == 0.0 and bool(jnp.all(jnp.isfinite(dq)) & jnp.all(jnp.isfinite(dr)))


# --------------------------------------------------------------------------- finite differences


def _fd_cases(kind):
    cell, params = _tanh_rnn(H=4) if kind == "rnn" else _gru(H=3)
    return cell, params, _inputs(2, 30, 2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gru"])  # the Elman case runs by default (dense linear) below
def test_lyapunov_gradients_match_finite_differences(kind):
    with x64_enabled():
        cell, params, xs = _fd_cases(kind)
        params, xs = _f64(params), _f64(xs)

        def spec(p):
            return lyapunov_spectrum(cell, p, xs, k=2, warmup=3, window=27).exponents

        lam1 = lambda e: jnp.sum(e[:, 0])  # noqa: E731  (summed over the batch)
        sq = lambda e: jnp.sum(e**2)  # noqa: E731
        e, vjp = jax.vjp(spec, params)
        assert bool(jnp.all(e[:, 0] - e[:, 1] > 1e-3)), e  # generic: no tie at the sort
        floss_ = lambda p: flossing_loss(cell, p, xs, k=2, warmup=3)  # noqa: E731
        floss_1 = lambda p: flossing_loss(cell, p, xs, k=1, warmup=3)  # noqa: E731  (the one-column QR)
        grads = {
            lam1: vjp(jax.grad(lam1)(e))[0],  # one linearisation, one transpose, two cotangents
            sq: vjp(jax.grad(sq)(e))[0],
            floss_: jax.grad(floss_)(params),
            floss_1: jax.grad(floss_1)(params),
        }
        eps = 1e-5
        for i in range(2):
            v = _f64(random_like(params, 10 + i))
            shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * eps * b, params, v)  # noqa: E731
            e_p, e_m = spec(shift(1)), spec(shift(-1))
            for obj, g in grads.items():
                if obj in (floss_, floss_1):
                    fd = (obj(shift(1)) - obj(shift(-1))) / (2 * eps)
                else:
                    fd = (obj(e_p) - obj(e_m)) / (2 * eps)
                an = sum(
                    jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(v))
                )
                np.testing.assert_allclose(an, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_flossing_exponents_equal_lyapunov_spectrum():
    """The fused flossing scan (JVPs) against lyapunov_spectrum (dense Jacobians), same frame."""
    with x64_enabled():
        for cell, params in (_tanh_rnn(H=5), _gru(H=3)):
            params, xs = _f64(params), _f64(_inputs(3, 40, 2))
            lam = flossing_exponents(cell, params, xs, k=2, warmup=4, frame_warmup=6)
            spec = lyapunov_spectrum(cell, params, xs, k=2, warmup=4, frame_warmup=6, window=30)
            np.testing.assert_allclose(
                jnp.sort(lam, axis=-1)[:, ::-1], spec.exponents, rtol=1e-10, atol=1e-12
            )


# --------------------------------------------------------------------------- degenerate cases


def test_degenerate_flossing_gradients_closed_form():
    """The cheap degenerate cases (the linear 4-state cell of the closed-form test, ``k = 2``,
    float64, the same compiled code): ``W_h = c I`` (a repeated exponent:
    ``d/dW_h sum_i lambda_i^2 = (2 log c / c) Q_0 Q_0^T``, the frame never turns) and
    ``W_h = diag(1.5, 0, 0, 0)`` (``J_t`` of rank 1: the second exponent is floored, with zero
    gradient; the first has ``d lambda_1 / dW_00 = 1/1.5``)."""
    with x64_enabled():
        c = 0.8
        cell, params = _linear_cell([c] * 4)
        xs = _f64(_inputs(*LINEAR_XS))
        Q0 = jnp.asarray(np.linalg.qr(np.random.default_rng(3).standard_normal((4, 2)))[0])
        grad = jax.value_and_grad(lambda p: flossing_loss(cell, p, xs, k=2, frame=Q0))
        loss, g = grad(params)
        np.testing.assert_allclose(loss, 2 * np.log(c) ** 2, rtol=1e-12)
        np.testing.assert_allclose(g["w_h"], 2 * np.log(c) / c * Q0 @ Q0.T, atol=1e-12)
        params = dict(params, w_h=jnp.diag(jnp.array([1.5, 0.0, 0.0, 0.0])))
        lam = flossing_exponents(cell, params, xs, k=2, frame=Q0)[0]
        assert float(lam[1]) < -25  # the floor, log(4 eps max_j ||A_j||): finite
        loss, g = grad(params)
        assert bool(jnp.isfinite(loss))
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(g))
        np.testing.assert_allclose(g["w_h"][0, 0], 2 * lam[0] / 1.5, rtol=1e-10)


@pytest.mark.slow
def test_repeated_exponents_closed_form_gradient():
    """``W_h = c I`` (linear): every exponent is log c; the frame never turns, so
    ``d/dW_h sum_i lambda_i^2 = (2 log c / c) Q_0 Q_0^T``."""
    with x64_enabled():
        c, k = 0.8, 2
        cell, params = _linear_cell([c] * 4)
        xs = _f64(_inputs(2, 20, 1))
        Q0 = jnp.asarray(np.linalg.qr(np.random.default_rng(3).standard_normal((4, k)))[0])
        g = jax.grad(lambda p: flossing_loss(cell, p, xs, k=k, frame=Q0))(params)
        np.testing.assert_allclose(g["w_h"], 2 * np.log(c) / c * Q0 @ Q0.T, atol=1e-12)
        e = lyapunov_spectrum(cell, params, xs, k=k, window=20, frame=Q0).exponents
        np.testing.assert_allclose(e, np.log(c), atol=1e-12)
        for f in (
            lambda p: jnp.sum(lyapunov_spectrum(cell, p, xs, k=k, window=20).exponents[:, 0]),
            lambda p: jnp.sum(lyapunov_spectrum(cell, p, xs, k=k, window=20).exponents ** 2),
        ):
            g = jax.grad(f)(params)
            assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(g))


@pytest.mark.slow
def test_minus_inf_exponent_finite_gradients():
    """A zero row of every ``J_t`` (a zero column of ``W_h``; a saturated tanh unit in
    float32): the last exponent of ``lyapunov_spectrum`` is ``-inf`` with finite gradients
    of the others; ``flossing_loss`` stays finite with finite gradients."""
    with x64_enabled():
        w = np.diag([1.5, 0.7, 0.4])
        w[:, 1] = 0.0  # J = W_h^T has a zero row
        cell, params = _linear_cell([1.0, 1.0, 1.0])
        params["w_h"] = jnp.asarray(w)
        xs = _f64(_inputs(2, 20, 1))
        spec = lambda p: lyapunov_spectrum(cell, p, xs, k=3, window=20).exponents  # noqa: E731
        e = spec(params)
        assert bool(jnp.all(jnp.isneginf(e[:, 2]))) and bool(jnp.all(jnp.isfinite(e[:, :2])))
        g = jax.grad(lambda p: jnp.sum(spec(p)[:, :2] ** 2))(params)
        assert bool(jnp.all(jnp.isfinite(g["w_h"])))
        # the finite exponents are log 1.5 and log 0.4 (the zero row removes 0.7): exact gradient
        g1 = jax.grad(lambda p: jnp.sum(spec(p)[:, 0]))(params)["w_h"]
        np.testing.assert_allclose(g1[0, 0], 2 / 1.5, rtol=1e-6)
        loss, g = jax.value_and_grad(lambda p: flossing_loss(cell, p, xs, k=3))(params)
        assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(g["w_h"])))
    # float32, a saturated tanh unit: f'(net) = 1 - tanh^2 = 0 exactly
    cell, params = _tanh_rnn(H=4)
    params["b"] = params["b"].at[0].set(40.0)
    xs = _inputs(2, 30, 2)
    e = lyapunov_spectrum(cell, params, xs, k=4, window=30).exponents
    assert bool(jnp.all(jnp.isneginf(e[:, 3])))
    g = jax.grad(lambda p: jnp.sum(lyapunov_spectrum(cell, p, xs, k=4, window=30).exponents[:, :3] ** 2))(
        params
    )
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(g))
    loss, g = jax.value_and_grad(lambda p: flossing_loss(cell, p, xs, k=4))(params)
    assert bool(jnp.isfinite(loss))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(g))


@pytest.mark.slow
def test_float32_long_sequence_finite_gradients():
    """T = 300 in float32, a chaotic tanh RNN (lambda_1 > 0) and a contracting one."""
    for gain in (3.0, 0.3):
        cell, params = _tanh_rnn(H=8, gain=gain)
        xs = _inputs(2, 300, 2)
        loss, g = jax.value_and_grad(lambda p: flossing_loss(cell, p, xs, k=4))(params)
        assert bool(jnp.isfinite(loss))
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(g))
        f = lambda p: jnp.sum(lyapunov_spectrum(cell, p, xs, k=4, window=50).exponents ** 2)  # noqa: E731
        g = jax.grad(f)(params)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(g))
        # float32 against float64: the same loss and gradient to float32 accuracy
        with x64_enabled():
            loss64, g64 = jax.value_and_grad(lambda p: flossing_loss(cell, p, _f64(xs), k=4))(_f64(params))
        np.testing.assert_allclose(loss, loss64, rtol=1e-3)
        gw = np.asarray(jax.grad(lambda p: flossing_loss(cell, p, xs, k=4))(params)["w_h"])
        np.testing.assert_allclose(gw, g64["w_h"], atol=1e-3 * np.abs(g64["w_h"]).max())


# --------------------------------------------------------------------------- the linear closed form


def test_linear_recurrence_closed_form_loss_and_gradient():
    with x64_enabled():
        cell, params = _linear_cell(W_DIAG)
        xs = _f64(_inputs(*LINEAR_XS))
        axes = jnp.eye(4)[:, :2]
        w = np.asarray(W_DIAG)
        lam = flossing_exponents(cell, params, xs, k=2, frame=axes)
        np.testing.assert_allclose(lam, np.broadcast_to(np.log(np.abs(w[:2])), lam.shape), rtol=1e-13)
        loss, g = jax.value_and_grad(lambda p: flossing_loss(cell, p, xs, k=2, frame=axes))(params)
        np.testing.assert_allclose(loss, np.sum(np.log(np.abs(w[:2])) ** 2), rtol=1e-13)
        want = np.diag(np.where(np.arange(4) < 2, 2 * np.log(np.abs(w)) / w, 0.0))
        np.testing.assert_allclose(g["w_h"], want, atol=1e-12)
        for name in ("w_x", "b"):
            np.testing.assert_array_equal(g[name], 0.0)


@pytest.mark.slow
def test_linear_recurrence_sgd_follows_the_closed_form_iteration():
    """SGD on the flossing loss moves the top-k |w_i| to 1 as ``w <- w - lr 2 log|w| / w``."""
    with x64_enabled():
        cell, params = _linear_cell(W_DIAG)
        xs = _f64(_inputs(*LINEAR_XS))
        axes = jnp.eye(4)[:, :2]
        w = np.asarray(W_DIAG)
        # the default random frame finds the same top-2 subspace: O(1/T) away after T = 400
        loss_r = flossing_loss(cell, params, _f64(_inputs(1, 400, 1)), k=2)
        np.testing.assert_allclose(loss_r, np.sum(np.log(np.abs(w[:2])) ** 2), rtol=0.02)
        lr, n = 0.2, 40
        opt = optax.sgd(lr)
        grad = jax.jit(jax.grad(lambda p: flossing_loss(cell, p, xs, k=2, frame=axes)))
        p, s = params, opt.init(params)
        w = np.asarray(W_DIAG, np.float64)
        top = np.arange(4) < 2
        for _ in range(n):
            u, s = opt.update(grad(p), s, p)
            p = optax.apply_updates(p, u)
            w = np.where(top, w - lr * 2 * np.log(np.abs(w)) / w, w)
        np.testing.assert_allclose(jnp.diag(p["w_h"]), w, rtol=1e-10)
        np.testing.assert_allclose(p["w_h"] - jnp.diag(jnp.diag(p["w_h"])), 0.0, atol=1e-12)
        assert np.all(np.abs(np.log(np.abs(w[:2]))) < 1e-3)  # the iteration has converged to |w| = 1
        np.testing.assert_array_equal(w[2:], W_DIAG[2:])


# --------------------------------------------------------------------------- models, jit, vmap


@pytest.mark.slow
def test_model_loss_is_the_sum_over_cores_and_transforms():
    model = seqjax.many_to_one(seqjax.stack_layers([seqjax.rnn(4), seqjax.gru(3)]), seqjax.dense(1))
    params = model.init(jax.random.key(0), input_size=2)
    xs = _inputs(2, 12, 2)
    cores = recurrent_cores(model, params, xs)
    want = sum(float(flossing_loss(c.cell, c.params, c.xs, k=2, carry=c.carry)) for c in cores.values())
    np.testing.assert_allclose(flossing_loss(model, params, xs, k=2), want, rtol=1e-6)
    g = jax.grad(lambda p: flossing_loss(model, p, xs, k=2))(params)
    for layer in g["body"]:
        assert float(jnp.abs(layer["w_h"]).max()) > 0
    assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree_util.tree_leaves(g["head"]))
    # jit, vmap (over a stack of params) and a compile-once cache
    cell, p0 = _tanh_rnn(H=4)
    jitted = jax.jit(lambda p, x: flossing_loss(cell, p, x, k=2))
    np.testing.assert_allclose(jitted(p0, xs), flossing_loss(cell, p0, xs, k=2), rtol=1e-6)
    stack = jax.tree_util.tree_map(lambda a: jnp.stack([a, 0.5 * a]), p0)
    both = jax.vmap(lambda p: flossing_loss(cell, p, xs, k=2))(stack)
    half = jax.tree_util.tree_map(lambda a: 0.5 * a, p0)
    np.testing.assert_allclose(
        both, [flossing_loss(cell, p0, xs, k=2), flossing_loss(cell, half, xs, k=2)], rtol=1e-5
    )
    before = _exponents_core._cache_size()
    flossing_loss(cell, half, xs, k=2)
    flossing_loss(cell, jax.tree_util.tree_map(lambda a: 0.3 * a, p0), xs, k=2)
    assert _exponents_core._cache_size() == before
    # lengths: each sequence averages over its own steps, as slicing it by hand
    lengths = jnp.array([12, 7])
    lam = flossing_exponents(cell, p0, xs, k=2, lengths=lengths, warmup=2)
    for b, n in enumerate([12, 7]):
        np.testing.assert_allclose(lam[b], flossing_exponents(cell, p0, xs[b, :n], k=2, warmup=2), rtol=1e-5)


# --------------------------------------------------------------------------- the train step


def _task(H=4, seed=0):
    model = seqjax.many_to_one(seqjax.rnn(H), seqjax.dense(1))
    params = model.init(jax.random.key(seed), input_size=2)
    params["body"]["w_h"] = 2.0 * params["body"]["w_h"]

    def loss_fn(p, batch):
        xs, ys = batch
        return jnp.mean((model.apply(p, xs)[:, 0] - ys) ** 2)

    rng = np.random.default_rng(seed)
    batches = [
        (
            jnp.asarray(rng.standard_normal((4, 10, 2)), jnp.float32),
            jnp.asarray(rng.standard_normal(4), jnp.float32),
        )
        for _ in range(3)
    ]
    return model, params, loss_fn, batches


def _np_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def test_flossing_gradient_matches_finite_differences_dense_linear():
    """A dense random ``W_h`` and the random frame: the frame turns every step, so the QR's
    tangent (``Q`` and ``R`` both) is exercised. Central differences along random directions,
    float64; the cell and shapes of the closed-form tests (the same compiled code)."""
    with x64_enabled():
        cell, params = _linear_cell([1.0] * 4)
        rng = np.random.default_rng(5)
        params["w_h"] = jnp.asarray(rng.standard_normal((4, 4)) / 2)
        xs = _f64(_inputs(*LINEAR_XS))
        f = lambda p: flossing_loss(cell, p, xs, k=2)  # noqa: E731
        g = _np_tree(jax.grad(f)(params))
        p0, eps = _np_tree(params), 1e-6  # the third derivative is ~1e4: eps^2 error ~1e-8
        for i in range(3):
            v = random_like(p0, 40 + i)
            shift = lambda s: jax.tree_util.tree_map(lambda a, b: jnp.asarray(a + s * eps * b), p0, v)  # noqa: E731
            fd = (float(f(shift(1))) - float(f(shift(-1)))) / (2 * eps)
            an = sum(float(np.vdot(g[name], v[name])) for name in g)
            np.testing.assert_allclose(an, fd, rtol=1e-7, atol=1e-9)


def test_flossing_step_equals_hand_written_step():
    """``make_train_step(..., flossing=Flossing(cell, k=2, weight=0.3, every=2))`` for three
    steps against SGD by hand: loss + 0.3 * flossing_loss on steps 0 and 2, the loss alone on
    step 1 (float64; the closed-form tests' cell and shapes, so the reference reuses their
    compiled gradient)."""
    with x64_enabled():
        cell, params = _linear_cell(W_DIAG)
        xs = _f64(_inputs(*LINEAR_XS))
        ys = jnp.asarray([0.5, -1.0])

        def loss_fn(p, batch):  # a cheap task loss that touches w_h and w_x
            return jnp.sum(p["w_h"] ** 2) * jnp.mean(batch[1] ** 2) + jnp.sum(p["w_x"])

        opt, lr = optax.sgd(0.05), 0.05
        fl = Flossing(cell, k=2, weight=0.3, every=2)
        step = make_train_step(loss_fn, opt, flossing=fl, donate=False)
        state = init_train_state(params, opt, key=jax.random.key(0))
        metrics = []
        for _ in range(3):
            state, m = step(state, (xs, ys))
            metrics.append(m)
        p = _np_tree(params)
        floss_grad = jax.value_and_grad(lambda q: flossing_loss(cell, q, xs, k=2))
        flossing_values = []
        for t in range(3):
            task_g = {
                "w_h": 2 * p["w_h"] * float(np.mean(np.asarray(ys) ** 2)),
                "w_x": np.ones_like(p["w_x"]),
            }
            task_g["b"] = np.zeros_like(p["b"])
            if t % 2 == 0:
                F, fg = floss_grad(jax.tree_util.tree_map(jnp.asarray, p))
                flossing_values.append(float(F))
                task_g = {k: task_g[k] + 0.3 * np.asarray(fg[k]) for k in task_g}
            else:
                flossing_values.append(0.0)
            p = {k: p[k] - lr * task_g[k] for k in p}
        for name in p:
            np.testing.assert_allclose(state.params[name], p[name], rtol=1e-12, atol=1e-14)
        assert [bool(m["flossed"]) for m in metrics] == [True, False, True]
        np.testing.assert_allclose([float(m["flossing"]) for m in metrics], flossing_values, rtol=1e-12)
        np.testing.assert_allclose(metrics[0]["loss"], loss_fn(params, (xs, ys)), rtol=1e-12)  # the task loss


@pytest.mark.slow
def test_fit_with_flossing_history_averages_the_flossing_steps():
    model, params, loss_fn, batches = _task()
    opt = optax.sgd(1e-2)
    fl = Flossing(model, k=2, weight=0.5, every=2)
    batch = batches[0]
    res = fit(
        loss_fn,
        opt,
        params,
        lambda key: batch,
        key=jax.random.key(0),
        steps=6,
        logging=Logging(every=3, progress=False),
        mesh=None,
        flossing=fl,
    )
    # the same steps by hand
    step = make_train_step(loss_fn, opt, flossing=fl, donate=False)
    state = init_train_state(params, opt, key=jax.random.key(0))
    ms = []
    for _ in range(6):
        state, m = step(state, batch)
        ms.append(m)
    F = np.array([float(m["flossing"]) for m in ms])
    assert [row["step"] for row in res.history] == [3, 6]
    np.testing.assert_allclose(res.history[0]["flossing"], (F[0] + F[2]) / 2, rtol=1e-6)  # steps 0, 2
    np.testing.assert_allclose(res.history[1]["flossing"], F[4], rtol=1e-6)  # step 4
    np.testing.assert_allclose([r["flossed"] for r in res.history], [2 / 3, 1 / 3])
    for a, b in zip(jax.tree_util.tree_leaves(res.state.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_floss_lowers_the_flossing_loss():
    """A tanh RNN with a small W_h (lambda_1 far below 0): pre-flossing moves it up to 0."""
    model = seqjax.many_to_one(seqjax.rnn(6), seqjax.dense(1))
    params = model.init(jax.random.key(0), input_size=2)
    params["body"]["w_h"] = 0.1 * params["body"]["w_h"]
    xs = _inputs(16, 30, 2)
    before = float(flossing_loss(model, params, xs, k=2))
    lam0 = flossing_exponents(model, params, xs, k=2)["body.cell"]
    assert float(jnp.max(lam0)) < -1.0
    res = floss(
        model,
        params,
        (xs, jnp.zeros(16)),
        k=2,
        steps=40,
        optimizer=optax.adam(0.05),
        key=jax.random.key(1),
        batch_size=8,
        logging=Logging(every=20, progress=False),
    )
    after = float(flossing_loss(model, res.state.params, xs, k=2))
    assert after < 0.1 * before, (before, after)
    assert res.history[-1]["loss"] == res.history[-1]["flossing"]
    np.testing.assert_array_equal(
        res.state.params["head"]["w"], params["head"]["w"]
    )  # the readout: untouched


# --------------------------------------------------------------------------- errors


def test_bad_arguments_name_them():
    model = seqjax.many_to_one(seqjax.rnn(4), seqjax.dense(1))
    for kwargs, match in (
        ({"k": 0}, r"Flossing\.k must be a positive integer, got 0"),
        ({"k": 2.5}, r"Flossing\.k must be a positive integer, got 2\.5"),
        ({"k": 2, "every": 0}, r"Flossing\.every must be a positive integer, got 0"),
        ({"k": 2, "weight": -1.0}, r"Flossing\.weight must be a finite number >= 0, got -1\.0"),
        ({"k": 2, "weight": float("nan")}, r"Flossing\.weight must be a finite number >= 0"),
        ({"k": 2, "inputs": 3}, r"Flossing\.inputs must be a function batch -> xs"),
        ({"k": 2, "warmup": -1}, r"Flossing\.warmup must be an integer >= 0, got -1"),
    ):
        with pytest.raises(ValueError, match=match):
            Flossing(model, **kwargs)
    with pytest.raises(ValueError, match=r"Flossing\.model must be a seqjax Cell or a model"):
        Flossing("rnn", k=2)
    params = model.init(jax.random.key(0), input_size=1)
    xs = _inputs(2, 5, 1)
    with pytest.raises(ValueError, match=r"k=5 exceeds the state size S=4 of core 'body\.cell'"):
        flossing_loss(model, params, xs, k=5)
    with pytest.raises(ValueError, match=r"k must be a positive integer, got 0"):
        flossing_loss(model, params, xs, k=0)
    with pytest.raises(ValueError, match=r"warmup=5 \+ frame_warmup=0 leave 0"):
        flossing_loss(model, params, xs, k=1, warmup=5)
    with pytest.raises(ValueError, match=r"carry= is for a single Cell"):
        flossing_loss(model, params, xs, k=1, carry=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"flossing must be a seqjax\.train\.Flossing"):
        make_train_step(lambda p, b: 0.0, optax.sgd(0.1), flossing="yes")
    data = (np.zeros((4, 5, 1), np.float32), np.zeros(4, np.float32))
    with pytest.raises(
        ValueError, match=r"Flossing on the first training batch: .*k=7 exceeds the state size S=4"
    ):
        fit(
            lambda p, b: jnp.mean(model.apply(p, b[0]) ** 2),
            optax.sgd(0.1),
            params,
            data,
            key=jax.random.key(0),
            steps=1,
            batch_size=2,
            flossing=Flossing(model, k=7),
        )
    with pytest.raises(ValueError, match=r"floss: k must be a positive integer, got -1"):
        floss(model, params, data, k=-1, steps=1, optimizer=optax.sgd(0.1), key=jax.random.key(0))
