r"""Dimensions and entropy of the dynamics: the Kaplan–Yorke dimension and the Kolmogorov–Sinai
entropy-rate bound from a Lyapunov spectrum (with error bars from its windows), and the
participation ratio of the states visited.

The two spectrum quantities are functions of the exponents ``lambda_1 >= ... >= lambda_k``
(per step, natural log):

```text
Kaplan–Yorke   D_KY = j + (lambda_1 + ... + lambda_j) / |lambda_{j+1}|,
               j = the largest index with lambda_1 + ... + lambda_j >= 0     (0 when lambda_1 < 0)
entropy rate   H = sum_i max(lambda_i, 0)                                    (nats per step)
```

Each is evaluated on the pooled exponents and on every window's finite-time exponents
(``LyapunovSpectrum.finite_time``); the windows give the standard error, exactly as
``lyapunov_spectrum`` gives the standard error of the exponents. The participation ratio
``(sum_i mu_i)^2 / sum_i mu_i^2`` of the eigenvalues ``mu_i`` of the state covariance is the
number of directions the activity spreads over.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, overload

import jax
import jax.numpy as jnp

from seqjax._util import promote
from seqjax.cells import Cell
from seqjax.spectrum.jacobians import _batch_major, _trajectory
from seqjax.spectrum.lyapunov import LyapunovSpectrum
from seqjax.spectrum.state import _for_model, _mask_batch_major, _valid_steps

__all__ = [
    "Estimate",
    "kaplan_yorke_dimension",
    "entropy_rate",
    "participation_ratio",
    "participation_ratio_from_states",
]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["value", "mean", "stderr", "per_window", "truncated"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Estimate:
    r"""A quantity computed from a Lyapunov spectrum, with its error bar from the windows; a
    pytree, so it passes through ``jit`` and ``vmap``.

    The quantity ``q(lambda)`` is evaluated on the pooled exponents (``value``) and on the
    finite-time exponents of every complete window (``per_window``). The error bar is the
    batch-means standard error of the window values, the convention of
    ``LyapunovSpectrum.stderr``: with ``n`` complete windows,

    ```text
    mean   = (1/n) sum_w q_w
    stderr = sqrt( sum_w (q_w - mean)^2 / (n - 1) ) / sqrt(n)      (inf for n = 1, NaN for n = 0)
    ```

    For a nonlinear ``q`` the two estimates differ: ``mean`` averages ``q`` over windows and
    ``value`` applies ``q`` to the averaged exponents. ``value`` is the estimate to report;
    ``stderr`` is its error bar (to first order the two have the same spread). A gap between
    ``value`` and ``mean`` much larger than ``stderr`` says the windows are too short for the
    finite-time exponents to be near their limits: use a longer ``window``.

    Attributes:
      value: ``(*batch,)``, ``q`` of the pooled exponents (``LyapunovSpectrum.exponents``);
        NaN for a sequence with no complete window.
      mean: ``(*batch,)``, the mean of ``per_window`` over the complete windows.
      stderr: ``(*batch,)``, the standard error above.
      per_window: ``(*batch, num_windows)``, ``q`` of each window's exponents (sorted
        decreasing within the window); NaN for a window a (shorter, padded) sequence does not
        fill.
      truncated: ``(*batch,)`` bool, true where the computed exponents end too early for the
        quantity to be determined, for the pooled exponents or in any complete window: then
        ``value`` and ``mean`` are lower bounds. Computing more exponents (a larger ``k``)
        settles it, unless ``k`` is already the state size (see each function).
    """

    value: jax.Array
    mean: jax.Array
    stderr: jax.Array
    per_window: jax.Array
    truncated: jax.Array


def _window_stats(per_window: jax.Array, ok: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and batch-means standard error over the windows flagged ``ok`` (last axis), as
    ``lyapunov._summarise`` pools the exponents."""
    n = jnp.sum(ok, axis=-1).astype(per_window.dtype)
    zero = jnp.zeros_like(per_window)
    mean = jnp.sum(jnp.where(ok, per_window, zero), axis=-1) / n  # NaN with no complete window
    centred = jnp.where(ok, per_window - mean[..., None], zero)
    var = jnp.sum(centred**2, axis=-1) / jnp.maximum(n - 1, 1)
    err = jnp.sqrt(var) / jnp.sqrt(jnp.maximum(n, 1))
    err = jnp.where(n > 1, err, jnp.inf)
    return mean, jnp.where(n > 0, err, jnp.nan)


