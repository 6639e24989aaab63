"""GPU mode: seqjax against cuDNN (PyTorch's and JAX's) and Flax, and the spectrum suite on GPU.

``python -m benchmarks.gpu [--budget-s 480] [--out DIR] [--rounds N] [--configs NAME ...]
[--spectrum-mode quick|full|none] [--cpu-test]``

On a machine with a CUDA GPU, in one process, for each row (configuration x cell):

1. implementations: seqjax (``unroll``, default kernel), seqjax with the opt-in cuDNN LSTM
   kernel (``seqjax.cells._cudnn.cudnn_lstm_kernel``), ``jax.experimental.rnn.lstm``
   called directly, Flax linen (``OptimizedLSTMCell``, ``LSTMCell``, ``GRUCell`` through
   ``nn.RNN``) and PyTorch's ``nn.LSTM``/``nn.GRU`` on ``cuda`` (cuDNN). The LSTM rows have
   them all; the GRU rows have seqjax, Flax and PyTorch (``jax.experimental.rnn`` has no GRU);
2. every JAX implementation is compiled (compile time recorded apart);
3. correctness before timing: the implementations that take seqjax's weights (the cuDNN
   kernel, ``jax.experimental.rnn`` on the packed weights, PyTorch through
   ``benchmarks.peers.torch_module``) are compared with seqjax, outputs and gradients of
   ``sum(ys**2)`` with respect to the weights and the inputs. On GPU this runs twice: at
   full float32 (``jax.default_matmul_precision("highest")``, TF32 off in PyTorch), to the
   tolerances of the CPU speed suite, and on the functions that are timed (default precision,
   where cuDNN and XLA may use TF32), to a loose tolerance that still catches a wrong layout
   (O(1) errors). Flax has its own weights: its outputs and gradients must be finite and
   shaped like seqjax's. An implementation that fails is not timed;
4. timing, interleaved (``benchmarks.common.time_interleaved``): after two warm-up calls
   each, ``rounds`` rounds over the implementations of the row (the order rotated every
   round), one call each, ended by ``jax.block_until_ready`` / ``torch.cuda.synchronize()``;
   the median of the per-call times (min and max kept), ratios to seqjax in the same run,
   matmul GFLOP/s.

Rows: the speed suite's configurations (``benchmarks.speed.CONFIGS``: small, medium, large,
long) and the DeepBench-like training configuration (B=64, T=100, I=H, H=512 and H=1024),
most informative first. Then the spectrum suite (``benchmarks.spectrum``, each case a row) and
the eigenvalues of its step Jacobians: on the device when its backend has a general
eigendecomposition, and on the host (``seqjax.spectrum.eigvals(..., host=True)``: NumPy
through ``jax.pure_callback``) always, the two compared.

A wall-clock budget (``--budget-s``, default 8 minutes): a row is not started when the time
spent plus the longest row of its section so far would exceed it; the result says which rows
were left out. The JSON and Markdown (``<out>/gpu.json``, ``<out>/gpu.md``) are written after
every row, marked partial until the end. Versions of JAX, jaxlib, CUDA, cuDNN and PyTorch and
the device names are recorded (the GPU machine's packages may differ from the CPU pins).

``--cpu-test`` runs the same code on CPU with toy sizes (numbers mean nothing): the cuDNN
kernel runs its fallback, PyTorch runs on CPU, ``jax.experimental.rnn.lstm`` (cuDNN only) is
replaced by its CPU reference ``lstm_ref`` on the same packed weights, the full-precision
recheck is skipped (XLA:CPU float32 matmuls are full float32 already), and the output says
so. Its files go to a temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import seqjax as sj
from benchmarks import common, peers, report, spectrum, speed
from seqjax.cells import _cudnn

__all__ = ["ROWS", "CPU_TEST_ROWS", "KINDS", "LIBRARIES", "run", "to_markdown", "main"]

#: Rows in the order they run (most informative first): name -> (B, T, I, H).
ROWS: dict[str, tuple[int, int, int, int]] = {
    "medium": speed.CONFIGS["medium"],
    "large": speed.CONFIGS["large"],
    "deepbench_h512": (64, 100, 512, 512),
    "deepbench_h1024": (64, 100, 1024, 1024),
    "small": speed.CONFIGS["small"],
    "long": speed.CONFIGS["long"],
}
CPU_TEST_ROWS: dict[str, tuple[int, int, int, int]] = {"tiny": speed.CONFIGS["tiny"]}
KINDS = ("lstm", "gru")

FWD_TOL, GRAD_TOL = speed.FWD_TOL, speed.GRAD_TOL  # full float32 (see benchmarks.speed)
# Default precision on GPU: cuDNN and XLA may round matmul inputs to TF32 (10-bit mantissa,
# relative error ~1e-3 per product, compounded over T steps and summed differently by each
# implementation). 5e-2 relative passes that and still fails a wrong weight layout or gate
# order, which gives O(1) differences.
TF32_TOL = 5e-2
EIG_TOL = 1e-3  # spectral radius, float32 LAPACK on the host vs the backend's solver


# --------------------------------------------------------------------------- environment


def environment(torch, device_kind: str) -> dict[str, Any]:
    """Versions and devices of this run: JAX, jaxlib, CUDA and cuDNN as JAX and PyTorch see them."""
    import jaxlib

    env: dict[str, Any] = {
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", None),
        "jax_backend": jax.default_backend(),
        "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "device_used": device_kind,
        "cudnn_lstm_traceable": _cudnn.cudnn_available(),
        "jax_default_matmul_precision": getattr(jax.config, "jax_default_matmul_precision"),  # noqa: B009
    }
    try:  # private, so guarded: the CUDA libraries JAX's plugin loaded
        from jax._src.lib import cuda_versions

        if cuda_versions is not None:
            for name in ("cuda_runtime", "cuda_driver", "cudnn", "cublas", "cusolver"):
                fn = getattr(cuda_versions, f"{name}_get_version", None)
                if fn is not None:
                    env[f"jax_{name}_version"] = fn()
    except Exception as e:  # noqa: BLE001 - informative only
        env["jax_cuda_versions_error"] = f"{type(e).__name__}: {e}"
    try:
        env["jax_environment_info"] = jax.print_environment_info(return_string=True)
    except Exception as e:  # noqa: BLE001 - informative only
        env["jax_environment_info"] = f"unavailable ({type(e).__name__}: {e})"
    if torch is not None:
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["torch_cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        env["torch_cuda_available"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            env["torch_device"] = torch.cuda.get_device_name(0)
        try:
            env["torch_tf32"] = _torch_tf32_settings(torch)
        except Exception as e:  # noqa: BLE001 - informative only
            env["torch_tf32"] = f"unreadable ({type(e).__name__}: {e})"
    return env


# --------------------------------------------------------------------------- implementations


def _cudnn_cell(hidden: int) -> sj.Cell:
    """seqjax's LSTM with the cuDNN kernel: ``seqjax.lstm(H, cudnn=True)`` where the library
    offers it, else the kernel swapped in by hand (the same thing)."""
    if "cudnn" in inspect.signature(sj.lstm).parameters:
        return sj.lstm(hidden, **{"cudnn": True})
    base = sj.lstm(hidden)
    assert base.kernel is not None  # the unprojected LSTM has its fused kernel
    return base._replace(kernel=_cudnn.cudnn_lstm_kernel(base.kernel, hidden))


def _rnn_ref(xs, h0, c0, w, I, H):
    """``jax.experimental.rnn.lstm_ref`` on packed weights (the CPU stand-in for ``rnn.lstm``)."""
    from jax.experimental import rnn

    W_ih, W_hh, b_ih, b_hh = rnn.unpack_lstm_weights(w, I, H, 1, False)
    lengths = jnp.full((xs.shape[0],), xs.shape[1], jnp.int32)
    return rnn.lstm_ref(xs, h0, c0, W_ih, W_hh, b_ih, b_hh, lengths, I, H, 1, 0.0, False)


def _rnn_apply(I: int, H: int, *, on_gpu: bool) -> Callable:
    """``apply(w, xs (B, T, I)) -> ys (B, T, H)`` of ``jax.experimental.rnn`` from a zero carry."""
    from jax.experimental import rnn

    def apply(w, xs):
        B = xs.shape[0]
        h0 = jnp.zeros((1, B, H), xs.dtype)
        if on_gpu:
            lengths = jnp.full((B,), xs.shape[1], jnp.int32)
            return rnn.lstm(xs, h0, h0, w, lengths, I, H, 1, 0.0, False)[0]
        return _rnn_ref(xs, h0, h0, w, I, H)[0]

    return apply


LIBRARIES = ("seqjax", "jax", "flax", "torch")


def _jax_impls(kind, H, I, sj_params, key, *, on_gpu, result, where, libraries) -> list[dict[str, Any]]:
    """The JAX implementations of a row: dicts with name, library, apply, params, note and
    ``weights``: how its gradient maps to seqjax's (``"seqjax"``, ``"packed"``, or ``None``
    for implementations with their own weights). seqjax's default path is always there (the
    reference); the others only from ``libraries``."""
    impls = []
    for impl in peers.seqjax_impls()[:1]:  # "seqjax": unroll's default
        apply, params = impl.build(kind, H, I, sj_params, key)
        impls.append(
            {
                "name": "seqjax",
                "library": "seqjax",
                "apply": apply,
                "params": params,
                "note": "",
                "weights": "seqjax",
            }
        )
    if kind == "lstm" and "seqjax" in libraries:
        cell = _cudnn_cell(H)

        def apply_cudnn(p, xs, cell=cell):
            return sj.unroll(cell, p, xs)[1]

        note = "cuDNN on cuda" if on_gpu else "no cuDNN here: runs its fallback (the default kernel)"
        impls.append(
            {
                "name": "seqjax (cuDNN kernel)",
                "library": "seqjax",
                "apply": apply_cudnn,
                "params": sj_params,
                "note": note,
                "weights": "seqjax",
            }
        )
    if kind == "lstm" and "jax" in libraries:
        name = "jax.experimental.rnn.lstm" if on_gpu else "jax.experimental.rnn.lstm_ref (CPU stand-in)"
        impls.append(
            {
                "name": name,
                "library": "jax",
                "apply": _rnn_apply(I, H, on_gpu=on_gpu),
                "params": _cudnn.pack_cudnn_lstm_weights(sj_params, H),
                "note": "seqjax's weights, packed" + ("" if on_gpu else "; rnn.lstm is cuDNN only"),
                "weights": "packed",
            }
        )
    if kind != "lstm":
        _note_once(result, f"{where}: no cuDNN GRU from JAX (jax.experimental.rnn implements the LSTM only)")
    if "flax" not in libraries:
        return impls
    peer_list, skipped = peers.peer_impls(kind)
    for s in skipped:
        if s.startswith("flax"):
            _note_once(result, f"{where}: {s}", skipped=True)
    for impl in peer_list:
        if impl.library != "flax":
            continue  # the textbook scan and Equinox are the CPU suite's; not timed here
        apply, params = impl.build(kind, H, I, sj_params, key)
        impls.append(
            {
                "name": impl.name,
                "library": "flax",
                "apply": apply,
                "params": params,
                "note": "nn.RNN",
                "weights": None,
            }
        )
    return impls


def _note_once(result, line, *, skipped=False):
    target = result["skipped" if skipped else "notes"]
    if line not in target:
        target.append(line)


def _loss(apply):
    def loss(p, xs):
        ys = apply(p, xs)
        return jnp.sum(ys * ys)

    return loss


def _as_packed_grads(g: dict, H: int) -> jax.Array:
    """seqjax's weight gradients in cuDNN's packed layout: ``b_ih`` and ``b_hh`` both add to
    the pre-activations, so each gets the gradient of ``b`` (seqjax's LSTM has one bias)."""
    g = dict(g)
    g.setdefault("b_h", g["b"])
    return _cudnn.pack_cudnn_lstm_weights(g, H)


# --------------------------------------------------------------------------- PyTorch


def _torch_fns(torch, kind, H, I, sj_params, xs_np, device):
    """``(module, x_grad_tensor, forward(), forward_backward())``: ``torch.nn.LSTM/GRU`` with
    seqjax's weights on ``device``; each function ends with a device synchronisation."""
    m = peers.torch_module(torch, kind, H, I, sj_params).to(device)
    x = torch.from_numpy(xs_np.copy()).to(device)
    xg = x.clone().requires_grad_(True)
    params = list(m.parameters())
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            out = m(x)[0]
        sync()
        return out

    def fwdbwd():
        for p in params:
            p.grad = None
        xg.grad = None
        out = m(xg)[0]
        (out * out).sum().backward()
        sync()

    return m, xg, fwd, fwdbwd


def _torch_grads(m, xg, sj_params) -> tuple[dict, np.ndarray]:
    """PyTorch's gradients in seqjax's layout (host NumPy), and the inputs' gradient."""

    def host(t):
        return t.detach().cpu().numpy()

    g = {
        "w_x": host(m.weight_ih_l0.grad).T,
        "w_h": host(m.weight_hh_l0.grad).T,
        "b": host(m.bias_ih_l0.grad),
    }
    if "b_h" in sj_params:
        g["b_h"] = host(m.bias_hh_l0.grad)
    return g, host(xg.grad)


def _torch_tf32_settings(torch) -> dict[str, Any]:
    """PyTorch's TF32 switches for cuDNN's RNNs and cuBLAS matmuls: the ``fp32_precision``
    settings where this PyTorch has them (2.9+; reading the legacy ``allow_tf32`` flags there
    can raise), else the legacy flags."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        return {
            "cudnn.rnn.fp32_precision": rnn.fp32_precision,
            "cuda.matmul.fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        }
    return {
        "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }


@contextlib.contextmanager
def _torch_full_float32(torch):
    """TF32 off in PyTorch's cuDNN RNNs and matmuls inside the block, restored after (the new
    ``fp32_precision`` API where present: PyTorch refuses a mix of the two APIs)."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        old = (rnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        rnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            rnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision = old
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# --------------------------------------------------------------------------- timing


