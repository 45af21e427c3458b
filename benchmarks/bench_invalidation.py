"""Invalidation: propagation under load, the stall of broad invalidations on full L1s,
near-cache reads.

In one run, against one managed redis-server and three gateways (benchmarks/
lag_gateway.py: `cachegw serve` plus a task on its event loop that reports how late it
wakes up, and how much of that the loop thread spent on the CPU):

1. Propagation. A separate process keeps Get load on all three gateways (--load-rate
   calls/s each). Per event: a fresh key is Set and read on every gateway (an L1 copy
   on each); one prober per gateway reads it in a loop; then Invalidate(key) through
   one of them (in turn). Timed from the START of the Invalidate call: per gateway,
   until its prober gets an answer that is not the old value; per subscriber (a
   Subscribe stream on each gateway), until the event arrives. "all" is the last of the
   six. p50 / p99 / max.
2. Broad invalidations on full L1s. Every gateway's L1 ([l1] max_entries, --l1-entries)
   is filled to the brim (the entries copied in Redis, then Warmup on each gateway).
   Then, in rounds, one Invalidate of --bulk keys (1 % of L1 by default) by prefix, by
   tag and by class, each through a different gateway, and a round with no invalidation
   as the baseline. Per gateway: the longest event-loop stall after the Invalidate
   started (the loop thread's CPU during the latest tick, which the machine's other
   work does not inflate; the wall-clock lag is shown beside it), and from outside the
   slowest Get of an unrelated L1 key issued meanwhile. The evicted keys are restored
   and re-warmed between rounds, so every Invalidate meets full L1s.
3. Near cache: hot-key reads through `cachegw.Client` with a `NearCache` against plain
   redis-py GETs and, where the Redis supports it (7.4+, RESP3), redis-py's own
   client-side caching (`cache_config`), in interleaved rounds.

The aims are in AIMS below; a missed aim makes the script exit 1.

Run (from the repository root, after `make setup`):

    .venv/bin/python benchmarks/bench_invalidation.py            # about 2 minutes
    .venv/bin/python benchmarks/bench_invalidation.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc
import redis

from benchmarks.harness import (
    Aim,
    ServerProcess,
    check_aims,
    fmt_number,
    median,
    percentile,
    render_table,
    sigterm_as_interrupt,
)
from cachegw import AsyncClient, Client, NearCache
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis, free_port

LAG_GATEWAY = Path(__file__).resolve().parent / "lag_gateway.py"

# An event-loop stall costs every call in flight on that gateway; an invalidation that
# removes 1 % of a full L1 should not stall any gateway longer than the whole
# propagation budget.
STALL_AIM_MS = 10.0
AIMS = [
    # From the start of Invalidate(key) until all 3 gateways stop serving the old value
    # and all 3 subscribers have the event, under Get load on every gateway.
    Aim("propagation p99", "Invalidate start -> last of 6 (p99)", "<", 10.0, "ms"),
    # The longest event-loop stall (loop thread CPU) on any gateway for one Invalidate of
    # 1 % of full L1s, median over rounds.
    Aim("stall, prefix", "Invalidate(prefix): max over gateways", "<=", STALL_AIM_MS, "ms"),
    Aim("stall, tag", "Invalidate(tag): max over gateways", "<=", STALL_AIM_MS, "ms"),
    Aim("stall, class", "Invalidate(class): max over gateways", "<=", STALL_AIM_MS, "ms"),
    # Hot reads/s from one Python thread.
    Aim("near cache / redis-py GET", "NearCache reads/s / plain GET", ">=", 20.0),
    Aim("near cache / redis-py CSC", "NearCache reads/s / redis-py CSC", ">=", 1.0),
]

CONFIG = """
[server]
max_batch_keys = 1000

[l1]
max_entries = {entries}
max_bytes = 1073741824
warm_keys = 0

[default_class]
ttl_seconds = 7200
l1_ttl_seconds = 3600

