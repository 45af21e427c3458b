"""A soak: mixed load on two gateway processes, watching what must not grow.

Run:  .venv/bin/python benchmarks/soak.py [--minutes 10] [--cycles 10000]   (make soak)

Two `cachegw serve` processes on a managed redis-server (L1 bounded at 16 MiB, so it
fills and evicts), driven from this process for `--minutes`:

- readers: Get / GetMany of Zipf-popular keys out of 50,000, cache-aside (a miss is Set);
- writers: Sets with tags; an invalidator: keys, a prefix or a tag every 100 ms;
- subscriber churn: Subscribe streams opened on either gateway, read a little, cancelled.

Every few seconds each gateway's Stats is sampled: RSS, open file descriptors, asyncio
tasks, L1 bytes, open streams. The load pauses at the end of the warm-up (the first
quarter) and at the end, and a quiet sample is taken each time: the quiet figures must
match (tasks, descriptors and streams exactly, give or take the probe's own; RSS within
10 %). Then `--cycles` Subscribe/cancel cycles on one gateway must leave nothing behind.
A shortened run is in `make test` (tests/test_soak.py), checking the counts only.
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
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc

from benchmarks.harness import Aim, check_aims, render_table, start_gateways
from cachegw import AsyncClient
from cachegw.errors import CacheError
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis

CONFIG = """
[l1]
max_bytes = 16777216

[default_class]
ttl_seconds = 30
l1_ttl_seconds = 10
"""
KEYS = 50_000
SAMPLE_EVERY = 5.0  # seconds
AIMS = [
    Aim(
        "tasks",
        "asyncio tasks, quiet end - quiet after warm-up (max over gateways)",
        "<=",
        2,
        "count",
    ),
    Aim("fds", "open fds, quiet end - quiet after warm-up (max over gateways)", "<=", 2, "count"),
    Aim("rss", "RSS, quiet end / quiet after warm-up (max over gateways)", "<=", 1.10),
    Aim("cycle tasks", "asyncio tasks after the cycles - before", "<=", 2, "count"),
    Aim("cycle fds", "open fds after the cycles - before", "<=", 2, "count"),
    Aim("cycle streams", "Subscribe streams left open after the cycles", "==", 0, "count"),
]


@dataclass
class Figures:
    rss: int
    fds: int
    tasks: int
    l1_bytes: int
    streams: int

    @classmethod
    def of(cls, stats: pb.StatsResponse) -> Figures:
        p = stats.process
        return cls(p.rss_bytes, p.open_fds, p.asyncio_tasks, stats.l1.bytes, stats.subscribers)


@dataclass
class Soak:
    addresses: list[str]
    errors: dict[str, int] = field(default_factory=dict)
    ops: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    paused: asyncio.Event = field(default_factory=asyncio.Event)

    def failed(self, exc: Exception) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


async def figures(address: str) -> Figures:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        return Figures.of(await stub.Stats(pb.StatsRequest(), timeout=10))


def zipf_key(rng: random.Random) -> str:
    return f"s:{min(KEYS - 1, int(rng.paretovariate(1.1)) - 1)}"


async def reader(soak: Soak, client: AsyncClient, seed: int) -> None:
    rng = random.Random(seed)
    while not soak.stop.is_set():
        await soak.paused.wait()
        try:
            if rng.random() < 0.2:
                keys = [zipf_key(rng) for _ in range(20)]
                await client.get_many(keys)
            else:
                key = zipf_key(rng)
                if await client.get(key) is None:
                    await client.set(key, os.urandom(rng.randrange(10, 400)))
            soak.ops += 1
        except CacheError as exc:
            soak.failed(exc)


async def writer(soak: Soak, client: AsyncClient, seed: int) -> None:
    rng = random.Random(seed)
    while not soak.stop.is_set():
        await soak.paused.wait()
        try:
            key = zipf_key(rng)
            await client.set(key, os.urandom(100), tags=[f"t{rng.randrange(50)}"])
            soak.ops += 1
        except CacheError as exc:
            soak.failed(exc)
        await asyncio.sleep(0.002)


async def invalidator(soak: Soak, client: AsyncClient, seed: int) -> None:
    rng = random.Random(seed)
    while not soak.stop.is_set():
        await soak.paused.wait()
        try:
            kind = rng.randrange(3)
            if kind == 0:
                await client.invalidate(keys=[zipf_key(rng) for _ in range(10)])
            elif kind == 1:
                await client.invalidate(prefixes=[f"s:{rng.randrange(10, 99)}"])
            else:
                await client.invalidate(tags=[f"t{rng.randrange(50)}"])
            soak.ops += 1
        except CacheError as exc:
            soak.failed(exc)
        await asyncio.sleep(0.1)


async def churn(soak: Soak, clients: list[AsyncClient], seed: int) -> None:
    """Subscribe streams that come and go."""
    rng = random.Random(seed)
    while not soak.stop.is_set():
        await soak.paused.wait()
        stream = rng.choice(clients).subscribe(prefixes=["s:"], resume=False)
        try:
            async with asyncio.timeout(rng.uniform(0.05, 0.5)):
                async for _ in stream:
                    pass
        except TimeoutError:
            pass
        except CacheError as exc:
            soak.failed(exc)
        finally:
            await stream.aclose()


async def cycles(address: str, n: int) -> None:
    """Subscribe, wait until registered, cancel: `n` times, on one channel."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        for _ in range(n):
            call = stub.Subscribe(pb.SubscribeRequest(prefixes=["c:"]))
            await call.initial_metadata()
            call.cancel()