def _blocking(compiled, *args):
    def call():
        return jax.block_until_ready(compiled(*args))

    return call


# --------------------------------------------------------------------------- one speed row


def _check(result, where, what, got, ref, tol) -> bool:
    try:
        err = common.tree_rel_err(got, ref)
    except ValueError as e:  # shapes or leaf counts differ
        result["checks"].append({"where": where, "what": what, "error": str(e), "tol": tol, "ok": False})
        return False
    ok = bool(np.isfinite(err) and err <= tol)
    result["checks"].append({"where": where, "what": what, "rel_err": err, "tol": tol, "ok": ok})
    return ok


def _finite_like(result, where, name, out, grads, ref_out) -> bool:
    leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves((out, grads))]
    ok = np.shape(out) == np.shape(ref_out) and all(bool(np.all(np.isfinite(a))) for a in leaves)
    result["checks"].append(
        {
            "where": where,
            "what": f"{name}: outputs shaped like seqjax's, outputs and gradients finite",
            "ok": ok,
        }
    )
    return ok


def _compare_all(result, where, impls, compiled, xs, torch_side, H, *, tol_fwd, tol_grad, label):
    """Compare every weight-sharing implementation with seqjax (compiled functions given);
    returns the names that failed."""
    ref = compiled["seqjax"]
    ys = np.asarray(ref[0](impls["seqjax"]["params"], xs))
    g_p, g_x = ref[1](impls["seqjax"]["params"], xs)
    failed = []
    for name, impl in impls.items():
        if name == "seqjax" or name not in compiled:
            continue
        fwd, bwd = compiled[name]
        out = np.asarray(fwd(impl["params"], xs))
        grads = bwd(impl["params"], xs)
        if impl["weights"] is None:
            ok = _finite_like(result, where, name, out, grads, ys)
        else:
            want = (g_p, g_x) if impl["weights"] == "seqjax" else (_as_packed_grads(g_p, H), g_x)
            ok = _check(result, where, f"{label}forward: {name} vs seqjax", out, ys, tol_fwd)
            ok &= _check(result, where, f"{label}gradients: {name} vs seqjax", grads, want, tol_grad)
        if not ok:
            failed.append(name)
    if torch_side is not None:
        torch, m, xg, t_fwd, t_bwd, sj_params = torch_side
        out = t_fwd().detach().cpu().numpy()
        t_bwd()
        tg = _torch_grads(m, xg, sj_params)
        ok = _check(result, where, f"{label}forward: torch vs seqjax", out, ys, tol_fwd)
        ok &= _check(result, where, f"{label}gradients: torch vs seqjax", tg, (g_p, g_x), tol_grad)
        if not ok:
            failed.append("torch")
    return failed


