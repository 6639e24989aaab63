"""Gradient strategies (``seqjax.gradients``) and solvers (``seqjax.solvers``).

Every combination the strategies accept is checked against one independent reference: a
float64 NumPy backpropagation through time for the Elman cell written from the equations
(``delta_t = dL/dh_t * (1 - h_t^2)``, ``dL/dh_{t-1} += delta_t W_h^T``,
``dW_h = sum_t h_{t-1}^T delta_t``), with held (masked) steps passing the gradient through,
reversal, and truncation cutting ``dL/dh_{t-1}`` at scan positions ``k, 2k, ...``. Every
combination they refuse is checked for its error message. Float64 (rtol 1e-10): the
strategies differ only in how the same sums are ordered.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj
from seqjax.cells import Kernel
from seqjax.gradients import Auto, Autodiff, Fused, Remat, Truncate
from seqjax.solvers import Sequential, Solver

B, T, I, H = 2, 7, 3, 4
K = 3  # truncation period
TOL = {"rtol": 1e-10, "atol": 1e-12}

ACCEPTED = [
    Auto(),
    Fused(),
    Autodiff(),
    Remat(),
    Remat(3),
    Truncate(K),
    Truncate(K, base=Fused()),
    Truncate(K, base=Autodiff()),
    Truncate(K, base=Remat()),
    Truncate(K, base=Remat(2)),
]
NEEDS_KERNEL = {repr(Fused()), repr(Truncate(K, base=Fused()))}


def _truncation(g) -> int | None:
    return g.every if isinstance(g, Truncate) else None


# --------------------------------------------------------------------------- the reference


def numpy_bptt(p, xs, c0, w, v, mask, reverse, k):
    """Values and gradients of L = sum_t <w_t, y_t> + <v, c_T> for the Elman tanh cell."""
    wx, wh, b = (np.asarray(p[n], np.float64) for n in ("w_x", "w_h", "b"))
    order = list(range(T))[::-1] if reverse else list(range(T))
    c = np.asarray(c0, np.float64)
    prev, hs, ys = [], [], np.zeros((B, T, H))
    for t in order:
        h = np.tanh(xs[:, t] @ wx + c @ wh + b)
        m = mask[:, t][:, None]
        prev.append(c)
        hs.append(h)
        c = np.where(m, h, c)
        ys[:, t] = np.where(m, h, 0.0)
    final = c
    g = np.array(v, np.float64)
    grads = {"w_x": np.zeros_like(wx), "w_h": np.zeros_like(wh), "b": np.zeros_like(b)}
    dxs = np.zeros_like(xs)
    for s in reversed(range(T)):
        t = order[s]
        m = mask[:, t][:, None]
        delta = np.where(m, (w[:, t] + g) * (1.0 - hs[s] ** 2), 0.0)
        grads["w_h"] += prev[s].T @ delta
        grads["w_x"] += xs[:, t].T @ delta
        grads["b"] += delta.sum(0)
        dxs[:, t] = delta @ wx.T
        g = delta @ wh.T + np.where(m, 0.0, g)
        if k is not None and s % k == 0 and s > 0:  # the carry entering scan position s is cut
            g = np.zeros_like(g)
    return ys, final, grads, dxs, g


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    p = {
        "w_x": rng.standard_normal((I, H)) * 0.6,
        "w_h": rng.standard_normal((H, H)) * 0.5,
        "b": rng.standard_normal(H) * 0.1,
    }
    xs = rng.standard_normal((B, T, I))
    c0 = rng.standard_normal((B, H)) * 0.3
    w = rng.standard_normal((B, T, H))
    v = rng.standard_normal((B, H))
    mask = np.ones((B, T), bool)
    mask[0, 2] = mask[1, 5] = mask[1, 6] = False
    return p, xs, c0, w, v, mask


def _run(cell, gradient, reverse, problem, solver=None):
    p, xs, c0, w, v, mask = problem

    @jax.jit
    def value_and_grads(p, xs, c0):
        def loss(p, xs, c0):
            final, ys = sj.unroll(
                cell, p, xs, carry=c0, mask=mask, reverse=reverse, gradient=gradient, solver=solver
            )
            return jnp.sum(ys * w) + jnp.sum(final * v), (ys, final)

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(p, xs, c0)

    (_, (ys, final)), grads = value_and_grads(p, xs, c0)
    return ys, final, grads


def _accepted_cases():
    """(gradient, with_kernel, reverse) for every combination the strategies accept. A
    kernel-less cell under ``Fused`` is refused (``test_fused_refusals``), so it is not a case;
    reversal runs in the slow suite, without a kernel only for the ``Truncate`` strategies
    (the plain reverse scan itself is the same for all of them)."""
    cases = []
    for g in ACCEPTED:
        for with_kernel in (True, False):
            if not with_kernel and repr(g) in NEEDS_KERNEL:
                continue
            name = f"{g!r}-{'kernel' if with_kernel else 'no-kernel'}"
            cases.append(pytest.param(g, with_kernel, False, id=f"{name}-forward"))
            if with_kernel or isinstance(g, Truncate):
                cases.append(pytest.param(g, with_kernel, True, id=f"{name}-reverse", marks=pytest.mark.slow))
    return cases


@pytest.mark.parametrize("gradient, with_kernel, reverse", _accepted_cases())
def test_accepted_strategy_matches_numpy_bptt(x64, problem, gradient, with_kernel, reverse):
    cell = sj.rnn(H) if with_kernel else sj.rnn(H)._replace(kernel=None)
    p, xs, c0, w, v, mask = problem
    ys, final, (gp, gx, gc) = _run(cell, gradient, reverse, problem)
    want_ys, want_final, want_gp, want_gx, want_gc = numpy_bptt(
        p, xs, c0, w, v, mask, reverse, _truncation(gradient)
    )
    np.testing.assert_allclose(ys, want_ys, **TOL)
    np.testing.assert_allclose(final, want_final, **TOL)
    for name in want_gp:
        np.testing.assert_allclose(gp[name], want_gp[name], err_msg=name, **TOL)
    np.testing.assert_allclose(gx, want_gx, **TOL)
    np.testing.assert_allclose(gc, want_gc, **TOL)


def test_truncation_changes_the_gradient(x64, problem):
    """The reference itself: truncation must matter on this problem (else the test above
    could not tell a strategy that ignores it)."""
    p, xs, c0, w, v, mask = problem
    full = numpy_bptt(p, xs, c0, w, v, mask, False, None)[2]["w_h"]
    cut = numpy_bptt(p, xs, c0, w, v, mask, False, K)[2]["w_h"]
    assert np.max(np.abs(full - cut)) > 1e-3


def _jaxpr(cell, gradient):
    xs = jnp.ones((B, T, I))
    p = cell.init(jax.random.key(0), I)
    return str(jax.make_jaxpr(lambda p: sj.unroll(cell, p, xs, gradient=gradient)[1])(p))


@pytest.mark.parametrize(
    "gradient, kernel, remat",
    [
        (Auto(), True, False),
        (Fused(), True, False),
        (Autodiff(), False, False),
        (Remat(), False, True),
        (Remat(3), False, True),
        (Truncate(K, base=Fused()), True, False),
        (Truncate(K, base=Remat(2)), False, True),
    ],
    ids=repr,
)
def test_strategy_runs_what_it_says(gradient, kernel, remat):
    """The program itself: a kernel is a custom_vjp call, rematerialisation a checkpoint."""
    jaxpr = _jaxpr(sj.lstm(H), gradient)
    assert ("custom_vjp_call" in jaxpr) == kernel
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == remat


# --------------------------------------------------------------------------- refusals


def test_fused_refusals():
    xs = jnp.ones((B, T, I))
    cell = sj.rnn(H)
    p = cell.init(jax.random.key(0), I)
    no_kernel = cell._replace(kernel=None)
    with pytest.raises(ValueError, match=r"gradient=Fused\(\) cannot run here: the cell has no kernel"):
        sj.unroll(no_kernel, p, xs, gradient=Fused())
    with pytest.raises(ValueError, match="no kernel capability"):
        sj.unroll(no_kernel, p, xs, gradient=Truncate(2, base=Fused()))
    with pytest.raises(ValueError, match="gates were asked for"):
        sj.trajectory(cell, p, xs, gates=True, gradient=Fused())
    narrow = cell._replace(kernel=Kernel(cell.kernel.run, frozenset({"trajectory"})))
    with pytest.raises(ValueError, match="does not accept 'mask'"):
        sj.unroll(narrow, p, xs, lengths=jnp.array([3, 7]), gradient=Fused())
    with pytest.raises(ValueError, match="does not accept 'truncate'"):
        sj.unroll(narrow, p, xs, gradient=Truncate(2, base=Fused()))
    with pytest.raises(ValueError, match="does not accept 'reverse'"):
        sj.unroll(narrow, p, xs, reverse=True, gradient=Fused())
    with pytest.raises(ValueError, match="T = 0"):
        sj.unroll(cell, p, jnp.ones((B, 0, I)), gradient=Fused())
    # Auto falls back where Fused refuses, with the same values
    np.testing.assert_allclose(
        sj.unroll(narrow, p, xs, reverse=True)[1],
        sj.unroll(cell, p, xs, reverse=True, gradient=Autodiff())[1],
        rtol=1e-6,
    )


def test_strategy_construction_errors():
    with pytest.raises(ValueError, match="one schedule of cut points"):
        Truncate(4, base=Truncate(2))
    with pytest.raises(TypeError, match="must be a gradient strategy"):
        Truncate(4, base="fused")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"Truncate\(every=...\) must be a positive integer"):
            Truncate(bad)
        with pytest.raises(ValueError, match=r"Remat\(every=...\) must be a positive integer"):
            Remat(bad)
    xs = jnp.ones((B, T, I))
    cell = sj.rnn(H)
    p = cell.init(jax.random.key(0), I)
    with pytest.raises(TypeError, match="gradient must be a seqjax.gradients strategy"):
        sj.unroll(cell, p, xs, gradient="autodiff")
    with pytest.raises(TypeError, match="solver must be a seqjax.solvers.Solver"):
        sj.unroll(cell, p, xs, solver=4)
    with pytest.raises(ValueError, match="Sequential"):
        Sequential(unroll=0)


def test_strategies_are_static_arguments():
    """Frozen and hashable: equal strategies are one jit cache entry."""
    assert hash(Truncate(3, base=Remat(2))) == hash(Truncate(3, base=Remat(2)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        Remat(2).every = 3
    cell = sj.rnn(H)
    p = cell.init(jax.random.key(0), I)
    xs = jnp.ones((B, T, I))
    traces = []

    def run(p, xs, gradient):
        traces.append(1)
        return sj.unroll(cell, p, xs, gradient=gradient)[1]

    f = jax.jit(run, static_argnames="gradient")
    f(p, xs, gradient=Remat(2))
    f(p, xs, gradient=Remat(2))
    assert len(traces) == 1


# --------------------------------------------------------------------------- solvers


@dataclasses.dataclass(frozen=True)
class PythonLoop(Solver):
    """A solver of the test's own: a Python loop over time (no kernels)."""

    def scan(self, body, carry0, xs, *, reverse=False):
        n = jax.tree_util.tree_leaves(xs)[0].shape[0]
        outs = []
        c = carry0
        for t in reversed(range(n)) if reverse else range(n):
            c, o = body(c, jax.tree_util.tree_map(lambda a, t=t: None if a is None else a[t], xs))
            outs.append(o)
        if reverse:
            outs = outs[::-1]
        return c, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)


def test_a_solver_of_ones_own_plugs_in(x64, problem):
    """The solver slot: a user's solver is used for the time axis; it runs no kernel, so
    Auto falls back to autodiff and Fused refuses, naming the solver."""
    p, xs, c0, w, v, mask = problem
    ys, final, (gp, _, _) = _run(sj.rnn(H), Auto(), True, problem, solver=PythonLoop())
    want_ys, want_final, want_gp, _, _ = numpy_bptt(p, xs, c0, w, v, mask, True, None)
    np.testing.assert_allclose(ys, want_ys, **TOL)
    np.testing.assert_allclose(gp["w_h"], want_gp["w_h"], **TOL)
    with pytest.raises(ValueError, match="does not run kernels"):
        sj.unroll(sj.rnn(H), p, xs, solver=PythonLoop(), gradient=Fused())


def test_sequential_unroll_changes_nothing(problem):
    p, xs, c0, w, v, mask = problem
    cell = sj.lstm(H)
    params = cell.init(jax.random.key(1), I)
    a = sj.unroll(cell, params, jnp.asarray(xs, jnp.float32), solver=Sequential(unroll=3))
    b = sj.unroll(cell, params, jnp.asarray(xs, jnp.float32))
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6, atol=1e-6)