[[classes]]
name = "bulkclass"
patterns = ["bc:*"]
ttl_seconds = 7200
l1_ttl_seconds = 3600
"""

# Background Get load on every gateway, from its own process: --rate calls/s each, from
# 4 asyncio tasks per gateway on one grpc.aio channel, over 100 keys (L1 hits).
LOAD = """
import asyncio, sys, time
import grpc
from cachegw.v1 import cache_pb2 as pb, cache_pb2_grpc

async def main(rate, addrs):
    stubs = [cache_pb2_grpc.CacheServiceStub(grpc.aio.insecure_channel(a)) for a in addrs]
    for s in stubs:
        for i in range(100):
            await s.Set(pb.SetRequest(key=f"load:{i}", value=b"x" * 100), timeout=10)
    tasks_per_gw = 4
    interval = tasks_per_gw / rate

    async def worker(stub, n):
        nxt = time.monotonic()
        i = n
        while True:
            await stub.Get(pb.GetRequest(key=f"load:{i % 100}"), timeout=10)
            i += tasks_per_gw
            nxt += interval
            delay = nxt - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                nxt = time.monotonic()  # behind: no bursts to catch up

    print("load: running", flush=True)
    await asyncio.gather(*(worker(s, n) for s in stubs for n in range(tasks_per_gw)))

