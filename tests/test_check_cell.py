"""``seqjax.testing.check_cell``: it passes on every built-in cell and on a user's cell, and it
catches a capability that does not match its step, naming the check and the capability.

What each check compares against is stated in ``check_cell``'s docstring: the step against
a Python loop, ``jit`` against eager, ``vmap`` against a loop over sequences, gradients
against central finite differences (float64); each capability against its generic fallback
(``jax.jacfwd`` of the flattened step, the step's own ``y``, autodiff of the plain scan
under every kernel option), to 1e-10 in float64.

Planted faults (each its own test): a transposed Jacobian, a kernel that ignores the mask
it claims to accept, a kernel left over from another step; and cheaper ones, each caught by
the single check it breaks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj
from seqjax.cells import Kernel
from seqjax.testing import CHECKS, CellCheckError, CellCheckReport, check_cell

H, I = 4, 3


def _double(x):
    return 2.0 * x


BUILTINS = {
    "rnn_tanh": lambda: sj.rnn(H),
    "rnn_relu": lambda: sj.rnn(H, activation="relu"),
    "rnn_identity": lambda: sj.rnn(H, activation="identity"),
    "rnn_sin": lambda: sj.rnn(H, activation=jnp.sin),  # a callable activation: kernel, no bound
    "irnn": lambda: sj.irnn(H),
    "lstm": lambda: sj.lstm(H),
    "lstm_proj": lambda: sj.lstm(H, proj_size=2),
    "lstm_hidden_bias": lambda: sj.lstm(H, hidden_bias=True),
    "gru": lambda: sj.gru(H),
    "mgu": lambda: sj.mgu(H),
    "janet": lambda: sj.janet(H),
    "janet_beta0": lambda: sj.janet(H, beta=0.0),
    "tdnn": lambda: sj.tdnn(H, 3),
    "narx": lambda: sj.narx(2, 3, output_window=2),
    "stack_lstm_gru": lambda: sj.stack([sj.lstm(H), sj.gru(H)]),
    "learnable_carry_lstm": lambda: sj.learnable_carry(sj.lstm(H)),
    "wrap_lstm_inputs": lambda: sj.cells.wrap(sj.lstm(H), inputs=_double),
}

# A full check_cell compiles a few float64 programs (3-15 s on two cores). The default run
# checks the LSTM (every capability, its fused kernel under every option); every cell with
# --runslow. (tests/test_contract.py runs the step checks, the finite-difference gradients
# and the kernel's plain call of every built-in cell in the default run.)
_FAST = ("lstm",)


def _expected_checks(cell):
    """The checks a full check_cell must have run on ``cell``: the step's, and one per
    capability it carries (a kernel: the plain call and every option it accepts)."""
    want = {"loop", "carry", "jit", "vmap", "grads"}
    for cap in cell.capabilities():
        if cap != "kernel":
            want.add(cap)
    if cell.kernel is not None:
        want.add("kernel[plain]")
        accepts = cell.kernel.accepts
        want |= {f"kernel[{o}]" for o in accepts}
        if "mask" in accepts:
            want.add("kernel[lengths]")
        if len(accepts) >= 2:
            want.add("kernel[combined]")
    return want


@pytest.mark.parametrize(
    "name", [n if n in _FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(BUILTINS)]
)
def test_builtin_cells_pass(name):
    cell = BUILTINS[name]()
    report = check_cell(cell)
    assert isinstance(report, CellCheckReport)
    want = _expected_checks(cell)
    if name == "rnn_sin":  # a callable activation: the bound needs the caller's gamma
        want.discard("jacobian_bound")
        assert ("jacobian_bound", "gamma is None: the caller supplies it") in report.skipped
    assert set(report.passed) == want, str(report)
    assert not set(report.passed) & {n for n, _ in report.skipped}
    for check in ("jacobian", "jacobian_diagonal", "output") + tuple(c for c in report.passed if "[" in c):
        if check in report.passed:  # exact capabilities agree with their fallbacks to float64 rounding
            assert report.max_errors[check] < 1e-12, (check, report.max_errors[check])


# --------------------------------------------------------------------------- a user's cell


def _leaky_init(key, input_size):
    k1, k2 = jax.random.split(key)
    return {
        "w": jax.random.normal(k1, (input_size, H)) / np.sqrt(input_size),
        "u": jax.random.normal(k2, (H, H)) / np.sqrt(H),
    }


def _leaky_carry(params, batch_shape=()):
    z = jnp.zeros(tuple(batch_shape) + (H,), params["w"].dtype)
    return (z, z)


_A = 0.5  # the leak


def _leaky_step(params, carry, x):
    """Carry ``(y, z)``, output ``y``: ``z_t = tanh(x W + y U)``, ``y_t = a y + (1 - a) z_t``."""
    y, _ = carry
    z = jnp.tanh(x @ params["w"] + y @ params["u"])
    y = _A * y + (1.0 - _A) * z
    return (y, z), y


def _leaky_output(params, carry, x):
    return carry[0]


def _leaky_jacobian(params, carry, x):
    """``s = [y, z]``: ``dz/dy = diag(1 - z^2) U^T``, ``dy/dy = a I + (1 - a) dz/dy``, and
    nothing depends on ``z_{t-1}``."""
    (_, z), _ = _leaky_step(params, carry, x)
    dz = (1.0 - z * z)[:, None] * params["u"].T
    dy = _A * jnp.eye(H, dtype=z.dtype) + (1.0 - _A) * dz
    zero = jnp.zeros((H, H), z.dtype)
    return jnp.block([[dy, zero], [dz, zero]])


def _leaky_diagonal(params, carry, x):
    return jnp.diagonal(_leaky_jacobian(params, carry, x))


def _leaky_gates(params, carry, x):
    (_, z), _ = _leaky_step(params, carry, x)
    return {"z": z}


def _leaky_bound(params):
    """``||J|| <= ||dy|| + ||dz|| <= a + (1 - a) s + s`` with ``s = sigma_max(U)``."""
    s = jnp.linalg.norm(params["u"], ord=2)
    return _A + (2.0 - _A) * s, 1.0


def _leaky_run(
    params, carry0, xs, *, mask=None, resets=None, keep=None, reverse=False, unroll=1, trajectory=False
):
    """A user's kernel: a Python loop over the steps (accepts reverse and trajectory only)."""
    assert mask is None and resets is None and keep is None  # never asked: not in accepts
    T = xs.shape[0]
    carry, ys, carries = carry0, [None] * T, [None] * T
    for t in reversed(range(T)) if reverse else range(T):
        carry, ys[t] = _leaky_step(params, carry, xs[t])
        carries[t] = carry
    traj = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *carries) if trajectory else None
    return carry, jnp.stack(ys), traj


