"""seqjax.plot renders every figure to PNG (Agg backend), labels its axes, and fails clearly
without matplotlib."""

import builtins
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqjax as sj
from seqjax.diagnose import diagnose
from seqjax.layers import dense
from seqjax.seq2seq import many_to_one
from seqjax.spectrum import (
    find_fixed_points,
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


@pytest.fixture(scope="module")
def diagnoses():
    out = {}
    for name, cell in (("rnn", sj.rnn(3)), ("lstm", sj.lstm(3))):
        params = many_to_one(cell, dense(1)).init(jax.random.key(0), 2)
        xs = jax.random.normal(jax.random.key(1), (2, 8, 2))
        ys = jax.random.uniform(jax.random.key(2), (2, 1))
        out[name] = diagnose(cell, params, xs, ys=ys)
    return out


HISTORY = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5, "eval_loss": 0.6}, {"step": 3, "loss": 0.25}]


def _labelled(ax):
    assert ax.get_xlabel() and ax.get_ylabel()
    return ax


def test_diagnosis_plots(diagnoses, tmp_path):
    ax = _labelled(plot.plot_gradient_vs_lag(diagnoses))
    assert len(ax.lines) >= 3  # rnn, lstm and the lstm's cell path (+ the zero line)
    assert any("cell path" in t.get_text() for t in ax.get_legend().get_texts())
    _render(ax, tmp_path, "lag")
    for which in ("wh", "jac"):
        ax = _labelled(plot.plot_diagnosis_eigenvalues(diagnoses["lstm"], which, name="lstm"))
        assert ax.get_title().startswith("lstm: eigenvalues") and ax.collections
        _render(ax, tmp_path, f"eig_{which}")
    with pytest.raises(ValueError, match="which"):
        plot.plot_diagnosis_eigenvalues(diagnoses["rnn"], "nope")
    no_wh = diagnoses["rnn"]._replace(eig_wh=None, gate_names=None)
    _render(_labelled(plot.plot_diagnosis_eigenvalues(no_wh)), tmp_path, "eig_none")
    ax = _labelled(plot.plot_training_history({"rnn": HISTORY}))
    assert ax.get_yscale() == "log" and len(ax.lines) == 2  # train and eval
    _render(ax, tmp_path, "history")
    ax = _labelled(plot.plot_lyapunov_spectrum(diagnoses["lstm"].lyapunov, label="lstm"))
    _render(ax, tmp_path, "lyap_diag")


def test_write_figures(diagnoses, tmp_path):
    figs = plot.write_figures(str(tmp_path), diagnoses, histories={"rnn": HISTORY, "lstm": HISTORY})
    assert list(figs) == [
        "training.png",
        "gradient_vs_lag.png",
        "lyapunov.png",
        "eigenvalues_wh.png",
        "eigenvalues_jacobians.png",
    ]
    assert figs["eigenvalues_wh.png"] == "Eigenvalues of W_h"
    for fn in figs:
        data = (tmp_path / fn).read_bytes()
        assert data[:8] == PNG and len(data) > 1000
    assert plt.get_fignums() == []  # no pyplot figure left open
    only = tmp_path / "only"
    only.mkdir()
    assert list(plot.write_figures(str(only), histories={"gru": HISTORY})) == ["training.png"]
    assert plot.write_figures(str(only)) == {}


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
    assert not mod.matplotlib_available()
    with pytest.raises(ImportError, match=r'pip install "seqjax\[plot\]"'):
        mod.plot_eigenvalues(np.array([1.0 + 0j]))
    with pytest.raises(ImportError, match=r'pip install "seqjax\[plot\]"'):
        mod.write_figures(".", histories={"a": HISTORY})
