"""Run directories of the ``seqjax`` command: built-in tasks, models from a config, training
into a directory, and loading one back.

A run directory (written by ``train``, and by ``demo`` for each model) holds
``config.json`` (everything needed to rebuild the model), ``checkpoints/`` (orbax, via
``seqjax.train.save_checkpoint``), ``history.json`` and, with matplotlib, ``training.png``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from seqjax import cells, tasks
from seqjax._util import write_atomically
from seqjax.train import Checkpoints, Evaluation, Logging, fit

__all__ = ["CLIError", "CELLS", "load_run"]

CELLS = ("rnn", "irnn", "lstm", "gru", "mgu", "janet")
"""The cells ``--cell`` accepts: the builders of ``seqjax.cells`` of these names."""


class CLIError(Exception):
    """A user-facing error: printed as ``seqjax: error: <message>``, exit code 2."""


def _make_cell(name: str, hidden: int):
    """The cell ``name`` of ``CELLS`` with ``hidden`` units (the LSTM with forget bias 1)."""
    if name not in CELLS:
        raise CLIError(f"unknown cell {name!r}; choose from {', '.join(CELLS)}.")
    return getattr(cells, name)(hidden, **({"forget_bias": 1.0} if name == "lstm" else {}))


# --------------------------------------------------------------------------- tasks


def _adding_batch(key: jax.Array, batch: int, T: int):
    """``seqjax.tasks.adding_problem`` with targets ``(B, 1)`` (one output per sequence)."""
    xs, ys = tasks.adding_problem(key, batch, T)
    return xs, jnp.reshape(ys, (batch, 1))


_COPY_SYMBOLS = 8


def _copy_batch(key: jax.Array, batch: int, T: int):
    """``seqjax.tasks.copy_task`` of ``T`` steps: ``L = min(10, T//4)`` of ``K = 8`` symbols,
    delay ``T - 2L``."""
    L = max(1, min(10, T // 4))
    return tasks.copy_task(key, batch, length=L, delay=T - 2 * L, num_symbols=_COPY_SYMBOLS)


def _task_registry() -> dict[str, dict]:
    """Built-in tasks: name -> spec (``make(key, batch, T) -> (xs, ys)``, sizes, loss kind)."""
    return {
        "adding": {
            "make": _adding_batch,
            "input_size": 2,
            "output_size": 1,
            "loss": "mse",
            "per_step": False,
            "T": 50,
            "doc": "adding problem: sum of two marked values (MSE; always answering 1 scores 0.167)",
        },
        "copy": {
            "make": _copy_batch,
            "input_size": _COPY_SYMBOLS + 2,
            "output_size": _COPY_SYMBOLS + 1,
            "loss": "xent",
            "per_step": True,
            "T": 40,
            "doc": "copy task: recall L = min(10, T//4) of 8 symbols after a delay (cross-entropy per step)",
        },
    }


# --------------------------------------------------------------------------- models and run dirs


def _build(config: dict):
    """``(cell, model)`` from a run config: the cell and a ``SeqModel`` with a dense head."""
    from seqjax.layers import dense
    from seqjax.seq2seq import many_to_many, many_to_one

    cell = _make_cell(config["cell"], int(config["hidden"]))
    head = dense(int(config["output_size"]))
    model = many_to_many(cell, head) if config.get("per_step") else many_to_one(cell, head)
    return cell, model


def _loss_fn(config: dict, model):
    from seqjax import losses

    kind = config["loss"]

    def loss_fn(params, batch):
        xs, ys = batch
        out = model.apply(params, xs)
        if kind == "mse":
            return losses.mse(out, ys)
        return losses.softmax_cross_entropy(out, ys)

    return loss_fn


def _optimizer(config: dict):
    from seqjax.train import clipped_adam

    return clipped_adam(float(config["lr"]), max_norm=float(config["clip"]))


def _template(config: dict):
    """A ``TrainState`` of the right structure for restoring (values unused)."""
    from seqjax.train import init_train_state

    _, model = _build(config)
    params = model.init(jax.random.key(0), int(config["input_size"]))
    return init_train_state(params, _optimizer(config), key=jax.random.key(0))


def _write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
    write_atomically(path, lambda f: json.dump(obj, f, indent=2, default=float))


def load_run(run_dir: str):
    """``(config, cell, model, params, meta)`` of a run directory; ``CLIError`` if unreadable."""
    from seqjax.train import restore_checkpoint

    if not os.path.isdir(run_dir):
        raise CLIError(
            f"{run_dir!r} is not a directory; pass a run directory written by `seqjax train` or `demo`."
        )
    cfg_path = os.path.join(run_dir, "config.json")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
        for k in ("cell", "hidden", "input_size", "output_size", "loss", "lr", "clip"):
            if k not in config:
                raise KeyError(k)
    except FileNotFoundError:
        raise CLIError(
            f"{run_dir!r} has no config.json: not a seqjax run directory (made by `seqjax train` or `demo`)."
        ) from None
    except (json.JSONDecodeError, KeyError) as e:
        raise CLIError(f"cannot read {cfg_path!r}: {type(e).__name__}: {e}.") from None
    ckpt = os.path.join(run_dir, "checkpoints")
    try:
        restored = restore_checkpoint(ckpt, _template(config))
    except CLIError:
        raise
    except Exception as e:  # orbax raises many kinds
        raise CLIError(f"cannot read the checkpoint in {ckpt!r}: {type(e).__name__}: {e}") from None
    if restored is None:
        raise CLIError(f"no checkpoint in {ckpt!r}; train first (`seqjax train ... --out {run_dir}`).")
    state, meta = restored
    cell, model = _build(config)
    return config, cell, model, state.params, meta


# --------------------------------------------------------------------------- training core


def _train(
    config: dict,
    run_dir: str,
    *,
    steps: int,
    batch: int,
    seed: int,
    resume: bool,
    progress: bool,
    quiet: bool,
    eval_size: int = 512,
    checkpoint_every: int | None = None,
):
    """Train per ``config`` into ``run_dir`` with ``seqjax.train.fit``.

    Returns ``(params, history, test_data)``.
    """
    task = _task_registry()[config["task"]]
    T = int(config["T"])
    _, model = _build(config)
    key = jax.random.key(seed)
    k_init, k_fit, k_test = jax.random.split(key, 3)
    params = model.init(k_init, int(config["input_size"]))
    test = task["make"](k_test, eval_size, T)
    os.makedirs(run_dir, exist_ok=True)
    _write_json(os.path.join(run_dir, "config.json"), config)
    log_every = max(1, min(50, steps // 10))
    result = fit(
        _loss_fn(config, model),
        _optimizer(config),
        params,
        lambda k: task["make"](k, batch, T),
        key=k_fit,
        steps=steps,
        evaluation=Evaluation(
            test, every=log_every * max(1, (steps // log_every) // 4), batch_size=eval_size
        ),
        checkpoints=Checkpoints(os.path.join(run_dir, "checkpoints"), every=checkpoint_every, resume=resume),
        logging=Logging(
            every=log_every,
            history_path=os.path.join(run_dir, "history.json"),
            progress=progress and not quiet,
        ),
        mesh=None,
    )
    return result.state.params, result.history, test


def _final_eval(history: list[dict]) -> float | None:
    for row in reversed(history):
        if "eval_loss" in row:
            return float(row["eval_loss"])
    return None
