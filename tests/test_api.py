"""Conventions of the public API (after dm_pix's api_test): walk every name in
``seqjax.__all__`` (and the ``__all__`` of every public submodule listed there) and check
that it resolves, has a docstring, calls random keys ``key``, and takes optional arguments
by keyword. Written to pick up names added later without edits.
"""

import dataclasses
import inspect
import re
import types

import pytest

import seqjax

# Optional arguments may be positional when they are among the first two parameters
# (``orthogonal(gain, gates)``, ``learnable_carry(cell, init)`` read naturally), and
# ``dtype`` of an initializer ``(key, shape, dtype)`` follows ``jax.nn.initializers``.
POSITIONAL_OK = 2
INITIALIZER_SIGNATURE = ("key", "shape", "dtype")

# Known exceptions: "qualified.name": {parameters}, each with the reason it is allowed.
_HEAD = {"head"}  # encoder_decoder(encoder, decoder, head) mirrors many_to_one(body, head): architecture
ALLOWED = {
    "encoder_decoder": _HEAD,
    "seq2seq.encoder_decoder": _HEAD,
}

BAD_KEY_NAME = re.compile(r"(^|_)(rng|prng)(_|$)|^(rng_key|prng_key|random_key|seed_key|subkey|rand_key)$")


def _public():
    """``(qualified_name, object)`` for every public name, one level into public submodules."""
    seen = set()
    for name in seqjax.__all__:
        obj = getattr(seqjax, name)
        yield name, obj
        if isinstance(obj, types.ModuleType):
            for sub in getattr(obj, "__all__", []):
                q = f"{name}.{sub}"
                if q not in seen:
                    seen.add(q)
                    yield q, getattr(obj, sub)


PUBLIC = list(_public())


def _is_data_class(cls) -> bool:
    return (
        (issubclass(cls, tuple) and hasattr(cls, "_fields"))
        or dataclasses.is_dataclass(cls)
        or issubclass(cls, BaseException)
    )


def _signature_target(obj):
    """The callable whose signature we check, or ``None`` (data containers, aliases)."""
    if inspect.isclass(obj):
        if _is_data_class(obj) or "__init__" not in vars(obj):
            return None
        return obj.__init__
    if inspect.isfunction(obj):
        return obj
    return None


def test_all_resolves_without_duplicates():
    assert len(seqjax.__all__) == len(set(seqjax.__all__)), "duplicate names in seqjax.__all__"
    for name in seqjax.__all__:
        assert hasattr(seqjax, name), f"seqjax.__all__ lists {name!r}, which seqjax does not define"
    for name, obj in PUBLIC:
        if isinstance(obj, types.ModuleType):
            for sub in getattr(obj, "__all__", []):
                assert hasattr(obj, sub), f"{name}.__all__ lists {sub!r}, which {name} does not define"


@pytest.mark.parametrize("qualname,obj", PUBLIC, ids=[q for q, _ in PUBLIC])
def test_docstring(qualname, obj):
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or isinstance(obj, types.ModuleType)):
        pytest.skip("constant or type alias")
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"{qualname} has no docstring"
    if inspect.isclass(obj):
        for meth_name, meth in vars(obj).items():
            if not meth_name.startswith("_") and inspect.isfunction(meth):
                assert inspect.getdoc(meth), f"{qualname}.{meth_name} has no docstring"


@pytest.mark.parametrize("qualname,obj", PUBLIC, ids=[q for q, _ in PUBLIC])
def test_signature_conventions(qualname, obj):
    fn = _signature_target(obj)
    if fn is None:
        pytest.skip("not a function or a class with its own __init__")
    params = list(inspect.signature(fn).parameters.values())
    if inspect.isclass(obj):
        params = params[1:]  # self
    allowed = ALLOWED.get(qualname, set())
    problems = []
    names = tuple(p.name for p in params)
    for i, p in enumerate(params):
        if BAD_KEY_NAME.search(p.name):
            problems.append(f"random-key argument {p.name!r} should be called 'key'")
        if (
            p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            and p.default is not inspect.Parameter.empty
            and i >= POSITIONAL_OK
            and p.name not in allowed
            and not (names == INITIALIZER_SIGNATURE and p.name == "dtype")
        ):
            problems.append(f"optional argument {p.name!r} (position {i}) should be keyword-only")
    assert not problems, f"{qualname}{inspect.signature(fn)}: " + "; ".join(problems)


def test_the_checks_can_fail():
    """The convention checks reject what they should (so a pass means something)."""

    def bad(x, y, scale=1.0, rng=None):
        """Doc."""

    def good(x, y, *, scale=1.0, key=None):
        """Doc."""

    params = list(inspect.signature(bad).parameters.values())
    assert BAD_KEY_NAME.search(params[3].name)
    assert params[2].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and 2 >= POSITIONAL_OK
    for p in inspect.signature(good).parameters.values():
        assert not BAD_KEY_NAME.search(p.name)
    assert not BAD_KEY_NAME.search("rngs")  # flax.nnx.Rngs objects keep their flax name