def _speed_row(result, cfg, kind, B, T, I, H, *, rounds, torch, device, on_gpu, libraries, log) -> None:
    where = f"{cfg}/{kind}"
    key = jax.random.key(zlib.crc32(f"gpu/{cfg}/{kind}".encode()))
    k_p, k_x, k_peer = jax.random.split(key, 3)
    sj_params = peers.make_cell(kind, H).init(k_p, I)
    xs = jax.random.normal(k_x, (B, T, I), jnp.float32)
    xs_np = np.asarray(xs)

    impls = {
        i["name"]: i
        for i in _jax_impls(
            kind, H, I, sj_params, k_peer, on_gpu=on_gpu, result=result, where=where, libraries=libraries
        )
    }
    compiled, compile_s = {}, {}
    for name, impl in impls.items():
        fc, fcs = common.compile_jax(impl["apply"], impl["params"], xs)
        bc, bcs = common.compile_jax(jax.grad(_loss(impl["apply"]), argnums=(0, 1)), impl["params"], xs)
        compiled[name], compile_s[name] = (fc, bc), (fcs, bcs)
        log(f"  compiled {where} {name}: {fcs:.2f} s + {bcs:.2f} s")

    torch_side = None
    if torch is not None:
        m, xg, t_fwd, t_bwd = _torch_fns(torch, kind, H, I, sj_params, xs_np, device)
        torch_side = (torch, m, xg, t_fwd, t_bwd, sj_params)

    # correctness before timing
    failed = set()
    if on_gpu:  # full float32 everywhere: tight tolerances
        with jax.default_matmul_precision("highest"):
            exact = {}
            for name, impl in impls.items():
                if impl["weights"] is not None:
                    exact[name] = (
                        common.compile_jax(impl["apply"], impl["params"], xs)[0],
                        common.compile_jax(
                            jax.grad(_loss(impl["apply"]), argnums=(0, 1)), impl["params"], xs
                        )[0],
                    )
        with _torch_full_float32(torch) if torch is not None else contextlib.nullcontext():
            failed |= set(
                _compare_all(
                    result,
                    where,
                    impls,
                    exact,
                    xs,
                    torch_side,
                    H,
                    tol_fwd=FWD_TOL,
                    tol_grad=GRAD_TOL,
                    label="float32 (highest precision) ",
                )
            )
        del exact
        tol_fwd = tol_grad = TF32_TOL
    else:
        tol_fwd, tol_grad = FWD_TOL, GRAD_TOL
    failed |= set(
        _compare_all(
            result,
            where,
            impls,
            compiled,
            xs,
            torch_side,
            H,
            tol_fwd=tol_fwd,
            tol_grad=tol_grad,
            label="timed functions, default precision: " if on_gpu else "",
        )
    )
    if "seqjax" in failed:
        result["skipped"].append(f"{where}: seqjax failed a check; no times for this row")
        return
    for name in sorted(failed):
        result["skipped"].append(f"{where}: {name} failed a correctness check and is not timed")

    # timing, interleaved, one pass at a time
    rows = []
    for pass_, idx in (("forward", 0), ("forward+backward", 1)):
        fns = {
            name: _blocking(compiled[name][idx], impls[name]["params"], xs)
            for name in impls
            if name not in failed
        }
        if torch_side is not None and "torch" not in failed:
            fns["torch"] = torch_side[3] if idx == 0 else torch_side[4]
        stats = common.time_interleaved(fns, rounds=rounds, warmup=2)
        f = speed.flops(kind, B, T, I, H, backward=idx == 1)
        base = stats["seqjax"]
        for name, st in stats.items():
            this = impls.get(name)
            lib = this["library"] if this is not None else "torch"
            note = (
                this["note"]
                if this is not None
                else f"nn.{kind.upper()} on {device.type}" + (" (cuDNN)" if on_gpu else "")
            )
            row = {
                "config": cfg,
                "cell": kind,
                "B": B,
                "T": T,
                "I": I,
                "H": H,
                "impl": name,
                "library": lib,
                "pass": pass_,
                "note": note,
                **st,
                "compile_s": compile_s[name][idx] if name in compile_s else None,
                "flops": f,
                "gflops": f / st["median_s"] / 1e9,
                "ratio_median": st["median_s"] / base["median_s"],
                "ratio_min": st["min_s"] / base["min_s"],
            }
            if idx == 1 and name in compiled:
                row["memory"] = common.memory_stats(compiled[name][1])
            rows.append(row)
        log(
            f"  timed {where} {pass_}: "
            + ", ".join(f"{n} {report.fmt_time(s['median_s'])}" for n, s in stats.items())
        )
    result["rows"].extend(rows)


