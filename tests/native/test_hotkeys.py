"""Hot-key tracker and count-min sketches against their models, plus the accuracy they
promise on a skewed stream."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cachegw_native.hotkeys import HotKeys
from cachegw_native.sketch import CountMinSketch, FrequencySketch
from tests.native.models import CountMinModel, FrequencySketchModel, HotKeysModel

KEYS = st.one_of(st.sampled_from([f"hot{i}" for i in range(5)]), st.text(max_size=6))
NAMES = st.sampled_from([f"k{i}" for i in range(30)]) | st.text(max_size=4)


class HotKeysMachine(RuleBasedStateMachine):
    @initialize(capacity=st.integers(1, 6), width=st.sampled_from([1, 4, 16, 100]))
    def start(self, capacity: int, width: int) -> None:
        self.native = HotKeys(capacity, width, 3)
        self.model = HotKeysModel(capacity, width, 3)

    @rule(key=KEYS, count=st.sampled_from([0, 1, 1, 1, 5, 2**33]))
    def add(self, key: str, count: int) -> None:
        self.native.add(key, count)
        self.model.add(key, count)
        assert self.native.estimate(key) == self.model.estimate(key)

    @rule()
    def decay(self) -> None:
        self.native.decay()
        self.model.decay()

    @rule()
    def clear(self) -> None:
        self.native.clear()
        self.model.clear()

    @invariant()
    def same_top(self) -> None:
        assert self.native.top(10) == self.model.top(10)
        assert len(self.native) == len(self.model) <= self.native.capacity


def test_a_key_tracked_below_capacity_lowers_the_floor() -> None:
    """Found by the machine above: after decay() set the floor from the only tracked key,
    a colder key joined below capacity without lowering it, and from then on a key
    warmer than that one could not take its place. (A wide sketch: str hashes differ per
    process, and in a 4-wide one "000" and "hot0" may share every row's counter.)"""
    for hk in (HotKeys(2, 1024), HotKeysModel(2, 1024)):
        hk.add("hot0", 5)
        hk.decay()
        hk.add("hot0", 0)
        hk.add("", 0)
        hk.add("000", 1)
        assert hk.top(5) == [("hot0", 2), ("000", 1)], type(hk).__name__


HotKeysMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHotKeysMachine = HotKeysMachine.TestCase


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 40),
    keys=st.lists(
        st.sampled_from([f"k{i}" for i in range(30)]) | st.text(max_size=4), max_size=400
    ),
)
def test_frequency_sketch_matches_model(capacity: int, keys: list[str]) -> None:
    native, model = FrequencySketch(capacity), FrequencySketchModel(capacity)
    for key in keys:
        native.increment(key)
        model.increment(key)
    assert (native.width, native.sample_size) == (model.width, model.sample_size)
    assert (native.additions, native.resets) == (model.additions, model.resets)
    for key in set(keys) | {"absent"}:
        assert native.estimate(key) == model.estimate(key) <= 15


def test_count_min_matches_model_and_never_undercounts() -> None:
    rng = random.Random(7)
    native, model = CountMinSketch(64, 4), CountMinModel(64, 4)
    truth: dict[str, int] = {}
    for _ in range(5000):
        key = f"k{rng.randint(0, 300)}"
        count = rng.randint(1, 3)
        truth[key] = truth.get(key, 0) + count
        assert native.add(key, count) == model.add(key, count)
    for key, n in truth.items():
        assert native.estimate(key) == model.estimate(key) >= n
    native.decay()
    model.decay()
    assert all(native.estimate(k) == model.estimate(k) for k in truth)


def test_top_finds_the_heavy_hitters_of_a_zipf_stream() -> None:
    rng = random.Random(3)
    keys = [f"item:{i}" for i in range(20_000)]
    weights = [1 / (i + 1) ** 1.1 for i in range(len(keys))]
    stream = rng.choices(keys, weights, k=60_000)
    hot = HotKeys(capacity=32, width=4096, depth=4)
    for key in stream:
        hot.add(key)
    exact: dict[str, int] = {}
    for key in stream:
        exact[key] = exact.get(key, 0) + 1
    true_top = sorted(exact, key=lambda k: -exact[k])[:10]
    found = [k for k, _ in hot.top(10)]
    assert len(set(found) & set(true_top)) >= 9
    for key, est in hot.top(10):
        assert est >= exact[key]


def test_validation_and_small_cases() -> None:
    with pytest.raises(ValueError):
        HotKeys(0)
    with pytest.raises(ValueError):
        HotKeys(4).add("k", -1)
    with pytest.raises(ValueError):
        CountMinSketch(16, 0)
    with pytest.raises(ValueError):
        FrequencySketch(0)
    h = HotKeys(2, width=1000)
    assert h.width == 1024 and h.depth == 4 and h.capacity == 2
    assert h.top(5) == [] and h.top(0) == [] and h.estimate("x") == 0
    h.add("a", 3)
    h.add("b", 1)
    h.add("c", 2)  # beats b, the smallest
    assert h.top(5) == [("a", 3), ("c", 2)]
