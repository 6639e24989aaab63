r"""Gradient flossing (Engelken 2023): a differentiable loss on the top Lyapunov exponents.

Gradients through a recurrent network vanish or explode at the rates of the Lyapunov
exponents $\lambda_1 \ge \lambda_2 \ge \dots$ of its step Jacobians $J_t = \partial s_t /
\partial s_{t-1}$: a product $J_T \cdots J_{t+1}$ grows like $e^{(T-t)\lambda_i}$ along its
$i$-th direction. Gradient flossing (Engelken, "Gradient flossing: improving gradient descent
through dynamic control of Jacobians", NeurIPS 2023) pushes the top $k$ exponents towards 0
by gradient descent on

$$
\mathcal{L}_{\mathrm{floss}} = \sum_{i=1}^{k} \lambda_i^2 ,
$$

either before training (pre-flossing, ``seqjax.train.floss``) or added to the task loss
during it (``seqjax.train.Flossing``). ``flossing_loss`` is that loss: the finite-time
exponents of the trajectory a batch drives, by the QR (Benettin) iteration re-orthonormalised
every step, differentiable with ``jax.grad`` (the QR's sign convention and a safe tangent
at rank deficiency are in ``seqjax.spectrum.lyapunov._qr_pos``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._util import promote
from seqjax.cells import Cell
from seqjax.spectrum.lyapunov import _column_scale, _default_tol, _qr_pos
from seqjax.spectrum.products import _random_frame
from seqjax.spectrum.state import _flat_step, _like, _valid_steps, _vmap_lead, flatten_state, state_size
from seqjax.unroll import _is_concrete

__all__ = ["flossing_loss", "flossing_exponents"]


def _floored_logs(A, tol):
    """``Q`` and ``log R_ii`` of ``A = Q R`` (``diag(R) >= 0``), each log at least
    ``log(max(tol * max_j ||A_j||, tiny))`` and constant (zero gradient) where floored."""
    Q, R = _qr_pos(A, tol)
    d = jnp.diagonal(R, axis1=-2, axis2=-1)
    floor = jnp.maximum(tol * _column_scale(A)[..., 0], jnp.finfo(d.dtype).tiny)
    low = d <= floor
    return Q, jnp.log(jnp.where(low, jnp.broadcast_to(floor, d.shape), d))


@functools.partial(jax.jit, static_argnames=("cell", "warmup", "frame_warmup"))
def _exponents_core(cell, params, xs_bm, carry, valid, Q0, tol, *, warmup, frame_warmup):
    """``(*batch, k)`` finite-time exponents: one scan per sequence that steps the cell and
    pushes the frame through the step's JVPs (``k`` per step), QR every step."""
    batch = tuple(xs_bm.shape[:-2])
    T = xs_bm.shape[-2]
    like = _like(cell, params)
    c0 = cell.initial_carry(params, batch) if carry is None else carry
    dtype = Q0.dtype
    s0 = flatten_state(c0, batch_ndim=len(batch)).astype(dtype)
    f = _flat_step(cell, params, like)
    if valid is None:
        valid = jnp.ones(batch + (T,), bool)
    first_counted = warmup + frame_warmup
    k = Q0.shape[-1]

    def single(xs, s, ok):
        def warm(s, inp):
            x, o = inp
            return jnp.where(o, f(s, x), s), None

        if warmup:
            s, _ = jax.lax.scan(warm, s, (xs[:warmup], ok[:warmup]))

        def body(c, inp):
            s, Q, acc = c
            x, t, o = inp
            s_new, lin = jax.linearize(lambda u: f(u, x), s)
            A = jax.vmap(lin, in_axes=1, out_axes=1)(Q)
            Q_new, logs = _floored_logs(A, tol)
            counted = o & (t >= first_counted)
            acc = acc + jnp.where(counted, logs, jnp.zeros_like(logs))
            return (jnp.where(o, s_new, s), jnp.where(o, Q_new, Q), acc), None

        t = jnp.arange(warmup, T)
        init = (s, Q0, jnp.zeros((k,), dtype))
        (_, _, acc), _ = jax.lax.scan(body, init, (xs[warmup:], t, ok[warmup:]))
        n = jnp.sum(ok[first_counted:])
        return acc / jnp.maximum(n, 1).astype(dtype)

    return _vmap_lead(single, len(batch))(xs_bm, s0, valid)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return int(value)


