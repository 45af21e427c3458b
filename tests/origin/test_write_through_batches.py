"""Delete through the origin's Remove, and SetMany / Warmup entries through one batched
Store, for write-through classes: against the example origin over PostgreSQL, and the
misbehaving origin for the faults (removal.py, writethrough.py)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import envelope
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.writes import SetItem
from tests.conftest import GatewayFactory
from tests.origin.conftest import OriginProcess, put_row, row, start_origin

BAD_ORIGIN = str(Path(__file__).with_name("bad_origin.py"))


def toml(origin: str, *, negative: float = 30, timeout: float = 2.0) -> str:
    return f"""
[origin]
timeout_seconds = {timeout}

[[classes]]
name = "items"
patterns = ["item:*", "ok:*", "slowok:*", "unavailable:*", "garbage:*", "slow:*"]
ttl_seconds = 60
jitter = 0
origin = "{origin}"
read_policy = "read-through"
write_policy = "through"
negative_ttl_seconds = {negative}

[[classes]]
name = "bare"
patterns = ["bare:*"]
origin = "{origin}"
read_policy = "read-through"
write_policy = "through"

[[classes]]
name = "plain"
patterns = ["plain:*"]
"""


@pytest.fixture
def bad_origin(tmp_path: Path) -> Iterator[OriginProcess]:
    origin = start_origin([BAD_ORIGIN], tmp_path, "bad-origin")
    yield origin
    origin.stop(signal.SIGKILL)


def cached(redis_client: redis.Redis, key: str) -> bytes | None:
    raw = redis_client.get(f"cg:{{{key}}}")
    return raw if isinstance(raw, bytes) else None


# -- Delete through Remove -------------------------------------------------------------


async def test_delete_removes_from_the_origin_first_and_leaves_a_tombstone(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    redis_client: redis.Redis,
) -> None:
    version = await put_row(db, "item:del", b"kettle")
    a = await gateway_factory(toml(pg_origin.address))
    b = await gateway_factory(toml(pg_origin.address))
    for gw in (a, b):  # both hold it in L1
        got = await gw.stub.Get(pb.GetRequest(key="item:del"))
        assert (got.value, got.version) == (b"kettle", version)
    gone = await a.stub.Delete(pb.DeleteRequest(keys=["item:del"]))
    assert gone.deleted == 1
    assert await row(db, "item:del") is None
    assert pg_origin.calls("Remove", "item:del")
    raw = cached(redis_client, "item:del")
    assert raw is not None
    tomb = envelope.decode(raw)
    assert tomb.flags & envelope.NOT_FOUND and tomb.version > version  # the removal's version
    loads = pg_origin.loads("item:del")
    for gw in (a, b):  # every L1 copy went; the tombstone answers without a Load
        status = pb.STATUS_UNSPECIFIED
        for _ in range(200):  # bounded: until the event reached the gateway
            status = (await gw.stub.Get(pb.GetRequest(key="item:del"))).status
            if status == pb.STATUS_NOT_FOUND:
                break
            await asyncio.sleep(0.01)
        assert status == pb.STATUS_NOT_FOUND
    assert pg_origin.loads("item:del") == loads
    # What a load that read the old row delivers late (its version) never replaces it.
    kc = a.server.policy.classify("item:del")
    late = await a.server.cache._writes.set(
        SetItem("item:del", b"kettle", kc, origin_version=version)
    )
    assert late.superseded and not late.stored
    assert (await b.stub.Get(pb.GetRequest(key="item:del"))).status == pb.STATUS_NOT_FOUND
    again = await a.stub.Delete(pb.DeleteRequest(keys=["item:del"]))
    assert again.deleted == 0  # the origin had nothing to remove
    # A creating write replaces the tombstone at once.
    created = await b.stub.Set(pb.SetRequest(key="item:del", value=b"new"))
    got = await a.stub.Get(pb.GetRequest(key="item:del"))
    assert (got.status, got.value, got.version) == (pb.STATUS_HIT, b"new", created.version)


async def test_delete_many_mixes_origin_and_cache_only_keys(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    redis_client: redis.Redis,
) -> None:
    await put_row(db, "bare:1", b"one")
    gw = await gateway_factory(toml(pg_origin.address))
    await gw.stub.Get(pb.GetRequest(key="bare:1"))
    await gw.stub.Set(pb.SetRequest(key="plain:1", value=b"p"))
    removes = len(pg_origin.calls("Remove"))
    got = await gw.stub.DeleteMany(
        pb.DeleteManyRequest(keys=["bare:1", "bare:none", "plain:1", "plain:none"])
    )
    assert list(got.deleted) == [True, False, True, False] and got.event_id
    assert len(pg_origin.calls("Remove")) == removes + 1  # one Remove for both keys
    assert pg_origin.calls("Remove", "plain:1") == []
    assert await row(db, "bare:1") is None
    # No negative caching in "bare": nothing left in Redis, a read loads NOT_FOUND.
    assert cached(redis_client, "bare:1") is None and cached(redis_client, "plain:1") is None
    assert (await gw.stub.Get(pb.GetRequest(key="bare:1"))).status == pb.STATUS_NOT_FOUND


async def test_a_load_in_flight_during_a_delete_cannot_bring_the_value_back(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess
) -> None:
    """slowok:* loads take 0.6 s (version 7); the Delete lands meanwhile."""
    gw = await gateway_factory(toml(bad_origin.address))
    loading = asyncio.ensure_future(gw.stub.Get(pb.GetRequest(key="slowok:d"), timeout=10))
    for _ in range(100):
        if bad_origin.loads("slowok:d"):
            break
        await asyncio.sleep(0.02)
    await gw.stub.Delete(pb.DeleteRequest(keys=["slowok:d"]))
    loaded = await loading
    assert loaded.value == b"v:slowok:d"  # its answer: the origin's state when it read
    got = await gw.stub.Get(pb.GetRequest(key="slowok:d"))
    assert got.status == pb.STATUS_NOT_FOUND  # the tombstone, not the late fill
    assert bad_origin.loads("slowok:d") == 1


async def test_delete_failures_change_nothing_or_drop_the_entry(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(bad_origin.address, timeout=0.5))
    for key in ("unavailable:d", "garbage:d", "slow:d", "ok:other"):
        assert (await gw.stub.Set(pb.SetRequest(key=key, value=b"x"))).outcome == (
            pb.SET_OUTCOME_STORED
        )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Delete(pb.DeleteRequest(keys=["unavailable:d", "plain:z"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "nothing changed in the cache" in (err.value.details() or "")
    assert cached(redis_client, "unavailable:d") is not None  # unchanged
    for key, code in [
        ("garbage:d", grpc.StatusCode.FAILED_PRECONDITION),
        ("slow:d", grpc.StatusCode.DEADLINE_EXCEEDED),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.stub.Delete(pb.DeleteRequest(keys=[key]), timeout=5)
        assert err.value.code() == code
        assert "cached entries were dropped" in (err.value.details() or "")
        assert cached(redis_client, key) is None  # its state is unknown: dropped
    assert cached(redis_client, "ok:other") is not None


# -- SetMany and Warmup entries through one Store --------------------------------------


async def test_set_many_stores_through_the_origin_in_one_call(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    a = await gateway_factory(toml(pg_origin.address))
    b = await gateway_factory(toml(pg_origin.address))
    stores = len(pg_origin.calls("Store"))
    got = await a.stub.SetMany(
        pb.SetManyRequest(
            entries=[
                pb.SetRequest(key="item:m:1", value=b"one", tags=["t"]),
                pb.SetRequest(key="plain:m", value=b"cache only"),
                pb.SetRequest(key="item:m:2", value=b"two"),
                pb.SetRequest(key="item:m:3", value=b"three", if_version=0),
            ]
        )
    )
    assert len(pg_origin.calls("Store")) == stores + 1  # the three entries, one call
    assert pg_origin.calls("Store", "plain:m") == []
    results = list(got.results)
    assert all(r.code == 0 and r.response.outcome == pb.SET_OUTCOME_STORED for r in results)
    for key, value, r in [
        ("item:m:1", b"one", results[0]),
        ("item:m:2", b"two", results[2]),
        ("item:m:3", b"three", results[3]),
    ]:
        assert await row(db, key) == (value, r.response.version)
        read = await b.stub.Get(pb.GetRequest(key=key))
        assert (read.value, read.version) == (value, r.response.version)
    conflict = await a.stub.SetMany(
        pb.SetManyRequest(entries=[pb.SetRequest(key="item:m:3", value=b"x", if_version=0)])
    )
    assert conflict.results[0].response.outcome == pb.SET_OUTCOME_VERSION_CONFLICT
    assert await row(db, "item:m:3") == (b"three", results[3].response.version)


async def test_set_many_entries_are_all_or_nothing_each(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(toml(bad_origin.address, timeout=0.5))
    for key in ("ok:b", "ok:c", "ok:d", "ok:e"):
        await gw.stub.Set(pb.SetRequest(key=key, value=b"before"))
    before = {k: cached(redis_client, k) for k in ("ok:b", "ok:c")}
    got = await gw.stub.SetMany(
        pb.SetManyRequest(
            entries=[
                pb.SetRequest(key="ok:a", value=b"fine"),
                pb.SetRequest(key="ok:b", value=b"refuse"),
                pb.SetRequest(key="ok:c", value=b"conflict", if_version=1),
            ]
        )
    )
    a, b, c = got.results
    assert a.response.outcome == pb.SET_OUTCOME_STORED
    assert b.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not allowed" in b.error
    assert (c.response.outcome, c.response.version) == (pb.SET_OUTCOME_VERSION_CONFLICT, 3)
    assert {k: cached(redis_client, k) for k in ("ok:b", "ok:c")} == before  # unchanged
    # A failed call: every entry gets its status; nothing stored says nothing changed.
    down = await gw.stub.SetMany(
        pb.SetManyRequest(
            entries=[
                pb.SetRequest(key="ok:d", value=b"unavailable"),
                pb.SetRequest(key="ok:e", value=b"fine"),
            ]
        )
    )
    assert [r.code for r in down.results] == [grpc.StatusCode.UNAVAILABLE.value[0]] * 2
    assert cached(redis_client, "ok:d") is not None and cached(redis_client, "ok:e") is not None
    # No answer in time: the origin may have stored them, so their entries are dropped.
    slow = await gw.stub.SetMany(
        pb.SetManyRequest(
            entries=[
                pb.SetRequest(key="ok:d", value=b"slow"),
                pb.SetRequest(key="ok:e", value=b"fine"),
            ]
        ),
        timeout=5,
    )
    assert [r.code for r in slow.results] == [grpc.StatusCode.DEADLINE_EXCEEDED.value[0]] * 2
    assert "dropped" in slow.results[1].error
    assert cached(redis_client, "ok:d") is None and cached(redis_client, "ok:e") is None


async def test_warmup_entries_of_a_write_through_class_go_through_the_origin(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    gw = await gateway_factory(toml(pg_origin.address))
    stores = len(pg_origin.calls("Store"))
    got = await gw.stub.Warmup(
        pb.WarmupRequest(
            entries=[
                pb.WarmupEntry(key="item:we:1", value=b"one"),
                pb.WarmupEntry(key="item:we:2", value=b"two"),
                pb.WarmupEntry(key="plain:we", value=b"p"),
            ]
        ),
        timeout=10,
    )
    assert (got.stored, got.failed, got.done) == (3, 0, True)
    assert len(pg_origin.calls("Store")) == stores + 1
    for key, value in (("item:we:1", b"one"), ("item:we:2", b"two")):
        truth = await row(db, key)
        assert truth is not None and truth[0] == value
        read = await gw.stub.Get(pb.GetRequest(key=key))
        assert (read.value, read.version) == truth


async def test_redis_failing_after_the_origin_says_so_and_a_rebuild_stops(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    redis_server: ManagedRedis,
) -> None:
    gw = await gateway_factory(toml(pg_origin.address), redis__socket_timeout=0.5)
    await gw.stub.Set(pb.SetRequest(key="item:rf", value=b"v"))
    await put_row(db, "item:rf:warm", b"w")
    loads = pg_origin.loads()
    redis_server.stop()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Delete(pb.DeleteRequest(keys=["item:rf"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the origin removed 'item:rf' but redis did not" in (err.value.details() or "")
    assert await row(db, "item:rf") is None
    got = await gw.stub.SetMany(
        pb.SetManyRequest(entries=[pb.SetRequest(key="item:rf:2", value=b"two")]), timeout=5
    )
    assert got.results[0].code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "stored 'item:rf:2'" in got.results[0].error
    assert await row(db, "item:rf:2") is not None  # the origin has it
    warm = await gw.stub.Warmup(pb.WarmupRequest(keys=["item:rf:warm"]), timeout=5)
    assert (warm.failed, warm.done, warm.origin_loaded) == (1, False, 0)
    assert warm.error.startswith("UNAVAILABLE: ") and warm.resume
    assert pg_origin.loads() == loads  # nothing asked of the origin it could not store