def leaky_cell():
    return sj.Cell(
        _leaky_init,
        _leaky_carry,
        _leaky_step,
        output=_leaky_output,
        jacobian=_leaky_jacobian,
        jacobian_diagonal=_leaky_diagonal,
        kernel=Kernel(_leaky_run, frozenset({"reverse", "trajectory"})),
        gates=_leaky_gates,
        input_size=lambda params: params["w"].shape[0],
        jacobian_bound=_leaky_bound,
    )


@pytest.mark.slow  # a Python-loop kernel under every option (5-16 s); the step-only user cell runs by default
def test_user_cell_with_every_capability_passes():
    cell = leaky_cell()
    report = check_cell(cell)
    assert set(report.passed) == _expected_checks(cell), str(report)
    skipped = dict(report.skipped)
    # options its kernel declines are reported, not run
    assert skipped["kernel[mask]"] == "the kernel does not accept 'mask'"
    assert skipped["kernel[lengths]"] == "the kernel does not accept 'mask'"
    assert skipped["kernel[resets]"] == "the kernel does not accept 'resets'"
    assert skipped["kernel[truncate]"] == "the kernel does not accept 'truncate'"
    assert report.max_errors["jacobian_bound"] <= 0.0
    text = str(report)
    assert "kernel[reverse]" in text and "the kernel does not accept 'mask'" in text


