r"""Step Jacobians along a trajectory: ``J_t = ds_t/ds_{t-1}: (S, S)`` and ``B_t = ds_t/dx_t: (S, I)``.

A Jacobian comes from the cell's ``jacobian`` capability when it has one, else from
``jax.jacfwd`` of the flattened step (``_jacobian_fn``). The trajectory is one
``seqjax.trajectory`` over the inputs moved to batch-major ``(*batch, T, I)``
(``_batch_major``, ``_trajectory``); the ``T`` Jacobians are then evaluated in parallel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._scan import time_axis_of
from seqjax._util import promote, same_treedef
from seqjax.cells import Cell
from seqjax.spectrum.state import (
    _flat_step,
    _for_model,
    _like,
    _mask_batch_major,
    _valid_steps,
    _vmap_lead,
    flatten_state,
    unflatten_state,
)
from seqjax.unroll import trajectory

__all__ = [
    "step_jacobian",
    "input_jacobian",
    "step_jacobians",
    "StepJacobians",
]

_METHODS = ("auto", "analytic", "autodiff")


def _jacobian_fn(cell: Cell, params: Any, method: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``(s, x) -> J`` on unbatched flat states: the cell's ``jacobian`` capability (``"auto"``,
    ``"analytic"``) or ``jax.jacfwd`` of the flattened step (``"autodiff"``, or ``"auto"``
    for a cell without one)."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    like = _like(cell, params)
    if method in ("auto", "analytic"):
        jacobian = cell.jacobian
        if jacobian is not None:

            def jac(s, x):
                return jacobian(params, unflatten_state(s, like), x).astype(s.dtype)

            return jac
        if method == "analytic":
            name = cell.label
            raise ValueError(
                f"method='analytic': {name} has no jacobian capability (cell.jacobian is None); "
                "use method='autodiff' or 'auto', or give the cell one: "
                "Cell(..., jacobian=lambda params, carry, x: J)."
            )
    return jax.jacfwd(_flat_step(cell, params, like), argnums=0)


def _check_single(cell, params, carry, x_t, name="carry"):
    like = _like(cell, params)
    got = jax.tree_util.tree_structure(carry)
    if not same_treedef(got, jax.tree_util.tree_structure(like)):
        raise ValueError(
            f"{name} has the tree {got} but the cell's carry is {jax.tree_util.tree_structure(like)}."
        )
    for a, b in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(like)):
        if tuple(np.shape(a)) != tuple(b.shape):
            want = [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(like)]
            raise ValueError(
                f"{name} must be one unbatched carry (leaf shapes {want}), "
                f"got a leaf of shape {tuple(np.shape(a))}; vmap over the batch instead."
            )
    x_t = jnp.asarray(x_t)
    if x_t.ndim != 1:
        raise ValueError(f"x_t must be one input vector (I,), got shape {tuple(x_t.shape)}.")
    return x_t


def step_jacobian(cell: Cell, params: Any, carry: Any, x_t: jax.Array, *, method: str = "auto") -> jax.Array:
    r"""One step Jacobian ``J = ds_t/ds_{t-1}`` at ``(carry, x_t)``.

    ``J[i, j] = d s_t[i] / d s_{t-1}[j]`` with ``s = flatten_state(carry)``. For the Elman
    RNN ``J = diag(f'(net)) W_h^T`` (row-vector cells: ``net = x W_x + h W_h + b``).

    Args:
      cell: any ``Cell``.
      params: its params.
      carry: one *unbatched* carry (leaves without batch axes).
      x_t: one input ``(I,)``.
      method: ``"auto"`` (the cell's ``jacobian`` capability when it has one, autodiff
        otherwise), ``"analytic"`` (the capability, or an error) or ``"autodiff"``
        (``jax.jacfwd`` of the flattened step).

    Returns:
      ``J: (S, S)``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.rnn(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> h, x = jnp.full(4, 0.5), jnp.ones(3)
      >>> J = seqjax.spectrum.step_jacobian(cell, params, h, x)
      >>> net = x @ params["w_x"] + h @ params["w_h"] + params["b"]
      >>> bool(jnp.allclose(J, (1 - jnp.tanh(net) ** 2)[:, None] * params["w_h"].T, atol=1e-6))
      True
    """
    x_t = _check_single(cell, params, carry, x_t)
    _check_method(cell, params, method)
    params, x_t, carry, _ = promote(params, x_t, carry)
    return _step_jacobian_core(cell, params, carry, x_t, method=method)


@functools.partial(jax.jit, static_argnames=("cell", "method"))
def _step_jacobian_core(cell, params, carry, x_t, *, method):
    return _jacobian_fn(cell, params, method)(flatten_state(carry), x_t)


@functools.partial(jax.jit, static_argnames=("cell",))
def _input_jacobian_core(cell, params, carry, x_t):
    f = _flat_step(cell, params, _like(cell, params))
    return jax.jacfwd(f, argnums=1)(flatten_state(carry), x_t)


def input_jacobian(cell: Cell, params: Any, carry: Any, x_t: jax.Array) -> jax.Array:
    """Input Jacobian ``B = ds_t/dx_t: (S, I)`` at one unbatched ``(carry, x_t)`` (autodiff)."""
    x_t = _check_single(cell, params, carry, x_t)
    params, x_t, carry, _ = promote(params, x_t, carry)
    return _input_jacobian_core(cell, params, carry, x_t)


class StepJacobians(NamedTuple):
    """Step Jacobians along trajectories (all batch-major).

    Attributes:
      jacobians: ``(*batch, T, S, S)``, ``J_t = ds_t/ds_{t-1}`` for ``t = 1..T``; the
        identity at a step a sequence does not read (past its length, or masked): there
        the carry holds still, ``s_t = s_{t-1}``.
      input_jacobians: ``(*batch, T, S, I)``, ``ds_t/dx_t`` (zero at unread steps);
        ``None`` unless asked for.
      states: ``(*batch, T, S)``, ``s_t`` after each step.
      prev_states: ``(*batch, T, S)``, ``s_{t-1}`` before each step (``s_0`` first).
      valid: ``(*batch, T)`` bool, the steps each sequence reads (``t < lengths`` and
        ``mask``); ``None`` when neither was given (every step is read).
    """

    jacobians: jax.Array
    input_jacobians: jax.Array | None
    states: jax.Array
    prev_states: jax.Array
    valid: jax.Array | None = None


def _batch_major(xs, time_axis):
    xs = jnp.asarray(xs)
    return jnp.moveaxis(xs, time_axis_of(time_axis, xs.ndim, name=f"xs of shape {tuple(xs.shape)}"), -2)


def _trajectory(cell, params, xs_bm, carry, valid=None):
    """Run ``trajectory`` (holding the carry where ``valid`` is false); return
    ``(prev_states, states)`` both ``(*batch, T, S)``."""
    batch_shape = tuple(xs_bm.shape[:-2])
    c0 = cell.initial_carry(params, batch_shape) if carry is None else carry
    carries = trajectory(cell, params, xs_bm, carry=c0, mask=valid).carries
    nb = len(batch_shape)
    states = flatten_state(carries, batch_ndim=nb + 1)
    s0 = flatten_state(c0, batch_ndim=nb).astype(states.dtype)
    prev = jnp.concatenate([s0[..., None, :], states[..., :-1, :]], axis=-2)
    return prev, states


def _where_valid(valid, a, b):
    """``where(valid, a, b)`` with ``valid: (*batch, T)`` broadcast over the trailing axes of ``a``."""
    if valid is None:
        return a
    return jnp.where(valid.reshape(valid.shape + (1,) * (a.ndim - valid.ndim)), a, b)


@functools.partial(jax.jit, static_argnames=("cell", "method", "inputs"))
def _step_jacobians_core(cell, params, xs_bm, carry, valid, *, method, inputs):
    """The compiled body of ``step_jacobians``: one cache entry per (cell, method, inputs,
    shapes, dtypes), so a sweep over checkpoints compiles once."""
    prev, states = _trajectory(cell, params, xs_bm, carry, valid)
    nlead = xs_bm.ndim - 1
    J = _vmap_lead(_jacobian_fn(cell, params, method), nlead)(prev, xs_bm)
    J = _where_valid(valid, J, jnp.eye(J.shape[-1], dtype=J.dtype))
    Jx = None
    if inputs:
        f = _flat_step(cell, params, _like(cell, params))
        Jx = _vmap_lead(jax.jacfwd(f, argnums=1), nlead)(prev, xs_bm)
        Jx = _where_valid(valid, Jx, jnp.zeros_like(Jx))
    return StepJacobians(J, Jx, states, prev, valid)


def _check_method(cell, params, method):
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    if method == "analytic":
        _jacobian_fn(cell, params, method)  # raise outside jit when there is no closed form


@overload
def step_jacobians(
    cell: Cell,
    params: Any,
    xs: Any,
    *,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    time_axis: int = ...,
    method: str = ...,
    inputs: bool = ...,
) -> StepJacobians: ...


@overload
def step_jacobians(
    cell: object,
    params: Any,
    xs: Any,
    *,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    time_axis: int = ...,
    method: str = ...,
    inputs: bool = ...,
) -> dict[str, StepJacobians]: ...


def step_jacobians(
    cell: Cell | Any,
    params: Any,
    xs: Any,
    *,
    carry: Any = None,
    lengths: Any = None,
    mask: Any = None,
    time_axis: int = -2,
    method: str = "auto",
    inputs: bool = False,
) -> StepJacobians | dict[str, StepJacobians]:
    r"""Step Jacobians ``J_t = ds_t/ds_{t-1}`` (and optionally ``ds_t/dx_t``) along trajectories.

    The trajectory ``s_0, ..., s_T`` comes from one ``seqjax.trajectory`` (its ``carries``);
    the ``T`` Jacobians are then evaluated at ``(s_{t-1}, x_t)`` in parallel (``vmap``).
    Padded data: with ``lengths`` (or ``mask``) a sequence's carry holds still at the steps
    it does not read, exactly as in ``unroll``, so there ``J_t = I`` (and ``ds_t/dx_t = 0``);
    ``valid`` marks the steps read.

    Compiled once per cell, options and shapes (the cell is a static argument of an inner
    ``jax.jit``; cells compare by value, so one rebuilt per checkpoint hits the cache), and
    transparent to ``jit``, ``vmap`` and ``grad``.

    Args:
      cell: any ``Cell`` (a user's cell goes through autodiff of its flattened step), or a
        whole model (``many_to_one``, ``encoder_decoder``, a layer, an NNX module): see
        ``seqjax.spectrum.recurrent_cores``; the result is then a dict, one entry per core.
      params: its params.
      xs: inputs ``(*batch, T, I)`` (or time at ``time_axis``).
      carry: initial carry, leaves ``(*batch, ...)``; default ``cell.initial_carry``.
      lengths: ``(*batch,)`` valid steps of each sequence (padded data), or ``None``.
      mask: ``(*batch, T)`` (laid out like ``xs`` without features) bool, the steps read.
      time_axis: time axis of ``xs``; results are batch-major regardless.
      method: ``"auto"``, ``"analytic"`` or ``"autodiff"`` (see ``step_jacobian``).
      inputs: also compute the input Jacobians ``(*batch, T, S, I)``.

    Returns:
      ``StepJacobians(jacobians, input_jacobians, states, prev_states, valid)``. Memory is
      ``T * S**2`` per sequence: for large ``S`` use ``lyapunov_spectrum(matrix_free=True)``
      or ``top_singular_values`` instead.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.lstm(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jnp.ones((2, 5, 3))
      >>> sj = seqjax.spectrum.step_jacobians(cell, params, xs)
      >>> print(sj.jacobians.shape, sj.states.shape)     # S = 2H: the LSTM's (h, c)
      (2, 5, 8, 8) (2, 5, 8)
      >>> ad = seqjax.spectrum.step_jacobians(cell, params, xs, method="autodiff")
      >>> bool(jnp.allclose(sj.jacobians, ad.jacobians, atol=1e-5))   # analytic == jax.jacfwd
      True
      >>> padded = seqjax.spectrum.step_jacobians(cell, params, xs, lengths=jnp.array([5, 3]))
      >>> bool(jnp.all(padded.jacobians[1, 3:] == jnp.eye(8)))     # past its end: the carry holds
      True
    """
    if not isinstance(cell, Cell):
        return _for_model(
            step_jacobians, cell, params, xs, carry, lengths, mask, time_axis, method=method, inputs=inputs
        )
    xs = jnp.asarray(xs)
    xs_bm = _batch_major(xs, time_axis)
    _check_method(cell, params, method)
    valid = _valid_steps(lengths, _mask_batch_major(mask, xs, time_axis), xs_bm)
    params, xs_bm, carry, _ = promote(params, xs_bm, carry)
    return _step_jacobians_core(cell, params, xs_bm, carry, valid, method=method, inputs=bool(inputs))
