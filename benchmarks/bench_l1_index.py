"""The L1's key order and group index: what they cost on set and get, what they save on
broad invalidations, and how much memory they take.

Run:  .venv/bin/python benchmarks/bench_l1_index.py [--rounds 7] [--entries 100000]
                                                    [--before DIR]

`--before DIR` measures, in the same run and interleaved, an L1 built before the indexes:
DIR holds its compiled l1 extension (l1.cpython-*.so, e.g. copied aside from a build of
commit 92a50ff), loaded under its own name next to the current one.

Sections (every figure is the best round, the median beside it; rounds are interleaved
with the order rotated, and timed with time.thread_time(), the CPU time of this thread,
because the 2-core machine is shared and noisy: time spent descheduled is not counted;
timings are reported, never asserted):
- get-hit: `c[k]` on a Zipf 0.99 stream over --entries cached keys, against a dict (the
  floor): entries stored without groups, and with three groups each.
- set: set-with-eviction (the cache is full, each set brings a new key and evicts one,
  with three groups when stated) against a dict inserting a key and deleting the oldest;
  a refresh (set of a cached key with the same groups) against a dict overwriting.
- invalidation on an L1 of --entries entries (class + two tags per entry, the gateway's
  shape): one tag, class or prefix of m members removed by the old way (items() + filter
  + delete per key, as gateway/cache.py did; the old O(n) delete_prefix scan with
  --before) against delete_group / delete_prefix, in µs per call. The removed entries are
  put back, untimed, between rounds.
- memory: bytes the L1 allocates per entry (tracemalloc; keys, values and group-name
  strings excluded, they are the caller's).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from cachegw_native.l1 import L1Cache

TTL = 3600.0
SIZE = 100
CLASSES = (("catalog", 0.89), ("user", 0.10), ("cart", 0.01))
Bench = Callable[[], float]  # runs once, returns elapsed seconds


def load_before(folder: Path) -> Any:
    """The L1Cache class of an older build of the extension in `folder`."""
    so = next(folder.glob("l1.cpython-*.so"), None)
    if so is None:
        raise SystemExit(f"no l1.cpython-*.so in {folder}")
    spec = importlib.util.spec_from_file_location("l1", so)  # PyInit_l1
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.L1Cache


class Data:
    """N entries shaped like the gateway's: key `<class>:<n>`, groups (class, item tag,
    page tag of 100 items), value (body, deadline, class marker, tags)."""

    def __init__(self, n: int) -> None:
        self.keys: list[str] = []
        self.groups: list[tuple[str, ...]] = []
        self.values: list[tuple[bytes, float, object, tuple[str, ...]]] = []
        markers = {name: object() for name, _ in CLASSES}
        self.marker = markers
        start = 0
        for name, share in CLASSES:
            count = round(n * share)
            for i in range(count):
                key = f"{name}:{i:06}"
                tags = (f"t:{name}-{i}", f"t:{name}-page-{i // 100}")
                self.keys.append(key)
                self.groups.append((f"c:{name}", *tags))
                self.values.append((b"v" * 16, 0.0, markers[name], tags))
            start += count
        self.n = len(self.keys)

    def fill(self, cache: Any, grouped: bool) -> None:
        for k, v, g in zip(self.keys, self.values, self.groups, strict=True):
            if grouped:
                cache.set(k, v, SIZE, TTL, g)
            else:
                cache.set(k, v, SIZE, TTL)


def rounds_of(benches: dict[str, Bench], rounds: int, per: int) -> dict[str, list[float]]:
    """ns per operation (elapsed / per) per bench per round; the order rotates."""
    names = list(benches)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            out[name].append(benches[name]() / per * 1e9)
    return out


def report(title: str, figures: dict[str, list[float]], unit: str = "ns/op") -> None:
    best = {name: min(v) for name, v in figures.items()}
    ref = next(iter(best.values()))
    print(f"\n{title}  ({unit}: best, median; x = against the first line)")
    for name, values in figures.items():
        b = best[name]
        print(f"  {name:46} {b:10.1f} {statistics.median(values):10.1f} {b / ref:8.2f}x")


# -- get and set ----------------------------------------------------------------------


def zipf(keys: list[str], n: int, rng: random.Random) -> list[str]:
    cum = list(itertools.accumulate(1 / (rank + 1) ** 0.99 for rank in range(len(keys))))
    order = keys[:]
    rng.shuffle(order)
    return rng.choices(order, cum_weights=cum, k=n)


def get_benches(data: Data, before: Any, stream: list[str]) -> dict[str, Bench]:
    plain = dict(zip(data.keys, data.values, strict=True))
    caches: dict[str, Any] = {}
    if before is not None:
        caches["L1 before the indexes"] = before(data.n, data.n * SIZE)
        data.fill(caches["L1 before the indexes"], grouped=False)
    caches["L1 now, no groups"] = L1Cache(data.n, data.n * SIZE)
    data.fill(caches["L1 now, no groups"], grouped=False)
    caches["L1 now, 3 groups per entry"] = L1Cache(data.n, data.n * SIZE)
    data.fill(caches["L1 now, 3 groups per entry"], grouped=True)

    def run_dict() -> float:
        t = time.thread_time()
        for k in stream:
            plain[k]
        return time.thread_time() - t

    def runner(c: Any) -> Bench:
        def run() -> float:
            t = time.thread_time()
            for k in stream:
                c[k]
            return time.thread_time() - t

        return run

    return {"dict (floor)": run_dict, **{name: runner(c) for name, c in caches.items()}}


def set_benches(data: Data, before: Any) -> tuple[dict[str, Bench], dict[str, Bench]]:
    """Each bench fills a full cache (untimed), then times setting n new keys (each one
    evicts the oldest), or re-setting every cached key with its own groups (refresh). The
    references: a dict that inserts each new key and deletes the oldest one, and a dict
    overwriting its keys."""
    n = data.n
    new_keys = [f"new:{i:06}" for i in range(n)]
    new_groups = [("c:new", f"t:new-{i}", f"t:new-page-{i // 100}") for i in range(n)]
    value = data.values[0]

    def run_dict() -> float:
        d = dict(zip(data.keys, data.values, strict=True))
        t = time.thread_time()
        for k, old in zip(new_keys, data.keys, strict=True):
            d[k] = value
            del d[old]
        return time.thread_time() - t

    def run_dict_refresh() -> float:
        d = dict(zip(data.keys, data.values, strict=True))
        t = time.thread_time()
        for k, v in zip(data.keys, data.values, strict=True):
            d[k] = v
        return time.thread_time() - t

    def evicting(cls: Any, grouped: bool) -> Bench:
        def run() -> float:
            c = cls(n, n * SIZE)
            data.fill(c, grouped)
            put = c.set
            t = time.thread_time()
            if grouped:
                for k, g in zip(new_keys, new_groups, strict=True):
                    put(k, value, SIZE, TTL, g)
            else:
                for k in new_keys:
                    put(k, value, SIZE, TTL)
            return time.thread_time() - t

        return run

    def refreshing(cls: Any, grouped: bool) -> Bench:
        def run() -> float:
            c = cls(n, n * SIZE)
            data.fill(c, grouped)
            put = c.set
            t = time.thread_time()
            if grouped:
                for k, v, g in zip(data.keys, data.values, data.groups, strict=True):
                    put(k, v, SIZE, TTL, g)
            else:
                for k, v in zip(data.keys, data.values, strict=True):
                    put(k, v, SIZE, TTL)
            return time.thread_time() - t

        return run

    evict: dict[str, Bench] = {"dict insert + delete (reference)": run_dict}
    refresh: dict[str, Bench] = {"dict overwrite (reference)": run_dict_refresh}
    if before is not None:
        evict["L1 before the indexes"] = evicting(before, False)
        refresh["L1 before the indexes"] = refreshing(before, False)
    evict["L1 now, no groups"] = evicting(L1Cache, False)
    evict["L1 now, 3 groups per entry"] = evicting(L1Cache, True)
    refresh["L1 now, no groups"] = refreshing(L1Cache, False)
    refresh["L1 now, the same 3 groups"] = refreshing(L1Cache, True)
    return evict, refresh


# -- invalidation ---------------------------------------------------------------------


def scan_tags(c: Any, tags: frozenset[str]) -> int:
    """The gateway's tag invalidation before the index: one pass over items()."""
    doomed = [k for k, v in c.items() if not tags.isdisjoint(v[3])]
    for k in doomed:
        c.delete(k)
    return len(doomed)


