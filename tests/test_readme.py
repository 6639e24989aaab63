"""The README's Python examples run as written (executed in order, in one namespace)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    blocks = _blocks()
    assert blocks, "the README has no Python examples"
    namespace: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README block {i}", "exec"), namespace)
        except Exception as e:  # name the failing block
            raise AssertionError(f"README python block {i} failed:\n{code}") from e
