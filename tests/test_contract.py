"""The contract every cell honours, built-in or user-defined, checked with
``seqjax.testing.check_cell`` (its docstring states each comparison and tolerance).

For each cell:

* the step (``check_cell``'s ``loop``, ``carry``, ``jit``, ``vmap``): ``unroll`` equals a
  Python loop over ``step``; the carry keeps its tree, shapes and dtypes (batch shapes
  ``()``, ``(B,)``, ``(2, 3)``; float32 and float64); ``jit`` equals eager; ``vmap`` over a
  batch equals a loop over sequences (float32, 1e-5);
* gradients (float64): reverse and forward mode through ``unroll(gradient=Autodiff())`` against
  central finite differences (``grads``), and the default path's fused kernel, where the
  cell has one, against autodiff to 1e-10 (``kernel[plain]``).

Every capability against its fallback, every kernel option, and faults ``check_cell`` must
catch are in ``tests/test_check_cell.py``. One check here does not go through
``check_cell``: the Python-loop reference it compares ``unroll`` with, written out by hand.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj
from seqjax.gradients import Autodiff
from seqjax.testing import check_cell

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
    "min_gru": lambda: sj.min_gru(H),
    "min_lstm": lambda: sj.min_lstm(H),
    "lru": lambda: sj.lru(H),
    "tdnn": lambda: sj.tdnn(H, 3),
    "narx": lambda: sj.narx(2, 3, output_window=2),
    "learnable_carry_lstm": lambda: sj.learnable_carry(sj.lstm(H)),
    "user_momentum": lambda: momentum_cell(H),
}

STEP_CHECKS = ("loop", "carry", "jit", "vmap")

# variants of a cell the default run already checks (another activation, init, a projection),
# and the cells linear in their state (tests/test_linear_cells.py checks their unroll against
# NumPy and their capabilities with check_cell in the default run): with --runslow only
_SLOW = {"rnn_relu", "irnn", "lstm_proj", "min_gru", "min_lstm", "lru"}
_NAMES = [n if n not in _SLOW else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CELLS)]


@pytest.mark.parametrize("name", _NAMES)
def test_step_contract(name):
    report = check_cell(CELLS[name](), batch=B, steps=T, input_size=I, checks=STEP_CHECKS)
    assert report.passed == STEP_CHECKS


@pytest.mark.parametrize("name", _NAMES)
def test_gradients(name):
    cell = CELLS[name]()
    # options=(): the kernel on the default path only (every option: tests/test_check_cell.py)
    report = check_cell(cell, batch=B, steps=T, input_size=I, checks=("grads", "kernel"), options=())
    assert report.passed == (("grads", "kernel[plain]") if cell.kernel is not None else ("grads",))


def _python_loop(cell, params, xs):
    carry = cell.initial_carry(params, (xs.shape[0],))
    ys = []
    for t in range(xs.shape[1]):
        carry, y = cell.step(params, carry, xs[:, t])
        ys.append(y)
    return carry, jnp.stack(ys, axis=1)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_unroll_equals_python_loop_by_hand(name):
    """The reference of check_cell's ``loop`` check, independently: eager Python loop."""
    cell = CELLS[name]()
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    # float32 scan vs Python loop: the same ops in the same order, so rounding differences are
    # at most a few ulps (XLA may fuse differently): 1e-6.
    chex.assert_trees_all_close(
        sj.unroll(cell, params, xs, gradient=Autodiff()), _python_loop(cell, params, xs), rtol=1e-6, atol=1e-6
    )
