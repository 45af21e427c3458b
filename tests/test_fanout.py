"""Invalidation fan-out across three real gateway processes and two near-cache clients.

The staleness bound asserted here, PROPAGATION, is deliberately loose for a loaded CI
machine; benchmarks/bench_invalidation.py measures the real propagation latency."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import redis

from cachegw import AsyncClient, EventKind, NearCache, Tier
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayCluster, eventually

PROPAGATION = 0.25  # seconds from an Invalidate's answer to every copy being gone

CLASSES = """
[[classes]]
name = "inventory"
patterns = ["inv:*"]
ttl_seconds = 60
l1_ttl_seconds = 30

[default_class]
ttl_seconds = 60
"""


async def test_an_invalidation_reaches_every_gateway_and_near_cache(
    gateway_cluster: GatewayCluster,
) -> None:
    gateways = gateway_cluster(3, CLASSES)
    clients = [AsyncClient(gw.address) for gw in gateways]
    nears = [NearCache(ttl=30), NearCache(ttl=30)]
    subscribers = [AsyncClient(gateways[i].address, near_cache=nears[i]) for i in range(2)]
    try:
        await eventually(lambda: all(n.live for n in nears))
        await clients[0].set("inv:sku-1", b"5 in stock", tags=["sku-1"])
        for client in clients:  # twice: the second read is answered from each L1
            await client.lookup("inv:sku-1")
            assert (await client.lookup("inv:sku-1")).tier is Tier.L1
        for sub, near in zip(subscribers, nears, strict=True):
            assert await sub.get("inv:sku-1") == b"5 in stock"
            assert near.get("inv:sku-1") == b"5 in stock"

        for request in ({"keys": ["inv:sku-1"]}, {"tags": ["sku-1"]}, {"prefixes": ["inv:"]}):
            await clients[0].set("inv:sku-1", b"5 in stock", tags=["sku-1"])
            for client in (*clients, *subscribers):
                await client.get("inv:sku-1")
            await asyncio.sleep(0.05)
            await clients[2].invalidate(**request)  # type: ignore[arg-type]
            await asyncio.sleep(PROPAGATION)
            for client in clients:
                assert (await client.lookup("inv:sku-1")).value is None, request
            for near in nears:
                assert near.get("inv:sku-1") is None, request
    finally:
        for client in (*clients, *subscribers):
            await client.close()


async def test_killed_pubsub_flushes_every_l1_and_resets_subscribers(
    gateway_cluster: GatewayCluster, redis_server: ManagedRedis
) -> None:
    gateways = gateway_cluster(3)
    clients = [AsyncClient(gw.address) for gw in gateways]
    near = NearCache(ttl=30)
    subscriber = AsyncClient(gateways[1].address, near_cache=near)
    streams = [client.subscribe() for client in clients]  # one per gateway
    firsts = [asyncio.ensure_future(anext(stream)) for stream in streams]
    try:
        await eventually(lambda: near.live)
        await asyncio.sleep(0.2)  # the plain streams register too
        await clients[0].set("k", b"v")
        for client in clients:
            await client.lookup("k")
            assert (await client.lookup("k")).tier is Tier.L1
        assert await subscriber.get("k") == b"v" and near.get("k") == b"v"
        resets = near.resets
        with redis.Redis.from_url(redis_server.url) as admin:
            assert admin.client_kill_filter(_type="pubsub") >= 3
        # Every gateway tells its streams RESET: it flushed its L1 at that moment.
        for first in firsts:
            assert (await asyncio.wait_for(first, 5)).kind is EventKind.RESET
        await eventually(lambda: near.resets > resets)
        assert near.get("k") is None
        for client in clients:
            assert (await client.lookup("k")).tier is Tier.L2
        # Once its subscription is back (within the resubscribe backoff), L1 works again.
        await asyncio.sleep(0.5)
        for client in clients:
            await client.lookup("k")
            assert (await client.lookup("k")).tier is Tier.L1
    finally:
        for first in firsts:
            first.cancel()
        for stream in streams:
            await stream.aclose()
        for client in (*clients, subscriber):
            await client.close()


async def test_a_subscriber_resumes_exactly_where_it_left_off(
    gateway_cluster: GatewayCluster,
) -> None:
    gateways = gateway_cluster(3)
    writer = AsyncClient(gateways[0].address)
    reader_a, reader_b = AsyncClient(gateways[1].address), AsyncClient(gateways[2].address)
    try:
        stream = reader_a.subscribe()
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)
        seen = await writer.invalidate(["seen"])
        assert (await asyncio.wait_for(pending, 5)).id == seen.event_id
        await stream.aclose()  # the subscriber goes away ...
        missed = [(await writer.invalidate([f"missed{i}"])).event_id for i in range(20)]
        # ... and comes back through another gateway.
        resumed = reader_b.subscribe(since=seen.event_id)
        replay = [await asyncio.wait_for(anext(resumed), 5) for _ in range(20)]
        assert [e.id for e in replay] == missed
        assert [e.keys for e in replay] == [(f"missed{i}",) for i in range(20)]
        live = await writer.invalidate(["live"])
        assert (await asyncio.wait_for(anext(resumed), 5)).id == live.event_id
        await resumed.aclose()
    finally:
        for client in (writer, reader_a, reader_b):
            await client.close()


@dataclass
class History:
    """Every change of every key, to judge reads against."""

    sets: dict[bytes, tuple[float, float]] = field(default_factory=dict)  # value -> start, end
    changes: dict[str, list[tuple[float, float, bytes | None]]] = field(default_factory=dict)

    def change(self, key: str, start: float, end: float, value: bytes | None) -> None:
        self.changes.setdefault(key, []).append((start, end, value))
        if value is not None:
            self.sets[value] = (start, end)

    def stale(self, key: str, value: bytes, read_start: float) -> bool:
        """A change that began after `value` was written and ended `PROPAGATION` before
        the read began must have hidden `value`."""
        # A value whose Set has not answered yet is as new as it gets.
        _, written = self.sets.get(value, (0.0, float("inf")))
        return any(
            start > written and end + PROPAGATION < read_start and new != value
            for start, end, new in self.changes.get(key, ())
        )


async def test_randomized_reads_writes_and_invalidations_never_read_stale(
    gateway_cluster: GatewayCluster,
) -> None:
    gateways = gateway_cluster(3, CLASSES)
    clients = [AsyncClient(gw.address) for gw in gateways]
    near = NearCache(ttl=30)
    near_client = AsyncClient(gateways[0].address, near_cache=near)
    readers = [*clients, near_client]
    keys = [f"inv:{i}" for i in range(8)] + [f"k{i}" for i in range(8)]
    history = History()
    stale_reads: list[tuple[str, bytes]] = []
    ops = {"read": 0, "set": 0, "invalidate": 0, "delete": 0, "broad": 0}
    rng = random.Random(7)
    counter = 0

    async def worker(budget: int) -> None:
        nonlocal counter
        for _ in range(budget):
            key = rng.choice(keys)
            roll = rng.random()
            start = time.monotonic()
            if roll < 0.6:
                ops["read"] += 1
                value = await rng.choice(readers).get(key)
                if value is not None and history.stale(key, value, start):
                    stale_reads.append((key, value))
            elif roll < 0.85:
                ops["set"] += 1
                counter += 1
                value = f"{key}={counter}".encode()
                await rng.choice(clients).set(key, value, tags=[key[:3]])
                history.change(key, start, time.monotonic(), value)
            elif roll < 0.93:
                ops["invalidate"] += 1
                await rng.choice(clients).invalidate([key])
                history.change(key, start, time.monotonic(), None)
            elif roll < 0.98:
                ops["delete"] += 1
                await rng.choice(clients).delete(key)
                history.change(key, start, time.monotonic(), None)
            else:
                ops["broad"] += 1
                how = rng.choice(["prefixes", "tags", "classes"])
                arg = {"prefixes": ["inv:"], "tags": ["inv"], "classes": ["inventory"]}[how]
                await rng.choice(clients).invalidate(**{how: arg})  # type: ignore[arg-type]
                end = time.monotonic()
                for k in keys:
                    if k.startswith("inv:"):
                        history.change(k, start, end, None)

    try:
        await eventually(lambda: near.live)
        await asyncio.wait_for(asyncio.gather(*(worker(625) for _ in range(16))), 240)
    finally:
        for client in readers:
            await client.close()
    assert sum(ops.values()) == 10_000
    assert min(ops.values()) > 0, ops
    assert near.hits > 0  # the near cache did serve reads
    assert stale_reads == [], stale_reads[:5]
