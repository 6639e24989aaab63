"""Training data: the three kinds of source, batch checks, and placing batches on a mesh.

A source turns ``fit``'s ``train_data`` (or ``Evaluation.data``) into host batches, any
pytree of NumPy arrays whose leaves share a leading batch axis ``B``:

* ``_Arrays``: in-memory arrays with a leading example axis ``N``, read in batches of
  ``batch_size`` (reshuffled each epoch with NumPy's PCG64 seeded by ``fold_in(key, epoch)``);
* ``_Fn``: a function ``key -> batch``, batch ``i`` drawn with ``fold_in(key, i)`` (endless);
* ``_Iter``: an iterable of batches, one pass per epoch.

Each has ``per_epoch`` (batches per epoch, or ``None`` when unknown), ``first()`` and
``epoch(e, start)`` (the batches of epoch ``e`` from position ``start`` on, which is how a
resumed run skips what it already used).

Data parallelism: ``data_parallel_mesh()`` is a one-axis ``Mesh`` named ``"data"``; a batch
is sharded on its leading axis (``P("data")``, or ``P(None, "data")`` for a stack of batches)
and the state replicated (``P()``). Imports nothing of seqjax.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["data_parallel_mesh"]


def data_parallel_mesh(*, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis ``Mesh`` named ``"data"`` over ``devices`` (data parallelism).

    Args:
      devices: the devices, default ``jax.devices()`` (all devices of all processes).

    Returns:
      ``Mesh(devices, ("data",))`` of shape ``(len(devices),)``: a batch ``(B, ...)`` placed
      with ``P("data")`` gives each device ``B / len(devices)`` examples.

    Examples:
      ``fit(..., mesh=data_parallel_mesh())`` trains data-parallel over every device (what
      ``fit``'s default ``mesh="auto"`` does when there is more than one).

      >>> import jax
      >>> from seqjax.train import data_parallel_mesh
      >>> mesh = data_parallel_mesh()
      >>> mesh.axis_names, mesh.devices.shape == (len(jax.devices()),)
      (('data',), True)
    """
    devs = np.asarray(jax.devices() if devices is None else list(devices))
    return Mesh(devs, ("data",))


# --------------------------------------------------------------------------- batch checks


def _leading(batch: Any) -> int:
    """The batch size ``B`` of a batch (the leading axis of its first leaf)."""
    return int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])


def _leading_any(data: Any) -> int:
    """The example count ``N`` of array data; a large number for anything else."""
    leaves = jax.tree_util.tree_leaves(data)
    if leaves and all(isinstance(x, (np.ndarray, jax.Array)) for x in leaves):
        return int(np.shape(leaves[0])[0]) if np.ndim(leaves[0]) else 0
    return 1 << 30


