"""The cell interface of ``docs/design/cells.md`` exercised by prototypes built on it.

Every test compares against an independent reference:

1. exact ``gradient_norms`` for a user cell with carry ``(y, z)`` and output ``y``: against
   ``jax.grad`` of a plain Python loop with a perturbation added to each step's carry;
2. ``jax.grad`` through a QR (Benettin) top-k Lyapunov estimate built on the ``jacobian``
   capability, and through ``lyapunov_spectrum``: against central finite differences;
3. a quasi-DEER parallel-in-time solver that uses only ``jacobian_diagonal``: against the
   sequential ``unroll`` trajectory (and the DEER property: k iterations fix k steps);
4. the recompute LSTM kernel variant behind the same ``Kernel`` interface: against autodiff;
5. a wrapper (``seqjax.cells.wrap`` and one written by hand) keeps the fused kernel and the
   analytic Jacobian: against an autodiff scan and ``method="autodiff"``;
6. a user cell's own Jacobian is used by the spectrum tools: against ``log|eig A|``;
7. cells compare and hash by value (no retrace of a jit with the cell static);
8. ``_replace`` drops the capabilities written for another step;
9. the dtype rule: against the float64 computation.
"""

from __future__ import annotations

import importlib
from functools import partial
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TraceCounter, random_like

import seqjax as sj
import seqjax.cells as sjc
from seqjax.bptt import gradient_norms
from seqjax.gradients import Autodiff, Fused, Truncate
from seqjax.spectrum import flatten_state, lyapunov_spectrum, step_jacobians, unflatten_state

lstm_module = importlib.import_module("seqjax.cells.lstm")  # seqjax.cells.lstm is the function


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def _randn(seed, shape, scale=1.0, dtype=jnp.float64):
    """Test data from NumPy (no eager JAX ops to compile)."""
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def _params(cell, input_size, seed, *, scale=0.5, dtype=jnp.float64):
    """Random params with the tree and shapes ``cell.init`` makes (NumPy, float64 by default)."""
    like = jax.eval_shape(lambda k: cell.init(k, input_size), jax.random.key(0))
    return jax.tree_util.tree_map(lambda a: jnp.asarray(scale * a, dtype), random_like(like, seed))


def _carry(cell, params, batch_shape, seed, scale=0.5):
    like = jax.eval_shape(lambda p: cell.initial_carry(p, batch_shape), params)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(scale * a, _dtype_of(params)), random_like(like, seed)
    )


def _dtype_of(params):
    return jnp.result_type(*jax.tree_util.tree_leaves(params))


def _counting(fn):
    """``fn`` with a call counter (``wrapper.count``; counts Python calls, i.e. traces)."""

    def wrapper(*args, **kwargs):
        wrapper.count += 1
        return fn(*args, **kwargs)

    wrapper.count = 0
    return wrapper


# --------------------------------------------------------------------------- 1. exact gradient_norms


class YZ(NamedTuple):
    y: jax.Array
    z: jax.Array


def _yz_cell(*, output: bool) -> sj.Cell:
    """``y_t = tanh(x W_x + y W_y + z W_z)``, ``z_t = 0.8 z + sin(y_t) W_c``; output ``y_t``."""
    Hy, Hz = 3, 2

    def init(key, input_size):
        k = jax.random.split(key, 4)
        return {
            "w_x": jax.random.normal(k[0], (input_size, Hy)),
            "w_y": 0.6 * jax.random.normal(k[1], (Hy, Hy)),
            "w_z": 0.6 * jax.random.normal(k[2], (Hz, Hy)),
            "w_c": 0.6 * jax.random.normal(k[3], (Hy, Hz)),
        }

    def initial_carry(params, batch_shape=()):
        bs = tuple(batch_shape) if not isinstance(batch_shape, int) else (batch_shape,)
        dt = params["w_x"].dtype
        return YZ(jnp.zeros(bs + (Hy,), dt), jnp.zeros(bs + (Hz,), dt))

    def step(p, c, x):
        y = jnp.tanh(x @ p["w_x"] + c.y @ p["w_y"] + c.z @ p["w_z"])
        z = 0.8 * c.z + jnp.sin(y) @ p["w_c"]
        return YZ(y, z), y

    return sj.Cell(init, initial_carry, step, output=(lambda p, c, x: c.y) if output else None)