asyncio.run(main(float(sys.argv[1]), sys.argv[2:]))
"""

KINDS = ("none", "prefix", "tag", "class")
BULK_TAG = "bulktag"
CALL_TIMEOUT = 30.0


@dataclass
class Settings:
    events: int
    load_rate: float
    l1_entries: int
    bulk: int
    rounds: int
    window: float
    read_seconds: float
    read_rounds: int


def parse_args(argv: Sequence[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smaller and shorter (smoke test)")
    p.add_argument("--events", type=int, help="propagation events (default 300, quick 60)")
    p.add_argument("--load-rate", type=float, default=500.0, help="Get/s per gateway (500)")
    p.add_argument("--l1-entries", type=int, help="L1 max_entries (default 100000)")
    p.add_argument("--bulk", type=int, help="keys per broad invalidation (default 1 %% of L1)")
    p.add_argument("--rounds", type=int, help="rounds of broad invalidations (default 3)")
    a = p.parse_args(argv)
    entries = a.l1_entries or (20_000 if a.quick else 100_000)
    s = Settings(
        events=a.events or (60 if a.quick else 300),
        load_rate=a.load_rate,
        l1_entries=entries,
        bulk=a.bulk or max(1, entries // 100),
        rounds=a.rounds or (2 if a.quick else 3),
        window=1.0,
        read_seconds=0.5 if a.quick else 1.5,
        read_rounds=2 if a.quick else 3,
    )
    if s.events < 1 or s.load_rate <= 0 or s.rounds < 1 or not 0 < 3 * s.bulk < s.l1_entries:
        p.error("--events, --load-rate, --rounds must be positive; 3 x --bulk < --l1-entries")
    return s


def start_gateways(
    stack: ExitStack, n: int, redis_url: str, config: str, work: Path
) -> list[ServerProcess]:
    path = work / "gateways.toml"
    path.write_text(config)
    out = []
    for i in range(n):
        address = f"127.0.0.1:{free_port()}"
        argv = [sys.executable, str(LAG_GATEWAY), "--listen", address, "--redis-url",
                redis_url, "--config", str(path), "--gateway-id", f"gw{i}"]  # fmt: skip
        out.append(stack.enter_context(ServerProcess(f"gw{i}", argv, address, work / f"gw{i}.log")))
    return out


def lags(gateway: ServerProcess, since: float, until: float) -> tuple[float, float]:
    """(longest loop CPU during one late tick, longest wall-clock lag), ms, of the ticks
    that ended within [since, until] (wall clock); 0 when none was late."""
    busy = lag = 0.0
    for line in gateway.log.read_text(errors="replace").splitlines():
        if not line.startswith("lag "):
            continue
        _, at, wall_ms, cpu_ms = line.split()
        if since <= float(at) <= until:
            lag = max(lag, float(wall_ms))
            busy = max(busy, float(cpu_ms))
    return busy, lag


def stubs_for(
    addrs: Sequence[str],
) -> tuple[list[grpc.aio.Channel], list[cache_pb2_grpc.CacheServiceAsyncStub]]:
    channels = [grpc.aio.insecure_channel(a) for a in addrs]
    return channels, [cache_pb2_grpc.CacheServiceStub(c) for c in channels]


def serving(reply: pb.GetResponse, old: bytes) -> bool:
    return reply.status == pb.STATUS_HIT and reply.value == old


async def get_calls(stub: cache_pb2_grpc.CacheServiceAsyncStub) -> int:
    stats = await stub.Stats(pb.StatsRequest(), timeout=CALL_TIMEOUT)
    return sum(r.calls for r in stats.rpcs if r.method == "Get")


# -- 1. propagation -------------------------------------------------------------------


@dataclass
class Propagation:
    names: list[str]
    times_ms: dict[str, list[float]] = field(default_factory=dict)
    all_ms: list[float] = field(default_factory=list)
    l1_at_start: int = 0
    events: int = 0
    load_per_s: list[float] = field(default_factory=list)
    # Round trips of the probes' reads before each Invalidate: what one Get costs meanwhile.
    rtt_ms: list[float] = field(default_factory=list)


async def propagation(s: Settings, addrs: Sequence[str]) -> Propagation:
    channels, stubs = stubs_for(addrs)
    clients = [AsyncClient(a, timeout=10) for a in addrs]
    subscribers = [AsyncClient(a, timeout=10) for a in addrs]
    names = [f"gw{i} Get" for i in range(len(addrs))] + [f"sub@gw{i}" for i in range(len(addrs))]
    out = Propagation(names, {n: [] for n in names})
    arrived: dict[str, list[tuple[int, float]]] = {}
    complete = asyncio.Event()
    waiting: list[str] = [""]

    async def listen(index: int, client: AsyncClient) -> None:
        async for event in client.subscribe():
            times = arrived.setdefault(event.id, [])
            times.append((index, time.perf_counter()))
            if event.id == waiting[0] and len(times) == len(subscribers):
                complete.set()

    async def probe(
        stub: cache_pb2_grpc.CacheServiceAsyncStub,
        key: str,
        old: bytes,
        primed: asyncio.Event,
        go: asyncio.Event,
    ) -> tuple[float, bool]:
        """Reads `key` until the answer is not `old`; primed once `old` came from L1.

        Returns when the gateway stopped serving `old`, and whether the last answer
        before `go` came from L1 (it is retried until it does, or 100 reads)."""
        request = pb.GetRequest(key=key)
        from_l1 = False
        reads = 0
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            reply = await stub.Get(request, timeout=CALL_TIMEOUT)
            now = time.perf_counter()
            old_value = serving(reply, old)
            if not go.is_set():
                out.rtt_ms.append((now - sent) * 1000)
                if not old_value:
                    raise RuntimeError(f"{key} was not served before its invalidation")
                reads += 1
                # An L1 copy can be evicted by the Set's own event landing late: read
                # again until the answer comes from L1.
                from_l1 = reply.tier == pb.TIER_L1
                if from_l1 or reads >= 100:
                    primed.set()
            elif not old_value:
                return now, from_l1
        raise TimeoutError(f"a gateway still served the old {key} 10 s after Invalidate")

    tasks = [asyncio.create_task(listen(i, c)) for i, c in enumerate(subscribers)]
    try:
        await asyncio.sleep(0.5)  # every stream registered
        before = [await get_calls(st) for st in stubs]
        started = time.perf_counter()
        for i in range(s.events):
            key, old = f"prop:{i}", f"old-{i}".encode()
            await clients[(i + 1) % 3].set(key, old)
            for st in stubs:  # an L1 copy on every gateway
                await st.Get(pb.GetRequest(key=key), timeout=CALL_TIMEOUT)
            go = asyncio.Event()
            primed = [asyncio.Event() for _ in stubs]
            probes = [
                asyncio.create_task(probe(st, key, old, p, go))
                for st, p in zip(stubs, primed, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in primed)), 10)
            complete.clear()
            t0 = time.perf_counter()
            go.set()
            answer = await clients[i % 3].invalidate([key])
            waiting[0] = answer.event_id
            ends = await asyncio.wait_for(asyncio.gather(*probes), 10)
            if len(arrived.get(answer.event_id, ())) < len(subscribers):
                await asyncio.wait_for(complete.wait(), 10)
            subs = sorted(arrived.pop(answer.event_id))  # by stream
            times = [(t - t0) * 1000 for t, _ in ends] + [(t - t0) * 1000 for _, t in subs]
            for name, ms in zip(names, times, strict=True):
                out.times_ms[name].append(ms)
            out.all_ms.append(max(times))
            out.l1_at_start += all(from_l1 for _, from_l1 in ends)
            out.events += 1
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        after = [await get_calls(st) for st in stubs]
        out.load_per_s = [(a - b) / elapsed for a, b in zip(after, before, strict=True)]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in (*clients, *subscribers):
            await client.close()
        for channel in channels:
            await channel.close(None)
    return out


def propagation_report(p: Propagation, s: Settings) -> str:
    rows = []
    for name in [*p.names, "all"]:
        values = sorted(p.all_ms if name == "all" else p.times_ms[name])
        rows.append([name, f"{percentile(values, 50):.2f}", f"{percentile(values, 99):.2f}",
                     f"{values[-1]:.2f}"])  # fmt: skip
    load = ", ".join(fmt_number(x) for x in p.load_per_s)
    rtt = sorted(p.rtt_ms)
    return (
        f"1. propagation: {p.events} Invalidate(key), each through one gateway in turn, "
        f"timed from the start of the call; Get calls/s served per gateway meanwhile "
        f"(load {fmt_number(s.load_rate)}/s each + probes): {load}\n"
        + render_table(["until", "p50 ms", "p99 ms", "max ms"], rows, right="lrrr")
        + f"\n   every gateway answered the old value from L1 when the Invalidate started: "
        f"{p.l1_at_start}/{p.events} events\n"
        f"   for scale, one Get round trip meanwhile (the probes' reads before each "
        f"Invalidate): p50 {percentile(rtt, 50):.2f} ms, p99 {percentile(rtt, 99):.2f} ms"
    )


# -- 2. broad invalidations on full L1s -----------------------------------------------


@dataclass
class Fill:
    """Where the benchmark's keys live in Redis, and the raw entries copied into them."""

    name_of: dict[str, str]  # seed key -> its Redis key name, to derive the others'
    raw: dict[str, tuple[bytes, int]]  # seed key -> (stored bytes, PTTL ms)


