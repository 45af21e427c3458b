"""Allow (ratelimit.py) on real Redis: GCRA over three gateway processes admits what
GCRA allows for the time that passed on Redis's clock, costs, retry-after and
reset-after, the sliding window, class limits, and bad input refused before Redis.

Every loop is bounded in calls and in time; counts are compared with bounds computed
from Redis's own clock (`TIME`), the clock the scripts use.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from tests.conftest import GatewayCluster, GatewayFactory, RunningGateway

GCRA = pb.RATE_ALGORITHM_GCRA
SLIDING = pb.RATE_ALGORITHM_SLIDING_WINDOW
MAX_CALLS = 50_000  # per test: the loops below stop at their deadline long before


def redis_now(client: redis.Redis) -> float:
    """Seconds on Redis's clock (the scripts' clock)."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def limit(rate: int, period_ms: int, burst: int = 0, algorithm: Any = GCRA) -> pb.RateLimit:
    return pb.RateLimit(rate=rate, period_ms=period_ms, burst=burst, algorithm=algorithm)


async def allow(gw: RunningGateway, key: str, lim: pb.RateLimit | None, cost: int = 0) -> Any:
    request = pb.AllowRequest(key=key, cost=cost)
    if lim is not None:
        request.limit.CopyFrom(lim)
    return await gw.stub.Allow(request, timeout=5)


async def test_gcra_over_three_gateways_admits_what_gcra_allows(
    gateway_cluster: GatewayCluster, redis_client: redis.Redis
) -> None:
    rate, burst, seconds = 50, 10, 2.0
    lim = limit(rate, 1000, burst)
    gateways = gateway_cluster(3)
    channels = [grpc.aio.insecure_channel(g.address) for g in gateways]
    try:
        stubs: list[cache_pb2_grpc.CacheServiceAsyncStub] = [
            cache_pb2_grpc.CacheServiceStub(c) for c in channels
        ]
        request = pb.AllowRequest(key="rate:api:tenant-1", limit=lim)
        for stub in stubs:  # connections up before the clock starts
            await stub.Allow(pb.AllowRequest(key="rate:warm", limit=lim), timeout=5)
        allowed = calls = 0
        before = redis_now(redis_client)
        stop_at = time.monotonic() + seconds

        async def caller(stub: cache_pb2_grpc.CacheServiceAsyncStub) -> None:
            nonlocal allowed, calls
            while time.monotonic() < stop_at and calls < MAX_CALLS:
                calls += 1
                reply = await stub.Allow(request, timeout=5)
                allowed += reply.allowed

        await asyncio.gather(*(caller(stubs[i % 3]) for i in range(12)))
        after = redis_now(redis_client)
    finally:
        for c in channels:
            await c.close(None)
    # GCRA admits `burst` at once, then one per period/rate: over the elapsed time on
    # Redis's clock, no more than this.
    bound = burst + math.floor((after - before) * rate)
    assert calls > 3 * bound  # callers kept asking all along (most were refused)
    assert allowed <= bound + 1, (allowed, bound, after - before)
    assert allowed >= bound - 2, (allowed, bound, after - before)


async def test_cost_takes_that_many(gateway: RunningGateway) -> None:
    lim = limit(10, 1000, 10)  # one every 100 ms, 10 at once
    first = await allow(gateway, "k", lim, cost=4)
    assert (first.allowed, first.remaining) == (True, 6)
    second = await allow(gateway, "k", lim, cost=4)
    assert (second.allowed, second.remaining) == (True, 2)
    refused = await allow(gateway, "k", lim, cost=4)
    assert (refused.allowed, refused.remaining) == (False, 2)
    # Two more tokens come back within 200 ms; the full burst within 800 ms.
    assert 100 < refused.retry_after_ms <= 200
    assert 700 < refused.reset_after_ms <= 800
    fits = await allow(gateway, "k", lim, cost=2)
    assert (fits.allowed, fits.remaining, fits.retry_after_ms) == (True, 0, 0)


async def test_after_waiting_retry_after_the_same_request_is_allowed(
    gateway: RunningGateway,
) -> None:
    lim = limit(5, 1000, 2)  # one every 200 ms, 2 at once
    for _ in range(2):
        assert (await allow(gateway, "k", lim)).allowed
    refused = await allow(gateway, "k", lim)
    assert not refused.allowed
    assert 0 < refused.retry_after_ms <= 200
    assert refused.retry_after_ms < refused.reset_after_ms <= 400
    await asyncio.sleep(refused.retry_after_ms / 1000)
    again = await allow(gateway, "k", lim)
    assert again.allowed
    assert again.retry_after_ms == 0
    # Back to full 2 periods/rate after the last admission at most.
    assert 0 < again.reset_after_ms <= 400


