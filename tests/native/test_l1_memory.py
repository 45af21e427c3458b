"""The L1's memory accounting (charge_overhead) and compaction, against the plain-Python
model: what an entry, a membership and a group are charged, that the charges leave with
the entries whichever way they leave, and that compacting the native storage after most
entries left changes nothing observable while it gives the storage back."""

from __future__ import annotations

import ctypes
import random
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachegw_native.l1 import (
    ENTRY_OVERHEAD,
    GROUP_OVERHEAD,
    MEMBERSHIP_OVERHEAD,
    L1Cache,
    allocated,
    footprint,
)
from tests.native.models import FakeClock, L1Model, group_charge, str_size
from tests.native.models import allocated as allocated_model

NAME_CHARS = st.sampled_from(["a", "z", ":", "é", "ÿ", "Ā", "日", "\uffff", "🙂", "\U0010ffff"])
NAMES = st.lists(NAME_CHARS, max_size=12).map("".join)


@given(st.integers(0, 1 << 22))
def test_allocated_matches_the_model(n: int) -> None:
    assert allocated(n) == allocated_model(n)
    assert allocated(n) >= n


def test_allocated_rounds_like_the_allocators() -> None:
    assert [allocated(n) for n in (0, 1, 16, 17, 33, 512)] == [0, 16, 16, 32, 48, 512]
    assert allocated(513) == 528  # malloc: 8 bytes of header, 16-byte aligned
    assert allocated(200_000) % 4096 == 0  # mmapped: whole pages
    with pytest.raises(ValueError):
        allocated(-1)


def test_footprint_sums_allocated_sizes() -> None:
    key, body = "catalog:1", b"x" * 600
    assert footprint() == 0
    assert footprint(key, body) == allocated(sys.getsizeof(key)) + allocated(sys.getsizeof(body))


OBJECTS = st.one_of(
    st.text(),
    st.binary(max_size=3000),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=5),
    st.lists(st.one_of(st.text(max_size=3), st.binary(max_size=3)), max_size=6).map(tuple),
)


@given(st.lists(OBJECTS, max_size=6))
def test_footprint_is_allocated_getsizeof(objects: list[object]) -> None:
    """footprint() computes the sizes of str, bytes, tuple, float and int in C: they must
    be sys.getsizeof's, whatever the object."""
    expected = sum(allocated(sys.getsizeof(obj)) for obj in objects)
    assert footprint(*objects) == expected


def test_footprint_sees_a_cached_utf8_copy() -> None:
    """A non-ASCII str may carry a UTF-8 copy (made by PyUnicode_AsUTF8, e.g. by
    protobuf): counted as sys.getsizeof counts it."""
    key = "".join(["clé-", "日本"])  # a fresh non-ASCII str
    plain = sys.getsizeof(key)
    as_utf8 = ctypes.pythonapi.PyUnicode_AsUTF8
    as_utf8.argtypes, as_utf8.restype = [ctypes.py_object], ctypes.c_char_p
    assert as_utf8(key) == key.encode()
    assert sys.getsizeof(key) > plain
    assert footprint(key) == allocated(sys.getsizeof(key))


@given(NAMES)
def test_a_group_is_charged_its_record_and_its_name(name: str) -> None:
    """One entry in one group: its size, ENTRY_OVERHEAD, one membership, and the group
    (GROUP_OVERHEAD + the name string's allocation), for names of every str kind."""
    c = L1Cache(10, 1 << 30, charge_overhead=True)
    assert c.set("k", 1, 7, 60.0, (name,))
    # A one-character str is a shared singleton: another test (protobuf encoding it) may
    # have given it a cached UTF-8 copy, which getsizeof, and the charge, count too.
    utf8_copy = len(name.encode()) + 1
    assert sys.getsizeof(name) in (str_size(name), str_size(name) + utf8_copy)
    charge = GROUP_OVERHEAD + allocated(sys.getsizeof(name))
    assert group_charge(name) == charge
    assert c.nbytes == 7 + ENTRY_OVERHEAD + MEMBERSHIP_OVERHEAD + charge
    c.delete("k")
    assert c.nbytes == 0


