"""Refresh-ahead: hot keys of a read-through class are reloaded before they expire, by one
gateway at a time, within the class's rate across every gateway, and a reload never
replaces a newer value. The origin is tests/origin/flaky_origin.py, its own process."""

from __future__ import annotations

import math
import time

import grpc
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayCluster, GatewayFactory, RunningGateway
from tests.origin.flaky import Flaky, class_stats, flaky, until

__all__ = ["flaky"]  # the fixture


def toml(origin: str, *, rate: float = 50, slow_lease: bool = False) -> str:
    # TTL 30 s, reloaded once 0.5 s of it has passed: refreshes come every ~0.5 s while
    # the key is hot, long before anything expires.
    lease = "lease_timeout_seconds = 5\nmax_wait_seconds = 6" if slow_lease else ""
    return f"""
[origin]
timeout_seconds = 3.0
[origin.breaker]
enabled = false

[[classes]]
name = "hot"
patterns = ["hot:*"]
ttl_seconds = 30
jitter = 0
origin = "{origin}"
read_policy = "read-through"
write_policy = "through"
refresh_ahead = true
refresh_ahead_before_seconds = 29.5
refresh_ahead_rate = {rate:g}
{lease}

[[classes]]
name = "cold"
patterns = ["cold:*"]
ttl_seconds = 30
jitter = 0
origin = "{origin}"
read_policy = "read-through"
"""


async def get(gw: RunningGateway, key: str) -> pb.GetResponse:
    reply: pb.GetResponse = await gw.stub.Get(pb.GetRequest(key=key), timeout=10)
    return reply


async def test_a_hot_key_is_reloaded_before_it_expires_and_its_readers_never_wait(
    gateway_factory: GatewayFactory, flaky: Flaky
) -> None:
    gw = await gateway_factory(toml(flaky.address))
    first = await get(gw, "hot:a")
    assert (first.status, first.tier) == (pb.STATUS_HIT, pb.TIER_ORIGIN)
    await get(gw, "cold:a")
    newer = await flaky.store("hot:a", b"changed at the origin")  # no Invalidate
    await flaky.store("cold:a", b"changed at the origin")
    seen: list[pb.GetResponse] = []

    async def refreshed() -> bool:
        got = await get(gw, "hot:a")
        seen.append(got)
        return got.value == b"changed at the origin"

    await until(refreshed, "the reload of hot:a reached the cache")
    # Every read was answered from the cache: no caller waited for a load.
    assert {(g.status, g.tier == pb.TIER_ORIGIN) for g in seen} == {(pb.STATUS_HIT, False)}
    assert seen[-1].version == newer
    counts = await class_stats(gw.stub, "hot")
    assert counts.refresh_ahead_loads >= 1 and counts.refresh_ahead_failed == 0
    # A class without refresh-ahead keeps its value until it expires (30 s).
    assert (await get(gw, "cold:a")).value == b"cold:a@2"
    assert flaky.loads("cold:a") == 1


async def test_the_class_rate_bounds_the_reloads_of_every_gateway_together(
    gateway_cluster: GatewayCluster, flaky: Flaky
) -> None:
    rate, keys = 2.0, [f"hot:r{i}" for i in range(20)]
    burst = math.ceil(rate)
    gateways = gateway_cluster(3, toml(flaky.address, rate=rate))
    channels = [grpc.aio.insecure_channel(g.address) for g in gateways]
    stubs = [cache_pb2_grpc.CacheServiceStub(c) for c in channels]
    try:
        started = time.monotonic()
        for stub in stubs:  # every key hot on every gateway
            for key in keys:
                got = await stub.Get(pb.GetRequest(key=key))
                assert got.status == pb.STATUS_HIT
        assert flaky.loads() == len(keys)  # one each; the other gateways read Redis

        async def totals() -> tuple[int, int]:
            stats = [await class_stats(s, "hot") for s in stubs]
            return (
                sum(c.refresh_ahead_loads for c in stats),
                sum(c.refresh_ahead_rate_limited for c in stats),
            )

        async def limited() -> bool:
            done, skipped = await totals()
            return done >= 4 and skipped > 0

        await until(limited, "reloads ran into the rate")
        done, _ = await totals()
        reloads = flaky.keys_loaded() - len(keys)
        elapsed = time.monotonic() - started
    finally:
        for channel in channels:
            await channel.close(None)
    # GCRA: at most the burst at once, then `rate` per second, over all three gateways.
    assert reloads <= burst + rate * elapsed, (reloads, elapsed)
    assert done <= reloads


