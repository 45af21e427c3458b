"""Group memberships and the key order of the L1, one rule per test: an entry leaves its
groups (and the key order) by every way out of the cache; delete_prefix matches exactly
the keys str.startswith would, in every str kind."""

from __future__ import annotations

import gc
import random
import sys
import weakref

import pytest

from cachegw_native.l1 import L1Cache
from tests.native.models import FakeClock


def make(max_entries: int = 100, max_bytes: int = 10_000, **kw: object) -> L1Cache:
    return L1Cache(max_entries, max_bytes, clock=FakeClock(), **kw)  # type: ignore[arg-type]


def keys(c: L1Cache) -> list[str]:
    return sorted(k for k, _ in c.items())


def test_delete_group_removes_exactly_its_members() -> None:
    c = make()
    c.set("sku:1", 1, 1, 9.0, ("c:catalog", "t:sku-1"))
    c.set("sku:2", 2, 1, 9.0, ("c:catalog", "t:sku-2"))
    c.set("page:1", 3, 1, 9.0, ("c:pages", "t:sku-1", "t:sku-2"))
    c.set("plain", 4, 1, 9.0)
    assert [c.group_size(g) for g in ("c:catalog", "t:sku-1", "t:sku-2")] == [2, 2, 2]
    assert c.delete_group("t:sku-1") == 2
    assert keys(c) == ["plain", "sku:2"]
    assert c.group_size("t:sku-1") == 0 and c.group_size("c:pages") == 0
    assert c.group_size("t:sku-2") == 1 and c.group_size("c:catalog") == 1
    assert c.delete_group("t:sku-1") == 0 and c.delete_group("never") == 0
    assert c.delete_group("c:catalog") == 1 and keys(c) == ["plain"]
    c._check_indexes()


def test_lru_eviction_leaves_groups() -> None:
    c = make(max_entries=2)
    c.set("a", 1, 1, 9.0, ("g", "t:a"))
    c.set("b", 2, 1, 9.0, ("g",))
    c.set("c", 3, 1, 9.0, ("g",))  # "a" is the least recent: evicted
    assert c.stats()["evictions"] == 1
    assert c.group_size("g") == 2 and c.group_size("t:a") == 0
    assert c.delete_group("t:a") == 0
    assert c.delete_group("g") == 2 and len(c) == 0
    c._check_indexes()


def test_byte_bound_eviction_leaves_groups() -> None:
    c = make(max_bytes=100)
    for i in range(4):
        c.set(f"k{i}", i, 25, 9.0, ("g", f"t:{i}"))
    c.set("big", 0, 60, 9.0, ("g",))  # k0, k1, k2 go to make room
    assert keys(c) == ["big", "k3"] and c.stats()["evictions"] == 3
    assert [c.group_size(f"t:{i}") for i in range(4)] == [0, 0, 0, 1]
    assert c.group_size("g") == 2
    c._check_indexes()


@pytest.mark.parametrize("admission", ["lru", "tinylfu"])
def test_expired_entries_leave_groups_on_read_purge_and_bound(admission: str) -> None:
    clock = FakeClock()
    c = L1Cache(3, 10_000, admission=admission, clock=clock)
    c.set("read", 1, 1, 1.0, ("g", "t:read"))
    c.set("purged", 2, 1, 1.0, ("g", "t:purged"))
    c.set("bounded", 3, 1, 1.0, ("g", "t:bounded"))
    clock.advance(1.0)
    assert c.group_size("g") == 3  # expired but not reclaimed: still members
    assert c.get("read") is None
    assert c.group_size("t:read") == 0 and c.group_size("g") == 2
    c.set("x", 0, 1, 9.0)
    c.set("y", 0, 1, 9.0)  # a fourth entry: an expired one makes room
    assert c.stats()["expirations"] == 2
    assert c.purge_expired() == 1 and c.stats()["expirations"] == 3
    assert c.group_size("g") == 0 and len(c) == 2
    assert all(c.group_size(f"t:{k}") == 0 for k in ("read", "purged", "bounded"))
    c._check_indexes()


