"""L1 memory against its byte bound: the process's RSS growth when the gateway fills an
L1 of `--max-bytes`, per value size, against that bound.

Run:  .venv/bin/python benchmarks/bench_l1_memory.py [--max-bytes 67108864] [--quick]
                                                     [--sizes 10,100,1000,10000] [--tags 0,2]

Each case (value size x tags per entry) runs in a fresh child process, so that memory one
case freed cannot make room for the next. The child builds the gateway's L1 as server.py
does (`l1tier.new_l1` for an `[l1]` with `max_bytes`, LRU, `max_entries` high enough never
to bind) behind an L1Tier, and fills it through `L1Tier.fill`, the path every Redis read
and write takes into L1, so each entry is charged exactly as the gateway charges it: the
encoded HIT answer built from an envelope, its key, its class group and its tags' groups.
Keys come in a scattered order (`item:<8 hex digits>`, a bijection of a counter), values
are `size` bytes; with tags, each entry has a tag of its own and one shared by 100
entries (`sku-<n>`, `page-<n // 100>`). The fill goes on until the L1 has evicted half as
many entries as it holds (a full cache, churning, as in service), then the child collects
garbage and reads its resident set size (/proc/self/statm) again.

Printed per case: entries held, charged bytes per entry (L1 `nbytes` / entries), RSS
growth per entry, the L1's fill (`nbytes` / `max_bytes`) and RSS growth / `max_bytes`,
the aim's figure. The aim (AIMS below): RSS growth <= 1.1x max_bytes for every case; a
missed aim makes the script exit 1. Then a breakdown of one entry's memory in process,
for the smallest value size with the most tags: the Python objects an entry holds
(allocated sizes: CPython's object size rounded up to pymalloc's 16-byte classes, or
malloc's chunk above 512 bytes), the native structures of the L1 (what they allocated,
`L1Cache._footprint()`, per entry) and the group names they keep, against what the
entry is charged.

`--quick` is the CI size: an 8 MiB bound (about 10 s). The figures before the L1 charged
its own memory were measured with this script's first version (commit 78d9ebc), which
built the L1 as server.py then did (`L1Cache(max_entries, max_bytes)`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, cast

# `python benchmarks/bench_l1_memory.py` puts only benchmarks/ on the path: add the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import Aim, check_aims, render_table
from cachegw_gateway.config import L1Config
from cachegw_gateway.envelope import Envelope
from cachegw_gateway.l1tier import L1Tier, L1Value, new_l1
from cachegw_gateway.policy import KeyClass
from cachegw_gateway.stats import GatewayStats
from cachegw_native.l1 import L1Cache, allocated

MIB = 1024 * 1024
SIZES = (10, 100, 1_000, 10_000)
TAGS = (0, 2)
BOUND = 1.1  # RSS growth / max_bytes, at most
FRESH_MS = 3_600_000  # far beyond the fill: nothing expires


def case_name(size: int, tags: int, then: int = 0) -> str:
    if then:
        return f"{size:,} B then {then:,} B, {tags} tags"
    return f"{size:,} B, {tags} tags"


def rss_bytes() -> int:
    """Resident set size now (not the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is the best there is, and only grows here
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim_heap() -> None:
    """Give free heap pages back to the system (glibc's malloc_trim), so that the RSS
    measured before a fill holds no free memory the fill could reuse unseen."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: growth may read low
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def key_of(i: int) -> str:
    return f"item:{(i * 2654435761) & 0xFFFFFFFF:08x}"  # an odd multiplier: no repeats


def tags_of(i: int, tags: int) -> tuple[str, ...]:
    return (f"sku-{i}", f"page-{i // 100}")[:tags]


def new_tier(max_bytes: int) -> tuple[L1Cache, L1Tier]:
    # max_entries far above what the byte bound lets in (no entry is charged < 16 bytes).
    l1 = new_l1(L1Config(max_entries=max(1, min(max_bytes // 16, 1 << 30)), max_bytes=max_bytes))
    tier = L1Tier(l1, GatewayStats(), clock=time.monotonic)
    tier.resume_fills()  # as when the invalidation subscription is live
    return l1, tier


KC = KeyClass(
    name="catalog", ttl_ms=FRESH_MS, jitter=0.0, l1=True, l1_ttl_ms=FRESH_MS, max_value_bytes=MIB
)


def fill(tier: L1Tier, value: bytes, tags: int, start: int, count: int) -> None:
    now = time.monotonic()
    for i in range(start, start + count):
        env = Envelope(
            version=i + 1,
            created_ms=1_700_000_000_000,
            cost_ms=0,
            soft_expiry_ms=0,
            generation=0,
            tags=tags_of(i, tags),
            value=value,
        )
        tier.fill(key_of(i), KC, env, FRESH_MS, now)


def child(max_bytes: int, size: int, tags: int, then: int) -> dict[str, Any]:
    """One case, in this (fresh) process. With `then`, the full L1 is then filled with
    values of that size until every entry of the first size has left (a shift in the
    workload: the storage sized for many small entries must not stay behind)."""
    value = b"v" * size
    # Warm up every code path (imports, protobuf, caches) on a throwaway L1.
    _, warm = new_tier(max_bytes)
    fill(warm, value, tags, 1 << 31, 100)
    del warm, _
    gc.collect()
    l1, tier = new_tier(max_bytes)
    gc.collect()
    trim_heap()
    before = rss_bytes()
    t0 = time.perf_counter()
    done, step = 0, 1000
    while True:
        fill(tier, value, tags, done, step)
        done += step
        if l1.stats()["evictions"] >= max(len(l1) // 2, 1):
            break
    first: dict[str, int] = {}
    if then:
        gc.collect()
        first = {
            "entries": len(l1),
            "rss_growth": rss_bytes() - before,
            "structures": sum(l1._footprint().values()),
        }
        # LRU: the small entries leave first; then as much churn again as above.
        value, step = b"v" * then, 100
        gone = l1.stats()["evictions"] + len(l1)
        while l1.stats()["evictions"] < gone + len(l1) // 2:
            fill(tier, value, tags, done, step)
            done += step
    seconds = time.perf_counter() - t0
    gc.collect()
    grown = rss_bytes() - before
    return {
        "fills": done,
        "seconds": seconds,
        "entries": len(l1),
        "nbytes": l1.nbytes,
        "rss_growth": grown,
        "structures": sum(l1._footprint().values()),
        "first": first,
    }


# -- the breakdown of one entry ---------------------------------------------------------


def breakdown(size: int, tags: int, n: int = 50_000) -> list[tuple[str, float]]:
    """Bytes per entry of each part, for `n` entries of `size`-byte values."""
    value = b"v" * size
    l1, tier = new_tier(1 << 40)
    fill(tier, value, tags, 0, n)
    entries = l1.items()
    count = len(entries)
    parts: dict[str, float] = {}

    def add(name: str, nbytes: float) -> None:
        parts[name] = parts.get(name, 0.0) + nbytes / count

    for key, v in entries:
        body, fresh_until, _counters, framing = cast(L1Value, v)
        add("key (str)", allocated(sys.getsizeof(key)))
        add("entry tuple", allocated(sys.getsizeof(v)))
        add("answer (bytes)", allocated(sys.getsizeof(body)))
        add("deadline (float)", allocated(sys.getsizeof(fresh_until)))
        add("GetMany framing (bytes)", allocated(sys.getsizeof(framing)))
    for structure, nbytes in l1._footprint().items():
        add(f"L1 {structure.replace('_', ' ')}", nbytes)
    names = {"c:catalog", *(f"t:{t}" for i in range(n) for t in tags_of(i, tags))}
    add("group names (str)", sum(allocated(sys.getsizeof(name)) for name in names))
    parts["all of the above"] = sum(parts.values())
    parts["charged (nbytes / entries)"] = l1.nbytes / count
    return list(parts.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=64 * MIB)
    parser.add_argument("--quick", action="store_true", help="an 8 MiB bound")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--tags", default=",".join(map(str, TAGS)))
    parser.add_argument(
        "--no-shift", action="store_true", help="leave out the smallest-then-largest case"
    )
    parser.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    max_bytes = 8 * MIB if args.quick else args.max_bytes
    sizes = [int(s) for s in args.sizes.split(",")]
    tag_counts = [int(t) for t in args.tags.split(",")]
    cases = [(s, t, 0) for t in tag_counts for s in sizes]
    aims = [Aim(case_name(*case), "RSS growth / max_bytes", "<=", BOUND) for case in cases]
    if not args.no_shift and len(sizes) > 1:
        cases.append((min(sizes), min(tag_counts), max(sizes)))
    print(
        f"L1 of max_bytes {max_bytes:,} ({max_bytes / MIB:g} MiB) filled through "
        "L1Tier.fill until it evicted half as many entries as it holds; one process per case"
    )
    rows: list[list[str]] = []
    measured: dict[str, float] = {}
    shift: tuple[int, int, dict[str, Any]] | None = None
    for size, tags, then in cases:
        here = os.path.abspath(__file__)
        argv = [sys.executable, here, "--child", *map(str, (max_bytes, size, tags, then))]
        r = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
        ratio = r["rss_growth"] / max_bytes
        if then:
            shift = (size, then, r)
        else:
            measured[case_name(size, tags)] = ratio
        rows.append(
            [
                f"{size:,} then {then:,}" if then else f"{size:,}",
                str(tags),
                f"{r['entries']:,}",
                f"{r['nbytes'] / r['entries']:.0f}",
                f"{r['rss_growth'] / r['entries']:.0f}",
                f"{r['rss_growth'] / r['nbytes']:.2f}x",
                f"{r['nbytes'] / max_bytes:.3f}",
                f"{ratio:.3f}x",
                f"{r['seconds'] / r['fills'] * 1e6:.1f}",
            ]
        )
    print(
        render_table(
            [
                "value B",
                "tags",
                "entries",
                "charged B/entry",
                "RSS B/entry",
                "RSS / charged",
                "L1 fill",
                "RSS growth / max_bytes",
                "µs per fill",
            ],
            rows,
            right="rrrrrrrrr",
        )
    )
    if shift is not None:
        small, large, r = shift
        f = r["first"]
        print(
            f"\nshift (last row, no aim): full of {small:,} B values, RSS growth "
            f"{f['rss_growth'] / max_bytes:.3f}x max_bytes ({f['entries']:,} entries, L1 "
            f"structures {f['structures'] / MIB:.2f} MiB); then filled with {large:,} B values "
            f"until every small one left: {r['rss_growth'] / max_bytes:.3f}x ({r['entries']:,} "
            f"entries, L1 structures {r['structures'] / MIB:.2f} MiB, compacted). The rest of "
            "the growth is CPython's small-object arenas: the small entries' objects are freed, "
            "but an arena is returned only once all of it is free, and the new entries' own "
            "small objects land in those arenas (free for later small objects, still resident)."
        )
    size, tags = min(sizes), max(tag_counts)
    print(f"\none entry of {size} B with {tags} tags, bytes (50,000 entries, in process)")
    for name, b in breakdown(size, tags):
        print(f"  {name:30} {b:8.1f}")
    return 0 if check_aims(aims, measured) else 1


if __name__ == "__main__":
    sys.exit(main())
