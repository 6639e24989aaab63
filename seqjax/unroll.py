"""Running a cell over a sequence: ``unroll`` and ``trajectory``.

``unroll(cell, params, xs)`` runs ``cell.step`` over the time axis of ``xs`` and returns
``(final_carry, ys)``, always. ``trajectory(...)`` runs the same and returns the fixed
NamedTuple ``Trajectory(carry, ys, carries, gates)``. Everything that changes how a sequence
is walked (variable lengths, masks, resets at episode boundaries, reversal) lives here, so
every cell, a user's own included, gets all of it. How gradients are computed is the
``gradient=`` strategy (``seqjax.gradients``); how the time axis is solved is the
``solver=`` (``seqjax.solvers``: the sequential scan or a parallel-in-time solver, whose
diagnostics ``solve`` returns). Dropout is a cell transformation (``seqjax.cells.dropout``).

Argument checks: shapes, dtypes and trees are static and always checked at trace time;
``lengths`` values are checked on the host when concrete and, when traced, by a
``checkify.debug_check`` that compiles to nothing unless the caller opts in with
``checked(fn)`` (``jax.experimental.checkify``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from seqjax import _parallel
from seqjax import gradients as _gradients
from seqjax import solvers as _solvers
from seqjax._scan import batch_shape_of_xs, time_axis_of, time_scan
from seqjax._util import promote, same_treedef
from seqjax.cells import Cell

__all__ = [
    "unroll",
    "trajectory",
    "Trajectory",
    "UNROLL_OPTIONS",
    "sequence_mask",
    "check_params",
    "check_carry",
    "checked",
    "solve",
]


class Trajectory(NamedTuple):
    """What ``trajectory`` returns: the run of a cell over a sequence, step by step.

    Attributes:
      carry: the final carry, leaves ``(*batch, ...)`` (as ``unroll`` returns it).
      ys: the outputs ``(*batch, T, O)`` (time at ``time_axis``), as ``unroll`` returns them.
      carries: the carry after every step, a pytree like the carry whose leaves gain a time
        axis at ``time_axis`` (batch-major default: ``(*batch, T, ...)``). For the LSTM this
        holds both ``h_t`` and ``c_t``. Held (masked) steps repeat the held carry.
      gates: ``cell.gates`` of every step in the same layout (zero at masked steps), or
        ``None`` unless ``gates=True``.
    """

    carry: Any
    ys: Any
    carries: Any
    gates: Any


# --------------------------------------------------------------------------- checks


def _fmt_path(path) -> str:
    return "params" + jax.tree_util.keystr(path) if path else "params"


def check_params(cell: Cell, params: Any, input_size: int) -> None:
    """Raise ``ValueError`` unless ``params`` has the tree and shapes ``cell.init`` makes.

    Runs ``cell.init`` abstractly (``jax.eval_shape``: no FLOPs), so it is cheap and works
    at trace time. Dtypes are not compared (float64 params are allowed).

    Args:
      cell: the cell.
      params: the params to check.
      input_size: the number of input features the params must accept.
    """
    try:
        expected = jax.eval_shape(lambda k: cell.init(k, input_size), jax.random.key(0))
    except ValueError as e:  # the cell rejected input_size itself
        raise ValueError(f"input_size={input_size}: {e}") from None
    exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(params)
    if not same_treedef(exp_def, got_def):
        exp_keys = sorted(_fmt_path(p) for p, _ in exp_leaves)
        got_keys = sorted(_fmt_path(p) for p, _ in got_leaves)
        missing = sorted(set(exp_keys) - set(got_keys))
        extra = sorted(set(got_keys) - set(exp_keys))
        raise ValueError(
            "params do not match the cell: expected the tree "
            f"{exp_keys} (from cell.init(key, input_size={input_size})), got {got_keys}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
            + "."
        )
    bad = [
        f"{_fmt_path(path)} has shape {tuple(np.shape(g))} but this cell needs {tuple(e.shape)}"
        for (path, e), (_, g) in zip(exp_leaves, got_leaves)
        if tuple(np.shape(g)) != tuple(e.shape)
    ]
    if bad:
        raise ValueError(
            "; ".join(bad)
            + f" (for input_size={input_size}, the number of features of xs): either xs has the wrong "
            "feature size or the params were made for another input_size / hidden_size."
        )


def check_carry(
    cell: Cell, params: Any, carry: Any, batch_shape: tuple[int, ...], *, name: str = "carry"
) -> None:
    """Raise ``ValueError`` unless ``carry`` matches ``cell.initial_carry(params, batch_shape)``
    in tree structure and shapes, with floating leaves where the cell's are floating (the
    floating dtype itself follows the dtype rule: it is promoted with the params')."""
    expected = jax.eval_shape(lambda p: cell.initial_carry(p, batch_shape), params)
    exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(carry)
    if not same_treedef(exp_def, got_def):
        raise ValueError(
            f"{name} has the tree {got_def} but the cell's carry is {exp_def}; "
            f"make it with cell.initial_carry(params, {batch_shape})."
        )
    for (path, e), (_, g) in zip(exp_leaves, got_leaves):
        where = name + jax.tree_util.keystr(path)
        if tuple(np.shape(g)) != tuple(e.shape):
            raise ValueError(
                f"{where} has shape {tuple(np.shape(g))} but needs {tuple(e.shape)} "
                f"(batch shape {batch_shape} of xs, then the cell's state size)."
            )
        if jnp.issubdtype(e.dtype, jnp.floating) and not jnp.issubdtype(jnp.result_type(g), jnp.floating):
            raise ValueError(
                f"{where} has dtype {jnp.result_type(g)} but the cell's carry is floating ({e.dtype})."
            )


