"""Each option of ``unroll`` against a loop-computed or hand-computed expectation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close

import seqjax as sj

B, T, I, H = 3, 6, 4, 5
TOL = dict(rtol=1e-6, atol=1e-6)


def _setup(cell=None, seed=0):
    cell = sj.lstm(H) if cell is None else cell
    params = cell.init(jax.random.key(seed), I)
    xs = jax.random.normal(jax.random.key(seed + 1), (B, T, I))
    return cell, params, xs


def _take(tree, b):
    return jax.tree_util.tree_map(lambda a: a[b], tree)


@pytest.mark.parametrize("reverse", [False, True])
def test_lengths_equal_running_each_sequence_alone(reverse):
    cell, params, xs = _setup()
    lengths = jnp.array([6, 2, 0])
    final, ys = sj.unroll(cell, params, xs, lengths=lengths, reverse=reverse)
    for b in range(B):
        n = int(lengths[b])
        f_b, y_b = sj.unroll(cell, params, xs[b, :n], reverse=reverse)
        assert_trees_close(_take(final, b), f_b, **TOL)
        np.testing.assert_allclose(ys[b, :n], y_b, **TOL)
        np.testing.assert_array_equal(ys[b, n:], 0.0)  # outputs past the end are zero


def test_mask_holds_carry_still():
    cell, params, xs = _setup(sj.gru(H))
    mask = jnp.array([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
    final, ys = sj.unroll(cell, params, xs, mask=mask)
    for b in range(B):
        h = jnp.zeros(H)
        for t in range(T):
            if mask[b, t]:
                h, y = cell.step(params, h, xs[b, t])
                np.testing.assert_allclose(ys[b, t], y, **TOL)
            else:
                np.testing.assert_array_equal(ys[b, t], 0.0)
        np.testing.assert_allclose(final[b], h, **TOL)


def test_resets_return_carry_to_initial_value():
    cell, params, xs = _setup()
    carry0 = sj.LSTMState(jnp.full((B, H), 0.3), jnp.full((B, H), -0.2))
    resets = jnp.zeros((B, T), bool).at[0, 3].set(True).at[2, 1].set(True).at[2, 4].set(True)
    final, ys = sj.unroll(cell, params, xs, carry=carry0, resets=resets)
    for b in range(B):
        c = _take(carry0, b)
        for t in range(T):
            if resets[b, t]:
                c = _take(carry0, b)
            c, y = cell.step(params, c, xs[b, t])
            np.testing.assert_allclose(ys[b, t], y, **TOL)
        assert_trees_close(_take(final, b), c, **TOL)
    # a reset at step 0 changes nothing; a reset elsewhere changes the outcome
    same = sj.unroll(cell, params, xs, carry=carry0, resets=jnp.zeros((B, T), bool).at[:, 0].set(True))
    assert_trees_close(same, sj.unroll(cell, params, xs, carry=carry0), **TOL)
    assert not np.allclose(final.h[0], sj.unroll(cell, params, xs, carry=carry0)[0].h[0])


def test_reverse_equals_flipped_input():
    cell, params, xs = _setup(sj.rnn(H))
    final, ys = sj.unroll(cell, params, xs, reverse=True)
    f_ref, ys_ref = sj.unroll(cell, params, xs[:, ::-1])
    np.testing.assert_allclose(final, f_ref, **TOL)
    np.testing.assert_allclose(ys, ys_ref[:, ::-1], **TOL)  # outputs stay in input order


def test_time_major_and_extra_batch_dims():
    cell, params, xs = _setup()
    final, ys = sj.unroll(cell, params, xs)
    final_tm, ys_tm = sj.unroll(cell, params, jnp.swapaxes(xs, 0, 1), time_axis=0)
    assert_trees_close(final, final_tm, **TOL)
    np.testing.assert_allclose(jnp.swapaxes(ys_tm, 0, 1), ys, **TOL)
    # two batch dims (1, B): same results
    f2, y2 = sj.unroll(cell, params, xs[None], lengths=jnp.array([[6, 2, 4]]))
    f1, y1 = sj.unroll(cell, params, xs, lengths=jnp.array([6, 2, 4]))
    assert_trees_close(_take(f2, 0), f1, **TOL)
    np.testing.assert_allclose(y2[0], y1, **TOL)


def test_return_carries_and_gates_trajectory():
    cell, params, xs = _setup()
    lengths = jnp.array([6, 4, 1])
    final, ys, aux = sj.unroll(cell, params, xs, lengths=lengths, return_carries=True, return_gates=True)
    assert aux.carries.h.shape == (B, T, H) and aux.carries.c.shape == (B, T, H)
    for b in range(B):
        c = cell.initial_carry(params)
        for t in range(int(lengths[b])):
            g = cell.gates(params, c, xs[b, t])
            c, _ = cell.step(params, c, xs[b, t])
            np.testing.assert_allclose(aux.carries.h[b, t], c.h, **TOL)
            np.testing.assert_allclose(aux.carries.c[b, t], c.c, **TOL)
            for k in "ifgo":
                np.testing.assert_allclose(aux.gates[k][b, t], g[k], **TOL)
        # past the end the trajectory holds the final carry
        for t in range(int(lengths[b]), T):
            np.testing.assert_allclose(aux.carries.c[b, t], final.c[b], **TOL)
    # the gates recompute the cell exactly: c_t = f c_{t-1} + i g
    c_prev = jnp.concatenate([jnp.zeros((B, 1, H)), aux.carries.c[:, :-1]], axis=1)
    g = aux.gates
    np.testing.assert_allclose(aux.carries.c[0], (g["f"] * c_prev + g["i"] * g["g"])[0], **TOL)
    np.testing.assert_allclose(ys[0], (g["o"] * jnp.tanh(aux.carries.c))[0], **TOL)
    with pytest.raises(ValueError, match="gates"):
        sj.unroll(sj.tdnn(H, 2), sj.tdnn(H, 2).init(jax.random.key(0), I), xs, return_gates=True)


def test_learnable_initial_carry_gets_gradients():
    cell = sj.learnable_carry(sj.lstm(H), init=lambda k, c: jax.tree_util.tree_map(lambda a: a + 0.5, c))
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    np.testing.assert_array_equal(params["carry0"].h, 0.5 * np.ones(H))
    final, ys = sj.unroll(cell, params, xs)
    # equals the inner cell started from the broadcast carry0
    c0 = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (B, H)), params["carry0"])
    assert_trees_close((final, ys), sj.unroll(sj.lstm(H), params["cell"], xs, carry=c0), **TOL)

    def loss(p):
        return jnp.sum(sj.unroll(cell, p, xs)[1] ** 2)

    g = jax.grad(loss)(params)
    # finite-difference check of the gradient wrt carry0.c[0]
    eps = 1e-3
    bump = lambda s: jax.tree_util.tree_map(
        lambda a: a, {**params, "carry0": params["carry0"]._replace(c=params["carry0"].c.at[0].add(s))}
    )
    fd = (loss(bump(eps)) - loss(bump(-eps))) / (2 * eps)
    np.testing.assert_allclose(g["carry0"].c[0], fd, rtol=2e-2)
    assert float(jnp.abs(g["carry0"].h).sum()) > 0


def test_recurrent_dropout_one_mask_per_sequence():
    """With identity activation, zero recurrent weights and an input-dropout-only run, each
    output equals x_t * mask @ W_x + b, the same mask at every step."""
    cell = sj.rnn(H, activation="identity", recurrent_init=sj.initializers.zeros)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I))
    key = jax.random.key(7)
    _, ys = sj.unroll(cell, params, xs, input_dropout=0.5, key=key)
    # recover the mask: solve ys_t - b = (x_t * m) W_x for m, per sequence, in least squares
    for b in range(B):
        masks = []
        for t in range(T):
            sol = np.linalg.lstsq(
                np.asarray(params["w_x"]).T, np.asarray(ys[b, t] - params["b"]), rcond=None
            )[0]
            masks.append(sol / np.asarray(xs[b, t]))
        masks = np.array(masks)
        np.testing.assert_allclose(masks, np.broadcast_to(masks[0], masks.shape), atol=1e-3)
        assert set(np.round(masks[0], 3)) <= {0.0, 2.0}  # kept units scaled by 1/(1-p)
    # recurrent dropout on an identity RNN: h_t = (h_{t-1} * m) W_h + x_t W_x + b, so
    # m = ((h_t - x_t W_x - b) W_h^{-1}) / h_{t-1} must be one fixed {0, 1/(1-p)} vector
    cell = sj.rnn(H, activation="identity")
    params = cell.init(jax.random.key(0), I)
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    _, ys = sj.unroll(cell, params, xs, recurrent_dropout=0.3, key=key)
    _, ys2 = sj.unroll(cell, params, xs, recurrent_dropout=0.3, key=key)
    np.testing.assert_array_equal(ys, ys2)  # same key, same masks
    _, ys_other = sj.unroll(cell, params, xs, recurrent_dropout=0.3, key=jax.random.key(8))
    assert not np.allclose(ys, ys_other)
    y = np.asarray(ys, np.float64)
    x = np.asarray(xs, np.float64)
    w_inv = np.linalg.inv(p64["w_h"])
    for b in range(B):
        ms = [((y[b, t] - x[b, t] @ p64["w_x"] - p64["b"]) @ w_inv) / y[b, t - 1] for t in range(1, T)]
        ms = np.array(ms)
        np.testing.assert_allclose(ms, np.broadcast_to(ms[0], ms.shape), atol=1e-3)
        np.testing.assert_allclose(np.minimum(np.abs(ms[0]), np.abs(ms[0] - 1 / 0.7)), 0.0, atol=1e-3)


def test_dropout_needs_key_and_valid_rate():
    cell, params, xs = _setup()
    with pytest.raises(ValueError, match="key"):
        sj.unroll(cell, params, xs, recurrent_dropout=0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sj.unroll(cell, params, xs, input_dropout=1.0, key=jax.random.key(0))


def test_scan_unroll_option_gives_same_result():
    cell, params, xs = _setup()
    assert_trees_close(sj.unroll(cell, params, xs, unroll=3), sj.unroll(cell, params, xs), **TOL)


def test_sequence_mask():
    m = sj.sequence_mask(jnp.array([0, 2, 4]), 4)
    np.testing.assert_array_equal(m, np.array([[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool))
