"""Run directories of the ``seqjax`` command: a run's configuration (new, or the saved one
when resuming), models from a configuration, training into a directory, and loading one back.

A run directory (written by ``train``, and by ``demo`` for each model) holds
``config.json`` (every option of the run, and everything needed to rebuild the model),
``checkpoints/`` (orbax, via ``seqjax.train.save_checkpoint``), ``history.json``,
``summary.json`` (the last evaluation beside the task's baselines) and, with matplotlib,
``training.png``. The tasks themselves are in ``seqjax.cli.tasks``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from seqjax import cells
from seqjax._util import write_atomically
from seqjax.cli.errors import CLIError
from seqjax.cli.tasks import EVAL_SIZE, TASKS, TaskData, fmt_value, option_owner
from seqjax.train import Checkpoints, Evaluation, Logging, fit

__all__ = [
    "CLIError",
    "CELLS",
    "TRAIN_DEFAULTS",
    "TRAIN_KEYS",
    "RESUME_MAY_CHANGE",
    "load_run",
    "new_config",
    "resume_config",
]

CELLS = ("rnn", "irnn", "lstm", "gru", "mgu", "janet")
"""The cells ``--cell`` accepts: the builders of ``seqjax.cells`` of these names."""

TRAIN_DEFAULTS: dict[str, Any] = {
    "cell": "lstm",
    "hidden": 128,
    "steps": 1000,
    "batch": 64,
    "lr": 1e-3,
    "clip": 1.0,
    "seed": 0,
    "checkpoint_every": None,
}
"""Defaults of ``seqjax train``'s options (the task's own options and ``--T`` default per task)."""

TRAIN_KEYS = ("task", "T", *TRAIN_DEFAULTS, *(o.key for t in TASKS.values() for o in t.options))
"""The ``train`` options saved in a run's ``config.json`` (their argparse ``dest`` names are
these config keys)."""

RESUME_MAY_CHANGE = ("steps", "checkpoint_every")
"""Saved options that ``--resume`` may change: ``--steps`` (the total, to extend a run) and
``--checkpoint-every`` (neither changes what is computed). Every other saved option must be
left out or repeated with its saved value."""


def _make_cell(name: str, hidden: int):
    """The cell ``name`` of ``CELLS`` with ``hidden`` units (the LSTM with forget bias 1)."""
    if name not in CELLS:
        raise CLIError(f"unknown cell {name!r}; choose from {', '.join(CELLS)}.")
    return getattr(cells, name)(hidden, **({"forget_bias": 1.0} if name == "lstm" else {}))


# --------------------------------------------------------------------------- configurations


def _flag(key: str) -> str:
    """The command-line spelling of a config key (``test_fraction`` -> ``--test-fraction``)."""
    return "task" if key == "task" else "--" + key.replace("_", "-")


def _same(given: Any, saved: Any) -> bool:
    """Whether an explicit option equals a saved one (numbers by value, lists by items)."""
    if isinstance(saved, list) or isinstance(given, (list, tuple)):
        return list(given) == list(saved) if isinstance(saved, (list, tuple)) else False
    if isinstance(saved, bool) or isinstance(given, bool):
        return given is saved
    if isinstance(saved, (int, float)) and isinstance(given, (int, float)):
        return float(given) == float(saved)
    return given == saved


def _task(name: str | None):
    if name is None:
        raise CLIError(f"train needs a TASK: one of {', '.join(TASKS)} (see `seqjax train --help`).")
    if name not in TASKS:
        raise CLIError(f"unknown task {name!r}; choose from {', '.join(TASKS)}.")
    return TASKS[name]


def _foreign_options(task_name: str, given: dict) -> None:
    """``CLIError`` for an option of another task."""
    owner = option_owner()
    for key, v in given.items():
        if v is not None and key in owner and owner[key].name != task_name:
            raise CLIError(
                f"{_flag(key)} is an option of the {owner[key].name} task, not of {task_name}; "
                f"`seqjax train --help` lists each task's options."
            )


def _cadence(steps: int) -> tuple[int, int]:
    """``(log_every, eval_every)`` of a run of ``steps``: a row about every tenth of the run
    (at most 50 steps apart) and an evaluation about every quarter."""
    log_every = max(1, min(50, steps // 10))
    return log_every, log_every * max(1, (steps // log_every) // 4)


def new_config(given: dict[str, Any]) -> dict[str, Any]:
    """The configuration of a new run from the explicit options ``given`` (config key ->
    value, ``None`` for an option not given): ``TRAIN_DEFAULTS`` for the rest, and the
    task's sequence length, options and sizes (``Task.configure``). ``CLIError`` for an
    unknown task or cell, or a bad or foreign task option."""
    task = _task(given.get("task"))
    _foreign_options(task.name, given)
    config: dict[str, Any] = {"task": task.name}
    for key, default in TRAIN_DEFAULTS.items():
        config[key] = default if given.get(key) is None else given[key]
    if config["cell"] not in CELLS:
        raise CLIError(f"unknown cell {config['cell']!r}; choose from {', '.join(CELLS)}.")
    config.update(task.configure(given.get("T"), {o.key: given.get(o.key) for o in task.options}))
    config["log_every"], config["eval_every"] = _cadence(int(config["steps"]))
    return config


def resume_config(given: dict[str, Any], saved: dict[str, Any], cfg_path: str) -> tuple[dict, list[str]]:
    """The configuration of a resumed run: the ``saved`` one (read from ``cfg_path``), with
    ``--steps`` and ``--checkpoint-every`` replaced when given (``RESUME_MAY_CHANGE``).

    Any other explicit option (``given[key]`` not ``None``) must equal the saved value, else
    a ``CLIError`` names both (``--hidden 32 contradicts the run's saved hidden=64 (...)``).
    The task's options and sizes are recomputed from the saved options (``Task.configure``)
    and must match the saved ones (a character corpus whose text changed does not). A run
    directory of an older seqjax lacks some keys: the task's take the value derived from
    the saved ones (an explicit different value is a contradiction too), the others
    (``seed``, ``steps``, ...) the explicit value or the default; the returned notes say
    which.

    Returns:
      ``(config, notes)``.
    """
    task = _task(saved.get("task"))
    _foreign_options(task.name, given)
    for key, v in given.items():
        if v is None or key in RESUME_MAY_CHANGE or key not in saved:
            continue
        if not _same(v, saved[key]):
            drop = "leave out TASK" if key == "task" else "drop the option"
            raise CLIError(
                f"{_flag(key)} {fmt_value(v)} contradicts the run's saved {key}={fmt_value(saved[key])} "
                f"({cfg_path}); {drop} or start a new run."
            )
    config = dict(saved)
    notes: list[str] = []
    missing: list[str] = []  # keys an older run directory lacks, with the value used
    for key, default in TRAIN_DEFAULTS.items():
        if key in RESUME_MAY_CHANGE and given.get(key) is not None:
            config[key] = given[key]
        elif key not in config:
            config[key] = default if given.get(key) is None else given[key]
            if key != "checkpoint_every":
                missing.append(f"{key}={fmt_value(config[key])}")
    # the task's options and sizes, derived from the saved options alone (an older run
    # directory may lack some, e.g. the copy task's length and delay, derived from its T)
    opts = {o.key: saved.get(o.key) for o in task.options}
    T = saved.get("T", given.get("T"))
    derived = task.configure(None if T is None else int(T), opts)
    for key, v in derived.items():
        if key == "source":
            if key in saved and saved[key] != v:
                notes.append(
                    f"the run's text was read from {saved[key]}; it is now read from {v}, and may differ"
                )
            continue
        if key in saved:
            if not _same(v, saved[key]):
                raise CLIError(
                    f"the run's saved {key}={fmt_value(saved[key])} ({cfg_path}) is not what its task gives "
                    f"now ({key}={fmt_value(v)}); the saved model cannot continue on this data. "
                    "Start a new run."
                )
            continue
        if given.get(key) is not None and not _same(given[key], v):
            raise CLIError(
                f"{_flag(key)} {fmt_value(given[key])} contradicts the run's {key}={fmt_value(v)} "
                f"(derived from its saved options, {cfg_path}); drop the option or start a new run."
            )
        config[key] = v
        if key not in ("input_size", "output_size", "loss", "per_step"):
            missing.append(f"{key}={fmt_value(v)}")
    if "log_every" not in config or "eval_every" not in config:
        config["log_every"], config["eval_every"] = _cadence(int(config["steps"]))
    if missing:
        notes.insert(
            0,
            f"{cfg_path} lacks options that seqjax now saves (written by an older seqjax): "
            f"using {', '.join(missing)}",
        )
    return config, notes


def read_config(run_dir: str) -> tuple[dict, str]:
    """``(config, path)`` of a run directory's ``config.json``; ``CLIError`` when it is
    missing or unreadable."""
    cfg_path = os.path.join(run_dir, "config.json")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError(f"expected a JSON object, got {type(config).__name__}")
    except FileNotFoundError:
        raise CLIError(
            f"{run_dir!r} has no config.json: not a seqjax run directory (made by `seqjax train` or `demo`)."
        ) from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise CLIError(f"cannot read {cfg_path!r}: {type(e).__name__}: {e}.") from None
    return config, cfg_path


def checkpoint_step(run_dir: str) -> int | None:
    """The step of the latest checkpoint in ``run_dir/checkpoints`` (its numbered folders),
    or ``None``."""
    ckpt = os.path.join(run_dir, "checkpoints")
    steps = [int(n) for n in os.listdir(ckpt) if n.isdigit()] if os.path.isdir(ckpt) else []
    return max(steps) if steps else None


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
    """``loss_fn(params, batch) -> (loss, metrics)`` of the run's task (``has_aux=True``)."""
    task = TASKS[config["task"]]

    def loss_fn(params, batch):
        out = model.apply(params, task.encode(config, batch[0]))
        return task.loss(config, out, batch)

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
    """``(config, cell, model, params, meta)`` of a run directory; ``CLIError`` if unreadable.

    ``model`` takes the inputs the task's data give it (for ``char``, one-hot characters
    of the run's ``config["vocab"]``)."""
    from seqjax.train import restore_checkpoint

    if not os.path.isdir(run_dir):
        raise CLIError(
            f"{run_dir!r} is not a directory; pass a run directory written by `seqjax train` or `demo`."
        )
    config, cfg_path = read_config(run_dir)
    missing = [
        k for k in ("cell", "hidden", "input_size", "output_size", "loss", "lr", "clip") if k not in config
    ]
    if missing:
        raise CLIError(f"cannot read {cfg_path!r}: KeyError: {missing[0]!r}.")
    ckpt = os.path.join(run_dir, "checkpoints")
    try:
        restored = restore_checkpoint(ckpt, _template(config))
    except CLIError:
        raise
    except Exception as e:  # orbax raises many kinds
        raise CLIError(f"cannot read the checkpoint in {ckpt!r}: {type(e).__name__}: {e}") from None
    if restored is None:
        raise CLIError(f"no checkpoint in {ckpt!r}; train first (`seqjax train ... --run-dir {run_dir}`).")
    state, meta = restored
    cell, model = _build(config)
    return config, cell, model, state.params, meta


# --------------------------------------------------------------------------- training core


def _train(
    config: dict,
    run_dir: str,
    *,
    resume: bool,
    progress: bool,
    quiet: bool,
) -> tuple[Any, list[dict], TaskData]:
    """Train per ``config`` (its task, model, ``steps``, ``batch``, ``seed``,
    ``checkpoint_every``, ``log_every``, ``eval_every``) into ``run_dir`` with
    ``seqjax.train.fit``; ``config.json`` is written before training starts.

    Returns ``(params, history, data)`` (``data``: the task's ``TaskData``).
    """
    task = TASKS[config["task"]]
    k_init, k_fit, k_test = jax.random.split(jax.random.key(int(config["seed"])), 3)
    data = task.load(config, k_test)
    batch = int(config["batch"])
    if data.n_train is not None and batch > data.n_train:
        raise CLIError(
            f"--batch {batch} is more than the {data.n_train} training examples of {task.name} "
            f"(T={config['T']}); pass --batch {data.n_train} or less."
        )
    _, model = _build(config)
    params = model.init(k_init, int(config["input_size"]))
    os.makedirs(run_dir, exist_ok=True)
    _write_json(os.path.join(run_dir, "config.json"), config)
    every = config.get("checkpoint_every")
    result = fit(
        _loss_fn(config, model),
        _optimizer(config),
        params,
        data.train,
        key=k_fit,
        steps=int(config["steps"]),
        batch_size=None if data.n_train is None else batch,
        has_aux=True,
        evaluation=Evaluation(data.test, every=int(config["eval_every"]), batch_size=EVAL_SIZE),
        checkpoints=Checkpoints(
            os.path.join(run_dir, "checkpoints"), every=None if every is None else int(every), resume=resume
        ),
        logging=Logging(
            every=int(config["log_every"]),
            history_path=os.path.join(run_dir, "history.json"),
            progress=progress and not quiet,
        ),
        mesh=None,
    )
    return result.state.params, result.history, data


def _final_eval(history: list[dict], key: str = "eval_loss") -> float | None:
    """The last ``key`` of the history rows (``None`` if no row has one)."""
    for row in reversed(history):
        if key in row:
            return float(row[key])
    return None
