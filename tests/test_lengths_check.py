"""``lengths`` outside ``[0, T]`` never pass silently where they can be seen (issue 16).

- eager (concrete lengths): a host ``ValueError`` naming the first bad index and value;
- under ``jit`` (traced lengths): nothing by default (the documented behaviour: a length
  above ``T`` runs as ``T``, a negative one as ``0``) and an in-graph
  ``checkify.debug_check`` that fires under ``seqjax.unroll.checked`` / ``checkify.checkify``,
  also through ``value_and_grad``, ``vmap`` and batch sharding (the last two: slow tier);
- the default jitted path compiles to exactly the program without the check.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import checkify

import seqjax as sj
from seqjax.unroll import checked

U = sys.modules["seqjax.unroll"]  # the module (``seqjax.unroll`` is also the function)

B, T, I, H = 2, 5, 3, 4
CELL = sj.rnn(H)
PARAMS = CELL.init(jax.random.key(0), I)
XS = jax.random.normal(jax.random.key(1), (B, T, I))


def run(params, xs, lengths):
    return sj.unroll(CELL, params, xs, lengths=lengths)


def loss(params, xs, lengths):
    return jnp.sum(run(params, xs, lengths)[1] ** 2)


JIT_RUN = jax.jit(run)
CHECKED_RUN = checked(JIT_RUN)  # checked composes with a jitted function


# --------------------------------------------------------------------------- host check (eager)


@pytest.mark.parametrize(
    "lengths, where",
    [
        ([5, 6], r"lengths\[1\] = 6 is the first outside \(1 of 2\)"),
        ([-3, 2], r"lengths\[0\] = -3 is the first outside \(1 of 2\)"),
        ([7, -1], r"lengths\[0\] = 7 is the first outside \(2 of 2\)"),
    ],
    ids=["above-T", "negative", "both"],
)
def test_eager_out_of_range_lengths_raise_naming_index_and_value(lengths, where):
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=5\] .*" + where):
        sj.unroll(CELL, PARAMS, XS, lengths=jnp.array(lengths))


def test_eager_check_covers_trajectory_and_several_batch_dims():
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9 is the first outside"):
        sj.trajectory(CELL, PARAMS, XS, lengths=jnp.array([0, 9]))
    xs2 = jnp.ones((2, 2, T, I))
    with pytest.raises(ValueError, match=r"lengths\[1, 0\] = -1 is the first outside"):
        sj.unroll(CELL, PARAMS, xs2, lengths=jnp.array([[0, 5], [-1, 2]]))
    # the bounds themselves are valid, and a constant closed over under jit is concrete: host check
    assert U._check_lengths(jnp.array([0, T]), (B,), T).tolist() == [0, T]
    const = jnp.array([6, 1])
    with pytest.raises(ValueError, match=r"lengths\[0\] = 6"):
        jax.jit(lambda p, x: run(p, x, const))(PARAMS, XS)


# --------------------------------------------------------------------------- under jit, by default


def test_jit_without_checkify_runs_and_clamps():
    """The documented behaviour: a length above T runs as T, a negative one as 0."""
    c_hi, ys_hi = JIT_RUN(PARAMS, XS, jnp.array([6, 100]))
    c_t, ys_t = JIT_RUN(PARAMS, XS, jnp.array([T, T]))
    assert jnp.array_equal(ys_hi, ys_t) and jnp.array_equal(c_hi, c_t)
    c_lo, ys_lo = JIT_RUN(PARAMS, XS, jnp.array([-3, 2]))
    c_0, ys_0 = JIT_RUN(PARAMS, XS, jnp.array([0, 2]))
    assert jnp.array_equal(ys_lo, ys_0) and jnp.array_equal(c_lo, c_0)
    assert jnp.all(ys_lo[0] == 0) and jnp.all(c_lo[0] == 0)  # length 0: zeros, the initial carry


def test_default_jitted_path_compiles_to_the_program_without_the_check(monkeypatch):
    lengths = jnp.array([5, 3])
    jaxpr = jax.make_jaxpr(run)(PARAMS, XS, lengths)
    checks = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "check"]
    assert len(checks) == 1 and checks[0].params["debug"] is True  # debug: lowered to nothing

    def compiled():  # a fresh function each time: jit's trace cache must not answer
        lowered = jax.jit(lambda *a: run(*a)).lower(PARAMS, XS, lengths)
        assert "callback" not in lowered.as_text()  # no host callback
        return lowered.compile().as_text()

    def instructions(hlo):  # the HLO instructions' opcodes (names and metadata differ)
        return sorted(re.findall(r"= \S+ ([\w-]+)\(", hlo))

    with_check = instructions(compiled())
    monkeypatch.setattr(U, "_debug_check_range", lambda *a: None)
    without = instructions(compiled())
    assert with_check == without and len(without) > 10


# --------------------------------------------------------------------------- opt-in: checkify


def test_checked_raises_in_graph_with_index_value_and_T():
    for lengths, where in (([5, 6], r"lengths\[1\] = 6"), ([-3, 2], r"lengths\[0\] = -3")):
        with pytest.raises(checkify.JaxRuntimeError, match=r"lengths must lie in \[0, T=5\].*got " + where):
            CHECKED_RUN(PARAMS, XS, jnp.array(lengths))
    good = jnp.array([5, 3])
    c, ys = CHECKED_RUN(PARAMS, XS, good)  # in range: the plain result
    c_ref, ys_ref = JIT_RUN(PARAMS, XS, good)
    assert jnp.array_equal(ys, ys_ref) and jnp.array_equal(c, c_ref)
    assert issubclass(checkify.JaxRuntimeError, ValueError)


def test_checkify_by_hand_under_value_and_grad():
    """A training step differentiates through unroll: the check fires there too, and the
    checked step's value and gradients are those of the plain jitted step."""
    step = jax.jit(checkify.checkify(jax.value_and_grad(loss), errors=checkify.user_checks))
    err, _ = step(PARAMS, XS, jnp.array([2, 6]))
    with pytest.raises(ValueError, match=r"lengths\[1\] = 6 .*T=5|T=5.*lengths\[1\] = 6"):
        err.throw()
    err, (v, g) = step(PARAMS, XS, jnp.array([2, 5]))
    assert err.get() is None
    v_ref, g_ref = jax.jit(jax.value_and_grad(loss))(PARAMS, XS, jnp.array([2, 5]))
    assert jnp.array_equal(v, v_ref)
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)))


