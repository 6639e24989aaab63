"""Shared test configuration.

Strict by default: rank promotion raises (no silent broadcasting of wrong shapes) and
warnings are errors (pyproject). Slow tests run only with ``--runslow`` (``.ci/run`` and
the README's test command pass it), and so do the tests listed in ``slow_tier.txt``.
Tests marked ``bench`` run the benchmark suites end to end (their plumbing, not the
library; minutes of compiling) and run only with ``--runbench``, outside ``.ci/run``'s
15 minutes: run ``python -m pytest -q --runslow --runbench`` before changing ``benchmarks/``.
Tests listed in ``extended_tier.txt`` repeat, on another cell, dtype or size, a check that
CI runs; they run only with ``--runextended``.
"""

# No XLA_FLAGS here: --xla_backend_optimization_level=0 cut the CPU time by about a fifth, but
# it changes float32 results by an ulp (seen in tests/test_golden.py's raw init params and
# tests/test_migration.py's dropout fixture), so the suite would test other numerics than
# users get. Two xdist workers (pyproject addopts) on two cores do not oversubscribe (measured:
# wall time about CPU time / 1.85): the work here is mostly single-threaded compiling.
import jax
import pytest
from helpers import extended_tier, slow_tier, x64_enabled

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")
    parser.addoption(
        "--runbench", action="store_true", default=False, help="also run the benchmark suites end to end"
    )
    parser.addoption(
        "--runextended", action="store_true", default=False, help="also run extended_tier.txt's repeats"
    )


def pytest_collection_modifyitems(config, items):
    tier = slow_tier()
    for item in items:
        if item.nodeid in tier:
            item.add_marker(pytest.mark.slow)
    if not config.getoption("--runextended"):
        extended = extended_tier()
        skip_extended = pytest.mark.skip(reason="extended: run with --runextended (a repeat CI does not run)")
        for item in items:
            if item.nodeid in extended:
                item.add_marker(skip_extended)
    if not config.getoption("--runbench"):
        skip_bench = pytest.mark.skip(reason="bench: run with --runbench (benchmark suites end to end)")
        for item in items:
            if "bench" in item.keywords:
                item.add_marker(skip_bench)
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (as .ci/run does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


enable_x64 = x64_enabled  # the name older tests use


@pytest.fixture
def x64():
    with x64_enabled():
        yield


@pytest.fixture
def key():
    """A fixed PRNG key (tests that need several split it)."""
    return jax.random.key(0)
