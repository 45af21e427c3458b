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


async def test_500_concurrent_gets_of_a_cold_key_over_three_gateways_load_it_once(
    gateway_cluster: GatewayCluster, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    await put_row(db, "item:cold", b"the value")
    gateways = gateway_cluster(3, classes(pg_origin))
    clients = [AsyncClient(gw.address, timeout=15) for gw in gateways]
    try:
        entries = await asyncio.gather(*(clients[i % 3].lookup("item:cold") for i in range(500)))
    finally:
        for client in clients:
            await client.close()
    assert {(e.status, e.value) for e in entries} == {(Status.HIT, b"the value")}
    assert pg_origin.loads("item:cold") == 1
    # One caller was answered by the load itself; every other one by what it stored.
    assert sum(e.tier is Tier.ORIGIN for e in entries) == 1


async def test_the_misses_of_a_get_many_are_loaded_in_one_call(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    keys = [f"item:batch:{i}" for i in range(10)]
    for key in keys[:8]:
        await put_row(db, key, key.encode())
    gw = await gateway_factory(classes(pg_origin))
    await gw.stub.Get(pb.GetRequest(key=keys[0]))  # one already cached
    asked = [*keys, keys[3]]  # and one asked twice
    before = pg_origin.loads()
    got = await gw.stub.GetMany(pb.GetManyRequest(keys=asked))
    assert [(r.status, r.value) for r in got.results] == [
        *((pb.STATUS_HIT, k.encode()) for k in keys[:8]),
        (pb.STATUS_NOT_FOUND, b""),
        (pb.STATUS_NOT_FOUND, b""),
        (pb.STATUS_HIT, keys[3].encode()),
    ]
    assert pg_origin.loads() == before + 1  # the 9 missing keys, each once, in one Load
    assert "9 keys" in pg_origin.calls("Load", keys[1])[0]
    again = await gw.stub.GetMany(pb.GetManyRequest(keys=asked))
    assert [r.status for r in again.results] == [r.status for r in got.results]
    assert pg_origin.loads() == before + 1  # values and NOT_FOUNDs all cached


async def test_not_found_is_cached_for_the_negative_ttl_and_a_creating_write_replaces_it(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess
) -> None:
    toml = classes(pg_origin)
    a, b = await gateway_factory(toml), await gateway_factory(toml)
    for gw in (a, b, a, b):
        got = await gw.stub.Get(pb.GetRequest(key="item:absent"))
        assert (got.status, got.value, got.key_class) == (pb.STATUS_NOT_FOUND, b"", "items")
    assert pg_origin.loads("item:absent") == 1  # the NOT_FOUND was cached, for everyone
    client = AsyncClient(a.address)
    try:
        entry = await client.lookup("item:absent")
        assert (entry.status, entry.value, entry.hit) == (Status.NOT_FOUND, None, False)
        assert await client.get("item:absent") is None
    finally:
        await client.close()
    # A write that creates the key replaces the tombstone at once, on every gateway.
    stored = await b.stub.Set(pb.SetRequest(key="item:absent", value=b"created"))
    assert stored.outcome == pb.SET_OUTCOME_STORED
    for gw in (a, b):
        got = await gw.stub.Get(pb.GetRequest(key="item:absent"))
        assert (got.status, got.value, got.version) == (pb.STATUS_HIT, b"created", stored.version)
    assert pg_origin.loads("item:absent") == 1


async def test_without_a_negative_ttl_each_get_of_a_missing_key_asks_the_origin(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess
) -> None:
    gw = await gateway_factory(classes(pg_origin))
    for _ in range(3):
        got = await gw.stub.Get(pb.GetRequest(key="nn:absent"))
        assert got.status == pb.STATUS_NOT_FOUND
    assert pg_origin.loads("nn:absent") == 3


async def test_a_write_around_class_serves_what_the_owner_wrote_after_invalidate(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    await put_row(db, "nn:price", b"10")
    gw = await gateway_factory(classes(pg_origin))
    assert (await gw.stub.Get(pb.GetRequest(key="nn:price"))).value == b"10"
    version = await put_row(db, "nn:price", b"12")  # the owner writes its database
    await gw.stub.Invalidate(pb.InvalidateRequest(keys=["nn:price"]))
    got = await gw.stub.Get(pb.GetRequest(key="nn:price"))
    assert (got.value, got.version, got.tier) == (b"12", version, pb.TIER_ORIGIN)