def _spec(batch: Any) -> tuple[Any, list[tuple[str, tuple, np.dtype]], int]:
    """``(treedef, [(path, per-example shape, dtype)], batch size)`` of a host batch."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    if not leaves:
        raise ValueError("a batch must hold at least one array.")
    info = []
    sizes = []
    for path, x in leaves:
        shape = np.shape(x)
        if len(shape) == 0:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} is a scalar; every leaf needs a leading batch axis."
            )
        sizes.append(shape[0])
        info.append((jax.tree_util.keystr(path), tuple(shape[1:]), np.dtype(jnp.result_type(x))))
    if len(set(sizes)) != 1:
        desc = ", ".join(f"batch{p}: {(n,) + s}" for (p, s, _), n in zip(info, sizes, strict=True))
        raise ValueError(
            f"mismatched batch shapes: every leaf of a batch needs the same leading (batch) size, got {desc}."
        )
    return treedef, info, sizes[0]


def _check_same(spec, ref, where: str, *, same_shape: bool = True) -> None:
    """``ValueError`` unless ``spec`` has the tree, per-example shapes and dtypes of ``ref``.

    With ``same_shape=False`` only the number of axes must match (batches of padded
    sequences may differ in length; ``fit`` traces each new shape before it compiles).
    """
    treedef, info, _ = spec
    rdef, rinfo, _ = ref
    if treedef != rdef:
        raise ValueError(f"{where} has the tree {treedef} but the training batches have {rdef}.")
    for (p, s, d), (_, rs, rd) in zip(info, rinfo, strict=True):
        if (s != rs) if same_shape else (len(s) != len(rs)):
            raise ValueError(
                f"{where}{p} has per-example shape {s} but the training batches have {rs} "
                f"({'shapes' if same_shape else 'the number of axes'} after the batch axis must match)."
            )
        if d != rd:
            raise ValueError(f"{where}{p} has dtype {d} but the training batches have {rd}; cast it.")


def _check_finite_arrays(data: Any, name: str) -> None:
    """``ValueError`` naming the first non-finite value of array data (leaf, example, index).

    Scans every floating (and complex) leaf in chunks of examples, so the temporary boolean
    array stays small whatever the size of the data.
    """
    for path, a in jax.tree_util.tree_flatten_with_path(data)[0]:
        a = np.asarray(a)
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating)):
            continue
        if a.ndim == 0 or a.size == 0:
            continue
        per = max(1, a[0].size)
        chunk = max(1, (1 << 22) // per)  # ~4M values per chunk
        n_bad, first = 0, None
        for lo in range(0, a.shape[0], chunk):
            part = a[lo : lo + chunk]
            bad = ~np.isfinite(part).reshape(part.shape[0], -1).all(axis=1)
            if bad.any():
                n_bad += int(bad.sum())
                if first is None:
                    i = lo + int(np.argmax(bad))
                    j = np.unravel_index(int(np.argmax(~np.isfinite(a[i]))), a[i].shape)
                    first = (i, (i, *(int(v) for v in j)), a[i][j] if a[i].ndim else a[i])
        if first is not None:
            i, index, value = first
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} holds non-finite values in {n_bad} of its "
                f"{a.shape[0]} examples; the first is example {i} (value {value} at index {index}). "
                "A step on such a batch would be skipped, not trained on: remove or impute them, or "
                "pass fit(..., check_finite=False) to skip this scan (for data too large to scan; "
                "non-finite steps are then skipped and named in the history)."
            )


def _length_pairs(batch: Any, prefix: str = ""):
    """Every ``(path of lengths, xs, lengths)`` of a batch: a dict, NamedTuple or dataclass
    with both an ``xs`` and a ``lengths`` field (searched recursively)."""
    fields: dict[str, Any] | None = None
    attr = not isinstance(batch, dict)
    if isinstance(batch, dict):
        fields = batch
    elif hasattr(batch, "_fields"):
        fields = dict(zip(batch._fields, batch, strict=True))
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    if fields is not None:
        if "xs" in fields and "lengths" in fields and fields["lengths"] is not None:
            yield prefix + (".lengths" if attr else "['lengths']"), fields["xs"], fields["lengths"]
        items: list[tuple[Any, Any]] = list(fields.items())
    elif isinstance(batch, (list, tuple)):
        items = list(enumerate(batch))
    else:
        return
    for k, v in items:
        if isinstance(v, (dict, list, tuple)) or hasattr(v, "_fields") or dataclasses.is_dataclass(v):
            sub = f".{k}" if attr and isinstance(k, str) else f"[{k!r}]"
            yield from _length_pairs(v, prefix + sub)


def _check_batch_lengths(batch: Any, where: str) -> None:
    """``ValueError`` unless every ``lengths`` beside an ``xs`` lies in ``[0, T]``, ``T = xs.shape[1]``.

    On host arrays only (``fit`` calls it on each batch before placing it): a few NumPy
    reductions, no device work.
    """
    for path, xs, lengths in _length_pairs(batch):
        lengths = np.asarray(lengths)
        shape = np.shape(xs)
        name = f"{where}{path}"
        if not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"{name} must be integers, got dtype {lengths.dtype}.")
        if len(shape) < 2 or lengths.shape != shape[:1]:
            raise ValueError(
                f"{name} has shape {lengths.shape} but needs ({shape[0] if shape else '?'},): one length per "
                f"sequence of xs {tuple(shape)} (batch-major: (B, T, ...))."
            )
        T = shape[1]
        bad = (lengths < 0) | (lengths > T)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"{name}[{i}] = {int(lengths[i])} is outside [0, T={T}] (T = xs.shape[1]); "
                f"{int(bad.sum())} of {lengths.size} lengths are. Under jit an out-of-range length "
                "would be clamped silently."
            )


# --------------------------------------------------------------------------- sources


class _Arrays:
    """In-memory arrays: a pytree whose leaves share a leading example axis ``N``."""

    shuffleable = True

    def __init__(self, data, batch_size, shuffle, key, name, drop_remainder=True):
        leaves = jax.tree_util.tree_leaves(data)
        _, _, n = _spec(data) if leaves else (None, None, 0)
        if n == 0:
            raise ValueError(f"{name} is empty (0 examples); nothing to train on.")
        if batch_size is None or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer for array data, got {batch_size!r}.")
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} exceeds the {n} examples of {name}.")
        self.data = jax.tree_util.tree_map(np.asarray, data)
        self.n, self.batch_size, self.shuffle, self.key = n, int(batch_size), shuffle, key
        self.per_epoch = n // self.batch_size if drop_remainder else -(-n // self.batch_size)
        self._perm: tuple[int | None, np.ndarray | None] = (None, None)  # (epoch, its permutation)

    def _order(self, epoch):
        if not self.shuffle:
            return None
        if self._perm[0] != epoch:
            # NumPy PCG64 seeded by fold_in(key, epoch): no threefry kernel to compile per data size
            seed = np.asarray(jax.random.key_data(jax.random.fold_in(self.key, epoch))).ravel().tolist()
            self._perm = (epoch, np.random.default_rng(seed).permutation(self.n))
        return self._perm[1]

    def epoch(self, epoch, start):
        order = self._order(epoch)
        for i in range(start, self.per_epoch):
            sl = slice(i * self.batch_size, min((i + 1) * self.batch_size, self.n))
            idx = sl if order is None else order[sl]
            yield jax.tree_util.tree_map(lambda a, idx=idx: a[idx], self.data)

    def first(self):
        return next(self.epoch(0, 0))


# keys of a batch function are made this many at a time (one dispatch, one read per block)
_KEY_BLOCK = 256


@functools.partial(jax.jit, static_argnums=2)
def _fold_in_block(key: jax.Array, start: jax.Array, n: int) -> jax.Array:
    """Raw data of ``fold_in(key, start + j)`` for ``j < n``: ``(n, *key_data_shape)``.

    ``start`` is a ``()`` uint32 (``start + n <= 2**32``: no index wraps). ``fold_in`` is
    an elementwise hash of ``(key, index)``, so each row is bit-for-bit the key data of the
    eager ``jax.random.fold_in(key, start + j)``.
    """
    idx = start + jnp.arange(n, dtype=jnp.uint32)
    return jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(key, i))(idx))


class _Fn:
    """``fn(key) -> batch``: an endless stream; batch ``i`` uses ``fold_in(key, i)``.

    The keys are made ``_KEY_BLOCK`` at a time by one compiled call, dispatched a block
    ahead, read to the host once, and each handed to ``fn`` as a typed key built from its
    host data (``jax.random.wrap_key_data``). So drawing a batch never waits for the device:
    with ``fit``'s train step in flight, an eager ``fold_in`` queued behind it would make
    ``fn`` (which reads its key) wait for the whole step, while this way the next batch is
    drawn on the host while the device computes the current step.
    """

    shuffleable = False
    per_epoch = None

    def __init__(self, fn, key):
        self.fn, self.key = fn, key

    def _keys(self, start: int):
        """The key data of batches ``start, ..., start + _KEY_BLOCK - 1`` (dispatched, not
        read), or ``None`` past ``2**32`` indices (eager ``fold_in`` then raises as before)."""
        if start + _KEY_BLOCK > 1 << 32:
            return None
        return _fold_in_block(self.key, np.uint32(start), _KEY_BLOCK)

    def epoch(self, epoch, start):
        impl = jax.random.key_impl(self.key)
        ahead = self._keys(start)
        for lo in itertools.count(start, _KEY_BLOCK):
            block, ahead = ahead, self._keys(lo + _KEY_BLOCK)  # the next block is computed early
            if block is None:
                for i in itertools.count(lo):
                    yield jax.tree_util.tree_map(np.asarray, self.fn(jax.random.fold_in(self.key, i)))
                return
            for row in np.asarray(block):
                key = jax.random.wrap_key_data(row, impl=impl)
                yield jax.tree_util.tree_map(np.asarray, self.fn(key))

    def first(self):
        return jax.tree_util.tree_map(np.asarray, self.fn(jax.random.fold_in(self.key, 0)))


class _Iter:
    """An iterable of batches. Re-iterable ones (lists, objects with ``__iter__``) give one
    epoch per pass; a one-shot iterator is a single epoch. Resuming skips consumed batches.

    A re-iterable with a method ``iter_epoch(epoch)`` (``bucket_by_length``'s batches) is
    read through it, so epoch ``e`` gets the same batches in a resumed run.
    """

    shuffleable = False

    def __init__(self, data, name):
        self.name = name
        self.reiterable = iter(data) is not data
        if self.reiterable:
            self.data = data
            by_epoch = getattr(data, "iter_epoch", None)
            self._first = next(by_epoch(0) if callable(by_epoch) else iter(data), None)
        else:
            head = next(data, None)
            self._first = head
            self.data = itertools.chain([head], data) if head is not None else data
        if self._first is None:
            raise ValueError(f"{name} is empty (it yielded no batches); nothing to train on.")
        self.per_epoch = len(data) if hasattr(data, "__len__") else None
        self._used = False

    def epoch(self, epoch, start):
        if not self.reiterable:
            if self._used:
                return iter(())
            self._used = True
        by_epoch = getattr(self.data, "iter_epoch", None)  # epoch-dependent batches (reshuffled)
        it = by_epoch(epoch) if self.reiterable and callable(by_epoch) else iter(self.data)
        return itertools.islice(it, start, None)

    def first(self):
        return self._first


def _source(data, batch_size, shuffle, key, name, drop_remainder=True):
    """The source for ``data`` (arrays, a function ``key -> batch``, or an iterable of batches)."""
    if callable(data) and not isinstance(data, (list, tuple, dict)):
        if shuffle:
            raise ValueError(
                f"shuffle=True needs array data; {name} is a batch function (it is random already)."
            )
        return _Fn(data, key)
    if isinstance(data, (np.ndarray, jax.Array)) or (
        isinstance(data, (tuple, dict))
        and all(isinstance(x, (np.ndarray, jax.Array)) for x in jax.tree_util.tree_leaves(data))
    ):
        return _Arrays(data, batch_size, True if shuffle is None else shuffle, key, name, drop_remainder)
    if isinstance(data, Iterable):
        if shuffle:
            raise ValueError(f"shuffle=True needs array data; {name} is an iterable of batches.")
        return _Iter(data, name)
    raise ValueError(
        f"{name} must be arrays (a pytree with a leading example axis), a function key -> batch, "
        f"or an iterable of batches; got {type(data).__name__}."
    )


# --------------------------------------------------------------------------- placement


def _batch_sharding(mesh: Mesh, fused: bool) -> NamedSharding:
    """Batch leaves ``(B, ...)`` sharded on ``"data"``; a stack ``(n, B, ...)`` on its second axis."""
    return NamedSharding(mesh, P(None, "data") if fused else P("data"))


def _place_batch(batch, mesh: Mesh | None, fused: bool):
    """Put a host batch on ``mesh`` (sharded on its batch axis); unchanged without a mesh.

    With several processes each process feeds its own slice ``[i*B/p, (i+1)*B/p)`` of the
    global batch ``B`` (every process holds the same global batch).
    """
    if mesh is None:
        return batch
    sh = _batch_sharding(mesh, fused)
    pc, pi = jax.process_count(), jax.process_index()

    def put(a):
        if pc > 1:  # each process feeds its own slice of the global batch
            ax = 1 if fused else 0
            m = a.shape[ax] // pc
            a = np.take(a, np.arange(pi * m, (pi + 1) * m), axis=ax)
            shape = list(a.shape)
            shape[ax] *= pc
            return jax.make_array_from_process_local_data(sh, a, tuple(shape))
        return jax.device_put(a, sh)

    return jax.tree_util.tree_map(put, batch)


def _replicate(tree, mesh: Mesh):
    """Place a host/single-device pytree replicated on every device of ``mesh`` (all processes)."""
    rep = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, rep)

    def put(a):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = jax.make_array_from_process_local_data(rep, np.asarray(jax.random.key_data(a)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        return jax.make_array_from_process_local_data(rep, np.asarray(a))

    return jax.tree_util.tree_map(put, tree)


def _to_host(x) -> np.ndarray:
    """A device value as a NumPy array (blocks until it is computed)."""
    return np.asarray(jax.device_get(x))
