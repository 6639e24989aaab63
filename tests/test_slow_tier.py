"""Every line of ``slow_tier.txt`` names a test that exists (a renamed test must be relisted)."""

import ast
import pathlib

from helpers import extended_tier, slow_tier

TESTS = pathlib.Path(__file__).resolve().parent


def test_slow_tier_lists_existing_tests():
    functions: dict[str, set[str]] = {}
    stale = []
    for nodeid in sorted(slow_tier() | extended_tier()):
        path, _, name = nodeid.partition("::")
        name = name.split("[")[0]
        if path not in functions:
            file = TESTS.parent / path
            tree = ast.parse(file.read_text()) if file.exists() else ast.Module(body=[], type_ignores=[])
            functions[path] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        if name not in functions[path]:
            stale.append(nodeid)
    assert not stale, f"slow_tier.txt or extended_tier.txt names tests that do not exist: {stale}"
