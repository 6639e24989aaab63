"""seqjax quickstart: train a small LSTM on the adding problem for a few seconds.

The adding problem (Hochreiter & Schmidhuber 1997): each step carries a value in [0, 1]
and a marker; exactly two steps are marked, one in each half; the target is the sum of
the two marked values. Always answering 1 scores MSE 1/6 (~0.167): a model that learns
must go below that.

Run:  python examples/quickstart.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import seqjax as sj


def adding_batch(rng: np.random.Generator, batch: int, T: int):
    values = rng.uniform(0.0, 1.0, (batch, T))
    first = rng.integers(0, T // 2, batch)
    second = rng.integers(T // 2, T, batch)
    markers = np.zeros((batch, T))
    markers[np.arange(batch), first] = 1.0
    markers[np.arange(batch), second] = 1.0
    xs = np.stack([values, markers], axis=-1).astype(np.float32)
    ys = (values[np.arange(batch), first] + values[np.arange(batch), second]).astype(np.float32)
    return xs, ys


def main(T: int = 30, hidden: int = 32, steps: int = 400, batch: int = 64, seed: int = 0):
    cell = sj.lstm(hidden, forget_bias=1.0)
    k_cell, k_out = jax.random.split(jax.random.key(seed))
    params = {
        "cell": cell.init(k_cell, input_size=2),
        "w_out": 0.1 * jax.random.normal(k_out, (hidden, 1)),
        "b_out": jnp.ones((1,)),
    }

    def loss_fn(params, xs, ys):
        carry, _ = sj.unroll(cell, params["cell"], xs)  # carry.h: (B, H)
        pred = (carry.h @ params["w_out"] + params["b_out"][None, :])[:, 0]
        return jnp.mean((pred - ys) ** 2)

    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, xs, ys):
        loss, grads = jax.value_and_grad(loss_fn)(params, xs, ys)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    x_test, y_test = adding_batch(rng, 1000, T)
    print(f"adding problem, T={T}: LSTM({hidden}), {steps} Adam steps, batch {batch}")
    print(f"baseline (always predict 1): test MSE = {np.mean((1.0 - y_test) ** 2):.4f}")
    t0 = time.perf_counter()
    for i in range(steps + 1):
        if i % 100 == 0:
            test = float(jax.jit(loss_fn)(params, x_test, y_test))
            print(f"step {i:4d}  test MSE = {test:.4f}")
        if i < steps:
            params, opt_state, _ = train_step(params, opt_state, *adding_batch(rng, batch, T))
    print(f"trained in {time.perf_counter() - t0:.1f} s; final test MSE {test:.4f} vs baseline 0.167")


if __name__ == "__main__":
    main()
