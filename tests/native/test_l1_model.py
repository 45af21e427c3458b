"""The compiled L1 against its plain-Python model: random operation sequences (sets that
force entry- and byte-bound evictions, reads, deletes, clock advances) must be
indistinguishable through every observable: return values, counters, sizes, hottest keys.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cachegw_native.l1 import L1Cache
from tests.native.models import FakeClock, L1Model

KEYS = st.one_of(
    st.sampled_from([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)]),
    st.integers(0, 300).map(lambda i: f"c{i}"),
)
TTLS = st.sampled_from([0.5, 1.0, 2.5, 10.0, 1e6])


class L1Machine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.serial = 0

    @initialize(
        admission=st.sampled_from(["lru", "tinylfu"]),
        max_entries=st.one_of(st.integers(1, 10), st.integers(100, 220)),
        max_bytes=st.integers(1, 400),
    )
    def start(self, admission: str, max_entries: int, max_bytes: int) -> None:
        self.native = L1Cache(max_entries, max_bytes, admission=admission, clock=self.clock)
        self.model = L1Model(max_entries, max_bytes, admission, self.clock)

    @rule(key=KEYS, size=st.integers(0, 60), ttl=TTLS)
    def set(self, key: str, size: int, ttl: float) -> None:
        self.serial += 1
        value = (key, self.serial)
        assert self.native.set(key, value, size, ttl) == self.model.set(key, value, size, ttl)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        assert self.native.get(key) == self.model.get(key)

    @rule(key=KEYS)
    def getitem(self, key: str) -> None:
        expected = self.model.get(key)
        if expected is None:
            with pytest.raises(KeyError):
                self.native[key]
        else:
            assert self.native[key] == expected

    @rule(key=KEYS)
    def contains(self, key: str) -> None:
        assert (key in self.native) == (key in self.model)
        assert self.native.expires_in(key) == self.model.expires_in(key)

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        assert self.native.delete(key) == self.model.delete(key)

    @rule(prefix=st.sampled_from(["a", "b1", "c2", "zz"]))
    def delete_prefix(self, prefix: str) -> None:
        assert self.native.delete_prefix(prefix) == self.model.delete_prefix(prefix)

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 3.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def purge_expired(self) -> None:
        assert self.native.purge_expired() == self.model.purge_expired()

    @precondition(lambda self: self.serial % 7 == 3)
    @rule()
    def clear(self) -> None:
        self.native.clear()
        self.model.clear()

    @invariant()
    def same_observables(self) -> None:
        assert self.native.stats() == self.model.stats()
        assert len(self.native) == len(self.model)
        assert self.native.nbytes == self.model.nbytes
        assert self.native.hottest(4) == self.model.hottest(4)
        assert sorted(self.native.items()) == self.model.items()
        assert self.native.segments() == self.model.segments()
        assert len(self.native) <= self.native.max_entries
        assert self.native.nbytes <= self.native.max_bytes


L1Machine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestL1Machine = L1Machine.TestCase


@pytest.mark.parametrize("admission", ["lru", "tinylfu"])
@pytest.mark.parametrize("seed", range(3))
def test_long_random_run_matches_model(admission: str, seed: int) -> None:
    """Thousands of operations on a skewed stream: windows over one entry, full segments,
    sketch aging (10 x capacity additions) and byte-bound evictions all happen."""
    rng = random.Random(seed)
    clock = FakeClock()
    native = L1Cache(300, 300 * 40, admission=admission, clock=clock)
    model = L1Model(300, 300 * 40, admission, clock)
    for step in range(12_000):
        key = f"k{rng.randint(0, 60) if rng.random() < 0.7 else rng.randint(0, 3000)}"
        op = rng.random()
        if op < 0.55:
            assert native.get(key) == model.get(key)
        elif op < 0.97:
            size, ttl = rng.randint(1, 120), rng.choice([5.0, 30.0, 300.0])
            assert native.set(key, step, size, ttl) == model.set(key, step, size, ttl)
        elif op < 0.99:
            assert native.delete(key) == model.delete(key)
        else:
            clock.advance(rng.choice([1.0, 10.0]))
        if step % 500 == 0:
            assert native.stats() == model.stats()
            assert native.segments() == model.segments()
    assert native.stats() == model.stats()
    assert native.hottest(20) == model.hottest(20)
    stats = native.stats()
    assert stats["evictions"] > 0 and stats["expirations"] > 0
    if admission == "tinylfu":
        assert stats["admissions_refused"] > 0
        assert model.sketch.resets > 0