def kind_keys(kind: str, s: Settings) -> list[str]:
    prefix = {"prefix": "bp", "tag": "bt", "class": "bc"}[kind]
    return [f"{prefix}:{i}" for i in range(s.bulk)]


def filler_keys(s: Settings) -> list[str]:
    return [f"f:{i}" for i in range(s.l1_entries - 3 * s.bulk)]


def redis_name(fill: Fill, seed: str, key: str) -> str:
    return fill.name_of[seed].replace(seed, key)


def find_seed(r: redis.Redis, seed: str) -> tuple[str, bytes, int]:
    """The Redis key holding `seed`'s value (the gateway's layout, found, not assumed)."""
    names = [n.decode() for n in r.scan_iter(match=f"*{seed}*", count=1000)]
    names = [n for n in names if not n.endswith(":lease")]
    if len(names) != 1:
        raise RuntimeError(f"expected one Redis key for {seed!r}, found {names}")
    raw = r.get(names[0])
    ttl = r.pttl(names[0])
    if not isinstance(raw, bytes) or not isinstance(ttl, int) or ttl <= 0:
        raise RuntimeError(f"{names[0]}: no value with a TTL")
    return names[0], raw, ttl


def store_copies(r: redis.Redis, fill: Fill, seed: str, keys: Sequence[str]) -> None:
    """Copy the seed's stored entry (an envelope; it does not name its key) to `keys`."""
    raw, ttl = fill.raw[seed]
    for i in range(0, len(keys), 10_000):
        with r.pipeline(transaction=False) as pipe:
            for key in keys[i : i + 10_000]:
                pipe.set(redis_name(fill, seed, key), raw, px=ttl)
            pipe.execute()


