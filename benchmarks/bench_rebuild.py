"""Rebuild of a cold cache from the origin: N hot keys in PostgreSQL behind the example
origin (`python -m cachegw.origin.postgres`), Redis flushed (a lost node), then
`Warmup(prefixes=...)` through two gateway processes at the origin's configured rate
(`origin.warm_keys_per_second`, one token bucket in Redis shared by both).

The keys are `cat:00000` .. ; gateway 0 warms the prefixes `cat:0` .. `cat:4`, gateway 1
`cat:5` .. `cat:9`, at once; each keeps calling Warmup with the `resume` of its last
answer until it is done (each call has a 30 s deadline, so a rebuild is many calls, as a
real one would be). Printed: the rebuild time against the floor the rate sets (N / rate),
the keys per second reached, the origin's load (Load calls, keys, the origin process's
CPU, the most keys it served in any 1 s and any 5 s of its log against what the bucket
allows), then the hit rate right after: C callers reading random keys of the N through
both gateways, a read being a hit when it did not have to go to the origin (tier L1 or
L2). The "keys loaded" the gateways' answers count leaves out a call that overran its
deadline (its answer was lost; its work stands).

Run (from the repository root, after `make setup`, which installs PostgreSQL):

    .venv/bin/python benchmarks/bench_rebuild.py            # 100k keys, about 2.5 min
    .venv/bin/python benchmarks/bench_rebuild.py --quick    # 10k keys, about 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asyncpg
import grpc
import redis

from benchmarks.bench_origin import TABLE, start_origin, stop
from benchmarks.harness import (
    Aim,
    check_aims,
    fmt_number,
    process_cpu_seconds,
    render_table,
    sigterm_as_interrupt,
    start_gateways,
)
from cachegw import AsyncClient, CacheError, Tier
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis
from tests.pg import ManagedPostgres

AIMS = [
    Aim("rebuild seconds", "rebuild of the keys at the configured rate", "<=", 300, "s"),
    Aim("peak over rate", "most keys the origin served in 5 s / (5 x rate + burst)", "<=", 1.0),
    Aim("loads per key", "origin loads per key (a timed-out Load is sent again)", "<=", 1.01, ""),
    Aim("hit rate after", "reads answered without the origin, right after", ">=", 0.99, ""),
]


CONFIG = """
[origin]
timeout_seconds = 2.0
warm_keys_per_second = {rate}
warm_batch_keys = {batch}

