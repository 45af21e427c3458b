"""The key builder (cachegw.keys): equal parameters always give one key, different ones
never share a key (checked against a model of the normalisation), keys stay short."""

from __future__ import annotations

import math
import unicodedata
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cachegw.keys import KeyBuilder, build_key, canonical

# Small alphabets, so that near-misses (same names, close values) come up often.
names = st.text(alphabet="ab=&,()%:é\u0301 ", min_size=0, max_size=4)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False, min_value=-3, max_value=3)
    | st.sampled_from([math.inf, -math.inf, 0.5, -0.0, 2.0])
    | names
    | st.binary(max_size=3)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.frozensets(st.integers(-2, 2) | names, max_size=3)
        | st.dictionaries(names, inner, max_size=3)
    ),
    max_leaves=6,
)
params = st.dictionaries(names, values, max_size=4)


def nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def model(v: Any) -> Any:
    """What the builder promises to keep apart: type-tagged, normalised values."""
    if v is None:
        return ("n",)
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, int):
        return ("i", v)
    if isinstance(v, float):
        return ("i", int(v)) if math.isfinite(v) and v.is_integer() else ("f", v)
    if isinstance(v, str):
        return ("s", nfc(v))
    if isinstance(v, bytes):
        return ("x", v)
    if isinstance(v, list | tuple):
        return ("l", tuple(model(x) for x in v))
    if isinstance(v, frozenset | set):
        return ("S", frozenset(model(x) for x in v))
    if isinstance(v, dict):
        return ("d", model_params(v))
    raise AssertionError(type(v))


def model_params(p: dict[str, Any]) -> Any:
    return frozenset((nfc(k), model(v)) for k, v in p.items())


def variant(v: Any) -> Any:
    """An equal value written differently: tuples as lists, integral numbers as floats,
    composed text decomposed, mappings in reverse order."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int) and abs(v) < 2**53:
        return float(v)
    if isinstance(v, str):
        return unicodedata.normalize("NFD", v)
    if isinstance(v, tuple):
        return [variant(x) for x in v]
    if isinstance(v, list):
        return tuple(variant(x) for x in v)
    if isinstance(v, dict):
        return {variant(k): variant(x) for k, x in reversed(list(v.items()))}
    return v


@settings(max_examples=300, deadline=None)
@given(params)
def test_equal_parameters_give_one_key(p: dict[str, Any]) -> None:
    other = variant(p)
    assert model_params(other) == model_params(p)
    assert build_key("item", other) == build_key("item", p)
    assert build_key("item", other, max_length=90) == build_key("item", p, max_length=90)


@settings(max_examples=500, deadline=None)
@given(params, params)
def test_different_parameters_never_share_a_key(a: dict[str, Any], b: dict[str, Any]) -> None:
    assume(model_params(a) != model_params(b))
    assert canonical(a) != canonical(b)
    assert build_key("item", a) != build_key("item", b)
    assert build_key("item", a, hashed=True) != build_key("item", b, hashed=True)


@settings(max_examples=200, deadline=None)
@given(params, st.integers(0, 3), st.sampled_from(["item", "a:b", "x.y-z_1"]))
def test_keys_are_short_ascii_and_name_their_format(p: dict[str, Any], v: int, name: str) -> None:
    key = build_key(name, p, version=v, max_length=100)
    assert len(key) <= 100
    assert key.isascii() and " " not in key
    head, _, body = key.rpartition(":")
    assert head == f"{name}:v{v}"
    assert body.startswith(("p.", "h."))


def test_names_versions_and_types_stay_apart() -> None:
    assert build_key("a", {"x": 1}) != build_key("a", {"x": "1"}) != build_key("a", {"x": True})
    assert build_key("a", {"x": 1}, version=1) != build_key("a", {"x": 1}, version=2)
    assert build_key("a:b", {}) != build_key("a", {"b": None})
    assert build_key("a", {"x": "1&y=2"}) != build_key("a", {"x": "1", "y": "2"})
    assert build_key("a", {"x": 1.0}) == build_key("a", {"x": 1}) == "a:v1:p.x=i1"


def test_builder_and_its_refusals() -> None:
    listing = KeyBuilder("catalog", version=2)
    assert listing(page=1, category=3) == "catalog:v2:p.category=i3&page=i1"
    assert listing.prefix == "catalog:v2:"
    assert KeyBuilder("quote", hashed=True)(items=[1]).startswith("quote:v1:h.")
    with pytest.raises(ValueError, match="NaN"):
        build_key("a", {"x": math.nan})
    with pytest.raises(TypeError, match="cache key parameter"):
        build_key("a", {"x": object()})
    with pytest.raises(ValueError, match="key name"):
        build_key("a b", {})
    with pytest.raises(ValueError, match="version"):
        build_key("a", {}, version=-1)
