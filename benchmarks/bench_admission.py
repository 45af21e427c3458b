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
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
from collections.abc import Iterator

from cachegw_native.l1 import L1Cache

NO_EXPIRY = 1e9


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


def main() -> None:
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
    print(f"  {'stream':10} {'capacity':>9} {'LRU':>7} {'TinyLFU':>8} {'points':>7}  target")
    missed = []
    t0 = time.perf_counter()
    for name, stream in streams.items():
        for fraction in (0.01, 0.10):
            capacity = int(args.keys * fraction)
            lru = 100 * hit_ratio(stream, capacity, "lru")
            tiny = 100 * hit_ratio(stream, capacity, "tinylfu")
            need = 5.0 if (name, fraction) in {("zipf-0.8", 0.01)} or name == "scan+zipf" else 0.0
            ok = tiny - lru >= need
            if not ok:
                missed.append(f"{name} at {fraction:.0%}")
            print(
                f"  {name:10} {fraction:>9.0%} {lru:7.2f} {tiny:8.2f} {tiny - lru:+7.2f}"
                f"  {'met' if ok else 'MISSED'} (>= {need:+.0f})"
            )
    print(f"({time.perf_counter() - t0:.1f} s)")
    print("targets: all met" if not missed else f"targets missed: {', '.join(missed)}")


if __name__ == "__main__":
    main()
