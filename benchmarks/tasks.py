"""Tasks: which cells learn long-range dependencies, and the Jacobian story that explains it.

Synthetic tasks (``seqjax.tasks``):

- adding problem at T = 50, 100, 200, 400: test MSE against the trivial predictor's 1/6,
  and the first step whose test MSE falls below 0.01;
- copy task: accuracy on the recalled symbols against the memoryless 1/K.

Cells: tanh RNN, IRNN (ReLU, identity-initialised ``W_h``; Le et al. 2015), LSTM (forget
bias ``LSTM_FORGET_BIAS`` = 3) and GRU, each with a linear readout on every step
(``task_model``: ``seqjax.seq2seq.many_to_many`` with a ``dense`` head), with the
**same parameter budget** (the hidden size of each cell chosen so its parameter count is
closest to the LSTM's at ``H_ref``) and the **same step budget** (same number of Adam
steps, batch size, learning rate and global-norm clipping at 1, through
``seqjax.train.fit``).

For every trained model the Jacobian story, on test sequences:

- ``rho(W_h)``: spectral radius of the recurrent matrix (Elman cells: ``W_h`` is square;
  gated cells: the mean spectral radius of the step Jacobians ``J_t`` is given instead,
  column ``rho(J)``, for every cell);
- ``lambda_max``: the largest Lyapunov exponent (``seqjax.spectrum.lyapunov_spectrum``,
  ``k=1``);
- gradient-norm ratio ``||dL/ds_1|| / ||dL/ds_T||`` (log10) of the task loss with respect to
  the state at the first and last step, from one backward pass with zero perturbations
  added to every step's state.

Real-data table: scikit-learn digits read pixel by pixel (64 steps), statsmodels sunspots
(one step ahead, against persistence and AR: ``compare_sunspot_models``), character-level
LM on standard-library source text (bits per character against the unigram baseline, with
a sample: ``train_char_lm``, ``sample_text``).

Seeds are fixed; the full mode runs every row with 3 seeds and reports mean ± std.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import seqjax as sj
from benchmarks import common, report

__all__ = [
    "CELLS",
    "settings",
    "make_cell",
    "readout",
    "task_model",
    "hidden_for_budget",
    "TASKS",
    "parse_only",
    "state_gradient_norms",
    "compare_sunspot_models",
    "train_char_lm",
    "sample_text",
    "run",
    "to_markdown",
    "plot",
]

CELLS = ("rnn", "irnn", "lstm", "gru")
LABELS = {
    "rnn": "tanh RNN",
    "irnn": "IRNN",
    "lstm": "LSTM",
    "gru": "GRU",
    "ar": "AR (least squares)",
    "tdnn": "TDNN",
    "narx": "NARX",
    "persistence": "persistence",
}


def settings(mode: str) -> dict[str, Any]:
    """Lengths, budgets, steps and seeds of a mode."""
    if mode == "full":
        return {
            "adding_Ts": [50, 100, 200, 400],
            "steps": 4000,
            "batch": 64,
            "lr": 3e-3,
            "H_ref": 64,
            "n_test": 1000,
            "eval_every": 250,
            "seeds": [0, 1, 2],
            "copy": {"length": 10, "delay": 50, "num_symbols": 8},
            "copy_steps": 4000,
            "jac_seqs": 4,
            "digits_steps": 2000,
            "sunspot_steps": 2000,
            "char_steps": 2000,
            "char_hidden": 128,
            "char_cells": ["rnn", "lstm", "gru"],
            "cells": list(CELLS),
            "copy_cells": list(CELLS),
            "digits_cells": list(CELLS),
            "sunspot_models": ("ar", "tdnn", "narx", "rnn", "lstm", "gru"),
        }
    if mode == "quick":
        return {
            "adding_Ts": [50],
            "steps": 400,
            "batch": 32,
            "lr": 3e-3,
            "H_ref": 32,
            "n_test": 256,
            "eval_every": 100,
            "seeds": [0],
            "copy": {"length": 5, "delay": 10, "num_symbols": 4},
            "copy_steps": 400,
            "jac_seqs": 2,
            "digits_steps": 300,
            "sunspot_steps": 300,
            "char_steps": 200,
            "char_hidden": 64,
            "char_cells": ["lstm"],
            "cells": list(CELLS),
            "copy_cells": list(CELLS),
            "digits_cells": list(CELLS),
            "sunspot_models": ("ar", "tdnn", "narx", "rnn", "lstm", "gru"),
        }
    if mode == "tiny":
        return {
            "adding_Ts": [8],
            "steps": 4,
            "batch": 4,
            "lr": 1e-3,
            "H_ref": 4,
            "n_test": 8,
            "eval_every": 2,
            "seeds": [0],
            "copy": {"length": 2, "delay": 3, "num_symbols": 3},
            "copy_steps": 4,
            "jac_seqs": 2,
            "digits_steps": 2,
            "sunspot_steps": 2,
            "char_steps": 2,
            "char_hidden": 8,
            "char_cells": ["lstm"],
            "cells": ["rnn", "lstm"],
            "copy_cells": ["lstm"],
            "digits_cells": ["lstm"],
            "sunspot_models": ("ar", "rnn"),
        }
    raise ValueError(f"mode must be one of {common.MODES}, got {mode!r}.")


#: Forget-gate bias of the LSTM at initialisation (Gers et al. 2000 recommend a positive one).
#: Calibration on the adding problem at T = 200 (batch 64, Adam, clipping at 1): with bias 1
#: the LSTM stayed at the baseline for 3,000 steps at lr 1e-3 and 2,000 at lr 1e-2 (gradient
#: ratio first/last step ~1e-12); with bias 3 and lr 3e-3 it solved it (MSE 0.002 at step
#: 3,000); the GRU solved it at lr 1e-3 by step 2,000. Hence bias 3 and lr 3e-3 for all cells.
LSTM_FORGET_BIAS = 3.0


def make_cell(kind: str, hidden: int, *, forget_bias: float | None = None) -> sj.Cell:
    """The task cells: the ``seqjax.cells`` builder ``kind`` of ``CELLS`` (tanh ``rnn``,
    ``irnn``, ``lstm`` with forget bias ``LSTM_FORGET_BIAS`` unless given, ``gru``)."""
    if kind not in CELLS:
        raise ValueError(f"kind must be one of {CELLS}, got {kind!r}.")
    if kind == "lstm":
        return sj.lstm(hidden, forget_bias=LSTM_FORGET_BIAS if forget_bias is None else forget_bias)
    return getattr(sj.cells, kind)(hidden)


#: Scale of the readout weights at initialisation: ``W ~ N(0, READOUT_SCALE^2 / O_cell)``.
READOUT_SCALE = 0.1


def readout(output_size: int) -> sj.Pointwise:
    """The per-step linear readout ``o_t = y_t W + b`` of the task models: ``dense`` with
    ``W ~ N(0, READOUT_SCALE^2 / O_cell)`` (``scaled_gaussian``) and ``b = 0``."""
    from seqjax.initializers import scaled_gaussian, zeros

    return sj.dense(output_size, kernel_init=scaled_gaussian(READOUT_SCALE), bias_init=zeros)


def task_model(cell: sj.Cell, output_size: int) -> sj.SeqModel:
    """``cell`` with ``readout(output_size)`` on every step (``seqjax.seq2seq.many_to_many``):
    ``init(key, input_size) -> {"body", "head"}``, ``apply(params, xs) -> (B, T, O)``."""
    return sj.many_to_many(cell, readout(output_size))


def _n_params(model, input_size: int) -> int:
    shapes = jax.eval_shape(lambda k: model.init(k, input_size), jax.random.key(0))
    return int(sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes)))


def hidden_for_budget(kind: str, input_size: int, output_size: int, budget: int) -> tuple[int, int]:
    """The hidden size whose model (cell + readout, ``task_model``) has the parameter count
    closest to ``budget`` (the count grows with ``H``: bisection); returns ``(H, count)``."""

    def count(H):
        return _n_params(task_model(make_cell(kind, H), output_size), input_size)

    lo, hi = 1, 2
    while count(hi) < budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # invariant: count(lo) < budget <= count(hi), or lo == 1
        mid = (lo + hi) // 2
        if count(mid) < budget:
            lo = mid
        else:
            hi = mid
    return min(((H, count(H)) for H in {lo, hi}), key=lambda hc: (abs(hc[1] - budget), hc[0]))


# --------------------------------------------------------------------------- Jacobian story


def state_gradient_norms(cell, params, xs, loss_of_outputs: Callable) -> np.ndarray:
    """``||dL/ds_t||`` for every step ``t`` (one backward pass, ``seqjax.bptt.gradient_norms``)
    of a ``task_model(cell, O)`` with params ``{"body", "head"}``: ``L = loss_of_outputs(outs)``
    with ``outs`` the readout of every step; ``s_t`` the whole carry (``(h, c)`` for the
    LSTM). Returns ``(T,)`` (norms over the batch and the state)."""
    head = readout(params["head"]["w"].shape[-1])

    def loss(ys):
        return loss_of_outputs(head.apply(params["head"], ys))

    gn = jax.jit(lambda p, x: sj.gradient_norms(cell, p, x, loss))(params["body"], xs)
    return np.asarray(jnp.sqrt(jnp.sum(gn.norms**2, axis=0)))


def jacobian_story(kind, cell, params, xs, loss_of_outputs) -> dict[str, Any]:
    """Spectral radius of ``W_h`` (Elman cells), mean ``rho(J_t)``, ``lambda_max`` and the
    log10 gradient-norm ratio first/last step, for a trained ``task_model(cell, O)`` (params
    ``{"body", "head"}``) on test inputs ``xs``."""
    out: dict[str, Any] = {}
    p_cell = params["body"]
    if kind in ("rnn", "irnn"):
        out["rho_Wh"] = float(np.max(np.abs(np.linalg.eigvals(np.asarray(p_cell["w_h"], np.float64)))))
    spec = common.optional_import("seqjax.spectrum")
    if spec is not None:
        J = spec.step_jacobians(cell, p_cell, xs).jacobians
        out["rho_J_mean"] = float(jnp.mean(spec.spectral_radii(J)))
        del J
        ly = spec.lyapunov_spectrum(cell, p_cell, xs, k=1)
        out["lambda_max"] = float(jnp.mean(ly.exponents[..., 0]))
    gn = state_gradient_norms(cell, params, xs, loss_of_outputs)
    # float32 underflow: a gradient that vanished below ~1e-38 at the first step is exactly 0
    out["grad_underflow"] = bool(gn[0] == 0.0)
    ok = gn[0] > 0 and gn[-1] > 0
    out["log10_grad_ratio"] = float(np.log10(gn[0]) - np.log10(gn[-1])) if ok else None
    out["grad_norms_first_last"] = [float(gn[0]), float(gn[-1])]
    return out


# --------------------------------------------------------------------------- synthetic tasks


def _train(loss, model, params, data_fn, eval_data, steps, s, key):
    from seqjax.train import Evaluation, Logging, clipped_adam, fit

    spc = math.gcd(steps, s["eval_every"])
    t0 = time.perf_counter()
    res = fit(
        loss,
        clipped_adam(s["lr"]),
        params,
        data_fn,
        key=key,
        steps=steps,
        evaluation=Evaluation(eval_data, every=s["eval_every"], batch_size=len(eval_data[0])),
        logging=Logging(every=s["eval_every"], progress=False),
        steps_per_call=spc,
        mesh=None,
    )
    return res, time.perf_counter() - t0


def _adding_run(kind, T, seed, s, H, log):
    from seqjax.tasks import ADDING_BASELINE_MSE, adding_problem

    cell = make_cell(kind, H)
    model = task_model(cell, 1)
    key = jax.random.key(1000 * seed + T)
    k_init, k_fit = jax.random.split(key)
    test = adding_problem(jax.random.key(10_000 + T), s["n_test"], T)

    def loss(p, batch):
        xs, ys = batch
        pred = model.apply(p, xs)[:, -1, 0]
        return jnp.mean((pred - ys) ** 2)

    def data(k):
        return adding_problem(k, s["batch"], T)

    res, wall = _train(loss, model, model.init(k_init, 2), data, test, s["steps"], s, k_fit)
    params = res.state.params
    mse = float(jax.jit(loss)(params, test))
    hit = next(
        (r["step"] for r in res.history if r.get("eval_loss") is not None and r["eval_loss"] < 0.01), None
    )
    n = s["jac_seqs"]
    xs_j, ys_j = test[0][:n], test[1][:n]
    story = jacobian_story(kind, cell, params, xs_j, lambda outs: jnp.mean((outs[:, -1, 0] - ys_j) ** 2))
    log(
        f"  adding T={T} {kind} seed={seed}: test MSE {mse:.4f} "
        f"(baseline {ADDING_BASELINE_MSE:.3f}), {wall:.0f} s"
    )
    return {
        "task": "adding",
        "T": T,
        "cell": kind,
        "H": H,
        "seed": seed,
        "test_mse": mse,
        "baseline": ADDING_BASELINE_MSE,
        "steps_to_0.01": hit,
        "wall_s": wall,
        "steps": s["steps"],
        "curve": [(r["step"], r.get("eval_loss")) for r in res.history],
        **story,
    }


def _copy_run(kind, seed, s, H, log):
    from seqjax.tasks import copy_task, copy_task_baseline

    c = s["copy"]
    L, K = c["length"], c["num_symbols"]
    cell = make_cell(kind, H)
    model = task_model(cell, K + 2)
    key = jax.random.key(2000 * seed + 7)
    k_init, k_fit = jax.random.split(key)
    test = copy_task(jax.random.key(20_000), s["n_test"], **c)

    def loss(p, batch):
        xs, ys = batch
        logp = jax.nn.log_softmax(model.apply(p, xs), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ys[..., None], axis=-1))

    def acc(p, batch):
        xs, ys = batch
        pred = jnp.argmax(model.apply(p, xs)[:, -L:], axis=-1)
        return jnp.mean((pred == ys[:, -L:]).astype(jnp.float32))

    def data(k):
        return copy_task(k, s["batch"], **c)

    res, wall = _train(loss, model, model.init(k_init, K + 2), data, test, s["copy_steps"], s, k_fit)
    params = res.state.params
    a = float(jax.jit(acc)(params, test))
    ce = float(jax.jit(loss)(params, test))
    n = s["jac_seqs"]
    xs_j, ys_j = test[0][:n], test[1][:n]

    def recall_loss(outs):
        logp = jax.nn.log_softmax(outs[:, -L:], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ys_j[:, -L:, None], axis=-1))

    story = jacobian_story(kind, cell, params, xs_j, recall_loss)
    log(f"  copy {kind} seed={seed}: recall accuracy {a:.3f} (baseline {1 / K:.3f}), {wall:.0f} s")
    return {
        "task": "copy",
        "T": c["delay"] + 2 * L,
        "cell": kind,
        "H": H,
        "seed": seed,
        "accuracy": a,
        "test_ce": ce,
        "baseline_accuracy": 1.0 / K,
        "baseline_ce": copy_task_baseline(L, c["delay"], K),
        "wall_s": wall,
        "steps": s["copy_steps"],
        **story,
    }


# --------------------------------------------------------------------------- real data


def _digits_run(kind, seed, s, H, log):
    from seqjax.tasks import digits

    d = digits(mode="pixels", seed=0)
    model = task_model(make_cell(kind, H), 10)
    key = jax.random.key(3000 * seed + 1)
    k_init, k_fit = jax.random.split(key)

    def loss(p, batch):
        xs, ys = batch
        logp = jax.nn.log_softmax(model.apply(p, xs)[:, -1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ys[:, None], axis=-1))

    from seqjax.train import Logging, clipped_adam, fit

    t0 = time.perf_counter()
    res = fit(
        loss,
        clipped_adam(s["lr"]),
        model.init(k_init, 1),
        (d.x_train, d.y_train),
        key=k_fit,
        steps=s["digits_steps"],
        batch_size=min(64, len(d.y_train)),
        logging=Logging(every=s["digits_steps"], progress=False),
        mesh=None,
    )
    wall = time.perf_counter() - t0
    logits = jax.jit(model.apply)(res.state.params, jnp.asarray(d.x_test))[:, -1]
    accuracy = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == d.y_test))
    majority = float(np.mean(d.y_test == np.bincount(d.y_train).argmax()))
    log(f"  digits {kind} seed={seed}: test accuracy {accuracy:.3f} (majority {majority:.3f}), {wall:.0f} s")
    return {
        "task": "digits (pixel by pixel, T=64)",
        "cell": kind,
        "H": H,
        "seed": seed,
        "metric": "test accuracy",
        "value": accuracy,
        "baseline": majority,
        "baseline_name": "majority class",
        "wall_s": wall,
        "steps": s["digits_steps"],
    }


def compare_sunspot_models(
    *,
    key: jax.Array,
    lags: int = 9,
    hidden: int = 8,
    steps: int = 2000,
    models: Sequence[str] = ("ar", "tdnn", "narx", "rnn", "lstm", "gru"),
    window: int = 40,
    learning_rate: float = 1e-2,
    data: Any = None,
) -> dict[str, dict[str, float]]:
    r"""AR, time-delay (TDNN), NARX and recurrent models on sunspots, one step ahead on held-out years.

    Every model predicts :math:`x_{t+1}` from :math:`x_{\le t}`. AR(``lags``) is fitted by
    least squares (``seqjax.tasks.ar_fit``); the networks (``task_model`` of ``tdnn(hidden, lags)``,
    ``narx(hidden, lags)``, ``rnn``/``lstm``/``gru(hidden)``) are trained with
    ``seqjax.train.fit`` (Adam, global-norm clipping at 1) on all training windows of
    ``window`` steps (MSE after a warm-up of ``lags`` steps), then run over the whole series
    from a zero state; the test error is over the held-out years only. Also reported:
    persistence (:math:`\hat x_{t+1} = x_t`).

    Args:
      key: PRNG key of the networks' initialisation and training.
      lags: ``p`` of AR(p), TDNN and NARX, and the warm-up steps of the loss.
      hidden: hidden units of every network.
      steps: Adam steps per network.
      models: which of ``ar``, ``tdnn``, ``narx``, ``rnn``, ``lstm``, ``gru`` to run.
      window: training window length.
      learning_rate: Adam learning rate.
      data: a ``seqjax.tasks.SeriesData`` (default ``seqjax.tasks.sunspots()``).

    Returns:
      ``{name: {"test_mse", "test_nmse", "train_mse", "seconds"}}`` in the scaled units;
      ``test_nmse = test_mse / Var(test targets)`` (below 1 beats the test mean).
    """
    from seqjax import cells as C
    from seqjax.tasks import ar_fit, ar_predict, sunspots
    from seqjax.train import Logging, clipped_adam, fit

    d = sunspots() if data is None else data
    x = d.values.astype(np.float64)
    tr, end = d.n_train, d.n_test_end
    y_test = x[tr:end]
    var = float(np.var(y_test))

    def scores(pred_next):  # pred_next[t] predicts x[t+1], t = 0..end-2
        e_tr = pred_next[lags - 1 : tr - 1] - x[lags:tr]
        e_te = pred_next[tr - 1 : end - 1] - y_test
        mse = float(np.mean(e_te**2))
        return {"test_mse": mse, "test_nmse": mse / var, "train_mse": float(np.mean(e_tr**2))}

    out: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    out["persistence"] = {**scores(x[: end - 1]), "seconds": time.perf_counter() - t0}
    makers = {
        "tdnn": lambda: C.tdnn(hidden, lags),
        "narx": lambda: C.narx(hidden, lags),
        "rnn": lambda: C.rnn(hidden),
        "lstm": lambda: C.lstm(hidden, forget_bias=1.0),
        "gru": lambda: C.gru(hidden),
    }
    starts = np.arange(0, tr - window)  # windows x[s : s + window] -> targets x[s+1 : s+window+1]
    xs_tr = np.stack([x[s : s + window] for s in starts])[..., None].astype(np.float32)
    ys_tr = np.stack([x[s + 1 : s + window + 1] for s in starts]).astype(np.float32)
    for i, name in enumerate(models):
        t0 = time.perf_counter()
        if name == "ar":
            coef = ar_fit(x[:tr], lags)
            pred = np.full(end - 1, np.nan)
            pred[lags - 1 :] = ar_predict(coef, x[:end])
            out["ar"] = {**scores(pred), "seconds": time.perf_counter() - t0}
            continue
        if name not in makers:
            raise ValueError(f"unknown model {name!r}; choose from {['ar', *makers]}.")
        model = task_model(makers[name](), 1)
        k_init, k_fit = jax.random.split(jax.random.fold_in(key, i))
        params = model.init(k_init, 1)

        def loss(p, batch, model=model):
            xs, ys = batch
            pred = model.apply(p, xs)[..., 0]
            return jnp.mean((pred[:, lags:] - ys[:, lags:]) ** 2)

        res = fit(
            loss,
            clipped_adam(learning_rate),
            params,
            (xs_tr, ys_tr),
            key=k_fit,
            steps=steps,
            batch_size=min(32, len(starts)),
            logging=Logging(every=steps, progress=False),
            mesh=None,
        )
        pred = np.asarray(model.apply(res.state.params, jnp.asarray(x[None, : end - 1, None], jnp.float32)))[
            0, :, 0
        ]
        out[name] = {**scores(pred.astype(np.float64)), "seconds": time.perf_counter() - t0}
    return out


def _sunspot_rows(seed, s, log):
    t0 = time.perf_counter()
    out = compare_sunspot_models(
        key=jax.random.key(4000 + seed), steps=s["sunspot_steps"], models=s["sunspot_models"]
    )
    log(f"  sunspots seed={seed}: {time.perf_counter() - t0:.0f} s")
    rows = []
    for name, r in out.items():
        rows.append(
            {
                "task": "sunspots (1-step, 1921-1955)",
                "cell": name,
                "seed": seed,
                "metric": "test NMSE",
                "value": r["test_nmse"],
                "test_mse": r["test_mse"],
                "wall_s": r["seconds"],
                "baseline": out["persistence"]["test_nmse"],
                "baseline_name": "persistence",
                "steps": s["sunspot_steps"],
            }
        )
    return rows


def train_char_lm(
    corpus: Any,
    cell: sj.Cell,
    *,
    key: jax.Array,
    seq_len: int = 64,
    batch_size: int = 32,
    steps: int = 1000,
    learning_rate: float = 3e-3,
    **fit_kwargs: Any,
) -> tuple[Any, dict[str, float]]:
    """Train a character-level language model: one-hot input, ``cell``, linear readout on
    every step (``task_model(cell, V)``), cross-entropy on the next character, Adam with
    global-norm clipping at 1 (``seqjax.train.fit``) on ``char_windows(corpus.train, seq_len)``.

    Args:
      corpus: a ``seqjax.tasks.CharCorpus``.
      cell: the cell.
      key: PRNG key.
      seq_len, batch_size, steps, learning_rate: the usual.
      **fit_kwargs: passed to ``seqjax.train.fit``.

    Returns:
      ``(params, scores)``: the ``task_model`` params and
      ``scores = {"valid_bpc", "unigram_bpc", "train_bpc"}`` (bits per character).
    """
    from seqjax.tasks import bits_per_char, char_windows, unigram_bits_per_char
    from seqjax.train import Logging, clipped_adam, fit

    V = len(corpus.vocab)
    model = task_model(cell, V)
    k_init, k_fit = jax.random.split(key)

    def loss(p, batch):
        x, y = batch
        return bits_per_char(model.apply(p, jax.nn.one_hot(x, V)), y) * math.log(2.0)  # nats

    data = char_windows(corpus.train, seq_len)
    fit_kwargs.setdefault("logging", Logging(progress=False))
    res = fit(
        loss,
        clipped_adam(learning_rate),
        model.init(k_init, V),
        data,
        key=k_fit,
        steps=steps,
        batch_size=batch_size,
        **fit_kwargs,
    )
    params = res.state.params
    ev = jax.jit(lambda p, x, y: bits_per_char(model.apply(p, jax.nn.one_hot(x, V)), y))
    vx, vy = char_windows(corpus.valid, seq_len)
    scores = {
        "valid_bpc": float(ev(params, vx, vy)),
        "train_bpc": float(ev(params, *(a[: 4 * batch_size] for a in data))),
        "unigram_bpc": unigram_bits_per_char(corpus.train, corpus.valid, V),
    }
    return params, scores


def sample_text(
    cell: sj.Cell,
    params: Any,
    vocab: str,
    prompt: str,
    num_chars: int,
    *,
    key: jax.Array,
    temperature: float = 1.0,
) -> str:
    """Sample ``num_chars`` characters after ``prompt`` from a character model trained by
    ``train_char_lm`` (``cell`` and its params).

    Uses ``seqjax.seq2seq.generate`` (one-hot feedback of each sampled character; the
    whole loop is one ``unroll`` under ``jit``).
    """
    from seqjax._util import positive_int
    from seqjax.seq2seq import generate

    lut = {c: i for i, c in enumerate(vocab)}
    missing = sorted(set(prompt) - set(lut))
    if not prompt or missing:
        raise ValueError(f"prompt must be non-empty and use only vocabulary characters; unknown: {missing}.")
    V = len(vocab)
    ids = jnp.asarray([lut[c] for c in prompt], jnp.int32)
    head = readout(V)
    _, toks = generate(
        cell,
        params["body"],
        lambda y: head.apply(params["head"], y),
        jax.nn.one_hot(ids, V)[None],
        positive_int(num_chars, "num_chars"),
        key=key,
        temperature=temperature,
    )
    return "".join(vocab[int(i)] for i in np.asarray(toks[0]))


def _char_run(kind, seed, s, log):
    from seqjax.tasks import char_corpus
    from seqjax.train import Logging

    corpus = char_corpus()
    t0 = time.perf_counter()
    cell = make_cell(kind, s["char_hidden"])
    params, scores = train_char_lm(
        corpus,
        cell,
        key=jax.random.key(5000 + seed),
        steps=s["char_steps"],
        mesh=None,
        logging=Logging(every=s["char_steps"], progress=False),
    )
    wall = time.perf_counter() - t0
    sample = sample_text(cell, params, corpus.vocab, "def ", 120, key=jax.random.key(seed), temperature=0.8)
    log(
        f"  char-LM {kind} seed={seed}: valid {scores['valid_bpc']:.3f} bpc (unigram "
        f"{scores['unigram_bpc']:.3f}), {wall:.0f} s"
    )
    return {
        "task": "char-LM (stdlib source)",
        "cell": kind,
        "H": s["char_hidden"],
        "seed": seed,
        "metric": "valid bits/char",
        "value": scores["valid_bpc"],
        "baseline": scores["unigram_bpc"],
        "baseline_name": "unigram",
        "wall_s": wall,
        "steps": s["char_steps"],
        "sample": sample,
        "corpus": corpus.source,
    }


# --------------------------------------------------------------------------- suite

#: The jobs of the suite: a job is ``(task, T, cell, seed)`` (``T``/``cell`` ``None`` where they
#: do not apply); ``--only`` selects among them and ``--jobs`` runs them in worker processes.
TASKS = ("adding", "copy", "digits", "sunspots", "char")


def _jobs(s: dict, budgets: dict) -> list[tuple]:
    """Every job of the settings ``s``, in the order of the tables: ``(task, T, cell, seed, H)``."""
    out = []
    for T in s["adding_Ts"]:
        for kind in s["cells"]:
            out += [("adding", T, kind, seed, budgets["adding"][kind][0]) for seed in s["seeds"]]
    c = s["copy"]
    for kind in s["copy_cells"]:
        out += [
            ("copy", c["delay"] + 2 * c["length"], kind, seed, budgets["copy"][kind][0])
            for seed in s["seeds"]
        ]
    for kind in s["digits_cells"]:
        out += [("digits", 64, kind, seed, budgets["digits"][kind][0]) for seed in s["seeds"]]
    out += [("sunspots", None, None, seed, None) for seed in s["seeds"]]
    for kind in s["char_cells"]:
        out += [("char", None, kind, seed, s["char_hidden"]) for seed in s["seeds"]]
    return out


def parse_only(selectors: list[str] | None) -> list[tuple[str, int | None, str | None]] | None:
    """Parse ``--only`` selectors ``TASK[:T][:CELL]`` (e.g. ``adding:200``, ``adding:200:lstm``,
    ``copy:gru``, ``char``) into ``(task, T, cell)`` with ``None`` for "any". Raises
    ``ValueError`` naming the bad selector."""
    if not selectors:
        return None
    out = []
    for sel in selectors:
        parts = sel.split(":")
        task, T, cell = parts[0], None, None
        if task not in TASKS:
            raise ValueError(f"--only {sel!r}: the task must be one of {TASKS}, got {task!r}.")
        for p in parts[1:]:
            if p.isdigit() and T is None:
                T = int(p)
            elif p in CELLS and cell is None:
                cell = p
            else:
                raise ValueError(
                    f"--only {sel!r}: expected TASK[:T][:CELL] with T an integer and CELL one of {CELLS}, "
                    f"got {p!r}."
                )
        out.append((task, T, cell))
    return out


def _selected(job, only) -> bool:
    task, T, cell = job[:3]
    return only is None or any(
        t == task and (oT is None or oT == T) and (oc is None or oc == cell) for t, oT, oc in only
    )


def _cost(job, s) -> float:
    """A rough relative cost of a job (training steps × sequence length × width), used only to
    hand the longest jobs out first when several workers run."""
    task, T, _, _, H = job
    if task == "adding":
        return s["steps"] * T * H
    if task == "copy":
        return s["copy_steps"] * T * H
    if task == "digits":
        return s["digits_steps"] * T * H
    if task == "char":
        return s["char_steps"] * 64 * 2 * H
    return s["sunspot_steps"] * 40 * 8 * len(s["sunspot_models"])


def _run_job(job, s, log=None) -> tuple[list[dict], str | None]:
    """Run one job; returns ``(rows, skipped_message)``."""
    log = log or (lambda m: print(m, flush=True))
    task, _, kind, seed, H = job
    try:
        if task == "adding":
            return [_adding_run(kind, job[1], seed, s, H, log)], None
        if task == "copy":
            return [_copy_run(kind, seed, s, H, log)], None
        if task == "digits":
            return [_digits_run(kind, seed, s, H, log)], None
        if task == "sunspots":
            return _sunspot_rows(seed, s, log), None
        return [_char_run(kind, seed, s, log)], None
    except ImportError as e:  # scikit-learn / statsmodels missing: the row is skipped, the suite goes on
        return [], f"{task}: {e}"


def _pin_worker(cores) -> None:
    """Pool initializer: pin this worker process to one core of its own."""
    core = cores.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


def run(
    mode: str = "quick",
    *,
    log: Callable[[str], None] = print,
    jobs: int = 1,
    only: list[str] | None = None,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Run the task suite and return its result dict (see module docstring).

    Args:
      mode: ``"tiny"``, ``"quick"`` or ``"full"``.
      log: progress lines.
      jobs: worker processes. ``1`` runs every job here, one after the other; ``N > 1`` runs
        them in ``N`` spawned processes, each pinned to one core of its own (``N`` at most the
        cores this process may use), longest jobs first. The ``wall s`` columns are then each
        row's time on one core while the other workers ran.
      only: selectors ``TASK[:T][:CELL]`` (see ``parse_only``); ``None`` runs every job.
      checkpoint: called with the result so far (``result["partial"]`` says how many jobs are
        done) after every finished job, so that a long run that is stopped keeps what it did.
    """
    s = settings(mode)
    sel = parse_only(only)
    ncores = common.cpu_count()
    if not 1 <= jobs <= ncores:
        raise ValueError(f"jobs must be between 1 and the {ncores} cores this process may use, got {jobs}.")
    result = common.new_result("tasks", mode)
    result["settings"] = s
    result["jobs"] = jobs
    result["only"] = list(only) if only else None
    missing = [m for m in ("seqjax.tasks", "seqjax.train") if common.optional_import(m) is None]
    if missing:
        result["skipped"].append(f"{', '.join(missing)} missing in this checkout: the task suite needs them")
        return result
    if common.optional_import("seqjax.spectrum") is None:
        result["skipped"].append("seqjax.spectrum missing: no rho(J) / lambda_max columns")
    result["notes"].append(
        f"Same step budget: {s['steps']} Adam steps (lr {s['lr']:g}, global-norm clipping at 1), "
        f"batch {s['batch']}, for every cell; same parameter budget: each cell's hidden size gives the "
        "parameter count closest to "
        f"the LSTM's at H={s['H_ref']} (readout included). Seeds {s['seeds']}. LSTM forget-gate bias "
        f"{LSTM_FORGET_BIAS:g} at initialisation (see benchmarks/tasks.py for the calibration behind it)."
    )
    result["notes"].append(
        "Jacobian story on test sequences after training: rho(W_h) spectral radius of the recurrent matrix "
        "(Elman cells); rho(J) mean spectral radius of the step Jacobians; lambda_max largest Lyapunov "
        "exponent (per step); log10 ||dL/ds_1|| / ||dL/ds_T||, the gradient that reaches the first step "
        "relative to the last."
    )
    if jobs > 1:
        result["notes"].append(
            f"Jobs ran in {jobs} worker processes, each pinned to one core of its own: a row's wall time "
            "is its time on one core while the other workers ran."
        )
    if sel is not None:
        result["notes"].append(f"Only the jobs selected by {', '.join(only)} were run.")
    # parameter budgets
    budgets = {}
    for task, (I, O) in {
        "adding": (2, 1),
        "copy": (s["copy"]["num_symbols"] + 2,) * 2,
        "digits": (1, 10),
    }.items():
        ref = _n_params(task_model(make_cell("lstm", s["H_ref"]), O), I)
        budgets[task] = {k: hidden_for_budget(k, I, O, ref) for k in CELLS}
        budgets[task]["budget"] = ref
    result["budgets"] = {
        t: {k: (v if k == "budget" else {"H": v[0], "params": v[1]}) for k, v in b.items()}
        for t, b in budgets.items()
    }

    todo = [j for j in _jobs(s, budgets) if _selected(j, sel)]
    if sel is not None and not todo:
        raise ValueError(f"--only {only}: no job of the {mode} mode matches.")
    done: dict[int, list[dict]] = {}

    def finish(i, rows, skipped):
        done[i] = rows
        if skipped and skipped not in result["skipped"]:
            result["skipped"].append(skipped)
        ordered = [r for k in sorted(done) for r in done[k]]
        result["rows"] = [r for r in ordered if r["task"] in ("adding", "copy")]
        result["real_rows"] = [r for r in ordered if r["task"] not in ("adding", "copy")]
        result["partial"] = None if len(done) == len(todo) else f"{len(done)} of {len(todo)} jobs done"
        if checkpoint is not None and result["partial"]:
            checkpoint(dict(result, skipped=list(result["skipped"])))

    result["real_rows"] = []
    if jobs == 1:
        for i, job in enumerate(todo):
            finish(i, *_run_job(job, s, log))
        return result

    import concurrent.futures as cf
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # JAX is not fork-safe
    cores = ctx.Queue()
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(jobs)
    for c in list(allowed)[:jobs]:
        cores.put(c)
    order = sorted(range(len(todo)), key=lambda i: -_cost(todo[i], s))
    log(f"  {len(todo)} jobs in {jobs} worker processes, longest first")
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_pin_worker, initargs=(cores,)) as pool:
        futures = {pool.submit(_run_job, todo[i], s): i for i in order}
        for f in cf.as_completed(futures):
            finish(futures[f], *f.result())
    return result