def _cell_exponents(
    cell, params, xs, *, k, carry, lengths, warmup, frame_warmup, time_axis, key, frame, core
):
    from seqjax.spectrum.models import _batch_major

    xs_bm = _batch_major(xs, time_axis)
    valid = _valid_steps(lengths, None, xs_bm)
    params, xs_bm, carry, _ = promote(params, xs_bm, carry)
    T = int(xs_bm.shape[-2])
    S = state_size(cell, params)
    where = "" if core is None else f" of core {core!r}"
    if k > S:
        raise ValueError(
            f"flossing_loss: k={k} exceeds the state size S={S}{where} (k must lie in [1, S]: "
            "one exponent per direction of the flattened state)."
        )
    counted = T - warmup - frame_warmup
    if counted < 1:
        raise ValueError(
            f"flossing_loss: the sequences{where} have T={T} steps but warmup={warmup} + "
            f"frame_warmup={frame_warmup} leave {counted} to measure; pass longer sequences or a "
            "smaller warmup."
        )
    if lengths is not None and _is_concrete(lengths):
        n = np.asarray(lengths)
        if n.size and int(n.min()) - warmup - frame_warmup < 1:
            raise ValueError(
                f"flossing_loss: the shortest sequence{where} (index "
                f"{tuple(int(i) for i in np.unravel_index(n.argmin(), n.shape))}) has {int(n.min())} valid "
                f"steps but warmup={warmup} + frame_warmup={frame_warmup} leave none to measure."
            )
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(_like(cell, params)))
    if frame is None:
        Q0 = _random_frame(jax.random.key(0) if key is None else key, S, k, dtype)
    else:
        Q0 = jnp.asarray(frame, dtype)
        if Q0.shape != (S, k):
            raise ValueError(
                f"flossing_loss: frame has shape {tuple(Q0.shape)} but needs (S, k) = ({S}, {k}){where}."
            )
    tol = jnp.asarray(_default_tol(dtype, S), dtype)
    return _exponents_core(
        cell, params, xs_bm, carry, valid, Q0, tol, warmup=int(warmup), frame_warmup=int(frame_warmup)
    )


def flossing_exponents(
    cell_or_model: Any,
    params: Any,
    xs: Any,
    *,
    k: int,
    carry: Any = None,
    lengths: Any = None,
    warmup: int = 0,
    frame_warmup: int = 0,
    time_axis: int = -2,
    key: jax.Array | None = None,
    frame: jax.Array | None = None,
) -> jax.Array | dict[str, jax.Array]:
    r"""The finite-time Lyapunov exponents that ``flossing_loss`` squares: ``(*batch, k)``.

    Arguments and method as in ``flossing_loss``. The exponents are in the order of the
    frame's columns (for a converged frame, decreasing); each sequence's are the mean of
    $\log R_t[i, i]$ over its counted steps. For a whole model, a dict
    ``{core name: (*batch, k)}``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.spectrum.flossing import flossing_exponents
      >>> cell = seqjax.rnn(3, activation="identity")           # linear: J_t = W_h^T
      >>> params = cell.init(jax.random.key(0), input_size=1)
      >>> params["w_h"] = jnp.diag(jnp.array([2.0, 0.5, 0.1]))
      >>> lam = flossing_exponents(cell, params, jnp.zeros((4, 30, 1)), k=2, frame=jnp.eye(3)[:, :2])
      >>> print(lam.shape, jnp.round(lam[0] / jnp.log(jnp.array([2.0, 0.5])), 4))
      (4, 2) [1. 1.]
    """
    k = _check_int(k, "k", 1)
    warmup = _check_int(warmup, "warmup", 0)
    frame_warmup = _check_int(frame_warmup, "frame_warmup", 0)
    opts = dict(k=k, warmup=warmup, frame_warmup=frame_warmup, key=key, frame=frame)
    if isinstance(cell_or_model, Cell):
        return _cell_exponents(
            cell_or_model, params, xs, carry=carry, lengths=lengths, time_axis=time_axis, core=None, **opts
        )
    from seqjax.spectrum.models import recurrent_cores

    if carry is not None:
        raise ValueError(
            f"flossing_loss: carry= is for a single Cell; a whole model ({type(cell_or_model).__name__}) "
            "sets each core's initial carry itself. Floss a core directly (seqjax.spectrum.recurrent_cores) "
            "to give one."
        )
    cores = recurrent_cores(cell_or_model, params, xs, lengths=lengths, time_axis=time_axis)
    return {
        name: _cell_exponents(
            c.cell, c.params, c.xs, carry=c.carry, lengths=c.lengths, time_axis=-2, core=name, **opts
        )
        for name, c in cores.items()
    }