def _kaplan_yorke(lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(D, truncated)`` for exponents ``lam (..., k)`` sorted decreasing (``-inf`` allowed)."""
    k = lam.shape[-1]
    c = jnp.cumsum(lam, axis=-1)
    # For decreasing exponents the partial sums rise while lambda_i > 0 and then fall, and stay
    # negative once negative: the count of non-negative ones is the largest such index j.
    j = jnp.sum(c >= 0, axis=-1)
    idx = jnp.arange(k).reshape((1,) * (lam.ndim - 1) + (k,))
    zero = jnp.zeros_like(lam)
    cj = jnp.sum(jnp.where(idx == j[..., None] - 1, c, zero), axis=-1)  # c_j (0 for j = 0)
    nxt = jnp.sum(jnp.where(idx == j[..., None], lam, zero), axis=-1)  # lambda_{j+1} (0 for j = k)
    usable = jnp.isfinite(nxt) & (nxt < 0)  # lambda_{j+1} = -inf: the fraction is 0
    frac = jnp.where(usable, cj / jnp.where(usable, -nxt, jnp.ones_like(nxt)), jnp.zeros_like(nxt))
    d = jnp.where(j == k, jnp.full_like(frac, k), j.astype(lam.dtype) + frac)
    bad = jnp.any(jnp.isnan(lam), axis=-1)
    return jnp.where(bad, jnp.nan, d), (j == k) & ~bad


def _entropy(lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum of positive exponents, truncated)`` for exponents ``lam (..., k)``, any order."""
    h = jnp.sum(jnp.where(lam > 0, lam, jnp.zeros_like(lam)), axis=-1)
    bad = jnp.any(jnp.isnan(lam), axis=-1)
    return jnp.where(bad, jnp.nan, h), (jnp.min(lam, axis=-1) > 0) & ~bad


def _estimate(q, exponents: jax.Array, finite_time: jax.Array) -> Estimate:
    value, trunc = q(-jnp.sort(-exponents, axis=-1))  # sorted already by lyapunov_spectrum
    ok = ~jnp.any(jnp.isnan(finite_time), axis=-1)  # (*batch, nw): the complete windows
    ft = jnp.where(ok[..., None], finite_time, jnp.zeros_like(finite_time))
    per_window, trunc_w = q(-jnp.sort(-ft, axis=-1))
    per_window = jnp.where(ok, per_window, jnp.nan)
    mean, err = _window_stats(per_window, ok)
    truncated = trunc | jnp.any(trunc_w & ok, axis=-1)
    return Estimate(value, mean, err, per_window, truncated)


@jax.jit
def _estimates_core(exponents, finite_time):
    """Both estimates in one compiled function (one compilation per shapes serves both public
    functions; under a user's ``jit`` the unused one is dropped)."""
    return _estimate(_kaplan_yorke, exponents, finite_time), _estimate(_entropy, exponents, finite_time)


def _check_spectrum(spectrum: Any, who: str) -> LyapunovSpectrum:
    if not isinstance(spectrum, LyapunovSpectrum):
        raise TypeError(
            f"{who} takes a LyapunovSpectrum (from lyapunov_spectrum or lyapunov_from_jacobians) or a "
            f"dict of them (a whole model), got a {type(spectrum).__name__}."
        )
    return spectrum


@overload
def kaplan_yorke_dimension(spectrum: LyapunovSpectrum) -> Estimate: ...


@overload
def kaplan_yorke_dimension(spectrum: Mapping[str, LyapunovSpectrum]) -> dict[str, Estimate]: ...


def kaplan_yorke_dimension(
    spectrum: LyapunovSpectrum | Mapping[str, LyapunovSpectrum],
) -> Estimate | dict[str, Estimate]:
    r"""Kaplan–Yorke (Lyapunov) dimension of the attractor, with an error bar from the windows.

    With the exponents sorted, ``lambda_1 >= lambda_2 >= ... >= lambda_k``, and partial sums
    ``c_j = lambda_1 + ... + lambda_j``:

    ```text
    D_KY = j + c_j / |lambda_{j+1}|,    j = the largest index with c_j >= 0
    ```

    ``j`` directions expand volumes (their ``j``-volume does not shrink) and the fraction is how
    far into the next, contracting direction the balance reaches. ``D_KY = 0`` when
    ``lambda_1 < 0`` (every perturbation decays: a stable fixed point or a stable driven
    response). Kaplan & Yorke conjectured, and for some classes of systems it is proved, that
    ``D_KY`` equals the information dimension of the attractor (for a driven network, of the
    input-conditioned attractor), at most ``S``. ``lambda_{j+1} = -inf`` (a rank-deficient
    direction) adds nothing: ``D_KY = j``.

    Truncation: when ``c_k >= 0`` for all ``k`` computed exponents the dimension is at least
    ``k`` and the formula cannot say more. Then ``value = k`` and ``truncated`` is true: compute
    more exponents (``lyapunov_spectrum(..., k=larger)``). With ``k = S`` already, the map
    expands volume on average and the dimension is the whole state space, ``S``.

    Error bar: ``D_KY`` of every complete window's finite-time exponents (each window sorted
    on its own) gives ``per_window``; ``mean`` and ``stderr`` are their mean and batch-means
    standard error (``std(ddof=1)/sqrt(n)`` over ``n`` windows, as ``LyapunovSpectrum.stderr``);
    ``value`` is ``D_KY`` of the pooled exponents. See ``Estimate``.

    Args:
      spectrum: a ``LyapunovSpectrum`` (``exponents (*batch, k)``, ``finite_time
        (*batch, num_windows, k)``), or a dict of them (``lyapunov_spectrum`` of a whole model).

    Returns:
      ``Estimate(value, mean, stderr, per_window, truncated)`` with ``value``, ``mean``,
      ``stderr``, ``truncated`` ``(*batch,)`` and ``per_window`` ``(*batch, num_windows)``;
      a dict of them for a dict. Dimensionless.

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> w = jnp.array([1.5, 1.1, 0.8, 0.5])              # s_t = diag(w) s_{t-1}
      >>> spec = seqjax.spectrum.lyapunov_from_jacobians(
      ...     jnp.broadcast_to(jnp.diag(w), (40, 4, 4)), window=10, frame=jnp.eye(4))
      >>> ky = seqjax.spectrum.kaplan_yorke_dimension(spec)
      >>> lam = jnp.log(w)                                  # c_3 >= 0 > c_4
      >>> bool(jnp.allclose(ky.value, 3 + lam[:3].sum() / -lam[3], atol=1e-5)), bool(ky.truncated)
      (True, False)

    References: Kaplan & Yorke, "Chaotic behavior of multidimensional difference equations",
    Lecture Notes in Mathematics 730 (1979); Engelken, Wolf & Abbott (2020).
    """
    if isinstance(spectrum, Mapping):
        return {name: kaplan_yorke_dimension(s) for name, s in spectrum.items()}
    spectrum = _check_spectrum(spectrum, "kaplan_yorke_dimension")
    return _estimates_core(spectrum.exponents, spectrum.finite_time)[0]


@overload
def entropy_rate(spectrum: LyapunovSpectrum) -> Estimate: ...


@overload
def entropy_rate(spectrum: Mapping[str, LyapunovSpectrum]) -> dict[str, Estimate]: ...


def entropy_rate(
    spectrum: LyapunovSpectrum | Mapping[str, LyapunovSpectrum],
) -> Estimate | dict[str, Estimate]:
    r"""The Kolmogorov–Sinai entropy-rate bound: the sum of the positive Lyapunov exponents.

    ```text
    H = sum_i max(lambda_i, 0)          (nats per step)
    ```

    Ruelle's inequality bounds the Kolmogorov–Sinai entropy by ``H``, and Pesin's identity
    makes it an equality for the smooth (SRB) measures of chaotic attractors: ``H`` is the
    rate at which the dynamics make nearby states distinguishable, i.e. create information
    (and at which a prediction from a slightly uncertain state loses it). ``H = 0`` when no
    exponent is positive (stable, non-chaotic dynamics).
    Divide by ``log 2`` for bits per step.

    Truncation: when the smallest computed exponent is still positive, the exponents beyond
    ``k`` may be positive too, so ``H`` is a lower bound and ``truncated`` is true: compute
    more exponents. With ``k = S`` nothing is missing and the flag only says that every
    direction expands.

    Error bar: as ``kaplan_yorke_dimension`` (per-window values, their mean and batch-means
    standard error; ``value`` from the pooled exponents). As ``max(., 0)`` is convex, ``mean``
    is at least ``value``, and the gap shrinks as the windows grow.

    Args:
      spectrum: a ``LyapunovSpectrum``, or a dict of them (a whole model).

    Returns:
      ``Estimate(value, mean, stderr, per_window, truncated)`` (shapes as in
      ``kaplan_yorke_dimension``), in nats per step; a dict of them for a dict.

    Examples:
      >>> import jax.numpy as jnp, seqjax
      >>> w = jnp.array([1.5, 1.1, 0.8, 0.5])
      >>> spec = seqjax.spectrum.lyapunov_from_jacobians(
      ...     jnp.broadcast_to(jnp.diag(w), (40, 4, 4)), window=10, frame=jnp.eye(4))
      >>> h = seqjax.spectrum.entropy_rate(spec)
      >>> bool(jnp.allclose(h.value, jnp.log(1.5) + jnp.log(1.1), atol=1e-5))
      True

    References: Pesin, Russian Math. Surveys 32 (1977); Ruelle, Bol. Soc. Bras. Mat. 9 (1978);
    Eckmann & Ruelle (1985); Engelken, Wolf & Abbott (2020).
    """
    if isinstance(spectrum, Mapping):
        return {name: entropy_rate(s) for name, s in spectrum.items()}
    spectrum = _check_spectrum(spectrum, "entropy_rate")
    return _estimates_core(spectrum.exponents, spectrum.finite_time)[1]


# --------------------------------------------------------------------------- participation ratio


def _pr(states: jax.Array, weight: jax.Array, per_sequence: bool) -> jax.Array:
    """PR of ``states (*batch, T, S)`` with sample weights ``weight (*batch, T)`` (0 or 1)."""
    if not per_sequence:
        states = states.reshape((-1, states.shape[-1]))
        weight = weight.reshape(-1)
    w = weight.astype(states.dtype)[..., None]  # (..., N, 1)
    n = jnp.sum(w, axis=-2, keepdims=True)  # (..., 1, 1)
    mean = jnp.sum(w * states, axis=-2, keepdims=True) / n
    x = (states - mean) * w
    cov = jnp.einsum("...ni,...nj->...ij", x, x) / n
    tr = jnp.trace(cov, axis1=-2, axis2=-1)
    # sum_i mu_i^2 = ||C||_F^2 for the symmetric C: no eigendecomposition needed
    return tr**2 / jnp.sum(cov * cov, axis=(-2, -1))


@functools.partial(jax.jit, static_argnames=("per_sequence", "warmup"))
def _pr_core(states, valid, *, per_sequence, warmup):
    read = jnp.ones(states.shape[:-1], bool) if valid is None else valid
    if warmup:  # drop each sequence's first `warmup` steps read
        read = read & (jnp.cumsum(read, axis=-1) > warmup)
    return _pr(states, read, per_sequence)


def _check_warmup(warmup: Any) -> int:
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}.")
    return warmup