async def test_over_three_gateways_one_reloads_a_key_at_a_time(
    gateway_cluster: GatewayCluster, flaky: Flaky
) -> None:
    gateways = gateway_cluster(3, toml(flaky.address, slow_lease=True))
    channels = [grpc.aio.insecure_channel(g.address) for g in gateways]
    stubs = [cache_pb2_grpc.CacheServiceStub(c) for c in channels]
    try:
        for stub in stubs:
            for _ in range(3):
                got = await stub.Get(pb.GetRequest(key="hot:shared"))
                assert got.status == pb.STATUS_HIT
        # Each Load takes 0.8 s: a gateway that did not see the others' lease would start
        # one of its own meanwhile (the origin logs that as an overlap).
        flaky.mode("slow 0.8")

        async def reloaded() -> bool:
            stats = [await class_stats(s, "hot") for s in stubs]
            return sum(c.refresh_ahead_loads for c in stats) >= 4

        await until(reloaded, "four reloads of hot:shared", within=30)
        flaky.mode("ok")
    finally:
        for channel in channels:
            await channel.close(None)
    assert flaky.overlaps() == []
    assert flaky.loads("hot:shared") >= 5


async def test_a_reload_that_a_write_overtook_does_not_replace_it(
    gateway_factory: GatewayFactory, flaky: Flaky
) -> None:
    gw = await gateway_factory(toml(flaky.address, slow_lease=True))
    await get(gw, "hot:w")
    flaky.mode("slow 1.5")
    # A reload reads the origin's old row, then takes 1.5 s to answer; a write-through
    # Set lands meanwhile.
    await until(lambda: flaky.loads("hot:w") == 2, "a reload of hot:w started")
    written = await gw.stub.Set(pb.SetRequest(key="hot:w", value=b"written"))
    assert written.outcome == pb.SET_OUTCOME_STORED

    async def overtaken() -> bool:
        return (await class_stats(gw.stub, "hot")).refresh_ahead_superseded >= 1

    await until(overtaken, "the reload was refused")
    got = await get(gw, "hot:w")
    assert (got.value, got.version) == (b"written", written.version)


async def test_a_reload_of_an_unchanged_value_publishes_no_invalidation(
    gateway_factory: GatewayFactory, flaky: Flaky
) -> None:
    a = await gateway_factory(toml(flaky.address))
    b = await gateway_factory(toml(flaky.address))
    await get(a, "hot:same")
    assert (await get(b, "hot:same")).status == pb.STATUS_HIT  # b holds an L1 copy

    async def reloads(n: int) -> bool:
        return (await class_stats(a.stub, "hot")).refresh_ahead_loads >= n

    def published() -> int:
        return sum(gw.server.stats.invalidations_published for gw in (a, b))

    await until(lambda: reloads(3), "three reloads of an unchanged hot:same")
    # The copies elsewhere are that very value: nothing to drop, no event.
    assert published() == 0
    assert a.server.stats.invalidations_received + b.server.stats.invalidations_received == 0
    await flaky.store("hot:same", b"changed")  # a new version at the origin
    await until(lambda: published() >= 1, "the reload of the change published")

    async def b_sees_it() -> bool:  # once the event reached b (it drops its L1 copy)
        return (await get(b, "hot:same")).value == b"changed"

    await until(b_sees_it, "b answers the changed value")


async def test_a_reload_the_origin_fails_changes_nothing_and_the_worker_goes_on(
    gateway_factory: GatewayFactory, flaky: Flaky, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(flaky.address))
    first = await get(gw, "hot:down")
    flaky.mode("down")

    async def failed(n: int) -> bool:
        return (await class_stats(gw.stub, "hot")).refresh_ahead_failed >= n

    await until(lambda: failed(2), "two reloads failed")  # the worker kept going
    # Each failed reload released its lease at once, and the value is still served.
    await until(lambda: not redis_client.exists("cg:{hot:down}:lease"), "lease released")
    got = await get(gw, "hot:down")
    assert (got.status, got.value, got.version) == (pb.STATUS_HIT, first.value, first.version)
    flaky.mode("ok")
    newer = await flaky.store("hot:down", b"back")

    async def recovered() -> bool:
        return (await get(gw, "hot:down")).version == newer

    await until(recovered, "reloads resumed once the origin was back")


async def test_the_worker_outlives_a_redis_outage(
    gateway_factory: GatewayFactory, flaky: Flaky, redis_server: ManagedRedis
) -> None:
    gw = await gateway_factory(toml(flaky.address))
    await get(gw, "hot:outage")

    async def reloads() -> int:
        return int((await class_stats(gw.stub, "hot")).refresh_ahead_loads)

    await until(lambda: gw.server.cache.refresh_ahead is not None, "a worker")
    before = gw.server.stats.redis_errors
    redis_server.stop()
    # Redis calls fail meanwhile (the worker's ticks among them: logged, skipped).
    await until(lambda: gw.server.stats.redis_errors >= before + 3, "calls failed")
    redis_server.start()
    done = await reloads()

    async def resumed() -> bool:  # the key is read (loaded again: Redis lost it), then
        try:  # reloaded by the same worker
            got = await gw.stub.Get(pb.GetRequest(key="hot:outage"), timeout=5)
        except grpc.aio.AioRpcError:
            return False  # (the breaker may still refuse for its cool-down)
        return got.status == pb.STATUS_HIT and await reloads() > done

    await until(resumed, "reloads resumed after Redis came back", within=30)
