"""The opt-in cuDNN LSTM kernel (``seqjax.cells._cudnn``), tested on CPU.

No GPU here, so the cuDNN call itself is replaced by ``jax.experimental.rnn.lstm_ref`` (JAX's
CPU reference of the same call, same packed-weight format) with autodiff for its backward:
everything around the call (packing, flattening, time flips, the custom_vjp, vmap) runs as
on a GPU. Oracles: a float64 NumPy loop from the LSTM equations (``tests/reference.py``),
``lstm_ref`` itself, and the LSTM's own fused kernel (a hand-written backward, independent
of autodiff of ``lstm_ref``).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from helpers import assert_trees_close, x64_enabled
from jax.experimental import rnn

import seqjax as sj
from seqjax.cells import _cudnn as cd

T, I, H = 5, 3, 4
BATCH = (2, 3)
# float64, same maths, different summation order over O(H + I) terms and T = 5 steps:
# rounding is ~1e-15; 1e-11 leaves room without hiding a wrong gate or layout (O(1) errors).
RTOL64, ATOL64 = 1e-11, 1e-12
# float32 comparisons where the two sides run the same ops (the default branch against the
# fallback): equal up to XLA fusion choices, a few ulps.
RTOL32, ATOL32 = 1e-6, 1e-7


# --------------------------------------------------------------------------- the CPU stand-in


def _ref(x, h0, c0, w, input_size, hidden_size):
    W_ih, W_hh, b_ih, b_hh = rnn.unpack_lstm_weights(w, input_size, hidden_size, 1, False)
    lengths = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
    return rnn.lstm_ref(x, h0, c0, W_ih, W_hh, b_ih, b_hh, lengths, input_size, hidden_size, 1, 0.0, False)


def _ref_fwd(x, h0, c0, w, *, input_size, hidden_size):
    return _ref(x, h0, c0, w, input_size, hidden_size), (x, h0, c0, w)


def _ref_bwd(res, dy, dh_n, dc_n, *, input_size, hidden_size):
    _, vjp = jax.vjp(lambda *a: _ref(*a, input_size, hidden_size), *res)
    return vjp((dy, dh_n, dc_n))


def _poison_fwd(x, h0, c0, w, *, input_size, hidden_size):
    (y, h_n, c_n), res = _ref_fwd(x, h0, c0, w, input_size=input_size, hidden_size=hidden_size)
    return (y + 1.0, h_n + 1.0, c_n + 1.0), res  # wrong on purpose: must never run on CPU


def _poison_bwd(res, dy, dh_n, dc_n, *, input_size, hidden_size):
    grads = _ref_bwd(res, dy, dh_n, dc_n, input_size=input_size, hidden_size=hidden_size)
    return tuple(2.0 * g for g in grads)


def _yes():
    return True


REF = cd._Impl(_ref_fwd, _ref_bwd, _yes)
POISON = cd._Impl(_poison_fwd, _poison_bwd, _yes)


# --------------------------------------------------------------------------- fixtures


# Inputs come from NumPy (no eager XLA ops to compile): N(0, scale^2) entries everywhere, so
# no weight is special (e.g. a zero bias), and a nonzero initial carry.


def _random_params(hidden_bias, dtype, seed=1, scale=0.7):
    rng = np.random.default_rng(seed)
    shapes = {"w_x": (I, 4 * H), "w_h": (H, 4 * H), "b": (4 * H,)}
    if hidden_bias:
        shapes["b_h"] = (4 * H,)
    return {k: jnp.asarray(scale * rng.standard_normal(v), dtype) for k, v in shapes.items()}


def _carry(batch, dtype, seed=2):
    rng = np.random.default_rng(seed)
    return sj.LSTMState(*(jnp.asarray(0.5 * rng.standard_normal(batch + (H,)), dtype) for _ in range(2)))


def _xs(batch, dtype, seed=3, steps=T):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((steps,) + batch + (I,)), dtype)


@pytest.fixture(scope="module")
def base():
    return sj.lstm(H)


def _loss(run, reverse=False):
    """A scalar of every output: ys, and both parts of the final carry (weighted apart)."""

    def loss(p, c, x):
        final, ys, _ = run(p, c, x, reverse=reverse)
        return jnp.sum(ys**2) + jnp.sum(0.3 * final.h) + jnp.sum(jnp.sin(final.c))

    return loss


def _has_platform_switch(fn, *args) -> bool:
    return "platform_index" in str(jax.make_jaxpr(fn)(*args))


# --------------------------------------------------------------------------- packing


def test_packed_weights_drive_lstm_ref_like_the_equations():
    """``lstm_ref`` on the packed vector == a float64 NumPy loop of the LSTM equations ==
    seqjax's unroll, from a nonzero carry, with both biases (``b_h`` packed as ``b_hh``)."""
    with x64_enabled():
        p = _random_params(True, jnp.float64)
        c0 = _carry((2,), jnp.float64)
        xs = _xs((2,), jnp.float64)  # (T, B, I)
        w = cd.pack_cudnn_lstm_weights(p, H)
        assert w.shape == (rnn.get_num_params_in_lstm(I, H, 1, False),)
        cell = sj.lstm(H, hidden_bias=True)

        @jax.jit
        def both(p, c0, xs):
            y, h_n, c_n = _ref(
                jnp.swapaxes(xs, 0, 1), c0.h[None], c0.c[None], cd.pack_cudnn_lstm_weights(p, H), I, H
            )
            final, ys_sj = sj.unroll(cell, p, jnp.swapaxes(xs, 0, 1), carry=c0)
            return (y, h_n[0], c_n[0]), (ys_sj, final.h, final.c)

        (y, h_n, c_n), from_seqjax = both(p, c0, xs)
        pn = ref.np_params(p)
        h, c = np.asarray(c0.h), np.asarray(c0.c)
        ys = []
        for t in range(T):
            h, c = ref.lstm_step(pn, h, c, np.asarray(xs[t]))
            ys.append(h)
        np.testing.assert_allclose(np.swapaxes(np.asarray(y), 0, 1), np.stack(ys), rtol=RTOL64, atol=ATOL64)
        np.testing.assert_allclose(np.asarray(h_n), h, rtol=RTOL64, atol=ATOL64)
        np.testing.assert_allclose(np.asarray(c_n), c, rtol=RTOL64, atol=ATOL64)
        assert_trees_close(from_seqjax, (y, h_n, c_n), rtol=RTOL64, atol=ATOL64)
        # without b_h the second bias block is zero
        p1 = {k: v for k, v in p.items() if k != "b_h"}
        b_hh = rnn.unpack_lstm_weights(cd.pack_cudnn_lstm_weights(p1, H), I, H, 1, False)[3][0]
        np.testing.assert_array_equal(np.asarray(b_hh), 0.0)