def scan_class(c: Any, marker: object) -> int:
    doomed = [k for k, v in c.items() if v[2] is marker]
    for k in doomed:
        c.delete(k)
    return len(doomed)


def scan_prefix(c: Any, prefix: str) -> int:
    doomed = [k for k, _ in c.items() if k.startswith(prefix)]
    for k in doomed:
        c.delete(k)
    return len(doomed)


def invalidation(data: Data, before: Any, rounds: int) -> None:
    now = L1Cache(data.n, data.n * SIZE)
    data.fill(now, grouped=True)
    old = None
    if before is not None:
        old = before(data.n, data.n * SIZE)
        data.fill(old, grouped=False)
    index = {k: i for i, k in enumerate(data.keys)}

    def restore(c: Any, removed: list[str], grouped: bool) -> None:
        for k in removed:
            i = index[k]
            if grouped:
                c.set(k, data.values[i], SIZE, TTL, data.groups[i])
            else:
                c.set(k, data.values[i], SIZE, TTL)

    cases: list[tuple[str, list[str], dict[str, Callable[[], int]]]] = []
    for title, tag in (("tag of 1", "t:catalog-123"), ("tag of 100", "t:catalog-page-7")):
        members = [k for k, g in zip(data.keys, data.groups, strict=True) if tag in g]
        ways: dict[str, Callable[[], int]] = {
            "items() + filter (before)": partial(scan_tags, now, frozenset([tag])),
            "delete_group": partial(now.delete_group, tag),
        }
        cases.append((title, members, ways))
    for name in ("cart", "user"):
        members = [k for k in data.keys if k.startswith(name + ":")]
        ways = {
            "items() + filter (before)": partial(scan_class, now, data.marker[name]),
            "delete_group": partial(now.delete_group, f"c:{name}"),
        }
        cases.append((f"class of {len(members)}", members, ways))
    for prefix in ("catalog:000123", "catalog:0001", "user:"):
        members = [k for k in data.keys if k.startswith(prefix)]
        ways = {}
        if old is not None:
            ways["delete_prefix before (O(n) scan)"] = partial(old.delete_prefix, prefix)
        ways["items() + startswith"] = partial(scan_prefix, now, prefix)
        ways["delete_prefix now"] = partial(now.delete_prefix, prefix)
        cases.append((f"prefix of {len(members)}", members, ways))

    print(f"\ninvalidation with {data.n} entries  (µs per call: best, median; x = vs first)")
    for title, members, ways in cases:
        m = len(members)
        figures: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        for r in range(rounds):
            # No gc.collect() here: right before a call of a few µs it would time the
            # page faults of the arenas it released, not the call.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t = time.thread_time()
                got = ways[name]()
                figures[name].append((time.thread_time() - t) * 1e6)
                assert got == m, (title, name, got, m)
                target = old if name.startswith("delete_prefix before") else now
                restore(target, members, grouped=target is now)
        base = min(next(iter(figures.values())))
        print(f"  {title} ({m} removed)")
        for name, values in figures.items():
            b = min(values)
            print(f"    {name:40} {b:10.1f} {statistics.median(values):10.1f} {b / base:8.3f}x")


