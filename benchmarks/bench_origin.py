"""Origin loads per hot-key expiry: read-through vs cache-aside, against the example
origin over a real PostgreSQL table (`python -m cachegw.origin.postgres`).

C callers over two gateway processes read a few hot keys with a short TTL, in three
ways, in interleaved rounds:

  (rt) read-through: `AsyncClient.get`; on a miss the gateway loads from the origin
       itself, under the lease (one Load per key across the gateways);
  (ca) cache-aside with protection: `AsyncClient.get_or_load`, whose loader reads the
       same PostgreSQL table (leases, server-side waits);
  (n)  naive cache-aside through the same gateways: get, and on a miss load + set.

Every key's TTL is `--ttl` (no jitter, L1 bounded by it), so a round of a case holds
ceil(seconds / ttl) fill periods per key: the cold fill, then one per expiry. Printed per
case: origin loads (rt: counted by the origin, from its log; ca and n: by the loader),
loads per fill period per key, p50 / p99 of one read, errors. The aim (AIMS) is about
(rt); a missed aim makes the script exit 1.

Run (from the repository root, after `make setup`, which installs PostgreSQL):

    .venv/bin/python benchmarks/bench_origin.py            # about 40 s
    .venv/bin/python benchmarks/bench_origin.py --quick    # about 15 s
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asyncpg
import grpc

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
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from tests.pg import ManagedPostgres

AIMS = [
    Aim("rt loads per expiry", "(rt) origin loads per key per TTL period", "<=", 1.10, ""),
    Aim("rt errors", "(rt) failed reads", "==", 0, "count"),
]

TABLE = "bench_items"

CONFIG = """
[origin]
timeout_seconds = 1.0

[[classes]]
name = "rt"
patterns = ["rt*"]
ttl_seconds = {ttl}
jitter = 0
l1_ttl_seconds = {ttl}
origin = "{origin}"
read_policy = "read-through"

