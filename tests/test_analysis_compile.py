"""The analysis functions compile once, and are transparent to ``jit``, ``vmap`` and ``grad``.

Every public analysis function of ``seqjax.spectrum`` and ``seqjax.gradient_norms`` validates
its arguments eagerly and then calls a module-level ``jax.jit`` core with the cell (compared
and hashed by value) and its integer/bool options static. So:

1. **Compile once.** A sweep over checkpoints (new params of the same shapes, the cell rebuilt
   by calling its constructor again) compiles nothing after the first call. Counted with
   ``jax.log_compiles(True)`` and ``caplog``: JAX logs one WARNING ``"Compiling ..."`` from
   ``jax._src.interpreters.pxla`` per XLA compilation. The counter is proven in every case:
   the warm-up must log at least one compilation, and a control call with other shapes
   (``T``, ``I`` and ``N`` changed) must compile again.
2. **Transparent.** (a) Inside a user's ``jax.jit`` the result is the eager pytree; (b)
   ``jax.vmap`` over stacked params is a Python loop of eager calls; (c) ``jax.grad`` of a
   Lyapunov exponent (gradient flossing) is the central finite difference in float64, and
   ``jax.grad`` through ``gradient_flow_report(...).lyapunov_max`` is finite, non-zero and
   the finite difference too.

Cost: compiling is nearly all the time here (about a second per program on one core), so
compiled work is shared. ``_sweep(case, cell)`` runs the warm-up and the second call of one
case once per process, in that order, counting the compilations of each; the compile-once
test asserts on its counts, and the ``jit``/``vmap`` tests compare against its eager results
(already compiled). The functions of Jacobians take the Jacobians of the ``step_jacobians``
sweep. Part-2c shapes (float64, ``T = 30``) and the control shapes (``T = 11``/``13``,
``I = 4``, ``N = 7``) appear nowhere else, so no test pre-compiles another's warm-up whatever
the order xdist runs them in. ``jax.grad`` is checked as ``jax.jit(jax.value_and_grad(f))``:
one compiled program gives the gradient and the values the finite differences need.

The default run (about 25 s of CPU on one core) covers every public function once with the
LSTM, the controls of the four cheapest, ``jit`` of the four functions asked for, ``vmap``
and ``grad`` (tanh RNN); the Elman RNN, the variants (matrix-free, ``lengths=``,
``by_lag=``), the other controls and the LSTM's gradients run with ``--runslow``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import x64_enabled

import seqjax as sj
from seqjax import spectrum as sp

H, B, T, I, N = 4, 2, 12, 3, 6
CELLS: dict[str, Callable[[], Any]] = {"lstm": lambda: sj.lstm(H), "rnn": lambda: sj.rnn(H)}
# the default run covers the LSTM; the Elman RNN runs with --runslow
CELL_PARAMS = ["lstm"]  # the Elman RNN adds nothing to "jit equals eager" (keeps .ci/run in time)

# --------------------------------------------------------------------------- compile counter

_PXLA = "jax._src.interpreters.pxla"


def _block(out):
    """Wait for every array in ``out`` and return it (``FixedPoints`` is a plain dataclass,
    not a pytree: wait for its fields)."""
    leaves = jax.tree_util.tree_leaves(out)
    if dataclasses.is_dataclass(out) and len(leaves) == 1 and leaves[0] is out:
        leaves = [getattr(out, f.name) for f in dataclasses.fields(out)]
    jax.block_until_ready(leaves)
    return out


def _compiled(caplog, thunk) -> tuple[Any, list[str]]:
    """Run ``thunk``; return its result and the XLA compilations it logged (``Compiling ...``)."""
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        out = _block(thunk())
    found = [r.getMessage() for r in caplog.records if r.name == _PXLA]
    return out, [m[:160] for m in found if m.startswith("Compiling")]


# --------------------------------------------------------------------------- part 1: data and cases


def _sum_sq_loss(ys):
    """The loss of every ``gradient_norms`` call: defined once (``loss_fn`` is static by identity)."""
    return jnp.sum(ys**2)


@dataclasses.dataclass(frozen=True)
class Data:
    """The arguments of every case, drawn from one seed (built outside any counted call)."""

    params: Any
    xs: jax.Array  # (B, T, I)
    lengths: jax.Array  # (B,)
    carry: Any  # one unbatched carry
    x_t: jax.Array  # (I,)
    states: jax.Array  # (N, S)
    starts: jax.Array  # (N - 1, S): find_fixed_points' starts (its linearisation differs from linearize's)
    key: jax.Array
    jacobians: jax.Array | None = None  # (B, T, S, S) from step_jacobians


_DATA: dict[tuple, Data] = {}


def _random_params(cell, I: int, rng: np.random.Generator, dtype=np.float32):
    """Params of ``cell.init``'s shapes with random values (NumPy: no compilation to pay for)."""
    shapes = jax.eval_shape(lambda: cell.init(jax.random.key(0), I))
    return jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(0.0, 0.6, a.shape).astype(dtype)), shapes)


