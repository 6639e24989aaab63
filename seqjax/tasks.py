"""Benchmark tasks: synthetic long-range problems and small real data sets, all offline.

Every task is a function with a documented generator and an explicit seed or key:

| task | data | memoryless baseline |
| --- | --- | --- |
| ``adding_problem`` | ``xs (n, T, 2) f32``, ``ys (n,) f32`` | MSE ``1/6`` (always say 1) |
| ``copy_task`` | ``xs (n, D+2L, K+2) f32``, ``ys (n, D+2L) i32`` | CE ``L ln K / (D+2L)`` |
| ``digits`` | scikit-learn digits, 8 rows or 64 pixels | majority class accuracy |
| ``sunspots`` | statsmodels yearly sunspots 1700-2008 | persistence, AR(p) |
| ``char_corpus`` | Python standard-library sources | unigram bits per char |

``digits`` needs scikit-learn and ``sunspots`` statsmodels (the ``tasks`` extra). This
module holds data and the baselines that need no training (``ar_fit``/``ar_predict``,
``unigram_bits_per_char``); models trained on the tasks and their comparisons live in the
benchmark suite (``benchmarks/tasks.py``) and the examples.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqjax._util import positive_int

__all__ = [
    "ADDING_BASELINE_MSE",
    "adding_problem",
    "copy_task",
    "copy_task_baseline",
    "Split",
    "digits",
    "SeriesData",
    "sunspots",
    "ar_fit",
    "ar_predict",
    "CharCorpus",
    "STDLIB_MODULES",
    "stdlib_text",
    "char_corpus",
    "char_windows",
    "bits_per_char",
    "unigram_bits_per_char",
]

ADDING_BASELINE_MSE = 1.0 / 6.0
"""MSE of always predicting 1 on the adding problem: ``Var(u_a + u_b) = 2/12``."""


# --------------------------------------------------------------------------- adding problem


def _rng(key) -> np.random.Generator:
    """NumPy PCG64 generator seeded from a JAX key (its raw ``key_data``) or an int seed."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return np.random.default_rng(int(key))
    k = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if jnp.issubdtype(k.dtype, jax.dtypes.prng_key):
        k = jax.random.key_data(k)
    if k.dtype != jnp.uint32:
        raise ValueError(f"key must be a jax.random.key or an int seed, got dtype {k.dtype}.")
    return np.random.default_rng(np.asarray(k).ravel().tolist())


