"""The compiled GetMany loop (batch.l1_results) against its plain-Python model, over
random L1 contents and batches: the same pieces, the same misses, the same counts."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from cachegw_gateway import wire
from cachegw_native.batch import l1_results
from cachegw_native.hotkeys import HotKeys
from cachegw_native.l1 import L1Cache
from tests.native.models import FakeClock, L1Model, l1_results_model


@dataclass(slots=True)
class Counters:
    hits_l1: int = 0


KEYS = st.sampled_from([f"k{i}" for i in range(12)] + ["é", "日本", "🙂", ""])
ENTRIES = st.dictionaries(
    KEYS,
    st.tuples(
        st.binary(max_size=20),  # the answer
        st.floats(-5.0, 3e9, allow_nan=False),  # fresh_until - now, seconds
        st.floats(0.05, 10.0),  # L1 TTL
    ),
    max_size=10,
)


@settings(max_examples=300, deadline=None)
@given(ENTRIES, st.lists(KEYS, max_size=30), st.floats(0.0, 8.0))
def test_l1_results_matches_the_model(
    entries: dict[str, tuple[bytes, float, float]], keys: list[str], later: float
) -> None:
    clock = FakeClock()
    native, model = L1Cache(100, 1 << 20, clock=clock), L1Model(100, 1 << 20, "lru", clock)
    counts = {"native": Counters(), "model": Counters()}
    for key, (body, fresh, ttl) in entries.items():
        for cache, which in ((native, "native"), (model, "model")):
            value = (body, clock() + fresh, counts[which], wire.result_framing(body))
            cache.set(key, value, 64, ttl)
    clock.advance(later)
    hot_native, hot_model = HotKeys(8), HotKeys(8)
    got = l1_results(native, keys, clock(), hot_native, wire.TTL_TABLES)
    want = l1_results_model(model, keys, clock(), hot_model, wire.TTL_TABLES)
    assert got == want
    assert counts["native"].hits_l1 == counts["model"].hits_l1
    assert hot_native.top(8) == hot_model.top(8)


def test_l1_results_without_hot_keys_and_with_an_empty_batch() -> None:
    l1 = L1Cache(10, 1 << 20)
    counters = Counters()
    l1.set("a", (b"A", 1e12, counters, b"\x0a\x07"), 10, 60)
    pieces, missing = l1_results(l1, ["a", "b"], 0.0, None, wire.TTL_TABLES)
    assert missing == [1] and pieces[:2] == [b"\x0a\x07", b"A"] and pieces[5:] == [b""] * 5
    assert counters.hits_l1 == 1
    assert l1_results(l1, [], 0.0, None, wire.TTL_TABLES) == ([], [])