def new_seed(r: redis.Redis, client: Client, fill: Fill, seed: str) -> None:
    client.set(seed, b"v" * 50)
    name, raw, ttl = find_seed(r, seed)
    fill.name_of[seed] = name
    fill.raw[seed] = (raw, ttl)


async def store_tagged(addr: str, keys: Sequence[str]) -> None:
    async with AsyncClient(addr, timeout=CALL_TIMEOUT) as client:
        for i in range(0, len(keys), 100):
            await asyncio.gather(
                *(client.set(k, b"v" * 50, tags=[BULK_TAG]) for k in keys[i : i + 100])
            )


async def warm(addrs: Sequence[str], keys: Sequence[str]) -> None:
    """Copy `keys` from Redis into every gateway's L1 (Warmup, 1000 keys a call)."""
    channels, stubs = stubs_for(addrs)
    try:

        async def one(stub: cache_pb2_grpc.CacheServiceAsyncStub) -> None:
            for i in range(0, len(keys), 1000):
                chunk = list(keys[i : i + 1000])
                reply = await stub.Warmup(pb.WarmupRequest(keys=chunk), timeout=CALL_TIMEOUT)
                if reply.loaded != len(chunk):
                    raise RuntimeError(
                        f"Warmup loaded {reply.loaded} of {len(chunk)} keys ({chunk[0]}...)"
                    )

        await asyncio.gather(*(one(st) for st in stubs))
    finally:
        for channel in channels:
            await channel.close(None)


async def l1_state(addrs: Sequence[str], probe_keys: Sequence[str]) -> list[tuple[int, int, bool]]:
    """Per gateway: (L1 entries, max entries, every probe key answered from L1)."""
    channels, stubs = stubs_for(addrs)
    out = []
    try:
        for stub in stubs:
            stats = await stub.Stats(pb.StatsRequest(), timeout=CALL_TIMEOUT)
            all_l1 = True
            for key in probe_keys:
                reply = await stub.Get(pb.GetRequest(key=key), timeout=CALL_TIMEOUT)
                all_l1 &= reply.status == pb.STATUS_HIT and reply.tier == pb.TIER_L1
            out.append((stats.l1.entries, stats.l1.max_entries, all_l1))
    finally:
        for channel in channels:
            await channel.close(None)
    return out


async def invalidate_watched(
    s: Settings, addrs: Sequence[str], kind: str, origin: int
) -> tuple[float, float, int, float, list[float]]:
    """One broad invalidation (none: nothing) while a prober per gateway reads an L1 key.

    Returns (wall clock at the start and `window` s after the call returned, keys
    removed, ms the call took, the slowest Get per gateway in between)."""
    channels, stubs = stubs_for(addrs)
    request = pb.GetRequest(key="f:probe")
    stop = asyncio.Event()
    start_mark = [math.inf]
    slowest = [0.0 for _ in stubs]

    async def prober(i: int) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await stubs[i].Get(request, timeout=CALL_TIMEOUT)
            t1 = time.perf_counter()
            if t1 >= start_mark[0]:  # answered after the Invalidate started
                slowest[i] = max(slowest[i], (t1 - max(t0, start_mark[0])) * 1000)

    tasks = [asyncio.create_task(prober(i)) for i in range(len(stubs))]
    removed, call_ms, until = 0, 0.0, math.inf
    try:
        await asyncio.sleep(0.2)
        wall = time.time()
        start_mark[0] = time.perf_counter()
        if kind != "none":
            arg = {
                "prefix": pb.InvalidateRequest(prefixes=["bp:"]),
                "tag": pb.InvalidateRequest(tags=[BULK_TAG]),
                "class": pb.InvalidateRequest(classes=["bulkclass"]),
            }[kind]
            reply = await stubs[origin].Invalidate(arg, timeout=CALL_TIMEOUT)
            call_ms = (time.perf_counter() - start_mark[0]) * 1000
            removed = reply.removed
        # The other gateways apply the event once it is published, at the call's end.
        await asyncio.sleep(s.window)
        until = time.time()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close(None)
    return wall, until, removed, call_ms, slowest