# --------------------------------------------------------------------------- the cuDNN branch


def _branch(p, c, x, reverse=False):
    return cd._cudnn_run(p, c, x, hidden_size=H, reverse=reverse, impl=REF)


def test_cudnn_branch_equals_fallback_values_and_gradients(base):
    """The cuda branch (lstm_ref in cuDNN's place) against the LSTM's fused kernel, float64:
    outputs, final carry, and gradients for params, initial carry and inputs, on a 2-d batch
    in reverse time (flattening and flips; batch () is covered by the vmap test)."""
    batch, reverse = BATCH, True
    with x64_enabled():
        p = _random_params(True, jnp.float64)
        c0 = _carry(batch, jnp.float64)
        xs = _xs(batch, jnp.float64)

        @jax.jit
        def both(p, c0, xs):
            out = []
            for run in (_branch, base.kernel.run):
                final, ys, traj = run(p, c0, xs, reverse=reverse)
                assert traj is None
                out.append(((final, ys), jax.grad(_loss(run, reverse), argnums=(0, 1, 2))(p, c0, xs)))
            return out

        got, want = both(p, c0, xs)
        assert_trees_close(got, want, rtol=RTOL64, atol=ATOL64)


def test_cudnn_branch_under_vmap(base):
    """``jax.vmap`` (sequential cuDNN calls) of values and of per-member gradients; each
    member is one unbatched sequence (batch shape ``()``)."""
    with x64_enabled():
        p = _random_params(False, jnp.float64)
        c0 = _carry((), jnp.float64)
        xv = jnp.asarray(np.random.default_rng(7).standard_normal((3, T, I)), jnp.float64)

        @jax.jit
        def both(p, xv):
            out = []
            for run in (_branch, base.kernel.run):

                def ys_of(p, x, run=run):
                    return run(p, c0, x)[1]

                def sq(p, x, ys_of=ys_of):
                    return jnp.sum(ys_of(p, x) ** 2)

                vals = jax.vmap(ys_of, in_axes=(None, 0))(p, xv)
                grads = jax.vmap(jax.grad(sq), in_axes=(None, 0))(p, xv)
                out.append((vals, grads))
            return out

        got, want = both(p, xv)
        assert_trees_close(got, want, rtol=RTOL64, atol=ATOL64)


