"""L1 throughput against the LRU caches a Python service can reach, in one run.

Run:  .venv/bin/python benchmarks/bench_l1.py [--rounds 9] [--keys 100000] [--ops 100000]

Two workloads on the same key stream for every contender:
- get-hit: every key is cached; lookups (`c[k]`, or the contender's own read call) on
  three streams: Zipf 0.99 over --keys keys (the gateway's shape), uniform over 1,000 keys
  (everything in CPU cache: pure instruction cost) and uniform over --keys keys (memory
  latency dominates). The plain dict is the floor.
- set-with-eviction: the cache is full and every set brings a new key, so each one evicts.

Rounds are interleaved (every contender once per round, order rotated) because the 2-core
machine is noisy; the figure is the best round in ns per operation, with the median beside
it. Ratios are to the plain dict and to lru-dict. The aims (ratios of best rounds) are in
AIMS below; a missed aim makes the script exit 1.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import random
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable

# `python benchmarks/bench_l1.py` puts only benchmarks/ on the path: add the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cachetools import LRUCache
from lru import LRU

from benchmarks.harness import Aim, check_aims
from cachegw_native.l1 import L1Cache

# The key streams of the get-hit workload (see main()).
STREAMS = ("zipf-0.99", "uniform-1k", "uniform-all")
# Ratios of best rounds, ns per operation.
AIMS = [
    *(Aim(f"get-hit / dict, {st}", "L1Cache c[k] / dict[k]", "<=", 1.5) for st in STREAMS),
    *(Aim(f"get-hit / lru-dict, {st}", "L1Cache c[k] / lru-dict", "<=", 1.0) for st in STREAMS),
    *(Aim(f"cachetools / get-hit, {st}", "cachetools / L1Cache c[k]", ">=", 3.0) for st in STREAMS),
    Aim("set-with-eviction / lru-dict", "L1Cache set / lru-dict set", "<=", 1.0),
]

TTL = 3600.0
Bench = Callable[[], float]  # runs once, returns elapsed seconds


def get_benches(keys: list[str], stream: list[str]) -> dict[str, Bench]:
    n = len(keys)
    plain = dict.fromkeys(keys, b"v")
    lru_dict: LRU[str, bytes] = LRU(n)
    tools: LRUCache[str, bytes] = LRUCache(n)
    ordered: OrderedDict[str, bytes] = OrderedDict()
    l1 = L1Cache(n, n * 100)
    l1_tiny = L1Cache(n, n * 100, admission="tinylfu")

    @functools.lru_cache(maxsize=n)
    def cached(key: str) -> bytes:
        return b"v"

    for k in keys:
        lru_dict[k] = tools[k] = ordered[k] = b"v"
        l1.set(k, b"v", 1, TTL)
        l1_tiny.set(k, b"v", 1, TTL)
        cached(k)

    def run_dict() -> float:
        t = time.perf_counter()
        for k in stream:
            plain[k]
        return time.perf_counter() - t

    def run_lru_cache() -> float:
        t = time.perf_counter()
        for k in stream:
            cached(k)
        return time.perf_counter() - t

    def run_cachetools() -> float:
        t = time.perf_counter()
        for k in stream:
            tools[k]
        return time.perf_counter() - t

    def run_lru_dict() -> float:
        t = time.perf_counter()
        for k in stream:
            lru_dict[k]
        return time.perf_counter() - t

    def run_ordered() -> float:
        touch = ordered.move_to_end
        t = time.perf_counter()
        for k in stream:
            ordered[k]
            touch(k)
        return time.perf_counter() - t

    def run_l1() -> float:
        t = time.perf_counter()
        for k in stream:
            l1[k]
        return time.perf_counter() - t

    def run_l1_get() -> float:
        get = l1.get
        t = time.perf_counter()
        for k in stream:
            get(k)
        return time.perf_counter() - t

    def run_l1_tiny() -> float:
        t = time.perf_counter()
        for k in stream:
            l1_tiny[k]
        return time.perf_counter() - t

    return {
        "dict (floor)": run_dict,
        "functools.lru_cache": run_lru_cache,
        "cachetools.LRUCache": run_cachetools,
        "lru-dict LRU": run_lru_dict,
        "OrderedDict LRU": run_ordered,
        "L1Cache c[k]": run_l1,
        "L1Cache c.get(k)": run_l1_get,
        "L1Cache tinylfu c[k]": run_l1_tiny,
    }


def set_benches(capacity: int, old: list[str], new: list[str]) -> dict[str, Bench]:
    """Each bench builds a full cache (untimed), then times setting the new keys."""

    def timed(fill: Callable[[str], object], put: Callable[[str], object]) -> float:
        for k in old:
            fill(k)
        t = time.perf_counter()
        for k in new:
            put(k)
        return time.perf_counter() - t

    def run_dict() -> float:
        d: dict[str, bytes] = {}
        return timed(lambda k: d.__setitem__(k, b"v"), lambda k: d.__setitem__(k, b"v"))

    def run_lru_cache() -> float:
        cached = functools.lru_cache(maxsize=capacity)(lambda key: b"v")
        return timed(cached, cached)

    def run_cachetools() -> float:
        c: LRUCache[str, bytes] = LRUCache(capacity)
        return timed(lambda k: c.__setitem__(k, b"v"), lambda k: c.__setitem__(k, b"v"))

    def run_lru_dict() -> float:
        c: LRU[str, bytes] = LRU(capacity)
        put = c.__setitem__
        return timed(lambda k: put(k, b"v"), lambda k: put(k, b"v"))

    def run_ordered() -> float:
        od: OrderedDict[str, bytes] = OrderedDict()

        def put(k: str) -> None:
            od[k] = b"v"
            if len(od) > capacity:
                od.popitem(last=False)

        return timed(put, put)

    def run_l1(admission: str) -> Callable[[], float]:
        def run() -> float:
            c = L1Cache(capacity, capacity * 100, admission=admission)
            put = c.set
            return timed(lambda k: put(k, b"v", 1, TTL), lambda k: put(k, b"v", 1, TTL))

        return run

    return {
        "dict (floor)": run_dict,
        "functools.lru_cache": run_lru_cache,
        "cachetools.LRUCache": run_cachetools,
        "lru-dict LRU": run_lru_dict,
        "OrderedDict LRU": run_ordered,
        "L1Cache set": run_l1("lru"),
        "L1Cache tinylfu set": run_l1("tinylfu"),
    }


def measure(benches: dict[str, Bench], rounds: int, ops: int) -> dict[str, list[float]]:
    """ns/op per bench per round; the order rotates each round."""
    names = list(benches)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(benches[name]() / ops * 1e9)
    return out


def report(title: str, figures: dict[str, list[float]]) -> dict[str, float]:
    best = {name: min(v) for name, v in figures.items()}
    floor, lru_dict = best["dict (floor)"], best["lru-dict LRU"]
    print(f"\n{title}  (ns/op: best of {len(next(iter(figures.values())))} rounds, median)")
    print(f"  {'':24} {'best':>8} {'median':>8} {'x dict':>8} {'x lru-dict':>11}")
    for name, values in figures.items():
        b = best[name]
        med = statistics.median(values)
        print(f"  {name:24} {b:8.1f} {med:8.1f} {b / floor:8.2f} {b / lru_dict:11.2f}")
    return best


def zipf_stream(keys: list[str], s: float, n: int, rng: random.Random) -> list[str]:
    cum = list(itertools.accumulate(1 / (rank + 1) ** s for rank in range(len(keys))))
    return rng.choices(keys, cum_weights=cum, k=n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--ops", type=int, default=100_000, help="operations per timing")
    args = parser.parse_args()
    rng = random.Random(42)
    keys = [f"product:{i:08d}" for i in range(args.keys)]
    small = keys[:1000]
    streams = {
        "zipf-0.99": (keys, zipf_stream(keys, 0.99, args.ops, rng)),
        "uniform-1k": (small, rng.choices(small, k=args.ops)),
        "uniform-all": (keys, rng.choices(keys, k=args.ops)),
    }
    titles = {
        "zipf-0.99": f"Zipf 0.99 over {args.keys} keys",
        "uniform-1k": "uniform over 1k keys (CPU-cache resident)",
        "uniform-all": f"uniform over {args.keys} keys (memory bound)",
    }
    measured: dict[str, float] = {}
    for name, (universe, stream) in streams.items():
        get = report(
            f"get-hit, {titles[name]}",
            measure(get_benches(universe, stream), args.rounds, len(stream)),
        )
        l1, floor = get["L1Cache c[k]"], get["dict (floor)"]
        measured[f"get-hit / dict, {name}"] = l1 / floor
        measured[f"get-hit / lru-dict, {name}"] = l1 / get["lru-dict LRU"]
        measured[f"cachetools / get-hit, {name}"] = get["cachetools.LRUCache"] / l1
    capacity = args.keys // 2
    new = [f"new:{i:08d}" for i in range(args.ops)]
    sets = report(
        f"set-with-eviction, capacity {capacity}",
        measure(set_benches(capacity, keys[:capacity], new), args.rounds, len(new)),
    )
    measured["set-with-eviction / lru-dict"] = sets["L1Cache set"] / sets["lru-dict LRU"]
    return 0 if check_aims(AIMS, measured) else 1


if __name__ == "__main__":
    sys.exit(main())