# -- memory ---------------------------------------------------------------------------


def memory(data: Data, before: Any) -> None:
    print(f"\nmemory allocated by the L1 for {data.n} entries (tracemalloc)")
    contenders: list[tuple[str, Any, bool]] = []
    if before is not None:
        contenders.append(("L1 before the indexes", before, False))
    contenders += [("L1 now, no groups", L1Cache, False), ("L1 now, 3 groups", L1Cache, True)]
    first = None
    for name, cls, grouped in contenders:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        c = cls(data.n, data.n * SIZE)
        data.fill(c, grouped)
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        del c
        first = used if first is None else first
        print(f"  {name:46} {used / data.n:8.1f} B/entry  (+{(used - first) / data.n:.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--before", type=Path, help="folder with an older l1 extension")
    args = parser.parse_args()
    before = load_before(args.before) if args.before else None
    rng = random.Random(1)
    data = Data(args.entries)
    stream = zipf(data.keys, 200_000, rng)
    report(
        f"get-hit, Zipf 0.99 over {data.n} keys",
        rounds_of(get_benches(data, before, stream), args.rounds, len(stream)),
    )
    evict, refresh = set_benches(data, before)
    report(f"set with eviction, cache of {data.n}", rounds_of(evict, args.rounds, data.n))
    report(f"refresh (set of a cached key), {data.n}", rounds_of(refresh, args.rounds, data.n))
    invalidation(data, before, args.rounds)
    memory(data, before)


if __name__ == "__main__":
    main()
