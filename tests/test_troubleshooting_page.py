"""The "When things go wrong" page names tests that exist: every ``test_x.py::test_name`` it cites."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "guides" / "when-things-go-wrong.md"
_CITED = re.compile(r"`(test_\w+\.py)::(\w+)(?:\[[^\]`]*\])?`")


def test_every_cited_test_exists():
    cited = _CITED.findall(PAGE.read_text())
    assert len(cited) >= 30, "the page's table cites its tests as `test_file.py::test_name`"
    missing = []
    for file, name in cited:
        path = ROOT / "tests" / file
        if not path.exists() or not re.search(rf"^def {name}\(", path.read_text(), flags=re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"the page cites tests that do not exist: {missing}"
