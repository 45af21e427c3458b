"""Warmup from the origin (rebuild.py) against the example origin over PostgreSQL: keys,
prefixes (the origin's List, paged) and the hot set are loaded from the origin when Redis
lacks them, at a rate shared by every gateway, resumably; and against the misbehaving
origin for the faults; and the client's `rebuild()`, which calls it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis

from cachegw import AsyncClient, Client, InvalidArgument, RebuildProgress
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.writes import SetItem
from tests.conftest import GatewayCluster, GatewayFactory
from tests.origin.conftest import OriginProcess, put_row, start_origin

BAD_ORIGIN = str(Path(__file__).with_name("bad_origin.py"))


def toml(origin: str, *, rate: float = 1000.0, batch: int = 500, negative: float = 30) -> str:
    return f"""
[origin]
timeout_seconds = 2.0
warm_keys_per_second = {rate}
warm_batch_keys = {batch}

[[classes]]
name = "items"
patterns = ["item:*"]
ttl_seconds = 60
jitter = 0
origin = "{origin}"
read_policy = "read-through"
write_policy = "through"
negative_ttl_seconds = {negative}

[[classes]]
name = "plain"
patterns = ["plain:*"]
"""


@pytest.fixture
def bad_origin(tmp_path: Path) -> Iterator[OriginProcess]:
    origin = start_origin([BAD_ORIGIN], tmp_path, "bad-origin")
    yield origin
    origin.stop(signal.SIGKILL)


def class_stats(resp: pb.StatsResponse, name: str) -> pb.ClassStats:
    return next(c for c in resp.classes if c.name == name)


def lists(origin: OriginProcess) -> int:
    return len(origin.calls("List"))


async def test_warmup_by_keys_loads_only_what_redis_lacks_in_one_load(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    keys = [f"item:k:{i}" for i in range(10)]
    versions = {k: await put_row(db, k, k.encode()) for k in keys}
    a, b = (
        await gateway_factory(toml(pg_origin.address)),
        await gateway_factory(toml(pg_origin.address)),
    )
    await a.stub.Get(pb.GetRequest(key=keys[0]))  # one cached already
    await a.stub.Set(pb.SetRequest(key="plain:x", value=b"p"))
    loads = pg_origin.loads()
    got = await a.stub.Warmup(
        pb.WarmupRequest(keys=[*keys, "item:k:none", "plain:x", "plain:y"]), timeout=10
    )
    assert (got.loaded, got.origin_loaded, got.not_found, got.missing) == (2, 9, 1, 1)
    assert (got.failed, got.skipped, got.done, got.resume, got.error) == (0, 0, True, "", "")
    assert pg_origin.loads() == loads + 1  # the 10 missing keys in one Load
    for key in keys:  # the other gateway reads what was stored, with the origin's versions
        read = await b.stub.Get(pb.GetRequest(key=key))
        assert (read.status, read.value, read.version) == (
            pb.STATUS_HIT,
            key.encode(),
            versions[key],
        )
        assert read.tier in (pb.TIER_L1, pb.TIER_L2)
    none = await b.stub.Get(pb.GetRequest(key="item:k:none"))
    assert none.status == pb.STATUS_NOT_FOUND and none.tier != pb.TIER_ORIGIN  # the tombstone
    assert pg_origin.loads() == loads + 1
    stats = class_stats(await a.stub.Stats(pb.StatsRequest()), "items")
    assert (stats.warm_loaded, stats.warm_not_found, stats.warm_failed) == (9, 1, 0)
    again = await a.stub.Warmup(pb.WarmupRequest(keys=keys), timeout=10)  # idempotent
    assert (again.loaded, again.origin_loaded, again.done) == (10, 0, True)
    assert pg_origin.loads() == loads + 1


async def test_warmup_by_prefix_lists_the_origin_page_by_page(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    redis_client: redis.Redis,
) -> None:
    keys = [f"item:p:{i:02}" for i in range(10)]
    for key in keys:
        await put_row(db, key, b"v" + key.encode())
    await put_row(db, "item:q:outside", b"not under the prefix")
    gw = await gateway_factory(toml(pg_origin.address, batch=4))
    listed, loads = lists(pg_origin), pg_origin.loads()
    got = await gw.stub.Warmup(pb.WarmupRequest(prefixes=["item:p:"]), timeout=10)
    assert (got.listed, got.origin_loaded, got.loaded, got.done) == (10, 10, 0, True)
    assert lists(pg_origin) == listed + 3  # pages of 4, 4 and 2 keys
    assert pg_origin.loads() == loads + 3  # a Load per page
    for key in keys:
        assert redis_client.exists(f"cg:{{{key}}}")
    assert not redis_client.exists("cg:{item:q:outside}")
    # The cache lost one (a flush, a node): a second rebuild loads that one alone.
    redis_client.delete("cg:{item:p:03}")
    again = await gw.stub.Warmup(pb.WarmupRequest(prefixes=["item:p:"]), timeout=10)
    assert (again.listed, again.origin_loaded, again.loaded, again.done) == (10, 1, 9, True)
    assert pg_origin.loads() == loads + 4
    assert pg_origin.loads("item:p:03") == 2


async def test_the_rate_is_shared_by_gateways_and_a_stopped_rebuild_resumes(
    gateway_cluster: GatewayCluster,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    redis_client: redis.Redis,
) -> None:
    """One token a 100 s, three a batch: the first call takes the bucket's three at once,
    then stops before its deadline instead of waiting; the other gateway finds the
    bucket empty (shared in Redis); once it has room again the rebuild carries on from
    where it stopped."""
    keys = [f"item:r:{i}" for i in range(7)]
    for key in keys:
        await put_row(db, key, key.encode())
    gw1, gw2 = gateway_cluster(2, toml(pg_origin.address, rate=0.01, batch=3))
    channels = [grpc.aio.insecure_channel(gw.address) for gw in (gw1, gw2)]
    try:
        one, two = (cache_pb2_grpc.CacheServiceStub(c) for c in channels)
        request = pb.WarmupRequest(prefixes=["item:r:"])
        first = await one.Warmup(request, timeout=3)
        assert (first.origin_loaded, first.done, first.failed) == (3, False, 0)
        assert first.retry_after_ms > 10_000 and first.resume
        other = await two.Warmup(
            pb.WarmupRequest(prefixes=["item:r:"], resume=first.resume), timeout=3
        )
        assert (other.origin_loaded, other.done, other.resume) == (0, False, first.resume)
        assert other.retry_after_ms > 10_000
        # An operator refills the bucket (it is one Redis key per origin).
        assert redis_client.delete(f"cg:originrate:{pg_origin.address}") == 1
        second = await two.Warmup(
            pb.WarmupRequest(prefixes=["item:r:"], resume=other.resume), timeout=3
        )
        assert (second.origin_loaded, second.done) == (3, False)
        redis_client.delete(f"cg:originrate:{pg_origin.address}")
        last = await one.Warmup(
            pb.WarmupRequest(prefixes=["item:r:"], resume=second.resume), timeout=3
        )
        assert (last.origin_loaded, last.done, last.resume) == (1, True, "")
    finally:
        for c in channels:
            await c.close(None)
    for key in keys:  # each loaded once, across both gateways and four calls
        assert pg_origin.loads(key) == 1
        assert redis_client.exists(f"cg:{{{key}}}")


async def test_the_hot_set_is_rebuilt_after_redis_lost_everything(
    gateway_factory: GatewayFactory,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    redis_client: redis.Redis,
) -> None:
    hot = [f"item:h:{i}" for i in range(5)]
    for key in hot:
        await put_row(db, key, key.encode())
    gw = await gateway_factory(toml(pg_origin.address))
    for _ in range(3):
        for key in hot:
            await gw.stub.Get(pb.GetRequest(key=key))
    redis_client.flushall()  # the node and the deployment's hot-key record with it
    got = await gw.stub.Warmup(pb.WarmupRequest(hot_keys=True), timeout=10)
    assert got.origin_loaded == len(hot) and got.done  # from this gateway's own sketch
    for key in hot:
        assert redis_client.exists(f"cg:{{{key}}}")
        assert pg_origin.loads(key) == 2


async def test_an_origin_without_list_is_unimplemented_before_anything_loads(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess
) -> None:
    gw = await gateway_factory(toml(bad_origin.address).replace("item:*", "ok:*"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Warmup(pb.WarmupRequest(keys=["ok:first"], prefixes=["ok:"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "does not implement List" in (err.value.details() or "")
    assert bad_origin.loads() == 0
    got = await gw.stub.Warmup(pb.WarmupRequest(keys=["ok:first"]), timeout=5)
    assert (got.origin_loaded, got.done) == (1, True)
    with pytest.raises(grpc.aio.AioRpcError) as err:  # no class with an origin holds it
        await gw.stub.Warmup(pb.WarmupRequest(prefixes=["plain:"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Warmup(pb.WarmupRequest(keys=["ok:a"], resume="nonsense"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("unavailable:x", "UNAVAILABLE: "),
        ("garbage:x", "FAILED_PRECONDITION: "),
        ("slow:x", "DEADLINE_EXCEEDED: "),
    ],
)
async def test_an_origin_failure_stops_the_rebuild_and_caches_nothing_of_the_batch(
    gateway_factory: GatewayFactory,
    bad_origin: OriginProcess,
    redis_client: redis.Redis,
    bad: str,
    says: str,
) -> None:
    config = toml(bad_origin.address, batch=3).replace("item:*", "ok:*")
    config = config.replace("timeout_seconds = 2.0", "timeout_seconds = 0.5")
    gw = await gateway_factory(
        config.replace('"ok:*"', '"ok:*", "unavailable:*", "garbage:*", "slow:*"')
    )
    keys = ["ok:1", "ok:2", bad, "ok:3", "ok:4"]
    got = await gw.stub.Warmup(pb.WarmupRequest(keys=keys), timeout=10)
    assert (got.origin_loaded, got.failed, got.done) == (0, 3, False)
    assert got.error.startswith(says) and got.resume
    for key in keys:  # nothing cached, no lease left behind
        assert not redis_client.exists(f"cg:{{{key}}}", f"cg:{{{key}}}:lease")
    resumed = await gw.stub.Warmup(
        pb.WarmupRequest(keys=["ok:1", "ok:2", "ok:3", "ok:4"]), timeout=10
    )
    assert (resumed.origin_loaded, resumed.done) == (4, True)
    stats = class_stats(await gw.stub.Stats(pb.StatsRequest()), "items")
    assert (stats.warm_failed, stats.warm_loaded) == (3, 4)


async def test_a_write_during_a_rebuilds_load_is_never_replaced_by_it(
    gateway_factory: GatewayFactory, bad_origin: OriginProcess
) -> None:
    """slowok:* loads (version 7) take 0.6 s; a write-through Set lands meanwhile (its
    version is the bad origin's 1000 + n): the rebuild's fill must not replace it."""
    gw = await gateway_factory(toml(bad_origin.address).replace("item:*", "slowok:*"))
    warming = asyncio.ensure_future(gw.stub.Warmup(pb.WarmupRequest(keys=["slowok:w"]), timeout=10))
    for _ in range(100):  # bounded: until the Load is in flight
        if bad_origin.loads("slowok:w"):
            break
        await asyncio.sleep(0.02)
    written = await gw.stub.Set(pb.SetRequest(key="slowok:w", value=b"written"))
    got = await warming
    assert got.skipped + got.origin_loaded == 1 and got.done
    read = await gw.stub.Get(pb.GetRequest(key="slowok:w"))
    assert (read.value, read.version) == (b"written", written.version)
    # And a load carrying an older version than the cached one is never applied.
    kc = gw.server.policy.classify("slowok:w")
    late = await gw.server.cache._writes.set(SetItem("slowok:w", b"old", kc, origin_version=7))
    assert late.superseded and not late.stored


async def warm_until_done(
    stub: cache_pb2_grpc.CacheServiceAsyncStub, prefixes: list[str]
) -> list[pb.WarmupResponse]:
    answers: list[pb.WarmupResponse] = []
    resume = ""
    for _ in range(50):  # bounded
        got = await stub.Warmup(pb.WarmupRequest(prefixes=prefixes, resume=resume), timeout=5)
        answers.append(got)
        if got.done:
            return answers
        resume = got.resume
    raise AssertionError(f"not done after 50 calls: {answers[-1]}")


async def test_a_flushed_cache_is_rebuilt_by_two_gateways_even_when_one_is_killed(
    gateway_cluster: GatewayCluster,
    pg_origin: OriginProcess,
    db: asyncpg.Connection,
    redis_client: redis.Redis,
) -> None:
    """bench_rebuild.py, shortened: 2,000 keys, Redis flushed, two `cachegw serve`
    processes rebuild half the prefixes each (5 s calls, resumed); one is SIGKILLed
    mid-rebuild and the other, called for everything, finishes it. Every key is cached
    and the reads right after never reach the origin."""
    n = 2000
    await db.execute(
        "INSERT INTO items (key, value, tags, version) "
        "SELECT 'item:b:' || lpad(i::text, 4, '0'), convert_to('v' || i, 'UTF8'), '{}', "
        "nextval('items_versions') FROM generate_series(0, $1 - 1) AS i",
        n,
    )
    gw1, gw2 = gateway_cluster(2, toml(pg_origin.address, rate=2000, batch=100))
    redis_client.flushall()
    loads = len(pg_origin.calls("Load"))
    channels = [grpc.aio.insecure_channel(gw.address) for gw in (gw1, gw2)]
    try:
        one, two = (cache_pb2_grpc.CacheServiceStub(c) for c in channels)
        killed = asyncio.ensure_future(
            warm_until_done(one, [f"item:b:{d}" for d in range(1)])  # a fifth of the keys
        )
        for _ in range(500):  # bounded: until gw1 has loaded some
            if len(redis_client.keys("cg:{item:b:0*}")) >= 100:
                break
            await asyncio.sleep(0.01)
        gw1.stop(signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError):
            await killed
        answers = await warm_until_done(two, ["item:b:"])
        skipped = sum(a.skipped for a in answers)
        if skipped:  # keys gw1 held leases on: free once those expire (3 s)
            await asyncio.sleep(3.5)
            answers += await warm_until_done(two, ["item:b:"])
        assert answers[-1].skipped == 0 and sum(a.failed for a in answers) == 0
        reads = await two.GetMany(
            pb.GetManyRequest(keys=[f"item:b:{i:04}" for i in range(0, n, 7)]), timeout=10
        )
        assert {r.tier for r in reads.results} <= {pb.TIER_L1, pb.TIER_L2}
        assert all(r.status == pb.STATUS_HIT for r in reads.results)
    finally:
        for c in channels:
            await c.close(None)
    for i in range(0, n, 97):
        assert redis_client.exists(f"cg:{{item:b:{i:04}}}")
    # Each key loaded once, but those of gw1's batch in flight when it died.
    assert len(pg_origin.calls("Load")) - loads <= n // 100 + 2


async def test_the_clients_rebuild_calls_warmup_by_prefix(
    gateway_factory: GatewayFactory, pg_origin: OriginProcess, db: asyncpg.Connection
) -> None:
    for i in range(6):
        await put_row(db, f"item:c:{i}", b"v")
    gw = await gateway_factory(toml(pg_origin.address, batch=4))
    async with AsyncClient(gw.address) as client:
        got = await client.rebuild(prefixes=["item:c:"], timeout=10)
        assert (got.done, got.resume, got.listed, got.origin_loaded, got.error) == (
            True,
            "",
            6,
            6,
            "",
        )
        with pytest.raises(InvalidArgument, match="keys, prefixes or hot_keys"):
            await client.rebuild()
        with pytest.raises(TypeError, match="resume"):
            await client.rebuild(prefixes=["item:c:"], resume=None)  # type: ignore[arg-type]

    def sync() -> RebuildProgress:
        with Client(gw.address) as client:
            return client.rebuild(["item:c:0", "item:c:none"], timeout=10)

    again = await asyncio.to_thread(sync)  # Redis holds item:c:0 now
    assert (again.done, again.loaded, again.origin_loaded, again.not_found) == (True, 1, 0, 1)
