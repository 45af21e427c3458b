"""SetMany, DeleteMany and conditional Sets over real gRPC and a real redis-server."""

from __future__ import annotations

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayFactory, RunningGateway, eventually
from tests.gateway.test_write_races import commands_sent

CLASSES = """
[[classes]]
name = "item"
patterns = ["item:*"]
ttl_seconds = 60
"""


async def test_set_conditions(gateway: RunningGateway) -> None:
    stub = gateway.stub
    absent = pb.SET_CONDITION_IF_ABSENT
    present = pb.SET_CONDITION_IF_PRESENT
    out = await stub.Set(pb.SetRequest(key="c:1", value=b"a", condition=present))
    assert (out.outcome, out.version) == (pb.SET_OUTCOME_CONDITION_FAILED, 0)
    out = await stub.Set(pb.SetRequest(key="c:1", value=b"a", condition=absent))
    assert (out.outcome, out.version) == (pb.SET_OUTCOME_STORED, 1)
    out = await stub.Set(pb.SetRequest(key="c:1", value=b"b", condition=absent))
    assert (out.outcome, out.version) == (pb.SET_OUTCOME_CONDITION_FAILED, 1)
    assert (await stub.Get(pb.GetRequest(key="c:1"))).value == b"a"
    out = await stub.Set(pb.SetRequest(key="c:1", value=b"c", condition=present))
    assert (out.outcome, out.version) == (pb.SET_OUTCOME_STORED, 2)
    # With a version as well: both must hold.
    out = await stub.Set(pb.SetRequest(key="c:1", value=b"d", condition=present, if_version=1))
    assert out.outcome == pb.SET_OUTCOME_VERSION_CONFLICT
    assert (await stub.Get(pb.GetRequest(key="c:1"))).value == b"c"


async def test_a_value_of_an_invalidated_class_counts_as_absent(
    gateway_factory: GatewayFactory,
) -> None:
    gw: RunningGateway = await gateway_factory(CLASSES)
    await gw.stub.Set(pb.SetRequest(key="item:1", value=b"old"))
    await gw.stub.Invalidate(pb.InvalidateRequest(classes=["item"]))
    out = await gw.stub.Set(
        pb.SetRequest(key="item:1", value=b"new", condition=pb.SET_CONDITION_IF_ABSENT)
    )
    assert out.outcome == pb.SET_OUTCOME_STORED
    assert (await gw.stub.Get(pb.GetRequest(key="item:1"))).value == b"new"


async def test_only_one_of_many_concurrent_set_if_absent_wins(
    gateway_factory: GatewayFactory,
) -> None:
    gws = [await gateway_factory() for _ in range(3)]
    calls = [
        gws[i % 3].stub.Set(
            pb.SetRequest(key="once", value=str(i).encode(), condition=pb.SET_CONDITION_IF_ABSENT)
        )
        for i in range(60)
    ]
    outcomes = [(await c).outcome for c in calls]
    assert outcomes.count(pb.SET_OUTCOME_STORED) == 1
    assert outcomes.count(pb.SET_OUTCOME_CONDITION_FAILED) == 59


async def test_set_many_answers_each_entry_in_one_command(
    gateway: RunningGateway, redis_server: ManagedRedis
) -> None:
    stub = gateway.stub
    await stub.Set(pb.SetRequest(key="m:taken", value=b"x"))
    await stub.Set(pb.SetRequest(key="m:v", value=b"x"))  # version 1
    entries = [
        pb.SetRequest(key="m:new", value=b"1", tags=["t"]),
        pb.SetRequest(key="m:taken", value=b"2", condition=pb.SET_CONDITION_IF_ABSENT),
        pb.SetRequest(key="m:v", value=b"3", if_version=9),
        pb.SetRequest(key="m:lease", value=b"4", lease_token=b"\x00" * 28),
        pb.SetRequest(key="m:v", value=b"5", if_version=1, ttl_ms=5000),
    ]
    async with commands_sent(redis_server.url) as seen:
        answer = await stub.SetMany(pb.SetManyRequest(entries=entries))
    assert seen == ["EVALSHA"] * len(entries)  # pipelined: one round trip
    outcomes = [r.response.outcome for r in answer.results]
    assert outcomes == [
        pb.SET_OUTCOME_STORED,
        pb.SET_OUTCOME_CONDITION_FAILED,
        pb.SET_OUTCOME_VERSION_CONFLICT,
        pb.SET_OUTCOME_LEASE_INVALID,
        pb.SET_OUTCOME_STORED,
    ]
    assert all(r.code == 0 and not r.error for r in answer.results)
    assert answer.results[4].response.version == 2
    assert 0 < answer.results[4].response.ttl_ms <= 5000
    got = await stub.GetMany(pb.GetManyRequest(keys=["m:new", "m:taken", "m:v"]))
    assert [r.value for r in got.results] == [b"1", b"x", b"5"]
    assert (await stub.Invalidate(pb.InvalidateRequest(tags=["t"]))).removed == 1