@dataclass
class BulkRow:
    kind: str
    removed: list[int] = field(default_factory=list)
    call_ms: list[float] = field(default_factory=list)
    busy_ms: list[list[float]] = field(default_factory=list)  # per round, per gateway
    lag_ms: list[list[float]] = field(default_factory=list)
    get_ms: list[list[float]] = field(default_factory=list)


def bulk(
    s: Settings, gateways: Sequence[ServerProcess], redis_url: str
) -> tuple[dict[str, BulkRow], float]:
    addrs = [g.address for g in gateways]
    rows = {kind: BulkRow(kind) for kind in KINDS}
    t0 = time.monotonic()
    with Client(addrs[0], timeout=CALL_TIMEOUT) as client, redis.Redis.from_url(redis_url) as r:
        fill = Fill({}, {})
        new_seed(r, client, fill, "f:seed")
        new_seed(r, client, fill, "bc:seed")
        client.set("f:probe", b"v" * 50)
        filler = filler_keys(s)
        store_copies(r, fill, "f:seed", filler)
        store_copies(r, fill, "f:seed", kind_keys("prefix", s))
        store_copies(r, fill, "bc:seed", kind_keys("class", s))
        asyncio.run(store_tagged(addrs[0], kind_keys("tag", s)))
        every = [*filler, *(k for kind in KINDS[1:] for k in kind_keys(kind, s)), "f:probe"]
        asyncio.run(warm(addrs, every))
        fill_seconds = time.monotonic() - t0
        for r_i in range(s.rounds):
            for n, kind in enumerate(KINDS):
                keys = kind_keys(kind, s) if kind != "none" else []
                probe_keys = ["f:probe", *keys[:1], *keys[-1:]]
                state = asyncio.run(l1_state(addrs, probe_keys))
                if not all(e >= c and ok for e, c, ok in state):  # a late event evicted some
                    time.sleep(0.2)
                    asyncio.run(warm(addrs, [k for kd in KINDS[1:] for k in kind_keys(kd, s)]))
                    state = asyncio.run(l1_state(addrs, probe_keys))
                for g, (entries, cap, all_l1) in zip(gateways, state, strict=True):
                    if entries < cap or not all_l1:
                        raise RuntimeError(
                            f"{g.name}: L1 not full before the {kind} invalidation "
                            f"({entries}/{cap} entries, probe keys from L1: {all_l1})"
                        )
                origin = (r_i + n) % len(addrs)
                wall, until, removed, call_ms, slowest = asyncio.run(
                    invalidate_watched(s, addrs, kind, origin)
                )
                time.sleep(0.05)  # the last lag lines written
                measured = [lags(g, wall, until) for g in gateways]
                row = rows[kind]
                row.removed.append(removed)
                row.call_ms.append(call_ms)
                row.busy_ms.append([b for b, _ in measured])
                row.lag_ms.append([lg for _, lg in measured])
                row.get_ms.append(slowest)
                if kind == "none":
                    continue
                # Gone everywhere; then restored and re-warmed for the next round.
                for addr in addrs:
                    with Client(addr, timeout=CALL_TIMEOUT) as c:
                        if c.get(keys[0]) is not None or c.get(keys[-1]) is not None:
                            raise RuntimeError(f"{kind}: a key survived its invalidation")
                if kind == "prefix":
                    store_copies(r, fill, "f:seed", keys)
                elif kind == "class":  # the class's generation moved on: a new seed
                    new_seed(r, client, fill, "bc:seed")
                    store_copies(r, fill, "bc:seed", keys)
                else:
                    asyncio.run(store_tagged(addrs[0], keys))
                time.sleep(0.1)  # any event of the restoring writes has landed
                asyncio.run(warm(addrs, keys))
    return rows, fill_seconds


