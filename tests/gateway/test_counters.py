"""Incr, Touch and Ttl against real Redis: counters beside values, never in L1."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis

from cachegw import AsyncClient
from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayCluster, GatewayFactory, RunningGateway

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

CLASSES = """
[[classes]]
name = "hits"
patterns = ["hits:*"]
ttl_seconds = 60
jitter = 0.0

[[classes]]
name = "jittery"
patterns = ["jit:*"]
ttl_seconds = 100
jitter = 0.2

[[classes]]
name = "stale"
patterns = ["stale:*"]
ttl_seconds = 30
jitter = 0.0
stale_seconds = 10
"""


async def _gw(gateway_factory: GatewayFactory) -> RunningGateway:
    gw: RunningGateway = await gateway_factory(CLASSES)
    return gw


async def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code()


async def test_1000_concurrent_incr_over_three_gateways_sum_exactly(
    gateway_cluster: GatewayCluster, redis_client: redis.Redis
) -> None:
    gateways = gateway_cluster(3, CLASSES)
    clients = [AsyncClient(g.address, timeout=20.0) for g in gateways]
    try:
        deltas = [(i % 7) - 2 for i in range(1000)]  # negative, zero and positive
        values: list[int] = []
        for start in range(0, 1000, 100):  # bounded batches of 100 calls in flight
            batch = [
                clients[i % 3].incr("hits:total", d)
                for i, d in enumerate(deltas[start : start + 100], start)
            ]
            values += await asyncio.gather(*batch)
        assert redis_client.get("cg:{hits:total}:n") == str(sum(deltas)).encode()
        assert await clients[1].incr("hits:total", 0) == sum(deltas)
        assert len(values) == 1000  # every call answered
        # The last answer of all is the total: no step was lost or applied twice.
        assert sum(deltas) in values
    finally:
        for c in clients:
            await c.close()


async def test_incr_creates_with_class_or_given_ttl_and_keeps_an_existing_ttl(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await _gw(gateway_factory)
    out = await gw.stub.Incr(pb.IncrRequest(key="hits:a", delta=5))
    assert (out.value, out.created, out.key_class) == (5, True, "hits")
    assert 59_000 <= out.ttl_ms <= 60_000
    assert 59_000 <= redis_client.pttl("cg:{hits:a}:n") <= 60_000

    out = await gw.stub.Incr(pb.IncrRequest(key="hits:b", delta=1, ttl_ms=5_000))
    assert out.created and 4_000 <= out.ttl_ms <= 5_000
    # An existing counter keeps its TTL, whatever ttl_ms this call gives.
    out = await gw.stub.Incr(pb.IncrRequest(key="hits:b", delta=2, ttl_ms=50_000))
    assert (out.value, out.created) == (3, False)
    assert out.ttl_ms <= 5_000
    assert redis_client.pttl("cg:{hits:b}:n") <= 5_000

    out = await gw.stub.Incr(pb.IncrRequest(key="jit:x", delta=1))
    assert 80_000 - 1_000 <= out.ttl_ms <= 100_000  # jittered like a write's TTL


async def test_negative_deltas_and_reading_with_zero(gateway_factory: GatewayFactory) -> None:
    gw = await _gw(gateway_factory)
    out = await gw.stub.Incr(pb.IncrRequest(key="hits:n", delta=-3))
    assert (out.value, out.created) == (-3, True)
    out = await gw.stub.Incr(pb.IncrRequest(key="hits:n", delta=10))
    assert out.value == 7
    out = await gw.stub.Incr(pb.IncrRequest(key="hits:n"))  # delta 0: a read
    assert (out.value, out.created) == (7, False)
    assert out.ttl_ms > 0


async def test_zero_delta_never_creates_a_counter(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await _gw(gateway_factory)
    out = await gw.stub.Incr(pb.IncrRequest(key="hits:none", delta=0))
    assert (out.value, out.created, out.ttl_ms) == (0, False, 0)
    assert not redis_client.exists("cg:{hits:none}:n")


async def test_overflow_is_out_of_range_and_changes_nothing(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await _gw(gateway_factory)
    out = await gw.stub.Incr(pb.IncrRequest(key="hits:big", delta=INT64_MAX))
    assert out.value == INT64_MAX  # exact: Redis's integers, never a Lua double
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.stub.Incr(pb.IncrRequest(key="hits:big", delta=1))
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "overflow a signed 64-bit integer" in (info.value.details() or "")
    assert str(INT64_MAX) in (info.value.details() or "")
    assert redis_client.get("cg:{hits:big}:n") == str(INT64_MAX).encode()
    out = await gw.stub.Incr(pb.IncrRequest(key="hits:big", delta=-1))
    assert out.value == INT64_MAX - 1

    out = await gw.stub.Incr(pb.IncrRequest(key="hits:small", delta=INT64_MIN))
    assert out.value == INT64_MIN
    assert (
        await _code(gw.stub.Incr(pb.IncrRequest(key="hits:small", delta=-1)))
        == grpc.StatusCode.OUT_OF_RANGE
    )
    assert redis_client.get("cg:{hits:small}:n") == str(INT64_MIN).encode()


async def test_a_non_integer_at_the_counter_key_is_failed_precondition(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await _gw(gateway_factory)
    redis_client.set("cg:{hits:text}:n", b"twelve")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.stub.Incr(pb.IncrRequest(key="hits:text", delta=1))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not a 64-bit integer" in (info.value.details() or "")
    assert redis_client.get("cg:{hits:text}:n") == b"twelve"

    redis_client.hset("cg:{hits:hash}:n", "f", "1")  # another Redis type
    assert (
        await _code(gw.stub.Incr(pb.IncrRequest(key="hits:hash", delta=1)))
        == grpc.StatusCode.FAILED_PRECONDITION
    )


async def test_counters_never_enter_l1_and_get_reads_the_value(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await _gw(gateway_factory)
    await gw.stub.Incr(pb.IncrRequest(key="hits:k", delta=4))
    assert "hits:k" not in gw.server.l1
    got = await gw.stub.Get(pb.GetRequest(key="hits:k"))
    assert got.status == pb.STATUS_MISS  # the counter is not the value

    await gw.stub.Set(pb.SetRequest(key="hits:k", value=b"page"))
    await gw.stub.Get(pb.GetRequest(key="hits:k"))
    out = await gw.stub.Incr(pb.IncrRequest(key="hits:k", delta=1))
    assert out.value == 5
    got = await gw.stub.Get(pb.GetRequest(key="hits:k"))
    assert (got.status, got.value) == (pb.STATUS_HIT, b"page")


async def test_delete_and_invalidate_remove_the_counter_class_invalidation_does_not(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await _gw(gateway_factory)
    await gw.stub.Incr(pb.IncrRequest(key="hits:d", delta=9))
    await gw.stub.Delete(pb.DeleteRequest(keys=["hits:d"]))
    assert not redis_client.exists("cg:{hits:d}:n")
    out = await gw.stub.Incr(pb.IncrRequest(key="hits:d", delta=1))
    assert (out.value, out.created) == (1, True)

    await gw.stub.Invalidate(pb.InvalidateRequest(keys=["hits:d"]))
    assert not redis_client.exists("cg:{hits:d}:n")
    await gw.stub.Incr(pb.IncrRequest(key="hits:p1", delta=1))
    await gw.stub.Invalidate(pb.InvalidateRequest(prefixes=["hits:p"]))
    assert not redis_client.exists("cg:{hits:p1}:n")

    await gw.stub.Incr(pb.IncrRequest(key="hits:c", delta=2))
    await gw.stub.Invalidate(pb.InvalidateRequest(classes=["hits"]))
    assert (await gw.stub.Incr(pb.IncrRequest(key="hits:c", delta=0))).value == 2


async def test_touch_extends_value_and_counter(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await _gw(gateway_factory)
    await gw.stub.Set(pb.SetRequest(key="stale:t", value=b"v", ttl_ms=2_000))
    await gw.stub.Incr(pb.IncrRequest(key="stale:t", delta=1, ttl_ms=2_000))
    out = await gw.stub.Touch(pb.TouchRequest(key="stale:t", ttl_ms=20_000))
    assert (out.touched, out.ttl_ms, out.key_class) == (True, 20_000, "stale")
    # The value keeps the class's stale window beyond the fresh TTL, as a Set would.
    assert 29_000 <= redis_client.pttl("cg:{stale:t}") <= 30_000
    assert 19_000 <= redis_client.pttl("cg:{stale:t}:n") <= 20_000
    ttl = await gw.stub.Ttl(pb.TtlRequest(key="stale:t"))
    assert 19_000 <= ttl.ttl_remaining_ms <= 20_000

    out = await gw.stub.Touch(pb.TouchRequest(key="stale:t"))  # the class TTL
    assert out.ttl_ms == 30_000
    assert 39_000 <= redis_client.pttl("cg:{stale:t}") <= 40_000

    await gw.stub.Incr(pb.IncrRequest(key="hits:only", delta=1, ttl_ms=1_000))
    out = await gw.stub.Touch(pb.TouchRequest(key="hits:only", ttl_ms=9_000))
    assert out.touched and redis_client.pttl("cg:{hits:only}:n") > 8_000
    assert not redis_client.exists("cg:{hits:only}")  # touching creates nothing


async def test_touch_of_a_missing_key_is_false(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await _gw(gateway_factory)
    out = await gw.stub.Touch(pb.TouchRequest(key="hits:ghost", ttl_ms=5_000))
    assert (out.touched, out.ttl_ms) == (False, 0)
    assert not redis_client.exists("cg:{hits:ghost}", "cg:{hits:ghost}:n")


async def test_ttl_reports_fresh_time_left_and_version(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await _gw(gateway_factory)
    missing = await gw.stub.Ttl(pb.TtlRequest(key="hits:t"))
    assert (missing.exists, missing.ttl_remaining_ms, missing.version) == (False, 0, 0)
    assert missing.key_class == "hits"

    await gw.stub.Set(pb.SetRequest(key="hits:t", value=b"one"))
    second = await gw.stub.Set(pb.SetRequest(key="hits:t", value=b"two", ttl_ms=10_000))
    out = await gw.stub.Ttl(pb.TtlRequest(key="hits:t"))
    assert out.exists and out.version == second.version == 2
    assert 9_000 <= out.ttl_remaining_ms <= 10_000

    # The stale window is not fresh time.
    await gw.stub.Set(pb.SetRequest(key="stale:s", value=b"v", ttl_ms=5_000))
    assert 14_000 <= redis_client.pttl("cg:{stale:s}") <= 15_000
    out = await gw.stub.Ttl(pb.TtlRequest(key="stale:s"))
    assert 4_000 <= out.ttl_remaining_ms <= 5_000
    redis_client.pexpire("cg:{stale:s}", 3_000)  # inside the stale window now
    out = await gw.stub.Ttl(pb.TtlRequest(key="stale:s"))
    assert (out.exists, out.ttl_remaining_ms) == (True, 0)

    # A counter alone is no value.
    await gw.stub.Incr(pb.IncrRequest(key="hits:c", delta=1))
    assert not (await gw.stub.Ttl(pb.TtlRequest(key="hits:c"))).exists


async def test_ttl_treats_what_get_misses_as_absent(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await _gw(gateway_factory)
    redis_client.set("cg:{hits:foreign}", b"not an envelope at all, but long enough", px=9_000)
    assert not (await gw.stub.Ttl(pb.TtlRequest(key="hits:foreign"))).exists
    await gw.stub.Set(pb.SetRequest(key="hits:g", value=b"v"))
    await gw.stub.Invalidate(pb.InvalidateRequest(classes=["hits"]))
    assert not (await gw.stub.Ttl(pb.TtlRequest(key="hits:g"))).exists


async def test_bad_input_is_invalid_argument(gateway_factory: GatewayFactory) -> None:
    gw = await _gw(gateway_factory)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    assert await _code(gw.stub.Incr(pb.IncrRequest(key="", delta=1))) == bad
    assert await _code(gw.stub.Incr(pb.IncrRequest(key="hits:x", delta=1, ttl_ms=0))) == bad
    assert await _code(gw.stub.Incr(pb.IncrRequest(key="hits:x", delta=1, ttl_ms=-5))) == bad
    assert await _code(gw.stub.Incr(pb.IncrRequest(key="k" * 10_000, delta=1))) == bad
    assert await _code(gw.stub.Touch(pb.TouchRequest(key=""))) == bad
    assert await _code(gw.stub.Touch(pb.TouchRequest(key="hits:x", ttl_ms=0))) == bad
    assert await _code(gw.stub.Ttl(pb.TtlRequest(key=""))) == bad
    # Bytes that are not the request message.
    raw = gw.channel.unary_unary("/cachegw.v1.CacheService/Incr", None, None)
    assert await _code(raw(b"\x0a\x05\xff\xfe\xfd\xfc\xfb")) == bad


async def test_redis_refusing_the_write_is_not_mistaken_for_a_bad_counter(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await _gw(gateway_factory)
    await gw.stub.Incr(pb.IncrRequest(key="hits:oom", delta=1))
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", 1)  # every write is refused: OOM
    try:
        for key in ("hits:oom", "hits:fresh"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await gw.stub.Incr(pb.IncrRequest(key=key, delta=1))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            assert "OOM" in (info.value.details() or "")
    finally:
        redis_client.config_set("maxmemory", 0)
    assert (await gw.stub.Incr(pb.IncrRequest(key="hits:oom", delta=1))).value == 2
