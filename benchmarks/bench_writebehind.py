"""Write-behind vs write-through: Set throughput and origin Store calls, against the
example origin over a real PostgreSQL table (`python -m cachegw.origin.postgres`).

C callers over the gateways Set values of K hot keys (uniformly drawn), as fast as they
are answered, in interleaved rounds of two cases:

  (wt) write-through: each Set is one Store call to the origin, then the cache;
  (wb) write-behind: each Set is a journal append and a cache write; the flushers send
       the journal in batches, one Store entry per key per batch (collapsing).

Printed per case: Sets acknowledged per second, p50 / p99 of one Set, origin Store
calls and entries (counted by the origin, from its log; for (wb) until the journal is
drained after the case), entries per Set (collapsing: below 1 when keys are written
again before a flush), the time the journal took to drain after the last Set, and the
ratios (wb) / (wt). A missed aim (AIMS) makes the script exit 1.

Run (from the repository root, after `make setup`, which installs PostgreSQL):

    .venv/bin/python benchmarks/bench_writebehind.py            # about 40 s
    .venv/bin/python benchmarks/bench_writebehind.py --quick    # about 15 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis.asyncio as aioredis

from benchmarks.bench_origin import start_origin, stop
from benchmarks.harness import (
    Aim,
    check_aims,
    fmt_number,
    percentile,
    render_table,
    sigterm_as_interrupt,
    start_gateways,
)
from cachegw import AsyncClient, CacheError
from cachegw_gateway.managed_redis import ManagedRedis
from tests.pg import ManagedPostgres

AIMS = [
    Aim("throughput ratio", "(wb) / (wt) Sets per second", ">=", 1.5, "x"),
    Aim("calls ratio", "(wt) / (wb) origin Store calls per Set (batching)", ">=", 5.0, "x"),
    Aim("entries per set", "(wb) origin Store entries per Set (collapsing)", "<=", 0.8, ""),
    Aim("errors", "failed Sets and entries left in the journal", "==", 0, "count"),
]

SHARDS = 4
CONFIG = """
[origin]
timeout_seconds = 2.0
max_in_flight = 32

[write_behind]
shards = {shards}
batch_size = 500
flush_interval_seconds = 0.1

[[classes]]
name = "wt"
patterns = ["wt*"]
ttl_seconds = 300
origin = "{origin}"
read_policy = "read-through"
write_policy = "through"

