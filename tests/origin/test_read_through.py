"""Read-through and negative caching against the example origin over PostgreSQL: the
gateway loads misses itself, one Load per key across every gateway."""

from __future__ import annotations

import asyncio

import asyncpg

from cachegw import AsyncClient, Status, Tier
from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayCluster, GatewayFactory
from tests.origin.conftest import OriginProcess, put_row


def classes(origin: OriginProcess, *, negative_ttl: float = 30.0) -> str:
    return f"""
[origin]
timeout_seconds = 2.0

[[classes]]
name = "items"
patterns = ["item:*"]
ttl_seconds = 60
jitter = 0
origin = "{origin.address}"
read_policy = "read-through"
write_policy = "through"
negative_ttl_seconds = {negative_ttl}

[[classes]]
name = "plain"
patterns = ["nn:*"]
origin = "{origin.address}"
read_policy = "read-through"
"""


async def test_a_miss_is_loaded_once_then_served_from_the_cache(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    version = await put_row(db, "item:one", b"kettle", ["sku-1"])
    gw = await gateway_factory(classes(pg_origin))
    first = await gw.stub.Get(pb.GetRequest(key="item:one"))
    assert (first.status, first.value, first.tier) == (pb.STATUS_HIT, b"kettle", pb.TIER_ORIGIN)
    assert first.version == version  # the origin's version, not one the gateway made up
    assert list(first.tags) == ["sku-1"] and first.key_class == "items"
    again = await gw.stub.Get(pb.GetRequest(key="item:one"))
    assert (again.status, again.value, again.version) == (pb.STATUS_HIT, b"kettle", version)
    assert again.tier in (pb.TIER_L1, pb.TIER_L2)
    assert pg_origin.loads("item:one") == 1