@pytest.mark.slow  # one more compile; the same check as above, batched
def test_checked_under_vmap():
    """Batched lengths give a batched error; ``checked`` raises the first failing one."""
    vrun = checked(jax.vmap(run, in_axes=(None, 0, 0)))
    with pytest.raises(ValueError, match=r"lengths\[1\] = 7"):
        vrun(PARAMS, jnp.stack([XS, XS]), jnp.array([[5, 5], [1, 7]]))


def test_checked_without_jit_sees_concrete_lengths():
    """``checked(fn, jit=False)`` traces ``fn`` with the concrete arguments: the host check."""
    with pytest.raises(ValueError, match=r"lengths\[1\] = 6 is the first outside"):
        checked(run, jit=False)(PARAMS, XS, jnp.array([1, 6]))
    with pytest.raises(TypeError, match="needs a callable"):
        checked(None)  # type: ignore[arg-type]


_SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from jax.experimental import checkify
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import seqjax as sj
    from seqjax.unroll import checked

    cell = sj.rnn(4)
    params = cell.init(jax.random.key(0), 3)
    run = lambda p, xs, lengths: sj.unroll(cell, p, xs, lengths=lengths)[1]
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((2,), ("b",), axis_types=(axis_type,))
        put = lambda a: jax.device_put(a, NamedSharding(mesh, P("b")))
        xs, good, bad = put(jnp.ones((4, 5, 3))), put(jnp.array([5, 3, 2, 1])), put(jnp.array([5, 3, 2, 9]))
        assert jax.jit(run)(params, xs, good).shape == (4, 5, 4)
        assert jnp.array_equal(checked(run)(params, xs, good), jax.jit(run)(params, xs, good))
        try:
            checked(run)(params, xs, bad)
            raise SystemExit("no error")
        except checkify.JaxRuntimeError as e:
            assert "lengths[3] = 9" in str(e), str(e)
    print("OK")
    """
)


@pytest.mark.slow  # a subprocess with two forced CPU devices (XLA_FLAGS is read at start-up)
def test_lengths_sharded_over_the_batch_trace_and_check():
    """The in-graph check uses no gather, reshape or dynamic slice: lengths sharded over a
    mesh (auto and explicit axes) trace on the default path and are checked under checked."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