def _group(rows, keys):
    out: dict[tuple, list] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


#: Metrics every finished run has: a missing value (``None``, which is how the strict JSON
#: stores inf / nan) means the run diverged, and the table says so instead of hiding the seed.
_ALWAYS = ("test_mse", "test_ce", "accuracy", "value")


def _diverged(v) -> bool:
    return v is None or not math.isfinite(v)


def _ms(rows, key, digits=3):
    if key in _ALWAYS:
        bad = sum(_diverged(r.get(key)) for r in rows)
        vals = [r[key] for r in rows if not _diverged(r.get(key))]
        if bad:
            head = report.fmt_mean_std(vals, digits) + "; " if vals else ""
            return f"{head}diverged ({bad}/{len(rows)})"
        return report.fmt_mean_std(vals, digits)
    vals = [r.get(key) for r in rows if r.get(key) is not None]
    if key == "log10_grad_ratio":
        notes = []
        n = sum(bool(r.get("grad_underflow")) for r in rows)
        if n:
            notes.append(f"underflow to 0 ({n}/{len(rows)})")
        n = sum(any(_diverged(g) for g in r.get("grad_norms_first_last", [0.0])) for r in rows)
        if n:
            notes.append(f"non-finite ({n}/{len(rows)})")
        if notes:
            return (report.fmt_mean_std(vals, digits) + "; " if vals else "") + "; ".join(notes)
    return report.fmt_mean_std(vals, digits)