def _loop_eps_grad(cell, params, xs, c0, loss_fn, *, direct: bool):
    """``dL/d eps_t`` (``(B, T, S)``) from a Python loop over steps, ``s_t <- s_t + eps_t``."""
    B, T, _ = xs.shape
    S = flatten_state(c0, batch_ndim=1).shape[-1]
    like = jax.tree_util.tree_map(lambda a: a[0], c0)

    def loss(eps):
        c = c0
        ys = []
        for t in range(T):
            c, y = cell.step(params, c, xs[:, t])
            s = flatten_state(c, batch_ndim=1) + eps[:, t]
            c_pert = unflatten_state(s, like)
            ys.append(c_pert.y if direct else y)  # the output read from the perturbed carry
            c = c_pert
        return loss_fn(jnp.stack(ys, axis=1))

    return jax.jit(jax.grad(loss))(jnp.zeros((B, T, S), xs.dtype))


def _yz_setup():
    cell = _yz_cell(output=True)
    params = _params(cell, 2, 3, scale=0.7)
    xs = _randn(1, (2, 6, 2))
    w = _randn(2, (2, 6, 3))
    return cell, params, xs, lambda ys: jnp.sum(jnp.sin(ys) * w)


def test_gradient_norms_exact_for_carry_y_z_with_output_rule(x64):
    cell, params, xs, loss_fn = _yz_setup()
    c0 = cell.initial_carry(params, (2,))
    gn = jax.jit(lambda p, x: gradient_norms(cell, p, x, loss_fn))(params, xs)
    g = _loop_eps_grad(cell, params, xs, c0, loss_fn, direct=True)
    np.testing.assert_allclose(gn.norms, jnp.linalg.norm(g, axis=-1), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gn.leaf_norms.y, jnp.linalg.norm(g[..., :3], axis=-1), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gn.leaf_norms.z, jnp.linalg.norm(g[..., 3:], axis=-1), rtol=1e-12, atol=1e-14)
    # A loss on every output: the last step's state reaches the loss through y_T.
    assert np.all(np.asarray(gn.norms[:, -1]) > 1e-3)
    np.testing.assert_allclose(gn.leaf_norms.z[:, -1], 0.0, atol=1e-14)  # y_T does not read z_T

    # Independent check of one entry by central finite differences of the perturbed loop.
    def loss_at(e):
        eps = jnp.zeros((2, 6, 5), jnp.float64).at[1, 2, 0].set(e)
        c = c0
        ys = []
        for t in range(6):
            c, _ = cell.step(params, c, xs[:, t])
            c = unflatten_state(flatten_state(c, batch_ndim=1) + eps[:, t], YZ(c.y[0], c.z[0]))
            ys.append(c.y)
        return loss_fn(jnp.stack(ys, axis=1))

    h = 1e-6
    loss_at = jax.jit(loss_at)
    fd = (loss_at(h) - loss_at(-h)) / (2 * h)
    np.testing.assert_allclose(g[1, 2, 0], fd, rtol=1e-7, atol=1e-9)


def test_gradient_norms_without_output_rule_refuses_direct(x64):
    cell, params, xs, loss_fn = _yz_setup()
    bare = _yz_cell(output=False)
    with pytest.raises(ValueError, match="output"):
        gradient_norms(bare, params, xs, loss_fn)
    gn = jax.jit(lambda p, x: gradient_norms(bare, p, x, loss_fn, direct=False))(params, xs)
    g = _loop_eps_grad(cell, params, xs, cell.initial_carry(params, (2,)), loss_fn, direct=False)
    np.testing.assert_allclose(gn.norms, jnp.linalg.norm(g, axis=-1), rtol=1e-12, atol=1e-14)
    # Only the path through later steps: the last state reaches nothing.
    np.testing.assert_allclose(gn.norms[:, -1], 0.0, atol=0)
    assert np.all(np.asarray(gn.norms[:, :-1]) > 1e-6)


# --------------------------------------------------------------------------- 2. grad through Lyapunov


def lyap_topk(params, xs, *, cell, k):
    """Top-``k`` Lyapunov exponents of ``cell`` along ``xs: (T, I)``, by Benettin QR on the
    ``jacobian`` capability; differentiable (sign-fixed ``R`` diagonal)."""
    carries = sj.trajectory(cell, params, xs).carries
    c0 = cell.initial_carry(params, ())
    states = flatten_state(carries, batch_ndim=1)  # (T, S)
    prev = jnp.concatenate([flatten_state(c0)[None], states[:-1]], axis=0)
    J = jax.vmap(lambda s, x: cell.jacobian(params, unflatten_state(s, c0), x))(prev, xs)  # (T, S, S)
    S = J.shape[-1]
    Q0 = jnp.eye(S, k, dtype=J.dtype)

    def body(Q, Jt):
        Q, R = jnp.linalg.qr(Jt @ Q)
        d = jnp.diagonal(R)
        sgn = jnp.where(d < 0, -1.0, 1.0).astype(d.dtype)
        return Q * sgn[None, :], jnp.log(jnp.abs(d))

    _, logs = jax.lax.scan(body, Q0, J)
    return jnp.mean(logs, axis=0)


