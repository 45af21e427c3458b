"""Tenant quotas (quotas.py) on a real Redis: one call rate and one stream count shared by
several gateways (here: several quota objects, each with its own store, as each gateway
has), Redis' clock and scripts deciding."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from cachegw_gateway.config import RedisConfig
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.quotas import RateQuota, StreamQuota
from cachegw_gateway.ratelimit import RateLimiter


@pytest.fixture
async def stores(redis_server: ManagedRedis) -> AsyncIterator[list[RedisStore]]:
    made = [RedisStore.from_config(RedisConfig(), redis_server.url) for _ in range(3)]
    yield made
    for s in made:
        await s.close()


async def test_three_gateways_share_one_rate(stores: list[RedisStore]) -> None:
    rate, burst = 100.0, 50
    quotas = [RateQuota(RateLimiter(s), "tenant-rate:acme", rate, burst) for s in stores]
    allowed = refused = 0
    started = time.monotonic()
    for i in range(600):  # bounded: a burst of calls spread over the three gateways
        wait_ms = await quotas[i % 3].take()
        if wait_ms:
            refused += 1
            assert 1 <= wait_ms <= 1000
        else:
            allowed += 1
        if i % 50 == 49:
            await asyncio.sleep(0.01)
    elapsed = time.monotonic() - started
    # Never more than the bucket handed out: the burst plus the rate over the run.
    assert allowed <= burst + rate * elapsed + 1, (allowed, elapsed)
    # At least the burst, less what the other gateways hold unspent (a chunk each).
    chunk = 5  # ceil(100/s * 50 ms)
    assert allowed >= burst - 3 * chunk, allowed
    assert refused > 0
    assert sum(q.refused for q in quotas) == refused


async def test_a_refused_gateway_backs_off_without_asking_redis(stores: list[RedisStore]) -> None:
    quota = RateQuota(RateLimiter(stores[0]), "tenant-rate:slow", 1.0, 1)
    assert await quota.take() == 0
    first = await quota.take()
    assert 1 <= first <= 1000
    # Within the wait it is refused locally (the count shows it), then allowed again.
    assert await quota.take() > 0
    assert quota.refused == 2
    await asyncio.sleep(first / 1000 + 0.05)
    assert await quota.take() == 0


async def test_redis_down_lets_calls_through(redis_server: ManagedRedis) -> None:
    store = RedisStore.from_config(RedisConfig(), redis_server.url)
    quota = RateQuota(RateLimiter(store), "tenant-rate:x", 1.0, 1)
    streams = StreamQuota(store, "cg:tenant-streams:x", 1)
    redis_server.stop()
    try:
        assert await quota.take() == 0
        assert await quota.take() == 0
        assert quota.unchecked == 2
        assert await streams.open("a") and await streams.open("b")
        assert streams.unchecked == 2
    finally:
        await store.close()


async def test_streams_counted_across_gateways(stores: list[RedisStore]) -> None:
    key = "cg:tenant-streams:acme"
    q = [StreamQuota(s, key, 2, lapse_seconds=1.0) for s in stores]
    assert await q[0].open("gw0/a")
    assert await q[1].open("gw1/b")
    assert not await q[2].open("gw2/c")  # two open in all
    assert await q[0].open("gw0/a")  # the same stream again is not a new one
    await q[1].close("gw1/b")
    assert await q[2].open("gw2/c")
    # A gateway that stops renewing (it died) frees its places once they lapse; the
    # others renew theirs and keep them.
    for _ in range(3):  # bounded: 1.5 s, past the 1 s lapse
        await asyncio.sleep(0.5)
        await q[2].renew()
    assert await q[1].open("gw1/d")  # gw0/a lapsed
    assert not await q[1].open("gw1/e")  # gw2/c was renewed: still counted
