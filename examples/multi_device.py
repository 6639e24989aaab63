"""Data-parallel training over every device JAX sees (CPU cores, GPUs or TPU chips).

``seqjax.train.fit(..., mesh=data_parallel_mesh())`` shards each batch along its leading
axis over a one-axis ``Mesh`` named ``"data"`` and replicates params and optimizer state;
XLA inserts the gradient all-reduce. The same script runs on one CPU, on a multi-GPU host
and, after ``jax.distributed.initialize()``, on a pod. To try several devices on a laptop,
make the CPU pretend to be several devices (this must happen before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/multi_device.py

The script trains the same model twice from the same key, once sharded over all devices
and once on a single device, and checks that the two runs agree to float32 rounding
(a data-parallel step computes the same gradient, only the order of the sums differs).

Run:  python examples/multi_device.py [--steps 300]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

import seqjax as sj
from seqjax import tasks
from seqjax.layers import dense
from seqjax.losses import mse
from seqjax.seq2seq import many_to_one
from seqjax.train import Logging, clipped_adam, data_parallel_mesh, fit


def main(
    steps: int = 300, hidden: int = 64, T: int = 50, batch: int = 64, seed: int = 0, progress: bool = True
) -> dict:
    """Train sharded and unsharded; compare.

    Args:
      steps: Adam steps.
      hidden: LSTM units.
      T: adding-problem length.
      batch: global batch size (a multiple of the device count).
      seed: random seed.
      progress: show progress bars.

    Returns:
      ``{"devices", "sharded_loss", "single_loss", "max_param_diff", "sharded_seconds",
      "single_seconds"}``.
    """
    devices = jax.devices()
    n = len(devices)
    if batch % n:
        raise ValueError(f"batch={batch} must be a multiple of the {n} devices (each device gets batch/{n}).")
    print(
        f"{n} device(s): {', '.join(str(d) for d in devices)}; global batch {batch} ({batch // n} per device)"
    )
    model = many_to_one(sj.lstm(hidden, forget_bias=1.0), dense(1))
    k_init, k_fit = jax.random.split(jax.random.key(seed))
    params = model.init(k_init, 2)

    def loss_fn(p, batch):
        xs, ys = batch
        return mse(model.apply(p, xs)[:, 0], ys)

    data = functools.partial(tasks.adding_problem, n=batch, length=T)
    common = dict(key=k_fit, steps=steps, logging=Logging(every=max(1, steps // 5), progress=progress))

    t0 = time.perf_counter()
    sharded = fit(loss_fn, clipped_adam(1e-2), params, data, mesh=data_parallel_mesh(), **common)
    t_sharded = time.perf_counter() - t0
    leaf = jax.tree_util.tree_leaves(sharded.state.params)[0]
    print(f"sharded run: params live on {len(leaf.sharding.device_set)} device(s), {t_sharded:.1f} s")

    t0 = time.perf_counter()
    single = fit(loss_fn, clipped_adam(1e-2), params, data, mesh=None, **common)
    t_single = time.perf_counter() - t0

    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree_util.tree_leaves(sharded.state.params),
            jax.tree_util.tree_leaves(single.state.params),
            strict=True,
        )
    )
    res = {
        "devices": n,
        "sharded_loss": float(sharded.history[-1]["loss"]),
        "single_loss": float(single.history[-1]["loss"]),
        "max_param_diff": diff,
        "sharded_seconds": t_sharded,
        "single_seconds": t_single,
    }
    print(
        f"final training loss: sharded {res['sharded_loss']:.4f}, single device {res['single_loss']:.4f}; "
        f"largest parameter difference {diff:.2e} (float32 rounding: the order of the gradient sums differs)"
    )
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="a few steps at tiny sizes (smoke test)")
    a = ap.parse_args()
    if a.tiny:
        main(steps=3, hidden=4, T=6, batch=8, progress=False)
    else:
        main(steps=a.steps, hidden=a.hidden, batch=a.batch)