def test_charges_follow_entries_and_groups() -> None:
    c = L1Cache(100, 1 << 30, charge_overhead=True)
    assert c.charge_overhead and not L1Cache(1, 1).charge_overhead
    one = ENTRY_OVERHEAD + MEMBERSHIP_OVERHEAD
    # A repeated name is one membership; a shared group is charged once.
    assert c.set("a", 1, 10, 60.0, ("c:x", "c:x"))
    assert c.nbytes == 10 + one + group_charge("c:x")
    assert c.set("b", 2, 20, 60.0, ("c:x",))
    assert c.nbytes == 30 + 2 * one + group_charge("c:x")
    # Without groups: the entry alone.
    assert c.set("n", 3, 5, 60.0)
    assert c.nbytes == 35 + 2 * one + ENTRY_OVERHEAD + group_charge("c:x")
    # A set with other groups moves the charges; stats() shows the same bytes.
    assert c.set("a", 1, 10, 60.0, ("c:x", "t:1"))
    expected = 35 + 3 * ENTRY_OVERHEAD + 3 * MEMBERSHIP_OVERHEAD
    assert c.nbytes == expected + group_charge("c:x") + group_charge("t:1")
    assert c.stats()["bytes"] == c.nbytes
    assert c.delete_group("t:1") == 1
    assert c.nbytes == 25 + 2 * ENTRY_OVERHEAD + MEMBERSHIP_OVERHEAD + group_charge("c:x")
    c.clear()
    assert c.nbytes == 0


def test_an_entry_whose_charge_exceeds_the_bound_is_refused() -> None:
    c = L1Cache(10, ENTRY_OVERHEAD + 50, charge_overhead=True)
    assert c.set("k", 1, 50, 60.0)
    assert not c.set("k", 2, 51, 60.0)  # and the older value is gone
    assert "k" not in c and c.nbytes == 0
    # The group's own charge counts too: an entry and its group must fit together.
    assert not c.set("k", 3, 0, 60.0, ("c:x",))
    assert c.nbytes == 0 and c.group_size("c:x") == 0


@pytest.mark.parametrize("admission", ["lru", "tinylfu"])
def test_the_byte_bound_holds_the_charges(admission: str) -> None:
    rng = random.Random(7)
    c = L1Cache(10_000, 50_000, admission=admission, charge_overhead=True)
    for i in range(3000):
        tags = tuple(f"t:{rng.randint(0, 300)}" for _ in range(rng.randint(0, 3)))
        c.set(f"k{rng.randint(0, 2000)}", i, rng.randint(0, 200), 60.0, ("c:x", *tags))
        assert c.nbytes <= c.max_bytes
    assert c.stats()["evictions"] > 0
    c._check_indexes()


@pytest.mark.parametrize("charge_overhead", [False, True])
@pytest.mark.parametrize("admission", ["lru", "tinylfu"])
def test_compaction_changes_nothing_observable(admission: str, charge_overhead: bool) -> None:
    """Grow the storage with 300 entries in groups (of 440 set), remove most of them every
    way there is, then go on setting, reading and evicting against the model: the set that finds
    the storage under half used compacts it (smaller footprint), and every observable
    (LRU order and segments included: later evictions pick the same victims) agrees."""
    rng = random.Random(3)
    clock = FakeClock()
    native = L1Cache(
        300, 1 << 30, admission=admission, clock=clock, charge_overhead=charge_overhead
    )
    model = L1Model(300, 1 << 30, admission, clock, charge_overhead)

    def groups_of(i: int) -> tuple[str, ...]:
        return (f"c:{i % 3}", f"t:{i % 40}", f"t:é{i % 7}")[: 1 + i % 3]

    def put(i: int) -> None:
        key = f"k{i}"
        assert native.set(key, i, i % 50, 100.0, groups_of(i)) == model.set(
            key, i, i % 50, 100.0, groups_of(i)
        )

    def same() -> None:
        assert native.stats() == model.stats()
        assert native.segments() == model.segments()
        assert sorted(native.items()) == model.items()
        assert native.hottest(10) == model.hottest(10)
        for name in {g for i in range(600) for g in groups_of(i)}:
            assert native.group_size(name) == model.group_size(name)
        native._check_indexes()

    for i in range(440):
        put(i)
    for _ in range(300):
        key = f"k{rng.randint(0, 439)}"
        assert native.get(key) == model.get(key)
    grown = native._footprint()
    assert native.delete_group("c:0") == model.delete_group("c:0")
    assert native.delete_prefix("k1") == model.delete_prefix("k1")
    for i in range(0, 440, 2):
        assert native.delete(f"k{i}") == model.delete(f"k{i}")
    same()
    assert len(native) < 150  # under half the slots
    put(1000)  # compacts
    small = native._footprint()
    assert small["slots"] < grown["slots"] / 2
    assert small["index"] < grown["index"]
    assert small["groups"] < grown["groups"]
    same()
    for step in range(4000):
        i = rng.randint(0, 600)
        op = rng.random()
        if op < 0.45:
            assert native.get(f"k{i}") == model.get(f"k{i}")
        elif op < 0.95:
            put(i)
        elif op < 0.96:
            name = rng.choice(["c:1", "t:3", "t:é2"])
            assert native.delete_group(name) == model.delete_group(name)
        elif op < 0.999:
            assert native.delete(f"k{i}") == model.delete(f"k{i}")
        else:
            clock.advance(60.0)
        if step % 500 == 0:
            same()
    same()
    assert native.stats()["evictions"] > 0