[[classes]]
name = "catalog"
patterns = ["cat:*"]
ttl_seconds = 3600
origin = "{origin}"
read_policy = "read-through"
"""


@dataclass
class Settings:
    keys: int
    rate: float
    batch: int
    value_bytes: int
    readers: int
    reads: int
    call_seconds: float


_LOAD_LINE = re.compile(r"^(\S+ \S+) INFO cachegw.origin: origin Load: (\d+) keys", re.M)


def origin_load_log(log: Path) -> tuple[int, int, int, int]:
    """(Load calls, keys loaded, most keys in one second, most in 5 consecutive seconds)
    from the origin's log lines (their timestamps: when the origin served them, which on
    a loaded machine bunches calls the bucket spread out; 5 s windows smooth that)."""
    per_second: collections.Counter[int] = collections.Counter()
    calls = keys = 0
    for m in _LOAD_LINE.finditer(log.read_text(errors="replace")):
        calls += 1
        keys += int(m.group(2))
        when = time.strptime(m.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S")
        per_second[int(time.mktime(when))] += int(m.group(2))
    five = max((sum(per_second.get(t + i, 0) for i in range(5)) for t in per_second), default=0)
    return calls, keys, max(per_second.values(), default=0), five


async def fill_table(dsn: str, n: int, value_bytes: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"INSERT INTO {TABLE} (key, value, tags, version) "
            "SELECT 'cat:' || lpad(i::text, 5, '0'), convert_to(repeat('x', $2), 'UTF8'), "
            f"'{{}}', nextval('{TABLE}_versions') FROM generate_series(0, $1 - 1) AS i",
            n,
            value_bytes,
        )
    finally:
        await conn.close()


async def rebuild(
    stub: cache_pb2_grpc.CacheServiceAsyncStub, prefixes: list[str], s: Settings
) -> tuple[int, int, int]:
    """Warmup until done, resuming: (calls, keys loaded from the origin, failed)."""
    resume, calls, loaded, failed = "", 0, 0, 0
    for _ in range(10_000):  # bounded
        calls += 1
        try:
            got = await stub.Warmup(
                pb.WarmupRequest(prefixes=prefixes, resume=resume), timeout=s.call_seconds
            )
        except grpc.aio.AioRpcError as exc:
            print(f"Warmup failed ({exc.code().name}: {exc.details()}); again", file=sys.stderr)
            await asyncio.sleep(0.5)
            continue
        loaded += got.origin_loaded
        failed += got.failed
        if got.done:
            return calls, loaded, failed
        if got.error:
            print(f"Warmup stopped: {got.error}; resuming", file=sys.stderr)
        resume = got.resume
    raise RuntimeError("the rebuild did not finish in 10,000 calls")


async def read_after(gateways: Sequence[str], s: Settings) -> tuple[int, int, int]:
    """(reads, hits: tier L1 or L2, errors) of random keys right after the rebuild."""
    clients = [AsyncClient(addr, timeout=10) for addr in gateways]
    counts = [0, 0, 0]
    per_reader = s.reads // s.readers

    async def reader(i: int) -> None:
        rng = random.Random(i)
        for _ in range(per_reader):
            key = f"cat:{rng.randrange(s.keys):05}"
            try:
                entry = await clients[i % len(clients)].lookup(key)
            except (CacheError, OSError):
                counts[2] += 1
                continue
            counts[0] += 1
            counts[1] += entry.tier in (Tier.L1, Tier.L2)

    try:
        await asyncio.gather(*(reader(i) for i in range(s.readers)))
    finally:
        for client in clients:
            await client.close()
    return counts[0], counts[1], counts[2]


async def main_async(
    s: Settings, gateways: Sequence[str], origin_log: Path, origin_pid: int
) -> tuple[list[list[str]], dict[str, float]]:
    channels = [grpc.aio.insecure_channel(addr) for addr in gateways]
    stubs = [cache_pb2_grpc.CacheServiceStub(c) for c in channels]
    halves = [[f"cat:{d}" for d in range(5)], [f"cat:{d}" for d in range(5, 10)]]
    cpu0, started = process_cpu_seconds(origin_pid), time.monotonic()
    try:
        results = await asyncio.gather(
            *(rebuild(stubs[i % len(stubs)], halves[i], s) for i in range(2))
        )
    finally:
        for c in channels:
            await c.close(None)
    seconds = time.monotonic() - started
    cpu = process_cpu_seconds(origin_pid) - cpu0
    load_calls, load_keys, peak, peak5 = origin_load_log(origin_log)
    reads, hits, errors = await read_after(gateways, s)
    calls = sum(r[0] for r in results)
    loaded = sum(r[1] for r in results)
    failed = sum(r[2] for r in results)
    floor = s.keys / s.rate
    rows = [
        ["keys (hot, in PostgreSQL)", fmt_number(s.keys)],
        ["configured rate (keys/s, all gateways)", fmt_number(s.rate)],
        ["rebuild time (s)", f"{seconds:.1f}"],
        ["  floor at the rate: keys / rate (s)", f"{floor:.1f}"],
        ["keys/s reached", fmt_number(s.keys / seconds)],
        ["Warmup calls (30 s deadline each, resumed)", fmt_number(calls)],
        ["keys loaded (gateways' count) / failed", f"{fmt_number(loaded)} / {failed}"],
        ["origin: Load calls / keys", f"{fmt_number(load_calls)} / {fmt_number(load_keys)}"],
        ["origin: most keys served in 1 s / in 5 s", f"{fmt_number(peak)} / {fmt_number(peak5)}"],
        [
            "  allowed: rate + burst / 5 x rate + burst",
            f"{fmt_number(s.rate + s.batch)} / {fmt_number(5 * s.rate + s.batch)}",
        ],
        ["origin: CPU seconds (share of one core)", f"{cpu:.1f} ({cpu / seconds:.0%})"],
        ["reads right after / hit rate", f"{fmt_number(reads)} / {hits / max(reads, 1):.4f}"],
        ["  read errors", fmt_number(errors)],
    ]
    measured = {
        "rebuild seconds": seconds,
        "peak over rate": peak5 / (5 * s.rate + s.batch),
        "loads per key": load_keys / s.keys,
        "hit rate after": hits / reads if reads else float("nan"),
    }
    return rows, measured


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=1000.0, help="origin.warm_keys_per_second")
    p.add_argument("--batch", type=int, default=500, help="origin.warm_batch_keys")
    p.add_argument("--value-bytes", type=int, default=200)
    p.add_argument("--readers", type=int, default=64)
    p.add_argument("--reads", type=int, default=20_000)
    p.add_argument("--call-seconds", type=float, default=30.0, help="each Warmup's deadline")
    p.add_argument("--quick", action="store_true", help="10k keys, 5k reads")
    a = p.parse_args(argv)
    if a.quick:
        a.keys, a.reads = 10_000, 5_000
    if a.keys > 100_000:
        p.error("--keys: at most 100000 (five-digit keys)")
    return Settings(a.keys, a.rate, a.batch, a.value_bytes, a.readers, a.reads, a.call_seconds)


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cachegw-rebuild-"))
    try:
        with sigterm_as_interrupt(), ExitStack() as stack:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            store = stack.enter_context(ManagedRedis())
            pg = stack.enter_context(ManagedPostgres())
            proc, origin, origin_log = start_origin(pg.dsn, work)
            stack.callback(stop, proc)
            asyncio.run(fill_table(pg.dsn, s.keys, s.value_bytes))
            config = CONFIG.format(rate=s.rate, batch=s.batch, origin=origin)
            gateways = start_gateways(stack, 2, store.url, config, work)
            with redis.Redis.from_url(store.url) as r:
                r.flushall()  # the lost node: nothing cached, no hot-key record
            rows, measured = asyncio.run(
                main_async(s, [g.address for g in gateways], origin_log, proc.pid)
            )
            for gw in gateways:
                if not gw.running:
                    raise RuntimeError(f"{gw.name} died during the run")
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    print(
        f"rebuild benchmark: {s.keys:,} keys of {s.value_bytes} B in PostgreSQL "
        f"(cachegw.origin.postgres), Redis flushed, Warmup by prefix through 2 gateways at "
        f"origin.warm_keys_per_second = {s.rate:g}, batches of {s.batch}"
    )
    print(render_table(["figure", "value"], rows, right="lr"))
    return 0 if check_aims(AIMS, measured) else 1


if __name__ == "__main__":
    sys.exit(main())