def participation_ratio_from_states(
    states: jax.Array,
    *,
    mask: Any = None,
    per_sequence: bool = False,
) -> jax.Array:
    r"""Participation ratio of a cloud of states: the number of directions the activity fills.

    With ``mu_i`` the eigenvalues of the covariance ``C`` of the states,

    ```text
    PR = (sum_i mu_i)^2 / sum_i mu_i^2 = tr(C)^2 / ||C||_F^2,      1 <= PR <= S
    ```

    ``PR = S`` for activity spread evenly over all ``S`` directions (isotropic ``C``), ``PR = 1``
    for activity along a single direction, and ``PR = m`` for ``m`` equal-variance directions.
    It is computed from the trace and the Frobenius norm (no eigendecomposition), so it runs
    on every backend and is differentiable. Invariant to the scale of the states, so the
    normalisation of ``C`` (``ddof``) does not matter.

    Estimator: the sample covariance of the selected states, centred on their mean. It needs
    many more samples than dimensions: with ``N`` samples, ``C`` has rank at most ``N - 1``
    and so ``PR <= N - 1``; for ``N`` a few times ``S`` the sample eigenvalues spread
    (Marchenko–Pastur) and ``PR`` comes out low. Consecutive states of a trajectory are
    correlated, so count effective samples, not steps. NaN when the states do not vary.

    Args:
      states: ``(*batch, T, S)`` states (e.g. ``StepJacobians.states`` or
        ``seqjax.trajectory(...).carries`` flattened), or ``(N, S)`` samples.
      mask: ``(*batch, T)`` bool, the states to use (e.g. ``StepJacobians.valid``); default all.
      per_sequence: one ratio per sequence ``(*batch,)``, each over its own time axis
        (``-2``); by default one ratio over all states, time and batch pooled.

    Returns:
      A scalar, or ``(*batch,)`` with ``per_sequence=True``.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> z = jax.random.normal(jax.random.key(0), (4000, 3))
      >>> states = z.at[:, 2].set(0.0)                      # two equal directions, one silent
      >>> round(float(seqjax.spectrum.participation_ratio_from_states(states)), 1)
      2.0

    References: Gao, Trautmann, Yu, Santhanam, Ryu, Shenoy & Ganguli, "A theory of multineuronal
    dimensionality, dynamics and measurement", bioRxiv (2017); Recanatesi et al., "A scale-dependent
    measure of system dimensionality", Patterns 3 (2022).
    """
    states = jnp.asarray(states)
    if states.ndim < 2:
        raise ValueError(f"states must be (*batch, T, S) or (N, S), got shape {tuple(states.shape)}.")
    if not jnp.issubdtype(states.dtype, jnp.floating):
        states = states.astype(jnp.result_type(float))
    if mask is not None:
        mask = jnp.asarray(mask)
        if tuple(mask.shape) != tuple(states.shape[:-1]):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but needs {tuple(states.shape[:-1])} "
                "(one flag per state: states.shape[:-1])."
            )
        mask = mask.astype(bool)
    return _pr_core(states, mask, per_sequence=bool(per_sequence), warmup=0)


