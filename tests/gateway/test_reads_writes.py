"""Get / GetMany / Set / Delete over real gRPC against a real redis-server."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayFactory, RunningGateway

CLASSES = """
[[classes]]
name = "catalog"
patterns = ["catalog:*"]
ttl_seconds = 60
jitter = 0.2
l1_ttl_seconds = 30

[[classes]]
name = "counter"
patterns = ["rate:*"]
ttl_seconds = 5
jitter = 0.0
l1 = false
"""


async def test_set_then_get_is_an_l1_hit(gateway: RunningGateway) -> None:
    out = await gateway.stub.Set(pb.SetRequest(key="k", value=b"v1"))
    assert out.outcome == pb.SET_OUTCOME_STORED
    assert out.version == 1
    assert out.key_class == "default"
    got = await gateway.stub.Get(pb.GetRequest(key="k"))
    assert (got.status, got.value, got.tier, got.version) == (pb.STATUS_HIT, b"v1", pb.TIER_L1, 1)
    assert 0 < got.ttl_remaining_ms <= out.ttl_ms


async def test_l1_miss_reads_redis_then_fills_l1(gateway: RunningGateway) -> None:
    await gateway.stub.Set(pb.SetRequest(key="k", value=b"v"))
    gateway.server.l1.clear()
    first = await gateway.stub.Get(pb.GetRequest(key="k"))
    assert (first.status, first.tier, first.value) == (pb.STATUS_HIT, pb.TIER_L2, b"v")
    second = await gateway.stub.Get(pb.GetRequest(key="k"))
    assert (second.status, second.tier, second.value) == (pb.STATUS_HIT, pb.TIER_L1, b"v")


async def test_miss_names_origin_and_class(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(CLASSES)
    got = await gw.stub.Get(pb.GetRequest(key="catalog:42"))
    assert (got.status, got.tier, got.key_class, got.value) == (
        pb.STATUS_MISS,
        pb.TIER_ORIGIN,
        "catalog",
        b"",
    )


async def test_versions_increase_and_if_version_guards(gateway: RunningGateway) -> None:
    a = await gateway.stub.Set(pb.SetRequest(key="k", value=b"1", if_version=0))
    assert (a.outcome, a.version) == (pb.SET_OUTCOME_STORED, 1)
    b = await gateway.stub.Set(pb.SetRequest(key="k", value=b"2"))
    assert b.version == 2
    stale = await gateway.stub.Set(pb.SetRequest(key="k", value=b"3", if_version=1))
    assert (stale.outcome, stale.version) == (pb.SET_OUTCOME_VERSION_CONFLICT, 2)
    got = await gateway.stub.Get(pb.GetRequest(key="k"))
    assert (got.value, got.version) == (b"2", 2)
    ok = await gateway.stub.Set(pb.SetRequest(key="k", value=b"3", if_version=2))
    assert (ok.outcome, ok.version) == (pb.SET_OUTCOME_STORED, 3)


async def test_origin_version_orders_writes_by_the_source_of_truths_versions(
    gateway: RunningGateway,
) -> None:
    """An application's own write-through: the committed row goes in with its database
    version, and an older one landing later (a slower writer) never replaces it."""
    new = await gateway.stub.Set(pb.SetRequest(key="row", value=b"v7", origin_version=7))
    assert (new.outcome, new.version) == (pb.SET_OUTCOME_STORED, 7)
    late = await gateway.stub.Set(pb.SetRequest(key="row", value=b"v5", origin_version=5))
    assert (late.outcome, late.version) == (pb.SET_OUTCOME_VERSION_CONFLICT, 7)
    gateway.server.l1.clear()
    got = await gateway.stub.Get(pb.GetRequest(key="row"))
    assert (got.value, got.version, got.tier) == (b"v7", 7, pb.TIER_L2)
    same = await gateway.stub.Set(pb.SetRequest(key="row", value=b"v7", origin_version=7))
    assert (same.outcome, same.version) == (pb.SET_OUTCOME_STORED, 7)
    newer = await gateway.stub.Set(pb.SetRequest(key="row", value=b"v9", origin_version=9))
    assert (newer.outcome, newer.version) == (pb.SET_OUTCOME_STORED, 9)
    got = await gateway.stub.Get(pb.GetRequest(key="row"))
    assert (got.value, got.version) == (b"v9", 9)
    # After an invalidation any version is welcome again (nothing newer is cached).
    await gateway.stub.Invalidate(pb.InvalidateRequest(keys=["row"]))
    again = await gateway.stub.Set(pb.SetRequest(key="row", value=b"v8", origin_version=8))
    assert (again.outcome, again.version) == (pb.SET_OUTCOME_STORED, 8)


async def test_an_origin_version_write_ends_a_lease_so_an_older_fill_is_refused(
    gateway: RunningGateway,
) -> None:
    """A loader that read the database before the commit holds the lease; the committed
    row goes in with its version; the loader's fill (an older state) is refused."""
    leased = await gateway.stub.Get(pb.GetRequest(key="row", lease=True))
    assert leased.status == pb.STATUS_LEASED
    await gateway.stub.Set(pb.SetRequest(key="row", value=b"committed", origin_version=4))
    fill = await gateway.stub.Set(
        pb.SetRequest(key="row", value=b"before", lease_token=leased.lease_token)
    )
    assert fill.outcome == pb.SET_OUTCOME_LEASE_INVALID
    got = await gateway.stub.Get(pb.GetRequest(key="row"))
    assert (got.value, got.version) == (b"committed", 4)


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (pb.SetRequest(key="k", value=b"v", origin_version=0), "1 to 2^53-1"),
        (pb.SetRequest(key="k", value=b"v", origin_version=2**53), "1 to 2^53-1"),
        (pb.SetRequest(key="k", value=b"v", origin_version=2, if_version=1), "if_version"),
        (
            pb.SetRequest(
                key="k", value=b"v", origin_version=2, condition=pb.SET_CONDITION_IF_ABSENT
            ),
            "condition",
        ),
    ],
)
async def test_bad_origin_versions_are_refused_before_anything_is_written(
    gateway: RunningGateway, request_: pb.SetRequest, says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gateway.stub.Set(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError):  # a SetMany entry likewise, before any write
        await gateway.stub.SetMany(
            pb.SetManyRequest(entries=[pb.SetRequest(key="other", value=b"v"), request_])
        )
    got = await gateway.stub.GetMany(pb.GetManyRequest(keys=["k", "other"]))
    assert [r.status for r in got.results] == [pb.STATUS_MISS, pb.STATUS_MISS]


async def test_get_many_keeps_order_across_tiers(gateway: RunningGateway) -> None:
    for key in ("a", "b", "c"):
        await gateway.stub.Set(pb.SetRequest(key=key, value=key.encode() * 3))
    gateway.server.l1.delete("b")  # b only in Redis
    keys = ["c", "missing", "b", "a", "b"]
    reply = await gateway.stub.GetMany(pb.GetManyRequest(keys=keys))
    got = [(r.status, r.value, r.tier) for r in reply.results]
    assert got == [
        (pb.STATUS_HIT, b"ccc", pb.TIER_L1),
        (pb.STATUS_MISS, b"", pb.TIER_ORIGIN),
        (pb.STATUS_HIT, b"bbb", pb.TIER_L2),
        (pb.STATUS_HIT, b"aaa", pb.TIER_L1),
        (pb.STATUS_HIT, b"bbb", pb.TIER_L2),
    ]
    empty = await gateway.stub.GetMany(pb.GetManyRequest(keys=[]))
    assert list(empty.results) == []


async def test_get_many_reads_redis_in_one_round_trip(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    for i in range(50):
        await gateway.stub.Set(pb.SetRequest(key=f"k{i}", value=b"x"))
    gateway.server.l1.clear()
    redis_client.config_resetstat()
    reply = await gateway.stub.GetMany(pb.GetManyRequest(keys=[f"k{i}" for i in range(50)]))
    assert all(r.tier == pb.TIER_L2 for r in reply.results)
    stats = redis_client.info("commandstats")
    # One pipeline: exactly one GET and one PTTL per key, and one GET of the class
    # generation (all 50 keys are in the default class), nothing else.
    assert stats["cmdstat_get"]["calls"] == 50 + 1
    assert stats["cmdstat_pttl"]["calls"] == 50


async def test_delete_removes_from_redis_and_l1(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    await gateway.stub.Set(pb.SetRequest(key="x", value=b"1"))
    await gateway.stub.Set(pb.SetRequest(key="y", value=b"2"))
    out = await gateway.stub.Delete(pb.DeleteRequest(keys=["x", "y", "never"]))
    assert out.deleted == 2
    assert redis_client.exists("cg:{x}", "cg:{y}") == 0
    assert "x" not in gateway.server.l1
    got = await gateway.stub.Get(pb.GetRequest(key="x"))
    assert got.status == pb.STATUS_MISS
    assert (await gateway.stub.Delete(pb.DeleteRequest())).deleted == 0


async def test_class_without_l1_always_reads_redis(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(CLASSES)
    await gw.stub.Set(pb.SetRequest(key="rate:user1", value=b"7"))
    for _ in range(2):
        got = await gw.stub.Get(pb.GetRequest(key="rate:user1"))
        assert (got.tier, got.key_class) == (pb.TIER_L2, "counter")
    assert "rate:user1" not in gw.server.l1


async def test_concurrent_misses_share_one_redis_read(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    await gateway.stub.Set(pb.SetRequest(key="hot", value=b"v"))
    gateway.server.l1.clear()
    redis_client.config_resetstat()
    replies = await asyncio.gather(*(gateway.stub.Get(pb.GetRequest(key="hot")) for _ in range(50)))
    assert all(r.value == b"v" for r in replies)
    # One read of the value, plus the class generation in the same round trip.
    assert redis_client.info("commandstats")["cmdstat_get"]["calls"] == 2
    assert len(gateway.server.cache.reads) == 0


async def test_stats_is_served(gateway: RunningGateway) -> None:
    # Served since the observability work; tests/telemetry checks its figures.
    stats = await gateway.stub.Stats(pb.StatsRequest())
    assert stats.gateway_id == gateway.server.config.server.gateway_id
