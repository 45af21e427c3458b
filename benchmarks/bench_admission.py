"""Hit ratio of the L1 with LRU eviction against W-TinyLFU admission, in one run.

Run:  .venv/bin/python benchmarks/bench_admission.py [--keys 100000] [--requests 1000000]

Each request is a cache-aside read: get, and on a miss set (size 1, no expiry in reach,
so only the entry bound acts). Streams over a key space of --keys keys:
- zipf-0.8, zipf-0.99: independent Zipf draws (popularity 1 / rank^s);
- scan+zipf: Zipf 0.99 with a one-pass scan of never-repeated keys spliced in after every
  12,000 requests (8,000 keys each, about 40 % of all requests);
- loop: the key space in order, over and over (LRU's worst case).
Capacities are 1 % and 10 % of the key space. Ratios are deterministic for a given hash
seed (the sketch hashes Python's salted str hash: expect +-0.1 points between runs).
The aims (TinyLFU's hit ratio minus LRU's, in points) are in AIMS below; a missed aim
makes the script exit 1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import time
from collections.abc import Iterator

# `python benchmarks/bench_admission.py` puts only benchmarks/ on the path: add the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Aim, check_aims
from cachegw_native.l1 import L1Cache

NO_EXPIRY = 1e9
STREAMS = ("zipf-0.8", "zipf-0.99", "scan+zipf", "loop")
CAPACITIES = (0.01, 0.10)  # of the key space
# TinyLFU must win clearly where frequency matters (a skewed stream at a small capacity,
# scans) and must never lose to LRU.
AIMS = [
    Aim(
        f"{stream} at {cap:.0%}",
        "TinyLFU hit % - LRU hit %",
        ">=",
        5.0 if stream == "scan+zipf" or (stream, cap) == ("zipf-0.8", 0.01) else 0.0,
        "points",
    )
    for stream in STREAMS
    for cap in CAPACITIES
]


def zipf(keys: list[str], s: float, n: int, rng: random.Random) -> list[str]:
    cum = list(itertools.accumulate(1 / (rank + 1) ** s for rank in range(len(keys))))
    return rng.choices(keys, cum_weights=cum, k=n)


def scan_mixed(keys: list[str], n: int, rng: random.Random) -> list[str]:
    base = zipf(keys, 0.99, n, rng)
    out: list[str] = []
    scanned = itertools.count()
    for i in range(0, len(base), 12_000):
        out.extend(base[i : i + 12_000])
        out.extend(f"scan:{next(scanned)}" for _ in range(8_000))
    return out


def loop(keys: list[str], n: int) -> list[str]:
    cycle: Iterator[str] = itertools.cycle(keys)
    return [next(cycle) for _ in range(n)]


def hit_ratio(stream: list[str], capacity: int, admission: str) -> float:
    cache = L1Cache(capacity, capacity, admission=admission)
    get, put = cache.get, cache.set
    for key in stream:
        if get(key) is None:
            put(key, key, 1, NO_EXPIRY)
    stats = cache.stats()
    return stats["hits"] / (stats["hits"] + stats["misses"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    args = parser.parse_args()
    rng = random.Random(2024)
    keys = [f"item:{i}" for i in range(args.keys)]
    rng.shuffle(keys)  # popularity rank is unrelated to key order
    streams = {
        "zipf-0.8": zipf(keys, 0.8, args.requests, rng),
        "zipf-0.99": zipf(keys, 0.99, args.requests, rng),
        "scan+zipf": scan_mixed(keys, args.requests, rng),
        "loop": loop(keys, args.requests),
    }
    print(f"hit ratio in %, {args.keys} keys, {args.requests} requests per stream (+ scans)")
    print(f"  {'stream':10} {'capacity':>9} {'LRU':>7} {'TinyLFU':>8} {'points':>7}")
    measured: dict[str, float] = {}
    t0 = time.perf_counter()
    for name in STREAMS:
        stream = streams[name]
        for fraction in CAPACITIES:
            capacity = int(args.keys * fraction)
            lru = 100 * hit_ratio(stream, capacity, "lru")
            tiny = 100 * hit_ratio(stream, capacity, "tinylfu")
            measured[f"{name} at {fraction:.0%}"] = tiny - lru
            print(f"  {name:10} {fraction:>9.0%} {lru:7.2f} {tiny:8.2f} {tiny - lru:+7.2f}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0 if check_aims(AIMS, measured) else 1


if __name__ == "__main__":
    sys.exit(main())