# --------------------------------------------------------------------------- spectrum and eigenvalues


def backend_eig() -> tuple[bool, str]:
    """Whether the default backend compiles a general (non-symmetric) eigendecomposition."""
    try:
        jax.jit(jnp.linalg.eigvals).lower(jnp.eye(2, dtype=jnp.float32)).compile()
        return True, ""
    except Exception as e:  # noqa: BLE001 - a probe: any failure means "no eig on this backend"
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _eig_row(result, kind, H, s, *, rounds, has_eig, log) -> None:
    """Eigenvalues of ``P`` step Jacobians ``(P, S, S)``: on the backend (when it has eig) and
    on the host; spectral radii compared."""
    spec = sj.spectrum
    I, P = s["I"], min(s["P"], min(s["Ts"]))
    key = jax.random.key(zlib.crc32(f"gpu/eig/{kind}/{H}".encode()))
    k_p, k_x = jax.random.split(key)
    cell = peers.make_cell(kind, H)
    params = cell.init(k_p, I)
    xs = jax.random.normal(k_x, (P, I), jnp.float32)
    J = jax.jit(lambda p, x: spec.step_jacobians(cell, p, x).jacobians)(params, xs)
    J = jax.block_until_ready(J)
    where = f"eigvals/{kind}/H={H}/P={P}"
    fns, radii, comp_s = {}, {}, {}
    for name, host in (("backend", False), ("host (NumPy via pure_callback)", True)):
        if not host and not has_eig:
            continue
        c, cs = common.compile_jax(lambda a, host=host: spec.eigvals(a, host=host), J)
        fns[name] = _blocking(c, J)
        radii[name] = np.max(np.abs(np.asarray(fns[name]())), axis=-1)
        comp_s[name] = cs
    if "backend" in radii:
        _check(
            result,
            where,
            "spectral radius per step: backend eig vs host NumPy",
            radii["backend"],
            radii["host (NumPy via pure_callback)"],
            EIG_TOL,
        )
    stats = common.time_interleaved(fns, rounds=rounds, warmup=2)
    S = J.shape[-1]
    for name, st in stats.items():
        result["eig_rows"].append(
            {"cell": kind, "H": H, "S": S, "P": P, "impl": name, **st, "compile_s": comp_s[name]}
        )
    log(f"  {where}: " + ", ".join(f"{n} {report.fmt_time(st['median_s'])}" for n, st in stats.items()))


