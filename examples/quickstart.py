"""seqjax quickstart: train a small LSTM on the adding problem for a few seconds.

The adding problem (Hochreiter & Schmidhuber 1997): each step carries a value in [0, 1]
and a marker; exactly two steps are marked, one in each half; the target is the sum of
the two marked values. Always answering 1 scores MSE 1/6 (~0.167): a model that learns
must go below that.

Run:  python examples/quickstart.py
"""

import functools
import time

import jax
import jax.numpy as jnp

import seqjax as sj
from seqjax.tasks import ADDING_BASELINE_MSE, adding_problem
from seqjax.train import Evaluation, Logging, clipped_adam, fit


def main(T: int = 30, hidden: int = 32, steps: int = 400, batch: int = 64, seed: int = 0):
    cell = sj.lstm(hidden, forget_bias=1.0)
    k_cell, k_out, k_test, k_fit = jax.random.split(jax.random.key(seed), 4)
    params = {
        "cell": cell.init(k_cell, input_size=2),
        "w_out": 0.1 * jax.random.normal(k_out, (hidden, 1)),
        "b_out": jnp.ones((1,)),
    }

    def loss_fn(params, batch):
        xs, ys = batch
        carry, _ = sj.unroll(cell, params["cell"], xs)  # carry.h: (B, H)
        pred = (carry.h @ params["w_out"] + params["b_out"][None, :])[:, 0]
        return jnp.mean((pred - ys) ** 2)

    print(f"adding problem, T={T}: LSTM({hidden}), {steps} Adam steps, batch {batch}")
    print(f"baseline (always predict 1): MSE = {ADDING_BASELINE_MSE:.4f}")
    t0 = time.perf_counter()
    result = fit(
        loss_fn,
        clipped_adam(1e-2, max_norm=1.0),  # optax.chain(clip_by_global_norm(1), adam(1e-2)), clipping tracked
        params,
        functools.partial(adding_problem, n=batch, length=T),  # a fresh batch per step: key -> (xs, ys)
        key=k_fit,
        steps=steps,
        steps_per_call=20,  # 20 steps per compiled call (lax.scan over batches)
        logging=Logging(every=100),
        evaluation=Evaluation(adding_problem(k_test, 1000, T)),  # a fixed test set, evaluated at each row
    )
    for row in result.history:
        print(
            f"step {row['step']:4d}  train MSE {row['loss']:.4f}  test MSE {row['eval_loss']:.4f}  "
            f"grad norm {row['grad_norm']:.3f}  clipped {row['clipped_frac']:.0%}"
        )
    final = result.history[-1]["eval_loss"]
    print(
        f"trained in {time.perf_counter() - t0:.1f} s; "
        f"final test MSE {final:.4f} vs baseline {ADDING_BASELINE_MSE:.3f}"
    )


if __name__ == "__main__":
    main()
