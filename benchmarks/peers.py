"""The implementations the speed and memory suites compare: seqjax and its peers.

Every JAX implementation is an ``Impl`` whose ``build`` returns ``(apply, params)`` with
``apply(params, xs) -> ys``, ``xs: (B, T, I)``, ``ys: (B, T, H)`` (batch-major, float32),
so one harness times forward (``apply``) and forward+backward (the gradient of
``sum(ys**2)`` with respect to every parameter and the inputs) for all of them alike.

PyTorch is handled apart (``torch_module``): a ``torch.nn.RNN/LSTM/GRU`` that receives
seqjax's weights, so it is also the independent correctness reference.

Cell kinds: ``"rnn"`` (Elman, tanh), ``"lstm"``, ``"gru"`` (PyTorch's convention).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import seqjax as sj
from benchmarks.common import optional_import

__all__ = [
    "KINDS",
    "GATES",
    "Impl",
    "make_cell",
    "seqjax_impls",
    "textbook_apply",
    "peer_impls",
    "torch_module",
    "torch_grads_as_seqjax",
    "unroll_options",
]

KINDS = ("rnn", "lstm", "gru")
#: Gate blocks per kind: the recurrent matmul is ``(B, H) @ (H, G*H)``.
GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def make_cell(kind: str, hidden: int) -> sj.Cell:
    """The seqjax cell of a benchmark kind (Elman = tanh ``rnn``)."""
    if kind == "rnn":
        return sj.rnn(hidden)
    if kind == "lstm":
        return sj.lstm(hidden)
    if kind == "gru":
        return sj.gru(hidden)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


@dataclass(frozen=True)
class Impl:
    """One implementation: a display ``name``, its ``library`` and a ``build`` function
    ``(kind, hidden, input_size, sj_params, key) -> (apply, params)``."""

    name: str
    library: str
    build: Callable[..., tuple[Callable, Any]]
    note: str = ""


# --------------------------------------------------------------------------- seqjax


def unroll_options() -> dict[str, Any]:
    """Which optional keywords this checkout's ``seqjax.unroll`` accepts (``gradient``,
    ``solver``, ...), read from its signature so the suite runs against any stage of the
    library."""
    params = inspect.signature(sj.unroll).parameters
    return {name: p.default for name, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY}


def _seqjax_build(**unroll_kwargs):
    def build(kind, hidden, input_size, sj_params, key):
        cell = make_cell(kind, hidden)

        def apply(p, xs):
            return sj.unroll(cell, p, xs, **unroll_kwargs)[1]

        return apply, sj_params

    return build


def seqjax_impls() -> list[Impl]:
    """seqjax's default path, plus plain autodiff through the scan when ``unroll`` takes a
    gradient strategy (``gradient=Autodiff()``, to show what the fused BPTT kernel buys)."""
    impls = [Impl("seqjax", "seqjax", _seqjax_build())]
    opts = unroll_options()
    if "gradient" in opts:
        impls.append(
            Impl(
                "seqjax (autodiff)",
                "seqjax",
                _seqjax_build(gradient=sj.gradients.Autodiff()),
                "unroll(..., gradient=seqjax.gradients.Autodiff())",
            )
        )
    return impls


# --------------------------------------------------------------------------- textbook scan


def _row(b):
    return b.reshape((1,) + b.shape)


def textbook_apply(kind: str) -> Callable:
    """The ``lax.scan`` a user writes by hand from the equations, on seqjax's param dict
    (``w_x: (I, G H)``, ``w_h: (H, G H)``, ``b``, ``b_h`` for the GRU). No hoisting, no
    custom gradient: what ``jax.grad`` of a straightforward scan gives."""

    def step_rnn(p, h, x):
        h = jnp.tanh(x @ p["w_x"] + h @ p["w_h"] + _row(p["b"]))
        return h, h

    def step_lstm(p, carry, x):
        h, c = carry
        z = x @ p["w_x"] + h @ p["w_h"] + _row(p["b"])
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    def step_gru(p, h, x):
        gx = x @ p["w_x"] + _row(p["b"])
        gh = h @ p["w_h"] + _row(p["b_h"])
        xr, xz, xn = jnp.split(gx, 3, axis=-1)
        hr, hz, hn = jnp.split(gh, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        return h, h

    step = {"rnn": step_rnn, "lstm": step_lstm, "gru": step_gru}[kind]

    def apply(p, xs):
        B = xs.shape[0]
        H = p["w_h"].shape[0]
        h0 = jnp.zeros((B, H), xs.dtype)
        carry = (h0, h0) if kind == "lstm" else h0
        _, ys = jax.lax.scan(lambda c, x: step(p, c, x), carry, jnp.swapaxes(xs, 0, 1))
        return jnp.swapaxes(ys, 0, 1)

    return apply


def _textbook_build(kind, hidden, input_size, sj_params, key):
    return textbook_apply(kind), sj_params


# --------------------------------------------------------------------------- Flax linen


def _flax_build(cell_name: str):
    def build(kind, hidden, input_size, sj_params, key):
        nn = optional_import("flax.linen")
        cell_cls = getattr(nn, cell_name)
        model = nn.RNN(cell_cls(features=hidden))
        xs0 = jnp.zeros((1, 2, input_size), jnp.float32)
        params = model.init(key, xs0)["params"]

        def apply(p, xs):
            return model.apply({"params": p}, xs)

        return apply, params

    return build


# --------------------------------------------------------------------------- Equinox


def _equinox_build(cell_name: str):
    def build(kind, hidden, input_size, sj_params, key):
        eqx = optional_import("equinox")
        cell = getattr(eqx.nn, cell_name)(input_size, hidden, key=key)
        params, static = eqx.partition(cell, eqx.is_array)
        is_lstm = cell_name == "LSTMCell"

        def run_one(p, x):  # x: (T, I), one sequence
            c = eqx.combine(p, static)
            h0 = jnp.zeros((hidden,), x.dtype)
            carry0 = (h0, h0) if is_lstm else h0

            def body(carry, x_t):
                new = c(x_t, carry)
                return new, (new[0] if is_lstm else new)

            return jax.lax.scan(body, carry0, x)[1]

        def apply(p, xs):
            return jax.vmap(run_one, in_axes=(None, 0))(p, xs)

        return apply, params

    return build


def peer_impls(kind: str) -> tuple[list[Impl], list[str]]:
    """JAX peers for a cell kind, and lines saying which peers are missing and why."""
    impls: list[Impl] = [Impl("textbook lax.scan", "jax", _textbook_build)]
    skipped: list[str] = []
    if optional_import("flax.linen") is None:
        skipped.append("flax: not installed")
    else:
        names = {"rnn": ["SimpleCell"], "lstm": ["LSTMCell", "OptimizedLSTMCell"], "gru": ["GRUCell"]}[kind]
        impls += [Impl(f"flax {n}", "flax", _flax_build(n)) for n in names]
    if optional_import("equinox") is None:
        skipped.append("equinox: not installed")
    elif kind == "rnn":
        skipped.append("equinox: has no Elman (tanh RNN) cell")
    else:
        n = {"lstm": "LSTMCell", "gru": "GRUCell"}[kind]
        impls.append(
            Impl(f"equinox {n}", "equinox", _equinox_build(n), "vmap over batch, lax.scan over time")
        )
    return impls, skipped


# --------------------------------------------------------------------------- PyTorch


def torch_module(torch, kind: str, hidden: int, input_size: int, sj_params: dict):
    """``torch.nn.RNN/LSTM/GRU`` (one layer, ``batch_first``) carrying seqjax's weights:
    ``weight_ih = w_x^T``, ``weight_hh = w_h^T``, ``bias_ih = b``, ``bias_hh = b_h`` (zeros
    where seqjax has a single bias). Gate orders already agree (LSTM ``i,f,g,o``; GRU ``r,z,n``)."""
    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    m = cls(input_size, hidden, batch_first=True)
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.from_numpy(np.asarray(sj_params["w_x"]).T.copy()))
        m.weight_hh_l0.copy_(torch.from_numpy(np.asarray(sj_params["w_h"]).T.copy()))
        m.bias_ih_l0.copy_(torch.from_numpy(np.asarray(sj_params["b"]).copy()))
        if "b_h" in sj_params:
            m.bias_hh_l0.copy_(torch.from_numpy(np.asarray(sj_params["b_h"]).copy()))
        else:
            m.bias_hh_l0.zero_()
    return m


def torch_grads_as_seqjax(m, sj_params: dict) -> dict:
    """The gradients held by a ``torch_module`` in seqjax's param layout."""
    g = {
        "w_x": m.weight_ih_l0.grad.numpy().T,
        "w_h": m.weight_hh_l0.grad.numpy().T,
        "b": m.bias_ih_l0.grad.numpy(),
    }
    if "b_h" in sj_params:
        g["b_h"] = m.bias_hh_l0.grad.numpy()
    return g
