"""A partition between one gateway and Redis: that gateway degrades and recovers, the
others do not notice.

Three `cachegw serve` processes share one Redis; gw2 reaches it through a TcpProxy.
`blackhole` is a silent partition (callers learn of it only by timeouts), `reset` a loud
one (connections reset, new ones refused). While it lasts gw2 answers every call by its
deadline with a status of docs/errors.md, serves the keys it holds in L1, and says Redis
is down in Stats; gw0 and gw1 serve a steady load without one failure and invalidate
keys gw2 holds. When it heals gw2 serves fresh data again: its L1 was flushed when its
subscription dropped, so no invalidation it missed can surface.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.bus import DEAD_AFTER
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayProcess
from tests.tcpproxy import Mode, TcpProxy

# Short Redis timeouts so that a silent partition shows within a second or two; the
# pub/sub connection's own timeout (5 s) and its ping (bus.DEAD_AFTER = 6 s) are fixed.
CONFIG = """
[redis]
socket_timeout = 0.5
connect_timeout = 0.5

[default_class]
l1_ttl_seconds = 60.0
"""
DEADLINE = 1.0  # each call to the partitioned gateway
SLACK = 1.0  # generous: the machine is small and shared
DEGRADED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
HOT = [f"hot:{i}" for i in range(10)]  # held in every gateway's L1 before the partition
CHANGED = HOT[:4]  # rewritten by gw0 during the partition
DELETED = HOT[4:6]  # deleted by gw0 during the partition
UNTOUCHED = HOT[6:]


@dataclass
class Gw:
    name: str
    channel: grpc.aio.Channel
    stub: cache_pb2_grpc.CacheServiceAsyncStub


@dataclass
class Load:
    """A steady Set/Get load on the gateways that keep their Redis."""

    calls: int = 0
    failures: list[str] = field(default_factory=list)


@pytest.fixture
def proxy(redis_server: ManagedRedis) -> Iterator[TcpProxy]:
    with TcpProxy(redis_server.host, redis_server.port) as p:
        yield p


@pytest.fixture
async def gateways(
    tmp_path: Path,
    redis_server: ManagedRedis,
    proxy: TcpProxy,
    gateway_process: Callable[..., GatewayProcess],
) -> AsyncIterator[list[Gw]]:
    """gw0 and gw1 on Redis directly, gw2 through the proxy."""
    config = tmp_path / "partition.toml"
    config.write_text(CONFIG)
    urls = [redis_server.url, redis_server.url, proxy.url]
    # One after another: the fixture names each log by how many it started.
    procs = [
        gateway_process(
            *("--config", str(config), "--redis-url", url),
            *("--gateway-id", f"gw{i}", "--log-level", "WARNING"),
        )
        for i, url in enumerate(urls)
    ]
    gws = []
    for i, proc in enumerate(procs):
        channel = grpc.aio.insecure_channel(proc.address)
        gws.append(Gw(f"gw{i}", channel, cache_pb2_grpc.CacheServiceStub(channel)))
    yield gws
    for gw in gws:
        await gw.channel.close(None)


async def _steady_load(gws: list[Gw], load: Load, stop: asyncio.Event) -> None:
    """Set then Get a key on each gateway in turn until `stop` (at most 10,000 rounds)."""
    for n in range(10_000):
        if stop.is_set():
            return
        gw = gws[n % len(gws)]
        key, value = f"steady:{n % 50}", str(n).encode()
        try:
            await gw.stub.Set(pb.SetRequest(key=key, value=value), timeout=2.0)
            got = await gw.stub.Get(pb.GetRequest(key=key), timeout=2.0)
            if got.value != value:
                load.failures.append(f"{gw.name} read {got.value!r} after writing {value!r}")
        except grpc.aio.AioRpcError as exc:
            load.failures.append(f"{gw.name}: {exc.code().name} {exc.details()}")
        load.calls += 2
        await asyncio.sleep(0.005)


async def _degraded(call: object) -> tuple[grpc.StatusCode, float]:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code(), time.monotonic() - started


async def _stats(gw: Gw) -> pb.StatsResponse:
    reply: pb.StatsResponse = await gw.stub.Stats(pb.StatsRequest(), timeout=DEADLINE)
    return reply


async def _poll(check: Callable[[], Awaitable[bool]], within: float) -> None:
    """eventually() for an async check (bounded, 50 ms apart)."""
    deadline = time.monotonic() + within
    while True:
        try:
            if await check():
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {within}s")
        await asyncio.sleep(0.05)


async def _in_l1(gw: Gw, key: str) -> bool:
    got = await gw.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
    return bool(got.status == pb.STATUS_HIT and got.tier == pb.TIER_L1)


@pytest.mark.parametrize("mode", ["blackhole", "reset"])
async def test_one_gateway_partitioned_from_redis(
    gateways: list[Gw], proxy: TcpProxy, mode: Mode
) -> None:
    gw0, gw1, gw2 = gateways
    for key in HOT:
        await gw0.stub.Set(pb.SetRequest(key=key, value=b"before"), timeout=DEADLINE)
    for gw in gateways:
        for key in HOT:
            # The first Get fills L1 once the gateway's subscription is live.
            await _poll(partial(_in_l1, gw, key), within=10)
    flushes_before = (await _stats(gw2)).l1_flushes

    load, stop = Load(), asyncio.Event()
    steady = asyncio.create_task(_steady_load([gw0, gw1], load, stop))
    try:
        proxy.set_mode(mode)

        # Every call that needs Redis ends by its deadline with a documented status; a
        # reset is refused at once, a blackhole lasts until the Redis timeouts.
        calls = {
            "Get": gw2.stub.Get(pb.GetRequest(key="absent"), timeout=DEADLINE),
            "GetMany": gw2.stub.GetMany(pb.GetManyRequest(keys=["a", "b"]), timeout=DEADLINE),
            "Set": gw2.stub.Set(pb.SetRequest(key="new", value=b"v"), timeout=DEADLINE),
            "Delete": gw2.stub.Delete(pb.DeleteRequest(keys=["new"]), timeout=DEADLINE),
            # By key: a broad one (prefix, tag, class) would also drop the copies set
            # aside for the outage, which the check below relies on.
            "Invalidate": gw2.stub.Invalidate(pb.InvalidateRequest(keys=["p:1"]), timeout=DEADLINE),
        }
        for name, call in calls.items():
            code, took = await _degraded(call)
            assert code in DEGRADED, f"{name} answered {code}"
            assert took < DEADLINE + SLACK, f"{name} took {took:.2f}s"
            if mode == "reset":
                assert code == grpc.StatusCode.UNAVAILABLE, f"{name} answered {code}"

        # Meanwhile gw0 changes keys gw2 holds; gw2 misses those events.
        for key in CHANGED:
            await gw0.stub.Set(pb.SetRequest(key=key, value=b"after"), timeout=DEADLINE)
        await gw0.stub.Delete(pb.DeleteRequest(keys=DELETED), timeout=DEADLINE)

        # gw2 learns that Redis is down and that its subscription dropped (at once for
        # a reset; within bus.DEAD_AFTER for a blackhole); it flushes L1 then.
        async def noticed() -> bool:
            stats = await _stats(gw2)
            return not stats.redis.up and stats.l1_flushes > flushes_before

        await _poll(noticed, within=15)
        # Health stays SERVING: it still answers what it holds and fails the rest by
        # the deadline; Redis being down is for Stats and metrics to say.
        health = await health_pb2_grpc.HealthStub(gw2.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=DEADLINE
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        # The keys it held are still served from the copies set aside at the flush.
        for key in UNTOUCHED:
            started = time.monotonic()
            got = await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE + 2)
            assert (got.status, got.tier, got.value) == (pb.STATUS_HIT, pb.TIER_L1, b"before")
            assert time.monotonic() - started < DEADLINE + 2 + SLACK
        many = await gw2.stub.GetMany(pb.GetManyRequest(keys=UNTOUCHED), timeout=DEADLINE + 2)
        assert [r.tier for r in many.results] == [pb.TIER_L1] * len(UNTOUCHED)
        assert load.calls > 0 and not load.failures, load.failures[:5]

        proxy.set_mode("pass")

        # gw2 recovers: writes go through and its subscription is live again.
        async def recovered() -> bool:
            await gw2.stub.Set(pb.SetRequest(key="healed", value=b"v"), timeout=DEADLINE)
            stats = await _stats(gw2)
            return stats.redis.up and stats.redis.reconnects >= 1

        await _poll(recovered, within=20)

        # No read older than the bound: what gw0 changed during the partition is seen.
        for key in CHANGED:
            assert (await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)).value == (
                b"after"
            )
        for key in DELETED:
            got = await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
            assert got.status == pb.STATUS_MISS
        for key in UNTOUCHED:
            assert (await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)).value == (
                b"before"
            )

        # Events reach gw2 again: a copy it holds is evicted when gw1 rewrites the key.
        key = CHANGED[0]
        await _poll(partial(_in_l1, gw2, key), within=5)
        await gw1.stub.Set(pb.SetRequest(key=key, value=b"again"), timeout=DEADLINE)

        async def fresh() -> bool:
            got = await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
            return got.value == b"again"

        await _poll(fresh, within=2)
    finally:
        stop.set()
        await asyncio.wait_for(steady, timeout=10)
    # gw0 and gw1 never noticed.
    assert load.calls > 0 and not load.failures, load.failures[:5]
    for gw in (gw0, gw1):
        stats = await _stats(gw)
        assert stats.redis.up and stats.redis.reconnects == 0


async def test_short_silent_partition_heals_before_the_gateway_notices(
    gateways: list[Gw], proxy: TcpProxy
) -> None:
    """Healed before the bus declared its connection dead: gw2 may serve a copy gw0
    invalidated meanwhile, but only until the bus notices (bus.DEAD_AFTER after the last
    thing it heard), well inside the class's l1_ttl_seconds; then it flushes and reads
    fresh data."""
    gw0, _, gw2 = gateways
    key = HOT[0]
    await gw0.stub.Set(pb.SetRequest(key=key, value=b"before"), timeout=DEADLINE)
    await _poll(partial(_in_l1, gw2, key), within=10)
    proxy.set_mode("blackhole")
    await gw0.stub.Set(pb.SetRequest(key=key, value=b"after"), timeout=DEADLINE)
    await asyncio.sleep(1.0)  # shorter than the bus's ping (2 s): nothing noticed yet
    proxy.set_mode("pass")
    healed = time.monotonic()

    async def fresh() -> bool:
        got = await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
        assert got.value in (b"before", b"after"), got.value
        return got.value == b"after"

    await _poll(fresh, within=DEAD_AFTER + 2 * SLACK)
    assert time.monotonic() - healed < 60.0  # the class's l1_ttl_seconds

    # The connection it trusted was declared dead: L1 flushed, subscription back.
    async def resubscribed() -> bool:
        stats = await _stats(gw2)
        return stats.redis.up and stats.redis.reconnects >= 1 and stats.l1_flushes >= 1

    await _poll(resubscribed, within=10)
