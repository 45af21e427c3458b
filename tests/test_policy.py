"""Key classes: first match wins, default fallback, prefix/exact/glob patterns (case kept),
the memo bound, and jittered TTLs that stay within [ttl * (1 - jitter), ttl]."""

from __future__ import annotations

import fnmatch
import math
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachegw_gateway.config import KeyClassConfig, load_config
from cachegw_gateway.policy import MEMO_SIZE, KeyClass, PolicyTable, jittered_ttl_ms

EXAMPLE = Path(__file__).resolve().parent.parent / "cachegw.example.toml"
DEFAULT = KeyClassConfig("default")


def table(*classes: tuple[str, Sequence[str]], memo_size: int = MEMO_SIZE) -> PolicyTable:
    configs = [KeyClassConfig(name, tuple(patterns)) for name, patterns in classes]
    return PolicyTable(configs, DEFAULT, memo_size=memo_size)


def name_of(policy: PolicyTable, key: str) -> str:
    return policy.classify(key).name


# -- matching -------------------------------------------------------------------------------


def test_first_matching_class_wins_in_config_order() -> None:
    broad_first = table(("catalog", ["catalog:*"]), ("hot", ["catalog:hot:*"]))
    assert name_of(broad_first, "catalog:hot:1") == "catalog"
    narrow_first = table(("hot", ["catalog:hot:*"]), ("catalog", ["catalog:*"]))
    assert name_of(narrow_first, "catalog:hot:1") == "hot"
    assert name_of(narrow_first, "catalog:cold:1") == "catalog"


def test_order_holds_across_pattern_kinds() -> None:
    # A glob in an earlier class beats a prefix in a later one, and the other way round.
    policy = table(("glob", ["user:?:cart"]), ("prefix", ["user:*"]), ("exact", ["user:1:x"]))
    assert name_of(policy, "user:1:cart") == "glob"
    assert name_of(policy, "user:1:x") == "prefix"
    assert name_of(policy, "user:12:cart") == "prefix"


def test_unmatched_keys_fall_back_to_the_default() -> None:
    policy = table(("catalog", ["catalog:*"]))
    for key in ("", "catalog", "xcatalog:1", "session:1", "Catalog:1"):
        assert policy.classify(key) is policy.default
    assert policy.default.name == "default"
    assert table().classify("anything").name == "default"


def test_prefix_exact_and_glob_patterns() -> None:
    policy = table(
        ("quote", ["quote:v?:*"]),
        ("cart", ["user:*:cart"]),
        ("health", ["healthcheck"]),
        ("shard", ["shard[0-3]:*"]),
        ("not_a", ["x[!a]*"]),
        ("everything_c", ["c*"]),
    )
    cases = {
        "quote:v2:ab12": "quote",
        "quote:v10:ab12": "default",  # ? is exactly one character
        "quote:v2:": "quote",  # * may match nothing
        "user:42:cart": "cart",
        "user:42:cart:x": "default",  # globs match the whole key
        "user::cart": "cart",
        "healthcheck": "health",
        "healthcheck2": "default",  # no wildcard: exactly this key
        "shard2:k": "shard",
        "shard7:k": "default",
        "xb": "not_a",
        "xa": "default",
        "c": "everything_c",
        "catalog:1": "everything_c",
    }
    for key, expected in cases.items():
        assert name_of(policy, key) == expected, key


def test_matching_is_case_sensitive() -> None:
    policy = table(("catalog", ["catalog:*"]), ("quote", ["Quote:V?:*"]), ("exact", ["Health"]))
    assert name_of(policy, "catalog:1") == "catalog"
    assert name_of(policy, "CATALOG:1") == "default"
    assert name_of(policy, "Quote:V1:x") == "quote"
    assert name_of(policy, "quote:v1:x") == "default"
    assert name_of(policy, "health") == "default"


def test_regex_characters_in_patterns_are_literal() -> None:
    policy = table(("dots", ["a.b*"]), ("plus", ["x+y?"]), ("paren", ["(k)*"]))
    assert name_of(policy, "a.b:1") == "dots"
    assert name_of(policy, "axb:1") == "default"
    assert name_of(policy, "x+yz") == "plus"
    assert name_of(policy, "xxyz") == "default"
    assert name_of(policy, "(k):1") == "paren"


