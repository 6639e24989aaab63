"""Shared test configuration.

Strict by default: rank promotion raises (no silent broadcasting of wrong shapes) and
warnings are errors (pyproject). Slow tests run only with ``--runslow`` (``.ci/run`` and
the README's test command pass it).
"""

import jax
import pytest
from helpers import x64_enabled

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
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
