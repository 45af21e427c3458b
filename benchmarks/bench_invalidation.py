"""Invalidation: propagation latency, bulk invalidation time, near-cache reads.

In one run, against one managed redis-server and three `cachegw serve` processes:

1. Propagation: Invalidate(key) through one gateway while a separate process keeps Get
   load on all three; the latency is from Invalidate returning to the last of five
   streams having the event: one Subscribe stream per gateway (a gateway delivers to its
   streams right after evicting its L1, so each is an upper bound for that gateway's L1
   eviction) and two more subscribers. p50 / p99 / max; target p99 under 10 ms.
2. Bulk: time of one Invalidate by tag, by prefix and by class over 1 000 and 100 000
   stored keys (written straight into Redis in the gateway's layout, to save time).
   Target: by class the same time for both sizes (a generation bump, O(1)).
3. Near cache: hot-key reads of a Python service through `cachegw.Client` with a
   `NearCache` against direct redis-py GETs of the same keys, in interleaved rounds.
   Target: at least 20x.

Run (from the repository root, after `make setup`):

    .venv/bin/python benchmarks/bench_invalidation.py            # about 1 minute
    .venv/bin/python benchmarks/bench_invalidation.py --quick    # about 20 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis

from benchmarks.harness import (
    fmt_number,
    median,
    percentile,
    render_table,
    sigterm_as_interrupt,
    start_gateways,
)
from cachegw import AsyncClient, Client, NearCache
from cachegw_gateway import envelope
from cachegw_gateway.managed_redis import ManagedRedis

CONFIG = """
[default_class]
ttl_seconds = 600
"""
CLASS = """
[[classes]]
name = "bulk{n}"
patterns = ["class{n}:*"]
ttl_seconds = 600
"""

# Background Get load on every gateway, from its own process.
LOAD = """
import sys, time
from cachegw import Client
clients = [Client(a, timeout=5) for a in sys.argv[1:]]
for c in clients:
    for i in range(100):
        c.set(f"load:{i}", b"x" * 100)
i = 0
while True:
    clients[i % len(clients)].get(f"load:{i % 100}")
    i += 1
