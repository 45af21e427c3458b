"""The L1's documented behaviour, one rule per test (the model tests cover combinations)."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

from cachegw_native.l1 import PRECISE_WINDOW, L1Cache
from tests.native.models import FakeClock


def make(max_entries: int = 100, max_bytes: int = 10_000, **kw: object) -> L1Cache:
    return L1Cache(max_entries, max_bytes, **kw)  # type: ignore[arg-type]


def test_get_set_replace_and_counters() -> None:
    c = make(clock=FakeClock())
    assert c.get("a") is None
    assert c.set("a", b"1", 10, 5.0)
    assert c.get("a") == b"1"
    assert c["a"] == b"1"
    assert c.set("a", b"2", 30, 5.0)
    assert c.get("a") == b"2"
    assert (len(c), c.nbytes) == (1, 30)
    with pytest.raises(KeyError):
        c["missing"]
    s = c.stats()
    assert (s["hits"], s["misses"], s["entries"], s["bytes"]) == (3, 2, 1, 30)


def test_entry_expires_exactly_at_its_ttl() -> None:
    clock = FakeClock()
    c = make(clock=clock)
    c.set("a", 1, 1, 2.0)
    clock.advance(1.5)
    assert "a" in c and c.expires_in("a") == pytest.approx(0.5)
    clock.advance(0.5)
    assert "a" not in c  # expired but not reclaimed: contains does not count
    assert len(c) == 1 and c.stats()["expirations"] == 0
    assert c.get("a") is None
    assert c.stats()["expirations"] == 1 and c.stats()["misses"] == 1 and len(c) == 0


def test_contains_touches_neither_counters_nor_recency() -> None:
    c = make(max_entries=2, clock=FakeClock())
    c.set("a", 1, 1, 9.0)
    c.set("b", 2, 1, 9.0)
    assert "a" in c and "zz" not in c
    c.set("c", 3, 1, 9.0)  # "a" is still least recent: it goes
    assert "a" not in c and "b" in c
    assert c.stats()["hits"] == c.stats()["misses"] == 0


def test_lru_order_follows_gets() -> None:
    c = make(max_entries=3, clock=FakeClock())
    for k in "abc":
        c.set(k, k, 1, 9.0)
    c.get("a")
    c.set("d", "d", 1, 9.0)
    assert sorted(k for k in "abcd" if k in c) == ["a", "c", "d"]
    assert c.stats()["evictions"] == 1


def test_byte_bound_evicts_until_it_holds() -> None:
    c = make(max_entries=100, max_bytes=100, clock=FakeClock())
    for i in range(5):
        c.set(f"k{i}", i, 20, 9.0)
    assert c.set("big", 0, 70, 9.0)
    assert c.nbytes <= 100 and "big" in c and "k4" in c and "k3" not in c
    assert c.stats()["evictions"] == 4


def test_oversize_set_is_refused_and_drops_the_stale_value() -> None:
    c = make(max_bytes=100, clock=FakeClock())
    c.set("a", "old", 10, 9.0)
    assert not c.set("a", "new", 101, 9.0)
    assert c.get("a") is None
    assert c.stats()["admissions_refused"] == 1


def test_bound_removal_of_an_expired_entry_counts_as_expiration() -> None:
    clock = FakeClock()
    c = make(max_entries=1, clock=clock)
    c.set("a", 1, 1, 1.0)
    clock.advance(2.0)
    c.set("b", 2, 1, 9.0)
    assert c.stats()["expirations"] == 1 and c.stats()["evictions"] == 0


def test_delete_delete_prefix_clear_purge() -> None:
    clock = FakeClock()
    c = make(clock=clock)
    for k in ("user:1", "user:2", "users", "item:1"):
        c.set(k, k, 5, 9.0)
    assert c.delete("item:1") and not c.delete("item:1")
    assert c.delete_prefix("user:") == 2
    assert c.delete_prefix("") == 1
    assert len(c) == 0 and c.nbytes == 0
    c.set("x", 1, 1, 1.0)
    c.set("y", 1, 1, 9.0)
    c.get("y")
    clock.advance(1.0)
    assert c.purge_expired() == 1 and c.stats()["expirations"] == 1
    c.clear()
    assert len(c) == 0 and c.nbytes == 0 and c.stats()["hits"] == 1  # counters survive


def test_hottest_orders_by_hits_then_key_and_skips_cold_and_expired() -> None:
    clock = FakeClock()
    c = make(clock=clock)
    for k, hits in (("a", 3), ("b", 5), ("c", 3), ("d", 0)):
        c.set(k, k, 1, 9.0)
        for _ in range(hits):
            c.get(k)
    c.set("short", 1, 1, 1.0)
    for _ in range(4):
        c.get("short")
    assert c.hottest(10) == [("b", 5), ("short", 4), ("a", 3), ("c", 3)]
    clock.advance(1.0)
    assert c.hottest(2) == [("b", 5), ("a", 3)]
    assert c.hottest(0) == []


def test_validation() -> None:
    with pytest.raises(ValueError):
        L1Cache(0, 10)
    with pytest.raises(ValueError):
        L1Cache(10, 0)
    with pytest.raises(ValueError):
        L1Cache(10, 10, admission="lfu")
    c = make()
    with pytest.raises(ValueError):
        c.set("a", 1, -1, 1.0)
    for bad_ttl in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            c.set("a", 1, 1, bad_ttl)
    with pytest.raises(TypeError):
        c.set(b"bytes-key", 1, 1, 1.0)  # type: ignore[arg-type]
    assert c.stats()["entries"] == 0


def test_clock_errors_propagate() -> None:
    def broken() -> float:
        raise RuntimeError("clock broke")

    c = make(clock=broken)
    with pytest.raises(RuntimeError, match="clock broke"):
        c.set("a", 1, 1, 1.0)


def test_native_clock_expires_entries_on_time() -> None:
    c = make()
    c.set("short", 1, 1, 0.05)
    c.set("long", 1, 1, 60.0)
    assert c.get("short") == 1
    assert 59.0 < (c.expires_in("long") or 0) <= 60.0
    deadline = time.monotonic() + 0.05
    time.sleep(0.06)
    assert time.monotonic() > deadline
    assert c.get("short") is None and c.get("long") == 1
    assert PRECISE_WINDOW >= 0.1


def test_values_are_released_by_every_way_out() -> None:
    class Value:
        pass

    clock = FakeClock()
    c = make(max_entries=3, clock=clock)
    refs = []
    for i in range(8):  # evicted, replaced, deleted, cleared, expired, dropped with the cache
        v = Value()
        refs.append(weakref.ref(v))
        c.set(f"k{i % 5}", v, 1, 1.0 if i == 7 else 9.0)
        del v
    assert sum(r() is not None for r in refs) == 3  # k0, k1, k2 of the last round
    assert c.delete("k1")
    clock.advance(1.0)
    assert c.get("k2") is None  # the i == 7 value expired
    assert [r() is not None for r in refs].count(True) == 1
    c.clear()
    v = Value()
    refs.append(weakref.ref(v))
    c.set("last", v, 1, 9.0)
    del v, c
    gc.collect()
    assert all(r() is None for r in refs)


def test_keys_are_compared_by_value_in_every_string_kind() -> None:
    c = make(clock=FakeClock())
    names = ["ascii", "latin-é", "日本語", "emoji-🙂", "", "a" * 300]
    for i, name in enumerate(names):
        assert c.set(name, i, 1, 9.0)
    for i, name in enumerate(names):
        fresh = "".join(list(name))  # an equal str that is not the same object
        assert c.get(fresh) == i and fresh in c
    assert c.get("日本") is None and c.get("emoji-🙃") is None


def test_non_str_keys_never_match() -> None:
    c = make(clock=FakeClock())
    c.set("1", 1, 1, 9.0)
    assert c.get(1) is None and 1 not in c and not c.delete(1)  # type: ignore[arg-type]
    assert c.expires_in(1) is None  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        c[b"1"]  # type: ignore[index]
    assert c.stats()["misses"] == 2


def test_storage_grows_and_shrinks_back_on_clear() -> None:
    c = make(max_entries=5000, max_bytes=10**9, clock=FakeClock())
    for i in range(5000):
        c.set(f"key{i}", i, 1, 9.0)
    assert len(c) == 5000 and all(c.get(f"key{i}") == i for i in range(0, 5000, 7))
    for i in range(0, 5000, 2):
        c.delete(f"key{i}")
    assert len(c) == 2500 and all(c.get(f"key{i}") == i for i in range(1, 5000, 2))
    assert c.get("key2") is None
    c.clear()
    c.set("again", 1, 1, 9.0)
    assert c.get("again") == 1 and len(c) == 1


def test_an_uninitialised_or_reinitialised_cache_is_safe() -> None:
    bare = L1Cache.__new__(L1Cache)
    assert bare.get("a") is None and not bare.set("a", 1, 0, 1.0) and len(bare) == 0
    c = make()
    with pytest.raises(RuntimeError):
        c.__init__(10, 10)  # type: ignore[misc]