def _fake_lstm_fwd(
    x, h_0, c_0, w, seq_lengths, input_size, hidden_size, num_layers, dropout, bidirectional, precision
):
    """``jax.experimental.rnn.lstm_fwd`` with lstm_ref in place of the cuDNN primitive; checks
    what seqjax passes (one layer, no dropout, one direction, full lengths)."""
    assert (num_layers, dropout, bidirectional, precision) == (1, 0.0, False, None)
    assert isinstance(input_size, int) and isinstance(hidden_size, int)
    assert seq_lengths.dtype == jnp.int32 and seq_lengths.shape == (x.shape[0],)
    out = _ref(x, h_0, c_0, w, input_size, hidden_size)
    return out, (x, h_0, c_0, w, seq_lengths, out[0], jnp.zeros((3,), jnp.float32))


def _fake_lstm_bwd(
    input_size, hidden_size, num_layers, dropout, bidirectional, precision, residuals, gradients
):
    assert (num_layers, dropout, bidirectional, precision) == (1, 0.0, False, None)
    x, h_0, c_0, w, seq_lengths, _, _ = residuals
    _, vjp = jax.vjp(lambda *a: _ref(*a, input_size, hidden_size), x, h_0, c_0, w)
    return (*vjp(gradients), jnp.zeros_like(seq_lengths))


def test_calls_into_jax_experimental_rnn_match_its_signatures(base, monkeypatch):
    """The real cuDNN path's calls of ``rnn.lstm_fwd``/``rnn.lstm_bwd`` (positional arguments,
    residuals, returned tuple) against stand-ins with the same signatures: values and
    gradients equal the fallback's. float32, same maths in another order: 1e-5."""
    for fake, real in ((_fake_lstm_fwd, rnn.lstm_fwd), (_fake_lstm_bwd, rnn.lstm_bwd)):
        assert list(inspect.signature(fake).parameters) == list(inspect.signature(real).parameters)
    monkeypatch.setattr(rnn, "lstm_fwd", _fake_lstm_fwd)
    monkeypatch.setattr(rnn, "lstm_bwd", _fake_lstm_bwd)
    p = _random_params(False, jnp.float32)
    c0 = _carry((2,), jnp.float32)
    xs = _xs((2,), jnp.float32)

    def real_branch(p, c, x, reverse=False):
        return cd._cudnn_run(p, c, x, hidden_size=H, reverse=reverse, impl=cd._CUDNN)

    @jax.jit
    def both(p, c0, xs):
        return [
            (run(p, c0, xs)[:2], jax.grad(_loss(run), argnums=(0, 1, 2))(p, c0, xs))
            for run in (real_branch, base.kernel.run)
        ]

    got, want = both(p, c0, xs)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the kernel on CPU


@pytest.fixture(scope="module")
def poisoned(base):
    """The LSTM with a kernel whose cuda branch is wrong on purpose: on CPU it must not run."""
    return base._replace(kernel=cd._kernel(base.kernel, H, POISON))


def test_platform_dependent_takes_the_default_branch_on_cpu(base, poisoned):
    """Values and gradients through ``unroll`` (jitted, so both branches are staged) equal the
    fallback's: CPU lowering picks ``default``, never the (poisoned) cuda branch."""
    p = _random_params(False, jnp.float32)
    xs = jnp.swapaxes(_xs(BATCH[:1], jnp.float32), 0, 1)  # (B, T, I), unroll's batch-major

    def loss(cell, p, x):
        final, ys = sj.unroll(cell, p, x)
        return jnp.sum(ys**2) + jnp.sum(final.c), (final, ys)

    @jax.jit
    def both(p, x):
        return [jax.value_and_grad(loss, argnums=1, has_aux=True)(c, p, x) for c in (poisoned, base)]

    assert _has_platform_switch(lambda p, x: sj.unroll(poisoned, p, x), p, xs)
    got, want = both(p, xs)
    assert_trees_close(got, want, rtol=RTOL32, atol=ATOL32)


def test_real_kernel_without_cudnn_is_the_fallback(base):
    """On a machine without cuDNN the kernel stages no platform switch and is the fallback."""
    if cd.cudnn_available():
        pytest.skip("this machine can trace cuDNN: the CPU-only behaviour does not apply")
    kernel = sj.cells.Kernel
    k = cd.cudnn_lstm_kernel(base.kernel, H)
    assert isinstance(k, kernel) and k.accepts == base.kernel.accepts
    assert k == cd.cudnn_lstm_kernel(base.kernel, H) and hash(k) == hash(cd.cudnn_lstm_kernel(base.kernel, H))
    cell = base._replace(kernel=k)
    p = _random_params(False, jnp.float32)
    xs = jnp.swapaxes(_xs(BATCH[:1], jnp.float32), 0, 1)
    assert not _has_platform_switch(lambda p, x: sj.unroll(cell, p, x), p, xs)
    assert cd.cudnn_fallback_reason(p, base.initial_carry(p, (2,)), _xs((2,), jnp.float32)) is not None


