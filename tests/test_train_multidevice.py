"""Data parallelism: 4 forced CPU devices (in a subprocess; XLA_FLAGS must be set before JAX
starts) give the same training result as one device, to float tolerance. About 15 s on an
idle 2-core machine (two processes' worth of compiles), hence slow."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_numpy_rank_promotion", "raise")
    import seqjax as sj
    from seqjax.train import (Evaluation, Logging, clipped_adam, data_parallel_mesh, fit, make_train_step,
                              init_train_state)

    assert jax.device_count() == 4, jax.devices()
    cell = sj.rnn(8)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"cell": cell.init(k1, 3), "w": 0.1 * jax.random.normal(k2, (8, 2))}

    def loss(p, batch):
        xs, ys = batch
        h, _ = sj.unroll(cell, p["cell"], xs)
        return jnp.mean((h @ p["w"] - ys) ** 2)

    rng = np.random.default_rng(0)
    xs = rng.normal(size=(64, 6, 3)).astype(np.float32)
    ys = np.stack([xs[:, :, 0].sum(1), xs[:, -1, 1]], -1).astype(np.float32)
    kw = dict(key=jax.random.key(1), steps=12, batch_size=16, logging=Logging(every=4),
              evaluation=Evaluation((xs, ys), batch_size=30))  # 30, 30 (replicated), 4 (sharded)
    auto = fit(loss, clipped_adam(1e-2), params, (xs, ys), **kw)           # mesh="auto": all 4 devices
    one = fit(loss, clipped_adam(1e-2), params, (xs, ys), mesh=None, **kw)
    mesh = data_parallel_mesh()
    # the step really shards the batch and replicates the state
    st = jax.device_put(init_train_state(params, clipped_adam(1e-2), key=jax.random.key(0)),
                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step = make_train_step(loss, clipped_adam(1e-2), mesh=mesh)
    st, m = step(st, (xs[:16], ys[:16]))
    out = {
        "auto": [np.asarray(a).tolist() for a in jax.tree.leaves(auto.state.params)],
        "one": [np.asarray(a).tolist() for a in jax.tree.leaves(one.state.params)],
        "hist_auto": [[r["loss"], r["grad_norm"], r["eval_loss"]] for r in auto.history],
        "hist_one": [[r["loss"], r["grad_norm"], r["eval_loss"]] for r in one.history],
        "n_param_devices": len(st.params["w"].sharding.device_set),
        "replicated": st.params["w"].sharding.is_fully_replicated,
        "auto_devices": len(auto.state.params["w"].sharding.device_set),
        "one_devices": len(one.state.params["w"].sharding.device_set),
    }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_four_devices_equal_one_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    r = json.loads(line[len("RESULT") :])
    assert r["auto_devices"] == 4 and r["one_devices"] == 1
    assert r["n_param_devices"] == 4 and r["replicated"]
    # float32; the only difference is the order of the batch reduction (per-device partial
    # sums then an all-reduce), amplified a little by 12 Adam steps.
    for a, b in zip(r["auto"], r["one"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(r["hist_auto"]), np.asarray(r["hist_one"]), rtol=2e-5, atol=1e-6)


WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
    import jax.numpy as jnp, numpy as np
    from seqjax.train import Logging, clipped_adam, fit

    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (x @ rng.normal(size=(3, 2))).astype(np.float32)

    def loss(p, b):
        xx, yy = b
        return jnp.mean((xx @ p["w"] - yy) ** 2)

    p = {"w": jnp.zeros((3, 2))}
    kw = dict(key=jax.random.key(0), steps=6, batch_size=16, logging=Logging(every=3))
    multi = fit(loss, clipped_adam(1e-1), p, (x, y), **kw)  # mesh over both processes' devices
    one = fit(loss, clipped_adam(1e-1), p, (x, y), mesh=None, **kw)
    w = multi.state.params["w"]
    print("RESULT" + json.dumps({"multi": np.asarray(w.addressable_data(0)).tolist(),
                                 "devices": len(w.sharding.device_set),
                                 "one": np.asarray(one.state.params["w"]).tolist()}))
    """
)


@pytest.mark.slow
def test_two_processes_equal_one_device():
    """jax.distributed.initialize with two local CPU processes of two devices each (gloo)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), f"localhost:{port}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            outs.append(
                json.loads(next(l for l in out.splitlines() if l.startswith("RESULT"))[len("RESULT") :])
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r in outs:
        assert r["devices"] == 4
        # float32: only the order of the batch reduction differs
        np.testing.assert_allclose(np.asarray(r["multi"]), np.asarray(r["one"]), rtol=1e-5, atol=1e-6)
    assert outs[0]["multi"] == outs[1]["multi"]  # replicated: every process holds the same params
