"""The asyncio client's auto-batching (cachegw/_batcher.py) against plain unary Gets.

Run:  .venv/bin/python benchmarks/bench_autobatch.py [--rounds 3] [--seconds 3] [--callers 64]

One `cachegw serve` process on a managed redis-server; 1,000 keys of 100 B, held in the
gateway's L1. The same AsyncClient code runs with ``batch_gets=False`` (one unary Get per
`get()`) and ``batch_gets=True`` (the `get()`s of one event-loop tick as one GetMany),
in interleaved rounds:

- **closed loop**: `--callers` tasks each awaiting `get()` of a random key in a loop:
  Gets/s, p50/p99, and the gateway's CPU per Get;
- **same offered load**: an open loop issuing `get()`s at half the unary rate just
  measured (each on its own task, on a fixed schedule), both ways: p50/p99 of each Get.

Aims (from the issue): batched >= 3x the unary Gets/s at 64 callers, and a p99 no worse
than unary's at the same offered load. The client and the gateway share this machine's
two cores.

The other way the issue names, Gets multiplexed over one bidi stream with ids, was built
and measured by this script at commit fbb1990 (a GetStream RPC: L1 hits answered inline
from pre-encoded bytes, other Gets as tasks with their own deadlines, admission per Get,
drain; ``AsyncClient(stream_gets=True)``; the three ways in rotating interleaved rounds):
1.84x and 1.63x unary's Gets/s in two runs, but 0.16x and 0.19x batching's (132-151 us of
gateway CPU per Get, against 9-11 for batching: each message still costs the server a
read and a write through gRPC). It was removed (fbb1990 reverted): an RPC with no
advantage over GetMany. ``git checkout fbb1990`` reproduces it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import (
    Aim,
    Budget,
    Sample,
    check_aims,
    measure_async,
    median,
    percentile,
    render_table,
    start_gateways,
)
from cachegw import AsyncClient
from cachegw_gateway.managed_redis import ManagedRedis

KEYS = [f"ab:{i}" for i in range(1000)]
VALUE = b"v" * 100
CONFIG = """
[default_class]
ttl_seconds = 3600
l1_ttl_seconds = 3600
"""
LOAD_SHARE = 0.5  # the open loop's rate, as a share of the unary closed-loop rate
AIMS = [
    Aim("throughput", "batched / unary Gets/s, closed loop", ">=", 3.0),
    Aim("p99", "batched / unary p99 at the same offered load", "<=", 1.0),
]


async def open_loop(client: AsyncClient, rate: float, seconds: float) -> list[int]:
    """`get()`s started at `rate` per second for `seconds`: each one's latency (ns)."""
    latencies: list[int] = []
    rng = random.Random(7)

    async def one() -> None:
        t0 = time.perf_counter_ns()
        await client.get(rng.choice(KEYS))
        latencies.append(time.perf_counter_ns() - t0)

    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    async with asyncio.timeout(30):
        while tasks:
            await asyncio.gather(*list(tasks))
    return latencies


async def main(args: argparse.Namespace) -> int:
    budget = Budget(seconds=args.seconds, warmup_seconds=0.5)
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        redis = stack.enter_context(ManagedRedis())
        gw = start_gateways(stack, 1, redis.url, CONFIG, Path(tmp))[0]
        unary = AsyncClient(gw.address, batch_gets=False)
        batched = AsyncClient(gw.address, batch_gets=True)
        try:
            await unary.set_many([(k, VALUE) for k in KEYS])
            for chunk in range(0, len(KEYS), 500):
                await unary.get_many(KEYS[chunk : chunk + 500])  # into the gateway's L1
            rng = random.Random(1)
            closed: dict[str, list[Sample]] = {"unary": [], "batched": []}
            fixed: dict[str, list[list[int]]] = {"unary": [], "batched": []}
            for r in range(args.rounds):
                for name, client in (("unary", unary), ("batched", batched)):

                    async def get(c: AsyncClient = client) -> object:
                        return await c.get(rng.choice(KEYS))

                    sample = await measure_async(get, args.callers, budget, server_pid=gw.pid)
                    closed[name].append(sample)
                    print(
                        f"round {r + 1} closed {name}: {sample.ops_per_s:,.0f} Gets/s, "
                        f"p99 {sample.latency_us(99) / 1000:.1f} ms",
                        flush=True,
                    )
                rate = LOAD_SHARE * closed["unary"][-1].ops_per_s
                for name, client in (("unary", unary), ("batched", batched)):
                    lat = await open_loop(client, rate, args.seconds)
                    fixed[name].append(lat)
                    p99 = percentile(sorted(lat), 99) / 1e6
                    print(f"round {r + 1} {rate:,.0f}/s {name}: p99 {p99:.1f} ms", flush=True)
        finally:
            await unary.close()
            await batched.close()

    def row(name: str) -> list[str]:
        s = closed[name]
        fixed_p = [sorted(x) for x in fixed[name]]
        return [
            name,
            f"{median([x.ops_per_s for x in s]):,.0f}",
            f"{median([x.latency_us(50) for x in s]) / 1000:.2f}",
            f"{median([x.latency_us(99) for x in s]) / 1000:.2f}",
            f"{median([x.server_cpu_us_per_op for x in s]):.0f}",
            f"{median([percentile(x, 50) for x in fixed_p]) / 1e6:.2f}",
            f"{median([percentile(x, 99) for x in fixed_p]) / 1e6:.2f}",
        ]

    print()
    print(
        f"auto-batching: {args.callers} callers, 1 gateway process, L1-hot keys of 100 B, "
        f"{args.rounds} interleaved rounds of {args.seconds:g} s; 2 CPUs shared by client "
        "and gateway"
    )
    print(
        render_table(
            [
                "client",
                "Gets/s",
                "p50 ms",
                "p99 ms",
                "gateway CPU us/Get",
                "p50 ms @half unary",
                "p99 ms @half unary",
            ],
            [row("unary"), row("batched")],
            right="lrrrrrr",
        )
    )
    ratios = [
        b.ops_per_s / u.ops_per_s for b, u in zip(closed["batched"], closed["unary"], strict=True)
    ]
    p99s = [
        percentile(sorted(b), 99) / percentile(sorted(u), 99)
        for b, u in zip(fixed["batched"], fixed["unary"], strict=True)
    ]
    print()
    ok = check_aims(AIMS, {"throughput": median(ratios), "p99": median(p99s)})
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--callers", type=int, default=64)
    sys.exit(asyncio.run(main(parser.parse_args())))