# --------------------------------------------------------------------------- routing


def test_requests_cudnn_cannot_serve_route_to_the_fallback(base):
    """With cuDNN traceable (the stand-in), a plain or reversed call stages the platform switch;
    masks, resets, truncation, trajectories, float64, bfloat16 precision and empty sequences
    do not, and name their reason."""
    k = cd._kernel(base.kernel, H, REF)
    p = _random_params(False, jnp.float32)
    c0 = _carry((2,), jnp.float32)
    xs = _xs((2,), jnp.float32)
    m = jnp.ones((T, 2), bool)

    def staged(**kw):
        return _has_platform_switch(lambda p, c, x: k.run(p, c, x, **kw), p, c0, xs)

    assert staged() and staged(reverse=True)
    for kw in ({"mask": m}, {"resets": m}, {"keep": jnp.ones((T,))}, {"trajectory": True}):
        assert not staged(**kw), kw
        assert cd.cudnn_fallback_reason(p, c0, xs, available=_yes, **kw) is not None
    assert cd.cudnn_fallback_reason(p, c0, xs, available=_yes) is None
    assert "available" not in str(cd.cudnn_fallback_reason(p, c0, xs, available=lambda: False))
    with jax.default_matmul_precision("bfloat16"):
        assert "bfloat16" in cd.cudnn_fallback_reason(p, c0, xs, available=_yes)
    assert "T=0" in cd.cudnn_fallback_reason(p, c0, xs[:0], available=_yes)
    with x64_enabled():
        p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), p)
        assert "float64" in cd.cudnn_fallback_reason(p64, c0, xs, available=_yes)


def test_masked_unroll_through_the_cudnn_cell_is_exact(base):
    """``lengths`` (a mask) runs on the fallback: equal to the plain cell (poisoned cuda branch,
    so a wrong route would show)."""
    cell = base._replace(kernel=cd._kernel(base.kernel, H, POISON))
    p = _random_params(False, jnp.float32)
    xs = jnp.swapaxes(_xs((3,), jnp.float32), 0, 1)
    lengths = jnp.array([T, 2, 1])

    got, want = jax.jit(lambda p, x: [sj.unroll(c, p, x, lengths=lengths) for c in (cell, base)])(p, xs)
    assert_trees_close(got, want, rtol=RTOL32, atol=ATOL32)


# --------------------------------------------------------------------------- errors


def test_errors_name_the_argument(base):
    k = cd.cudnn_lstm_kernel(base.kernel, H)
    xs = jnp.zeros((T, 2, I))
    c0 = sj.LSTMState(jnp.zeros((2, H)), jnp.zeros((2, H)))
    p = {"w_x": jnp.zeros((I, 4 * H)), "w_h": jnp.zeros((H, 4 * H)), "b": jnp.zeros((4 * H,))}
    with pytest.raises(ValueError, match="proj_size"):
        k.run({**p, "w_p": jnp.zeros((H, 2))}, c0, xs)
    with pytest.raises(ValueError, match=r"w_h.*hidden_size=4"):
        k.run({**p, "w_h": jnp.zeros((8, 32))}, c0, xs)
    with pytest.raises(ValueError, match="unexpected"):
        cd.pack_cudnn_lstm_weights({**p, "extra": p["b"]}, H)
    with pytest.raises(TypeError, match="fallback"):
        cd.cudnn_lstm_kernel(sj.lstm(H, proj_size=2).kernel, H)
    with pytest.raises(ValueError, match="hidden_size"):
        cd.cudnn_lstm_kernel(base.kernel, 0)


def test_lstm_cudnn_option_builds_the_cudnn_kernel_and_refuses_a_projection():
    # The public switch gives exactly the kernel built by hand around the LSTM's own, and
    # leaves everything but the kernel (and the meta option) as the plain LSTM has it.
    H = 4
    plain, cudnn = sj.lstm(H), sj.lstm(H, cudnn=True)
    assert cudnn.kernel == cd.cudnn_lstm_kernel(plain.kernel, H)
    assert cudnn._replace(kernel=plain.kernel, meta=plain.meta) == plain
    assert cudnn.meta.option("cudnn") is True and plain.meta.option("cudnn") is None
    with pytest.raises(ValueError, match="cudnn=True needs proj_size=0, got proj_size=2"):
        sj.lstm(H, proj_size=2, cudnn=True)
