"""Parallel-in-time solvers (``seqjax.solvers``: DEER, QuasiDEER, ELK, QuasiELK) and
``seqjax.unroll.solve``.

Oracles, all float64 unless stated:

* the sequential unroll (``lax.scan``) for values, and ``jax.grad`` of it (BPTT,
  ``gradient=Autodiff()``) for gradients;
* Newton's finite termination on the block-triangular stacked residual: after ``k`` DEER
  iterations from any guess the first ``k`` steps are exact;
* a dense Levenberg-Marquardt solve in NumPy, ``(J_r^T J_r + lambda I) Delta = -J_r^T r``,
  with the residual ``r`` and its Jacobian ``J_r`` (``jax.jacfwd``) written out here from
  ``cell.step``;
* a linear cell whose recurrence ``s_t = A_t s_{t-1} + b_t`` is stated in this file.

Compiles dominate the time (one per jitted function, seconds each on 2 cores): two
(cell, solver) pairs run by default, the rest of the matrix, the chaotic cell and the
eager paths in the slow tier (``pytest.mark.slow``).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64_enabled

import seqjax as sj
from seqjax.gradients import Autodiff, Fused, Remat, Truncate
from seqjax.solvers import DEER, ELK, QuasiDEER, QuasiELK, Sequential, Solution, dense_bytes
from seqjax.unroll import solve

B, T, I = 2, 20, 3


# --------------------------------------------------------------------------- cells


def _user_init(key, input_size, *, H=3):
    k1, k2 = jax.random.split(key)
    return {
        "a": 0.6 * jax.random.normal(k1, (input_size, H)),
        "w": 0.4 * jax.random.normal(k2, (H, H)),
    }


def _user_carry(params, batch_shape=()):
    z = jnp.zeros(tuple(batch_shape) + (params["w"].shape[0],), params["w"].dtype)
    return (z, z)


def _user_step(params, carry, x):
    """A cell of a user's own: two carry leaves, no capabilities (so Jacobians come from
    forward-mode passes of the step), output not equal to the carry."""
    h, z = carry
    h2 = 0.9 * jnp.tanh(x @ params["a"] + h @ params["w"]) + 0.05 * z
    z2 = 0.5 * z + jnp.sin(h2)
    return (h2, z2), h2 * z2


USER = sj.Cell(_user_init, _user_carry, _user_step)
CELLS = {"rnn": lambda: sj.rnn(4), "lstm": lambda: sj.lstm(3), "gru": lambda: sj.gru(4), "user": lambda: USER}
SOLVERS = {"deer": DEER(), "quasi_deer": QuasiDEER(), "elk": ELK(), "quasi_elk": QuasiELK()}


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


@pytest.fixture(scope="module")
def problem():
    """Float64 data shared by the exactness tests: inputs, a nonzero initial carry per cell,
    lengths (one sequence shorter), a reset, and the loss weights."""
    with x64_enabled():
        rng = np.random.default_rng(0)
        xs = jnp.asarray(rng.standard_normal((B, T, I)))
        lengths = jnp.array([T, 13])
        resets = jnp.zeros((B, T), bool).at[0, 7].set(True)
        yield xs, lengths, resets, rng


def _loss_and_parts(cell, solver, reverse, wy, wc, grad=True):
    """``loss(params, xs, carry)`` through ``trajectory`` (values, carries) with lengths,
    resets, a given carry and ``reverse``, and the parts it returns as ``aux``; jitted with
    its gradient (``grad``) or alone."""

    def loss(params, xs, carry, lengths, resets):
        kw = {"gradient": Autodiff()} if isinstance(solver, Sequential) else {}
        tr = sj.trajectory(
            cell,
            params,
            xs,
            carry=carry,
            lengths=lengths,
            resets=resets,
            reverse=reverse,
            solver=solver,
            **kw,
        )
        value = jnp.sum(tr.ys * wy) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree_util.tree_leaves(tr.carry))
        value = value + sum(jnp.sum(a * wc) for a in jax.tree_util.tree_leaves(tr.carries))
        return value, (tr.carry, tr.ys, tr.carries)

    if grad:
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    return jax.jit(loss)


# Every (cell, solver) pair runs, half of them reversed. Two run by default: the user's cell
# (no capabilities: Jacobians by forward-mode passes) under DEER forward, and the Elman cell
# under QuasiDEER reversed; the other pairs (seconds of compiling each) are in the slow tier.
# Gradients are checked under DEER and QuasiDEER: the damped solvers share their adjoint
# (which depends on the Jacobians' form, dense or diagonal, not on the forward iteration).
_DEFAULT = {("user", "deer"): False, ("rnn", "quasi_deer"): True}


def _pair(i, c, j, s):
    reverse = _DEFAULT.get((c, s), (i + j) % 2 == 1)
    marks = () if (c, s) in _DEFAULT else pytest.mark.slow
    return pytest.param(c, s, reverse, id=f"{c}-{s}-{'rev' if reverse else 'fwd'}", marks=marks)


_PAIRS = [_pair(i, c, j, s) for i, c in enumerate(CELLS) for j, s in enumerate(SOLVERS)]


@pytest.mark.parametrize("cell_name, solver_name, reverse", _PAIRS)
def test_converged_solve_and_its_gradient_equal_the_sequential_scan(problem, cell_name, solver_name, reverse):
    """Values (final carry, outputs, every carry) and, for DEER and QuasiDEER, gradients
    (params, inputs, initial carry) under lengths, a reset and a given initial carry equal
    the sequential scan and BPTT. Tolerance 1e-8 (the issue's): the default tol stops at a
    residual of 100 eps of the state's scale, and the error is that residual times
    ||J_r^{-1}||, below 1e4 for these contracting cells."""
    xs, lengths, resets, rng = problem
    with x64_enabled():
        cell = CELLS[cell_name]()
        params = _f64(cell.init(jax.random.key(1), I))
        carry = jax.tree_util.tree_map(
            lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape)), cell.initial_carry(params, (B,))
        )
        _, ys_ref = sj.unroll(cell, params, xs)
        wy = jnp.asarray(rng.standard_normal(ys_ref.shape))
        wc = jnp.asarray(rng.standard_normal((B, T, 1)))
        args = (params, xs, carry, lengths, resets)
        grad = solver_name in ("deer", "quasi_deer")
        ref = _loss_and_parts(cell, Sequential(), reverse, wy, wc, grad)(*args)
        got = _loss_and_parts(cell, SOLVERS[solver_name], reverse, wy, wc, grad)(*args)
        (v_ref, parts_ref), (v, parts) = (ref[0], got[0]) if grad else (ref, got)
        chex.assert_trees_all_close(parts, parts_ref, rtol=0, atol=1e-8)
        chex.assert_trees_all_close(v, v_ref, rtol=1e-10)
        if grad:
            chex.assert_trees_all_close(got[1], ref[1], rtol=0, atol=1e-8)


# --------------------------------------------------------------------------- Newton's finite termination


def _elman(H, gain, dtype, seed=0, input_size=2):
    """An Elman cell whose recurrent matrix has spectral radius ``gain``."""
    cell = sj.rnn(H)
    params = jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float64), cell.init(jax.random.key(seed), input_size)
    )
    params["w_h"] = params["w_h"] * (gain / np.max(np.abs(np.linalg.eigvals(params["w_h"]))))
    return cell, jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)


def test_deer_from_zeros_fixes_one_more_step_per_iteration_and_warm_starts(x64):
    """Newton on the block lower-triangular residual: after k iterations from any guess the
    first k carries are exact, so T iterations always suffice. An expanding cell (gain 2.5)
    makes DEER need many iterations, so the property is visible. One iteration per call,
    warm-started from the previous call's carries; residuals[0] is the guess's residual."""
    Tn = 20
    cell, params = _elman(4, 2.5, jnp.float64)
    xs = jax.random.normal(jax.random.key(2), (Tn, 2), jnp.float64)
    ref = sj.trajectory(cell, params, xs).carries

    def f(s, x):
        return cell.step(params, s, x)[0]

    @jax.jit
    def one_iteration(guess):
        sol = solve(cell, params, xs, DEER(max_iter=1, guess=guess))
        prev = jnp.concatenate([jnp.zeros((1, 4)), guess[:-1]])
        residual = jnp.max(jnp.abs(guess - jax.vmap(f)(prev, xs)))  # of the guess, from the step
        return sol.carries, sol.residuals, sol.iterations, residual

    guess = jnp.zeros((Tn, 4))
    exact_from = None
    for k in range(1, Tn + 1):
        guess, residuals, iterations, residual_of_guess = one_iteration(guess)
        np.testing.assert_allclose(residuals[0], residual_of_guess, rtol=1e-12)
        err = np.max(np.abs(np.asarray(guess - ref)), axis=-1)  # (T,)
        assert np.all(err[:k] < 1e-12), (k, err)  # the first k steps are exact (to rounding)
        if exact_from is None and np.all(err < 1e-12):
            exact_from = k
    assert exact_from is not None and exact_from <= Tn
    assert exact_from > 4, "an expanding cell should need several Newton iterations"
    # A warm start from the solution: nothing to do, and the result is kept.
    carries, residuals, iterations, _ = one_iteration(guess)
    assert int(iterations) == 0
    np.testing.assert_allclose(carries, guess, rtol=0, atol=0)


# --------------------------------------------------------------------------- ELK is Levenberg-Marquardt


def _stacked_residual(cell, params, xs, s0):
    """``r(s) = s_t - f(s_{t-1}, x_t)`` of the flattened trajectory ``s: (T*S,)``."""
    Tn, S = xs.shape[0], s0.shape[0]

    def r(flat):
        s = flat.reshape(Tn, S)
        prev = jnp.concatenate([s0[None], s[:-1]])
        return (s - jax.vmap(lambda c, x: cell.step(params, c, x)[0])(prev, xs)).reshape(-1)

    return r


@pytest.mark.parametrize(
    "solver_cls, diagonal",
    [(ELK, False), pytest.param(QuasiELK, True, marks=pytest.mark.slow)],
    ids=["elk", "quasi_elk"],
)
def test_elk_step_is_the_dense_levenberg_marquardt_step(x64, solver_cls, diagonal):
    """One ELK iteration from a random guess equals ``(J_r^T J_r + lambda I) Delta =
    -J_r^T r`` solved densely (T=6, S=3). For QuasiELK, ``J_r`` keeps only the diagonals of
    its off-diagonal blocks. Float64, 1e-12 (a 18x18 solve of a well-conditioned system)."""
    Tn, H, lam = 6, 3, 0.7
    cell, params = _elman(H, 1.5, jnp.float64, seed=3)
    xs = jax.random.normal(jax.random.key(4), (Tn, 2), jnp.float64)
    guess = 0.5 * jax.random.normal(jax.random.key(5), (Tn, H), jnp.float64)
    solver = solver_cls(damping=lam, adaptive=False, max_iter=1, tol=1e-300)
    sol = jax.jit(lambda g: solve(cell, params, xs, dataclasses.replace(solver, guess=g)))(guess)
    assert int(sol.iterations) == 1
    r_fn = _stacked_residual(cell, params, xs, jnp.zeros(H))
    r = np.asarray(jax.jit(r_fn)(guess.reshape(-1)))
    Jr = np.asarray(jax.jit(jax.jacfwd(r_fn))(guess.reshape(-1)))
    if diagonal:  # keep identity blocks and the diagonals of the -J_t blocks
        blocks = Jr.reshape(Tn, H, Tn, H)
        keep = np.eye(H, dtype=bool)[None, :, None, :] | (
            np.arange(Tn)[:, None, None, None] == np.arange(Tn)[None, None, :, None]
        )
        Jr = np.where(keep, blocks, 0.0).reshape(Tn * H, Tn * H)
    delta = np.linalg.solve(Jr.T @ Jr + lam * np.eye(Tn * H), -Jr.T @ r).reshape(Tn, H)
    np.testing.assert_allclose(np.asarray(sol.carries - guess), delta, rtol=0, atol=1e-12)
    # ... and it is not the Newton step (the damping acts).
    assert np.max(np.abs(np.linalg.solve(Jr, -r).reshape(Tn, H) - delta)) > 1e-3


# --------------------------------------------------------------------------- a chaotic cell


@pytest.mark.slow
def test_chaotic_cell_failure_is_reported_and_nothing_is_nan():
    """Elman with recurrent gain 3 (spectral radius 3, chaotic), T=200, float32 (the dtype in
    which undamped Newton overflows): DEER's first step overflows; the solve stops, keeps
    the last finite iterate and reports it (``unroll`` would raise, as tested below on a
    small case). ELK (adaptive damping)
    rejects overflowing steps and either converges (then it matches the scan) or says it did
    not. No NaN or inf in any output."""
    Tn = 200
    cell, params = _elman(4, 3.0, jnp.float32, seed=0)
    xs = 0.1 * jax.random.normal(jax.random.key(1), (Tn, 2), jnp.float32)
    ref = sj.trajectory(cell, params, xs)

    def finite(sol):
        return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree_util.tree_leaves(sol))

    deer = jax.jit(lambda p, xs: solve(cell, p, xs, DEER()))(params, xs)
    assert finite(deer)
    assert not bool(deer.converged) and bool(deer.nonfinite)
    assert int(deer.iterations) == 1  # the first step overflowed and was not taken
    np.testing.assert_array_equal(deer.carries, jnp.zeros((Tn, 4)))  # the guess is kept

    elk = jax.jit(lambda p, xs: solve(cell, p, xs, ELK(max_iter=30)))(params, xs)
    assert finite(elk)
    assert not bool(elk.nonfinite)  # adaptive damping rejects an overflowing step instead
    # An accepted step must lower sum r^2 (the stacked residual, recomputed here from the step).
    r_fn = _stacked_residual(cell, params, xs, jnp.zeros(4, jnp.float32))
    sum_sq = lambda s: float(np.sum(np.asarray(r_fn(s.reshape(-1)), np.float64) ** 2))  # noqa: E731
    assert sum_sq(elk.carries) < sum_sq(jnp.zeros((Tn, 4), jnp.float32))
    if bool(elk.converged):
        np.testing.assert_allclose(elk.carries, ref.carries, atol=1e-3)
    else:
        assert int(elk.iterations) == 30


# --------------------------------------------------------------------------- linear recurrences


def _lin_init(key, input_size, *, H=3):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "u": jax.random.normal(k1, (input_size, H)),
        "v": jax.random.normal(k2, (input_size, H)),
        "rot": 0.5 * jax.random.normal(k3, (H, H)),
    }


def _lin_carry(params, batch_shape=()):
    return jnp.zeros(tuple(batch_shape) + (params["u"].shape[1],), params["u"].dtype)


def _lin_diag_step(params, s, x):
    """``s_t = sigmoid(x u) * s_{t-1} + x v``: diagonal ``A_t`` from the input alone."""
    s = jax.nn.sigmoid(x @ params["u"]) * s + x @ params["v"]
    return s, 2.0 * s


def _lin_diag(params, x):
    return jax.nn.sigmoid(x @ params["u"]), x @ params["v"]


def _lin_dense_step(params, s, x):
    """``s_t = (diag(sigmoid(x u)) R) s_{t-1} + x v`` with ``R = tanh(rot)``: dense ``A_t``."""
    A = _lin_dense(params, x)[0] if x.ndim == 1 else jax.vmap(lambda xx: _lin_dense(params, xx)[0])(x)
    s = jnp.einsum("...ij,...j->...i", A, s) + x @ params["v"]
    return s, s


def _lin_dense(params, x):
    return jax.nn.sigmoid(x @ params["u"])[:, None] * jnp.tanh(params["rot"]), x @ params["v"]


def _linear_cell(dense):
    if "linear_recurrence" not in sj.Cell._fields:
        pytest.skip("the linear_recurrence capability has not landed")
    step, lin = (_lin_dense_step, _lin_dense) if dense else (_lin_diag_step, _lin_diag)
    return sj.Cell(_lin_init, _lin_carry, step, linear_recurrence=lin)


@pytest.mark.parametrize(
    "dense, solver",
    [(False, QuasiELK()), pytest.param(True, DEER(), marks=pytest.mark.slow)],
    ids=["diagonal-quasi_elk", "dense-deer"],
)
def test_a_cell_linear_in_its_state_is_solved_by_one_scan(problem, dense, solver):
    """A cell with ``linear_recurrence``: one undamped scan with its own ``A_t`` is the
    answer whatever the solver (even a damped, diagonal one), under lengths, resets and
    reverse; gradients equal BPTT. Float64, 1e-10 (one scan of 20 contracting steps)."""
    xs, lengths, resets, rng = problem
    with x64_enabled():
        cell = _linear_cell(dense)
        params = _f64(cell.init(jax.random.key(0), I))
        opts = {"lengths": lengths, "resets": resets, "reverse": True}

        def loss(p, xs, s):
            sol = solve(cell, p, xs, s, **opts)
            return jnp.sum(sol.ys**2) + jnp.sum(jnp.cos(sol.final)), sol

        (v, sol), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)(
            params, xs, solver
        )
        (v_ref, ref), g_ref = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, xs, Sequential())
        np.testing.assert_array_equal(sol.iterations, [1, 1])
        assert bool(jnp.all(sol.converged))
        chex.assert_trees_all_close(
            (sol.carries, sol.ys, v), (ref.carries, ref.ys, v_ref), rtol=1e-10, atol=1e-10
        )
        chex.assert_trees_all_close(g, g_ref, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- failures and refusals


@pytest.fixture(scope="module")
def small():
    cell = sj.rnn(4)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, 12, I))
    return cell, params, xs


def _ys_of(cell, solver):
    def ys_of(p, xs):
        return sj.unroll(cell, p, xs, solver=solver)[1]

    return ys_of


def test_non_convergence_raises_under_jit_or_falls_back_to_the_scan(small):
    """One iteration cannot finish an Elman cell over 12 steps: under ``jit`` a host callback raises
    (a ``JaxRuntimeError`` whose message names the solver, the sequence, the iterations and
    the residual), and ``on_failure="sequential"`` returns the sequential scan (float32:
    1e-6)."""
    cell, params, xs = small
    _, ys_ref = sj.unroll(cell, params, xs)
    with pytest.raises(
        jax.errors.JaxRuntimeError, match=r"DEER did not converge.*index \(0,\).*max_iter=1 reached"
    ):
        jax.block_until_ready(jax.jit(_ys_of(cell, DEER(max_iter=1)))(params, xs))
    ys = jax.jit(_ys_of(cell, QuasiDEER(max_iter=1, on_failure="sequential")))(params, xs)
    np.testing.assert_allclose(ys, ys_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_non_convergence_raises_eagerly_and_the_fallback_differentiates(small):
    """Eager calls raise a ``ValueError`` at once; gradients through the sequential fallback
    are BPTT's (float32: 1e-5)."""
    cell, params, xs = small
    with pytest.raises(
        ValueError, match=r"DEER did not converge for the sequence at batch index \(0,\): max_iter=1"
    ):
        _ys_of(cell, DEER(max_iter=1))(params, xs[:, :4])
    ys_of = _ys_of(cell, QuasiDEER(max_iter=1, on_failure="sequential"))
    g = jax.jit(jax.grad(lambda p, xs: jnp.sum(ys_of(p, xs))))(params, xs)
    g_ref = jax.grad(lambda p: jnp.sum(sj.unroll(cell, p, xs)[1]))(params)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_refusals_name_the_argument_and_what_it_needs(small):
    cell, params, xs = small
    with pytest.raises(ValueError, match=r"T=12, S=4, batch=2.*above memory_limit=1,000 bytes"):
        sj.unroll(cell, params, xs, solver=DEER(memory_limit=1000))
    assert dense_bytes(12, 4, batch=2, itemsize=4) > 1000
    for gradient, what in [
        (Truncate(4), "truncated BPTT"),
        (Remat(2), "rematerialisation"),
        (Autodiff(), "adjoint"),
        (Fused(), "does not run kernels"),
    ]:
        with pytest.raises(ValueError, match=what):
            sj.unroll(cell, params, xs, solver=DEER(), gradient=gradient)
    with pytest.raises(ValueError, match=r"guess=.*needs \(2, 12, 4\)"):
        sj.unroll(cell, params, xs, solver=DEER(guess=jnp.zeros((12, 2, 4))))
    for bad, what in [
        (lambda: DEER(tol=-1.0), "tol"),
        (lambda: QuasiDEER(max_iter=0), "max_iter"),
        (lambda: DEER(on_failure="nan"), "on_failure"),
        (lambda: ELK(damping=0.0), "damping"),
        (lambda: QuasiELK(adaptive="yes"), "adaptive"),
    ]:
        with pytest.raises(ValueError, match=what):
            bad()
    with pytest.raises(TypeError, match="has no scan"):
        DEER().scan(None, None, None)


def test_sequential_solution_and_empty_sequence(small):
    """``solve`` with the sequential solver reports trivially; ``T = 0`` runs under a parallel
    solver as under the scan."""
    cell, params, xs = small
    sol = solve(cell, params, xs, Sequential())
    assert isinstance(sol, Solution)
    _, ys = sj.unroll(cell, params, xs)
    np.testing.assert_array_equal(sol.ys, ys)
    np.testing.assert_array_equal(sol.iterations, [0, 0])
    assert sol.residuals.shape == (B, 1) and bool(jnp.all(sol.converged))
    carry, ys0 = sj.unroll(cell, params, xs[:, :0], solver=DEER())
    assert ys0.shape == (B, 0, 4)
    np.testing.assert_array_equal(carry, cell.initial_carry(params, (B,)))