def test_star_alone_catches_everything_and_wildcards_span_any_character() -> None:
    policy = table(("all", ["*"]))
    for key in ("", "a", "line\nbreak", "é:ünïcode"):
        assert name_of(policy, key) == "all"
    glob = table(("g", ["a?c*"]))
    assert name_of(glob, "a\nc") == "g"
    assert name_of(glob, "aéc:x") == "g"


PATTERN = st.text(alphabet="ab:*?", min_size=1, max_size=6)
KEY = st.text(alphabet="abAB:", max_size=8)


@given(
    classes=st.lists(st.lists(PATTERN, min_size=1, max_size=3), min_size=0, max_size=4),
    keys=st.lists(KEY, max_size=20),
)
def test_classify_agrees_with_fnmatchcase(classes: list[list[str]], keys: list[str]) -> None:
    """Against the obvious model: the first class with any pattern fnmatchcase() accepts."""
    policy = table(*((f"c{i}", patterns) for i, patterns in enumerate(classes)), memo_size=5)
    for key in keys + keys:  # the second pass is answered from the memo (or after a clear)
        expected = next(
            (
                f"c{i}"
                for i, patterns in enumerate(classes)
                if any(fnmatch.fnmatchcase(key, p) for p in patterns)
            ),
            "default",
        )
        assert name_of(policy, key) == expected, (key, classes)


@given(
    classes=st.lists(st.lists(PATTERN, min_size=1, max_size=3), min_size=0, max_size=4),
    prefix=KEY,
    tails=st.lists(KEY, max_size=20),
)
def test_may_hold_names_every_class_a_key_under_the_prefix_falls_in(
    classes: list[list[str]], prefix: str, tails: list[str]
) -> None:
    """Warmup(prefixes) asks the origins of these classes to list the prefix (rebuild.py)."""
    policy = table(*((f"c{i}", patterns) for i, patterns in enumerate(classes)))
    named = {kc.name for kc in policy.may_hold(prefix)}
    for tail in tails:
        assert name_of(policy, prefix + tail) in named, (prefix + tail, classes)


def test_may_hold_stops_at_a_class_that_takes_every_such_key() -> None:
    policy = table(("hot", ["catalog:hot:*"]), ("catalog", ["catalog:*"]), ("user", ["u:*"]))
    assert [kc.name for kc in policy.may_hold("catalog:")] == ["hot", "catalog"]
    assert [kc.name for kc in policy.may_hold("catalog:cold:")] == ["catalog"]
    assert [kc.name for kc in policy.may_hold("")] == ["hot", "catalog", "user", "default"]
    assert [kc.name for kc in policy.may_hold("x")] == ["default"]


# -- the table ------------------------------------------------------------------------------


def test_memo_is_bounded_and_stays_correct() -> None:
    policy = table(("even", ["even:*"]), memo_size=100)
    for i in range(1_000):
        key = f"{'even' if i % 2 == 0 else 'odd'}:{i}"
        assert name_of(policy, key) == ("even" if i % 2 == 0 else "default")
        assert len(policy._memo) <= 100
    # Repeats after many clears still classify the same way.
    assert name_of(policy, "even:0") == "even"
    assert name_of(policy, "odd:1") == "default"


def test_default_memo_bound() -> None:
    policy = table(("a", ["a:*"]))
    for i in range(MEMO_SIZE * 2 + 10):
        policy.classify(f"a:{i}")
    assert 0 < len(policy._memo) <= MEMO_SIZE