[default_class]
ttl_seconds = {ttl}
jitter = 0
l1_ttl_seconds = {ttl}
"""


@dataclass
class Settings:
    callers: int
    keys: int
    gateways: int
    ttl: float
    seconds: float
    rounds: int
    think: float


@dataclass
class Tally:
    loads: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


Read = Callable[[AsyncClient, str], Awaitable[bytes | None]]
_LOAD_LINE = re.compile(r"origin Load: (\d+) keys")


def origin_loads(log: Path) -> int:
    """Keys the origin loaded so far (its log: one line per Load call)."""
    return sum(int(m.group(1)) for m in _LOAD_LINE.finditer(log.read_text(errors="replace")))


async def run_case(
    s: Settings, clients: Sequence[AsyncClient], prefix: str, read: Read, tally: Tally
) -> None:
    async def caller(i: int, until: float) -> None:
        rng = random.Random(i)
        await asyncio.sleep(rng.random() * s.think)
        while time.monotonic() < until:
            key = f"{prefix}:{rng.randrange(s.keys)}"
            started = time.perf_counter()
            try:
                value = await read(rng.choice(clients), key)
                if value is None:
                    tally.errors += 1
            except (CacheError, OSError):
                tally.errors += 1
            tally.latencies.append(time.perf_counter() - started)
            await asyncio.sleep(s.think)

    until = time.monotonic() + s.seconds
    await asyncio.gather(*(caller(i, until) for i in range(s.callers)))


async def main_async(
    s: Settings, gateways: Sequence[str], dsn: str, origin_log: Path
) -> tuple[list[list[str]], dict[str, float]]:
    clients = [AsyncClient(addr, timeout=10) for addr in gateways]
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=20)
    tallies = {"rt": Tally(), "ca": Tally(), "n": Tally()}

    async def db_load(key: str, tally: Tally) -> bytes:
        tally.loads += 1
        row = await pool.fetchrow(f"SELECT value FROM {TABLE} WHERE key = $1", key)
        return b"" if row is None else bytes(row["value"])

    async def read_through(client: AsyncClient, key: str) -> bytes | None:
        return await client.get(key)

    async def cache_aside(client: AsyncClient, key: str) -> bytes | None:
        return await client.get_or_load(key, lambda: db_load(key, tallies["ca"]))

    async def naive(client: AsyncClient, key: str) -> bytes | None:
        value = await client.get(key)
        if value is None:
            value = await db_load(key, tallies["n"])
            await client.set(key, value)
        return value

    cases: list[tuple[str, str, Read]] = [
        ("rt", "(rt) read-through: get", read_through),
        ("ca", "(ca) cache-aside: get_or_load", cache_aside),
        ("n", "(n) naive cache-aside: get, load, set", naive),
    ]
    try:
        for r in range(s.rounds):
            for tag, _, read in cases:
                prefix = f"{tag}{r}"
                async with pool.acquire() as conn:
                    await conn.executemany(
                        f"INSERT INTO {TABLE} (key, value, tags, version) "
                        f"VALUES ($1, $2, '{{}}', nextval('{TABLE}_versions'))",
                        [(f"{prefix}:{k}", b"x" * 200) for k in range(s.keys)],
                    )
                before = origin_loads(origin_log)
                await run_case(s, clients, prefix, read, tallies[tag])
                if tag == "rt":
                    tallies[tag].loads += origin_loads(origin_log) - before
            print(f"round {r + 1}/{s.rounds} done", file=sys.stderr)
    finally:
        for client in clients:
            await client.close()
        await pool.close()
    # Per key and round: the cold fill, then one reload per expiry before the case ends.
    periods = s.rounds * s.keys * math.ceil(s.seconds / s.ttl)
    rows = []
    for tag, name, _ in cases:
        t = tallies[tag]
        lat = sorted(t.latencies)
        rows.append(
            [
                name,
                fmt_number(len(lat)),
                fmt_number(t.loads),
                f"{t.loads / periods:.2f}",
                f"{percentile(lat, 50) * 1000:.1f}",
                f"{percentile(lat, 99) * 1000:.1f}",
                fmt_number(t.errors),
            ]
        )
    rt = tallies["rt"]
    ratio = tallies["ca"].loads / rt.loads if rt.loads else float("nan")
    rows.append(["(ca) / (rt) loads", "", f"{ratio:.2f}x", "", "", "", ""])
    measured = {"rt loads per expiry": rt.loads / periods, "rt errors": float(rt.errors)}
    return rows, measured


def start_origin(dsn: str, work: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    address = f"127.0.0.1:{free_port()}"
    log = work / "origin.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cachegw.origin.postgres",
                "--dsn",
                dsn,
                "--table",
                TABLE,
                "--create",
                "--listen",
                address,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return proc, address, log
            except grpc.FutureTimeoutError:
                continue
    proc.kill()
    proc.wait(5)
    raise RuntimeError(f"the origin did not start: {log.read_text(errors='replace')[-2000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--callers", type=int, default=200)
    p.add_argument("--keys", type=int, default=4, help="hot keys")
    p.add_argument("--gateways", type=int, default=2)
    p.add_argument("--ttl", type=float, default=2.0, help="seconds")
    p.add_argument("--seconds", type=float, default=6.0, help="per case per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--think", type=float, default=0.2, help="seconds between a caller's reads")
    p.add_argument("--quick", action="store_true", help="1 round of 4 s")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.seconds = 1, 4.0
    return Settings(a.callers, a.keys, a.gateways, a.ttl, a.seconds, a.rounds, a.think)


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cachegw-origin-"))
    try:
        with sigterm_as_interrupt(), ExitStack() as stack:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            store = stack.enter_context(ManagedRedis())
            pg = stack.enter_context(ManagedPostgres())
            proc, origin, origin_log = start_origin(pg.dsn, work)
            stack.callback(stop, proc)
            config = CONFIG.format(ttl=s.ttl, origin=origin)
            gateways = start_gateways(stack, s.gateways, store.url, config, work)
            rows, measured = asyncio.run(
                main_async(s, [g.address for g in gateways], pg.dsn, origin_log)
            )
            for gw in gateways:
                if not gw.running:
                    raise RuntimeError(f"{gw.name} died during the run")
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    print(
        f"origin benchmark: {s.callers} callers over {s.gateways} gateways, {s.keys} hot "
        f"keys, TTL {s.ttl:g} s, think {s.think * 1000:g} ms, {s.rounds} rounds x "
        f"{s.seconds:g} s per case; origin: cachegw.origin.postgres over PostgreSQL"
    )
    print(
        render_table(
            ["case", "reads", "loads", "loads/expiry", "p50 ms", "p99 ms", "errors"],
            rows,
            right="lrrrrrr",
        )
    )
    print(
        "loads/expiry: origin loads per key per fill period (the cold fill, then one per "
        "expiry) "
        f"(naive: up to the callers per key, {s.callers // s.keys})."
    )
    return 0 if check_aims(AIMS, measured) else 1


if __name__ == "__main__":
    sys.exit(main())
