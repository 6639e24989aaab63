"""``seqjax.gradient_norms`` is exact for any cell that declares its output rule.

``gradient_norms`` returns ``||dL/ds_t||`` for every step ``t``: the total derivative of the
loss with respect to the state after step ``t``, through the output ``y_t`` (read from the
carry by the cell's ``output`` capability) and through every later step. The reference here
is independent of seqjax's scan: a Python loop over steps, written from the cell's equations
(not ``cell.step``, not ``seqjax.unroll``), that adds a perturbation ``eps_t`` to the state
after step ``t`` and recomputes ``y_t`` from the perturbed state. Then ``dL/ds_t =
dL/deps_t`` at ``eps = 0``, computed two ways:

* ``jax.grad`` of the loop (tolerance ``1e-10``: the same float64 derivative, summed in
  another order);
* central finite differences of the loop in float64 with step ``1e-6`` (truncation error
  ``~h^2 |L'''| ~ 1e-12``, rounding ``~1e-16 |L| / h ~ 1e-10``: ``1e-6`` relative), which
  checks the loop's derivative without any autodiff.

Cells:

1. a damped coupled oscillator, carry ``(y, z)`` (two leaves ``(*batch, 2)``), output ``y``:
   ``y' = y + dt z``, ``z' = z - dt (k y + c z) + dt x W``;
2. an Elman-like cell whose output is a nonlinear function of the carry *and* the input:
   ``h' = tanh(x W_x + h W_h)``, ``y = tanh(h' W_o) * (1 + x w)``.

Losses: summed over all steps, and on the last step only; with ``lengths`` (a padded batch)
the reference for each sequence is the loop over its unpadded steps alone, and the padded
steps have norm 0. A cell without an output rule is refused unless ``direct=False``, which
counts only the path through later steps (the loop then does not perturb ``y_t``).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj

B, T, I = 2, 6, 2
DT = 0.1
H, O = 3, 2  # the nonlinear-output cell: hidden size and output size

_rng = np.random.default_rng(0)
W_OSC = _rng.standard_normal((B, T, 2))  # loss weights (NumPy float64, cast in the loss)
W_NL = _rng.standard_normal((B, T, O))
V_OSC = _rng.standard_normal((B, 2))
V_NL = _rng.standard_normal((B, O))


# --------------------------------------------------------------------------- the cells under test


class Osc(NamedTuple):
    y: jax.Array
    z: jax.Array


def _osc_init(key, input_size):
    k = jax.random.split(key, 3)
    return {
        "k": 1.0 + jax.random.uniform(k[0], (1, 2)),  # (1, 2): broadcasts over (B, 2) at equal rank
        "c": 0.3 * jax.random.uniform(k[1], (1, 2)),
        "w": jax.random.normal(k[2], (input_size, 2)),
    }


def _osc_initial_carry(params, batch_shape=()):
    dt = params["w"].dtype
    return Osc(jnp.zeros((*batch_shape, 2), dt), jnp.zeros((*batch_shape, 2), dt))


def _osc_step(p, c, x):
    y = c.y + DT * c.z
    z = c.z - DT * (p["k"] * c.y + p["c"] * c.z) + DT * (x @ p["w"])
    return Osc(y, z), y


def oscillator() -> sj.Cell:
    return sj.Cell(_osc_init, _osc_initial_carry, _osc_step, output=lambda p, carry, x: carry[0])


def _nl_init(key, input_size):
    k = jax.random.split(key, 4)
    return {
        "w_x": jax.random.normal(k[0], (input_size, H)),
        "w_h": 0.8 * jax.random.normal(k[1], (H, H)),
        "w_o": jax.random.normal(k[2], (H, O)),
        "w_x2": 0.5 * jax.random.normal(k[3], (input_size, O)),
    }


def _nl_initial_carry(params, batch_shape=()):
    return jnp.zeros((*batch_shape, H), params["w_x"].dtype)


def _nl_output(p, h, x):
    return jnp.tanh(h @ p["w_o"]) * (1.0 + x @ p["w_x2"])


def _nl_step(p, h, x):
    h = jnp.tanh(x @ p["w_x"] + h @ p["w_h"])
    return h, _nl_output(p, h, x)


def nonlinear_output(*, declare_output: bool = True) -> sj.Cell:
    return sj.Cell(_nl_init, _nl_initial_carry, _nl_step, output=_nl_output if declare_output else None)


# --------------------------------------------------------------------------- the reference loops
# Written from the equations above, independently of the Cell objects; batch-major, (b, T, .).


def osc_loop(p, xs, eps, loss, *, direct=True, xp=jnp):
    """``loss(ys)`` with ``eps[:, t] = (eps_y, eps_z)`` added to the state after step ``t``
    (``xp``: ``jax.numpy`` to differentiate, ``numpy`` for finite differences)."""
    n, steps = xs.shape[0], xs.shape[1]
    y = xp.zeros((n, 2), xs.dtype)
    z = xp.zeros((n, 2), xs.dtype)
    ys = []
    for t in range(steps):
        y_new = y + DT * z
        z_new = z - DT * (p["k"] * y + p["c"] * z) + DT * (xs[:, t] @ p["w"])
        y, z = y_new + eps[:, t, :2], z_new + eps[:, t, 2:]
        ys.append(y if direct else y_new)  # the output rule reads y from the (perturbed) carry
    return loss(xp.stack(ys, axis=1))


def nl_loop(p, xs, eps, loss, *, direct=True, xp=jnp):
    n, steps = xs.shape[0], xs.shape[1]
    h = xp.zeros((n, H), xs.dtype)
    ys = []
    for t in range(steps):
        x = xs[:, t]
        h_new = xp.tanh(x @ p["w_x"] + h @ p["w_h"])
        h = h_new + eps[:, t]
        h_read = h if direct else h_new  # direct: y_t recomputed from the perturbed state
        ys.append(xp.tanh(h_read @ p["w_o"]) * (1.0 + x @ p["w_x2"]))
    return loss(xp.stack(ys, axis=1))


def _grad_eps(loop, p, xs, S, loss, direct=True):
    """``dL/deps``: ``(n, steps, S)``, by ``jax.grad`` of the loop."""
    eps = jnp.zeros(xs.shape[:2] + (S,), xs.dtype)
    return jax.jit(jax.grad(lambda e: loop(p, xs, e, loss, direct=direct)))(eps)


def _fd_eps(loop, p, xs, S, loss, h=1e-6):
    """``dL/deps`` by central differences of the loop run in NumPy float64, every entry."""
    p = jax.tree_util.tree_map(np.asarray, p)
    xs = np.asarray(xs)
    shape = xs.shape[:2] + (S,)
    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        e = np.zeros(shape)
        e[idx] = h
        out[idx] = (float(loop(p, xs, e, loss, xp=np)) - float(loop(p, xs, -e, loss, xp=np))) / (2 * h)
    return out


# --------------------------------------------------------------------------- losses
# Module level: gradient_norms compiles once per loss function (by identity). The sum losses
# also run on NumPy arrays (the finite differences): ``_xp`` picks the module.


def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def osc_sum_loss(ys):  # every step's output
    xp = _xp(ys)
    return xp.sum(xp.sin(ys) * W_OSC[:, : ys.shape[1]] + 0.5 * ys**2)


def osc_last_loss(ys):  # the last step only
    y = ys[:, -1]
    return jnp.sum(jnp.sin(y) * jnp.asarray(V_OSC) + y**2)


def nl_sum_loss(ys):
    xp = _xp(ys)
    return xp.sum(xp.sin(ys) * W_NL[:, : ys.shape[1]] + 0.5 * ys**2)


def nl_last_loss(ys):
    y = ys[:, -1]
    return jnp.sum(jnp.sin(y) * jnp.asarray(V_NL) + y**2)


LENGTHS = np.array([6, 4])


def nl_last_valid_loss(ys):  # each sequence's last valid step (padded steps hold y = 0)
    y = ys[np.arange(B), LENGTHS - 1]
    return jnp.sum(jnp.sin(y) * jnp.asarray(V_NL) + y**2)


def _seq_loss(base, b):
    """The loss of sequence ``b`` alone: ``base`` restricted to row ``b`` of its weights."""
    if base is nl_sum_loss:
        return lambda ys: jnp.sum(jnp.sin(ys) * jnp.asarray(W_NL[b : b + 1, : ys.shape[1]]) + 0.5 * ys**2)
    if base is nl_last_valid_loss:
        return lambda ys: jnp.sum(jnp.sin(ys[:, -1]) * jnp.asarray(V_NL[b : b + 1]) + ys[:, -1] ** 2)
    raise AssertionError(base)


# --------------------------------------------------------------------------- setup


CELLS = {
    "oscillator": (oscillator(), osc_loop, 4, ("y", "z"), (2, 2)),
    "nonlinear_output": (nonlinear_output(), nl_loop, H, None, (H,)),
}


def _setup(name, x64):
    cell, loop, S, leaves, widths = CELLS[name]
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), cell.init(jax.random.key(1), I))
    xs = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, I)))
    return cell, loop, S, leaves, widths, params, xs


def _leaf_norms(g, widths):
    out, off = [], 0
    for w in widths:
        out.append(jnp.linalg.norm(g[..., off : off + w], axis=-1))
        off += w
    return out


def _assert_norms(gn, g, widths, leaves, *, rtol, atol):
    """``gn.norms`` and ``gn.leaf_norms`` against ``||g_t||`` (whole state and per leaf)."""
    chex.assert_shape(gn.norms, g.shape[:-1])
    chex.assert_tree_all_finite(gn.norms)
    chex.assert_trees_all_close(gn.norms, jnp.linalg.norm(g, axis=-1), rtol=rtol, atol=atol)
    parts = _leaf_norms(g, widths)
    got = [gn.leaf_norms.y, gn.leaf_norms.z] if leaves else [gn.leaf_norms]
    chex.assert_trees_all_close(got, parts, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- tests

CASES = [
    ("oscillator", osc_sum_loss),
    ("oscillator", osc_last_loss),
    ("nonlinear_output", nl_sum_loss),
    ("nonlinear_output", nl_last_loss),
]


@pytest.mark.parametrize("name,loss", CASES, ids=[f"{n}-{f.__name__}" for n, f in CASES])
def test_exact_against_perturbed_loop(name, loss, x64):
    """Against ``jax.grad`` of the perturbed loop (1e-10) and, for the sum loss, central finite
    differences of the loop (1e-6 relative)."""
    cell, loop, S, leaves, widths, params, xs = _setup(name, x64)
    gn = sj.gradient_norms(cell, params, xs, loss)
    g = _grad_eps(loop, params, xs, S, loss)
    _assert_norms(gn, g, widths, leaves, rtol=1e-10, atol=1e-13)
    assert np.all(np.asarray(gn.norms) > 1e-6)  # every step matters: a real comparison
    if loss in (osc_last_loss, nl_last_loss):
        # Only the last output is scored: the last state reaches it directly, through the output rule.
        if leaves:  # y_T = s_T.y: z_T reaches nothing
            chex.assert_trees_all_close(gn.leaf_norms.z[:, -1], jnp.zeros(B), atol=0.0)
    else:
        fd = _fd_eps(loop, params, xs, S, loss)
        chex.assert_trees_all_close(g, fd, rtol=1e-6, atol=1e-8)  # the loop's derivative itself
        chex.assert_trees_all_close(gn.norms, jnp.linalg.norm(fd, axis=-1), rtol=1e-6, atol=1e-8)


def test_oscillator_output_reads_only_y(x64):
    """The output rule reads ``y`` only: at the last step of a sum loss ``dL/dz_T = 0`` while
    ``dL/dy_T = dl/dy_T`` (nothing comes later); a perturbation of ``z_t`` still matters through
    later steps."""
    cell, loop, S, leaves, widths, params, xs = _setup("oscillator", x64)
    gn = sj.gradient_norms(cell, params, xs, osc_sum_loss)
    y_T = np.asarray(_osc_unroll_y(params, xs))[:, -1]
    dl = np.cos(y_T) * W_OSC[:, -1] + y_T  # d/dy of sin(y) w + y^2 / 2 at the last step
    np.testing.assert_allclose(gn.leaf_norms.y[:, -1], np.linalg.norm(dl, axis=-1), rtol=1e-12)
    np.testing.assert_array_equal(gn.leaf_norms.z[:, -1], 0.0)
    assert np.all(np.asarray(gn.leaf_norms.z[:, :-1]) > 1e-4)


def _osc_unroll_y(p, xs):
    y = jnp.zeros((xs.shape[0], 2))
    z = jnp.zeros((xs.shape[0], 2))
    out = []
    for t in range(xs.shape[1]):
        y, z = y + DT * z, z - DT * (p["k"] * y + p["c"] * z) + DT * (xs[:, t] @ p["w"])
        out.append(y)
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize("loss", [nl_sum_loss, nl_last_valid_loss], ids=lambda f: f.__name__)
def test_lengths_padded_batch_against_unpadded_loops(loss, x64):
    """A padded batch (``lengths = [6, 4]``): each sequence's norms equal the loop run on its
    own unpadded steps alone; padded steps have norm exactly 0 (time order)."""
    cell, loop, S, leaves, widths, params, xs = _setup("nonlinear_output", x64)
    gn = sj.gradient_norms(cell, params, xs, loss, lengths=jnp.asarray(LENGTHS))
    chex.assert_shape(gn.norms, (B, T))
    for b, n in enumerate(LENGTHS):
        g_b = _grad_eps(loop, params, xs[b : b + 1, :n], S, _seq_loss(loss, b))[0]  # (n, S)
        chex.assert_trees_all_close(gn.norms[b, :n], jnp.linalg.norm(g_b, axis=-1), rtol=1e-10, atol=1e-13)
        chex.assert_trees_all_close(
            gn.leaf_norms[b, :n], jnp.linalg.norm(g_b, axis=-1), rtol=1e-10, atol=1e-13
        )
        np.testing.assert_array_equal(gn.norms[b, n:], 0.0)
        assert np.all(np.asarray(gn.norms[b, :n]) > 1e-4)


def test_lengths_oscillator_sum_loss(x64):
    """The two-leaf carry with padding: per leaf, against the unpadded loop of each sequence."""
    cell, loop, S, leaves, widths, params, xs = _setup("oscillator", x64)
    lengths = np.array([3, 6])
    gn = sj.gradient_norms(cell, params, xs, osc_sum_loss, lengths=jnp.asarray(lengths))
    for b, n in enumerate(lengths):

        def loss_b(ys, b=b):
            return jnp.sum(jnp.sin(ys) * jnp.asarray(W_OSC[b : b + 1, : ys.shape[1]]) + 0.5 * ys**2)

        g_b = _grad_eps(loop, params, xs[b : b + 1, :n], S, loss_b)[0]
        y_ref, z_ref = _leaf_norms(g_b, widths)
        chex.assert_trees_all_close(
            (gn.norms[b, :n], gn.leaf_norms.y[b, :n], gn.leaf_norms.z[b, :n]),
            (jnp.linalg.norm(g_b, axis=-1), y_ref, z_ref),
            rtol=1e-10,
            atol=1e-13,
        )
        np.testing.assert_array_equal(gn.norms[b, n:], 0.0)
        np.testing.assert_array_equal(gn.leaf_norms.y[b, n:], 0.0)
        np.testing.assert_array_equal(gn.leaf_norms.z[b, n:], 0.0)


def test_without_output_rule_refused_unless_direct_false(x64):
    """No output rule: refused, naming ``direct=False``; with it, only the path through later
    steps counts: equal to the loop that perturbs the carry passed on but not ``y_t``."""
    _, loop, S, _, widths, params, xs = _setup("nonlinear_output", x64)
    bare = nonlinear_output(declare_output=False)
    with pytest.raises(ValueError, match="direct=False"):
        sj.gradient_norms(bare, params, xs, nl_sum_loss)
    gn = sj.gradient_norms(bare, params, xs, nl_sum_loss, direct=False)
    g = _grad_eps(loop, params, xs, S, nl_sum_loss, direct=False)
    _assert_norms(gn, g, widths, None, rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(gn.norms[:, -1], 0.0)  # the last state reaches nothing
    assert np.all(np.asarray(gn.norms[:, :-1]) > 1e-4)
    # and it differs from the total derivative (the direct path is really left out)
    g_total = _grad_eps(loop, params, xs, S, nl_sum_loss, direct=True)
    assert np.max(np.abs(np.linalg.norm(g_total, axis=-1) - np.asarray(gn.norms))) > 1e-3
