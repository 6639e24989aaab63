"""``History``: the rows ``fit`` logs, the history file, the progress bar and the callbacks.

Imports nothing of ``seqjax.train`` but the option types.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from seqjax._util import write_atomically
from seqjax.train.options import Logging

__all__ = ["History"]


def _write_history(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` (``.csv``: one column per key; else JSON), atomically."""
    if os.fspath(path).endswith(".csv"):
        keys = list(dict.fromkeys(k for row in rows for k in row))

        def write(f):
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

        write_atomically(path, write, newline="")
    else:
        write_atomically(path, lambda f: json.dump(rows, f, indent=1))


def _progress(enabled: bool | None, total: int | None, initial: int):
    """A tqdm bar (``None`` when disabled, when stderr is no terminal, or without tqdm)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


class History:
    r"""The training log: per-interval means of the step metrics, one row per ``Logging.every`` steps.

    ``fit`` drives it: ``add`` after every compiled call, then at each log step ``row``
    (the means over the interval), the evaluation (``eval_*`` keys, added by ``fit``) and
    ``append`` (store, write ``history_path``, progress bar, callbacks). It can also be used
    on its own around a hand-written loop of ``make_train_step``.

    For an interval $I$ of steps (since the previous row) with metrics $m_t$ and
    the set $F \subseteq I$ of finite steps (``finite`` metric), a row holds

    * ``step``, ``epoch``: where the interval ends;
    * ``loss``, ``grad_norm``: $\frac{1}{|F|}\sum_{t \in F} m_t$ (NaN when no step
      of $I$ was finite; over all of $I$ without a ``finite`` metric);
    * every other metric (aux): $\frac{1}{|I|}\sum_{t \in I} m_t$, in float64;
    * ``clipped_frac``: the fraction of steps of $I$ that clipped (with a
      ``clipped`` metric);
    * ``grad_norm_max``: $\max_{t \in F}$ ``grad_norm`` (finite steps only, like the mean);
    * ``skipped``: the total count of skipped steps so far (given);
    * ``skipped_steps``: the steps of $I$ that were skipped ($I \setminus F$, 1-based
      step numbers; empty when all were finite): kept apart from the means, which they
      would turn to NaN;
    * ``steps_per_sec``: steps since the previous row over the seconds since it;
    * ``time``: seconds since ``start_time``.

    Args:
      logging: the ``Logging`` options (``every`` is ``fit``'s business; ``history_path``,
        ``progress`` and ``callbacks`` are used here). Default ``Logging()``.
      total: the number of steps, for the progress bar (``None``: unknown).
      start_step: the step the run starts from (a resumed run's), for rates and the bar.
      rows: rows already logged (a resumed run's), continued.
      start_time: a ``time.perf_counter()`` value ``time`` counts from (default: now).

    Examples:
      Around a hand-written loop (here with made-up metrics; a real loop adds those of
      ``make_train_step``):

      >>> from seqjax.train import History, Logging
      >>> history = History(Logging(progress=False))
      >>> for t in range(1, 5):
      ...     history.add({"loss": float(t), "grad_norm": 1.0, "finite": t != 4})
      ...     if t % 2 == 0:
      ...         _ = history.append(history.row(step=t, epoch=0, skipped=0))
      >>> [(row["step"], row["loss"]) for row in history.rows]  # step 4 was not finite
      [(2, 1.5), (4, 3.0)]
    """

    def __init__(
        self,
        logging: Logging | None = None,
        *,
        total: int | None = None,
        start_step: int = 0,
        rows: list[dict] | tuple = (),
        start_time: float | None = None,
    ):
        self.logging = Logging() if logging is None else logging
        if not isinstance(self.logging, Logging):
            raise ValueError(f"logging must be a seqjax.train.Logging, got {type(self.logging).__name__}.")
        self.rows: list[dict] = list(rows)
        self._pending: list[Mapping[str, Any]] = []
        self._t_start = time.perf_counter() if start_time is None else start_time
        self._t_last, self._s_last = time.perf_counter(), int(start_step)
        self._bar = _progress(self.logging.progress, total, int(start_step))

    @property
    def pending(self) -> int:
        """How many ``add`` calls the next ``row`` will summarise."""
        return len(self._pending)

    def add(self, metrics: Mapping[str, Any], *, steps: int = 1) -> None:
        """Record the metrics of one compiled call (``steps`` steps) and advance the progress bar.

        Args:
          metrics: ``{name: array}``, each ``()`` for one step or ``(steps,)`` for a fused
            call (device arrays are fetched only when the next row is made).
          steps: how many steps the call ran.
        """
        self._pending.append(metrics)
        if self._bar is not None:
            self._bar.update(steps)

    def row(self, *, step: int, epoch: int, skipped: int) -> dict[str, Any]:
        """The row of the interval since the previous one (see the class docstring); not yet stored.

        Args:
          step: the step the interval ends at (1-based count of steps taken).
          epoch: the current epoch.
          skipped: the total number of skipped steps (``int(state.skipped)``).

        Returns:
          A dict of Python numbers; ``fit`` adds ``eval_*`` keys before ``append``.
        """
        ms = jax.device_get(self._pending)
        self._pending = []
        cat = {k: np.concatenate([np.reshape(m[k], (-1,)) for m in ms]) for k in ms[0]} if ms else {}
        now = time.perf_counter()
        row: dict[str, Any] = {"step": step, "epoch": epoch}
        finite = cat["finite"].astype(bool) if "finite" in cat else None
        for k, v in cat.items():
            if k == "finite":
                continue
            if k == "clipped":
                row["clipped_frac"] = float(np.mean(v))
            elif k in ("loss", "grad_norm") and finite is not None:
                row[k] = float(np.mean(v[finite].astype(np.float64))) if finite.any() else float("nan")
            else:
                row[k] = float(np.mean(v.astype(np.float64)))
        if "grad_norm" in cat:
            g = cat["grad_norm"] if finite is None else cat["grad_norm"][finite]
            row["grad_norm_max"] = float(np.max(g)) if g.size else float("nan")
        row["skipped"] = int(skipped)
        n = len(finite) if finite is not None else 0
        row["skipped_steps"] = (
            [] if finite is None else [step - n + 1 + int(i) for i in np.flatnonzero(~finite)]
        )
        row["steps_per_sec"] = (step - self._s_last) / max(now - self._t_last, 1e-9)
        row["time"] = now - self._t_start
        self._t_last, self._s_last = now, step
        return row

    def append(self, row: dict[str, Any], state: Any = None) -> bool:
        """Store ``row``, show it on the progress bar, rewrite ``history_path``, call the callbacks.

        Args:
          row: a row (from ``row``, possibly with ``eval_*`` keys added).
          state: the ``TrainState`` handed to the callbacks as ``cb(row, state)``.

        Returns:
          Whether a callback asked to stop (returned ``True``). Every callback is called.
        """
        self.rows.append(row)
        if self._bar is not None:
            post = {
                "loss": f"{row.get('loss', float('nan')):.4g}",
                "gnorm": f"{row.get('grad_norm', float('nan')):.3g}",
            }
            if "eval_loss" in row:
                post["eval"] = f"{row['eval_loss']:.4g}"
            self._bar.set_postfix(post, refresh=False)
        if self.logging.history_path is not None:
            self.write()
        stop = False
        for cb in self.logging.callbacks:
            stop = bool(cb(row, state)) or stop
        return stop

    def write(self) -> None:
        """Rewrite ``Logging.history_path`` with all rows (atomically: a temporary file, renamed).

        ``.csv``: a header of every key met, one line per row; any other suffix: a JSON list
        of rows. Does nothing without a ``history_path``.
        """
        if self.logging.history_path is not None:
            _write_history(self.logging.history_path, self.rows)

    def close(self) -> None:
        """Close the progress bar (safe to call more than once)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
