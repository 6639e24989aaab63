"""Golden numerics of seqjax 0.1: what ``tests/data/golden_0_1.npz`` holds and how it is recomputed.

``scripts/make_golden.py`` ran :func:`compute_all` on the 0.1 code and saved the result;
``tests/test_golden.py`` runs it again on the current code and compares to 1e-12 (float64).
Each case is a model, its params (``init(key(0), I)``, then cast to float64), fixed float64
inputs, and a scalar loss that weighs every output and every final-carry entry with fixed
random weights, so the gradients reach every param, every input and every carry leaf.
What is recorded per case: the raw float32 init params, the outputs, the final carry, the
gradients with respect to params and inputs, and (for cells) the step Jacobians.

Only public API is used here; when the API is renamed the calls here follow, the fixture stays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import seqjax as sj
from seqjax.gradients import Autodiff, Truncate

B, T, I, H = 2, 6, 3, 4


def _cells():
    return {
        "rnn_tanh": lambda: sj.rnn(H),
        "rnn_relu": lambda: sj.rnn(H, activation="relu"),
        "rnn_leaky": lambda: sj.rnn(H, activation="leaky_relu"),
        "rnn_identity": lambda: sj.rnn(H, activation="identity"),
        "rnn_hidden_bias": lambda: sj.rnn(H, hidden_bias=True),
        "irnn": lambda: sj.irnn(H, input_scale=0.3),
        "lstm": lambda: sj.lstm(H),
        "lstm_forget_bias": lambda: sj.lstm(H, forget_bias=1.0, hidden_bias=True),
        "lstm_proj": lambda: sj.lstm(H, proj_size=2),
        "gru": lambda: sj.gru(H),
        "mgu": lambda: sj.mgu(H),
        "janet": lambda: sj.janet(H),
        "janet_beta0": lambda: sj.janet(H, beta=0.0),
        "tdnn": lambda: sj.tdnn(H, 3),
        "narx": lambda: sj.narx(2, 3, output_window=2),
        "stack_lstm_gru": lambda: sj.stack([sj.lstm(H), sj.gru(H)]),
        "stack_rnn_mgu": lambda: sj.stack([sj.rnn(H), sj.mgu(H)]),
        "learnable_lstm": lambda: sj.learnable_carry(sj.lstm(H)),
        "learnable_gru": lambda: sj.learnable_carry(
            sj.gru(H), init=lambda k, c: jax.random.normal(k, c.shape, c.dtype)
        ),
    }


def _layers():
    return {
        "bidirectional_lstm": lambda: sj.bidirectional(sj.lstm(H), sj.gru(H)),
        "bidirectional_rnn_sum": lambda: sj.bidirectional(sj.rnn(H), merge="sum"),
    }


# Options of unroll that the 0.1 fused kernel and the plain scan both handle; each case runs
# on the cells that matter for it.
_OPTIONS = {
    "plain": {},
    "lengths_reverse": {"lengths": np.array([T, 3]), "reverse": True},
    "resets": {"resets": np.array([[0, 0, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0]], bool)},
    "truncate": {"gradient": Truncate(2)},
    "autodiff": {"gradient": Autodiff()},
}
_OPTION_CELLS = ("rnn_tanh", "lstm", "gru", "stack_lstm_gru", "learnable_lstm", "mgu")


def _inputs():
    rng = np.random.default_rng(1234)
    xs = rng.standard_normal((B, T, I))
    return jnp.asarray(xs, jnp.float64)


def _weights_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(np.shape(a)), jnp.float64), tree)


def _flatten(prefix, tree, out):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)


def _to64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _case(name, run, init, out, *, jacobians=None):
    """``run(params, xs) -> (carry, ys)``."""
    raw = init(jax.random.key(0), I)
    _flatten(f"{name}/init", raw, out)
    params = _to64(raw)
    xs = _inputs()
    # jitted (one compile per program; eagerly every op compiles on its own): the same float64
    # operations, so the results move by rounding only (ulps), far below the 1e-12 tolerance
    carry, ys = jax.jit(run)(params, xs)
    w_y = _weights_like(ys, 7)
    w_c = _weights_like(carry, 8)

    def loss(p, x):
        c, y = run(p, x)
        terms = jax.tree_util.tree_map(lambda a, w: jnp.sum(a * w), (c, y), (w_c, w_y))
        return sum(jax.tree_util.tree_leaves(terms))

    g_p, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xs)
    _flatten(f"{name}/ys", ys, out)
    _flatten(f"{name}/carry", carry, out)
    _flatten(f"{name}/grad_params", g_p, out)
    out[f"{name}/grad_xs"] = np.asarray(g_x)
    if jacobians is not None:
        out[f"{name}/jacobians"] = np.asarray(jax.jit(jacobians)(params, xs))


def case_names() -> list[str]:
    """The top-level cases (a cell or a layer each)."""
    return list(_cells()) + list(_layers())


def compute_all(only: str | None = None) -> dict[str, np.ndarray]:
    """Every golden array, keyed ``case/what[path]`` (only case ``only`` when given).
    Needs ``jax_enable_x64``."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError("golden numerics are float64: enable jax_enable_x64 first")
    out: dict[str, np.ndarray] = {}
    for name, make in _cells().items():
        if only is not None and name != only:
            continue
        cell = make()
        options = _OPTIONS if name in _OPTION_CELLS else {"plain": {}}
        for opt_name, opts in options.items():

            def run(p, x, cell=cell, opts=opts):
                return sj.unroll(cell, p, x, **opts)

            jac = None
            if opt_name == "plain":

                def jac(p, x, cell=cell):
                    return sj.spectrum.step_jacobians(cell, p, x).jacobians

            _case(f"{name}/{opt_name}", run, cell.init, out, jacobians=jac)
    for name, make in _layers().items():
        if only is not None and name != only:
            continue
        layer = make()
        for opt_name, opts in {"plain": {}, "lengths": {"lengths": np.array([T, 4])}}.items():

            def run(p, x, layer=layer, opts=opts):
                return layer.apply(p, x, **opts)

            _case(f"{name}/{opt_name}", run, layer.init, out)
    return out
