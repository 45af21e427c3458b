"""KeyOrder (the L1's sorted key index) against a plain set and sorted(): tiny chunks so
that splits, merges and emptied chunks happen within a few operations, keys of every
str kind so that the C comparison must agree with str's own order."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cachegw_native.l1index import KeyOrder

# Latin-1 (1 byte), BMP (2 bytes) and astral (4 bytes) characters, NUL and the extremes.
ALPHABET = st.sampled_from(
    ["", "\x00", "a", "b", "é", "ÿ", "Ā", "日", "本", "\uffff", "🙂", "\U0010ffff"]
)
TEXT = st.lists(ALPHABET, max_size=5).map("".join)


@given(st.lists(TEXT, max_size=60), st.integers(4, 9))
def test_keys_come_out_in_str_order(keys: list[str], chunk: int) -> None:
    order = KeyOrder(chunk)
    for k in keys:
        order.add(k)
    assert order.keys() == sorted(set(keys))
    assert len(order) == len(set(keys))
    assert all(1 <= n <= chunk for n in order.chunk_sizes())


@given(st.lists(TEXT, max_size=60), TEXT)
def test_take_prefix_is_startswith(keys: list[str], prefix: str) -> None:
    order = KeyOrder(4)
    for k in keys:
        order.add(k)
    assert order.take_prefix(prefix) == sorted(k for k in set(keys) if k.startswith(prefix))
    assert order.keys() == sorted(k for k in set(keys) if not k.startswith(prefix))


class KeyOrderMachine(RuleBasedStateMachine):
    @initialize(chunk=st.integers(4, 8))
    def start(self, chunk: int) -> None:
        self.chunk = chunk
        self.order = KeyOrder(chunk)
        self.model: set[str] = set()

    @rule(key=TEXT)
    def add(self, key: str) -> None:
        assert self.order.add(key) == (key not in self.model)
        self.model.add(key)

    @rule(keys=st.lists(TEXT, min_size=5, max_size=30))
    def add_many(self, keys: list[str]) -> None:
        for key in keys:
            self.add(key)

    @rule(keys=st.lists(TEXT, min_size=5, max_size=30), descending=st.booleans())
    def add_run(self, keys: list[str], descending: bool) -> None:
        """Keys in rising (or falling) order: appends past the last key (before the
        first) open chunks of their own instead of splitting full ones."""
        for key in sorted(keys, reverse=descending):
            self.add(key)

    @rule(key=TEXT)
    def discard(self, key: str) -> None:
        assert self.order.discard(key) == (key in self.model)
        self.model.discard(key)

    @rule(data=st.data())
    def discard_held(self, data: st.DataObject) -> None:
        if self.model:
            self.discard(data.draw(st.sampled_from(sorted(self.model))))

    @rule(data=st.data())
    def take_prefix(self, data: st.DataObject) -> None:
        # Mostly a prefix of a held key (so something matches), sometimes anything.
        near: bool = data.draw(st.booleans())
        if near and self.model:
            key = data.draw(st.sampled_from(sorted(self.model)))
            prefix = key[: data.draw(st.integers(0, len(key)))]
        else:
            prefix = data.draw(TEXT)
        taken = sorted(k for k in self.model if k.startswith(prefix))
        assert self.order.take_prefix(prefix) == taken
        self.model.difference_update(taken)

    @invariant()
    def same_keys(self) -> None:
        assert self.order.keys() == sorted(self.model)
        assert len(self.order) == len(self.model)
        assert all(1 <= n <= self.chunk for n in self.order.chunk_sizes())


KeyOrderMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50)
TestKeyOrderMachine = KeyOrderMachine.TestCase


def test_chunks_split_and_merge_back() -> None:
    order = KeyOrder(8)
    keys = [f"k{i:04}" for i in range(1000)]
    for k in reversed(keys):
        order.add(k)
    sizes = order.chunk_sizes()
    assert sum(sizes) == 1000 and max(sizes) <= 8 and len(sizes) >= 1000 // 8
    for k in keys[::2]:
        order.discard(k)
    for k in keys[1::4]:
        order.discard(k)
    assert order.keys() == keys[3::4]
    assert len(order.chunk_sizes()) <= 2 * 250 // 4 + 1  # merged: two neighbours > 4
    assert order.take_prefix("k0") == [k for k in keys[3::4] if k.startswith("k0")]
    assert order.take_prefix("") == [k for k in keys[3::4] if not k.startswith("k0")]
    assert order.chunk_sizes() == [] and order.keys() == []


@pytest.mark.parametrize("descending", [False, True])
def test_keys_in_order_fill_their_chunks(descending: bool) -> None:
    """Keys added in rising (falling) order leave full chunks behind, not the halves of
    splits: 8 bytes per key in the L1's key order, not 16."""
    order = KeyOrder(8)
    keys = [f"k{i:04}" for i in range(1000)]
    for k in sorted(keys, reverse=descending):
        order.add(k)
    assert order.chunk_sizes() == [8] * 125
    order.add("k0500x")  # inside a full chunk: split as before
    assert sorted(order.chunk_sizes()) == [4, 5] + [8] * 124
    assert order.keys() == sorted([*keys, "k0500x"])


def test_keys_are_owned_and_released() -> None:
    key = "".join(["owned-", "key"])  # a fresh object, referenced only here
    before = sys.getrefcount(key)
    order = KeyOrder()
    order.add(key)
    assert sys.getrefcount(key) == before + 1
    assert not order.add("owned-key")
    order.discard("owned-key")
    assert sys.getrefcount(key) == before
    order.add(key)
    del order
    assert sys.getrefcount(key) == before


def test_validation() -> None:
    with pytest.raises(ValueError):
        KeyOrder(3)
    with pytest.raises(TypeError):
        KeyOrder().add(b"bytes")  # type: ignore[arg-type]
