"""Train a small tanh RNN on the 3-bit flip-flop task and save its params as a test fixture.

The 3-bit flip-flop (Sussillo & Barak 2013, "Opening the black box"): three input channels
carry rare +1/-1 pulses; output channel i must hold the sign of the last pulse seen on
input channel i. A network that solves it stores 2**3 = 8 memories, one stable fixed point
of the autonomous dynamics (zero input) per memory state, which ``tests/test_fixed_points.py``
finds with ``seqjax.spectrum.find_fixed_points``.

Usage::

    python scripts/make_flipflop_fixture.py            # writes tests/data/flipflop_rnn.npz

The fixture holds ``w_x (3, H)``, ``w_h (H, H)``, ``b (H,)`` of ``seqjax.rnn(H)`` and a linear
readout ``w_out (H, 3)``, ``b_out (3,)``, in float32 (a few KiB). Deterministic given the seed.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import seqjax as sj

N_BITS = 3


def flipflop_batch(key, batch: int, T: int, p: float = 0.05):
    """Inputs ``(batch, T, 3)`` with +-1 pulses at rate ``p`` and targets ``(batch, T, 3)``."""
    k_on, k_sign = jax.random.split(key)
    on = jax.random.bernoulli(k_on, p, (batch, T, N_BITS))
    sign = jnp.where(jax.random.bernoulli(k_sign, 0.5, (batch, T, N_BITS)), 1.0, -1.0)
    xs = jnp.where(on, sign, 0.0)

    # target: the value of the last pulse so far on each channel (0 before the first one)
    t = jnp.arange(T).reshape(1, T, 1)
    last = jax.lax.cummax(jnp.where(on, t, -1), axis=1)
    ys = jnp.take_along_axis(xs, jnp.maximum(last, 0), axis=1)
    return xs, jnp.where(last >= 0, ys, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out",
        default=str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "flipflop_rnn.npz"),
    )
    args = ap.parse_args()

    H = args.hidden
    cell = sj.rnn(H)
    key = jax.random.key(args.seed)
    k_cell, k_out, key = jax.random.split(key, 3)
    params = {
        "cell": cell.init(k_cell, N_BITS),
        "w_out": jax.random.normal(k_out, (H, N_BITS)) / np.sqrt(H),
        "b_out": jnp.zeros((N_BITS,)),
    }

    def loss_fn(p, xs, ys):
        _, hs = sj.unroll(cell, p["cell"], xs)
        pred = hs @ p["w_out"] + p["b_out"].reshape(1, 1, N_BITS)
        # the first steps before any pulse have target 0: ignore them by weighting where target set
        w = (ys != 0).astype(pred.dtype)
        return jnp.sum(w * (pred - ys) ** 2) / jnp.maximum(jnp.sum(w), 1.0)

    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-3))
    state = opt.init(params)

    @jax.jit
    def train_step(p, s, k):
        xs, ys = flipflop_batch(k, 64, 100)
        loss, g = jax.value_and_grad(loss_fn)(p, xs, ys)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    for i in range(args.steps):
        key, k = jax.random.split(key)
        params, state, loss = train_step(params, state, k)
        if i % 500 == 0 or i == args.steps - 1:
            print(f"step {i:5d}  loss {float(loss):.5f}")

    xs, ys = flipflop_batch(jax.random.key(12345), 256, 200)
    final = float(loss_fn(params, xs, ys))
    print(f"held-out loss {final:.5f}")
    np.savez(
        args.out,
        w_x=np.asarray(params["cell"]["w_x"], np.float32),
        w_h=np.asarray(params["cell"]["w_h"], np.float32),
        b=np.asarray(params["cell"]["b"], np.float32),
        w_out=np.asarray(params["w_out"], np.float32),
        b_out=np.asarray(params["b_out"], np.float32),
        held_out_loss=np.float32(final),
    )
    print("wrote", args.out)


if __name__ == "__main__":
    main()