def bulk_report(rows: dict[str, BulkRow], s: Settings, fill_seconds: float) -> str:
    n = len(rows["none"].busy_ms[0])
    headers = ["invalidate", "removed", "call ms"]
    headers += [f"gw{i} stall" for i in range(n)] + ["worst gw"]
    headers += [f"gw{i} lag" for i in range(n)] + [f"gw{i} Get" for i in range(n)]
    table = []
    for kind, row in rows.items():

        def med(per_round: list[list[float]], i: int) -> float:
            return median([r[i] for r in per_round])

        worst = median([max(r) for r in row.busy_ms])
        table.append(
            [kind if kind != "none" else "none (baseline)",
             "-" if kind == "none" else fmt_number(median(row.removed)),
             "-" if kind == "none" else f"{median(row.call_ms):.1f}"]
            + [f"{med(row.busy_ms, i):.1f}" for i in range(n)] + [f"{worst:.1f}"]
            + [f"{med(row.lag_ms, i):.1f}" for i in range(n)]
            + [f"{med(row.get_ms, i):.1f}" for i in range(n)]
        )  # fmt: skip
    return (
        f"2. one Invalidate of {fmt_number(s.bulk)} keys while every gateway's L1 is full "
        f"({fmt_number(s.l1_entries)} entries; filled in {fill_seconds:.0f} s), medians of "
        f"{s.rounds} rounds, ms\n"
        + render_table(headers, table, right="l" + "r" * (len(headers) - 1))
        + "\n   removed: as the Invalidate answered (by class: a generation bump, none "
        "deleted). stall: the longest event-loop stall on that gateway from the call's "
        f"start to {s.window:g} s after it returned, as the loop thread's CPU time (the part of "
        "the gateway's own making); lag: the same tick's wall-clock lateness (includes the "
        "machine not running the gateway); Get: the slowest Get of an unrelated L1 key "
        "meanwhile, seen from this process. Per gateway: the median over rounds; worst gw: "
        "the median over rounds of the worst gateway's stall (the aim)."
    )


# -- 3. near cache --------------------------------------------------------------------


def redis_version(url: str) -> str:
    with redis.Redis.from_url(url) as r:
        info = r.info("server")
    return str(info.get("redis_version", "?"))


def csc_client(url: str, version: str) -> tuple[redis.Redis | None, str]:
    """redis-py with client-side caching, or None and why not."""
    parts = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    if parts < (7, 4):
        return None, (
            f"NOT MEASURED: redis-server {version} here; redis-py's client-side caching "
            "(cache_config) needs Redis 7.4+ and RESP3"
        )
    try:
        from redis.cache import CacheConfig

        r = redis.Redis.from_url(url, protocol=3, cache_config=CacheConfig(max_size=10_000))
        r.get("csc:probe")
    except (ImportError, redis.RedisError) as exc:
        return None, f"redis-py client-side caching unavailable: {exc}"
    return r, "on"


@dataclass
class NearReads:
    near: list[float]
    plain: list[float]
    csc: list[float]
    csc_note: str


def rate(read: Callable[[str], object], keys: Sequence[str], seconds: float) -> float:
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for key in keys:
            read(key)
        n += len(keys)
    return n / (time.perf_counter() - started)


