"""A/B timing of forward+backward through ``unroll`` for two checkouts of seqjax.

Run as ``PYTHONPATH=<checkout> python scripts/ab_speed.py`` once per checkout, alternating
processes (``scripts/ab_speed.sh`` style), and compare the minima: the same jitted
``jax.grad`` of ``sum(ys**2)`` with respect to params and inputs, 10 timed calls after one
warm-up, float32, the speed suite's ``medium`` and ``large`` shapes. Prints one JSON line.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp

import seqjax as sj

CONFIGS = {"medium": (32, 100, 64, 256), "large": (64, 100, 256, 512)}


def main(reps: int = 10) -> None:
    out = {"seqjax": sj.__file__}
    for name, (B, T, I, H) in CONFIGS.items():
        for kind in ("rnn", "lstm", "gru"):
            cell = getattr(sj, kind)(H)
            params = cell.init(jax.random.key(0), I)
            xs = jax.random.normal(jax.random.key(1), (B, T, I))

            def loss(p, x, cell=cell):
                return jnp.sum(sj.unroll(cell, p, x)[1] ** 2)

            f = jax.jit(jax.grad(loss, argnums=(0, 1)))
            jax.block_until_ready(f(params, xs))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(params, xs))
                times.append(time.perf_counter() - t0)
            out[f"{name}/{kind}"] = min(times) * 1e3
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