def _lyap_setup():
    cell = sj.rnn(4)
    params = _params(cell, 2, 7, scale=0.8)  # spectral radius of w_h above 1
    xs = _randn(8, (12, 2))
    return cell, params, xs


def _central_fd(f, params, name, h=1e-6):
    """Central finite differences of scalar ``f`` w.r.t. every entry of ``params[name]``."""
    f = jax.jit(f)
    base = np.asarray(params[name])
    out = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        plus, minus = dict(params), dict(params)
        plus[name] = params[name].at[idx].add(h)
        minus[name] = params[name].at[idx].add(-h)
        out[idx] = (float(f(plus)) - float(f(minus))) / (2 * h)
    return out


def test_grad_through_qr_lyapunov_topk_matches_finite_differences(x64):
    cell, params, xs = _lyap_setup()

    def f(p):
        return jnp.sum(lyap_topk(p, xs, cell=cell, k=2) * jnp.array([1.0, 0.5]))

    lam = lyap_topk(params, xs, cell=cell, k=2)
    assert lam[0] >= lam[1]  # a sanity check of the estimate itself
    g = jax.jit(jax.grad(f))(params)
    np.testing.assert_allclose(g["w_h"], _central_fd(f, params, "w_h"), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g["b"], _central_fd(f, params, "b"), rtol=1e-6, atol=1e-9)
    assert float(jnp.max(jnp.abs(g["w_h"]))) > 1e-3