def test_user_cell_with_step_only_passes():
    cell = sj.Cell(_leaky_init, _leaky_carry, _leaky_step)
    report = check_cell(cell, checks=("loop", "carry", "jit", "vmap", "output", "kernel"))
    assert report.passed == ("loop", "carry", "jit", "vmap")
    skipped = dict(report.skipped)
    assert skipped["grads"] == "not selected"
    assert "no output capability" in skipped["output"]
    assert "no kernel capability" in skipped["kernel"]


# --------------------------------------------------------------------------- planted faults


def _raises(cell, **kwargs) -> CellCheckError:
    with pytest.raises(CellCheckError) as info:
        check_cell(cell, **kwargs)
    err = info.value
    assert isinstance(err, AssertionError)
    assert err.max_error is not None and err.max_error > 1e-6, str(err)
    assert f"check {err.check!r} failed (capability {err.capability!r})" in str(err)
    assert f"max error {err.max_error:.3e}" in str(err)
    return err


def test_catches_transposed_jacobian():
    gru = sj.gru(H)

    def transposed(params, carry, x):
        return gru.jacobian(params, carry, x).T

    bad = gru._replace(jacobian=transposed)
    assert bad.kernel is gru.kernel  # replacing a capability keeps the others
    err = _raises(bad, checks=("jacobian",))  # the check it breaks (a full run stops there too)
    assert (err.check, err.capability) == ("jacobian", "jacobian")
    assert "jax.jacfwd" in str(err)


def test_catches_kernel_that_ignores_the_mask():
    lstm = sj.lstm(H)

    def run_without_mask(params, carry0, xs, *, mask=None, **options):
        return lstm.kernel.run(params, carry0, xs, **options)  # drops the mask

    bad = lstm._replace(kernel=Kernel(run_without_mask, lstm.kernel.accepts))
    assert "mask" in bad.kernel.accepts
    err = _raises(bad, checks=("kernel",), options=("mask",))  # kernel[plain] passes, kernel[mask] fails
    assert (err.check, err.capability) == ("kernel[mask]", "kernel")
    assert "gradient=Fused() vs gradient=Autodiff()" in str(err)


def test_catches_stale_kernel_after_the_step_changes():
    lstm = sj.lstm(H)

    def new_step(params, carry, x):
        return lstm.step(params, carry, 2.0 * x)

    # _replace(step=...) drops every capability written for the old step, the kernel included
    replaced = lstm._replace(step=new_step)
    assert replaced.kernel is None and replaced.jacobian is None and replaced.output is None
    assert replaced.input_size is lstm.input_size  # not a step capability
    # built by hand, the old kernel goes stale: check_cell finds it
    stale = sj.Cell(lstm.init, lstm.initial_carry, new_step, kernel=lstm.kernel)
    err = _raises(stale, checks=("kernel",), options=())
    assert (err.check, err.capability) == ("kernel[plain]", "kernel")


# cheaper faults: each caught by the one check it breaks (that check alone is run)


def test_catches_wrong_output_rule():
    narx = sj.narx(2, 3, output_window=2)
    bad = narx._replace(output=lambda params, carry, x: carry.y[..., 0, :])  # the oldest output
    err = _raises(bad, checks=("output",))
    assert (err.check, err.capability) == ("output", "output")


def test_catches_wrong_jacobian_diagonal():
    mgu = sj.mgu(H)
    bad = mgu._replace(jacobian_diagonal=lambda p, c, x: 0.5 * mgu.jacobian_diagonal(p, c, x))
    err = _raises(bad, checks=("jacobian", "jacobian_diagonal"))
    assert (err.check, err.capability) == ("jacobian_diagonal", "jacobian_diagonal")