# --------------------------------------------------------------------------- the run


class _Budget:
    """Wall clock against ``budget_s``: a row starts only if the time spent plus the longest
    row of its section so far fits."""

    def __init__(self, budget_s: float, t0: float):
        self.budget_s, self.t0 = float(budget_s), t0
        self.longest: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, section: str) -> bool:
        return self.elapsed() + self.longest.get(section, 0.0) <= self.budget_s

    def record(self, section: str, seconds: float) -> None:
        self.longest[section] = max(self.longest.get(section, 0.0), seconds)


def run(
    *,
    cpu_test: bool = False,
    budget_s: float = 480.0,
    rounds: int | None = None,
    configs: list[str] | None = None,
    kinds: list[str] | None = None,
    libraries: list[str] | None = None,
    spectrum_mode: str | None = None,
    out_dir: str | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the GPU mode (or its CPU test) and return the result dict; files are written to
    ``out_dir`` after every row (see the module docstring).

    Args:
      cpu_test: run on CPU with toy sizes, the GPU-only peers replaced or skipped.
      budget_s: wall-clock budget in seconds; rows that would exceed it are not started.
      rounds: timed rounds per implementation (default 15 on GPU, 3 in the CPU test).
      configs: row names (``ROWS``, or ``CPU_TEST_ROWS`` with ``cpu_test``); default all.
      kinds: cells of the speed rows, of ``("lstm", "gru")`` (default both).
      libraries: implementations to time beside seqjax's default path, of ``LIBRARIES``
        (``"seqjax"``: the cuDNN kernel; ``"jax"``: ``jax.experimental.rnn``; default all).
      spectrum_mode: ``"quick"``, ``"full"`` or ``"none"`` (default quick; ``"tiny"`` with
        ``cpu_test``).
      out_dir: where ``gpu.json`` and ``gpu.md`` go; ``None`` writes nothing.
      command: the command line recorded in the files.
      log: progress printer.
    """
    t0 = time.perf_counter()
    budget = _Budget(budget_s, t0)
    if cpu_test:
        device_ctx: contextlib.AbstractContextManager = jax.default_device(jax.devices("cpu")[0])
        on_gpu = False
    else:
        try:
            gpus = jax.devices("cuda")
        except RuntimeError as e:
            gpus, why = [], str(e)
        else:
            why = "the cuda backend has no devices"
        if not gpus:
            raise RuntimeError(
                f"benchmarks.gpu: no CUDA device for JAX ({why}); run `python -m benchmarks.gpu --cpu-test` "
                "to test this mode on CPU."
            )
        device_ctx = jax.default_device(gpus[0])
        on_gpu = True
    table = CPU_TEST_ROWS if cpu_test else ROWS
    names = list(configs) if configs else list(table)
    bad = [n for n in names if n not in table]
    if bad:
        raise ValueError(f"configs: unknown {bad}; this mode has {list(table)}.")
    kinds = list(kinds) if kinds else list(KINDS)
    if any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds: each must be one of {KINDS}, got {kinds}.")
    libraries = list(libraries) if libraries else list(LIBRARIES)
    if any(lib not in LIBRARIES for lib in libraries):
        raise ValueError(f"libraries: each must be one of {LIBRARIES}, got {libraries}.")
    rounds = int(rounds or (3 if cpu_test else 15))
    spectrum_mode = spectrum_mode or ("tiny" if cpu_test else "quick")

    result = common.new_result("gpu", "cpu-test" if cpu_test else "gpu")
    result.update(
        {
            "command": command or "python -m benchmarks.gpu",
            "budget_s": budget_s,
            "rounds": rounds,
            "tolerances": {
                "full_float32": [FWD_TOL, GRAD_TOL],
                "default_precision_gpu": TF32_TOL,
                "eig": EIG_TOL,
            },
            "eig_rows": [],
            "spectrum": None,
            "figures": [],
        }
    )
    torch = common.setup_torch() if "torch" in libraries else None
    device = None
    if "torch" not in libraries:
        result["notes"].append("torch: not asked for (--libraries)")
    elif torch is None:
        result["skipped"].append("torch: not installed (no PyTorch rows, no torch correctness check)")
    elif on_gpu and not torch.cuda.is_available():
        result["skipped"].append("torch: installed without CUDA on this machine: no PyTorch cuDNN rows")
        torch = None
    else:
        device = torch.device("cuda" if on_gpu else "cpu")
    with device_ctx:
        result["environment"] = environment(
            torch, str(jax.devices("cuda" if on_gpu else "cpu")[0].device_kind)
        )
    if cpu_test:
        result["notes"].append(
            "CPU TEST (--cpu-test): toy sizes, numbers mean nothing. GPU-only peers replaced or skipped: "
            "PyTorch runs on CPU (not cuDNN); jax.experimental.rnn.lstm (cuDNN only) is replaced by its CPU "
            "reference lstm_ref on the same packed weights; the seqjax cuDNN kernel runs its fallback; the "
            "full-float32 recheck is skipped (XLA:CPU float32 matmuls are full float32)."
        )
    result["notes"].append(
        "Times: median (min–max) of per-call times, interleaved round-robin over the implementations of "
        f"a row ({rounds} rounds after 2 warm-up calls each). Ratio = time / seqjax time (above 1: seqjax "
        "faster). "
        "Forward+backward = gradient of sum(ys²) with respect to every weight and the inputs."
    )
    spec_settings = None
    if spectrum_mode != "none":
        spec_settings = dict(spectrum.settings(spectrum_mode))
        if cpu_test:
            spec_settings["kinds"] = ["lstm"]
        result["spectrum"] = common.new_result("spectrum", spectrum_mode)
        result["spectrum"]["settings"] = spec_settings
    plan: list[tuple[str, tuple]] = [("speed", (n, k)) for n in names for k in kinds]
    if spec_settings is not None:
        plan += [
            ("spectrum", (k, h, t))
            for k in spec_settings["kinds"]
            for h in spec_settings["Hs"]
            for t in spec_settings["Ts"]
        ]
        plan += [("eigvals", (k, spec_settings["Hs"][0])) for k in spec_settings["kinds"]]
    result["plan"] = [f"{s}:{'/'.join(map(str, a))}" for s, a in plan]

    def write(done: int, final: bool = False) -> None:
        result["wall_s"] = budget.elapsed()
        result["partial"] = None if final else f"{done}/{len(plan)} rows done"
        if out_dir is not None:
            body = to_markdown(result)
            report.write(result, body, out_dir)

    has_eig, why_no_eig = True, ""
    with device_ctx:
        if spec_settings is not None:
            has_eig, why_no_eig = backend_eig()
            result["environment"]["backend_eig"] = has_eig
            if not has_eig:
                result["notes"].append(
                    f"The {jax.default_backend()} backend has no general eigendecomposition ({why_no_eig}): "
                    "eigenvalues run on the host only (seqjax.spectrum.eigvals(..., host=True))."
                )
        done = 0
        write(done)
        for section, args in plan:
            label = f"{section}:{'/'.join(map(str, args))}"
            if not budget.allows(section):
                result["skipped"].append(
                    f"{label}: not started, the budget of {budget_s:.0f} s would be exceeded "
                    f"({budget.elapsed():.0f} s spent, longest {section} row "
                    f"{budget.longest.get(section, 0):.0f} s)"
                )
                log(f"{label}: skipped (budget)")
                continue
            r0 = time.perf_counter()
            log(f"{label} ...")
            try:
                if section == "speed":
                    cfg, kind = args
                    B, T, I, H = table[cfg]
                    _speed_row(
                        result,
                        cfg,
                        kind,
                        B,
                        T,
                        I,
                        H,
                        rounds=rounds,
                        torch=torch,
                        device=device,
                        on_gpu=on_gpu,
                        libraries=libraries,
                        log=log,
                    )
                elif section == "spectrum":
                    kind, H, T = args
                    spectrum._case(result["spectrum"], kind, H, T, spec_settings, log)
                else:
                    kind, H = args
                    _eig_row(result, kind, H, spec_settings, rounds=rounds, has_eig=has_eig, log=log)
            except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
                result.setdefault("errors", []).append(f"{label}: {type(e).__name__}: {e}")
                log(f"{label}: FAILED: {type(e).__name__}: {e}")
            budget.record(section, time.perf_counter() - r0)
            done += 1
            write(done)
    write(done, final=True)
    return result


# --------------------------------------------------------------------------- Markdown


def to_markdown(result: dict) -> str:
    """Environment, the speed tables (one per configuration), the eigenvalue table, the
    spectrum suite's tables, the checks."""
    env = result.get("environment", {})
    lines = []
    if result.get("partial"):
        lines += [f"**Partial result: {result['partial']}.**", ""]
    keys = [
        "device_used",
        "jax",
        "jaxlib",
        "jax_cudnn_version",
        "jax_cuda_runtime_version",
        "torch",
        "torch_cuda",
        "torch_cudnn",
        "torch_device",
        "cudnn_lstm_traceable",
        "backend_eig",
    ]
    lines.append("Environment: " + "; ".join(f"{k} {env[k]}" for k in keys if env.get(k) is not None) + ".")
    rows = result["rows"]
    for cfg in dict.fromkeys(r["config"] for r in rows):
        first = next(r for r in rows if r["config"] == cfg)
        lines += ["", f"## {cfg} (B={first['B']}, T={first['T']}, I={first['I']}, H={first['H']})", ""]
        body = []
        for kind in KINDS:
            for name in dict.fromkeys(r["impl"] for r in rows if r["config"] == cfg and r["cell"] == kind):

                def pick(pass_, name=name, kind=kind, cfg=cfg):
                    return next(
                        (
                            r
                            for r in rows
                            if (r["config"], r["cell"], r["impl"], r["pass"]) == (cfg, kind, name, pass_)
                        ),
                        None,
                    )

                f, b = pick("forward"), pick("forward+backward")
                if f is None or b is None:
                    continue
                cs = "–" if f["compile_s"] is None else f"{f['compile_s']:.2f} / {b['compile_s']:.2f}"
                mem = (b.get("memory") or {}).get("peak_bytes")
                body.append(
                    [
                        kind,
                        name,
                        report.fmt_range(f),
                        f"{f['ratio_median']:.2f}",
                        report.fmt_range(b),
                        f"{b['ratio_median']:.2f}",
                        f"{report.fmt_num(f['gflops'])} / {report.fmt_num(b['gflops'])}",
                        cs,
                        report.fmt_bytes(mem),
                        f["note"],
                    ]
                )
        lines.append(
            report.markdown_table(
                [
                    "cell",
                    "implementation",
                    "forward",
                    "ratio",
                    "forward+backward",
                    "ratio",
                    "GFLOP/s f / f+b",
                    "compile s f / f+b",
                    "peak mem f+b",
                    "note",
                ],
                body,
            )
        )
    if result.get("eig_rows"):
        lines += ["", "## Eigenvalues of the step Jacobians (P matrices S x S)", ""]
        lines.append(
            report.markdown_table(
                ["cell", "H", "S", "P", "where", "time median (min–max)", "compile s"],
                [
                    [
                        r["cell"],
                        r["H"],
                        r["S"],
                        r["P"],
                        r["impl"],
                        report.fmt_range(r),
                        f"{r['compile_s']:.2f}",
                    ]
                    for r in result["eig_rows"]
                ],
            )
        )
    sub = result.get("spectrum")
    if sub is not None and sub["rows"]:
        lines += ["", "# Spectrum suite on this device", "", spectrum.to_markdown(sub)]
        for key in ("notes", "skipped"):
            lines += [f"- spectrum {key}: {n}" for n in sub[key]]
    checks = list(result["checks"]) + (list(sub["checks"]) if sub else [])
    bad = [c for c in checks if not c["ok"]]
    lines += ["", f"Correctness checks: {len(checks) - len(bad)}/{len(checks)} passed."]
    for c in bad:
        val = c.get("rel_err", c.get("error"))
        lines.append(f"- FAILED {c['where']}: {c['what']} ({val}; tol {c.get('tol')})")
    worst = max((c["rel_err"] for c in result["checks"] if "rel_err" in c), default=None)
    if worst is not None:
        lines.append(f"Largest relative error seen: {worst:.2e}.")
    for e in result.get("errors", []):
        lines.append(f"- ERROR {e}")
    lines.append(f"\nWall time: {result.get('wall_s', 0):.0f} s of a {result['budget_s']:.0f} s budget.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget in seconds (default 480)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default benchmarks/results; a temp folder with --cpu-test)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds per implementation (default 15; 3 with --cpu-test)",
    )
    p.add_argument("--configs", nargs="+", default=None, metavar="NAME", help=f"rows to run, of {list(ROWS)}")
    p.add_argument(
        "--kinds", nargs="+", default=None, choices=KINDS, help="cells of the speed rows (default both)"
    )
    p.add_argument(
        "--libraries",
        nargs="+",
        default=None,
        choices=LIBRARIES,
        help="implementations beside seqjax's default (default all)",
    )
    p.add_argument(
        "--spectrum-mode",
        choices=("quick", "full", "tiny", "none"),
        default=None,
        help="spectrum suite size (default quick)",
    )
    p.add_argument(
        "--cpu-test", action="store_true", help="run the same code on CPU with toy sizes (no GPU needed)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.gpu``; returns 0, 1 when a check or a row failed,
    2 without a GPU (outside ``--cpu-test``)."""
    args = _parser().parse_args(argv)
    if args.budget_s <= 0:
        _parser().error(f"--budget-s must be positive, got {args.budget_s}")
    out = args.out
    if out is None:
        out = (
            os.path.join(tempfile.gettempdir(), "seqjax_gpu_cpu_test")
            if args.cpu_test
            else report.DEFAULT_OUT
        )
    command = "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv)

    def log(msg):
        print(msg, flush=True)

    try:
        result = run(
            cpu_test=args.cpu_test,
            budget_s=args.budget_s,
            rounds=args.rounds,
            configs=args.configs,
            kinds=args.kinds,
            libraries=args.libraries,
            spectrum_mode=args.spectrum_mode,
            out_dir=out,
            command=command.strip(),
            log=log,
        )
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 2
    log(f"wrote {os.path.join(out, 'gpu.json')} and {os.path.join(out, 'gpu.md')}")
    checks = list(result["checks"]) + (list(result["spectrum"]["checks"]) if result["spectrum"] else [])
    return 1 if result.get("errors") or any(not c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