def near_reads(s: Settings, addr: str, redis_url: str) -> NearReads:
    keys = [f"hot:{i}" for i in range(100)]
    plain_keys = [f"plain:{k}" for k in keys]
    csc, note = csc_client(redis_url, redis_version(redis_url))
    out = NearReads([], [], [], note)
    with (
        Client(addr, near_cache=NearCache(ttl=60)) as client,
        redis.Redis.from_url(redis_url) as r,
    ):
        for key, plain in zip(keys, plain_keys, strict=True):
            client.set(key, b"v" * 100)
            r.set(plain, b"v" * 100)
        deadline = time.monotonic() + 10
        while client.near_cache is None or not client.near_cache.live:
            if time.monotonic() > deadline:
                raise RuntimeError("the near cache's stream never went live")
            time.sleep(0.01)
        for key in keys:
            client.get(key)  # fill
        if csc is not None:
            for key in plain_keys:
                if csc.get(key) != b"v" * 100:
                    raise RuntimeError("redis-py with client-side caching: wrong value")
        try:
            for _ in range(s.read_rounds):
                out.near.append(rate(client.get, keys, s.read_seconds))
                out.plain.append(rate(r.get, plain_keys, s.read_seconds))
                if csc is not None:
                    out.csc.append(rate(csc.get, plain_keys, s.read_seconds))
        finally:
            if csc is not None:
                csc.close()
        assert client.near_cache is not None
        if client.near_cache.hits < len(keys) * s.read_rounds:
            raise RuntimeError("the near cache did not serve the reads")
    return out


def near_report(n: NearReads) -> tuple[str, dict[str, float]]:
    ratio_plain = median([a / b for a, b in zip(n.near, n.plain, strict=True)])
    lines = [
        f"3. hot reads of 100 keys from one Python thread, {len(n.near)} interleaved rounds:",
        f"   cachegw Client + NearCache  {fmt_number(median(n.near))}/s",
        f"   redis-py GET                {fmt_number(median(n.plain))}/s"
        f"  (near cache {ratio_plain:.1f}x)",
    ]
    measured = {"near cache / redis-py GET": ratio_plain}
    if n.csc:
        ratio_csc = median([a / b for a, b in zip(n.near, n.csc, strict=True)])
        lines.append(
            f"   redis-py client-side cache  {fmt_number(median(n.csc))}/s"
            f"  (near cache {ratio_csc:.2f}x)"
        )
        measured["near cache / redis-py CSC"] = ratio_csc
    else:
        lines.append(f"   redis-py client-side cache  {n.csc_note}")
    return "\n".join(lines), measured


# -- main -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cachegw-invalidation-"))
    t0 = time.monotonic()
    try:
        with sigterm_as_interrupt(), ExitStack() as stack:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            store = stack.enter_context(ManagedRedis())
            gateways = start_gateways(
                stack, 3, store.url, CONFIG.format(entries=s.l1_entries), work
            )
            addrs = [g.address for g in gateways]
            load = subprocess.Popen(
                [sys.executable, "-c", LOAD, str(s.load_rate), *addrs],
                stdout=subprocess.DEVNULL,
            )
            stack.callback(load.wait, 10)
            stack.callback(load.kill)
            time.sleep(1.5)
            if load.poll() is not None:
                raise RuntimeError("the load process exited")
            prop = asyncio.run(propagation(s, addrs))
            load.kill()
            load.wait(10)
            bulk_rows, fill_seconds = bulk(s, gateways, store.url)
            reads = near_reads(s, addrs[1], store.url)
            for gw in gateways:
                if not gw.running:
                    raise RuntimeError(f"{gw.name} died during the run")
            version = redis_version(store.url)
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    print(
        f"invalidation benchmark: 3 gateways, 1 managed redis-server {version}, "
        f"{os.cpu_count()} CPUs shared by everything\n"
    )
    print(propagation_report(prop, s))
    print()
    print(bulk_report(bulk_rows, s, fill_seconds))
    print()
    near_text, measured = near_report(reads)
    print(near_text)
    measured["propagation p99"] = percentile(sorted(prop.all_ms), 99)
    for kind in ("prefix", "tag", "class"):
        measured[f"stall, {kind}"] = median([max(r) for r in bulk_rows[kind].busy_ms])
    notes = {} if reads.csc else {"near cache / redis-py CSC": reads.csc_note}
    met = check_aims(AIMS, measured, notes)
    print(f"total wall time {time.monotonic() - t0:.0f} s")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