[[classes]]
name = "wb"
patterns = ["wb*"]
ttl_seconds = 300
origin = "{origin}"
read_policy = "read-through"
write_policy = "behind"
"""

_STORE_LINE = re.compile(r"origin Store: (\d+) entries")


@dataclass
class Settings:
    callers: int
    keys: int
    gateways: int
    seconds: float
    rounds: int
    value_bytes: int


@dataclass
class Tally:
    sets: int = 0
    errors: int = 0
    seconds: float = 0.0
    calls: int = 0
    entries: int = 0
    drain: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def stores(log: Path) -> tuple[int, int]:
    """(Store calls, entries) the origin served so far (its log: one line per call)."""
    found = [int(m.group(1)) for m in _STORE_LINE.finditer(log.read_text(errors="replace"))]
    return len(found), sum(found)


async def journal_left(r: aioredis.Redis) -> int:
    return sum([int(await r.xlen(f"cg:{{wb:wb:{n}}}:journal")) for n in range(SHARDS)])


async def run_case(s: Settings, clients: Sequence[AsyncClient], prefix: str, tally: Tally) -> None:
    value = b"x" * s.value_bytes

    async def caller(i: int, until: float) -> None:
        rng = random.Random(i)
        while time.monotonic() < until:
            key = f"{prefix}:{rng.randrange(s.keys)}"
            started = time.perf_counter()
            try:
                await rng.choice(clients).set(key, value)
                tally.sets += 1
            except (CacheError, OSError):
                tally.errors += 1
            tally.latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    await asyncio.gather(*(caller(i, started + s.seconds) for i in range(s.callers)))
    tally.seconds += time.monotonic() - started


async def main_async(
    s: Settings, gateways: Sequence[str], redis_url: str, origin_log: Path
) -> tuple[list[list[str]], dict[str, float]]:
    clients = [AsyncClient(addr, timeout=10) for addr in gateways]
    r = aioredis.Redis.from_url(redis_url)
    tallies = {"wt": Tally(), "wb": Tally()}
    try:
        for n in range(s.rounds):
            for tag in ("wt", "wb"):
                calls, entries = stores(origin_log)
                await run_case(s, clients, f"{tag}{n}", tallies[tag])
                ended = time.monotonic()
                if tag == "wb":  # bounded: until the flushers emptied the journal
                    for _ in range(1200):
                        if not await journal_left(r):
                            break
                        await asyncio.sleep(0.05)
                    tallies[tag].drain.append(time.monotonic() - ended)
                after_calls, after_entries = stores(origin_log)
                tallies[tag].calls += after_calls - calls
                tallies[tag].entries += after_entries - entries
            print(f"round {n + 1}/{s.rounds} done", file=sys.stderr)
        left = await journal_left(r)
    finally:
        for client in clients:
            await client.close()
        await r.aclose()
    rows = []
    for tag, name in (("wt", "(wt) write-through"), ("wb", "(wb) write-behind")):
        t = tallies[tag]
        lat = sorted(t.latencies)
        rows.append(
            [
                name,
                fmt_number(t.sets / t.seconds),
                f"{percentile(lat, 50) * 1000:.2f}",
                f"{percentile(lat, 99) * 1000:.2f}",
                fmt_number(t.calls),
                fmt_number(t.entries),
                f"{t.entries / t.sets:.3f}" if t.sets else "-",
                f"{max(t.drain):.2f}" if t.drain else "-",
                fmt_number(t.errors),
            ]
        )
    wt, wb = tallies["wt"], tallies["wb"]
    throughput = (wb.sets / wb.seconds) / (wt.sets / wt.seconds)
    calls_per_set = (wt.calls / wt.sets) / (wb.calls / wb.sets) if wb.calls else float("inf")
    rows.append(["(wb) / (wt)", f"{throughput:.2f}x", "", "", "", "", "", "", ""])
    rows.append(
        ["(wt) / (wb) Store calls per Set", f"{calls_per_set:.0f}x", "", "", "", "", "", "", ""]
    )
    measured = {
        "throughput ratio": throughput,
        "calls ratio": calls_per_set,
        "entries per set": wb.entries / wb.sets if wb.sets else float("inf"),
        "errors": float(wt.errors + wb.errors + left),
    }
    return rows, measured


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--keys", type=int, default=50, help="hot keys per case")
    p.add_argument("--gateways", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0, help="per case per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--value-bytes", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="1 round of 4 s")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.seconds = 1, 4.0
    return Settings(a.callers, a.keys, a.gateways, a.seconds, a.rounds, a.value_bytes)


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cachegw-wb-"))
    try:
        with sigterm_as_interrupt(), ExitStack() as stack:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            store = stack.enter_context(ManagedRedis())
            pg = stack.enter_context(ManagedPostgres())
            proc, origin, origin_log = start_origin(pg.dsn, work)
            stack.callback(stop, proc)
            config = CONFIG.format(origin=origin, shards=SHARDS)
            gateways = start_gateways(stack, s.gateways, store.url, config, work)
            rows, measured = asyncio.run(
                main_async(s, [g.address for g in gateways], store.url, origin_log)
            )
            for gw in gateways:
                if not gw.running:
                    raise RuntimeError(f"{gw.name} died during the run")
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    print(
        f"write-behind benchmark: {s.callers} callers over {s.gateways} gateways, {s.keys} "
        f"keys per case, {s.value_bytes} B values, {s.rounds} rounds x {s.seconds:g} s per "
        "case; origin: cachegw.origin.postgres over PostgreSQL"
    )
    print(
        render_table(
            ["case", "Sets/s", "p50 ms", "p99 ms", "Store calls", "entries", "entries/Set",
             "drain s", "errors"],
            rows,
            right="lrrrrrrrr",
        )
    )  # fmt: skip
    print(
        "entries/Set: Store entries the origin received per acknowledged Set (write-behind "
        "collapses a key's writes within a flush batch); drain s: the journal emptied this "
        "long after the last Set."
    )
    return 0 if check_aims(AIMS, measured) else 1


if __name__ == "__main__":
    sys.exit(main())