def _adding(key, n, length):
    rng = _rng(key)
    values = rng.random((n, length), dtype=np.float32)
    first = rng.integers(0, length // 2, n)
    second = rng.integers(length // 2, length, n)
    rows = np.arange(n)
    markers = np.zeros((n, length), np.float32)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return np.stack([values, markers], axis=-1), values[rows, first] + values[rows, second]


def adding_problem(key: jax.Array, n: int, length: int) -> tuple[jax.Array, jax.Array]:
    r"""The adding problem (Hochreiter & Schmidhuber 1997; the variant of Le et al. 2015).

    Each of ``n`` sequences has ``T = length`` steps with two features: a value
    ``u_t ~ U[0, 1]`` and a marker. Exactly two steps are marked, one uniformly in the first
    half ``[0, T//2)`` and one uniformly in the second half ``[T//2, T)``; the target is the
    sum of the two marked values, $y = u_a + u_b \in [0, 2]$.

    Baseline: always predicting 1 (the mean) scores $E[(u_a + u_b - 1)^2] =
    \mathrm{Var}(u_a + u_b) = 2 \cdot 1/12 = 1/6$ (``ADDING_BASELINE_MSE``).

    Generator: NumPy's PCG64 seeded with the key's raw data (``jax.random.key_data``) or an
    int seed: the same key gives the same data everywhere, and nothing is compiled (a
    threefry ``jax.random`` kernel costs seconds of XLA compile per new shape on CPU).

    Args:
      key: a ``jax.random.key`` or an int seed.
      n: number of sequences.
      length: ``T >= 2``.

    Returns:
      NumPy arrays ``xs: (n, T, 2)`` float32 (``[..., 0]`` values, ``[..., 1]`` markers) and
      ``ys: (n,)`` float32.

    Examples:
      As a synthetic data source of ``fit``, a function ``key -> batch``:
      ``fit(loss, opt, params, functools.partial(adding_problem, n=64, length=50), key=key, steps=500)``.

      >>> import numpy as np
      >>> from seqjax.tasks import adding_problem
      >>> xs, ys = adding_problem(0, n=4, length=10)
      >>> print(xs.shape, xs.dtype, ys.shape)
      (4, 10, 2) float32 (4,)
      >>> xs[..., 1].sum(axis=1).tolist()                # two marked steps per sequence
      [2.0, 2.0, 2.0, 2.0]
      >>> bool(np.allclose(ys, (xs[..., 0] * xs[..., 1]).sum(axis=1)))
      True
    """
    n = positive_int(n, "n")
    length = positive_int(length, "length")
    if length < 2:
        raise ValueError(f"length must be at least 2 (one marker per half), got {length}.")
    return _adding(key, n, length)


# --------------------------------------------------------------------------- copy task


def copy_task_baseline(length: int, delay: int, num_symbols: int) -> float:
    r"""Cross-entropy (nats per step, over all ``D + 2L`` steps) of the best memoryless predictor.

    A predictor that sees only the position outputs "blank" with certainty for the first
    ``D + L`` steps and the uniform distribution over the ``K`` symbols for the last ``L``:
    $\mathrm{CE} = L \ln K / (D + 2L)$. On the recalled steps alone it scores
    ``ln K`` nats and accuracy ``1/K``. (Arjovsky, Shah & Bengio 2016, section 4.1.)
    """
    return length * math.log(num_symbols) / (delay + 2 * length)


def _copy(key, n, length, delay, num_symbols):
    K, L, D = num_symbols, length, delay
    symbols = _rng(key).integers(1, K + 1, (n, L)).astype(np.int32)
    tokens = np.zeros((n, D + 2 * L), np.int32)
    tokens[:, :L] = symbols
    tokens[:, L + D - 1] = K + 1
    targets = np.zeros((n, D + 2 * L), np.int32)
    targets[:, D + L :] = symbols
    return np.eye(K + 2, dtype=np.float32)[tokens], targets


def copy_task(
    key: jax.Array, n: int, *, length: int = 10, delay: int = 50, num_symbols: int = 8
) -> tuple[jax.Array, jax.Array]:
    r"""The copy (memory) task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016's variant).

    Tokens: ``0`` blank, ``1..K`` data symbols, ``K+1`` the "go" delimiter. Input: ``L``
    symbols drawn uniformly from ``1..K``, ``D - 1`` blanks, the delimiter, ``L`` blanks
    (``T = D + 2L`` steps). Target: blank for the first ``D + L`` steps, then the ``L``
    symbols in order. Recalled steps are the last ``L``.

    Baseline: ``copy_task_baseline(L, D, K) = L ln K / (D + 2L)`` nats per step
    (accuracy ``1/K`` on the recalled symbols).

    Generator: NumPy PCG64 seeded from ``key`` (as in ``adding_problem``).

    Args:
      key: a ``jax.random.key`` or an int seed.
      n: number of sequences.
      length: ``L`` symbols to remember.
      delay: ``D >= 1`` steps from the end of the symbols to the end of the delimiter.
      num_symbols: ``K`` data symbols.

    Returns:
      NumPy ``xs: (n, T, K+2)`` float32 one-hot tokens, ``ys: (n, T)`` int32 target tokens.
    """
    return _copy(
        key,
        positive_int(n, "n"),
        positive_int(length, "length"),
        positive_int(delay, "delay"),
        positive_int(num_symbols, "num_symbols"),
    )


# --------------------------------------------------------------------------- digits


class Split(NamedTuple):
    """A train/test split of a labelled data set: ``x_*`` inputs, ``y_*`` int32 labels.

    Attributes:
      x_train: ``(N_train, T, I)`` inputs (sequences, batch-major).
      y_train: ``(N_train,)`` int32 labels.
      x_test: ``(N_test, T, I)`` inputs.
      y_test: ``(N_test,)`` int32 labels.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(*, mode: str = "rows", test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's handwritten digits (1,797 images of 8x8 pixels, 10 classes) as sequences.

    ``mode="rows"``: 8 steps of 8 pixels, ``x: (n, 8, 8)``; ``mode="pixels"``: 64 steps of
    one pixel (row-major), ``x: (n, 64, 1)`` (the pixel-by-pixel reading of Le et al. 2015,
    on a small image). Pixels are scaled from ``0..16`` to ``[0, 1]`` (float32); labels are
    int32. The split is a random permutation from ``numpy.random.default_rng(seed)``;
    ``round(test_fraction * 1797)`` images go to the test set. Needs scikit-learn (the data
    ship with it; no download).

    Baseline: the majority class of the training set scores about 10% on the test set.

    Returns:
      ``Split(x_train, y_train, x_test, y_test)`` (NumPy arrays).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise ImportError("digits needs scikit-learn: pip install 'seqjax[tasks]'.") from e
    if mode not in ("rows", "pixels"):
        raise ValueError(f"mode must be 'rows' or 'pixels', got {mode!r}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # (n, 8, 8)
    y = d.target.astype(np.int32)
    if mode == "pixels":
        x = x.reshape(x.shape[0], 64, 1)
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    n_test = int(round(test_fraction * x.shape[0]))
    te, tr = perm[:n_test], perm[n_test:]
    return Split(x[tr], y[tr], x[te], y[te])


# --------------------------------------------------------------------------- sunspots


class SeriesData(NamedTuple):
    """A scaled yearly series and its split.

    Attributes:
      years: ``(N,)`` int32.
      values: ``(N,)`` float32, the raw values divided by ``scale``.
      n_train: the first ``n_train`` values are the training years.
      n_test_end: values ``n_train .. n_test_end - 1`` are the held-out years.
      scale: the divisor (the largest training value).
    """

    years: np.ndarray
    values: np.ndarray
    n_train: int
    n_test_end: int
    scale: float


def sunspots(*, train_end: int = 1920, test_end: int = 1955) -> SeriesData:
    """Yearly mean sunspot numbers 1700-2008 from statsmodels (``statsmodels.datasets.sunspots``).

    The default split is the classical one of Weigend, Huberman & Rumelhart (1990): train
    on 1700-1920, test one step ahead on 1921-1955 (``test_end=2008`` for every remaining
    year). Values are divided by the largest training value. Needs statsmodels (data ship
    with it; no download).

    Returns:
      ``SeriesData``.
    """
    try:
        from statsmodels.datasets import sunspots as ss
    except ImportError as e:  # pragma: no cover
        raise ImportError("sunspots needs statsmodels: pip install 'seqjax[tasks]'.") from e
    df = ss.load_pandas().data
    years = df["YEAR"].to_numpy().astype(np.int32)
    raw = df["SUNACTIVITY"].to_numpy().astype(np.float64)
    if not years[0] < train_end < test_end <= years[-1]:
        raise ValueError(
            f"need {years[0]} < train_end < test_end <= {years[-1]}, got {train_end}, {test_end}."
        )
    n_train = int(np.sum(years <= train_end))
    n_end = int(np.sum(years <= test_end))
    scale = float(raw[:n_train].max())
    return SeriesData(years, (raw / scale).astype(np.float32), n_train, n_end, scale)


def _lag_matrix(x: np.ndarray, p: int) -> np.ndarray:
    """Rows ``[1, x_{t-1}, ..., x_{t-p}]`` for ``t = p .. len(x) - 1``."""
    cols = [x[p - j - 1 : len(x) - j - 1] for j in range(p)]
    return np.column_stack([np.ones(len(x) - p)] + cols)


def ar_fit(x: np.ndarray, p: int) -> np.ndarray:
    r"""Least-squares AR(p) with intercept: $x_t = c + \sum_{j=1}^p a_j x_{t-j} + e_t$.

    Args:
      x: ``(N,)`` series.
      p: order.

    Returns:
      ``(p + 1,)`` float64 coefficients ``[c, a_1, ..., a_p]`` (statsmodels' ``AutoReg``
      OLS layout).
    """
    x = np.asarray(x, np.float64)
    p = positive_int(p, "p")
    if len(x) <= 2 * p:
        raise ValueError(f"x has {len(x)} values; AR({p}) needs more than {2 * p}.")
    coef, *_ = np.linalg.lstsq(_lag_matrix(x, p), x[p:], rcond=None)
    return coef


def ar_predict(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    """One-step-ahead AR predictions of ``x[p:]`` from the true past values: ``(N - p,)``."""
    p = len(coef) - 1
    return _lag_matrix(np.asarray(x, np.float64), p) @ coef


# --------------------------------------------------------------------------- character-level LM

STDLIB_MODULES: tuple[str, ...] = (
    "textwrap",
    "string",
    "functools",
    "heapq",
    "bisect",
    "fractions",
    "argparse",
)
"""Default standard-library modules whose source text ``char_corpus`` reads."""


def stdlib_text(modules: Sequence[str] = STDLIB_MODULES) -> str:
    """The source code of standard-library modules, concatenated (read from this Python's files).

    Offline by construction; the text differs between Python versions (it is whatever
    ``importlib.util.find_spec(name).origin`` points at), so results are comparable only
    for the same ``sys.version_info`` (recorded by ``char_corpus``).
    """
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise ValueError(f"module {name!r} has no Python source file to read.")
        with open(spec.origin, encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


class CharCorpus(NamedTuple):
    """A character-level corpus.

    Attributes:
      train: ``(N_train,)`` int32 character ids.
      valid: ``(N_valid,)`` int32 ids (the last ``valid_fraction`` of the text).
      vocab: the characters, ``vocab[id]``; ids follow sorted order.
      source: what the text is (modules and Python version).
    """

    train: np.ndarray
    valid: np.ndarray
    vocab: str
    source: str


def char_corpus(
    text: str | None = None, *, modules: Sequence[str] = STDLIB_MODULES, valid_fraction: float = 0.1
) -> CharCorpus:
    """Encode ``text`` (default ``stdlib_text(modules)``) as character ids and split it.

    The vocabulary is the sorted set of characters of the whole text; the last
    ``valid_fraction`` of the text (by characters) is the validation part.
    """
    src = f"{text and 'user text' or 'stdlib ' + ','.join(modules)} (Python {sys.version.split()[0]})"
    text = stdlib_text(modules) if text is None else text
    if len(text) < 2:
        raise ValueError(f"text has {len(text)} characters; need at least 2.")
    vocab = "".join(sorted(set(text)))
    lut = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((lut[c] for c in text), np.int32, len(text))
    n_valid = max(1, int(len(ids) * valid_fraction))
    return CharCorpus(ids[:-n_valid], ids[-n_valid:], vocab, src)


def char_windows(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows for next-character prediction.

    Returns:
      ``inputs: (n, seq_len)`` int32 and ``targets: (n, seq_len)`` int32 with
      ``targets[:, t] = inputs[:, t + 1]`` (the next character), ``n = (len(ids) - 1) // seq_len``.
    """
    seq_len = positive_int(seq_len, "seq_len")
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(ids)} ids are too few for one window of seq_len={seq_len}.")
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    return x.astype(np.int32), y.astype(np.int32)


def bits_per_char(logits: jax.Array, targets: jax.Array) -> jax.Array:
    r"""Mean cross-entropy in bits: $-\frac{1}{N}\sum \log_2 \mathrm{softmax}(z)_{y}$.

    Args:
      logits: ``(*batch, T, V)``.
      targets: ``(*batch, T)`` integer ids.
    """
    targets = jnp.asarray(targets)
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer character ids, got dtype {targets.dtype}.")
    if tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)} need targets of shape {tuple(logits.shape[:-1])}, "
            f"got {tuple(targets.shape)}."
        )
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(nll) / math.log(2.0)


def unigram_bits_per_char(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """The memoryless baseline: cross-entropy (bits) on ``valid`` of the training character
    frequencies, add-one smoothed: ``p(c) = (count(c) + 1) / (N + V)``."""
    counts = np.bincount(np.asarray(train), minlength=vocab_size).astype(np.float64) + 1.0
    p = counts / counts.sum()
    return float(-np.mean(np.log2(p[np.asarray(valid)])))