def test_catches_a_bound_that_does_not_bound():
    rnn = sj.rnn(H)
    bad = rnn._replace(jacobian_bound=lambda params: (0.1 * jnp.linalg.norm(params["w_h"], ord=2), 1.0))
    with pytest.raises(CellCheckError) as info:
        check_cell(bad, checks=("jacobian_bound",))
    assert (info.value.check, info.value.capability) == ("jacobian_bound", "jacobian_bound")
    assert info.value.max_error > 0


def test_catches_wrong_input_size():
    bad = sj.gru(H)._replace(input_size=lambda params: params["w_x"].shape[1])
    with pytest.raises(CellCheckError, match="capability 'input_size'"):
        check_cell(bad, checks=("input_size",))


def test_catches_a_step_that_mixes_the_batch():
    def step(params, carry, x):
        y, z = _leaky_step(params, carry, x)[0]
        y = y + 0.1 * jnp.mean(y, axis=0, keepdims=True)  # sequences leak into each other
        return (y, z), y

    err = _raises(sj.Cell(_leaky_init, _leaky_carry, step), checks=("vmap",))
    assert (err.check, err.capability) == ("vmap", "step")


def test_catches_a_carry_that_changes_dtype():
    def step(params, carry, x):
        (y, z), _ = _leaky_step(params, carry, x)
        return (y.astype(jnp.float32), z), y  # float64 params: the carry drops to float32

    with pytest.raises(CellCheckError, match="in float64") as info:
        check_cell(sj.Cell(_leaky_init, _leaky_carry, step), checks=("carry",))
    assert (info.value.check, info.value.capability) == ("carry", "step")


def test_catches_a_wrong_custom_derivative_in_the_step():
    @jax.custom_jvp
    def act(a):
        return jnp.tanh(a)

    act.defjvp(lambda primals, tangents: (jnp.tanh(primals[0]), tangents[0]))  # derivative 1: wrong

    def step(params, carry, x):
        y = act(x @ params["w"] + carry[0] @ params["u"])
        return (y, y), y

    err = _raises(sj.Cell(_leaky_init, _leaky_carry, step), checks=("grads",))
    assert (err.check, err.capability) == ("grads", "step")
    assert "central differences" in str(err)


def test_an_error_raised_by_a_capability_is_a_failed_check():
    bad = sj.gru(H)._replace(gates=lambda params, carry, x: 1 / 0)
    with pytest.raises(CellCheckError, match="raised ZeroDivisionError") as info:
        check_cell(bad, checks=("gates",))
    assert info.value.capability == "gates" and info.value.max_error is None


# --------------------------------------------------------------------------- the checker itself


def test_x64_flag_is_restored():
    before = jax.config.jax_enable_x64
    check_cell(sj.rnn(H), checks=("grads",))
    assert jax.config.jax_enable_x64 == before
    with pytest.raises(CellCheckError):
        check_cell(sj.gru(H)._replace(input_size=lambda p: 7), checks=("input_size",))
    assert jax.config.jax_enable_x64 == before


def test_float64_step_checks_and_given_params():
    cell = sj.rnn(H)
    params = cell.init(jax.random.key(3), 5)
    report = check_cell(
        cell, params, dtype=jnp.float64, checks=("loop", "carry", "jit", "vmap", "input_size")
    )
    assert report.passed == ("loop", "carry", "jit", "vmap", "input_size")  # input_size read from params
    assert max(report.max_errors[c] for c in ("loop", "jit", "vmap")) < 1e-12


def test_bad_arguments():
    cell = sj.rnn(H)
    with pytest.raises(ValueError, match="checks"):
        check_cell(cell, checks=("jacobians",))
    with pytest.raises(ValueError, match="options"):
        check_cell(cell, options=("masks",))
    with pytest.raises(ValueError, match="steps >= 2"):
        check_cell(cell, steps=1)
    with pytest.raises(TypeError, match="seqjax.Cell"):
        check_cell(lambda p, c, x: (c, c))
    assert CHECKS[:5] == ("loop", "carry", "jit", "vmap", "grads")