@functools.partial(jax.jit, static_argnames=("cell", "per_sequence", "warmup"))
def _pr_cell_core(cell, params, xs_bm, carry, valid, *, per_sequence, warmup):
    _, states = _trajectory(cell, params, xs_bm, carry, valid)
    return _pr_core(states, valid, per_sequence=per_sequence, warmup=warmup)


@overload
def participation_ratio(
    cell: Cell,
    params: Any,
    xs: Any,
    *,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    warmup: int = ...,
    per_sequence: bool = ...,
    time_axis: int = ...,
) -> jax.Array: ...


@overload
def participation_ratio(
    cell: object,
    params: Any,
    xs: Any,
    *,
    carry: Any = ...,
    lengths: Any = ...,
    mask: Any = ...,
    warmup: int = ...,
    per_sequence: bool = ...,
    time_axis: int = ...,
) -> dict[str, jax.Array]: ...


def participation_ratio(
    cell: Cell | Any,
    params: Any,
    xs: Any,
    *,
    carry: Any = None,
    lengths: Any = None,
    mask: Any = None,
    warmup: int = 0,
    per_sequence: bool = False,
    time_axis: int = -2,
) -> jax.Array | dict[str, jax.Array]:
    r"""Participation ratio of the states a cell visits on inputs ``xs``: the dimension of its activity.

    Unrolls the cell (``seqjax.trajectory``), flattens each carry to the state ``s_t``
    (``flatten_state``; ``[h, c]`` for the LSTM), drops each sequence's first ``warmup`` steps
    and computes ``PR = tr(C)^2 / ||C||_F^2`` of the covariance ``C`` of the remaining states
    (see ``participation_ratio_from_states`` for the estimator and its bias).

    ``PR`` measures the dimension of the *activity* (how many directions the states spread
    over, weighted by variance); ``kaplan_yorke_dimension`` measures the dimension of the
    *dynamics* (how many directions perturbations can grow or persist in). A network driven
    by rich inputs can have a large ``PR`` and ``D_KY = 0`` (a stable, input-slaved response).

    Args:
      cell: any ``Cell``, or a whole model (see ``seqjax.spectrum.recurrent_cores``): then a
        dict, one ratio per core.
      params: its params.
      xs: ``(*batch, T, I)`` inputs (or time at ``time_axis``).
      carry: initial carry ``(*batch, ...)``; default ``cell.initial_carry``.
      lengths: ``(*batch,)`` valid steps of each sequence: padded steps are left out.
      mask: ``(*batch, T)`` bool, the steps read (laid out like ``xs`` without features).
      warmup: steps read of each sequence left out at its start (the transient from the
        initial carry).
      per_sequence: one ratio per sequence ``(*batch,)``; by default one over all sequences
        and steps pooled.
      time_axis: time axis of ``xs``.

    Returns:
      A scalar (``(*batch,)`` with ``per_sequence=True``); a dict of them for a model.

    Examples:
      >>> import jax, jax.numpy as jnp, seqjax
      >>> cell = seqjax.rnn(8)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> xs = jax.random.normal(jax.random.key(1), (4, 200, 2))
      >>> pr = seqjax.spectrum.participation_ratio(cell, params, xs, warmup=20)
      >>> bool(1.0 <= pr <= 8.0)
      True
    """
    if not isinstance(cell, Cell):
        return _for_model(
            participation_ratio,
            cell,
            params,
            xs,
            carry,
            lengths,
            mask,
            time_axis,
            warmup=warmup,
            per_sequence=per_sequence,
        )
    warmup = _check_warmup(warmup)
    xs = jnp.asarray(xs)
    xs_bm = _batch_major(xs, time_axis)
    valid = _valid_steps(lengths, _mask_batch_major(mask, xs, time_axis), xs_bm)
    params, xs_bm, carry, _ = promote(params, xs_bm, carry)
    return _pr_cell_core(cell, params, xs_bm, carry, valid, per_sequence=bool(per_sequence), warmup=warmup)
