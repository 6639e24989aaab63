"""seqjax.plot renders every figure to PNG (Agg backend), and fails clearly without matplotlib."""

import builtins
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj
from seqjax.fixed_points import find_fixed_points
from seqjax.spectrum import (
    gradient_flow_report,
    lag_log_norms,
    lyapunov_spectrum,
    spectral_radii,
    step_jacobians,
)

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from seqjax import plot  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data():
    cell = sj.rnn(6)
    p = cell.init(jax.random.key(0), 2)
    xs = jax.random.normal(jax.random.key(1), (2, 40, 2))
    J = step_jacobians(cell, p, xs).jacobians
    return cell, p, xs, J


def _render(ax, tmp_path, name):
    path = tmp_path / f"{name}.png"
    ax.figure.savefig(path)
    plt.close(ax.figure)
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 1000


def test_all_plots_render_png(data, tmp_path):
    cell, p, xs, J = data
    w = jnp.linalg.eigvals(J[0])
    _render(plot.plot_eigenvalues(w, label="J_t"), tmp_path, "eig")
    spec = lyapunov_spectrum(cell, p, xs, window=10)
    ax = plot.plot_lyapunov_spectrum(spec, label="tanh")
    assert len(ax.lines) >= 1
    _render(ax, tmp_path, "lyap")
    _render(spec.plot(), tmp_path, "lyap_method")
    _render(plot.plot_lyapunov_spectrum(np.array([0.1, -0.2, -np.inf])), tmp_path, "lyap_inf")
    _render(plot.plot_lag_norms(lag_log_norms(J), label="lag"), tmp_path, "lag")
    _render(plot.plot_spectral_radius(spectral_radii(J)), tmp_path, "radius")
    rep = gradient_flow_report(cell, p, xs)
    _render(rep.plot(), tmp_path, "flow")
    fps = find_fixed_points(cell, p, jnp.zeros(2), jnp.zeros((2, 6)), steps=10)
    _render(fps.plot(), tmp_path, "fps")


def test_plot_on_given_axes(data, tmp_path):
    _, _, _, J = data
    fig, axes = plt.subplots(1, 2)
    out = plot.plot_lag_norms(lag_log_norms(J), ax=axes[1])
    assert out is axes[1]
    _render(out, tmp_path, "given")


def test_missing_matplotlib_message(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    mod = importlib.reload(plot)  # importing seqjax.plot itself must not need matplotlib
    with pytest.raises(ImportError, match=r'pip install "seqjax\[plot\]"'):
        mod.plot_eigenvalues(np.array([1.0 + 0j]))