def test_classes_and_by_name() -> None:
    configs = [
        KeyClassConfig("catalog", ("catalog:*",), ttl_seconds=3600, jitter=0.1),
        KeyClassConfig("rate", ("rate:*",), ttl_seconds=0.25, jitter=0, l1=False),
    ]
    default = KeyClassConfig("default", ttl_seconds=60, l1_ttl_seconds=0.0001)
    policy = PolicyTable(configs, default)
    assert [kc.name for kc in policy.classes] == ["catalog", "rate", "default"]
    assert policy.by_name("catalog") == KeyClass("catalog", 3_600_000, 0.1, True, 30_000, 1 << 20)
    assert policy.by_name("rate") == KeyClass("rate", 250, 0.0, False, 30_000, 1 << 20)
    # A sub-millisecond L1 TTL still keeps a copy for 1 ms rather than 0 (= forever).
    assert policy.by_name("default") == KeyClass("default", 60_000, 0.1, True, 1, 1 << 20)
    assert policy.by_name("nope") is None
    assert policy.classify("rate:1") is policy.by_name("rate")


def test_key_classes_are_frozen_and_slotted() -> None:
    kc = table(("a", ["a*"])).classes[0]
    with pytest.raises(AttributeError):
        kc.ttl_ms = 1  # type: ignore[misc]
    assert not hasattr(kc, "__dict__")


def test_example_config_classifies_the_seed_workload() -> None:
    policy = PolicyTable.from_config(load_config(EXAMPLE, env={}))
    cases = {
        "catalog:sku-123": "catalog",
        "product:sku-123": "catalog",
        "inventory:sku-123": "inventory",
        "price:sku-123:EUR": "pricing",
        "profile:cust-9": "profile",
        "session:4f2a": "session",
        "quote:v2:9f86d081884c7d65": "quote",
        "quote:v10:9f86d081884c7d65": "default",
        "rate:login:10.0.0.1": "ratelimit",
        "search:shoes": "default",
    }
    for key, expected in cases.items():
        assert name_of(policy, key) == expected, key
    assert policy.by_name("ratelimit") is not None
    assert policy.by_name("ratelimit").l1 is False  # type: ignore[union-attr]


# -- jitter ---------------------------------------------------------------------------------


@given(
    base=st.integers(min_value=1, max_value=10**10),
    jitter=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    u=st.floats(min_value=0.0, max_value=1.0),
)
def test_jittered_ttl_stays_within_bounds(base: int, jitter: float, u: float) -> None:
    ttl = jittered_ttl_ms(base, jitter, rand=lambda: u)
    assert isinstance(ttl, int)
    assert ttl <= base  # never promises less freshness than configured
    assert ttl >= max(1, math.floor(base * (1 - jitter)))


@given(
    base=st.integers(min_value=-10, max_value=10**6),
    jitter=st.floats(),
    u=st.floats(),
)
def test_jittered_ttl_survives_bad_inputs(base: int, jitter: float, u: float) -> None:
    ttl = jittered_ttl_ms(base, jitter, rand=lambda: u)
    assert 1 <= ttl <= max(1, base)


def test_jitter_deterministic_rand() -> None:
    assert jittered_ttl_ms(1000, 0.2, rand=lambda: 0.0) == 1000
    assert jittered_ttl_ms(1000, 0.2, rand=lambda: 0.5) == 900
    assert jittered_ttl_ms(1000, 0.2, rand=lambda: 0.999999) == 801
    assert jittered_ttl_ms(1000, 0.2, rand=lambda: 1.0) == 800
    assert jittered_ttl_ms(1000, 0.0, rand=lambda: 0.7) == 1000
    assert jittered_ttl_ms(1, 0.9, rand=lambda: 0.99) == 1
    assert jittered_ttl_ms(0, 0.5) == 1


def test_jitter_spreads_real_draws_over_the_whole_range() -> None:
    rng = random.Random(1234)
    draws = [jittered_ttl_ms(10_000, 0.2, rand=rng.random) for _ in range(10_000)]
    assert min(draws) >= 8_000 and max(draws) <= 10_000
    assert min(draws) < 8_100 and max(draws) > 9_900
    assert 8_900 < sum(draws) / len(draws) < 9_100
    assert len(set(draws)) > 1_000
    # And with the module's own random source (the default argument).
    defaults = [jittered_ttl_ms(10_000, 0.2) for _ in range(1_000)]
    assert all(8_000 <= d <= 10_000 for d in defaults) and len(set(defaults)) > 100
