"""The package builds without warnings and its metadata passes ``twine check --strict``.

Builds the sdist and the wheel from this checkout in an isolated environment (``python -m
build``, which installs the build backend from the package index), then checks them.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_build_is_clean_and_twine_check_passes(tmp_path):
    # byte-compilation off in the caller's environment would make setuptools say so
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    build = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
    )
    log = build.stdout + build.stderr
    assert build.returncode == 0, log
    # "warning: ..." from setuptools, "...DeprecationWarning: ..." from Python
    warnings = [line for line in log.splitlines() if re.search(r"warning\b", line, re.I)]
    assert not warnings, "python -m build warned:\n" + "\n".join(warnings)

    wheels = sorted(tmp_path.glob("*.whl"))
    sdists = sorted(tmp_path.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in tmp_path.iterdir())
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "seqjax/py.typed" in names and "seqjax/spectrum/lyapunov.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))], names

    check = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
