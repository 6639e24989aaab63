"""Every Python code block of the documentation site and the README runs, as written.

Each page's ``python`` blocks run in order in one namespace (a page is one session, as a
reader would type it), in a temporary directory so examples that write files write them
there. A page whose blocks train or analyse for more than a few seconds is marked slow
(``.ci/run`` runs it). Shell blocks are not run here: the commands they show are tested by
``test_cli.py`` and by ``.ci/run`` itself.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the README (the front page) and every page of the site, as paths from the repository root
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", flags=re.S | re.M)

# Pages whose examples take more than a few seconds on 2 CPU cores.
SLOW_PAGES = {
    "README.md",
    "docs/getting-started.md",
    "docs/guides/architectures.md",
    "docs/guides/cells.md",
    "docs/guides/cli.md",
    "docs/guides/dynamics.md",
    "docs/guides/flossing.md",
    "docs/guides/linear-recurrences.md",
    "docs/guides/nnx.md",
    "docs/guides/parallel.md",
    "docs/guides/spectra.md",
    "docs/guides/training.md",
    "docs/guides/unrolling.md",
}
# Fences that hold Python but would not run: a runnable example is ```python, a signature
# or a script that needs several hosts is ```text.
_UNRUN = re.compile(r"^```(py|py3|pycon|ipython)\s*$", flags=re.M)


def _pages():
    pages = []
    for path in PAGES:
        rel = path.relative_to(ROOT).as_posix()
        if _FENCE.search(path.read_text()):
            marks = [pytest.mark.slow] if rel in SLOW_PAGES else []
            pages.append(pytest.param(rel, id=rel, marks=marks))
    return pages


def test_docs_have_examples_and_no_unrun_python():
    assert len(_pages()) > 1, "no python code blocks found in the README and docs/"
    unrun = [
        f"{path.relative_to(ROOT)}:{path.read_text()[: m.start()].count(chr(10)) + 1}"
        for path in PAGES
        for m in _UNRUN.finditer(path.read_text())
    ]
    assert not unrun, f"python fences that the suite would not run (use ```python or ```text): {unrun}"


@pytest.mark.parametrize("page", _pages())
def test_page_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, match in enumerate(_FENCE.finditer((ROOT / page).read_text())):
        code = match.group(1)
        try:
            exec(compile(code, f"{page} block {i}", "exec"), namespace)
        except Exception as e:  # name the failing block
            raise AssertionError(f"{page}: python block {i} failed:\n{code}") from e
