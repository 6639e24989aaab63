"""Write ``demo_gradient_vs_lag.png`` beside this script: the main job's headline figure.

Runs ``seqjax demo`` with its defaults (a tanh RNN and an LSTM trained on the adding problem,
T = 100; about a minute on 2 CPU cores) into a temporary folder and keeps its
``gradient_vs_lag.png``, the figure the README and the documentation's home page show::

    python docs/figures/make_demo_figure.py
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

from seqjax.cli import main

HERE = pathlib.Path(__file__).resolve().parent


def make(out: pathlib.Path = HERE / "demo_gradient_vs_lag.png") -> pathlib.Path:
    with tempfile.TemporaryDirectory() as tmp:
        code = main(["demo", "--out", tmp, "--no-progress"])
        if code != 0:
            raise SystemExit(f"seqjax demo exited with {code}")
        shutil.copyfile(pathlib.Path(tmp) / "gradient_vs_lag.png", out)
    return out


if __name__ == "__main__":
    print(make())
    sys.exit(0)