def _wall(rows) -> str:
    """Wall seconds, mean ± std over seeds, to the second."""
    a = np.asarray([r["wall_s"] for r in rows], dtype=np.float64)
    return f"{a.mean():.0f}" + (f" ± {a.std(ddof=1):.0f}" if a.size > 1 else "")


def to_markdown(result: dict) -> str:
    """Synthetic-task table (with the Jacobian story) and the real-data table."""
    rows = result["rows"]
    if not rows:
        return "No task rows (see Skipped)."
    s = result["settings"]
    n_seeds = len(s["seeds"])
    agg = "mean ± std over seeds" if n_seeds > 1 else "one seed"
    out = [f"Values: {agg}. Steps: {s['steps']} (adding), {s['copy_steps']} (copy); batch {s['batch']}.", ""]
    out += ["## Adding problem (test MSE; trivial predictor 1/6 ≈ 0.167)", ""]
    table = []
    for (T, kind), rs in _group([r for r in rows if r["task"] == "adding"], ("T", "cell")).items():
        hits = [r["steps_to_0.01"] for r in rs]
        hit = (
            "never" if all(h is None for h in hits) else ", ".join("–" if h is None else str(h) for h in hits)
        )
        table.append(
            [
                T,
                LABELS[kind],
                rs[0]["H"],
                _ms(rs, "test_mse"),
                hit,
                _wall(rs),
                _ms(rs, "rho_Wh"),
                _ms(rs, "rho_J_mean"),
                _ms(rs, "lambda_max"),
                _ms(rs, "log10_grad_ratio"),
            ]
        )
    out.append(
        report.markdown_table(
            [
                "T",
                "cell",
                "H",
                "test MSE",
                "step MSE<0.01",
                "wall s",
                "ρ(W_h)",
                "ρ(J) mean",
                "λ_max",
                "log10 ‖∂L/∂s_1‖/‖∂L/∂s_T‖",
            ],
            table,
        )
    )
    c = s["copy"]
    out += [
        "",
        f"## Copy task (L={c['length']} symbols of K={c['num_symbols']}, delay {c['delay']}; "
        f"accuracy on recalled symbols, memoryless 1/K = {1 / c['num_symbols']:.3f})",
        "",
    ]
    table = []
    for (kind,), rs in _group([r for r in rows if r["task"] == "copy"], ("cell",)).items():
        table.append(
            [
                LABELS[kind],
                rs[0]["H"],
                _ms(rs, "accuracy"),
                _ms(rs, "test_ce"),
                report.fmt_num(rs[0]["baseline_ce"]),
                _wall(rs),
                _ms(rs, "rho_Wh"),
                _ms(rs, "rho_J_mean"),
                _ms(rs, "lambda_max"),
                _ms(rs, "log10_grad_ratio"),
            ]
        )
    out.append(
        report.markdown_table(
            [
                "cell",
                "H",
                "recall accuracy",
                "CE (nats/step)",
                "memoryless CE",
                "wall s",
                "ρ(W_h)",
                "ρ(J) mean",
                "λ_max",
                "log10 grad ratio",
            ],
            table,
        )
    )
    real = result.get("real_rows", [])
    if real:
        out += ["", "## Real data", ""]
        table = []
        for (task, kind), rs in _group(real, ("task", "cell")).items():
            table.append(
                [
                    task,
                    LABELS.get(kind, kind),
                    rs[0].get("H", "–"),
                    rs[0]["metric"],
                    _ms(rs, "value"),
                    f"{rs[0]['baseline_name']} {report.fmt_num(rs[0]['baseline'])}",
                    _wall(rs),
                ]
            )
        out.append(
            report.markdown_table(["task", "model", "H", "metric", "value", "baseline", "wall s"], table)
        )
        samples = {}  # one per cell: its first seed's
        for r in real:
            if r.get("sample"):
                samples.setdefault(r["cell"], r)
        if samples:
            out += ["", "Samples from the character models (prompt `def `, temperature 0.8, first seed):", ""]
            for cell, r in samples.items():
                out += [f"{LABELS.get(cell, cell)} (seed {r['seed']}):", "", "```", r["sample"], "```", ""]
    return "\n".join(out)


def plot(result: dict, out_dir: str) -> list[str]:
    """Test MSE against training step on the adding problem, one panel per T."""
    plt = report.pyplot()
    if plt is None:
        return []
    rows = [r for r in result["rows"] if r["task"] == "adding"]
    Ts = sorted({r["T"] for r in rows})
    if not Ts:
        return []
    fig, axes = plt.subplots(1, len(Ts), figsize=(4 * len(Ts), 3.5), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for kind in CELLS:
            for i, r in enumerate(r for r in rows if r["T"] == T and r["cell"] == kind):
                pts = [(st, v) for st, v in r["curve"] if v is not None]
                if pts:
                    ax.plot(
                        *zip(*pts),
                        color=f"C{CELLS.index(kind)}",
                        alpha=0.8,
                        label=LABELS[kind] if i == 0 else None,
                    )
        ax.axhline(1 / 6, color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"adding, T={T}")
        ax.set_xlabel("step")
        ax.set_ylabel("test MSE")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = f"{out_dir}/tasks_adding.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
