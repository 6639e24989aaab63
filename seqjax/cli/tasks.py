"""The built-in tasks of ``seqjax train``: for each, its options, its data, its loss and the
baselines its scores are compared with.

| task | data (``seqjax.tasks``) | model output | loss | baselines |
|---|---|---|---|---|
| ``adding`` | ``adding_problem`` | a number per sequence | MSE | always answering 1 (1/6) |
| ``copy`` | ``copy_task`` | a class per step | cross-entropy | best memoryless; guessing |
| ``digits`` | ``digits`` | a class per sequence | cross-entropy | class prior; majority class |
| ``sunspots`` | ``sunspots`` | next year, per step | MSE | AR(p); persistence |
| ``char`` | ``char_corpus`` | next character, per step | bits per char | unigram frequencies |

A task is a ``Task``: ``configure`` turns the command line's sequence length and task
options into the run's configuration (checking them: a bad value is a ``CLIError`` that
names the option), ``load`` makes the training and evaluation data and the baselines from
a configuration, ``loss`` is the loss of a batch (with metrics), ``encode`` turns a batch's
inputs into the model's (one-hot characters for ``char``), and ``probe`` draws inputs for
``seqjax spectrum``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax import losses
from seqjax import tasks as T_
from seqjax._util import positive_int
from seqjax.cli.errors import CLIError

__all__ = [
    "TaskOption",
    "Baseline",
    "TaskData",
    "Task",
    "TASKS",
    "EVAL_SIZE",
    "copy_sizes",
    "option_owner",
    "fmt_value",
    "positive_arg",
    "positive_float_arg",
]


EVAL_SIZE = 512
"""Held-out sequences of the synthetic tasks (adding, copy); the data-set tasks evaluate on
their whole test split."""


class TaskOption(NamedTuple):
    """One option of a task: ``flag`` on the command line, ``key`` in ``config.json``,
    ``type`` (an argparse type), ``default`` (``None``: derived, see ``help``), ``help``."""

    flag: str
    key: str
    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple | None = None
    metavar: str | None = None


class Baseline(NamedTuple):
    """A score that needs no training: ``metric`` (a key of ``fit``'s evaluation rows, e.g.
    ``eval_loss``), its ``value`` on the same held-out data, and what it is (``name``);
    ``higher_is_better`` for accuracies."""

    metric: str
    value: float
    name: str
    higher_is_better: bool = False


class TaskData(NamedTuple):
    """A task's data for one run: ``train`` (a function ``key -> batch``, or arrays with
    ``n_train`` examples), ``test`` (the evaluation arrays) and its ``baselines``."""

    train: Any
    test: tuple
    baselines: list[Baseline]
    n_train: int | None = None


class Task(NamedTuple):
    """A built-in task (see the module docstring)."""

    name: str
    summary: str
    default_T: int | None
    options: tuple[TaskOption, ...]
    configure: Callable[[int | None, dict], dict]
    load: Callable[[dict, jax.Array], TaskData]
    loss: Callable[[dict, jax.Array, tuple], tuple[jax.Array, dict]]
    probe: Callable[[dict, jax.Array, int, int], tuple[Any, Any]]
    encode: Callable[[dict, Any], Any] = lambda config, xs: xs


def positive_arg(s: str) -> int:
    """An argparse ``type``: ``s`` as a positive integer."""
    try:
        return positive_int(int(s), "value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None


def positive_float_arg(s: str) -> float:
    """An argparse ``type``: ``s`` as a positive finite float."""
    try:
        v = float(s)
    except ValueError:
        v = float("nan")
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _positive(value: int, flag: str, *, at_least: int = 1, why: str = "") -> int:
    if value < at_least:
        raise CLIError(f"{flag} must be at least {at_least}{why}, got {value}.")
    return value


def _needs(extra_module: str, task: str) -> CLIError:
    return CLIError(
        f"the {task} task needs {extra_module}, which is not installed: pip install 'seqjax[tasks]'."
    )


# --------------------------------------------------------------------------- adding


def _adding_configure(T: int | None, opts: dict) -> dict:
    T = 50 if T is None else _positive(T, "--T", at_least=2, why=" for adding (one marker per half)")
    return {"T": T, "input_size": 2, "output_size": 1, "loss": "mse", "per_step": False}


def _adding_batch(key, batch: int, T: int):
    """``seqjax.tasks.adding_problem`` with targets ``(B, 1)`` (one output per sequence)."""
    xs, ys = T_.adding_problem(key, batch, T)
    return xs, np.reshape(ys, (batch, 1))


def _adding_load(config: dict, key: jax.Array) -> TaskData:
    T, batch = int(config["T"]), int(config["batch"])
    return TaskData(
        lambda k: _adding_batch(k, batch, T),
        _adding_batch(key, EVAL_SIZE, T),
        [Baseline("eval_loss", T_.ADDING_BASELINE_MSE, "always answering 1")],
    )


def _mse_loss(config: dict, out, batch):
    return losses.mse(out, batch[1]), {}


ADDING = Task(
    "adding",
    "adding problem: the sum of two marked values (MSE; always answering 1 scores 0.167)",
    50,
    (),
    _adding_configure,
    _adding_load,
    _mse_loss,
    lambda config, key, n, T: _adding_batch(key, n, T),
)


# --------------------------------------------------------------------------- copy


def copy_sizes(config: dict, T: int | None = None) -> tuple[int, int, int]:
    """``(L, D, K)`` of a copy run; a run directory written before the copy options existed
    holds only ``T`` (then ``L = min(10, T // 4)``, ``D = T - 2L``, ``K = 8``). With ``T``
    different from the run's (``seqjax spectrum --T``), the delay takes up the difference."""
    K = int(config.get("symbols", 8))
    if "length" in config:
        L, D = int(config["length"]), int(config["delay"])
    else:
        L = max(1, min(10, int(config["T"]) // 4))
        D = int(config["T"]) - 2 * L
    if T is not None and T != D + 2 * L:
        D = T - 2 * L
        if D < 1:
            raise CLIError(
                f"--T {T} is too short for this copy run: it needs more than 2 x length = {2 * L}."
            )
    return L, D, K


def _copy_configure(T: int | None, opts: dict) -> dict:
    L, D, K = opts.get("length"), opts.get("delay"), opts.get("symbols")
    K = (
        8
        if K is None
        else _positive(K, "--symbols", at_least=2, why=" (one symbol leaves nothing to recall)")
    )
    if L is not None and D is not None:
        if T is not None and T != D + 2 * L:
            raise CLIError(
                f"--T {T} does not match --length {L} and --delay {D}: T = delay + 2 x length = "
                f"{D + 2 * L}. Give two of the three."
            )
    elif L is not None:
        T = 40 if T is None else T
        D = T - 2 * L
        if D < 1:
            raise CLIError(f"--length {L} needs T > 2 x length = {2 * L}, got --T {T}.")
    elif D is not None:
        if T is None:
            L = 10
        elif (T - D) % 2 or T - D < 2:
            raise CLIError(
                f"--T {T} and --delay {D} leave T - delay = {T - D} steps, which must be 2 x length "
                "(a positive even number)."
            )
        else:
            L = (T - D) // 2
    else:
        T = 40 if T is None else T
        L = max(1, min(10, T // 4))
        D = T - 2 * L
        if D < 1:
            raise CLIError(f"--T {T} is too short for the copy task: it needs T >= 3.")
    assert L is not None and D is not None
    return {
        "T": D + 2 * L,
        "length": L,
        "delay": D,
        "symbols": K,
        "input_size": K + 2,
        "output_size": K + 1,
        "loss": "xent",
        "per_step": True,
    }


def _copy_load(config: dict, key: jax.Array) -> TaskData:
    L, D, K = copy_sizes(config)
    batch = int(config["batch"])
    return TaskData(
        lambda k: T_.copy_task(k, batch, length=L, delay=D, num_symbols=K),
        T_.copy_task(key, EVAL_SIZE, length=L, delay=D, num_symbols=K),
        [
            Baseline("eval_loss", T_.copy_task_baseline(L, D, K), "the best memoryless predictor"),
            Baseline("eval_recall_accuracy", 1.0 / K, "guessing", higher_is_better=True),
        ],
    )


def _copy_loss(config: dict, out, batch):
    ys = batch[1]
    L = copy_sizes(config)[0]
    acc = losses.accuracy(out[:, -L:], ys[:, -L:])
    return losses.softmax_cross_entropy(out, ys), {"recall_accuracy": acc}


def _copy_probe(config: dict, key, n: int, T: int):
    L, D, K = copy_sizes(config, T)
    return T_.copy_task(key, n, length=L, delay=D, num_symbols=K)


COPY = Task(
    "copy",
    "copy task: recall L symbols of K after a delay D, T = D + 2L (cross-entropy per step)",
    40,
    (
        TaskOption(
            "--length",
            "length",
            positive_arg,
            None,
            "L, symbols to recall (default min(10, T // 4))",
            metavar="L",
        ),
        TaskOption(
            "--delay",
            "delay",
            positive_arg,
            None,
            "D, steps between the symbols and the recall (default T - 2L)",
            metavar="D",
        ),
        TaskOption("--symbols", "symbols", positive_arg, 8, "K, distinct symbols (default 8)", metavar="K"),
    ),
    _copy_configure,
    _copy_load,
    _copy_loss,
    _copy_probe,
)


# --------------------------------------------------------------------------- digits

_DIGITS_T = {"rows": (8, 8), "pixels": (64, 1)}  # mode -> (T, input size)


def _digits_split(config: dict) -> T_.Split:
    try:
        return T_.digits(mode=config["mode"], test_fraction=float(config["test_fraction"]), seed=0)
    except ImportError:
        raise _needs("scikit-learn", "digits") from None


def _digits_configure(T: int | None, opts: dict) -> dict:
    mode = opts.get("mode") or "rows"
    frac = opts.get("test_fraction")
    frac = 0.25 if frac is None else frac
    if not 0.0 < frac < 1.0:
        raise CLIError(f"--test-fraction must lie strictly between 0 and 1, got {frac}.")
    T_mode, I = _DIGITS_T[mode]
    if T is not None and T != T_mode:
        raise CLIError(
            f"--T {T} does not apply to digits: the sequence length is set by --mode "
            f"(rows: 8 steps of 8 pixels, pixels: 64 steps of 1); --mode {mode} has T = {T_mode}."
        )
    return {
        "T": T_mode,
        "mode": mode,
        "test_fraction": frac,
        "input_size": I,
        "output_size": 10,
        "loss": "xent",
        "per_step": False,
    }


def _digits_load(config: dict, key: jax.Array) -> TaskData:
    d = _digits_split(config)
    counts = np.bincount(d.y_train, minlength=10).astype(np.float64)
    prior = counts / counts.sum()
    majority = float(np.mean(d.y_test == np.argmax(counts)))
    prior_xent = float(-np.mean(np.log(np.maximum(prior[d.y_test], 1e-300))))
    return TaskData(
        (d.x_train, d.y_train),
        (d.x_test, d.y_test),
        [
            Baseline("eval_loss", prior_xent, "the training class frequencies"),
            Baseline("eval_accuracy", majority, "the majority class", higher_is_better=True),
        ],
        n_train=len(d.y_train),
    )


def _xent_loss(config: dict, out, batch):
    ys = batch[1]
    return losses.softmax_cross_entropy(out, ys), {"accuracy": losses.accuracy(out, ys)}


def _digits_probe(config: dict, key, n: int, T: int):
    if T != int(config["T"]):
        raise CLIError(f"--T {T} does not apply to a digits run: its images are {config['T']} steps long.")
    d = _digits_split(config)
    idx = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist()).choice(
        len(d.y_test), size=min(n, len(d.y_test)), replace=False
    )
    return d.x_test[idx], d.y_test[idx]


DIGITS = Task(
    "digits",
    "scikit-learn digits as sequences, 10 classes (cross-entropy, accuracy against the majority "
    "class; needs seqjax[tasks]). T is 8 (--mode rows) or 64 (--mode pixels)",
    None,
    (
        TaskOption(
            "--mode",
            "mode",
            str,
            "rows",
            "rows: 8 steps of 8 pixels; pixels: 64 steps of 1 (default rows)",
            ("rows", "pixels"),
        ),
        TaskOption(
            "--test-fraction",
            "test_fraction",
            float,
            0.25,
            "held-out share of the images (default 0.25)",
            metavar="F",
        ),
    ),
    _digits_configure,
    _digits_load,
    _xent_loss,
    _digits_probe,
)


# --------------------------------------------------------------------------- sunspots


def _sunspot_series(config: dict) -> T_.SeriesData:
    try:
        return T_.sunspots(train_end=int(config["train_end"]), test_end=int(config["test_end"]))
    except ImportError:
        raise _needs("statsmodels", "sunspots") from None
    except ValueError as e:
        raise CLIError(f"--train-end/--test-end: {e}") from None


def _sunspots_configure(T: int | None, opts: dict) -> dict:
    cfg = {
        "train_end": 1920 if opts.get("train_end") is None else opts["train_end"],
        "test_end": 1955 if opts.get("test_end") is None else opts["test_end"],
        "ar_order": 9 if opts.get("ar_order") is None else opts["ar_order"],
    }
    _positive(cfg["ar_order"], "--ar-order")
    d = _sunspot_series(cfg)
    T = 40 if T is None else _positive(T, "--T", at_least=2, why=" for sunspots")
    if T >= d.n_train:
        raise CLIError(
            f"--T {T} leaves no training window: the training years {d.years[0]}-{cfg['train_end']} are "
            f"{d.n_train} values; pass --T {d.n_train - 1} or less."
        )
    if 2 * cfg["ar_order"] >= d.n_train:
        raise CLIError(f"--ar-order {cfg['ar_order']} is too large for {d.n_train} training years.")
    return {**cfg, "T": T, "input_size": 1, "output_size": 1, "loss": "mse", "per_step": True}


def _sunspot_windows(config: dict):
    """Training windows ``(xs, ys, w)`` and one test window per held-out year."""
    d = _sunspot_series(config)
    x = d.values
    T, p = int(config["T"]), int(config["ar_order"])
    warm = min(p, T - 1)  # like AR(p), the network is scored where it has seen p past years
    starts = np.arange(d.n_train - T)
    xs = np.stack([x[s : s + T] for s in starts])[..., None]
    ys = np.stack([x[s + 1 : s + T + 1] for s in starts])[..., None]
    w = np.broadcast_to((np.arange(T) >= warm).astype(np.float32), (len(starts), T)).copy()
    years = np.arange(d.n_train, d.n_test_end)  # index t: predict x[t] from x[t-T .. t-1]
    xt = np.stack([x[t - T : t] for t in years])[..., None]
    yt = np.stack([x[t - T + 1 : t + 1] for t in years])[..., None]
    wt = np.zeros((len(years), T), np.float32)
    wt[:, -1] = 1.0  # only the prediction of the held-out year counts
    return d, (xs, ys, w), (xt, yt, wt)


def _sunspots_load(config: dict, key: jax.Array) -> TaskData:
    d, train, test = _sunspot_windows(config)
    x = d.values.astype(np.float64)
    p = int(config["ar_order"])
    coef = T_.ar_fit(x[: d.n_train], p)
    pred = T_.ar_predict(coef, x[: d.n_test_end])  # pred[i] predicts x[i + p]
    target = x[d.n_train : d.n_test_end]
    ar_mse = float(np.mean((pred[d.n_train - p :] - target) ** 2))
    persistence = float(np.mean((x[d.n_train - 1 : d.n_test_end - 1] - target) ** 2))
    return TaskData(
        train,
        test,
        [
            Baseline("eval_loss", ar_mse, f"AR({p}) by least squares (seqjax.tasks.ar_fit)"),
            Baseline("eval_loss", persistence, "persistence (next year = this year)"),
        ],
        n_train=len(train[0]),
    )


def _masked_mse(config: dict, out, batch):
    return losses.mse(out, batch[1], mask=batch[2]), {}


def _sunspots_probe(config: dict, key, n: int, T: int):
    d = _sunspot_series(config)
    x = d.values
    if T >= d.n_test_end:
        raise CLIError(f"--T {T} is longer than the series ({d.n_test_end} years up to the test end).")
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    starts = rng.integers(0, d.n_test_end - T, n)
    return np.stack([x[s : s + T] for s in starts])[..., None], None


SUNSPOTS = Task(
    "sunspots",
    "yearly sunspot numbers: predict next year, scored one step ahead on held-out years "
    "against AR(p) (MSE; needs seqjax[tasks]); T is the training window",
    40,
    (
        TaskOption(
            "--train-end", "train_end", int, 1920, "last training year (default 1920)", metavar="YEAR"
        ),
        TaskOption("--test-end", "test_end", int, 1955, "last held-out year (default 1955)", metavar="YEAR"),
        TaskOption(
            "--ar-order",
            "ar_order",
            positive_arg,
            9,
            "p of the AR(p) baseline, and the loss's warm-up steps (default 9)",
            metavar="P",
        ),
    ),
    _sunspots_configure,
    _sunspots_load,
    _masked_mse,
    _sunspots_probe,
)


# --------------------------------------------------------------------------- char


def _corpus(config: dict) -> T_.CharCorpus:
    try:
        return T_.char_corpus(modules=list(config["modules"]))
    except ValueError as e:
        raise CLIError(f"--modules: {e}") from None


def _modules(s: str) -> list[str]:
    """An argparse type: a comma-separated list of module names."""
    return [m.strip() for m in s.split(",") if m.strip()]


def _char_configure(T: int | None, opts: dict) -> dict:
    modules = list(T_.STDLIB_MODULES) if not opts.get("modules") else list(opts["modules"])
    T = 64 if T is None else T
    c = _corpus({"modules": modules})
    if (len(c.valid) - 1) // T < 1:
        raise CLIError(
            f"--T {T} is longer than the validation text ({len(c.valid)} characters of --modules "
            f"{','.join(modules)}); pass a shorter --T or more modules."
        )
    V = len(c.vocab)
    return {
        "T": T,
        "modules": modules,
        "vocab": c.vocab,
        "source": c.source,
        "input_size": V,
        "output_size": V,
        "loss": "bits",
        "per_step": True,
    }


def _char_load(config: dict, key: jax.Array) -> TaskData:
    c = _corpus(config)
    if c.vocab != config.get("vocab", c.vocab):
        raise CLIError(
            f"the text of --modules {','.join(config['modules'])} has changed since the run was made "
            f"({config.get('source')}; now {c.source}): its characters differ, so the model's "
            "inputs would mean other characters. Start a new run."
        )
    T = int(config["T"])
    train = T_.char_windows(c.train, T)
    return TaskData(
        train,
        T_.char_windows(c.valid, T),
        [
            Baseline(
                "eval_loss",
                T_.unigram_bits_per_char(c.train, c.valid, len(c.vocab)),
                "the unigram (character frequency) model",
            )
        ],
        n_train=len(train[0]),
    )


def _char_loss(config: dict, out, batch):
    return T_.bits_per_char(out, batch[1]), {}


def _char_encode(config: dict, xs):
    return jax.nn.one_hot(xs, int(config["input_size"]), dtype=jnp.float32)


def _char_probe(config: dict, key, n: int, T: int):
    c = _corpus(config)
    xs, _ = T_.char_windows(c.valid, T)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    idx = rng.choice(len(xs), size=min(n, len(xs)), replace=False)
    return np.asarray(_char_encode(config, xs[idx])), None


CHAR = Task(
    "char",
    "character language model on Python standard-library source: next character "
    "(bits per char against the unigram model); T is the window of characters",
    64,
    (
        TaskOption(
            "--modules",
            "modules",
            _modules,
            None,
            f"comma-separated standard-library modules whose source is the text "
            f"(default {','.join(T_.STDLIB_MODULES)})",
            metavar="M1,M2,...",
        ),
    ),
    _char_configure,
    _char_load,
    _char_loss,
    _char_probe,
    _char_encode,
)


TASKS: dict[str, Task] = {t.name: t for t in (ADDING, COPY, DIGITS, SUNSPOTS, CHAR)}
"""The built-in tasks by name, in the order ``seqjax train --help`` lists them."""


def option_owner() -> dict[str, Task]:
    """Config key of a task option -> its task."""
    return {o.key: t for t in TASKS.values() for o in t.options}


def fmt_value(v: Any) -> str:
    """A value as the command line writes it (lists comma-separated, floats as ``repr``)."""
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return repr(v) if isinstance(v, float) else str(v)