"""


@dataclass
class Settings:
    events: int
    sizes: tuple[int, ...]
    read_seconds: float
    rounds: int


async def propagation(s: Settings, addrs: Sequence[str]) -> list[float]:
    """Milliseconds from Invalidate returning to the last of five streams having it."""
    clients = [AsyncClient(a, timeout=10) for a in addrs]
    listeners = [*clients, AsyncClient(addrs[0]), AsyncClient(addrs[1])]
    arrived: dict[str, list[float]] = {}
    everyone = asyncio.Event()
    waiting_for = ""

    async def listen(client: AsyncClient) -> None:
        async for event in client.subscribe():
            times = arrived.setdefault(event.id, [])
            times.append(time.perf_counter())
            if event.id == waiting_for and len(times) == len(listeners):
                everyone.set()

    tasks = [asyncio.create_task(listen(c)) for c in listeners]
    await asyncio.sleep(0.5)  # every stream registered
    out: list[float] = []
    try:
        for i in range(s.events):
            everyone.clear()
            answer = await clients[i % 3].invalidate([f"prop:{i}"])
            returned = time.perf_counter()
            waiting_for = answer.event_id
            if len(arrived.get(waiting_for, ())) < len(listeners):
                await asyncio.wait_for(everyone.wait(), 5)
            out.append(max(0.0, max(arrived[waiting_for]) - returned) * 1000)
            await asyncio.sleep(0.01)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in listeners:
            await client.close()
    return out


def populate(r: redis.Redis, keys: list[str], tag: str) -> None:
    now = int(time.time() * 1000)
    ttl = 600_000
    raw = envelope.encode(
        b"v" * 50, version=1, created_ms=now, soft_expiry_ms=now + ttl, tags=[tag]
    )
    for i in range(0, len(keys), 10_000):
        with r.pipeline(transaction=False) as pipe:
            for key in keys[i : i + 10_000]:
                pipe.set(f"cg:{{{key}}}", raw, px=ttl)
            pipe.zadd(f"cg:tag:{tag}", {k: now + ttl for k in keys[i : i + 10_000]})
            pipe.execute()


def bulk(s: Settings, addr: str, redis_url: str) -> list[list[str]]:
    rows = []
    with Client(addr, timeout=120) as client, redis.Redis.from_url(redis_url) as r:
        for n in s.sizes:
            timings = {}
            for how in ("tag", "prefix", "class"):
                prefix = f"{how}{n}:"
                keys = [f"{prefix}{i}" for i in range(n)]
                populate(r, keys, f"t{how}{n}")
                arg = {"tag": {"tags": [f"t{how}{n}"]}, "prefix": {"prefixes": [prefix]}}.get(
                    how, {"classes": [f"bulk{n}"]}
                )
                started = time.perf_counter()
                result = client.invalidate(**arg)  # type: ignore[arg-type]
                timings[how] = (time.perf_counter() - started) * 1000
                expected = 0 if how == "class" else n
                if result.removed != expected:
                    raise RuntimeError(f"{how}: removed {result.removed}, expected {expected}")
                if client.get(keys[0]) is not None or client.get(keys[-1]) is not None:
                    raise RuntimeError(f"{how}: a key survived its invalidation")
            rows.append([fmt_number(n)] + [f"{timings[h]:.1f}" for h in ("tag", "prefix", "class")])
    return rows


def near_reads(s: Settings, addr: str, redis_url: str) -> tuple[list[float], list[float]]:
    keys = [f"hot:{i}" for i in range(100)]
    near, direct_rates = [], []
    with (
        Client(addr, near_cache=NearCache(ttl=60)) as client,
        redis.Redis.from_url(redis_url) as r,
    ):
        for key in keys:
            client.set(key, b"v" * 100)
            r.set(f"plain:{key}", b"v" * 100)
        deadline = time.monotonic() + 10
        while client.near_cache is None or not client.near_cache.live:
            if time.monotonic() > deadline:
                raise RuntimeError("the near cache's stream never went live")
            time.sleep(0.01)
        for key in keys:
            client.get(key)  # fill
        for _ in range(s.rounds):
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < s.read_seconds:
                for key in keys:
                    client.get(key)
                n += len(keys)
            near.append(n / (time.perf_counter() - started))
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < s.read_seconds:
                for key in keys:
                    r.get(f"plain:{key}")
                n += len(keys)
            direct_rates.append(n / (time.perf_counter() - started))
        assert client.near_cache is not None
        if client.near_cache.hits < len(keys) * s.rounds:
            raise RuntimeError("the near cache did not serve the reads")
    return near, direct_rates


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=500)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    s = Settings(a.events, (1000, 100_000), 2.0, 3)
    if a.quick:
        s = Settings(100, (1000, 10_000), 0.5, 2)
    work = Path(tempfile.mkdtemp(prefix="cachegw-invalidation-"))
    try:
        with sigterm_as_interrupt(), ExitStack() as stack:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            store = stack.enter_context(ManagedRedis())
            config = CONFIG + "".join(CLASS.format(n=n) for n in s.sizes)
            gateways = start_gateways(stack, 3, store.url, config, work)
            addrs = [g.address for g in gateways]
            load = subprocess.Popen([sys.executable, "-c", LOAD, *addrs])
            stack.callback(load.wait, 10)
            stack.callback(load.kill)
            time.sleep(1.0)
            lat = sorted(asyncio.run(propagation(s, addrs)))
            load.kill()
            bulk_rows = bulk(s, addrs[0], store.url)
            near, direct = near_reads(s, addrs[1], store.url)
            for gw in gateways:
                if not gw.running:
                    raise RuntimeError(f"{gw.name} died during the run")
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    print("invalidation benchmark: 3 gateways, 1 managed redis-server, this machine's cores")
    print(
        f"\n1. propagation, {len(lat)} Invalidate(key) under background Get load: "
        f"Invalidate returned -> 3 gateway streams + 2 subscribers have the event"
    )
    p99 = percentile(lat, 99)
    print(
        f"   p50 {percentile(lat, 50):.2f} ms  p99 {p99:.2f} ms  max {lat[-1]:.2f} ms  "
        f"(target p99 < 10 ms: {'met' if p99 < 10 else 'NOT met'})"
    )
    print("\n2. one Invalidate over N stored keys, ms")
    print(render_table(["keys", "by tag", "by prefix", "by class"], bulk_rows, right="rrrr"))
    small, large = float(bulk_rows[0][3]), float(bulk_rows[-1][3])
    print(f"   by class: {large / small:.2f}x the time for {s.sizes[-1] // s.sizes[0]}x the keys")
    ratios = [n / d for n, d in zip(near, direct, strict=True)]
    print(
        f"\n3. hot reads, 100 keys: near cache {fmt_number(median(near))}/s, "
        f"redis-py GET {fmt_number(median(direct))}/s: {median(ratios):.1f}x "
        f"(median of {len(ratios)} interleaved rounds; target >= 20x: "
        f"{'met' if median(ratios) >= 20 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
