"""Doctests over ``seqjax/`` run as a user would run the examples.

``tests/conftest.py`` makes rank promotion raise for the test suite. With pytest-xdist a
worker runs tests and doctests in one process, so each doctest restores JAX's default
(implicit rank promotion allowed) for its own duration.
"""

import jax
import pytest
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _doctests_use_jax_defaults(request):
    if isinstance(request.node, DoctestItem):
        with jax.numpy_rank_promotion("allow"):
            yield
    else:
        yield
