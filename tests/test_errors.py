"""Bad input raises ValueError naming the argument, the shape received and the shape
expected, at trace time (so also inside ``jax.jit``)."""

import jax
import jax.numpy as jnp
import pytest

import seqjax as sj

B, T, I, H = 2, 5, 3, 4


def _setup(cell=None):
    cell = sj.lstm(H) if cell is None else cell
    params = cell.init(jax.random.key(0), I)
    xs = jnp.ones((B, T, I))
    return cell, params, xs


def _both(fn):
    """Run eagerly and under jit: both must raise the same ValueError while tracing."""
    fn()
    jax.jit(fn)()


def test_wrong_feature_size():
    cell, params, _ = _setup()
    xs = jnp.ones((B, T, I + 2))
    with pytest.raises(
        ValueError, match=r"params\['w_x'\] has shape \(3, 16\) but this cell needs \(5, 16\)"
    ):
        _both(lambda: sj.unroll(cell, params, xs))
    # the cell's step also checks, for users who call it directly
    with pytest.raises(ValueError, match=r"x_t has shape \(2, 5\) but the params expect 3 features"):
        cell.step(params, cell.initial_carry(params, (B,)), jnp.ones((B, 5)))


def test_wrong_carry_shape_and_tree():
    cell, params, xs = _setup()
    bad = sj.LSTMState(jnp.zeros((B, H + 1)), jnp.zeros((B, H)))
    with pytest.raises(ValueError, match=r"carry.*h has shape \(2, 5\) but needs \(2, 4\)"):
        _both(lambda: sj.unroll(cell, params, xs, carry=bad))
    with pytest.raises(ValueError, match="carry has the tree"):
        sj.unroll(cell, params, xs, carry=jnp.zeros((B, H)))
    with pytest.raises(ValueError, match="dtype"):
        sj.unroll(cell, params, xs, carry=sj.LSTMState(jnp.zeros((B, H), jnp.int32), jnp.zeros((B, H))))
    # batch shape of carry vs x in a direct step call
    with pytest.raises(ValueError, match=r"batch shape \(3,\) but the carry has batch shape \(2,\)"):
        cell.step(params, cell.initial_carry(params, (B,)), jnp.ones((3, I)))


def test_lengths_errors():
    cell, params, xs = _setup()
    with pytest.raises(ValueError, match=r"lengths has shape \(3,\) but needs the batch shape of xs, \(2,\)"):
        _both(lambda: sj.unroll(cell, params, xs, lengths=jnp.array([1, 2, 3])))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\].*from 1 to 6"):
        sj.unroll(cell, params, xs, lengths=jnp.array([1, 6]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\].*from -1 to 2"):
        sj.unroll(cell, params, xs, lengths=jnp.array([-1, 2]))
    with pytest.raises(ValueError, match="integers"):
        sj.unroll(cell, params, xs, lengths=jnp.array([1.0, 2.0]))


def test_mask_and_resets_shape():
    cell, params, xs = _setup()
    with pytest.raises(ValueError, match=r"mask has shape \(5, 2\) but needs xs.shape\[:-1\] = \(2, 5\)"):
        _both(lambda: sj.unroll(cell, params, xs, mask=jnp.ones((T, B), bool)))
    with pytest.raises(ValueError, match=r"resets has shape \(2,\)"):
        sj.unroll(cell, params, xs, resets=jnp.ones((B,), bool))


def test_mismatched_param_tree():
    cell, params, xs = _setup()
    del params["b"]
    with pytest.raises(ValueError, match=r"missing \[\"params\['b'\]\"\]"):
        _both(lambda: sj.unroll(cell, params, xs))
    cell, params, xs = _setup()
    with pytest.raises(
        ValueError, match=r"params\['w_h'\] has shape \(4, 16\) but this cell needs \(6, 24\)"
    ):
        sj.unroll(sj.lstm(H + 2), params, xs)


def test_bad_xs_and_time_axis():
    cell, params, _ = _setup()
    with pytest.raises(ValueError, match=r"xs of shape \(3,\) has 1 dims but needs at least 2"):
        sj.unroll(cell, params, jnp.ones((I,)))
    with pytest.raises(ValueError, match="time_axis=-1"):
        sj.unroll(cell, params, jnp.ones((B, T, I)), time_axis=-1)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        sj.lstm(0)
    with pytest.raises(ValueError, match="activation must be one of"):
        sj.rnn(4, activation="swish")
    with pytest.raises(ValueError, match="proj_size"):
        sj.lstm(4, proj_size=4)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        sj.tdnn(4, 0)
    with pytest.raises(ValueError, match="input_size must be a positive integer"):
        sj.gru(4).init(jax.random.key(0), 0)
