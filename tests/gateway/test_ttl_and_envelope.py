"""TTLs and jitter as Redis records them, L1 lifetimes, and the stored envelope."""

from __future__ import annotations

import asyncio
import struct

import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import envelope
from tests.conftest import GatewayFactory, RunningGateway

CLASSES = """
[[classes]]
name = "catalog"
patterns = ["catalog:*"]
ttl_seconds = 60
jitter = 0.2

[[classes]]
name = "exact"
patterns = ["exact:*"]
ttl_seconds = 40
jitter = 0.0

[[classes]]
name = "short_l1"
patterns = ["inv:*"]
ttl_seconds = 60
jitter = 0.0
l1_ttl_seconds = 0.2
"""


async def test_class_ttl_is_jittered_within_bounds(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(CLASSES)
    ttls = []
    for i in range(40):
        out = await gw.stub.Set(pb.SetRequest(key=f"catalog:{i}", value=b"v"))
        assert out.key_class == "catalog"
        assert 48_000 <= out.ttl_ms <= 60_000
        pttl = redis_client.pttl(f"cg:{{catalog:{i}}}")
        assert out.ttl_ms - 1_000 <= pttl <= out.ttl_ms
        ttls.append(out.ttl_ms)
    assert len(set(ttls)) > 20, "jitter must spread expiries"


async def test_explicit_ttl_and_zero_jitter(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(CLASSES)
    out = await gw.stub.Set(pb.SetRequest(key="exact:1", value=b"v"))
    assert out.ttl_ms == 40_000
    out = await gw.stub.Set(pb.SetRequest(key="exact:2", value=b"v", ttl_ms=1234))
    assert out.ttl_ms == 1234
    assert 0 < redis_client.pttl("cg:{exact:2}") <= 1234
    out = await gw.stub.Set(pb.SetRequest(key="catalog:x", value=b"v", ttl_ms=10_000))
    assert 8_000 <= out.ttl_ms <= 10_000


async def test_l1_copy_never_outlives_redis(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(CLASSES)  # default class: L1 TTL 30 s
    await gw.stub.Set(pb.SetRequest(key="brief", value=b"v", ttl_ms=300))
    assert (await gw.stub.Get(pb.GetRequest(key="brief"))).tier == pb.TIER_L1
    await asyncio.sleep(0.45)
    got = await gw.stub.Get(pb.GetRequest(key="brief"))
    assert got.status == pb.STATUS_MISS
    # Also when the copy came from Redis rather than from this gateway's write.
    await gw.stub.Set(pb.SetRequest(key="brief", value=b"v", ttl_ms=300))
    gw.server.l1.clear()
    assert (await gw.stub.Get(pb.GetRequest(key="brief"))).tier == pb.TIER_L2
    assert (await gw.stub.Get(pb.GetRequest(key="brief"))).tier == pb.TIER_L1
    await asyncio.sleep(0.45)
    assert (await gw.stub.Get(pb.GetRequest(key="brief"))).status == pb.STATUS_MISS


async def test_l1_ttl_bounds_the_copy(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(CLASSES)
    await gw.stub.Set(pb.SetRequest(key="inv:1", value=b"v"))
    assert (await gw.stub.Get(pb.GetRequest(key="inv:1"))).tier == pb.TIER_L1
    await asyncio.sleep(0.3)
    got = await gw.stub.Get(pb.GetRequest(key="inv:1"))
    assert (got.status, got.tier) == (pb.STATUS_HIT, pb.TIER_L2)
    assert 55_000 < got.ttl_remaining_ms <= 60_000


async def test_stored_value_carries_the_envelope(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    await gateway.stub.Set(pb.SetRequest(key="e", value=b"payload"))
    await gateway.stub.Set(pb.SetRequest(key="e", value=b"payload2"))
    raw = redis_client.get("cg:{e}")
    assert isinstance(raw, bytes)
    env = envelope.decode(raw)
    assert (env.value, env.version) == (b"payload2", 2)
    assert env.created_ms > 1_600_000_000_000


async def test_unknown_envelope_is_a_counted_miss(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    redis_client.set("cg:{foreign}", b"written by someone else", px=60_000)
    future = struct.pack(">BBQqIq", envelope.MAGIC, 2, 7, 0, 0, 0) + b"new format"
    redis_client.set("cg:{future}", future, px=60_000)
    for key in ("foreign", "future"):
        got = await gateway.stub.Get(pb.GetRequest(key=key))
        assert (got.status, got.value) == (pb.STATUS_MISS, b"")
    many = await gateway.stub.GetMany(pb.GetManyRequest(keys=["foreign", "future"]))
    assert [r.status for r in many.results] == [pb.STATUS_MISS, pb.STATUS_MISS]
    assert gateway.server.store.envelope_mismatches == 4
    assert "foreign" not in gateway.server.l1
    # A Set replaces the unreadable value and the key reads normally again.
    await gateway.stub.Set(pb.SetRequest(key="future", value=b"ok"))
    gateway.server.l1.clear()
    got = await gateway.stub.Get(pb.GetRequest(key="future"))
    assert (got.status, got.value) == (pb.STATUS_HIT, b"ok")


def test_envelope_roundtrip_and_errors() -> None:
    raw = envelope.encode(
        b"v", version=3, created_ms=5, cost_ms=7, soft_expiry_ms=9, generation=4, tags=["a", "é"]
    )
    assert envelope.decode(raw) == envelope.Envelope(3, 5, 7, 9, 4, ("a", "é"), b"v")
    tail = envelope.encode_tail(
        b"v", created_ms=5, cost_ms=7, soft_expiry_ms=9, generation=4, tags=["a", "é"]
    )
    assert raw[envelope.PREFIX_SIZE :] == tail
    for bad in (b"", b"short", b"\x00" * 40):
        try:
            envelope.decode(bad)
        except envelope.EnvelopeError:
            continue
        raise AssertionError(f"{bad!r} decoded")