def _data(cell_name: str, seed: int, *, T: int = T, I: int = I, N: int = N) -> Data:
    k = (cell_name, seed, T, I, N)
    if k not in _DATA:
        cell = CELLS[cell_name]()
        rng = np.random.default_rng(seed)
        params = _random_params(cell, I, rng)
        S = sp.state_size(cell, params)

        def normal(*shape, scale=1.0):
            return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32))

        like = cell.initial_carry(params, ())
        d = Data(
            params=params,
            xs=normal(B, T, I),
            lengths=jnp.array([T, T - 3 - 2 * seed]),
            carry=sp.unflatten_state(normal(S, scale=0.5), like),
            x_t=normal(I),
            states=normal(N, S, scale=0.5),
            starts=normal(N - 1, S, scale=0.5),
            key=jax.random.key(2000 + seed),
        )
        _DATA[k] = jax.block_until_ready(d)
    return _DATA[k]


# Every public analysis function (and the variants asked for): (cell, Data) -> result.
CASES: dict[str, Callable[[Any, Data], Any]] = {
    "step_jacobian": lambda c, d: sp.step_jacobian(c, d.params, d.carry, d.x_t),
    "input_jacobian": lambda c, d: sp.input_jacobian(c, d.params, d.carry, d.x_t),
    "step_jacobians": lambda c, d: sp.step_jacobians(c, d.params, d.xs),
    "lyapunov_spectrum": lambda c, d: sp.lyapunov_spectrum(c, d.params, d.xs, k=2, window=3),
    "lyapunov_spectrum_matrix_free": lambda c, d: sp.lyapunov_spectrum(
        c, d.params, d.xs, k=2, window=3, matrix_free=True
    ),
    "lyapunov_from_jacobians": lambda c, d: sp.lyapunov_from_jacobians(d.jacobians, k=2, window=3),
    "lag_log_norms": lambda c, d: sp.lag_log_norms(d.jacobians),
    "lag_log_norms_lengths": lambda c, d: sp.lag_log_norms(d.jacobians, lengths=d.lengths),
    "product_singular_values": lambda c, d: sp.product_singular_values(d.jacobians, k=2),
    "product_eigenvalues": lambda c, d: sp.product_eigenvalues(d.jacobians),
    "top_singular_values": lambda c, d: sp.top_singular_values(c, d.params, d.carry, d.x_t, k=2, iters=10),
    "top_eigenvalues": lambda c, d: sp.top_eigenvalues(c, d.params, d.carry, d.x_t, k=2),
    "gradient_flow_report": lambda c, d: sp.gradient_flow_report(c, d.params, d.xs),
    "speed": lambda c, d: sp.speed(c, d.params, d.states, d.x_t),
    "linearize": lambda c, d: sp.linearize(c, d.params, d.states, d.x_t),
    "sample_states": lambda c, d: sp.sample_states(c, d.params, d.xs, n=5, key=d.key, noise=0.1),
    # slow_tol=inf, unique_tol=0: every start is kept, so the linearisation has one shape for
    # every params (how many distinct points survive is data-dependent otherwise).
    "find_fixed_points": lambda c, d: sp.find_fixed_points(
        c, d.params, d.x_t, d.starts, steps=5, slow_tol=np.inf, unique_tol=0.0
    ),
    "gradient_norms": lambda c, d: sj.gradient_norms(c, d.params, d.xs, _sum_sq_loss),
    "gradient_norms_lengths": lambda c, d: sj.gradient_norms(
        c, d.params, d.xs, _sum_sq_loss, lengths=d.lengths
    ),
    "gradient_norms_by_lag": lambda c, d: sj.gradient_norms(
        c, d.params, d.xs, _sum_sq_loss, lengths=d.lengths, by_lag=True
    ),
}
_TAKES_JACOBIANS = {
    "lyapunov_from_jacobians",
    "lag_log_norms",
    "lag_log_norms_lengths",
    "product_singular_values",
    "product_eigenvalues",
}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One case run twice as a checkpoint sweep runs it."""

    data: tuple[Data, Data]  # warm-up, second call
    results: tuple[Any, Any]
    compiles: tuple[list[str], list[str]]


_SWEEPS: dict[tuple[str, str], Sweep] = {}


def _sweep(case: str, cell_name: str, caplog) -> Sweep:
    """Warm-up (seed 0, cell built), then the second call (seed 1: new params, inputs, carry,
    lengths and key of the same shapes; the cell built again), once per process."""
    if (case, cell_name) not in _SWEEPS:
        d0, d1 = _data(cell_name, 0), _data(cell_name, 1)
        if case in _TAKES_JACOBIANS:
            sj_sweep = _sweep("step_jacobians", cell_name, caplog)
            d0, d1 = (
                dataclasses.replace(d, jacobians=r.jacobians) for d, r in zip((d0, d1), sj_sweep.results)
            )
        fn = CASES[case]
        r0, c0 = _compiled(caplog, lambda: fn(CELLS[cell_name](), d0))
        r1, c1 = _compiled(caplog, lambda: fn(CELLS[cell_name](), d1))
        _SWEEPS[case, cell_name] = Sweep((d0, d1), (r0, r1), (c0, c1))
    return _SWEEPS[case, cell_name]


# The default run: every public function once, with the LSTM. Its variants (matrix-free,
# lengths=, by_lag=) and the Elman RNN run with --runslow (about a second of compiling each).
VARIANTS = {
    "lyapunov_spectrum_matrix_free",
    "lag_log_norms_lengths",
    "gradient_norms_lengths",
    "gradient_norms_by_lag",
}
# The Elman RNN repeats the LSTM's sweep only where its programs differ most (the Lyapunov
# and gradient-norm cores); every other function once, with the LSTM (keeps .ci/run in time).
RNN_SWEEP = {"lyapunov_spectrum"}
SWEEP_PARAMS = [
    pytest.param(case, cell_name, marks=[pytest.mark.slow] if cell_name == "rnn" or case in VARIANTS else [])
    for case in CASES
    for cell_name in CELLS
    if cell_name == "lstm" or case in RNN_SWEEP
]


@pytest.mark.parametrize(("case", "cell_name"), SWEEP_PARAMS)
def test_second_call_compiles_nothing(case, cell_name, caplog):
    """New params of the same shapes and a cell rebuilt by its constructor compile nothing
    (and the warm-up did compile: the counter sees this function)."""
    assert CELLS[cell_name]() is not CELLS[cell_name]() and CELLS[cell_name]() == CELLS[cell_name]()
    s = _sweep(case, cell_name, caplog)
    warm, again = s.compiles
    assert len(warm) >= 1, f"the warm-up of {case}({cell_name}) logged no compilation: the counter is blind"
    assert again == [], f"{case}({cell_name}) recompiled for new params of the same shapes: {again}"


# The controls compile as much as the warm-ups: by default the four cheapest (a cell's step,
# and a function of Jacobians), the others with --runslow.
CHEAP_CONTROLS = {"step_jacobian", "input_jacobian", "speed", "lag_log_norms"}
CONTROL_PARAMS = [
    pytest.param(
        case, cell_name, marks=[] if cell_name == "lstm" and case in CHEAP_CONTROLS else [pytest.mark.slow]
    )
    for case in CASES
    for cell_name in CELLS
    # the control proves the counter sees a recompilation: the cheap functions and the two
    # largest programs suffice (the others left out to keep .ci/run within its 15 minutes)
    if cell_name == "lstm" and (case in CHEAP_CONTROLS or case in ("lyapunov_spectrum", "gradient_norms"))
]


@pytest.mark.parametrize(("case", "cell_name"), CONTROL_PARAMS)
def test_control_other_shapes_compile_again(case, cell_name, caplog):
    """The control: the same function with other shapes (``T``, ``I``, ``N``; these shapes
    appear in no other test) compiles again, so a zero count above is not a blind counter."""
    d = _data(cell_name, 2, T=13, I=4, N=7)
    if case in _TAKES_JACOBIANS:  # T = 11: a slice of step_jacobians' Jacobians
        J = _sweep("step_jacobians", cell_name, caplog).results[0].jacobians[:, :11]
        d = dataclasses.replace(d, jacobians=J, lengths=jnp.array([11, 6]))
    _, other = _compiled(caplog, lambda: CASES[case](CELLS[cell_name](), d))
    assert len(other) >= 1, f"{case}({cell_name}) with other shapes compiled nothing: the counter is blind"


# --------------------------------------------------------------------------- part 2a, 2b: jit and vmap

# The cases compared under a user's jit: the args traced are params, xs and lengths.
JIT_CASES = [
    "lyapunov_spectrum",
    pytest.param("lyapunov_spectrum_matrix_free", marks=pytest.mark.slow),
    "step_jacobians",
    "gradient_norms",
    pytest.param("gradient_norms_by_lag", marks=pytest.mark.slow),
    "gradient_flow_report",
]


@pytest.mark.parametrize("cell_name", CELL_PARAMS)
@pytest.mark.parametrize("case", JIT_CASES)
def test_inside_user_jit_equals_eager(case, cell_name, caplog):
    """``jax.jit(lambda p, x, n: fn(cell, p, x, ...))`` returns the eager pytree: the same
    structure, static metadata (``window``; the report's ``cell`` label, sizes, settings)
    and values (rtol 1e-5)."""
    s = _sweep(case, cell_name, caplog)
    d, eager = s.data[1], s.results[1]
    cell, fn = CELLS[cell_name](), CASES[case]

    @jax.jit
    def user_fn(p, x, n):
        return fn(cell, dataclasses.replace(d, params=p, xs=x, lengths=n))

    jitted = user_fn(d.params, d.xs, d.lengths)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5)
    if case == "gradient_flow_report":
        assert jitted.regime == eager.regime  # concrete leaves once jit returns
        assert str(jitted) == str(eager)


@pytest.mark.parametrize("cell_name", CELL_PARAMS)
def test_vmap_over_params_equals_loop(cell_name, caplog):
    """``vmap`` of ``lyapunov_spectrum(...).exponents`` over 3 stacked params == a Python loop
    of eager calls (compiled by the sweep: the loop compiles nothing)."""
    s = _sweep("lyapunov_spectrum", cell_name, caplog)
    xs = s.data[0].xs
    params = [
        s.data[0].params,
        s.data[1].params,
        _random_params(CELLS[cell_name](), I, np.random.default_rng(7)),
    ]
    cell = CELLS[cell_name]()

    def expo(p):
        return sp.lyapunov_spectrum(cell, p, xs, k=2, window=3).exponents

    batched = jax.vmap(expo)(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *params))
    loop, compiled = _compiled(caplog, lambda: [expo(p) for p in params])
    assert compiled == [], compiled
    loop = jnp.stack(loop)
    chex.assert_shape(batched, (3, B, 2))
    assert not np.allclose(loop[0], loop[1])  # the params differ, so must the exponents
    chex.assert_trees_all_close(batched, loop, rtol=1e-5)


# --------------------------------------------------------------------------- part 2c: grad (float64)

T3, I3, B3 = 30, 3, 2
GRAD_CELLS = {"rnn3": lambda: sj.rnn(3), "lstm2": lambda: sj.lstm(2)}
GRAD_CELL_PARAMS = ["rnn3", pytest.param("lstm2", marks=pytest.mark.slow)]


def _f64_problem(cell_name: str, seed: int):
    """Cell, float64 params and inputs (call under ``x64_enabled``)."""
    cell = GRAD_CELLS[cell_name]()
    rng = np.random.default_rng(seed)
    params = _random_params(cell, I3, rng, np.float64)
    xs = jnp.asarray(rng.standard_normal((B3, T3, I3)), jnp.float64)
    return cell, params, xs


def _check_directional_derivatives(f, params, *, n_dirs: int, seed: int, h: float = 1e-6):
    """``<grad f(p), v> == (f(p + h v) - f(p - h v)) / 2h`` (rtol 1e-5) for random unit
    directions ``v`` in params space; returns the gradient. One compiled program:
    ``value_and_grad`` gives the values at ``p +- h v`` too."""
    vg = jax.jit(jax.value_and_grad(f))
    value, g = vg(params)
    assert value.dtype == jnp.float64
    chex.assert_tree_all_finite(g)
    rng = np.random.default_rng(seed)
    got, want = [], []
    for _ in range(n_dirs):
        v = jax.tree_util.tree_map(lambda a: rng.standard_normal(np.shape(a)), params)
        norm = np.sqrt(sum(np.sum(a**2) for a in jax.tree_util.tree_leaves(v)))
        v = jax.tree_util.tree_map(lambda a: jnp.asarray(a / norm, jnp.float64), v)
        f_plus = vg(jax.tree_util.tree_map(lambda p, d: p + h * d, params, v))[0]
        f_minus = vg(jax.tree_util.tree_map(lambda p, d: p - h * d, params, v))[0]
        want.append(float((f_plus - f_minus) / (2 * h)))
        got.append(float(sum(jnp.vdot(a, b) for a, b in zip(*map(jax.tree_util.tree_leaves, (g, v))))))
    assert max(abs(w) for w in want) > 1e-3, want  # derivatives worth comparing
    chex.assert_trees_all_close(np.array(got), np.array(want), rtol=1e-5)
    return g


@pytest.mark.parametrize("cell_name", GRAD_CELL_PARAMS)
def test_grad_of_lyapunov_exponent_matches_finite_differences(cell_name):
    """Gradient flossing: ``jax.grad`` of the mean largest exponent w.r.t. params (float64;
    tanh RNN and LSTM, T = 30: the QR iteration is smooth) == central differences along 3
    random directions."""
    with x64_enabled():
        cell, params, xs = _f64_problem(cell_name, 3)

        def top_exponent(p):
            return sp.lyapunov_spectrum(cell, p, xs, k=2, window=10).exponents[..., 0].mean()

        _check_directional_derivatives(top_exponent, params, n_dirs=3, seed=0)


@pytest.mark.parametrize("cell_name", ["rnn3"])
def test_grad_through_gradient_flow_report(cell_name):
    """``jax.grad`` through ``gradient_flow_report(...).lyapunov_max`` (float64) is finite,
    not identically zero, and the central difference."""
    with x64_enabled():
        cell, params, xs = _f64_problem(cell_name, 5)

        def lyap_max(p):
            return sp.gradient_flow_report(cell, p, xs).lyapunov_max

        g = _check_directional_derivatives(lyap_max, params, n_dirs=1, seed=1)
        assert any(np.any(np.asarray(a) != 0) for a in jax.tree_util.tree_leaves(g))
