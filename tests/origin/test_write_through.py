"""Write-through against the example origin over PostgreSQL: Set stores in the origin
first, then in the cache; the origin's versions decide what the cache keeps."""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.writes import SetItem
from tests.conftest import GatewayFactory
from tests.origin.conftest import OriginProcess, row
from tests.origin.test_read_through import classes


async def test_set_stores_in_the_origin_first_with_the_origins_version(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    a, b = await gateway_factory(classes(pg_origin)), await gateway_factory(classes(pg_origin))
    first = await a.stub.Set(pb.SetRequest(key="item:wt", value=b"one", tags=["t"]))
    assert first.outcome == pb.SET_OUTCOME_STORED
    assert await row(db, "item:wt") == (b"one", first.version)
    got = await b.stub.Get(pb.GetRequest(key="item:wt"))
    assert (got.status, got.value, got.version) == (pb.STATUS_HIT, b"one", first.version)
    second = await b.stub.Set(pb.SetRequest(key="item:wt", value=b"two"))
    assert second.version > first.version
    assert await row(db, "item:wt") == (b"two", second.version)
    for gw in (a, b):  # the replacing write reached every gateway's L1
        got = await gw.stub.Get(pb.GetRequest(key="item:wt"))
        assert (got.value, got.version) == (b"two", second.version)
    assert pg_origin.loads("item:wt") == 0  # written through: never loaded


async def test_if_version_is_the_origins_compare_and_set(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    gw = await gateway_factory(classes(pg_origin))
    created = await gw.stub.Set(pb.SetRequest(key="item:cas", value=b"a", if_version=0))
    assert created.outcome == pb.SET_OUTCOME_STORED
    again = await gw.stub.Set(pb.SetRequest(key="item:cas", value=b"b", if_version=0))
    assert (again.outcome, again.version) == (pb.SET_OUTCOME_VERSION_CONFLICT, created.version)
    stale = await gw.stub.Set(
        pb.SetRequest(key="item:cas", value=b"c", if_version=created.version + 100)
    )
    assert stale.outcome == pb.SET_OUTCOME_VERSION_CONFLICT
    ok = await gw.stub.Set(pb.SetRequest(key="item:cas", value=b"d", if_version=created.version))
    assert ok.outcome == pb.SET_OUTCOME_STORED
    assert await row(db, "item:cas") == (b"d", ok.version)
    got = await gw.stub.Get(pb.GetRequest(key="item:cas"))
    assert (got.value, got.version) == (b"d", ok.version)


async def test_concurrent_writers_never_leave_the_cache_older_than_the_origin(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    gateways = [await gateway_factory(classes(pg_origin)) for _ in range(3)]
    for round_ in range(4):
        key = f"item:race:{round_}"
        await asyncio.gather(
            *(
                gateways[i % 3].stub.Set(pb.SetRequest(key=key, value=f"w{i}".encode()))
                for i in range(24)
            ),
            *(gateways[i % 3].stub.Get(pb.GetRequest(key=key)) for i in range(12)),
        )
        truth = await row(db, key)
        assert truth is not None
        for gw in gateways:
            got = await gw.stub.Get(pb.GetRequest(key=key))
            assert (got.value, got.version) == truth


async def test_a_write_carrying_an_older_origin_version_is_not_applied(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess
) -> None:
    """What a slow writer or loader that the origin ordered first would deliver last."""
    gw = await gateway_factory(classes(pg_origin))
    new = await gw.stub.Set(pb.SetRequest(key="item:late", value=b"new"))
    kc = gw.server.policy.classify("item:late")
    writes = gw.server.cache._writes
    late = await writes.set(SetItem("item:late", b"old", kc, origin_version=new.version - 1))
    assert late.superseded and not late.stored
    got = await gw.stub.Get(pb.GetRequest(key="item:late"))
    assert (got.value, got.version) == (b"new", new.version)
    # The same state again (a reload) is applied: it renews the entry.
    same = await writes.set(SetItem("item:late", b"new", kc, origin_version=new.version))
    assert same.stored and same.version == new.version


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (
            pb.SetRequest(key="item:x", value=b"v", condition=pb.SET_CONDITION_IF_ABSENT),
            "if_version",
        ),
        (pb.SetRequest(key="item:x", value=b"v", lease_token=b"t" * 28), "lease_token"),
        (pb.SetRequest(key="item:x", value=b"v", origin_version=3), "origin numbers"),
    ],
)
async def test_set_options_a_write_through_class_cannot_pass_on_are_refused(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    request_: pb.SetRequest,
    says: str,
) -> None:
    gw = await gateway_factory(classes(pg_origin))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Set(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:  # and in a SetMany, before any is written
        await gw.stub.SetMany(
            pb.SetManyRequest(entries=[pb.SetRequest(key="item:y", value=b"v"), request_])
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (err.value.details() or "")
    assert pg_origin.calls("Store", "item:x") == pg_origin.calls("Store", "item:y") == []