def test_reset_with_other_groups_moves_the_entry() -> None:
    c = make()
    c.set("k", 1, 1, 9.0, ("c:old", "t:a"))
    c.set("k", 2, 1, 9.0, ("c:new", "t:a"))
    assert c.group_size("c:old") == 0 and c.group_size("c:new") == 1
    assert c.group_size("t:a") == 1
    assert c.delete_group("c:old") == 0 and c.get("k") == 2
    c.set("k", 3, 1, 9.0, ("c:new", "t:a"))  # same groups: kept as they are
    assert c.group_size("c:new") == c.group_size("t:a") == 1
    c.set("k", 4, 1, 9.0)  # no groups: leaves all of them
    assert c.group_size("c:new") == c.group_size("t:a") == 0
    assert c.delete_group("t:a") == 0 and c.get("k") == 4
    c.set("k", 5, 1, 9.0, ("t:b",))
    assert c.delete_group("t:b") == 1 and len(c) == 0
    c._check_indexes()


def test_refused_entries_leave_groups() -> None:
    c = make(max_bytes=100)
    c.set("k", 1, 10, 9.0, ("g",))
    assert not c.set("k", 2, 101, 9.0, ("g", "h"))  # too big: the old value goes too
    assert c.group_size("g") == c.group_size("h") == 0 and len(c) == 0
    tiny = L1Cache(100, 10_000, admission="tinylfu", clock=FakeClock())
    for i in range(100):
        tiny.set(f"hot{i}", i, 1, 9.0, ("hot",))
        for _ in range(3):
            tiny.get(f"hot{i}")
    for i in range(20):  # each pushes the previous one out of the window, to lose
        tiny.set(f"cold{i}", i, 1, 9.0, ("cold",))
    assert tiny.stats()["admissions_refused"] >= 19 and tiny.stats()["evictions"] == 0
    assert tiny.group_size("cold") == sum(f"cold{i}" in tiny for i in range(20)) == 1
    assert tiny.group_size("hot") == sum(f"hot{i}" in tiny for i in range(100))
    assert tiny.group_size("hot") + tiny.group_size("cold") == len(tiny) == 100
    tiny._check_indexes()


def test_delete_and_clear_leave_groups() -> None:
    c = make()
    c.set("a", 1, 1, 9.0, ("g",))
    c.set("b", 2, 1, 9.0, ("g",))
    assert c.delete("a") and c.group_size("g") == 1
    c.clear()
    assert c.group_size("g") == 0 and c.delete_group("g") == 0
    c.set("a", 3, 1, 9.0, ("g",))
    assert c.group_size("g") == 1
    c._check_indexes()


def test_a_repeated_group_name_counts_once() -> None:
    c = make()
    c.set("a", 1, 1, 9.0, ("g", "g", "h", "g"))
    assert c.group_size("g") == 1 and c.group_size("h") == 1
    c.set("a", 2, 1, 9.0, ("g", "h"))
    assert c.group_size("g") == 1
    assert c.delete_group("g") == 1 and c.group_size("h") == 0
    c._check_indexes()


