"""Variable-length sequences in a few padded shapes: ``bucket_by_length`` and ``PaddedBatch``.

Every distinct batch shape compiles the train step again. Real data (sentences, recordings,
episodes) has as many lengths as examples; padding every batch to its own longest sequence
compiles once per batch, and padding everything to the longest sequence wastes compute on
padding. Bucketing sits between: sequences are grouped by length into ``num_buckets``
buckets, and every batch of a bucket is padded to that bucket's longest sequence, so the
step compiles at most ``num_buckets`` times (once per bucket) and the padding stays small.

Imports nothing of seqjax.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["PaddedBatch", "Buckets", "bucket_by_length"]


class PaddedBatch(NamedTuple):
    """A batch of padded sequences, batch-major: what ``bucket_by_length`` yields.

    Attributes:
      xs: ``(B, T, *feature)`` inputs; steps ``t >= lengths[b]`` hold ``pad_value``.
      lengths: ``(B,)`` int32, each sequence's number of valid steps, in ``[1, T]``.
      ys: ``(B, *target)`` one target per sequence, ``(B, T, *target)`` one per step
        (padded like ``xs``), or ``None`` without targets.

    ``fit`` checks ``lengths`` against ``xs.shape[1]`` on the host before each batch is
    placed (as it does for any dict, NamedTuple or dataclass with ``xs`` and ``lengths``).
    Pass both on: ``model.apply(params, batch.xs, lengths=batch.lengths)``.
    """

    xs: np.ndarray
    lengths: np.ndarray
    ys: Any = None


def _bucket_edges(lengths: np.ndarray, num_buckets: int) -> np.ndarray:
    """Upper edges (inclusive) of up to ``num_buckets`` buckets of about equal counts."""
    qs = np.quantile(lengths, np.arange(1, num_buckets + 1) / num_buckets, method="higher")
    return np.unique(qs.astype(np.int64))


class Buckets:
    """The batches of ``bucket_by_length`` (build it with that function): re-iterable, with
    ``len()`` (batches per epoch) and ``iter_epoch(epoch)``; iterating it directly gives
    epoch 0, 1, ... on successive passes.

    Attributes:
      edges: ``(K,)`` the padded length of each bucket (its longest sequence).
      bucket_of: ``(N,)`` the bucket of each sequence.
      shapes: the distinct ``(B, T)`` of the batches (at most ``K``; ``K + 1`` with
        ``drop_remainder=False``).
    """

    def __init__(self, xs, ys, lengths, edges, batch_size, shuffle, seed, drop_remainder, pad_value):
        self._xs, self._ys, self.lengths = xs, ys, lengths
        self.edges = edges
        self.bucket_of = np.searchsorted(edges, lengths, side="left")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_remainder, self.pad_value = drop_remainder, pad_value
        self._passes = 0
        self._plan0 = self._plan(0)
        self.shapes = sorted({(len(idx), int(self.edges[k])) for k, idx in self._plan0})

    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """``[(bucket, example indices)]``: the batches of ``epoch`` in order.

        Each bucket gives its full batches; the sequences left over in all buckets (fewer
        than ``batch_size`` per bucket) are sorted by length and batched together, each such
        batch padded to the edge of its longest sequence's bucket. So no shape is added and,
        with ``drop_remainder``, fewer than ``batch_size`` sequences are dropped per epoch.
        """
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        plan, left = [], []
        bs = self.batch_size
        for k in range(len(self.edges)):
            idx = np.flatnonzero(self.bucket_of == k)
            if rng is not None:
                idx = rng.permutation(idx)
            full = len(idx) - len(idx) % bs
            plan += [(k, idx[i : i + bs]) for i in range(0, full, bs)]
            left.append(idx[full:])
        rest = np.concatenate(left)
        rest = rest[np.argsort(self.lengths[rest], kind="stable")]
        stop = len(rest) - len(rest) % bs if self.drop_remainder else len(rest)
        for i in range(0, stop, bs):
            chunk = rest[i : i + bs]
            plan.append((int(self.bucket_of[chunk].max()), chunk))
        if rng is not None:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def _pad(self, seqs: Sequence[np.ndarray], idx: np.ndarray, T: int) -> np.ndarray:
        first = seqs[idx[0]]
        out = np.full((len(idx), T, *first.shape[1:]), self.pad_value, dtype=first.dtype)
        for r, i in enumerate(idx):
            out[r, : len(seqs[i])] = seqs[i]
        return out

    def _batch(self, k: int, idx: np.ndarray) -> PaddedBatch:
        T = int(self.edges[k])
        ys = self._ys
        if isinstance(ys, list):
            ys = self._pad(ys, idx, T)
        elif ys is not None:
            ys = ys[idx]
        return PaddedBatch(self._pad(self._xs, idx, T), self.lengths[idx].astype(np.int32), ys)

    def iter_epoch(self, epoch: int) -> Iterator[PaddedBatch]:
        """The batches of epoch ``epoch`` (reshuffled per epoch with ``(seed, epoch)``)."""
        plan = self._plan0 if epoch == 0 else self._plan(epoch)
        return (self._batch(k, idx) for k, idx in plan)

    def __iter__(self) -> Iterator[PaddedBatch]:
        epoch, self._passes = self._passes, self._passes + 1
        return self.iter_epoch(epoch)

    def __len__(self) -> int:
        return len(self._plan0)

    def __repr__(self) -> str:
        return (
            f"bucket_by_length({len(self.lengths)} sequences, {len(self)} batches of "
            f"{self.batch_size}, padded lengths {self.edges.tolist()})"
        )


def bucket_by_length(
    xs: Sequence[Any],
    ys: Any = None,
    *,
    batch_size: int,
    num_buckets: int = 4,
    boundaries: Sequence[int] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = True,
    pad_value: float = 0.0,
) -> Buckets:
    r"""Batches of variable-length sequences, padded to a few lengths: ``fit`` compiles a few times.

    Sequence $i$ of length $T_i$ goes to the first bucket $k$ with
    $T_i \le e_k$; every batch of bucket $k$ is padded to $e_k$ steps, so the
    batches have at most ``num_buckets`` shapes (one more, a smaller last batch, with
    ``drop_remainder=False``). What is left over in each bucket after its full batches
    (fewer than ``batch_size`` sequences) is pooled, sorted by length and batched, each
    such batch padded to the edge of its longest sequence; so an epoch drops fewer than
    ``batch_size`` sequences in all, like ``fit``'s array data. The default edges are the
    quantiles $q = k/K$ of the lengths, which puts about the same number of sequences
    in each bucket; the padded fraction is then small when lengths vary smoothly.

    Each epoch shuffles the sequences within their buckets and the order of the batches,
    with NumPy's generator seeded by ``(seed, epoch)``: ``fit`` reads epoch ``e`` through
    ``iter_epoch(e)``, so a resumed run sees exactly the batches of the uninterrupted one.

    Args:
      xs: ``N`` sequences, each ``(T_i, *feature)`` with the same feature shape and dtype.
      ys: targets: an array ``(N, *target)`` (one per sequence), a list of ``N`` arrays
        ``(T_i, *target)`` (one per step, padded like ``xs``), or ``None``.
      batch_size: sequences per batch.
      num_buckets: how many padded lengths (default 4); ignored when ``boundaries`` is given.
      boundaries: the padded lengths themselves (increasing; the last must be at least the
        longest sequence).
      shuffle: reshuffle every epoch (default ``True``); ``False``: buckets in order, sequences
        in input order.
      seed: the shuffling seed.
      drop_remainder: drop the incomplete last batch (fewer than ``batch_size`` sequences;
        default ``True``: one shape per bucket, as ``fit`` drops array data's incomplete
        last batch).
      pad_value: the value of padded steps of ``xs`` (and of per-step ``ys``).

    Returns:
      A re-iterable of ``PaddedBatch(xs (B, e_k, *feature), lengths (B,), ys)`` with
      ``len()`` (batches per epoch), ``iter_epoch(epoch)``, ``edges`` (the padded lengths),
      ``bucket_of`` and ``shapes`` (the distinct ``(B, T)`` of its batches). Pass it to
      ``fit`` as ``train_data``.

    Raises:
      ValueError: empty or inconsistent sequences, a length of 0, ``ys`` that do not match,
        bad ``boundaries``.

    Examples:
      >>> import numpy as np
      >>> from seqjax.train import bucket_by_length
      >>> rng = np.random.default_rng(0)
      >>> seqs = [rng.normal(size=(int(t), 3)).astype(np.float32) for t in rng.integers(5, 60, 200)]
      >>> data = bucket_by_length(seqs, np.zeros(200, np.float32), batch_size=16, num_buckets=3)
      >>> len({b.xs.shape for b in data}) <= 3, all(b.lengths.max() <= b.xs.shape[1] for b in data)
      (True, True)
    """
    if isinstance(xs, np.ndarray) and xs.dtype != object:
        raise ValueError(
            f"xs must be a list of N sequences (T_i, *feature) of different lengths, got one array of "
            f"shape {xs.shape}: equal-length data needs no bucketing (pass it to fit as arrays)."
        )
    seqs = [np.asarray(x) for x in xs]
    if not seqs:
        raise ValueError("xs is empty: bucket_by_length needs at least one sequence.")
    f0 = seqs[0]
    for i, s in enumerate(seqs):
        if s.ndim < 1 or s.shape[1:] != f0.shape[1:] or s.dtype != f0.dtype:
            raise ValueError(
                f"xs[{i}] has shape {s.shape} and dtype {s.dtype}, but xs[0] has {f0.shape} and "
                f"{f0.dtype}: every sequence needs shape (T_i, *feature), one feature shape and dtype."
            )
    lengths = np.array([len(s) for s in seqs], np.int64)
    if (lengths == 0).any():
        raise ValueError(f"xs[{int(np.argmin(lengths))}] is empty (0 steps); drop empty sequences.")
    n = len(seqs)
    if isinstance(ys, (list, tuple)):
        ys = [np.asarray(y) for y in ys]
        if len(ys) != n or any(len(y) != t for y, t in zip(ys, lengths, strict=True)):
            raise ValueError(
                "ys given as a list means one target per step: it needs N arrays (T_i, *target) "
                "matching xs; for one target per sequence pass an array (N, *target)."
            )
    elif ys is not None:
        ys = np.asarray(ys)
        if ys.ndim == 0 or ys.shape[0] != n:
            raise ValueError(f"ys has shape {ys.shape} but needs ({n}, *target): one target per sequence.")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if boundaries is not None:
        edges = np.asarray(boundaries, np.int64)
        if edges.ndim != 1 or edges.size == 0 or (np.diff(edges) <= 0).any() or edges[0] < 1:
            raise ValueError(f"boundaries must be increasing positive lengths, got {list(boundaries)}.")
        if edges[-1] < lengths.max():
            raise ValueError(
                f"boundaries end at {int(edges[-1])} but the longest sequence has {int(lengths.max())} "
                "steps; the last boundary must be at least that."
            )
    else:
        if not isinstance(num_buckets, (int, np.integer)) or isinstance(num_buckets, bool) or num_buckets < 1:
            raise ValueError(f"num_buckets must be a positive integer, got {num_buckets!r}.")
        edges = _bucket_edges(lengths, int(num_buckets))
    out = Buckets(seqs, ys, lengths, edges, int(batch_size), shuffle, seed, drop_remainder, pad_value)
    if len(out) == 0:
        raise ValueError(
            f"no bucket holds batch_size={batch_size} sequences; lower batch_size or num_buckets, "
            "or pass drop_remainder=False."
        )
    return out