async def test_reset_after_is_when_the_burst_is_back(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    lim = limit(20, 1000, 4)  # one every 50 ms
    last = None
    for _ in range(4):
        last = await allow(gateway, "k", lim)
        assert last.allowed
    assert last is not None and last.remaining == 0
    await asyncio.sleep(last.reset_after_ms / 1000)
    for _ in range(4):  # the whole burst again
        assert (await allow(gateway, "k", lim)).allowed
    # The state expires with the TAT: nothing outlives it in Redis.
    pttl = redis_client.pttl("cg:{k}:rl")
    assert 0 < pttl <= 200


async def test_sliding_window_admits_at_most_rate_per_window(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gws = [await gateway_factory() for _ in range(3)]
    rate, period_ms = 20, 500
    lim = limit(rate, period_ms, algorithm=SLIDING)
    # A fresh key admits `rate` and then nothing more in the same window.
    first = [(await allow(gws[i % 3], "s", lim)).allowed for i in range(rate + 5)]
    # (unless a window boundary passed meanwhile: then the count only fades)
    assert sum(first) >= rate and first[:rate] == [True] * rate
    allowed = calls = 0
    before = redis_now(redis_client)
    stop_at = time.monotonic() + 1.6

    async def caller(gw: RunningGateway) -> None:
        nonlocal allowed, calls
        while time.monotonic() < stop_at and calls < MAX_CALLS:
            calls += 1
            reply = await allow(gw, "t", lim)  # awaited before `allowed` is read
            allowed += reply.allowed

    await asyncio.gather(*(caller(gws[i % 3]) for i in range(6)))
    after = redis_now(redis_client)
    windows = math.floor(after * 1000 / period_ms) - math.floor(before * 1000 / period_ms) + 1
    # Each fixed window admits at most `rate` (its count is part of every estimate),
    # and the estimate's fading share lets through no more than a full window's worth.
    assert allowed <= rate * windows, (allowed, windows)
    assert allowed >= rate * (windows - 2), (allowed, windows, calls)
    state = redis_client.hgetall("cg:{t}:rl")
    assert int(state[b"c"]) <= rate and int(state[b"p"]) <= rate
    assert 0 < redis_client.pttl("cg:{t}:rl") <= 2 * period_ms


async def test_sliding_window_retry_after(gateway: RunningGateway) -> None:
    lim = limit(3, 400, algorithm=SLIDING)
    replies = [await allow(gateway, "k", lim) for _ in range(4)]
    assert [r.allowed for r in replies[:3]] == [True, True, True]
    refused = replies[3]
    if refused.allowed:  # a window boundary passed in between: nothing to learn
        pytest.skip("a window boundary passed during the burst")
    assert refused.remaining == 0
    assert 0 < refused.retry_after_ms <= 800
    assert refused.retry_after_ms <= refused.reset_after_ms <= 800
    await asyncio.sleep(refused.retry_after_ms / 1000)
    assert (await allow(gateway, "k", lim)).allowed


CLASSES = """
[[classes]]
name = "ratelimit"
patterns = ["rate:*"]
l1 = false
rate_limit = { rate = 3, period_seconds = 60, burst = 2 }

[[classes]]
name = "window"
patterns = ["win:*"]
[classes.rate_limit]
rate = 2
period_seconds = 60
algorithm = "sliding_window"
"""


async def test_a_class_limit_applies_when_the_request_names_none(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(CLASSES)
    replies = [await allow(gw, "rate:login:alice", None) for _ in range(3)]
    assert [r.allowed for r in replies] == [True, True, False]
    assert replies[0].key_class == "ratelimit"
    assert replies[0].limit == limit(3, 60_000, 2)
    assert 19_000 < replies[2].retry_after_ms <= 20_000  # 60 s / 3
    # A limit in the request wins over the class's.
    own = await allow(gw, "rate:login:bob", limit(100, 1000))
    assert own.allowed and own.limit == limit(100, 1000, 100)
    assert own.key_class == "ratelimit"
    window = [await allow(gw, "win:x", None) for _ in range(3)]
    assert [r.allowed for r in window] == [True, True, False]
    assert window[0].limit == limit(2, 60_000, 0, SLIDING)
    assert window[0].key_class == "window"


async def test_delete_resets_the_limit(gateway: RunningGateway) -> None:
    lim = limit(1, 60_000)
    assert (await allow(gateway, "k", lim)).allowed
    assert not (await allow(gateway, "k", lim)).allowed
    await gateway.stub.Delete(pb.DeleteRequest(keys=["k"]), timeout=5)
    assert (await allow(gateway, "k", lim)).allowed


BAD = [
    ("rate:x", None, 0, "no rate limit"),  # the default class names no limit
    ("k", limit(0, 1000), 0, "limit.rate"),
    ("k", limit(10, 0), 0, "limit.period_ms"),
    ("k", limit(10, 86_400_001), 0, "limit.period_ms"),
    ("k", limit(1_000_000_001, 86_400_000), 0, "limit.rate"),
    ("k", limit(2000, 1), 0, "one request per microsecond"),
    ("k", limit(10, 1000, 5), 6, "above the burst"),
    ("k", limit(10, 1000), 11, "above the burst"),  # burst 0 = rate
    ("k", limit(10, 1000, 0, SLIDING), 11, "above the rate"),
    ("k", limit(1, 86_400_000, 1_000_000), 0, "within 30 days"),
    ("k", limit(10, 1000, 0, 7), 0, "algorithm"),
    ("", limit(10, 1000), 0, "key"),
]


@pytest.mark.parametrize(("key", "lim", "cost", "says"), BAD)
async def test_bad_input_is_refused_before_redis(
    gateway: RunningGateway,
    redis_client: redis.Redis,
    key: str,
    lim: pb.RateLimit | None,
    cost: int,
    says: str,
) -> None:
    redis_client.config_resetstat()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await allow(gateway, key, lim, cost)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (info.value.details() or "")
    stats = redis_client.info("commandstats")
    assert "cmdstat_evalsha" not in stats and "cmdstat_eval" not in stats