def test_group_names_must_be_a_tuple_of_str() -> None:
    c = make()
    c.set("a", 1, 1, 9.0, ("g",))
    with pytest.raises(TypeError):
        c.set("a", 2, 1, 9.0, ("h", 7))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        c.set("a", 2, 1, 9.0, ["h"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        c.set("new", 2, 1, 9.0, (b"h",))  # type: ignore[arg-type]
    assert c.get("a") == 1 and c.group_size("g") == 1 and c.group_size("h") == 0
    assert "new" not in c and len(c) == 1
    with pytest.raises(TypeError):
        c.delete_group(1)  # type: ignore[arg-type]
    c._check_indexes()


def test_group_names_are_kept_only_while_the_group_has_members() -> None:
    name = "".join(["t:", "unique-name"])  # a fresh object, referenced only here
    before = sys.getrefcount(name)
    c = make(max_entries=1)
    c.set("a", 1, 1, 9.0, (name, name))
    assert sys.getrefcount(name) == before + 1  # one group record, whatever the repeats
    c.set("b", 1, 1, 9.0)  # "a" is evicted: its group is gone, and the name with it
    assert c.group_size("t:unique-name") == 0
    assert sys.getrefcount(name) == before
    c.set("b", 2, 1, 9.0, (name,))
    c.set("b", 3, 1, 9.0, ("t:unique-name",))  # the same groups: nothing changes hands
    assert sys.getrefcount(name) == before + 1
    c.delete("b")
    assert sys.getrefcount(name) == before


def test_values_are_released_by_delete_group_and_delete_prefix() -> None:
    class Value:
        pass

    c = make()
    refs = []
    for i in range(6):
        v = Value()
        refs.append(weakref.ref(v))
        c.set(f"k{i}", v, 1, 9.0, ("odd" if i % 2 else "even",))
        del v
    assert c.delete_group("odd") == 3
    assert [r() is None for r in refs] == [False, True] * 3
    assert c.delete_prefix("k") == 3
    gc.collect()
    assert all(r() is None for r in refs)


UNICODE_KEYS = [
    "user:1", "user:10", "user:100", "user:2", "user", "users:1", "use",
    "é", "éa", "é:1", "ée", "e", "f",
    "日本", "日本語", "日本語:1", "日", "本",
    "🙂", "🙂🙂", "🙂x", "x🙂",
    "é日", "é🙂", "\x00", "\x00a", "",
]  # fmt: skip


@pytest.mark.parametrize(
    "prefix",
    ["user:1", "user:10", "user:", "user", "use", "us", "é", "éa", "e", "日本", "日本語",
     "日", "🙂", "🙂🙂", "x", "\x00", "", "zzz", "user:1000", "日本語:1:x"],
)  # fmt: skip
def test_delete_prefix_matches_startswith_in_every_str_kind(prefix: str) -> None:
    c = make()
    for i, k in enumerate(UNICODE_KEYS):
        c.set(k, i, 1, 9.0)
    expected = sorted(k for k in UNICODE_KEYS if k.startswith(prefix))
    rest = sorted(k for k in UNICODE_KEYS if not k.startswith(prefix))
    assert c.delete_prefix(prefix) == len(expected)
    assert keys(c) == rest
    assert c.delete_prefix(prefix) == 0
    c._check_indexes()


def test_delete_prefix_of_a_longer_key_spares_the_shorter_ones() -> None:
    c = make()
    for k in ("a", "ab", "abc", "abd", "abcd", "b"):
        c.set(k, k, 1, 9.0)
    assert c.delete_prefix("abc") == 2 and keys(c) == ["a", "ab", "abd", "b"]
    assert c.delete_prefix("ab") == 2 and keys(c) == ["a", "b"]
    assert c.delete_prefix("a") == 1 and keys(c) == ["b"]


def test_delete_prefix_counts_expired_entries_and_no_counter() -> None:
    clock = FakeClock()
    c = L1Cache(10, 100, clock=clock)
    c.set("p:1", 1, 1, 1.0)
    c.set("p:2", 2, 1, 9.0)
    clock.advance(1.0)
    before = c.stats()
    assert c.delete_prefix("p:") == 2 and len(c) == 0
    assert c.stats() == {**before, "entries": 0, "bytes": 0}


@pytest.mark.parametrize("admission", ["lru", "tinylfu"])
def test_many_entries_across_many_chunks(admission: str) -> None:
    """Thousands of keys (the key order splits and merges chunks of 512) under random
    fills, evictions, deletes and broad invalidations, against a dict of what is cached."""
    rng = random.Random(7)
    c = L1Cache(3000, 3000 * 10, admission=admission, clock=FakeClock())
    for step in range(30_000):
        key = f"{rng.choice('abc')}:{rng.randint(0, 6000):05}"
        op = rng.random()
        if op < 0.9:
            c.set(key, step, rng.randint(1, 15), 60.0, (f"t:{rng.randint(0, 99)}",))
        elif op < 0.97:
            c.get(key)
        elif op < 0.985:
            c.delete(key)
        elif op < 0.997:
            prefix = key[: rng.randint(4, 7)]
            before = keys(c)
            assert c.delete_prefix(prefix) == sum(k.startswith(prefix) for k in before)
            assert keys(c) == [k for k in before if not k.startswith(prefix)]
        else:
            name = f"t:{rng.randint(0, 99)}"
            size = c.group_size(name)
            assert c.delete_group(name) == size and c.group_size(name) == 0
            assert len(keys(c)) == len(c)
        if step % 3000 == 0:
            c._check_indexes()
    assert len(c) > 1000
    c._check_indexes()
    n = len(c)
    assert c.delete_prefix("") == n and len(c) == 0
    c._check_indexes()