async def quiet(addresses: list[str]) -> list[Figures]:
    """Figures once in-flight work has settled (streams closed, tasks ended)."""
    await asyncio.sleep(1.5)
    return [await figures(a) for a in addresses]


@dataclass
class Outcome:
    measured: dict[str, float]
    samples: list[tuple[float, list[Figures]]]
    ops: int
    errors: dict[str, int]


async def run(addresses: list[str], minutes: float, n_cycles: int) -> Outcome:
    soak = Soak(addresses)
    soak.paused.set()
    clients = [AsyncClient(a, timeout=10.0) for a in addresses]
    tasks = [
        *(asyncio.ensure_future(reader(soak, clients[i % 2], i)) for i in range(8)),
        *(asyncio.ensure_future(writer(soak, clients[i % 2], 100 + i)) for i in range(2)),
        asyncio.ensure_future(invalidator(soak, clients[0], 200)),
        *(asyncio.ensure_future(churn(soak, clients, 300 + i)) for i in range(4)),
    ]
    samples: list[tuple[float, list[Figures]]] = []
    seconds = minutes * 60
    start = time.monotonic()
    warm_end = start + seconds / 4
    after_warmup: list[Figures] | None = None
    try:
        while (now := time.monotonic()) < start + seconds:
            await asyncio.sleep(min(SAMPLE_EVERY, start + seconds - now))
            if after_warmup is None and time.monotonic() >= warm_end:
                soak.paused.clear()
                after_warmup = await quiet(addresses)
                soak.paused.set()
            samples.append((time.monotonic() - start, [await figures(a) for a in addresses]))
            print(f"{samples[-1][0]:6.0f}s  {samples[-1][1]}  ops {soak.ops:,}", flush=True)
        soak.paused.clear()
        end = await quiet(addresses)
        if after_warmup is None:
            after_warmup = end
    finally:
        soak.stop.set()
        soak.paused.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
    before = await quiet(addresses[:1])
    await cycles(addresses[0], n_cycles)
    after = await quiet(addresses[:1])
    measured = {
        "tasks": max(e.tasks - w.tasks for e, w in zip(end, after_warmup, strict=True)),
        "fds": max(e.fds - w.fds for e, w in zip(end, after_warmup, strict=True)),
        "rss": max(e.rss / w.rss for e, w in zip(end, after_warmup, strict=True)),
        "cycle tasks": after[0].tasks - before[0].tasks,
        "cycle fds": after[0].fds - before[0].fds,
        "cycle streams": after[0].streams,
    }
    return Outcome(measured, samples, soak.ops, soak.errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--cycles", type=int, default=10_000)
    args = parser.parse_args(argv)
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        redis = stack.enter_context(ManagedRedis())
        gateways = start_gateways(stack, 2, redis.url, CONFIG, Path(tmp))
        outcome = asyncio.run(run([g.address for g in gateways], args.minutes, args.cycles))
    rows = [
        [
            f"{t:.0f}",
            *(
                f"{f.rss / 2**20:.1f} / {f.fds} / {f.tasks} / "
                f"{f.l1_bytes / 2**20:.1f} / {f.streams}"
                for f in figs
            ),
        ]
        for t, figs in outcome.samples
    ]
    print()
    print(
        f"soak: {args.minutes:g} min, {outcome.ops:,} operations, "
        f"errors {outcome.errors or 'none'}; then {args.cycles:,} subscribe/cancel cycles"
    )
    print(
        render_table(
            ["s", "gw0 RSS MiB / fds / tasks / L1 MiB / streams", "gw1 ..."], rows, right="rll"
        )
    )
    ok = check_aims(AIMS, outcome.measured)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
