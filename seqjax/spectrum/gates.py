r"""Spectra of each gate's recurrent matrix: ``gate_spectra``.

A gated cell's recurrent weights ``W_h: (R, G*H)`` hold ``G`` column blocks, one per gate.
Quoting ``sigma_max`` of the whole block mixes gates that act on the state very
differently (a saturated input gate, a forget gate near 1); this module reports each block
``W_h^g: (R, H)`` on its own, as the cell's ``recurrent_blocks`` capability names it:

```text
net_g = x_t W_x^g + h_{t-1} W_h^g + b_g          (row vectors; d net_g / d h_{t-1} = (W_h^g)^T)
sigma_max(W_h^g) = max_i s_i(W_h^g)              the largest singular value, ||W_h^g||_2
rho(W_h^g)       = max_i |lambda_i(W_h^g)|       the spectral radius (square blocks, R = H)
```

``rho <= sigma_max`` always; they are equal for a normal matrix. For the Elman cell
``||J_t||_2 <= sigma_max(W_h) sup|f'|`` (Pascanu, Mikolov & Bengio 2013), and the same
argument bounds each gate's contribution ``diag(f_g'(net_g)) (W_h^g)^T`` to the step
Jacobian by ``sigma_max(W_h^g) sup|f_g'|``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from seqjax.cells import Cell
from seqjax.spectrum.linalg import eigvals

__all__ = ["GateSpectrum", "gate_spectra"]


class GateSpectrum(NamedTuple):
    """The spectrum summary of one gate's recurrent matrix ``W_h^g: (R, H)``.

    Attributes:
      sigma_max: scalar, the largest singular value ``||W_h^g||_2``.
      spectral_radius: scalar, ``max_i |lambda_i(W_h^g)|`` when the block is square
        (``R == H``); NaN when it is not (an LSTM with projection: ``(P, H)`` blocks, which
        have no eigenvalues).
    """

    sigma_max: jax.Array
    spectral_radius: jax.Array


def _block_spectrum(w: jax.Array, *, host: bool | None) -> GateSpectrum:
    dtype = jnp.result_type(w.dtype, jnp.float32)  # SVD/eig need a float; float64 stays float64
    w = w.astype(dtype)
    sigma = jnp.linalg.svd(w, compute_uv=False)[0]  # singular values come sorted, largest first
    if w.shape[0] == w.shape[1]:
        rho = jnp.max(jnp.abs(eigvals(w, host=host))).astype(dtype)
    else:
        rho = jnp.full((), jnp.nan, dtype)
    return GateSpectrum(sigma, rho)


def gate_spectra(cell: Cell, params: Any, *, host: bool | None = None) -> dict[str, GateSpectrum]:
    r"""``sigma_max`` and spectral radius of each gate's recurrent matrix.

    With ``blocks = cell.recurrent_blocks(params)``, ``{gate: W_h^g: (R, H)}`` (the cell's
    own row-vector convention, ``net_g = x_t W_x^g + h_{t-1} W_h^g + b_g``):

    ```text
    sigma_max(W_h^g)       = max_i s_i(W_h^g)            (the spectral norm ||W_h^g||_2)
    spectral_radius(W_h^g) = max_i |lambda_i(W_h^g)|     R == H; NaN when R != H
    ```

    Transposition changes neither (``W^T`` has the same singular values and eigenvalues),
    so the numbers are those of ``d net_g / d h_{t-1} = (W_h^g)^T`` as well. What a block
    means for a gated recurrent term (the GRU's ``r * (h W_h^n + b_h^n)``, the MGU's
    ``(f * h) W_h^n``) is documented by the cell.

    Pure ``jax.numpy`` (eigenvalues through ``seqjax.spectrum.eigvals``, with its host
    fallback on TPU): it runs under ``jax.jit`` (close over the cell, or pass it as a
    static argument) and keeps float64 params in float64. Not differentiable through the
    eigenvalues on TPU (the host fallback).

    Args:
      cell: a ``Cell`` with the ``recurrent_blocks`` capability (every built-in gated cell
        and the Elman cells, and ``wrap``/``learnable_carry``/``stack`` of them).
      params: the cell's params.
      host: where to compute eigenvalues (``seqjax.spectrum.eigvals``): ``None`` (host only
        on TPU), ``True`` or ``False``.

    Returns:
      ``{gate: GateSpectrum(sigma_max, spectral_radius)}``, scalars in the params' float
      dtype (float32 at least), in the order ``recurrent_blocks`` gives (the cell's gate
      order) when called eagerly; a dict returned through ``jax.jit`` comes back with
      sorted keys (JAX's dict pytree), so read it by name.

    Raises:
      TypeError: ``cell`` is not a ``seqjax.Cell``.
      ValueError: the cell has no ``recurrent_blocks`` capability, or a block is not a
        matrix.

    Examples:
      >>> import jax, seqjax
      >>> from seqjax.spectrum.gates import gate_spectra
      >>> cell = seqjax.lstm(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> spectra = gate_spectra(cell, params)
      >>> list(spectra)                                  # PyTorch's gate order
      ['i', 'f', 'g', 'o']
      >>> f = spectra["f"]
      >>> bool(f.spectral_radius <= f.sigma_max + 1e-6)  # |lambda| <= sigma_max always
      True

      The IRNN's ``W_h = 0.9 I``: both numbers are 0.9. A projected LSTM's blocks
      ``(P, H)`` are not square, so they have no spectral radius:

      >>> irnn = seqjax.irnn(3, gain=0.9)
      >>> s = gate_spectra(irnn, irnn.init(jax.random.key(0), input_size=2))["net"]
      >>> print(round(float(s.sigma_max), 4), round(float(s.spectral_radius), 4))
      0.9 0.9
      >>> proj = seqjax.lstm(4, proj_size=2)
      >>> s = gate_spectra(proj, proj.init(jax.random.key(0), input_size=3))["i"]
      >>> bool(jax.numpy.isnan(s.spectral_radius)), bool(s.sigma_max > 0)
      (True, True)
    """
    if not isinstance(cell, Cell):
        raise TypeError(f"gate_spectra: cell must be a seqjax.Cell, got {type(cell).__name__}.")
    if cell.recurrent_blocks is None:
        raise ValueError(
            f"gate_spectra: the cell {cell.label!r} has no recurrent_blocks capability, so its gates' "
            "recurrent matrices are unknown. Give it one: Cell(..., recurrent_blocks=lambda params: "
            '{"gate": W_h_gate}) with each W_h_gate: (R, H) the matrix of h_{t-1} in that gate\'s '
            "pre-activation (net = x W_x + h W_h_gate + b), or cell._replace(recurrent_blocks=...)."
        )
    out: dict[str, GateSpectrum] = {}
    for name, w in cell.recurrent_blocks(params).items():
        w = jnp.asarray(w)
        if w.ndim != 2:
            raise ValueError(
                f"gate_spectra: recurrent_blocks of {cell.label!r} gave {name!r} of shape {tuple(w.shape)}; "
                "each block must be a matrix (R, H)."
            )
        out[name] = _block_spectrum(w, host=host)
    return out