def sequence_mask(lengths: jax.Array, max_len: int, *, time_axis: int = -1) -> jax.Array:
    """Boolean mask ``(*batch, max_len)``: ``mask[..., t] = t < lengths[...]``.

    A plain comparison, defined for any integer: lengths are not checked here (a length
    above ``max_len`` gives an all-true row, a negative one an all-false row); ``unroll``
    checks the lengths it is given.

    Args:
      lengths: integer array ``(*batch,)``.
      max_len: ``T``.
      time_axis: where the time axis goes in the result (default last).
    """
    lengths = jnp.asarray(lengths)
    m = jnp.arange(max_len).reshape((1,) * lengths.ndim + (max_len,)) < lengths[..., None]
    return jnp.moveaxis(m, -1, time_axis)


def _is_concrete(x) -> bool:
    try:
        np.asarray(x)
        return True
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return False


def _first_bad(bad: np.ndarray) -> tuple[int, ...]:
    """The index (a tuple) of the first true entry of ``bad`` in C order."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad.ravel())), bad.shape))


def _index_str(name: str, index: tuple) -> str:
    return f"{name}[{', '.join(str(i) for i in index)}]" if index else name


def _debug_check_range(lengths: jax.Array, T: int, name: str) -> None:
    """In-graph check of ``0 <= lengths <= T`` for traced lengths: a
    ``checkify.debug_check``, a no-op (nothing is lowered, no host callback) unless the
    caller's function is transformed by ``checkify.checkify`` (``checked``).

    The first bad index and value are found with elementwise operations and reductions only
    (no reshape, gather or dynamic slice), so lengths sharded over the batch trace as they
    are."""
    if lengths.size == 0:
        return
    shape = lengths.shape
    strides = [int(np.prod(shape[d + 1 :], dtype=np.int64)) for d in range(len(shape))]
    sharding = jax.typeof(lengths).sharding  # the iotas are laid out as lengths is
    pos = jnp.zeros_like(lengths, jnp.int32)  # the C-order position of every entry
    for d, stride in enumerate(strides):
        pos = pos + jax.lax.broadcasted_iota(jnp.int32, shape, d, out_sharding=sharding) * stride
    bad = (lengths < 0) | (lengths > T)
    first = jnp.min(jnp.where(bad, pos, lengths.size))
    value = jnp.sum(jnp.where(pos == first, lengths, jnp.zeros_like(lengths)))
    index = [first // stride % n for stride, n in zip(strides, shape)]
    where = f"{name}[{', '.join('{}' for _ in index)}]" if index else name
    checkify.debug_check(
        jnp.logical_not(jnp.any(bad)),
        f"{name} must lie in [0, T={T}] (T is the size of the time axis of xs), got {where} = {{}} "
        f"(checked in the graph by checkify).",
        *index,
        value,
    )


def _check_lengths(lengths, batch_shape, T, *, name: str = "lengths"):
    """``lengths`` as an integer array of ``batch_shape`` whose values lie in ``[0, T]``.

    Shape and dtype are static and always checked. Values are checked on the host when
    ``lengths`` is concrete (eager calls, constants under ``jit``: ``ValueError`` naming
    the first bad index and value); when it is traced, an in-graph ``checkify.debug_check``
    does the same, and costs nothing unless the caller opts in with ``checkify``."""
    lengths = jnp.asarray(lengths)
    if tuple(lengths.shape) != tuple(batch_shape):
        raise ValueError(
            f"{name} has shape {tuple(lengths.shape)} but needs the batch shape of xs, {tuple(batch_shape)}."
        )
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"{name} must be integers, got dtype {lengths.dtype}.")
    if not lengths.size:
        return lengths
    if _is_concrete(lengths):
        host = np.asarray(lengths)
        bad = (host < 0) | (host > T)
        if bad.any():
            index = _first_bad(bad)
            raise ValueError(
                f"{name} must lie in [0, T={T}] (T is the size of the time axis of xs), got values "
                f"from {int(host.min())} to {int(host.max())}: {_index_str(name, index)} = "
                f"{int(host[index])} is the first outside ({int(bad.sum())} of {bad.size})."
            )
    else:
        _debug_check_range(lengths, T, name)
    return lengths


def _check_flags(arr, name, want_shape):
    arr = jnp.asarray(arr)
    if tuple(arr.shape) != tuple(want_shape):
        raise ValueError(
            f"{name} has shape {tuple(arr.shape)} but needs xs.shape[:-1] = {tuple(want_shape)} "
            "(one flag per sequence and step)."
        )
    return arr.astype(bool)


def _bcast(flag: jax.Array, leaf: jax.Array) -> jax.Array:
    """Reshape a per-sequence flag ``(*batch,)`` to broadcast against ``leaf: (*batch, ...)``."""
    return flag.reshape(flag.shape + (1,) * (leaf.ndim - flag.ndim))


def _select(flag, a, b):
    """``where(flag, a, b)`` leaf by leaf, with ``flag: (*batch,)``."""
    return jax.tree_util.tree_map(lambda x, y: jnp.where(_bcast(flag, x), x, y), a, b)


# --------------------------------------------------------------------------- options of 0.1

_RENAMED = {
    "return_carries": "seqjax.trajectory(cell, params, xs, ...).carries",
    "return_gates": "seqjax.trajectory(cell, params, xs, gates=True).gates",
    "input_dropout": "unroll(seqjax.cells.dropout(cell, input_rate=rate, key=key), params, xs)",
    "recurrent_dropout": "unroll(seqjax.cells.dropout(cell, recurrent_rate=rate, key=key), params, xs)",
    "key": "the key of seqjax.cells.dropout(cell, ..., key=key)",
    "unroll": "solver=seqjax.solvers.Sequential(unroll=k)",
    "bptt": 'gradient=seqjax.gradients.Auto() ("auto"), Fused() ("fused") or Autodiff() ("autodiff")',
    "truncate": "gradient=seqjax.gradients.Truncate(every=k)",
    "remat": "gradient=seqjax.gradients.Remat(every=k) (every=1: checkpoint each step)",
}


UNROLL_OPTIONS = ("carry", "lengths", "mask", "resets", "reverse", "time_axis", "gradient", "solver")
"""The keyword options of ``unroll`` (and ``trajectory``, which adds ``gates``): layers and NNX
modules forward these without declaring them again."""


def check_options(
    fn: str, options: dict, allowed: tuple[str, ...] = UNROLL_OPTIONS, *, hints: dict | None = None
) -> dict:
    """``options`` if every key is an option of ``unroll`` in ``allowed``; else ``TypeError``
    with ``hints[name]`` when given (what a caller's own API offers instead), else the 0.2
    spelling of a 0.1 keyword, else the options that exist."""
    hints = {"gates": "gates come from a trajectory: trajectory(..., gates=True)", **(hints or {})}
    for name in options:
        if name not in allowed:
            if name in hints:
                raise TypeError(f"{fn}() has no {name}= option (seqjax 0.2): {hints[name]}.")
            if name in _RENAMED:
                refuse_renamed(fn, {name: None})
            raise TypeError(
                f"{fn}() got an unexpected option {name!r}; the options are {', '.join(allowed)}."
            )
    return options


def refuse_renamed(fn: str, old: dict) -> None:
    """Raise ``TypeError`` for keywords of 0.1's ``unroll`` (naming their 0.2 spelling) or
    unknown keywords."""
    for name in old:
        if name in _RENAMED:
            raise TypeError(f"{fn}() no longer takes {name}= (seqjax 0.2): use {_RENAMED[name]}.")
        raise TypeError(f"{fn}() got an unexpected keyword argument {name!r}.")


# --------------------------------------------------------------------------- the time scan


def _kernel_refusals(cell, requested, gates, solver, T) -> list[str]:
    """Why ``cell.kernel`` cannot run this request (empty: it can). Declared capabilities only."""
    if cell.kernel is None:
        return ["the cell has no kernel capability (cell.kernel is None)"]
    why = [
        f"its kernel does not accept {name!r} (kernel.accepts = {sorted(cell.kernel.accepts)})"
        for name, on in requested.items()
        if on and name not in cell.kernel.accepts
    ]
    if gates:
        why.append("gates were asked for (trajectory(..., gates=True))")
    if not solver.runs_kernels:
        why.append(f"the solver {solver!r} does not run kernels")
    if T == 0:
        why.append("T = 0")
    return why


def _keep_flags(T, truncate, reverse, dtype):
    """``(T,)`` in time order: 0 where the gradient through the carry entering step t is cut
    (scan position s = 1..T-1 with s % truncate == 0; s counts in scan order), else 1."""
    s = np.arange(T)
    if reverse:
        s = T - 1 - s
    keep = ~((s % truncate == 0) & (s > 0))
    return jnp.asarray(keep, dtype)


def _run(
    cell, params, xs, *, carry, lengths, mask, resets, reverse, time_axis, gradient, solver, carries, gates
) -> Trajectory:
    """The engine of ``unroll`` and ``trajectory``."""
    return _engine(
        cell,
        params,
        xs,
        carry=carry,
        lengths=lengths,
        mask=mask,
        resets=resets,
        reverse=reverse,
        time_axis=time_axis,
        gradient=gradient,
        solver=solver,
        carries=carries,
        gates=gates,
        report=False,
    )[0]


def _engine(
    cell,
    params,
    xs,
    *,
    carry,
    lengths,
    mask,
    resets,
    reverse,
    time_axis,
    gradient,
    solver,
    carries,
    gates,
    report,
) -> tuple[Trajectory, Any]:
    """``(Trajectory, parallel result or None)``; with ``report`` a parallel solver never
    raises or falls back on non-convergence (``solve`` reports it instead)."""
    if not isinstance(cell, Cell):
        raise TypeError(f"cell must be a seqjax.Cell, got {type(cell).__name__}.")
    plan = _gradients.resolve(gradient)
    solver = _solvers.resolve(solver)
    xs = jnp.asarray(xs)
    ta = time_axis_of(time_axis, xs.ndim, name=f"xs of shape {tuple(xs.shape)}")
    T = xs.shape[ta]
    xs_tm = jnp.moveaxis(xs, ta, 0)  # (T, *batch, I)
    batch_shape = batch_shape_of_xs(xs.shape, ta)
    check_params(cell, params, xs.shape[-1])
    if carry is not None:
        check_carry(cell, params, carry, batch_shape)
    # The dtype rule: params, floating inputs and carry meet in their promoted dtype.
    params, xs_tm, carry, _ = promote(params, xs_tm, carry)
    carry0 = cell.initial_carry(params, batch_shape) if carry is None else carry

    flags = None
    if lengths is not None:
        lengths = _check_lengths(lengths, batch_shape, T)
        flags = jnp.arange(T).reshape((T,) + (1,) * len(batch_shape)) < lengths[None]
    if mask is not None:
        m = jnp.moveaxis(_check_flags(mask, "mask", xs.shape[:-1]), ta, 0)
        flags = m if flags is None else flags & m
    rs = None
    if resets is not None:
        rs = jnp.moveaxis(_check_flags(resets, "resets", xs.shape[:-1]), ta, 0)
    if gates and cell.gates is None:
        raise ValueError(
            "trajectory(..., gates=True) needs a cell with a gates capability; this cell has none."
        )

    c_leaves = jax.tree_util.tree_leaves(carry0)
    f_dtype = jnp.result_type(*c_leaves) if c_leaves else xs.dtype
    keep = None if plan.truncate is None or T == 0 else _keep_flags(T, plan.truncate, reverse, f_dtype)

    def back(a):
        return jnp.moveaxis(a, 0, ta)

    if plan.kernel != "never":
        requested = {
            "mask": flags is not None,
            "resets": rs is not None,
            "truncate": keep is not None,
            "reverse": bool(reverse),
            "trajectory": bool(carries),
        }
        why = _kernel_refusals(cell, requested, gates, solver, T)
        if not why:
            assert cell.kernel is not None  # refused above when the cell has none
            final, ys, cs = cell.kernel.run(
                params,
                carry0,
                xs_tm,
                mask=flags,
                resets=rs,
                keep=keep,
                reverse=bool(reverse),
                unroll=solver.unroll,
                trajectory=bool(carries),
            )
            cs = jax.tree_util.tree_map(back, cs) if carries else None
            return Trajectory(final, back(ys), cs, None), None
        if plan.kernel == "require":
            use = "Auto() (the solver's adjoint)" if solver.parallel else "Auto() or Autodiff()"
            raise ValueError(f"gradient={plan.name} cannot run here: {'; '.join(why)}. Use {use}.")

    def body_of(carries, gates):
        """The step of the sequential scan, with masks, resets and truncation."""
        cell_gates = cell.gates if gates else None  # not None when gates (checked above)

        def body(c, inp):
            x, m, r, k = inp
            if k is not None:  # truncated BPTT: cut the gradient through the carry here
                c = jax.tree_util.tree_map(lambda a: jnp.where(k > 0, a, jax.lax.stop_gradient(a)), c)
            if r is not None:
                c = _select(r, carry0, c)
            c_new, y = cell.step(params, c, x)
            g = cell_gates(params, c, x) if cell_gates is not None else None
            if m is not None:
                c_new = _select(m, c_new, c)
                y = jnp.where(_bcast(m, y), y, jnp.zeros_like(y))
                if g is not None:
                    g = jax.tree_util.tree_map(lambda a: jnp.where(_bcast(m, a), a, jnp.zeros_like(a)), g)
            return c_new, (y, c_new if carries else None, g)

        return body

    if solver.parallel and T > 0:
        return _solve_parallel(
            cell,
            params,
            xs_tm,
            carry0,
            flags,
            rs,
            reverse=bool(reverse),
            solver=solver,
            plan=plan,
            gates=gates,
            carries=carries,
            body_of=body_of,
            back=back,
            ta=ta,
            batch_shape=batch_shape,
            report=report,
        )
    body = body_of(carries, gates)
    # T = 0 under a parallel solver: nothing to solve, the (empty) scan gives the shapes.
    scan = _solvers.Sequential().scan if solver.parallel else solver.scan

    inputs = (xs_tm, flags, rs, keep)
    if plan.remat is None:
        final, (ys, cs, gs) = scan(body, carry0, inputs, reverse=reverse)
    elif plan.remat == "step":
        final, (ys, cs, gs) = scan(jax.checkpoint(body), carry0, inputs, reverse=reverse)
    else:  # segments of k steps, each a checkpointed inner scan
        k = int(plan.remat)
        n = -(-T // k)
        pad = n * k - T
        if pad:  # padded steps come last in time order and leave the carry unchanged
            valid = jnp.arange(n * k).reshape((n * k,) + (1,) * len(batch_shape)) < T
            valid = jnp.broadcast_to(valid, (n * k,) + batch_shape)

            def pad_t(a, fill=0):
                if a is None:
                    return None
                return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)

            flags_p = valid if flags is None else valid & pad_t(flags, False)
            inputs = (pad_t(xs_tm), flags_p, pad_t(rs, False), pad_t(keep, 1))
        inputs = jax.tree_util.tree_map(lambda a: a.reshape((n, k) + a.shape[1:]), inputs)

        @jax.checkpoint
        def segment(c, seg):
            return scan(body, c, seg, reverse=reverse)

        final, outs = time_scan(segment, carry0, inputs, reverse=reverse)
        ys, cs, gs = jax.tree_util.tree_map(lambda a: a.reshape((n * k,) + a.shape[2:])[:T], outs)

    return Trajectory(
        final,
        jax.tree_util.tree_map(back, ys),  # a step may return a pytree of outputs
        jax.tree_util.tree_map(back, cs) if carries else None,
        jax.tree_util.tree_map(back, gs) if gates else None,
    ), None


# --------------------------------------------------------------------------- parallel solvers


def _guess_time_major(guess, carry0, T, ta, batch_shape, name):
    """A solver's ``guess`` (carries laid out as ``trajectory`` returns them, or an object
    with ``carries``) as the flattened ``(T, *batch, S)`` trajectory, time-major."""
    if hasattr(guess, "carries"):
        guess = guess.carries
    g_leaves, g_def = jax.tree_util.tree_flatten(guess)
    c_leaves, c_def = jax.tree_util.tree_flatten(carry0)
    if not same_treedef(g_def, c_def):
        raise ValueError(
            f"{name}(guess=...) has the tree {g_def} but the carry is {c_def}; pass the carries of "
            "an earlier solve (Solution.carries or trajectory(...).carries)."
        )
    moved = []
    for g, c in zip(g_leaves, c_leaves):
        g = jnp.asarray(g)
        want = (T,) + tuple(c.shape)
        ok = g.ndim == len(want) and ta < g.ndim
        g_tm = jnp.moveaxis(g, ta, 0) if ok else g
        if not ok or tuple(g_tm.shape) != want:
            laid = list(c.shape)
            laid.insert(ta, T)
            raise ValueError(
                f"{name}(guess=...) has a leaf of shape {tuple(g.shape)} but needs {tuple(laid)} "
                f"(the carry's shape with the time axis T={T} at time_axis, as trajectory(...).carries)."
            )
        moved.append(g_tm)
    dtype = jnp.result_type(*c_leaves)
    return _parallel.flatten_guess(jax.tree_util.tree_unflatten(c_def, moved), 1 + len(batch_shape), dtype)


def _failure_text(name, where, iterations, residual, nonfinite, tol, max_iter) -> str:
    why = (
        "a Newton step overflowed (inf/NaN) and was not taken"
        if nonfinite
        else f"max_iter={max_iter} reached"
    )
    return (
        f"{name} did not converge for the sequence at batch index {where}: {why} after {iterations} "
        f"iterations; residual max|s_t - f(s_t-1, x_t)| = {residual:.3g} against tol={tol:.3g} "
        "(relative to max(1, max|s|)). Raise max_iter, damp the steps (ELK / QuasiELK), pass "
        "on_failure='sequential' to fall back to the sequential scan, or inspect the iterations "
        "with seqjax.unroll.solve."
    )


def _first_failure(converged, iterations, residuals, nonfinite):
    bad = ~np.asarray(converged, bool)
    index = _first_bad(bad) if bad.ndim else ()
    return (
        index,
        int(np.asarray(iterations)[index]),
        float(np.asarray(residuals)[index][-1]),
        bool(np.asarray(nonfinite)[index]),
    )


def _raise_unless_converged(converged, iterations, residuals, nonfinite, *, name, tol, max_iter):
    """Host side of ``on_failure="raise"`` (a callback under ``jit``)."""
    if bool(np.all(np.asarray(converged))):
        return
    index, its, res, bad = _first_failure(converged, iterations, residuals, nonfinite)
    raise ValueError(_failure_text(name, index, its, res, bad, tol, max_iter))


def _solve_parallel(
    cell,
    params,
    xs_tm,
    carry0,
    flags,
    rs,
    *,
    reverse,
    solver,
    plan,
    gates,
    carries,
    body_of,
    back,
    ta,
    batch_shape,
    report,
) -> tuple[Trajectory, Any]:
    """``unroll`` under a parallel solver: refusals, the solve, and ``on_failure``."""
    name = type(solver).__name__
    if plan.truncate is not None:
        raise ValueError(
            f"gradient={plan.name} cannot run under solver={name}: truncated BPTT cuts the carry's "
            "gradient at fixed steps, which the adjoint of a parallel solve (one scan over the whole "
            "sequence) does not do. Use the Sequential solver for truncated BPTT."
        )
    if plan.remat is not None:
        raise ValueError(
            f"gradient={plan.name} cannot run under solver={name}: rematerialisation checkpoints a "
            "sequential scan; a parallel solver stores the solved carries and differentiates by its "
            "adjoint. Use gradient=Auto() (the default)."
        )
    if plan.kernel == "never":
        raise ValueError(
            f"gradient={plan.name} cannot run under solver={name}: autodiff differentiates the "
            "sequential scan, and the parallel solvers differentiate by their adjoint (reverse mode "
            "only). Use gradient=Auto() (the default), or the Sequential solver for forward mode."
        )
    for leaf in jax.tree_util.tree_leaves(carry0):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(
                f"solver={name} solves for the carry as a real vector, but the carry has a leaf of "
                f"dtype {leaf.dtype}; use the Sequential solver for this cell."
            )
    T = xs_tm.shape[0]
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(carry0))
    pplan = solver.plan(T, dtype)
    guess = None
    if solver.guess is not None:
        guess = _guess_time_major(solver.guess, carry0, T, ta, batch_shape, name)
    res = _parallel.run(
        cell,
        params,
        carry0,
        xs_tm,
        mask=flags,
        resets=rs,
        reverse=reverse,
        plan=pplan,
        guess=guess,
        gates=gates,
    )
    out = (res.final, res.ys, res.carries, res.gates)
    if not report:
        if solver.on_failure == "sequential":

            def sequential():
                final, (ys, cs, gs) = time_scan(
                    body_of(True, gates), carry0, (xs_tm, flags, rs, None), reverse=reverse
                )
                return final, ys, cs, gs

            out = jax.lax.cond(jnp.all(res.converged), lambda: out, sequential)
        else:
            check = functools.partial(
                _raise_unless_converged, name=name, tol=pplan.tol, max_iter=pplan.max_iter
            )
            diag = (res.converged, res.iterations, res.residuals, res.nonfinite)
            if all(_is_concrete(a) for a in diag):
                check(*diag)
            else:
                jax.debug.callback(check, *diag)
    final, ys, cs, gs = out
    traj = Trajectory(
        final,
        jax.tree_util.tree_map(back, ys),
        jax.tree_util.tree_map(back, cs) if carries else None,
        jax.tree_util.tree_map(back, gs) if gates else None,
    )
    return traj, res


def solve(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    solver: _solvers.Solver,
    *,
    carry: Any = None,
    lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    resets: jax.Array | None = None,
    reverse: bool = False,
    time_axis: int = -2,
) -> _solvers.Solution:
    r"""Run ``cell`` over a sequence with ``solver`` and report how it went: a ``Solution``.

    The run of ``trajectory(cell, params, xs, ..., solver=solver)`` (same arguments, same
    layouts) plus the solver's diagnostics: iterations, the residual after every iteration,
    and whether each sequence converged. ``solve`` never raises or falls back on
    non-convergence (``solver.on_failure`` is for ``unroll``): it returns the last iterate,
    which is never NaN (a step that overflows is not taken and ``nonfinite`` says so).

    The parallel solvers find the carries as the root of the stacked residual
    ``r_t = s_t - F_t(s_{t-1})``, ``t = 1..T`` (``s`` the flattened carry, ``F_t`` the step
    with ``unroll``'s masks and resets: ``J_t = I`` at a held step, ``0`` at a reset, which
    reads the initial carry). Gradients (``jax.grad`` through ``solve``, ``unroll`` or
    ``trajectory``) come from the adjoint at the solution: ``lambda_t = g_t + J_{t+1}^T
    lambda_{t+1}``, one reverse associative scan with the forward solve's Jacobians, refined
    with exact vector-Jacobian products of the step until its residual meets ``tol`` (the
    quasi variants' diagonal is only a preconditioner there, so their gradients are exact
    too; at most ``T`` refinements, each exact on one more step). Then one batched
    vector-Jacobian product of the step gives the params', inputs' and initial carry's
    cotangents. The gradient is that of the converged solution; for an unconverged solve it
    is the adjoint at the last iterate.

    Args:
      cell: a ``Cell``.
      params: the cell's params.
      xs: inputs ``(*batch, T, I)`` (time at ``time_axis``).
      solver: ``DEER()``, ``QuasiDEER()``, ``ELK()``, ``QuasiELK()``, or ``Sequential()``
        (``None`` means ``Sequential()``), whose diagnostics are trivial: ``iterations`` 0,
        ``residuals`` zeros ``(*batch, 1)``, ``converged`` true.
      carry: initial carry, leaves ``(*batch, ...)``; default ``cell.initial_carry``.
      lengths: integer ``(*batch,)`` in ``[0, T]``, as ``unroll`` checks them.
      mask: boolean ``(*batch, T)``.
      resets: boolean ``(*batch, T)``.
      reverse: solve from the last step to the first; outputs in input order.
      time_axis: the time axis of ``xs``.

    Returns:
      ``Solution(final, ys, carries, iterations, residuals, converged, nonfinite)``:
      ``iterations``, ``converged``, ``nonfinite`` ``(*batch,)``; ``residuals``
      ``(*batch, max_iter + 1)`` (``max_iter`` defaults to ``T``; ``max(T, 100)`` for the
      damped solvers).

    Raises:
      ValueError: as ``unroll``; also for a dense solve above the solver's ``memory_limit``
        (naming ``T``, ``S``, the bytes and the limit), a ``guess`` of the wrong tree or
        shape, or a carry with a non-floating leaf.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.solvers import DEER
      >>> from seqjax.unroll import solve
      >>> cell = seqjax.gru(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jax.random.normal(jax.random.key(1), (2, 50, 3))
      >>> @jax.jit
      ... def run(params, xs, guess):        # a solver holding arrays is built inside jit
      ...     return solve(cell, params, xs, DEER(guess=guess))
      >>> sol = run(params, xs, jnp.zeros((2, 50, 4)))                # from zeros
      >>> print(sol.converged, sol.iterations.shape, sol.residuals.shape)
      [ True  True] (2,) (2, 51)
      >>> _, ys = seqjax.unroll(cell, params, xs)                     # the sequential scan
      >>> bool(jnp.allclose(sol.ys, ys, atol=1e-5))
      True
      >>> print(run(params, xs, sol.carries).iterations)              # warm start: done at once
      [0 0]
    """
    solver = _solvers.resolve(solver)
    traj, res = _engine(
        cell,
        params,
        xs,
        carry=carry,
        lengths=lengths,
        mask=mask,
        resets=resets,
        reverse=reverse,
        time_axis=time_axis,
        gradient=None,
        solver=solver,
        carries=True,
        gates=False,
        report=True,
    )
    if res is None:  # a sequential solver (or T = 0): nothing iterated
        batch = tuple(jax.tree_util.tree_leaves(traj.carry)[0].shape[: jnp.ndim(xs) - 2])
        leaves = jax.tree_util.tree_leaves(traj.carry)
        dtype = jnp.result_type(*leaves)
        return _solvers.Solution(
            traj.carry,
            traj.ys,
            traj.carries,
            jnp.zeros(batch, jnp.int32),
            jnp.zeros(batch + (1,), dtype),
            jnp.ones(batch, bool),
            jnp.zeros(batch, bool),
        )
    return _solvers.Solution(
        traj.carry, traj.ys, traj.carries, res.iterations, res.residuals, res.converged, res.nonfinite
    )


# --------------------------------------------------------------------------- unroll, trajectory


def unroll(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    *,
    carry: Any = None,
    lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    resets: jax.Array | None = None,
    reverse: bool = False,
    time_axis: int = -2,
    gradient: _gradients.GradientStrategy | None = None,
    solver: _solvers.Solver | None = None,
    **renamed,
) -> tuple[Any, jax.Array]:
    r"""Run ``cell`` over a sequence: ``(final_carry, ys)``.

    ``carry_t, y_t = cell.step(params, carry_{t-1}, x_t)`` for ``t = 1..T`` (or ``T..1``
    with ``reverse=True``), starting from ``carry`` (default ``cell.initial_carry``: zeros).

    Shapes (batch-major default, ``time_axis=-2``):

    ```text
    xs: (*batch, T, I)   ys: (*batch, T, O)   lengths: (*batch,)   mask, resets: (*batch, T)
    ```

    With ``time_axis=0`` everything is time-major: ``xs: (T, *batch, I)``. Any number of
    batch dimensions (including none: ``xs: (T, I)``) works.

    Variable lengths (``lengths``) and masks: where ``mask[b, t]`` is false (or
    ``t >= lengths[b]``) the carry holds still and ``y_t = 0``. So past its own end a
    sequence's carry stops changing and the final carry is the carry at its own last step,
    as PyTorch's packed sequences and Flax's ``seq_lengths`` behave. With ``reverse=True``
    and ``lengths``, each sequence is read from its own last step back to step 0 (padded
    steps come first in reverse order and leave the carry at its initial value).

    Resets: where ``resets[b, t]`` is true the carry returns to its initial value (the
    ``carry`` given, or the cell's initial carry) *before* step ``t`` is read: ``x_t`` starts a
    new episode. With ``reverse=True`` this is in scan order, so a flag marks the step a
    backward pass starts from, the *last* step of an episode in time order
    (``bidirectional`` shifts its ``resets`` by one step for its backward cell).

    Truncation (``gradient=Truncate(k)``) counts scan positions, so with ``reverse=True`` the
    cut points count from the end of the padded time axis.

    Args:
      cell: a ``Cell``.
      params: the cell's params; checked against ``cell.init`` (tree and shapes).
      xs: inputs, features last.
      carry: initial carry with leaves ``(*batch, ...)``; default ``cell.initial_carry``.
      lengths: integer ``(*batch,)`` in ``[0, T]``. Checked on the host when concrete
        (eager calls); when traced (under ``jit``) only by an opt-in in-graph check
        (``checked``), and otherwise a length above ``T`` runs as ``T`` and a negative one as
        ``0``.
      mask: boolean ``(*batch, T)`` (layout of ``xs`` without the feature axis).
      resets: boolean ``(*batch, T)``.
      reverse: scan from the last step to the first; outputs stay in input order.
      time_axis: the time axis of ``xs`` (default ``-2``; ``0`` for time-major).
      gradient: how gradients are computed, a ``seqjax.gradients`` strategy: ``Auto()``
        (default: the cell's fused BPTT kernel when it accepts the call's options, else
        autodiff), ``Fused()``, ``Autodiff()``, ``Remat(every=k)`` or
        ``Truncate(every=k, base=...)``. Forward values never depend on it.
      solver: how the time axis is solved, a ``seqjax.solvers`` solver; default
        ``Sequential()`` (``lax.scan``; ``Sequential(unroll=k)`` for ``lax.scan``'s unroll),
        or a parallel-in-time solver, ``DEER()``, ``QuasiDEER()``, ``ELK()``, ``QuasiELK()``
        (``docs/guides/parallel.md``; ``solve`` returns its diagnostics).

    Dtypes: params, floating inputs and the carry are cast to their promoted dtype
    (``jnp.result_type``) before the scan; integer inputs are left alone; gradients come back
    in each argument's own dtype (``docs/design/cells.md``, the dtype rule).

    Returns:
      ``(final_carry, ys)``. For every step's carry or gates use ``trajectory``.

    Raises:
      ValueError: at trace time, for params that do not fit the cell or ``xs``, a carry of
        the wrong tree/shape/dtype, ``lengths``/``mask``/``resets`` of the wrong shape or
        (when concrete) lengths outside ``[0, T]`` (naming the first bad index and value), a
        bad ``time_axis``, or a ``Fused()`` gradient the cell's kernel cannot serve (the
        message says why). Traced lengths outside ``[0, T]`` raise only under ``checked`` /
        ``checkify.checkify`` (``checkify.JaxRuntimeError``, a ``ValueError``). Under a
        parallel solver with ``on_failure="raise"``: a sequence that did not converge (eager;
        under ``jit`` the same message arrives as a ``jax.errors.JaxRuntimeError`` from a host
        callback), a dense solve above the solver's ``memory_limit``, and the gradient
        strategies it cannot serve (``Truncate``, ``Remat``, ``Autodiff``, ``Fused``).
      TypeError: for a keyword of 0.1 (``bptt=``, ``return_carries=``, ...), naming its 0.2
        spelling.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.lstm(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jnp.ones((2, 5, 3))                        # (B, T, I)
      >>> carry, ys = seqjax.unroll(cell, params, xs)
      >>> print(ys.shape, carry.h.shape, carry.c.shape)   # ys: (B, T, H); LSTMState(h, c)
      (2, 5, 4) (2, 4) (2, 4)
      >>> carry, ys = seqjax.unroll(cell, params, xs, lengths=jnp.array([5, 3]))
      >>> bool(jnp.all(ys[1, 3:] == 0))                   # zero past the sequence's length
      True
    """
    if renamed:
        refuse_renamed("unroll", renamed)
    options = locals()
    out = _run(cell, params, xs, carries=False, gates=False, **{k: options[k] for k in UNROLL_OPTIONS})
    return out.carry, out.ys


def trajectory(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    *,
    carry: Any = None,
    lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    resets: jax.Array | None = None,
    reverse: bool = False,
    time_axis: int = -2,
    gates: bool = False,
    gradient: _gradients.GradientStrategy | None = None,
    solver: _solvers.Solver | None = None,
    **renamed,
) -> Trajectory:
    r"""Run ``cell`` over a sequence and keep every step: ``Trajectory(carry, ys, carries, gates)``.

    The same run as ``unroll`` with the same arguments (``carry`` and ``ys`` are equal), plus
    ``carries``: the carry ``s_t`` after every step ``t = 1..T``, leaves with a time axis at
    ``time_axis`` (``(*batch, T, ...)`` by default), and with ``gates=True`` the cell's gate
    activations of every step (``cell.gates(params, s_{t-1}, x_t)``, zero at masked steps).
    Trajectories are what the spectrum tools linearise around and what fixed-point searches
    start from.

    Args:
      cell: a ``Cell``.
      params: the cell's params.
      xs: inputs ``(*batch, T, I)``, features last.
      carry: initial carry, leaves ``(*batch, ...)``; default ``cell.initial_carry``.
      lengths: integer ``(*batch,)`` in ``[0, T]``, checked as in ``unroll``.
      mask: boolean ``(*batch, T)``.
      resets: boolean ``(*batch, T)``.
      reverse: scan from the last step to the first.
      time_axis: the time axis of ``xs``.
      gradient: a ``seqjax.gradients`` strategy (as in ``unroll``). The fused kernel serves
        trajectories of carries; gates are computed on the plain scan (so ``gates=True``
        with ``gradient=Fused()`` is refused).
      solver: a ``seqjax.solvers`` solver (sequential or parallel, as in ``unroll``).
      gates: also return the gates (needs the cell's ``gates`` capability).

    Returns:
      ``Trajectory(carry, ys, carries, gates)``; ``gates`` is ``None`` unless ``gates=True``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.lstm(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> tr = seqjax.trajectory(cell, params, jnp.ones((2, 5, 3)), gates=True)
      >>> print(tr.ys.shape, tr.carries.c.shape, tr.gates["f"].shape)   # every step's c_t and f_t
      (2, 5, 4) (2, 5, 4) (2, 5, 4)
      >>> bool(jnp.allclose(tr.carries.h[:, -1], tr.carry.h))           # the last one is the final carry
      True
    """
    if renamed:
        refuse_renamed("trajectory", renamed)
    options = locals()
    return _run(cell, params, xs, carries=True, gates=bool(gates), **{k: options[k] for k in UNROLL_OPTIONS})


# --------------------------------------------------------------------------- opt-in in-graph checks


def checked(fn: Callable, *, errors: frozenset = checkify.user_checks, jit: bool = True) -> Callable:
    """``fn`` with seqjax's in-graph checks turned on: a failed one raises on the host.

    Under ``jit`` the values of a traced argument cannot be checked on the host, so seqjax
    states them in the graph with ``jax.experimental.checkify.debug_check`` (today: that
    ``lengths`` lie in ``[0, T]``). Such a check compiles to nothing, and costs nothing, unless
    the function is transformed by ``checkify.checkify``; this is that transformation:
    ``checked(fn)(*args)`` runs ``jax.jit(checkify.checkify(fn, errors=errors))(*args)``,
    raises the first failed check (``checkify.JaxRuntimeError``, a ``ValueError``, whose
    message names the argument, its first bad index and value and what it needs) and
    otherwise returns what ``fn`` returns. ``fn`` may differentiate through ``unroll``
    (``checked(jax.value_and_grad(loss))``) or be jitted already.

    The checked program is compiled once per input shape, like ``jax.jit(fn)``; the check adds
    a few operations on the ``(*batch,)`` lengths and an error value to carry out, not a host
    callback per step (``docs/guides/unrolling.md``, "Checking lengths", has its measured cost).

    Args:
      fn: the function to check; its arguments must be arrays or pytrees of arrays (as for
        ``jax.jit``; use ``checkify.checkify`` yourself for static arguments).
      errors: the ``checkify`` error set (default ``checkify.user_checks``: the checks that
        seqjax and the user state; ``checkify.nan_checks | checkify.user_checks`` adds NaN
        checks, at a cost of their own).
      jit: compile the checked function (default). ``False``: run ``checkify.checkify(fn)``
        as is, tracing ``fn`` at every call (for a function that cannot be jitted; seqjax's
        host checks then see the concrete arguments).

    Returns:
      A function with the signature of ``fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.unroll import checked
      >>> cell = seqjax.lstm(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> def run(params, xs, lengths):
      ...     return seqjax.unroll(cell, params, xs, lengths=lengths)[1]
      >>> xs = jnp.ones((2, 5, 3))
      >>> ys = checked(run)(params, xs, jnp.array([5, 3]))    # in range: the plain result
      >>> try:
      ...     checked(run)(params, xs, jnp.array([5, 6]))     # jax.jit(run) would clamp 6 to 5
      ... except ValueError as e:
      ...     print(str(e).split(" (checked")[0])
      lengths must lie in [0, T=5] (T is the size of the time axis of xs), got lengths[1] = 6
    """
    if not callable(fn):
        raise TypeError(f"checked(fn) needs a callable, got {type(fn).__name__}.")
    inner = checkify.checkify(fn, errors=errors)
    run = jax.jit(inner) if jit else inner

    @functools.wraps(fn)
    def checked_fn(*args, **kwargs):
        err, out = run(*args, **kwargs)
        err.throw()
        return out

    return checked_fn