def test_lyap_topk_equals_library_spectrum(x64):
    cell, params, xs = _lyap_setup()
    mine = lyap_topk(params, xs, cell=cell, k=4)
    ref = lyapunov_spectrum(cell, params, xs, frame=jnp.eye(4), window=12, rank_tol=0.0).exponents
    np.testing.assert_allclose(jnp.sort(mine)[::-1], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_grad_through_lyapunov_spectrum_matches_finite_differences(x64):
    cell, params, xs = _lyap_setup()

    def f(p):
        return lyapunov_spectrum(cell, p, xs, k=2).exponents.sum()

    g = jax.jit(jax.grad(f))(params)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(g))
    np.testing.assert_allclose(g["w_h"], _central_fd(f, params, "w_h"), rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- 3. quasi-DEER


def quasi_deer(cell, params, xs, c0, *, iters):
    """Quasi-Newton DEER: ``iters`` iterations from the all-zeros guess, each linearising
    ``s_t = f(s_{t-1}, x_t)`` with only the diagonal ``D_t`` of its Jacobian and solving the
    linear recurrence by ``associative_scan``. Returns the iterates ``(iters + 1, T, S)``."""
    like = c0
    s0 = flatten_state(c0)
    T = xs.shape[0]

    def f(s, x):
        c, _ = cell.step(params, unflatten_state(s, like), x)
        return flatten_state(c)

    def diag(s, x):
        return cell.jacobian_diagonal(params, unflatten_state(s, like), x)

    def combine(e1, e2):
        a1, b1 = e1
        a2, b2 = e2
        return a2 * a1, a2 * b1 + b2

    def one(states):
        prev = jnp.concatenate([s0[None], states[:-1]], axis=0)
        fs = jax.vmap(f)(prev, xs)
        D = jax.vmap(diag)(prev, xs)
        # s_t = D_t s_{t-1} + (f_t - D_t prev_t), with s_0 known: fold it into b_1.
        b = fs - D * prev
        b = b.at[0].add(D[0] * s0)
        _, out = jax.lax.associative_scan(combine, (D, b))
        return out

    states = jnp.zeros((T, s0.shape[0]), s0.dtype)
    hist = [states]
    step = jax.jit(one)
    for _ in range(iters):
        states = step(states)
        hist.append(states)
    return jnp.stack(hist)


@partial(jax.jit, static_argnums=0)
def _residuals(cell, params, xs, c0, states):
    like = c0
    s0 = flatten_state(c0)
    prev = jnp.concatenate([s0[None], states[:-1]], axis=0)
    fs = jax.vmap(lambda s, x: flatten_state(cell.step(params, unflatten_state(s, like), x)[0]))(prev, xs)
    return jnp.max(jnp.abs(fs - states), axis=-1)  # (T,)


@partial(jax.jit, static_argnums=0)
def _diagonals(cell, params, xs, c0, states):
    """``jacobian_diagonal`` along a trajectory and the diagonal of ``jax.jacfwd`` there."""
    prev = jnp.concatenate([flatten_state(c0)[None], states[:-1]], axis=0)

    def f(s, x):
        return flatten_state(cell.step(params, unflatten_state(s, c0), x)[0])

    D = jax.vmap(lambda s, x: cell.jacobian_diagonal(params, unflatten_state(s, c0), x))(prev, xs)
    J = jax.vmap(jax.jacfwd(f))(prev, xs)
    return D, jnp.diagonal(J, axis1=-2, axis2=-1)


@pytest.mark.parametrize(
    "make", [pytest.param(lambda: sj.gru(4), marks=pytest.mark.slow), lambda: sj.lstm(3)], ids=["gru", "lstm"]
)
def test_quasi_deer_with_jacobian_diagonal_reaches_sequential_trajectory(make, x64):
    cell = make()
    params = _params(cell, 2, 11)
    T = 8
    xs = _randn(12, (T, 2))
    c0 = _carry(cell, params, (), 13)
    # The solver sees only the diagonal: the cell's jacobian is not there to be used.
    cell = cell._replace(jacobian=None)
    ref = flatten_state(sj.trajectory(cell, params, xs, carry=c0).carries, batch_ndim=1)
    hist = quasi_deer(cell, params, xs, c0, iters=T)
    np.testing.assert_allclose(hist[-1], ref, rtol=0, atol=1e-10)
    for k in range(1, T + 1):
        r = _residuals(cell, params, xs, c0, hist[k])
        np.testing.assert_allclose(r[:k], 0.0, atol=1e-12, err_msg=f"iteration {k}")
        np.testing.assert_allclose(hist[k][:k], ref[:k], rtol=0, atol=1e-12, err_msg=f"iteration {k}")
    # Not vacuous: after one iteration the later steps are still wrong.
    assert float(jnp.max(_residuals(cell, params, xs, c0, hist[1])[1:])) > 1e-4
    # The diagonal is the Jacobian's (checked here, outside the solver, against jacfwd) ...
    D, D_ref = _diagonals(cell, params, xs, c0, ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-12, atol=1e-14)
    # ... and it pays: halfway, quasi-DEER is closer than Picard iteration (the same solver, D = 0).
    picard = cell._replace(jacobian_diagonal=lambda p, c, x: jnp.zeros_like(flatten_state(c)))
    hist_p = quasi_deer(picard, params, xs, c0, iters=T // 2)
    err_q = float(jnp.max(jnp.abs(hist[T // 2] - ref)))
    err_p = float(jnp.max(jnp.abs(hist_p[T // 2] - ref)))
    assert err_q < 0.5 * err_p, (err_q, err_p)


# --------------------------------------------------------------------------- 4. LSTM kernel variant


def _recompute_lstm(H):
    math = lstm_module.lstm_recompute_gate_math()
    return sj.lstm(H)._replace(kernel=sjc.affine_kernel(math))


_B, _T, _I, _H = 2, 5, 3, 3
_KERNEL_OPTIONS = {
    "plain": {},
    "lengths": {"lengths": np.array([5, 2])},
    "resets": {"resets": np.array([[0, 0, 1, 0, 0], [1, 0, 0, 1, 0]], bool)},
    "truncate": {"truncate": 2},
    "reverse": {"reverse": True},
}


def _unroll(cell, params, xs, base, *, truncate=None, **kw):
    """``unroll`` with gradient ``base``, truncated every ``truncate`` steps when given."""
    gradient = base if truncate is None else Truncate(truncate, base=base)
    return sj.unroll(cell, params, xs, gradient=gradient, **kw)


def _kernel_grads(cell, params, xs, c0, w, mode, **kw):
    def loss(p, xs, c0):
        c, ys = _unroll(cell, p, xs, mode, carry=c0, **kw)
        return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree_util.tree_leaves(c))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, xs, c0)


@pytest.mark.parametrize(
    "opt", [o if o == "plain" else pytest.param(o, marks=pytest.mark.slow) for o in _KERNEL_OPTIONS]
)
def test_lstm_recompute_kernel_equals_autodiff(opt, x64):
    cell = _recompute_lstm(_H)
    assert cell.kernel != sj.lstm(_H).kernel  # really the variant
    params = _params(cell, _I, 5)
    xs = _randn(6, (_B, _T, _I))
    c0 = _carry(cell, params, (_B,), 7)
    w = _randn(8, (_B, _T, _H))
    kw = _KERNEL_OPTIONS[opt]
    cf, ysf = _unroll(cell, params, xs, Fused(), carry=c0, **kw)
    ca, ysa = _unroll(cell, params, xs, Autodiff(), carry=c0, **kw)
    chex.assert_trees_all_close((cf, ysf), (ca, ysa), rtol=1e-12, atol=1e-13)
    vf, gf = _kernel_grads(cell, params, xs, c0, w, Fused(), **kw)
    va, ga = _kernel_grads(cell, params, xs, c0, w, Autodiff(), **kw)
    np.testing.assert_allclose(vf, va, rtol=1e-12)
    chex.assert_trees_all_close(gf, ga, rtol=1e-10, atol=1e-12)


def test_lstm_recompute_kernel_is_a_custom_vjp():
    cell = _recompute_lstm(_H)
    params = _params(cell, _I, 0, dtype=jnp.float32)
    xs = jnp.ones((_B, _T, _I))
    fused = str(jax.make_jaxpr(lambda p: sj.unroll(cell, p, xs, gradient=Fused())[1])(params))
    plain = str(jax.make_jaxpr(lambda p: sj.unroll(cell, p, xs, gradient=Autodiff())[1])(params))
    assert "custom_vjp_call" in fused
    assert "custom_vjp_call" not in plain


# --------------------------------------------------------------------------- 5. wrappers keep capabilities


def _double(x):
    return 2.0 * x


def _hand_wrapped(inner):
    """A wrapper written by hand: input doubled, every capability forwarded."""

    def step(p, c, x):
        return inner.step(p, c, _double(x))

    def jacobian(p, c, x):
        return inner.jacobian(p, c, _double(x))

    def run(p, c0, xs, **options):
        return inner.kernel.run(p, c0, _double(xs), **options)

    return sj.Cell(
        inner.init,
        inner.initial_carry,
        step,
        jacobian=jacobian,
        kernel=sjc.Kernel(run, inner.kernel.accepts),
        output=lambda p, c, x: inner.output(p, c, _double(x)),
    )


def _plain_scan_loss(inner, params, xs, c0, w):
    """An autodiff scan of the equivalent step (no seqjax driver)."""

    def body(c, x):
        c, y = inner.step(params, c, 2.0 * x)
        return c, y

    c, ys = jax.lax.scan(body, c0, jnp.swapaxes(xs, 0, 1))
    return jnp.sum(jnp.swapaxes(ys, 0, 1) * w) + jnp.sum(jnp.sin(c.c))


@pytest.mark.parametrize("how", ["wrap", "hand"])
def test_wrapper_keeps_fused_kernel_and_gradients(how, x64):
    inner = sj.lstm(4)
    w_cell = sjc.wrap(inner, inputs=_double) if how == "wrap" else _hand_wrapped(inner)
    assert w_cell.kernel is not None and w_cell.jacobian is not None
    params = _params(inner, 3, 2)
    xs = _randn(3, (2, 5, 3))
    c0 = _carry(inner, params, (2,), 4)
    w = _randn(5, (2, 5, 4))

    def loss(p, xs, c0):
        c, ys = sj.unroll(w_cell, p, xs, carry=c0)
        return jnp.sum(ys * w) + jnp.sum(jnp.sin(c.c))

    jaxpr = str(jax.make_jaxpr(loss)(params, xs, c0))
    assert "custom_vjp_call" in jaxpr
    v, g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, xs, c0)
    ref = jax.value_and_grad(lambda p, x, c: _plain_scan_loss(inner, p, x, c, w), argnums=(0, 1, 2))
    v_ref, g_ref = jax.jit(ref)(params, xs, c0)
    np.testing.assert_allclose(v, v_ref, rtol=1e-12)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", ["wrap", "hand"])
def test_wrapper_keeps_analytic_jacobian(how, x64):
    inner = sj.lstm(4)
    counting = _counting(inner.jacobian)
    counted = inner._replace(jacobian=counting)
    assert counted.kernel is inner.kernel and counted.jacobian_diagonal is inner.jacobian_diagonal
    w_cell = sjc.wrap(counted, inputs=_double) if how == "wrap" else _hand_wrapped(counted)
    params = _params(inner, 3, 1)
    xs = _randn(2, (2, 5, 3))
    J = step_jacobians(w_cell, params, xs).jacobians
    assert counting.count > 0
    before = counting.count
    J_ad = step_jacobians(w_cell, params, xs, method="autodiff").jacobians
    assert counting.count == before  # the autodiff reference does not use it
    assert J.shape == (2, 5, 8, 8)
    np.testing.assert_allclose(J, J_ad, rtol=1e-12, atol=1e-13)
    # And the Jacobian is the doubled-input one (not the inner cell's at x).
    J_inner = step_jacobians(inner, params, 2.0 * xs, method="autodiff").jacobians
    np.testing.assert_allclose(J, J_inner, rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------- 6. a user's Jacobian is used


def _linear_cell(jacobian, S=3):
    def init(key, input_size):
        k1, k2 = jax.random.split(key)
        return {"A": 0.3 * jax.random.normal(k1, (S, S)), "B": jax.random.normal(k2, (S, input_size))}

    def initial_carry(params, batch_shape=()):
        bs = tuple(batch_shape) if not isinstance(batch_shape, int) else (batch_shape,)
        return jnp.zeros(bs + (params["A"].shape[0],), params["A"].dtype)

    def step(p, c, x):
        s = c @ p["A"].T + x @ p["B"].T
        return s, s

    return sj.Cell(init, initial_carry, step, jacobian=jacobian, output=lambda p, c, x: c)


def _linear_params():
    rng = np.random.default_rng(0)
    lam = np.array([0.9, -0.6, 0.35])  # distinct moduli
    V = np.eye(3) + 0.3 * rng.standard_normal((3, 3))
    A = V @ np.diag(lam) @ np.linalg.inv(V)
    return {"A": jnp.asarray(A), "B": jnp.asarray(rng.standard_normal((3, 2)))}, lam


def test_user_jacobian_is_used_by_step_jacobians(x64):
    params, _ = _linear_params()
    jac = _counting(lambda p, c, x: p["A"])
    cell = _linear_cell(jac)
    xs = _randn(0, (2, 4, 2))
    J = step_jacobians(cell, params, xs).jacobians
    assert jac.count > 0
    np.testing.assert_allclose(J, np.broadcast_to(np.asarray(params["A"]), (2, 4, 3, 3)), rtol=0, atol=0)


def test_user_jacobian_is_used_by_lyapunov_spectrum(x64):
    params, lam = _linear_params()
    jac = _counting(lambda p, c, x: p["A"])
    cell = _linear_cell(jac)
    xs = _randn(0, (120, 2))
    spec = lyapunov_spectrum(cell, params, xs, frame_warmup=60, window=20)
    assert jac.count > 0
    np.testing.assert_allclose(spec.exponents, np.sort(np.log(np.abs(lam)))[::-1], rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- 7. hashing and equality


_BUILDERS = {
    "lstm": sj.lstm,
    "gru": sj.gru,
    "rnn": sj.rnn,
    "irnn": sj.irnn,
    "mgu": sj.mgu,
    "janet": sj.janet,
    "tdnn": lambda h: sj.tdnn(h, 3),
    "narx": lambda h: sj.narx(h, 3),
    "stack": lambda h: sj.stack([sj.lstm(5), sj.gru(h)]),
    "learnable_carry": lambda h: sj.learnable_carry(sj.lstm(h)),
    "rnn_orthogonal": lambda h: sj.rnn(h, recurrent_init=sj.initializers.orthogonal()),
    "wrap": lambda h: sjc.wrap(sj.lstm(h), inputs=_double),
}


@pytest.mark.parametrize("name", list(_BUILDERS))
def test_cells_compare_and_hash_by_value(name):
    build = _BUILDERS[name]
    a, b, c = build(8), build(8), build(9)
    assert a is not b
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2


def test_orthogonal_init_options_distinguish_cells():
    a = sj.rnn(4, recurrent_init=sj.initializers.orthogonal())
    assert a == sj.rnn(4, recurrent_init=sj.initializers.orthogonal())
    assert a != sj.rnn(4, recurrent_init=sj.initializers.orthogonal(gain=2.0))
    assert a != sj.rnn(4)


def test_jit_with_static_cell_does_not_retrace_when_rebuilt():
    def f(cell, params, xs):
        return sj.unroll(cell, params, xs)[1].sum()

    counter = TraceCounter(f)
    jf = jax.jit(counter, static_argnums=0)
    params = _params(sj.lstm(4), 2, 0, dtype=jnp.float32)
    xs = jnp.ones((1, 3, 2))
    for _ in range(3):
        jf(sj.lstm(4), params, xs)  # rebuilt each time, as for each checkpoint
    assert counter.count == 1
    jf(sj.lstm(4, forget_bias=1.0), params, xs)  # a different cell does retrace
    assert counter.count == 2

    @chex.assert_max_traces(n=1)
    def g(cell, p):
        return sj.unroll(cell, p, xs)[1].sum()

    jg = jax.jit(g, static_argnums=0)
    jg(sj.learnable_carry(sj.lstm(4)), {"cell": params, "carry0": sj.lstm(4).initial_carry(params, ())})
    jg(sj.learnable_carry(sj.lstm(4)), {"cell": params, "carry0": sj.lstm(4).initial_carry(params, ())})


# --------------------------------------------------------------------------- 8. _replace


_STEP_CAPS = (
    "output",
    "jacobian",
    "jacobian_diagonal",
    "kernel",
    "gates",
    "jacobian_bound",
    "recurrent_blocks",
)


def test_replace_step_drops_every_step_capability():
    cell = sj.rnn(4)  # carries every step capability, jacobian_bound included
    assert all(getattr(cell, name) is not None for name in _STEP_CAPS)

    def new_step(p, c, x):
        return cell.step(p, c, 0.5 * x)

    bare = cell._replace(step=new_step)
    assert bare.step is new_step
    assert all(getattr(bare, name) is None for name in _STEP_CAPS)
    assert bare.input_size == cell.input_size and bare.init == cell.init and bare.meta == cell.meta

    def jac(p, c, x):
        return cell.jacobian(p, c, 0.5 * x)

    kept = cell._replace(step=new_step, jacobian=jac, output=cell.output)
    assert kept.jacobian is jac and kept.output == cell.output
    assert all(getattr(kept, name) is None for name in _STEP_CAPS if name not in ("jacobian", "output"))


def test_replace_init_drops_input_size_and_meta_keeps_everything():
    cell = sj.lstm(4)

    def new_init(key, input_size):
        return cell.init(key, input_size)

    c2 = cell._replace(init=new_init)
    assert c2.input_size is None
    assert all(getattr(c2, name) == getattr(cell, name) for name in _STEP_CAPS)
    meta = sjc.CellMeta("mine", 4)
    c3 = cell._replace(meta=meta)
    assert c3.meta is meta
    assert all(
        getattr(c3, name) == getattr(cell, name) for name in _STEP_CAPS + ("input_size", "step", "init")
    )
    assert c3.capabilities() == cell.capabilities()


# --------------------------------------------------------------------------- 9. the dtype rule


def _dtype_cases(fast):
    """``(params dtype, inputs dtype)`` pairs; those not in ``fast`` run with ``--runslow``."""
    cases = []
    for pdt in (jnp.float32, jnp.float64):
        for xdt in (jnp.float32, jnp.float64):
            name = f"p{np.dtype(pdt).itemsize * 8}-x{np.dtype(xdt).itemsize * 8}"
            marks = () if name in fast else (pytest.mark.slow,)
            cases.append(pytest.param(pdt, xdt, id=name, marks=marks))
    return cases


@pytest.mark.parametrize("name", ["lstm", pytest.param("gru", marks=pytest.mark.slow)])
@pytest.mark.parametrize("pdt,xdt", _dtype_cases(fast=("p32-x64", "p64-x32")))
def test_dtype_rule_unroll_and_grads(name, pdt, xdt, x64):
    cell = sj.lstm(3) if name == "lstm" else sj.gru(3)
    params = _params(cell, 2, 0, dtype=pdt)
    xs = _randn(1, (2, 4, 2), dtype=xdt)
    want = jnp.result_type(pdt, xdt)
    tol = 1e-12 if want == jnp.float64 else 1e-5
    p64, x64_ = _cast(params, jnp.float64), xs.astype(jnp.float64)  # the same values, float64

    _, ys = sj.unroll(cell, params, xs)
    _, ys_ref = sj.unroll(cell, p64, x64_)
    assert ys.dtype == want
    np.testing.assert_allclose(ys, ys_ref, rtol=tol, atol=tol)

    def loss(p, x):
        return jnp.sum(jnp.sin(sj.unroll(cell, p, x)[1]))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    g, gx = grad(params, xs)
    g_ref, _ = grad(p64, x64_)
    # Gradients come back in each argument's own dtype: a float32 one is rounded to float32.
    gtol = 1e-5 if pdt == jnp.float32 else tol
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        assert a.dtype == pdt
        np.testing.assert_allclose(a, b, rtol=gtol, atol=gtol)
    assert gx.dtype == xdt


@pytest.mark.parametrize("name", ["lstm", pytest.param("gru", marks=pytest.mark.slow)])
@pytest.mark.parametrize("pdt,xdt", _dtype_cases(fast=("p32-x64",)))
def test_dtype_rule_lyapunov_spectrum(name, pdt, xdt, x64):
    cell = sj.lstm(3) if name == "lstm" else sj.gru(3)
    params = _params(cell, 2, 0, dtype=pdt)
    xs = _randn(1, (12, 2), dtype=xdt)
    want = jnp.result_type(pdt, xdt)
    spec = lyapunov_spectrum(cell, params, xs, window=6)
    ref = lyapunov_spectrum(cell, _cast(params, jnp.float64), xs.astype(jnp.float64), window=6)
    assert spec.exponents.dtype == want
    tol = 1e-12 if want == jnp.float64 else 1e-5
    np.testing.assert_allclose(spec.exponents, ref.exponents, rtol=tol, atol=tol)


def test_dtype_rule_complex_input_raises(x64):
    cell = sj.lstm(3)
    params = _params(cell, 2, 0, dtype=jnp.float32)
    xs = jnp.ones((1, 4, 2), jnp.complex64)
    with pytest.raises(ValueError, match="complex"):
        sj.unroll(cell, params, xs)
    with pytest.raises(ValueError, match="complex"):
        lyapunov_spectrum(cell, params, xs[0])


# --------------------------------------------------------------------------- review fixes


def test_cells_copy_pickle_and_tree_map():
    """Cells survive copy, deepcopy, pickle and a JAX tree_map (the keyword-only constructor is
    bypassed by Cell._make), and stay equal to the original."""
    import copy
    import pickle

    for cell in (sj.lstm(4), sj.gru(3), sj.stack([sj.rnn(3), sj.lstm(2)]), sj.learnable_carry(sj.gru(2))):
        assert copy.copy(cell) == cell and copy.deepcopy(cell) == cell
        assert pickle.loads(pickle.dumps(cell)) == cell
        assert jax.tree_util.tree_map(lambda f: f, {"c": cell})["c"] == cell


def test_initializers_accept_array_arguments():
    """An initialiser built from a JAX scalar (unhashable) still works and is held by identity."""
    init = sj.initializers.uniform(jnp.float32(0.1))
    w = init(jax.random.key(0), (3, 4))
    assert w.shape == (3, 4) and float(jnp.max(jnp.abs(w))) <= 0.1
    cell = sj.rnn(4, recurrent_init=sj.initializers.constant(np.array(0.5)))
    np.testing.assert_array_equal(cell.init(jax.random.key(0), 2)["w_h"], np.full((4, 4), 0.5, np.float32))


def test_tbptt_follows_the_dtype_rule(x64):
    """float32 params with float64 streams: tbptt computes in float64 (no scan carry mismatch)
    and returns gradients in the params' dtype, equal to the float64 computation."""
    cell = sj.rnn(4)
    p32 = cell.init(jax.random.key(0), 2)
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((3, 10, 2)))
    losses, grads, _ = sj.tbptt(cell, p32, xs, lambda y: jnp.sum(y**2), chunk=5)
    p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p32)
    losses64, grads64, _ = sj.tbptt(cell, p64, xs, lambda y: jnp.sum(y**2), chunk=5)
    assert losses.dtype == jnp.float64 and grads["w_h"].dtype == jnp.float32
    np.testing.assert_allclose(losses, losses64, rtol=1e-12)
    np.testing.assert_allclose(grads["w_h"], np.asarray(grads64["w_h"], np.float32), rtol=1e-6)


def test_cli_gate_names_follow_block_order():
    """The names of w_h's column blocks come from the gates capability in block order (not the
    sorted keys eval_shape would give)."""
    from seqjax.diagnose import gate_names as _gate_names  # the CLI's helper, moved to diagnose

    for cell, want in (
        (sj.lstm(3), ["i", "f", "g", "o"]),
        (sj.gru(3), ["r", "z", "n"]),
        (sj.janet(3), ["f", "c_tilde"]),
    ):
        p = cell.init(jax.random.key(0), 2)
        assert _gate_names(cell, p, 2, len(want)) == want