async def test_set_many_under_partial_failure_says_which_entries_failed(
    gateway_factory: GatewayFactory,
) -> None:
    # Redis refuses writes once it is over maxmemory: the first entries of a batch land,
    # the rest are refused (OOM) entry by entry.
    small = ["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]
    with ManagedRedis(extra_args=small) as server:
        gw: RunningGateway = await gateway_factory(redis_url=server.url)
        entries = [pb.SetRequest(key=f"big:{i}", value=b"x" * 100_000) for i in range(60)]
        answer = await gw.stub.SetMany(pb.SetManyRequest(entries=entries), timeout=10)
        stored = [r.response.outcome == pb.SET_OUTCOME_STORED for r in answer.results]
        failed = [r.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for r in answer.results]
        assert any(stored) and any(failed)
        assert all(s != f for s, f in zip(stored, failed, strict=True))  # each one or the other
        assert all("OOM" in r.error for r, f in zip(answer.results, failed, strict=True) if f)
        with redis.Redis.from_url(server.url) as client:
            for i, ok in enumerate(stored):
                assert bool(client.exists(gw.server.store.redis_key(f"big:{i}"))) == ok


async def test_set_many_checks_every_entry_before_writing_any(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    entries = [
        pb.SetRequest(key="ok:1", value=b"1"),
        pb.SetRequest(key="", value=b"2"),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gateway.stub.SetMany(pb.SetManyRequest(entries=entries))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entries[1].key" in (err.value.details() or "")
    assert not redis_client.exists(gateway.server.store.redis_key("ok:1"))
    too_many = [pb.SetRequest(key=f"k{i}", value=b"v") for i in range(1001)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gateway.stub.SetMany(pb.SetManyRequest(entries=too_many))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await gateway.stub.SetMany(pb.SetManyRequest())).results == []


async def test_set_many_replacing_values_evicts_other_gateways_copies(
    gateway_factory: GatewayFactory,
) -> None:
    a: RunningGateway = await gateway_factory()
    b: RunningGateway = await gateway_factory()
    await a.stub.SetMany(
        pb.SetManyRequest(entries=[pb.SetRequest(key=f"r:{i}", value=b"old") for i in range(5)])
    )
    for i in range(5):
        assert (await b.stub.Get(pb.GetRequest(key=f"r:{i}"))).value == b"old"
    await a.stub.SetMany(
        pb.SetManyRequest(entries=[pb.SetRequest(key=f"r:{i}", value=b"new") for i in range(5)])
    )
    await eventually(lambda: not any(f"r:{i}" in b.server.l1 for i in range(5)))
    got = await b.stub.GetMany(pb.GetManyRequest(keys=[f"r:{i}" for i in range(5)]))
    assert [r.value for r in got.results] == [b"new"] * 5


async def test_delete_many_says_which_keys_existed(
    gateway_factory: GatewayFactory, redis_server: ManagedRedis
) -> None:
    a: RunningGateway = await gateway_factory()
    b: RunningGateway = await gateway_factory()
    for key in ("d:1", "d:3"):
        await a.stub.Set(pb.SetRequest(key=key, value=b"v"))
        assert (await b.stub.Get(pb.GetRequest(key=key))).value == b"v"
    async with commands_sent(redis_server.url) as seen:
        out = await a.stub.DeleteMany(pb.DeleteManyRequest(keys=["d:1", "d:2", "d:3"]))
    assert seen == ["EVALSHA"]
    assert list(out.deleted) == [True, False, True]
    assert out.event_id
    await eventually(lambda: "d:1" not in b.server.l1 and "d:3" not in b.server.l1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await a.stub.DeleteMany(pb.DeleteManyRequest(keys=["ok", ""]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
