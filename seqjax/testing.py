r"""Check any cell against the cell contract (``docs/design/cells.md``): ``check_cell``.

``check_cell(cell)`` runs on one cell, built-in or a user's own, what seqjax's contract
tests run on the built-ins: the step's contract (``unroll`` against a Python loop, carry
structure, ``jit``, ``vmap``, gradients against finite differences) and every declared
capability against its generic fallback (Jacobian against ``jax.jacfwd``, fused kernel
against autodiff of the plain scan, ...). A capability only makes something faster or
exact; it never changes an answer, and ``check_cell`` is what keeps that true when a cell
is built or wrapped by hand.

Public names: ``check_cell``, ``CellCheckError``, ``CellCheckReport``, ``CHECKS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._util import is_floating, same_treedef
from seqjax.cells import KERNEL_OPTIONS, Cell
from seqjax.gradients import Autodiff, Fused, Truncate
from seqjax.spectrum import flatten_state, unflatten_state
from seqjax.unroll import Trajectory, trajectory, unroll

__all__ = ["check_cell", "CellCheckError", "CellCheckReport", "CHECKS"]

CHECKS = (
    "loop",
    "carry",
    "jit",
    "vmap",
    "grads",
    "input_size",
    "output",
    "gates",
    "recurrent_blocks",
    "jacobian",
    "jacobian_diagonal",
    "jacobian_bound",
    "linear_recurrence",
    "kernel",
)
"""The checks ``check_cell`` runs, in order. The first five check the step itself
(capability ``"step"``); each other one checks the capability of the same name."""

_STEP_CHECKS = ("loop", "carry", "jit", "vmap", "grads")

# Tolerances (rtol, atol) by the itemsize of the dtype compared: |got - want| <= atol + rtol |want|.
_TOLERANCES = {8: (1e-10, 1e-10), 4: (1e-5, 1e-6), 2: (1e-2, 1e-2)}
_FD_EPS = 1e-5  # central-difference step (float64) along a unit direction
_FD_TOL = 1e-6  # |FD - exact| <= _FD_TOL * (1 + ||grad||)
_FD_DIRECTIONS = 2
_STATE_SCALES = (0.5, 1.0, 2.0)  # random states and inputs of the Jacobian checks, times state_scale

_HINTS = {
    "loop": "unroll(cell, params, xs, gradient=Autodiff()) must equal a Python loop over cell.step from "
    "cell.initial_carry(params, (batch,)).",
    "carry": "cell.step must return a carry with the tree, shapes and dtypes of the carry it was given, and "
    "cell.initial_carry(params, batch_shape) leaves (*batch_shape, ...) in the params' dtype.",
    "jit": "jax.jit(unroll) must equal eager unroll (a step with Python side effects or data-dependent "
    "Python control flow breaks this).",
    "vmap": "jax.vmap of unroll over sequences must equal unrolling each sequence (a step that mixes the "
    "batch rows, or assumes a batch axis, breaks this).",
    "grads": "gradients through unroll(gradient=Autodiff()) must match central finite differences "
    "(a custom_vjp or stop_gradient inside the step that is wrong).",
    "input_size": "cell.input_size(params) must be the number of input features the params were made for.",
    "output": "cell.output(params, new_carry, x_t) must equal the y_t that cell.step returns with new_carry.",
    "gates": "cell.gates(params, carry, x_t) must return a dict of arrays with the batch dims of x_t.",
    "recurrent_blocks": "cell.recurrent_blocks(params) must return a dict of gate name -> finite (R, H) "
    "matrix; where the cell also has gates, each name must be a gate (a stack's 'layer_0.i' for "
    "gates['layer_0']['i']) with H units.",
    "jacobian": "cell.jacobian(params, carry, x_t)[i, j] must be d s_t[i] / d s_{t-1}[j] at one unbatched "
    "carry, s the carry flattened by seqjax.spectrum.flatten_state (a transposed Jacobian fails here).",
    "jacobian_diagonal": "cell.jacobian_diagonal(params, carry, x_t) must be the diagonal of "
    "d s_t / d s_{t-1}.",
    "jacobian_bound": "cell.jacobian_bound(params) = (sigma, gamma) must bound the spectral norm of every "
    "step Jacobian: ||J_t||_2 <= sigma * gamma.",
    "linear_recurrence": "cell.linear_recurrence(params, x_t) = (A_t, b_t), x_t unbatched (I,), must give "
    "A_t (S,) or (S, S) and b_t (S,) with flatten_state(step(params, carry, x_t)[0]) = A_t s + b_t at every "
    "carry (A_t * s for a diagonal A_t), s = flatten_state(carry); A_t is then the step Jacobian.",
    "kernel": "cell.kernel.run must equal autodiff of the plain scan of cell.step under the same options, "
    "values and gradients (a kernel written for another step, or one that ignores an option it lists in "
    "kernel.accepts, fails here).",
}


class CellCheckError(AssertionError):
    """A check of ``check_cell`` failed.

    Attributes:
      check: the check that failed, e.g. ``"jacobian"`` or ``"kernel[mask]"``.
      capability: the capability it checks (``"step"`` for the step's own contract).
      max_error: the largest error found (``None`` when the check raised or compared no numbers).
    """

    def __init__(self, message: str, *, check: str, capability: str, max_error: float | None = None):
        super().__init__(message)
        self.check = check
        self.capability = capability
        self.max_error = max_error


@dataclasses.dataclass(frozen=True)
class CellCheckReport:
    """What ``check_cell`` checked.

    Attributes:
      cell: the cell's label (``Cell.label``).
      passed: the checks that ran and passed, in order (kernel checks as ``"kernel[option]"``).
      skipped: ``(check, reason)`` for every check that did not run.
      max_errors: ``{check: largest error found}`` for the checks that compare numbers
        (``jacobian_bound``: the largest ``||J_t||_2 - sigma * gamma``, at most 0).
    """

    cell: str
    passed: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]
    max_errors: Mapping[str, float]

    def __str__(self) -> str:
        lines = [f"check_cell({self.cell}): {len(self.passed)} passed, {len(self.skipped)} skipped"]
        for name in self.passed:
            err = self.max_errors.get(name)
            lines.append(f"  passed   {name:<22}" + ("" if err is None else f" max error {err:.2e}"))
        for name, why in self.skipped:
            lines.append(f"  skipped  {name:<22} {why}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _x64(on: bool):
    """``jax_enable_x64`` switched on inside the block when ``on`` (never switched off), restored after."""
    old = jax.config.jax_enable_x64  # type: ignore[attr-defined]  # jax.config flags are dynamic attributes
    if on and not old:
        jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        if jax.config.jax_enable_x64 != old:  # type: ignore[attr-defined]  # as above
            jax.config.update("jax_enable_x64", old)


def _tolerance(dtype, rtol, atol) -> tuple[float, float]:
    d_rtol, d_atol = _TOLERANCES.get(jnp.dtype(dtype).itemsize, (1e-5, 1e-6))
    return (d_rtol if rtol is None else float(rtol)), (d_atol if atol is None else float(atol))


def _numpy_rngs(key, n: int) -> list[np.random.Generator]:
    """``n`` independent NumPy generators seeded by a JAX key (random test data that costs no
    compilation; one stream per use, so selecting checks does not change the data of others)."""
    if jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    seed = [int(v) for v in np.asarray(key).ravel()]
    return [np.random.default_rng(seed + [i]) for i in range(n)]


def _normal(rng, shape, dtype, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(tuple(shape)), dtype)


def _cast(tree, dtype):
    """Floating leaves cast to ``dtype`` (through NumPy: no compilation)."""
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.asarray(a).astype(dtype)) if is_floating(a) else a, tree
    )


def _perturb(tree, rng, scale):
    """``tree`` plus ``scale * N(0, 1)`` on every floating leaf."""

    def one(a):
        if not is_floating(a):
            return a
        return jnp.asarray(np.asarray(a) + scale * rng.standard_normal(np.shape(a)), jnp.result_type(a))

    return jax.tree_util.tree_map(one, tree)


def _weights_like(a):
    """Fixed, non-degenerate loss weights shaped like ``a`` (a random-looking cotangent)."""
    a = jnp.asarray(a)
    return jnp.cos(jnp.arange(a.size, dtype=a.dtype) * 1.37 + 0.3).reshape(a.shape)


def _linear_loss(*trees):
    """``sum <w, leaf>`` over the floating leaves of ``trees``, fixed weights ``w``."""
    total: float | jax.Array = 0.0
    for tree in trees:
        for a in jax.tree_util.tree_leaves(tree):
            if is_floating(a):
                total = total + jnp.sum(_weights_like(a) * a)
    return total


def _quick_jit(fn):
    """``jax.jit(fn)`` compiled at the lowest backend optimisation level: the float64 checks
    run each program once, so compile time is what counts (XLA's graph passes still run)."""
    jitted = jax.jit(fn)

    def call(*args):
        lowered = jitted.lower(*args)
        try:
            # XLA takes int option values; jax annotates compiler options as str | bool only
            compiled = lowered.compile({"xla_backend_optimization_level": 0})  # type: ignore[dict-item]
        except Exception:  # noqa: BLE001 - a backend without that option
            compiled = lowered.compile()
        return compiled(*args)

    return call


def _fmt_path(path) -> str:
    return jax.tree_util.keystr(path) if path else ""


class _Checker:
    """Collects the report and raises ``CellCheckError`` with a uniform message."""

    def __init__(self, name: str):
        self.name = name
        self.passed: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.errors: dict[str, float] = {}

    @staticmethod
    def capability(check: str) -> str:
        base = check.split("[", 1)[0]
        return "step" if base in _STEP_CHECKS else base

    def fail(self, check: str, detail: str, max_error: float | None = None):
        base = check.split("[", 1)[0]
        cap = self.capability(check)
        err = "" if max_error is None else f" max error {max_error:.3e};"
        raise CellCheckError(
            f"check_cell({self.name}): check {check!r} failed (capability {cap!r}):{err} {detail} "
            f"[{_HINTS[base]}]",
            check=check,
            capability=cap,
            max_error=max_error,
        )

    def record(self, check: str, err: float | None = None):
        self.passed.append(check)
        if err is not None:
            self.errors[check] = max(float(err), self.errors.get(check, float("-inf")))

    def compare(self, check: str, what: str, got, want, rtol: float, atol: float, how: str = "") -> float:
        """Max |got - want| over the leaves; fail unless every entry is within atol + rtol |want|.
        ``what`` names the compared value, ``how`` the comparison (both go into the message)."""
        how = f" ({how})" if how else ""
        got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
        want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
        if not same_treedef(got_def, want_def):
            self.fail(check, f"{what}{how}: tree {got_def} but expected {want_def}.")
        worst = 0.0
        for (path, g), (_, w) in zip(got_leaves, want_leaves):
            g64 = np.asarray(g, dtype=np.float64)
            w64 = np.asarray(w, dtype=np.float64)
            if g64.shape != w64.shape:
                self.fail(check, f"{what}{_fmt_path(path)}{how}: shape {g64.shape} but expected {w64.shape}.")
            diff = np.abs(g64 - w64)
            both_nan = np.isnan(g64) & np.isnan(w64)
            diff = np.where(both_nan, 0.0, diff)
            bad = ~(diff <= atol + rtol * np.abs(w64))  # NaN counts as bad
            err = float(np.nanmax(np.where(np.isnan(diff), np.inf, diff))) if diff.size else 0.0
            worst = max(worst, err)
            if np.any(bad):
                score = np.where(bad, np.nan_to_num(diff, nan=np.inf), -1.0)
                idx = np.unravel_index(int(np.argmax(score)), bad.shape)
                at = tuple(int(i) for i in idx)
                self.fail(
                    check,
                    f"{what}{_fmt_path(path)}{how}: max |got - expected| = {err:.3e}, at index {at} got "
                    f"{g64[idx]:.6g}, expected {w64[idx]:.6g}; allowed {atol:g} + {rtol:g} * |expected|.",
                    max_error=err,
                )
        return worst


def _guard(chk: _Checker, check: str, fn: Callable, *args):
    """Run one check; an exception it raises (other than a failed check) becomes a failed check."""
    try:
        return fn(*args)
    except CellCheckError:
        raise
    except Exception as e:  # noqa: BLE001 - any error of the cell is a failed check
        chk.fail(check, f"raised {type(e).__name__}: {e}")


# --------------------------------------------------------------------------- the step's contract


def _python_loop(cell, params, xs):
    carry = cell.initial_carry(params, (xs.shape[0],))
    ys = []
    for t in range(xs.shape[1]):
        carry, y = cell.step(params, carry, xs[:, t])
        ys.append(y)
    return carry, jnp.stack(ys, axis=1)


def _same_structure(chk, check, what, got, want):
    """Same tree, shapes and dtypes (abstract values)."""
    if not same_treedef(jax.tree_util.tree_structure(got), jax.tree_util.tree_structure(want)):
        chk.fail(
            check,
            f"{what} has the tree {jax.tree_util.tree_structure(got)} but the carry is "
            f"{jax.tree_util.tree_structure(want)}.",
        )
    for (path, g), (_, w) in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    ):
        if tuple(g.shape) != tuple(w.shape) or jnp.dtype(g.dtype) != jnp.dtype(w.dtype):
            chk.fail(
                check,
                f"{what}{_fmt_path(path)} is {g.dtype}{list(g.shape)} but the carry it came from is "
                f"{w.dtype}{list(w.shape)}.",
            )


def _check_carry(chk, cell, params, xs, dtype, label=""):
    B, T, I = xs.shape
    c0 = jax.eval_shape(lambda p: cell.initial_carry(p, (B,)), params)
    for path, a in jax.tree_util.tree_flatten_with_path(c0)[0]:
        if tuple(a.shape[:1]) != (B,):
            chk.fail("carry", f"initial_carry(params, ({B},)){_fmt_path(path)} has shape {a.shape}{label}.")
        if is_floating(a) and jnp.dtype(a.dtype) != jnp.dtype(dtype):
            chk.fail(
                "carry",
                f"initial_carry(params){_fmt_path(path)} is {a.dtype} but the params are {jnp.dtype(dtype)}.",
            )
    for bs in ((), (B,), (2, 3)):

        def one(p, bs=bs):
            c = cell.initial_carry(p, bs)
            return c, cell.step(p, c, jnp.zeros(bs + (I,), dtype))

        c, (c_new, y) = jax.eval_shape(one, params)
        _same_structure(chk, "carry", f"step's new carry (batch shape {bs}{label})", c_new, c)
        for path, a in jax.tree_util.tree_flatten_with_path(c)[0]:
            if tuple(a.shape[: len(bs)]) != bs:
                chk.fail("carry", f"initial_carry(params, {bs}){_fmt_path(path)} has shape {a.shape}{label}.")
        if tuple(y.shape[: len(bs)]) != bs:
            chk.fail("carry", f"step's y has shape {y.shape} for batch shape {bs}{label}.")
    final, ys = jax.eval_shape(lambda p, x: unroll(cell, p, x, gradient=Autodiff()), params, xs)
    _same_structure(chk, "carry", f"the final carry of unroll{label}", final, c0)
    if tuple(ys.shape[:2]) != (B, T):
        chk.fail("carry", f"ys of unroll has shape {ys.shape}, expected ({B}, {T}, ...){label}.")


def _step_parts(cell, B):
    """What the ``loop``, ``jit`` and ``vmap`` checks compute under ``jax.jit``, by check."""

    def loop(p, x):
        return {"unroll": unroll(cell, p, x, gradient=Autodiff()), "loop": _python_loop(cell, p, x)}

    def jit(p, x):
        return unroll(cell, p, x)

    def vmap(p, x):
        vmapped = jax.vmap(lambda xb: unroll(cell, p, xb))(x)  # each xb: (T, I)
        return {"vmap": vmapped, "alone": [unroll(cell, p, x[b]) for b in range(B)]}

    return {"loop": loop, "jit": jit, "vmap": vmap}


def _check_step(chk, cell, params, xs, tol, selected):
    """``loop``, ``jit`` and ``vmap``: one compiled program (a part that fails to trace is
    found alone), compared with each other and with eager ``unroll``."""
    B = xs.shape[0]
    parts = {name: fn for name, fn in _step_parts(cell, B).items() if name in selected}
    if not parts:
        return
    eager = (
        _guard(chk, "jit" if "jit" in parts else "vmap", unroll, cell, params, xs)
        if set(parts) - {"loop"}
        else None
    )
    try:
        out = jax.jit(lambda p, x: {name: fn(p, x) for name, fn in parts.items()})(params, xs)
    except Exception:  # noqa: BLE001 - rerun check by check to name the one that raises
        out = {name: _guard(chk, name, jax.jit(fn), params, xs) for name, fn in parts.items()}
    for name in CHECKS:
        if name not in parts:
            continue
        if name == "loop":
            got, want = out["loop"]["unroll"], out["loop"]["loop"]
            how = "unroll(gradient=Autodiff()) vs a Python loop over step"
            e = max(
                chk.compare("loop", "final carry", got[0], want[0], *tol, how=how),
                chk.compare("loop", "ys", got[1], want[1], *tol, how=how),
            )
        elif name == "jit":
            assert eager is not None  # computed whenever jit or vmap is selected
            how = "jax.jit(unroll) vs eager unroll"
            e = max(
                chk.compare("jit", "final carry", out["jit"][0], eager[0], *tol, how=how),
                chk.compare("jit", "ys", out["jit"][1], eager[1], *tol, how=how),
            )
        else:
            assert eager is not None
            vmapped, alone = out["vmap"]["vmap"], out["vmap"]["alone"]
            e = 0.0
            for b in range(B):
                one = jax.tree_util.tree_map(lambda a, b=b: a[b], vmapped)
                for i, what in enumerate(("final carry", "ys")):
                    how = f"sequence {b}: jax.vmap(unroll) vs unroll of the sequence alone"
                    e = max(e, chk.compare("vmap", what, one[i], alone[b][i], *tol, how=how))
            for i, what in enumerate(("final carry", "ys")):
                how = "jax.vmap(unroll) vs batched unroll"
                e = max(e, chk.compare("vmap", what, vmapped[i], eager[i], *tol, how=how))
        chk.record(name, e)


def _split_floating(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    idx = [i for i, a in enumerate(leaves) if is_floating(a)]

    def rebuild(fl):
        full = list(leaves)
        for i, a in zip(idx, fl):
            full[i] = a
        return jax.tree_util.tree_unflatten(treedef, full)

    return [leaves[i] for i in idx], rebuild


def _check_grads(chk, cell, params, xs, carry0, rng):
    """Reverse (``jax.grad``) and forward (``jax.jvp``) derivatives of a scalar loss of
    ``(final carry, ys)`` through ``unroll(gradient=Autodiff())`` against central differences."""
    theta, rebuild = _split_floating((params, xs, carry0))

    def loss(fl):
        p, x, c = rebuild(fl)
        final, ys = unroll(cell, p, x, carry=c, gradient=Autodiff())
        return _linear_loss(ys, final) + 0.5 * jnp.sum(ys * ys)

    directions = []
    for _ in range(_FD_DIRECTIONS):
        v = [rng.standard_normal(a.shape) for a in theta]
        norm = np.sqrt(sum(float(np.sum(a * a)) for a in v))
        directions.append([a / norm for a in v])
    vs = [jnp.asarray(np.stack(a), t.dtype) for a, t in zip(zip(*directions), theta)]  # (n_directions, ...)

    @_quick_jit
    def derivatives(fl, vs):
        g = jax.grad(loss)(fl)
        fwd = jax.vmap(lambda v: jax.jvp(loss, (fl,), (v,))[1])(vs)
        rev = sum(jnp.sum(v * a.reshape((1,) + a.shape), axis=tuple(range(1, v.ndim))) for a, v in zip(g, vs))
        sides = jnp.stack([_FD_EPS * jnp.ones((), fl[0].dtype), -_FD_EPS * jnp.ones((), fl[0].dtype)])

        def shifted(e, v):
            return loss([a + e * d for a, d in zip(fl, v)])

        values = jax.vmap(lambda v: jax.vmap(lambda e: shifted(e, v))(sides))(vs)  # (n, 2)
        fd = (values[:, 0] - values[:, 1]) / (2 * _FD_EPS)
        g_norm = jnp.sqrt(sum(jnp.sum(a * a) for a in g))
        return rev, fwd, fd, g_norm

    rev, fwd, fd, g_norm = (np.asarray(a, np.float64) for a in derivatives(theta, vs))
    allowed = _FD_TOL * (1.0 + float(g_norm))
    worst = 0.0
    for i in range(_FD_DIRECTIONS):
        for mode, val in (("reverse mode (jax.grad)", rev[i]), ("forward mode (jax.jvp)", fwd[i])):
            err = float(abs(val - fd[i]))
            worst = max(worst, err)
            if not err <= allowed:
                chk.fail(
                    "grads",
                    f"the directional derivative of a loss of (final carry, ys) w.r.t. (params, xs, carry) "
                    f"by {mode} is {val:.10g} but central differences give {fd[i]:.10g} (eps {_FD_EPS:g}, "
                    f"float64); allowed {allowed:.2e} = {_FD_TOL:g} * (1 + ||grad||).",
                    max_error=err,
                )
    chk.record("grads", worst)


# --------------------------------------------------------------------------- capabilities


def _check_input_size(chk, cell, params, input_size):
    got = cell.input_size(params)
    if int(got) != input_size:
        chk.fail(
            "input_size",
            f"cell.input_size(params) = {int(got)} but the params were made for {input_size}.",
            max_error=float(abs(int(got) - input_size)),
        )
    chk.record("input_size", 0.0)


def _check_output(chk, cell, params, carry, x, tol):
    def pair(p, c, x):
        c_new, y = cell.step(p, c, x)
        return cell.output(p, c_new, x), y

    got, want = jax.jit(pair)(params, carry, x)
    how = "cell.output(params, new_carry, x_t) vs the y_t of cell.step"
    chk.record("output", chk.compare("output", "y_t", got, want, *tol, how=how))


def _check_gates(chk, cell, params, carry, x):
    g = jax.jit(cell.gates)(params, carry, x)
    if not isinstance(g, Mapping):
        chk.fail("gates", f"cell.gates returned a {type(g).__name__}, not a dict.")
    B = x.shape[0]
    for path, a in jax.tree_util.tree_flatten_with_path(g)[0]:
        if not isinstance(a, jax.Array):
            chk.fail("gates", f"gates{_fmt_path(path)} is a {type(a).__name__}, not an array.")
        if tuple(a.shape[:1]) != (B,):
            chk.fail("gates", f"gates{_fmt_path(path)} has shape {a.shape}; needs the batch dims ({B},).")
        if not bool(jnp.all(jnp.isfinite(a))):
            chk.fail("gates", f"gates{_fmt_path(path)} holds non-finite values.")
    if not jax.tree_util.tree_leaves(g):
        chk.fail("gates", "cell.gates returned an empty dict.")
    chk.record("gates")


def _check_recurrent_blocks(chk, cell, params, carry, x):
    """Structure only: no generic fallback computes a gate's recurrent matrix, so the
    numbers are the cell's tests' to check (``tests/test_gate_spectra.py`` for the built-ins)."""
    blocks = cell.recurrent_blocks(params)
    if not isinstance(blocks, Mapping) or not blocks:
        chk.fail(
            "recurrent_blocks", f"cell.recurrent_blocks returned {type(blocks).__name__} {blocks!r:.80}."
        )
    widths = None
    if cell.gates is not None:
        g = jax.eval_shape(cell.gates, params, carry, x)
        widths = {
            ".".join(str(getattr(k, "key", k)) for k in path): a.shape[-1]
            for path, a in jax.tree_util.tree_flatten_with_path(g)[0]
        }
    for name, w in blocks.items():
        if not isinstance(name, str) or np.ndim(w) != 2 or not is_floating(w):
            chk.fail(
                "recurrent_blocks",
                f"recurrent_blocks[{name!r}] is {type(w).__name__} {getattr(w, 'shape', '')}; needs a str "
                "name and a floating (R, H) matrix.",
            )
        if not bool(jnp.all(jnp.isfinite(w))):
            chk.fail("recurrent_blocks", f"recurrent_blocks[{name!r}] holds non-finite values.")
        if widths is not None and widths.get(name) != np.shape(w)[1]:
            chk.fail(
                "recurrent_blocks",
                f"recurrent_blocks[{name!r}] has shape {np.shape(w)} but the gates' widths are "
                f"{widths}: a block must name a gate and have its number of units.",
            )
    chk.record("recurrent_blocks")


def _check_jacobians(chk, cell, params, rng, input_size, state_scale, tol, selected):
    """``jacobian``, ``jacobian_diagonal`` and ``jacobian_bound`` at random unbatched states."""
    like = cell.initial_carry(params, ())
    dtype = jnp.result_type(*[a for a in jax.tree_util.tree_leaves(like) if is_floating(a)] or [jnp.float64])

    def jacobians(p, c, x):
        def flat_step(s):
            return flatten_state(cell.step(p, unflatten_state(s, like), x)[0])

        out = {"fallback": jax.jacfwd(flat_step)(flatten_state(c))}
        if "jacobian" in selected:
            out["jacobian"] = cell.jacobian(p, c, x)
        if "jacobian_diagonal" in selected:
            out["jacobian_diagonal"] = cell.jacobian_diagonal(p, c, x)
        return out

    jac = _quick_jit(jacobians)
    bound = None
    if "jacobian_bound" in selected:
        sigma, gamma = _guard(chk, "jacobian_bound", cell.jacobian_bound, params)
        if gamma is None:  # the bound needs the caller's gamma (e.g. a callable activation)
            selected = [name for name in selected if name != "jacobian_bound"]
            chk.skipped.append(("jacobian_bound", "gamma is None: the caller supplies it"))
        else:
            bound = float(sigma) * float(gamma)
            if not np.isfinite(bound) or bound < 0:
                chk.fail("jacobian_bound", f"sigma * gamma = {bound} is not a finite non-negative number.")
    if not selected:
        return
    for n, scale in enumerate(_STATE_SCALES):
        c = _perturb(like, rng, scale * state_scale)
        x = _normal(rng, (input_size,), dtype, scale)
        where = f"at random state {n} (scale {scale * state_scale:g})"
        out = _guard(chk, selected[0], jac, params, c, x)
        J = out["fallback"]
        S = J.shape[0]
        if "jacobian" in out:
            if tuple(out["jacobian"].shape) != (S, S):
                chk.fail(
                    "jacobian", f"cell.jacobian returned shape {out['jacobian'].shape}, expected ({S}, {S})."
                )
            how = f"cell.jacobian vs jax.jacfwd of the flattened step, {where}"
            e = chk.compare("jacobian", "J", out["jacobian"], J, *tol, how=how)
            chk.errors["jacobian"] = max(e, chk.errors.get("jacobian", 0.0))
        if "jacobian_diagonal" in out:
            d = out["jacobian_diagonal"]
            if tuple(d.shape) != (S,):
                chk.fail(
                    "jacobian_diagonal", f"cell.jacobian_diagonal returned shape {d.shape}, expected ({S},)."
                )
            how = f"cell.jacobian_diagonal vs the diagonal of jax.jacfwd of the flattened step, {where}"
            e = chk.compare("jacobian_diagonal", "diag J", d, jnp.diagonal(J), *tol, how=how)
            chk.errors["jacobian_diagonal"] = max(e, chk.errors.get("jacobian_diagonal", 0.0))
        if bound is not None:
            norm = float(np.linalg.norm(np.asarray(J, np.float64), 2))
            excess = norm - bound
            chk.errors["jacobian_bound"] = max(excess, chk.errors.get("jacobian_bound", float("-inf")))
            if not norm <= bound * (1 + tol[0]) + tol[1]:
                chk.fail(
                    "jacobian_bound",
                    f"||J_t||_2 = {norm:.6g} {where} exceeds sigma * gamma = {bound:.6g}.",
                    max_error=excess,
                )
    for name in ("jacobian", "jacobian_diagonal", "jacobian_bound"):
        if name in selected:
            chk.passed.append(name)


def _check_linear_recurrence(chk, cell, params, rng, input_size, state_scale, tol):
    """``s_t = A_t s_{t-1} + b_t`` against the step, and ``A_t`` against ``jax.jacfwd`` of
    the flattened step, at random unbatched carries and inputs."""
    like = cell.initial_carry(params, ())
    dtype = jnp.result_type(*[a for a in jax.tree_util.tree_leaves(like) if is_floating(a)] or [jnp.float64])

    def parts(p, c, x):
        def flat_step(s):
            return flatten_state(cell.step(p, unflatten_state(s, like), x)[0])

        s = flatten_state(c)
        A, b = cell.linear_recurrence(p, x)
        return {"A": A, "b": b, "s": s, "step": flat_step(s), "fallback": jax.jacfwd(flat_step)(s)}

    fn = _quick_jit(parts)
    worst = 0.0
    for n, scale in enumerate(_STATE_SCALES):
        c = _perturb(like, rng, scale * state_scale)
        x = _normal(rng, (input_size,), dtype, scale)
        where = f"at random state {n} (scale {scale * state_scale:g})"
        out = _guard(chk, "linear_recurrence", fn, params, c, x)
        A, b, J = out["A"], out["b"], out["fallback"]
        S = J.shape[0]
        if tuple(A.shape) not in ((S,), (S, S)):
            chk.fail(
                "linear_recurrence",
                f"A_t has shape {tuple(A.shape)}; needs ({S},) (a diagonal) or ({S}, {S}) (dense), "
                f"S = {S} the size of the flattened carry.",
            )
        if tuple(b.shape) != (S,):
            chk.fail("linear_recurrence", f"b_t has shape {tuple(b.shape)}; needs ({S},).")
        dense = A.ndim == 2
        affine = (A @ out["s"] if dense else A * out["s"]) + b
        how = f"A_t s + b_t vs the flattened step, {where}"
        worst = max(worst, chk.compare("linear_recurrence", "s_t", affine, out["step"], *tol, how=how))
        how = f"A_t vs jax.jacfwd of the flattened step, {where}"
        A_full = A if dense else jnp.diag(A)
        worst = max(worst, chk.compare("linear_recurrence", "A_t", A_full, J, *tol, how=how))
    chk.record("linear_recurrence", worst)


def _flags(rng, B, T):
    """``mask``, ``lengths``, ``resets`` with entries that matter (held and reset steps)."""
    mask = rng.random((B, T)) < 0.7
    mask[0, T - 1] = False  # the last step held: the final carry is the carry before it
    mask[B - 1, 1] = False
    lengths = np.array([(T - 2, T, 0)[b % 3] for b in range(B)], np.int32)
    resets = rng.random((B, T)) < 0.3
    resets[0, T // 2] = True
    resets[B - 1, T - 1] = True
    return jnp.asarray(mask), jnp.asarray(lengths), jnp.asarray(resets)


def _kernel_requests(cell, options, B, T, rng):
    """``[(check, unroll options, carry given)]`` for the kernel checks, and the skipped ones."""
    mask, lengths, resets = _flags(rng, B, T)
    per_option = {
        "mask": [("kernel[mask]", {"mask": mask}), ("kernel[lengths]", {"lengths": lengths})],
        "resets": [("kernel[resets]", {"resets": resets})],
        "truncate": [("kernel[truncate]", {"truncate": 2})],
        "reverse": [("kernel[reverse]", {"reverse": True})],
        "trajectory": [("kernel[trajectory]", {"trajectory": True})],
    }
    runs: list[tuple[str, dict[str, Any], bool]] = [("kernel[plain]", {}, True)]
    skipped: list[tuple[str, str]] = []
    combined: dict[str, Any] = {}
    for opt in sorted(KERNEL_OPTIONS):
        if opt not in options:
            skipped += [(name, "option not selected") for name, _ in per_option[opt]]
        elif opt not in cell.kernel.accepts:
            skipped += [(name, f"the kernel does not accept {opt!r}") for name, _ in per_option[opt]]
        else:
            runs += [(name, kw, True) for name, kw in per_option[opt]]
            combined.update(per_option[opt][0][1])
    if len(combined) >= 2:
        runs.append(("kernel[combined]", combined, False))
    else:
        skipped.append(("kernel[combined]", "fewer than two options to combine"))
    return runs, skipped


def _check_kernel(chk, cell, params, xs, carry0, tol, options, rng):
    """Each option: ``gradient=Fused()`` against ``gradient=Autodiff()``, values and
    gradients of a linear loss (a fixed random-looking cotangent) w.r.t. params, xs, carry."""
    B, T, _ = xs.shape
    runs, skipped = _kernel_requests(cell, options, B, T, rng)
    names = ("params", "xs", "carry0")

    def one(p, x, c, kw, carry_given, mode):
        kw = dict(kw)
        base = Fused() if mode == "fused" else Autodiff()
        every = kw.pop("truncate", None)
        gradient = base if every is None else Truncate(every, base=base)
        run = trajectory if kw.pop("trajectory", False) else unroll

        def loss(p, x, c):
            out = run(cell, p, x, carry=c if carry_given else None, gradient=gradient, **kw)
            values = {"final carry": out[0], "ys": out[1]}
            if isinstance(out, Trajectory):  # run is trajectory
                values["carries"] = out.carries
            return _linear_loss(*values.values()), values

        argnums = (0, 1, 2) if carry_given else (0, 1)
        (_, values), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(p, x, c)
        return values, {f"d loss / d {names[i]}": g for i, g in zip(argnums, grads)}

    def all_runs(p, x, c, which):
        return {
            f"{check}|{mode}": one(p, x, c, kw, carry_given, mode)
            for check, kw, carry_given in which
            for mode in ("fused", "autodiff")
        }

    # one compiled program for every option; an option that fails to trace is found alone
    try:
        results = _quick_jit(lambda p, x, c: all_runs(p, x, c, runs))(params, xs, carry0)
    except Exception:  # noqa: BLE001 - rerun option by option to name the one that raises
        results = {}
        for run in runs:
            fn = _quick_jit(lambda p, x, c, run=run: all_runs(p, x, c, [run]))
            results.update(_guard(chk, run[0], fn, params, xs, carry0))
    for check, _, _ in runs:
        (v_f, g_f), (v_a, g_a) = results[f"{check}|fused"], results[f"{check}|autodiff"]
        worst = 0.0
        for what in v_a:
            how = "gradient=Fused() vs gradient=Autodiff()"
            worst = max(worst, chk.compare(check, what, v_f[what], v_a[what], *tol, how=how))
        for what in g_a:
            worst = max(worst, chk.compare(check, what, g_f[what], g_a[what], *tol, how=how))
        chk.record(check, worst)
    chk.skipped += skipped


# --------------------------------------------------------------------------- check_cell


def check_cell(
    cell: Cell,
    params: Any = None,
    *,
    input_size: int | None = None,
    batch: int = 2,
    steps: int = 5,
    key: jax.Array | None = None,
    dtype: Any = jnp.float32,
    rtol: float | None = None,
    atol: float | None = None,
    checks: Collection[str] | None = None,
    options: Collection[str] | None = None,
    state_scale: float = 1.0,
) -> CellCheckReport:
    r"""Check that ``cell`` honours the cell contract, and each capability matches its fallback.

    Runs on any ``Cell`` what seqjax's own contract tests run on the built-in cells. With
    ``B = batch``, ``T = steps``, ``I = input_size``, ``xs ~ N(0, 1)`` of shape ``(B, T, I)``
    and the carry ``s`` flattened by ``seqjax.spectrum.flatten_state``:

    The step (capability ``"step"``), in ``dtype``:

    * ``loop``: ``unroll(cell, params, xs, gradient=Autodiff())`` equals a Python loop of
      ``cell.step`` from ``cell.initial_carry(params, (B,))`` (final carry and ``ys``).
    * ``carry``: ``initial_carry(params, batch_shape)`` has leaves ``(*batch_shape, ...)`` in
      the params' dtype; ``step`` and ``unroll`` return a carry of the same tree, shapes and
      dtypes, for batch shapes ``()``, ``(B,)`` and ``(2, 3)`` (abstractly, also in float64).
    * ``jit``: ``jax.jit(unroll)`` equals eager ``unroll``.
    * ``vmap``: ``jax.vmap`` of ``unroll`` over the ``B`` sequences equals unrolling each
      sequence alone, and the batched ``unroll``.

    In float64 (``jax_enable_x64`` is switched on inside and restored after; params, inputs
    and carries are cast to float64), from random carries ``initial_carry + N(0, state_scale^2)``:

    * ``grads``: for ``L = <w, ys> + <w', final carry> + |ys|^2 / 2`` through
      ``unroll(..., gradient=Autodiff())`` and ``2`` random unit directions ``v`` in
      ``(params, xs, carry0)``: ``<grad L, v>`` (reverse mode) and ``jax.jvp`` (forward mode)
      against ``(L(θ + εv) - L(θ - εv)) / 2ε``, ``ε = 1e-5``, to ``1e-6 (1 + |grad L|)``.
    * ``input_size``: ``cell.input_size(params) == I``.
    * ``output``: ``cell.output(params, carry_t, x_t)`` equals the ``y_t`` that
      ``carry_t, y_t = cell.step(params, carry_{t-1}, x_t)`` returns.
    * ``gates``: ``cell.gates(params, carry, x_t)`` returns a dict of finite arrays with
      leading batch dim ``B``.
    * ``recurrent_blocks``: ``cell.recurrent_blocks(params)`` returns a non-empty dict of
      finite floating ``(R, H)`` matrices; with ``gates`` too, each name is a gate (the path
      of nested dicts joined by ``"."``) whose activations have ``H`` units. Structure only:
      no generic fallback computes the blocks.
    * ``jacobian``: ``cell.jacobian(params, c, x)`` equals ``jax.jacfwd`` of
      ``s -> flatten_state(step(params, unflatten_state(s), x)[0])``, ``(S, S)``, at 3 random
      unbatched states ``initial_carry + N(0, (k state_scale)^2)`` and inputs
      ``N(0, k^2)``, ``k = 0.5, 1, 2`` (not only at zero).
    * ``jacobian_diagonal``: equals the diagonal of that ``jax.jacfwd``.
    * ``jacobian_bound``: ``(sigma, gamma) = cell.jacobian_bound(params)`` and
      ``||jacfwd||_2 <= sigma * gamma`` at those states.
    * ``linear_recurrence``: ``(A, b) = cell.linear_recurrence(params, x)`` at 3 random
      unbatched states and inputs drawn as for ``jacobian``: ``A`` is ``(S,)`` or ``(S, S)``
      and ``b`` is ``(S,)``; ``A s + b`` (``A * s`` for a diagonal) equals the flattened
      step's new state, and ``A`` (``diag(A)``) equals its ``jax.jacfwd``. ``A`` and ``b``
      cannot read the carry (it is not an argument), so the three carries test one and
      the same affine map.
    * ``kernel``: for the plain call and each option the kernel accepts (``Kernel.accepts``),
      ``gradient=Fused()`` against ``gradient=Autodiff()``: the final carry,
      ``ys``, the carries (``trajectory``), and the gradients of a linear loss of them (a
      fixed cotangent) w.r.t. params, xs and the initial carry. Options: ``mask`` (a ``mask``
      with held steps, then ``lengths``), ``resets``, ``truncate`` (``Truncate(2, base=...)``),
      ``reverse``, ``trajectory`` (``seqjax.trajectory``), then every accepted option at
      once from the cell's own initial carry (``kernel[combined]``).

    Tolerances: ``|got - expected| <= atol + rtol |expected|`` entrywise, by default
    ``rtol = atol = 1e-10`` in float64, ``rtol = 1e-5, atol = 1e-6`` in float32 (and
    ``1e-2`` in 16-bit floats); ``rtol``/``atol`` override every comparison but the finite
    differences. The bound is checked as ``||J||_2 <= sigma gamma (1 + rtol) + atol``.

    Checks stop at the first failure. A capability the cell does not carry is skipped (and
    listed in the report).

    Args:
      cell: any ``seqjax.Cell``.
      params: its params; default ``cell.init(key, input_size)``.
      input_size: ``I``; default ``cell.input_size(params)`` when params are given and the
        cell has that capability, else 3.
      batch: ``B``, the number of sequences.
      steps: ``T >= 2``, the sequence length.
      key: PRNG key for params, inputs, carries and directions (default ``jax.random.key(0)``).
      dtype: the dtype of the step checks (``loop``, ``carry``, ``jit``, ``vmap``); the other
        checks run in float64.
      rtol: relative tolerance (see above); default by dtype.
      atol: absolute tolerance (see above); default by dtype.
      checks: the names of ``CHECKS`` to run (default all).
      options: the kernel options to exercise, a subset of ``seqjax.cells.KERNEL_OPTIONS``
        (default all; the plain call always runs).
      state_scale: the standard deviation of the random perturbation of the carry (use a
        smaller one for a cell whose states must stay in a range).

    Returns:
      A ``CellCheckReport``: the checks passed (with their largest errors) and skipped (with
      the reason).

    Raises:
      CellCheckError: an ``AssertionError`` naming the check that failed, the capability it
        checks (``err.check``, ``err.capability``) and the largest error (``err.max_error``).
      ValueError: for bad arguments (an unknown check or option, ``steps < 2``).

    Examples:
      ``print(check_cell(seqjax.gru(4)))`` checks every capability of a built-in cell and
      lists each check with its largest error. A user's cell with a step only:

      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.testing import check_cell
      >>> def step(p, h, x):
      ...     h = jnp.tanh(x @ p["w"] + h @ p["u"])
      ...     return h, h
      >>> cell = seqjax.Cell(
      ...     lambda key, n: {"w": jax.random.normal(key, (n, 4)), "u": 0.5 * jnp.eye(4)},
      ...     lambda p, batch_shape=(): jnp.zeros(tuple(batch_shape) + (4,), p["w"].dtype),
      ...     step,
      ... )
      >>> report = check_cell(cell)
      >>> report.passed
      ('loop', 'carry', 'jit', 'vmap', 'grads')
      >>> report.skipped[0]
      ('input_size', 'the cell has no input_size capability')
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"check_cell: cell must be a seqjax.Cell, got {type(cell).__name__}.")
    selected = tuple(CHECKS) if checks is None else tuple(checks)
    unknown = sorted(set(selected) - set(CHECKS))
    if isinstance(checks, str) or unknown:
        raise ValueError(f"check_cell: checks must be a collection of {list(CHECKS)}, got {checks!r}.")
    options = KERNEL_OPTIONS if options is None else frozenset(options)
    if isinstance(options, str) or not options <= KERNEL_OPTIONS:
        raise ValueError(
            f"check_cell: options must be a subset of {sorted(KERNEL_OPTIONS)}, got {options!r}."
        )
    if int(steps) < 2 or int(batch) < 1:
        raise ValueError(f"check_cell: needs steps >= 2 and batch >= 1, got steps={steps}, batch={batch}.")
    B, T = int(batch), int(steps)
    key = jax.random.key(0) if key is None else key
    rng_x, rng_c, rng_o, rng_fd, rng_j, rng_k, rng_l = _numpy_rngs(key, 7)
    if params is None:
        I = 3 if input_size is None else int(input_size)
        params = cell.init(key, I)
    elif input_size is None:
        if cell.input_size is None:
            raise ValueError(
                "check_cell: pass input_size= with params (the cell has no input_size capability)."
            )
        I = int(cell.input_size(params))
    else:
        I = int(input_size)
    name = cell.label
    chk = _Checker(name)
    xs = _normal(rng_x, (B, T, I), jnp.float32)

    def run(check, fn, *args):
        if check in selected:
            _guard(chk, check, fn, *args)
        else:
            chk.skipped.append((check, "not selected"))

    # the step's contract, in the dtype asked for
    dtype = jnp.dtype(dtype)
    with _x64(dtype.itemsize == 8):
        p_d, x_d = _cast(params, dtype), _cast(xs, dtype)
        tol = _tolerance(dtype, rtol, atol)
        run("carry", _check_carry, chk, cell, p_d, x_d, dtype)
        _check_step(chk, cell, p_d, x_d, tol, selected)
        chk.skipped += [(n, "not selected") for n in ("loop", "jit", "vmap") if n not in selected]

    # float64: gradients and capabilities against their fallbacks
    with _x64(True):
        f64 = jnp.dtype(jnp.float64)
        p64, x64 = _cast(params, f64), _cast(xs, f64)
        tol = _tolerance(f64, rtol, atol)
        if "carry" in selected and dtype != f64:
            _guard(chk, "carry", _check_carry, chk, cell, p64, x64, f64, " in float64")
        if "carry" in selected:
            chk.passed.insert(chk.passed.index("loop") + 1 if "loop" in chk.passed else 0, "carry")
        carry0 = _perturb(_guard(chk, "carry", cell.initial_carry, p64, (B,)), rng_c, state_scale)
        x_t = _normal(rng_o, (B, I), f64)
        run("grads", _check_grads, chk, cell, p64, x64, carry0, rng_fd)

        def capability(check, fn, *args):
            if check not in selected:
                chk.skipped.append((check, "not selected"))
            elif getattr(cell, check) is None:
                chk.skipped.append((check, f"the cell has no {check} capability"))
            else:
                _guard(chk, check, fn, *args)

        capability("input_size", _check_input_size, chk, cell, p64, I)
        capability("output", _check_output, chk, cell, p64, carry0, x_t, tol)
        capability("gates", _check_gates, chk, cell, p64, carry0, x_t)
        capability("recurrent_blocks", _check_recurrent_blocks, chk, cell, p64, carry0, x_t)
        jac_checks = []
        for check in ("jacobian", "jacobian_diagonal", "jacobian_bound"):
            if check not in selected:
                chk.skipped.append((check, "not selected"))
            elif getattr(cell, check) is None:
                fallback = (
                    " (no fallback)" if check == "jacobian_bound" else " (the jax.jacfwd fallback is used)"
                )
                chk.skipped.append((check, f"the cell has no {check} capability{fallback}"))
            else:
                jac_checks.append(check)
        if jac_checks:
            _check_jacobians(chk, cell, p64, rng_j, I, state_scale, tol, tuple(jac_checks))
        capability("linear_recurrence", _check_linear_recurrence, chk, cell, p64, rng_l, I, state_scale, tol)
        if "kernel" not in selected:
            chk.skipped.append(("kernel", "not selected"))
        elif cell.kernel is None:
            chk.skipped.append(("kernel", "the cell has no kernel capability (autodiff of the scan is used)"))
        else:
            _check_kernel(chk, cell, p64, x64, carry0, tol, options, rng_k)
    return CellCheckReport(name, tuple(chk.passed), tuple(chk.skipped), dict(chk.errors))
