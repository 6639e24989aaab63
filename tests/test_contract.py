"""The contract every cell honours, built-in or user-defined.

For each cell: ``unroll`` equals a Python loop over ``step``; the carry keeps its tree,
shapes and dtypes; ``jit`` equals eager; ``vmap`` over a batch equals a loop over
sequences; ``jax.test_util.check_grads`` passes through ``unroll`` (float64, first order,
reverse mode on the default path, forward mode with ``bptt="autodiff"``).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import seqjax as sj

B, T, I, H = 2, 5, 3, 4


class MomentumState(NamedTuple):
    h: jax.Array
    v: jax.Array


def momentum_cell(hidden_size):
    """A user-defined cell (not in seqjax): a tanh unit with a velocity state.

    v_t = 0.5 v_{t-1} + tanh(x W + h W_h);  h_t = h_{t-1} + 0.1 v_t;  y_t = 2 h_t.
    """

    def init(key, input_size):
        k1, k2 = jax.random.split(key)
        return {
            "w": jax.random.normal(k1, (input_size, hidden_size)) / np.sqrt(input_size),
            "w_h": jax.random.normal(k2, (hidden_size, hidden_size)) / np.sqrt(hidden_size),
        }

    def initial_carry(params, batch_shape=()):
        z = jnp.zeros(tuple(batch_shape) + (hidden_size,), params["w"].dtype)
        return MomentumState(z, z)

    def step(params, carry, x):
        v = 0.5 * carry.v + jnp.tanh(x @ params["w"] + carry.h @ params["w_h"])
        h = carry.h + 0.1 * v
        return MomentumState(h, v), 2.0 * h

    return sj.Cell(init, initial_carry, step)


CELLS = {
    "rnn": lambda: sj.rnn(H),
    "rnn_relu": lambda: sj.rnn(H, activation="relu"),
    "irnn": lambda: sj.irnn(H),
    "lstm": lambda: sj.lstm(H),
    "lstm_proj": lambda: sj.lstm(H, proj_size=2, hidden_bias=True),
    "gru": lambda: sj.gru(H),
    "mgu": lambda: sj.mgu(H),
    "janet": lambda: sj.janet(H),
    "tdnn": lambda: sj.tdnn(H, 3),
    "narx": lambda: sj.narx(2, 3, output_window=2),
    "learnable_carry_lstm": lambda: sj.learnable_carry(sj.lstm(H)),
    "user_momentum": lambda: momentum_cell(H),
}


def _setup(name, dtype=jnp.float32):
    cell = CELLS[name]()
    params = cell.init(jax.random.key(0), I)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), dtype)
    return cell, params, xs


def _python_loop(cell, params, xs):
    carry = cell.initial_carry(params, (xs.shape[0],))
    ys = []
    for t in range(xs.shape[1]):
        carry, y = cell.step(params, carry, xs[:, t])
        ys.append(y)
    return carry, jnp.stack(ys, axis=1)


def _assert_tree_close(a, b, **tol):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, **tol)


# float32 scan vs Python loop: identical ops in the same order, so rounding differences are
# at most a few ulps (XLA may fuse differently): 1e-6 relative.
TOL32 = dict(rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_unroll_equals_python_loop(name):
    cell, params, xs = _setup(name)
    carry, ys = sj.unroll(cell, params, xs)
    carry_ref, ys_ref = _python_loop(cell, params, xs)
    _assert_tree_close(carry, carry_ref, **TOL32)
    np.testing.assert_allclose(ys, ys_ref, **TOL32)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_carry_keeps_structure_shapes_dtypes(name):
    cell, params, xs = _setup(name)
    c0 = cell.initial_carry(params, (B,))
    carry, _ = sj.unroll(cell, params, xs)
    c1, _ = cell.step(params, c0, xs[:, 0])
    for c in (carry, c1):
        assert jax.tree_util.tree_structure(c) == jax.tree_util.tree_structure(c0)
        for a, b in zip(jax.tree_util.tree_leaves(c), jax.tree_util.tree_leaves(c0)):
            assert a.shape == b.shape and a.dtype == b.dtype
    # any leading batch shape works, including none
    for batch_shape in [(), (2, 3)]:
        c = cell.initial_carry(params, batch_shape)
        x = jnp.ones(batch_shape + (I,))
        c_new, y = cell.step(params, c, x)
        assert jax.tree_util.tree_structure(c_new) == jax.tree_util.tree_structure(c)
        assert all(a.shape[: len(batch_shape)] == batch_shape for a in jax.tree_util.tree_leaves(c_new))
        assert y.shape[: len(batch_shape)] == batch_shape


@pytest.mark.parametrize("name", sorted(CELLS))
def test_jit_equals_eager(name):
    cell, params, xs = _setup(name)
    eager = sj.unroll(cell, params, xs)
    jitted = jax.jit(lambda p, x: sj.unroll(cell, p, x))(params, xs)
    _assert_tree_close(eager, jitted, **TOL32)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_vmap_equals_loop_over_sequences(name):
    cell, params, xs = _setup(name)
    vmapped = jax.vmap(lambda x: sj.unroll(cell, params, x))(xs)  # each x: (T, I)
    for b in range(B):
        single = sj.unroll(cell, params, xs[b])
        _assert_tree_close(jax.tree_util.tree_map(lambda a: a[b], vmapped), single, **TOL32)
    # and batched unroll equals vmap
    _assert_tree_close(sj.unroll(cell, params, xs), vmapped, **TOL32)


# check_grads compiles several finite-difference programs per cell: two cells in the default
# run (a fused built-in and the user-defined cell), every cell with --runslow.
_FAST_GRAD_CELLS = ("lstm", "user_momentum")


@pytest.mark.parametrize(
    "name", [n if n in _FAST_GRAD_CELLS else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CELLS)]
)
def test_check_grads_through_unroll(x64, name):
    cell, params, xs = _setup(name, jnp.float64)
    if name == "irnn":  # relu at exactly-zero preactivations has no derivative: move off the kink
        params = {**params, "b": params["b"] + 0.1}

    def f(params, xs, bptt="auto"):
        carry, ys = sj.unroll(cell, params, xs, bptt=bptt)
        return jnp.sum(ys**2) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree_util.tree_leaves(carry))

    # reverse mode through the default path (the fused BPTT kernel for built-in Elman, LSTM
    # and GRU cells: a custom_vjp, which has no forward mode), forward mode through autodiff
    check_grads(f, (params, xs), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)
    check_grads(lambda p, x: f(p, x, "autodiff"), (params, xs), order=1, modes=("fwd",), atol=1e-6, rtol=1e-6)
