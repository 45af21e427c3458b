"""Counters, rate limits and batch writes: the gateway against redis-py doing the same
work on the same Redis, in interleaved rounds.

  Incr       the gateway's Incr   vs redis-py running the gateway's Incr script (EVALSHA)
  Allow      the gateway's Allow  vs redis-py running the gateway's GCRA script (EVALSHA)
  SetMany    SetMany(100)         vs a redis-py pipeline of 100 SET PX

Each pair runs with the same asyncio client concurrency (`--concurrency`, 64) from this
process, on the same 2 cores as the gateway and Redis. A gRPC call costs several times a
Redis command here (see bench_gateway.py), so the aims ask what that cost allows: one
gateway call per Redis script is the floor of Incr and Allow, and SetMany pays one call
for a pipeline of 100 scripts.

Run (from the repository root, after `make setup`):

    .venv/bin/python benchmarks/bench_counters.py            # about 1 minute
    .venv/bin/python benchmarks/bench_counters.py --quick    # about 15 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis.asyncio as aioredis

from benchmarks.harness import (
    Aim,
    Budget,
    Case,
    Sample,
    ServerProcess,
    check_aims,
    fmt_number,
    measure_async,
    render_table,
    run_interleaved,
)
from cachegw import AsyncClient
from cachegw_gateway.counters import _INCR_SCRIPT
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from cachegw_gateway.ratelimit import GCRA_SOURCE

BIN = Path(sys.executable).parent
BATCH = 100

AIMS = [
    Aim("Incr", "Incr calls/s, gateway / redis-py EVALSHA of the same script", ">=", 0.15),
    Aim("Allow", "Allow calls/s, gateway / redis-py EVALSHA of the same GCRA", ">=", 0.15),
    Aim("SetMany(100)", "values/s, SetMany(100) / redis-py pipeline of 100 SETs", ">=", 0.25),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run, for smoke tests")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per case (2)")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (64)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    budget = Budget(args.seconds or (0.7 if args.quick else 2.0), 0.2)
    c = args.concurrency
    work = Path(tempfile.mkdtemp(prefix="cachegw-bench-"))
    t0 = time.monotonic()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        store = stack.enter_context(ManagedRedis())
        address = f"127.0.0.1:{free_port()}"
        gateway = ServerProcess(
            "gateway",
            [str(BIN / "cachegw"), "serve", "--listen", address, "--redis-url", store.url,
             "--log-level", "WARNING"],
            address,
            work / "gateway.log",
        )  # fmt: skip
        stack.enter_context(gateway)
        runner = stack.enter_context(asyncio.Runner())
        client = runner.run(_client(address))
        direct = aioredis.Redis.from_url(store.url, max_connections=c)
        stack.callback(lambda: runner.run(_close(client, direct)))
        incr_sha, gcra_sha = runner.run(_load(direct))
        values = [(f"bench:{i}", b"v" * 100) for i in range(BATCH)]

        def case(
            name: str, call: Callable[[], Awaitable[object]], items: int, pid: int | None
        ) -> Case:
            def run() -> Sample:
                return runner.run(measure_async(call, c, budget, items, pid))

            return Case(name, run)

        async def gw_incr() -> object:
            return await client.incr("bench:counter", 1)

        async def rd_incr() -> object:
            return await direct.evalsha(incr_sha, 1, "bench:{counter}:n", "1", "60000")

        async def gw_allow() -> object:
            return await client.allow("bench:limit", rate=10**6, period=1.0, burst=10**6)

        async def rd_allow() -> object:
            return await direct.evalsha(gcra_sha, 1, "bench:{limit}:rl", 10**6, 10**6, 10**6, 1)

        async def gw_set_many() -> object:
            return await client.set_many(values)

        async def rd_pipeline() -> object:
            async with direct.pipeline(transaction=False) as pipe:
                for key, value in values:
                    pipe.set(key, value, px=60_000)
                return await pipe.execute()

        cases = [
            case("incr.gateway", gw_incr, 1, gateway.pid),
            case("incr.redis", rd_incr, 1, store.pid),
            case("allow.gateway", gw_allow, 1, gateway.pid),
            case("allow.redis", rd_allow, 1, store.pid),
            case("setmany.gateway", gw_set_many, BATCH, gateway.pid),
            case("setmany.redis", rd_pipeline, BATCH, store.pid),
        ]
        results = run_interleaved(cases, rounds, rotate=True)
        if not gateway.running:
            raise RuntimeError("the gateway died during the run")
    pairs = [
        ("Incr", "incr", "Incr", "redis-py EVALSHA (same script)"),
        ("Allow", "allow", "Allow (GCRA)", "redis-py EVALSHA (same script)"),
        ("SetMany(100)", "setmany", "SetMany(100)", "redis-py pipeline of 100 SET"),
    ]
    rows: list[list[str]] = []
    measured: dict[str, float] = {}
    notes: dict[str, str] = {}
    for aim, prefix, label, reference in pairs:
        gw, rd = results.summary(f"{prefix}.gateway"), results.summary(f"{prefix}.redis")
        measured[aim] = results.ratio(f"{prefix}.gateway", f"{prefix}.redis")
        notes[aim] = results.spread(f"{prefix}.gateway", f"{prefix}.redis")
        rows.append(
            [
                label,
                "(a) gateway",
                fmt_number(gw.ops_per_s),
                fmt_number(gw.items_per_s),
                fmt_number(gw.p50_us),
                fmt_number(gw.p99_us),
                f"{measured[aim]:.2f}",
            ]
        )
        rows.append(["", f"(b) {reference}", fmt_number(rd.ops_per_s), fmt_number(rd.items_per_s),
                     fmt_number(rd.p50_us), fmt_number(rd.p99_us), ""])  # fmt: skip
    print(
        f"counters, rate limits and batch writes: concurrency {c}, {rounds} interleaved "
        f"rounds x {budget.seconds:g} s per case; 2 cores shared by client, gateway, Redis"
    )
    headers = ["what", "target", "ops/s", "values/s", "p50 us", "p99 us", "a/b"]
    print(render_table(headers, rows, right="llrrrrr"))
    met = check_aims(AIMS, measured, notes)
    print(f"total wall time {time.monotonic() - t0:.0f} s")
    return 0 if met else 1


async def _client(address: str) -> AsyncClient:
    return AsyncClient(address, timeout=30)


async def _load(direct: aioredis.Redis) -> tuple[str, str]:
    incr = await direct.script_load(_INCR_SCRIPT)
    gcra = await direct.script_load(GCRA_SOURCE)
    return str(incr), str(gcra)


async def _close(client: AsyncClient, direct: aioredis.Redis) -> None:
    await client.close()
    await direct.aclose()


if __name__ == "__main__":
    sys.exit(main())