def flossing_loss(
    cell_or_model: Any,
    params: Any,
    xs: Any,
    *,
    k: int,
    carry: Any = None,
    lengths: Any = None,
    warmup: int = 0,
    time_axis: int = -2,
    frame_warmup: int = 0,
    key: jax.Array | None = None,
    frame: jax.Array | None = None,
) -> jax.Array:
    r"""The gradient-flossing loss $\frac{1}{B}\sum_b \sum_{i=1}^{k} \lambda_{b,i}^2$, shape ``()``.

    For each sequence $b$ of the batch, $\lambda_{b,1..k}$ are the finite-time Lyapunov
    exponents (per step, natural log) of the trajectory $s_t = F(s_{t-1}, x_t)$ that
    ``xs`` drives from ``carry``: with $Q_0$ a fixed orthonormal ``(S, k)`` frame,

    $$
    Q_t R_t = J_t Q_{t-1} \quad (\text{QR every step}, \ \operatorname{diag} R_t > 0), \qquad
    \lambda_i = \frac{1}{N} \sum_{t} \log R_t[i, i],
    $$

    over the $N$ counted steps: the first ``warmup`` steps only move the state (their
    Jacobians are not applied: the state forgets ``carry``), the next ``frame_warmup`` move the
    frame too but are not counted (it turns towards the leading Lyapunov vectors), and the
    rest, up to each sequence's ``lengths``, are counted. $J_t Q$ is ``k`` JVPs of the step
    (``jax.linearize``): no ``S x S`` Jacobian is formed. This equals
    ``lyapunov_spectrum(cell, params, xs, k=k, warmup=warmup, frame_warmup=frame_warmup,
    window=N, frame=Q_0).exponents`` up to their order (that sorts them) and the floor below.

    The frame: $Q_0$ is the same fixed random orthonormal frame as ``lyapunov_spectrum``'s
    default (``key=jax.random.key(0)``), as in Engelken (2023). Random, because a random
    frame has (with probability 1) a component along every leading Lyapunov vector, so the
    iteration finds the top ``k`` exponents; the first ``k`` coordinate axes can lie in (or
    near) an invariant subspace that is not the leading one (a diagonal or block-structured
    ``W_h``, the ``h`` part of an LSTM's ``[h, c]``) and would then floss the wrong
    exponents. Fixed, because the loss is then a deterministic function of the params (no
    noise in the objective; the same value every call). Pass ``key`` or ``frame`` (e.g. the
    coordinate axes, exact for a diagonal linear system) to choose another.

    Rank deficiency: a step whose $R_t[i, i] \le S\,\epsilon \max_j \|(J_t Q_{t-1})_j\|$
    (numerically zero: a saturated ``tanh`` with $f' = 0$, a zero row of $J_t$) contributes
    the floor $\log(S\,\epsilon \max_j \|(J_t Q_{t-1})_j\|)$ instead of $-\infty$, with zero
    gradient: the loss stays finite and such a step does not push on that direction. The
    QR is renormalised every step, so nothing overflows in float32 over long sequences.

    For a whole model (anything ``seqjax.spectrum.recurrent_cores`` accepts: ``many_to_one``,
    ``stack_layers``, ``bidirectional``, ``encoder_decoder``, NNX modules), the loss is the sum
    over its recurrent cores, each on the inputs it sees, differentiable with respect to all of
    ``params`` (a stack's layer ``l`` sees the layers below, so their params get a gradient
    from it too).

    Transformations: one ``jax.jit`` per cell, ``warmup``, ``frame_warmup`` and shapes (``k``
    is the frame's shape); it runs inside a user's ``jit``, ``vmap`` and ``grad``.

    In a hand-written training loop, add it to the loss:

    ```python
    def loss_fn(params, batch):
        xs, ys = batch
        task = seqjax.mse(model.apply(params, xs), ys)
        return task + weight * flossing_loss(model, params, xs, k=k)

    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    ```

    (``seqjax.train.Flossing`` does this inside ``make_train_step``/``fit``, every ``every``
    steps; ``seqjax.train.floss`` minimises it alone before training.)

    Args:
      cell_or_model: a ``Cell``, or a whole model (its cores' losses are summed).
      params: its params.
      xs: inputs ``(*batch, T, I)`` (time at ``time_axis``); the loss is the mean over the
        batch axes (none: a single sequence).
      k: how many exponents, ``1 <= k <= S`` (``S`` the flattened state size of every core).
      carry: initial carry (a single ``Cell`` only); default ``cell.initial_carry`` zeros.
      lengths: ``(*batch,)`` valid steps of each sequence (padded data): each sequence
        averages over its own counted steps.
      warmup: steps that only move the state (not counted).
      time_axis: time axis of ``xs``.
      frame_warmup: steps after ``warmup`` that move the frame but are not counted.
      key: PRNG key of the random initial frame (default ``jax.random.key(0)``).
      frame: an explicit orthonormal initial frame ``(S, k)`` instead (a single cell or
        cores of one state size).

    Returns:
      ``()`` float array, the loss.

    Raises:
      ValueError: ``k`` not in ``[1, S]``, a negative ``warmup``, no step left to count, or a
        ``frame`` of the wrong shape (each message names the argument, and the core).

    Examples:
      A linear cell $h_t = h_{t-1} W_h + x_t W_x$ with $W_h = \operatorname{diag}(w)$ has
      exponents $\log|w_i|$; with the coordinate frame they are exact at every step:

      >>> import jax, jax.numpy as jnp, seqjax
      >>> from seqjax.spectrum.flossing import flossing_loss
      >>> cell = seqjax.rnn(3, activation="identity")
      >>> params = cell.init(jax.random.key(0), input_size=1)
      >>> params["w_h"] = jnp.diag(jnp.array([2.0, 0.5, 0.1]))
      >>> xs, axes = jnp.zeros((4, 30, 1)), jnp.eye(3)[:, :2]
      >>> loss = flossing_loss(cell, params, xs, k=2, frame=axes)
      >>> bool(jnp.isclose(loss, jnp.log(2.0) ** 2 + jnp.log(0.5) ** 2))
      True
      >>> g = jax.grad(lambda p: flossing_loss(cell, p, xs, k=2, frame=axes))(params)["w_h"]
      >>> print(jnp.round(jnp.diag(g), 4))                      # 2 log|w_i| / w_i, top k
      [ 0.6931 -2.7726  0.    ]
    """
    lam = flossing_exponents(
        cell_or_model,
        params,
        xs,
        k=k,
        carry=carry,
        lengths=lengths,
        warmup=warmup,
        frame_warmup=frame_warmup,
        time_axis=time_axis,
        key=key,
        frame=frame,
    )
    terms = [jnp.mean(jnp.sum(e**2, axis=-1)) for e in (lam.values() if isinstance(lam, dict) else [lam])]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
