"""Redis trouble degrades service: answers within the caller's deadline, L1 keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayFactory, RunningGateway, eventually
from tests.faults import ReplyDropper


async def _code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


async def _until_ok(call: Callable[[], Awaitable[Any]], within: float = 10.0) -> Any:
    """`call()`'s answer once it stops failing UNAVAILABLE (bounded by `within`)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


async def test_redis_down(gateway: RunningGateway, redis_server: ManagedRedis) -> None:
    await gateway.stub.Set(pb.SetRequest(key="cached", value=b"v"))
    redis_server.kill()

    started = time.monotonic()
    code = await _code_of(gateway.stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=3))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 3

    hit = await gateway.stub.Get(pb.GetRequest(key="cached"), timeout=3)
    assert (hit.status, hit.tier, hit.value) == (pb.STATUS_HIT, pb.TIER_L1, b"v")
    many = await gateway.stub.GetMany(pb.GetManyRequest(keys=["cached"]), timeout=3)
    assert many.results[0].tier == pb.TIER_L1

    assert await _code_of(gateway.stub.Get(pb.GetRequest(key="k"), timeout=3)) == (
        grpc.StatusCode.UNAVAILABLE
    )
    assert await _code_of(gateway.stub.Delete(pb.DeleteRequest(keys=["k"]), timeout=3)) == (
        grpc.StatusCode.UNAVAILABLE
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gateway.stub.GetMany(pb.GetManyRequest(keys=["cached", "k"]), timeout=3)
    assert "redis (L2) is unavailable" in (err.value.details() or "")
    many_tags = pb.InvalidateRequest(tags=["t1", "t2", "t3"])
    assert await _code_of(gateway.stub.Invalidate(many_tags, timeout=3)) == (
        grpc.StatusCode.UNAVAILABLE
    )

    # Service comes back with Redis, on the same port (once the circuit breaker, which
    # these failures may have opened, lets a probe through: within its cool-down).
    redis_server.restart()
    await _until_ok(lambda: gateway.stub.Set(pb.SetRequest(key="k", value=b"back"), timeout=5))
    assert (await gateway.stub.Get(pb.GetRequest(key="k"))).value == b"back"
    assert len(gateway.server.cache.reads) == 0


async def test_hung_redis_never_holds_a_caller_past_its_deadline(
    gateway: RunningGateway, redis_server: ManagedRedis
) -> None:
    await gateway.stub.Set(pb.SetRequest(key="warm", value=b"v"))  # connection pooled
    assert redis_server.pid is not None
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        for deadline in (0.3, 4.0):
            started = time.monotonic()
            code = await _code_of(
                gateway.stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=deadline)
            )
            assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
            assert time.monotonic() - started < deadline + 0.5
            gateway.server.l1.clear()
            started = time.monotonic()
            code = await _code_of(gateway.stub.Get(pb.GetRequest(key="warm"), timeout=deadline))
            assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
            assert time.monotonic() - started < deadline + 0.5
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    await _until_ok(lambda: gateway.stub.Set(pb.SetRequest(key="k", value=b"v2"), timeout=5))
    assert (await gateway.stub.Get(pb.GetRequest(key="k"))).value == b"v2"


# -- Redis answers with an error ------------------------------------------------------------
#
# Each kind of error reply maps to a documented status with a message that says what to
# do (docs/errors.md), is counted in Stats and /metrics, and marks Redis down where Redis
# cannot serve the gateway (READONLY, MASTERDOWN, LOADING, BUSY) but not where it can
# still serve reads (OOM).


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        body: str = reply.read().decode()
    return body


def _error_replies_metric(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "cachegw_redis_error_replies_total":
                out[s.labels["kind"]] = s.value
    return out


async def _failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


def _replication(server: ManagedRedis) -> dict[str, Any]:
    with redis.Redis.from_url(server.url) as client:
        info: dict[str, Any] = client.info("replication")
    return info


async def _link(server: ManagedRedis, status: str) -> None:
    await eventually(lambda: _replication(server).get("master_link_status") == status, 15)


async def test_a_replica_answers_writes_unavailable_readonly(
    gateway_factory: GatewayFactory, redis_server: ManagedRedis, redis_client: redis.Redis
) -> None:
    with ManagedRedis(extra_args=["--replicaof", "127.0.0.1", str(redis_server.port)]) as replica:
        await _link(replica, "up")
        gw = await gateway_factory(redis_url=replica.url, telemetry__metrics_listen="127.0.0.1:0")
        watch = gw.server.telemetry.redis_watch
        assert await watch.probe()

        calls = [
            gw.stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=3),
            gw.stub.Delete(pb.DeleteRequest(keys=["k"]), timeout=3),
            gw.stub.Invalidate(pb.InvalidateRequest(keys=["k"]), timeout=3),
        ]
        for call in calls:
            err = await _failure(call)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert "READONLY" in (err.details() or "")
            assert "point --redis-url at the primary" in (err.details() or "")
        # Reads work on a replica, and so does a Set script that ends in a version
        # conflict before writing; the gateway still reports Redis unusable, and its
        # probe (a PING answers fine on a replica) does not pretend otherwise.
        got = await gw.stub.Get(pb.GetRequest(key="k"), timeout=3)
        assert got.status == pb.STATUS_MISS
        conflict = await gw.stub.Set(pb.SetRequest(key="k", value=b"v", if_version=7))
        assert conflict.outcome == pb.SET_OUTCOME_VERSION_CONFLICT
        assert not await watch.probe()
        stats = await gw.stub.Stats(pb.StatsRequest())
        assert not stats.redis.up
        # One script each: Set, Delete, and Invalidate(keys) (delete and event together).
        assert stats.redis.error_replies["READONLY"] == 3
        assert set(stats.redis.error_replies) == {"READONLY"}
        assert stats.redis.errors >= 3
        address = gw.server.metrics_address
        assert address is not None
        text = await asyncio.to_thread(_scrape, address)
        assert _error_replies_metric(text) == {"READONLY": 3}
        assert "cachegw_redis_up 0.0" in text

        # A failover promotes it: the probe sees writes accepted again.
        with redis.Redis.from_url(replica.url) as client:
            client.replicaof("NO", "ONE")
        assert await watch.probe()
        stored = await gw.stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=3)
        assert stored.outcome == pb.SET_OUTCOME_STORED
        assert (await gw.stub.Stats(pb.StatsRequest())).redis.up


async def test_a_replica_without_its_primary_answers_unavailable_masterdown(
    gateway_factory: GatewayFactory,
) -> None:
    with ManagedRedis() as primary:
        of_primary = ["--replicaof", "127.0.0.1", str(primary.port)]
        with ManagedRedis(extra_args=[*of_primary, "--replica-serve-stale-data", "no"]) as replica:
            await _link(replica, "up")
            primary.stop()
            await _link(replica, "down")
            # Starting against it works (re-warming from hot keys fails quietly).
            gw = await gateway_factory(redis_url=replica.url)
            for call in (
                gw.stub.Get(pb.GetRequest(key="k"), timeout=3),
                gw.stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=3),
                gw.stub.GetMany(pb.GetManyRequest(keys=["a", "b"]), timeout=3),
            ):
                err = await _failure(call)
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert "MASTERDOWN" in (err.details() or "")
            stats = await gw.stub.Stats(pb.StatsRequest())
            assert stats.redis.error_replies["MASTERDOWN"] >= 3
            assert not stats.redis.up
            assert not await gw.server.telemetry.redis_watch.probe()


async def test_out_of_memory_is_resource_exhausted_and_reads_go_on(
    gateway_factory: GatewayFactory,
) -> None:
    small = ["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]
    with ManagedRedis(extra_args=small) as server:
        gw = await gateway_factory(redis_url=server.url)
        failed: grpc.aio.AioRpcError | None = None
        for i in range(1000):
            try:
                await gw.stub.Set(pb.SetRequest(key=f"fill:{i}", value=b"x" * 20_000), timeout=3)
            except grpc.aio.AioRpcError as exc:
                failed = exc
                break
        assert failed is not None, "4 MB of Redis never filled up"
        assert failed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, failed.details()
        assert "OOM" in (failed.details() or "") and "maxmemory" in (failed.details() or "")
        gw.server.l1.clear()
        got = await gw.stub.Get(pb.GetRequest(key="fill:0"), timeout=3)
        assert (got.status, got.tier) == (pb.STATUS_HIT, pb.TIER_L2)
        stats = await gw.stub.Stats(pb.StatsRequest())
        assert stats.redis.error_replies["OOM"] == 1
        assert stats.redis.up  # Redis is up: it serves reads and deletes
        assert await gw.server.telemetry.redis_watch.probe()


async def test_scripts_lost_by_redis_are_reloaded_without_a_check_per_call(
    gateway: RunningGateway, redis_client: redis.Redis
) -> None:
    await gateway.stub.Set(pb.SetRequest(key="a", value=b"v", tags=["t"]))
    redis_client.config_resetstat()
    redis_client.script_flush()  # as after a restart or a failover
    stored = await gateway.stub.Set(pb.SetRequest(key="b", value=b"v", tags=["t"]))
    assert stored.outcome == pb.SET_OUTCOME_STORED
    leased = await gateway.stub.Get(pb.GetRequest(key="c", lease=True))
    assert leased.status == pb.STATUS_LEASED
    filled = await gateway.stub.Set(
        pb.SetRequest(key="c", value=b"loaded", lease_token=leased.lease_token)
    )
    assert filled.outcome == pb.SET_OUTCOME_STORED
    removed = await gateway.stub.Invalidate(pb.InvalidateRequest(tags=["t"]))
    assert removed.removed == 2
    gateway.server.l1.clear()
    assert (await gateway.stub.Get(pb.GetRequest(key="c"))).value == b"loaded"
    commands = redis_client.info("commandstats")
    assert "cmdstat_script|exists" not in commands  # no round trip to check before a call
    assert commands["cmdstat_script|load"]["calls"] >= 3
    stats = await gateway.stub.Stats(pb.StatsRequest())
    assert dict(stats.redis.error_replies) == {}  # reloaded and retried: nothing failed


BUSY_SCRIPT = """
local start = tonumber(redis.call('TIME')[1])
while tonumber(redis.call('TIME')[1]) < start + tonumber(ARGV[1]) do end
return 1
"""


async def test_a_busy_redis_answers_unavailable_busy_within_the_deadline(
    gateway_factory: GatewayFactory,
) -> None:
    with ManagedRedis(extra_args=["--busy-reply-threshold", "50"]) as server:
        gw = await gateway_factory(redis_url=server.url)
        await gw.stub.Set(pb.SetRequest(key="k", value=b"v"))
        admin = redis.Redis.from_url(server.url)
        probe = redis.Redis.from_url(server.url)
        try:
            busy = asyncio.ensure_future(asyncio.to_thread(admin.eval, BUSY_SCRIPT, 0, 3))

            def answers_busy() -> bool:
                try:
                    probe.ping()
                except redis.ResponseError as exc:
                    return str(exc).startswith("BUSY")
                return False

            await eventually(answers_busy)
            gw.server.l1.clear()
            for call in (
                gw.stub.Set(pb.SetRequest(key="k", value=b"v2"), timeout=1),
                gw.stub.Get(pb.GetRequest(key="k"), timeout=1),
            ):
                started = time.monotonic()
                err = await _failure(call)
                assert time.monotonic() - started < 1
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert "BUSY" in (err.details() or "")
                assert "SCRIPT KILL" in (err.details() or "")
            stats = await gw.stub.Stats(pb.StatsRequest())
            assert stats.redis.error_replies["BUSY"] == 2
            assert not stats.redis.up
            assert await busy == 1
        finally:
            admin.close()
            probe.close()
        stored = await gw.stub.Set(pb.SetRequest(key="k", value=b"v3"), timeout=3)
        assert stored.outcome == pb.SET_OUTCOME_STORED


async def test_a_loading_redis_answers_unavailable_loading(
    gateway_factory: GatewayFactory,
) -> None:
    with ManagedRedis(extra_args=["--enable-debug-command", "yes"]) as server:
        gw = await gateway_factory(redis_url=server.url)
        await gw.stub.Set(pb.SetRequest(key="k", value=b"v"))
        admin = redis.Redis.from_url(server.url)
        probe = redis.Redis.from_url(server.url)
        try:
            admin.execute_command("DEBUG", "POPULATE", "10000")  # type: ignore[no-untyped-call]
            admin.config_set("key-load-delay", "150")  # µs per key: ~1.5 s of loading
            admin.config_set("loading-process-events-interval-bytes", "1024")
            reload = asyncio.ensure_future(
                asyncio.to_thread(admin.execute_command, "DEBUG", "RELOAD")
            )

            def loading() -> bool:
                try:
                    probe.ping()
                except redis.BusyLoadingError:
                    return True
                return False

            await eventually(loading)
            gw.server.l1.clear()
            for call in (
                gw.stub.Get(pb.GetRequest(key="k"), timeout=2),
                gw.stub.Set(pb.SetRequest(key="k", value=b"v2"), timeout=2),
            ):
                err = await _failure(call)
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
                assert "LOADING" in (err.details() or "")
            stats = await gw.stub.Stats(pb.StatsRequest())
            assert stats.redis.error_replies["LOADING"] == 2
            assert not stats.redis.up
            await reload
        finally:
            admin.close()
            probe.close()
        assert await gw.server.telemetry.redis_watch.probe()
        got = await gw.stub.Get(pb.GetRequest(key="k"), timeout=3)
        assert got.value == b"v"


# -- a reply lost after Redis ran the command --------------------------------------------


@pytest.fixture
async def dropper(redis_server: ManagedRedis) -> AsyncIterator[ReplyDropper]:
    async with ReplyDropper(redis_server.host, redis_server.port) as proxy:
        yield proxy


async def test_a_compare_and_set_whose_reply_was_lost_ran_once(
    gateway_factory: GatewayFactory, dropper: ReplyDropper
) -> None:
    gw = await gateway_factory(redis_url=dropper.url)
    first = await gw.stub.Set(pb.SetRequest(key="cas", value=b"v1"))
    assert first.version == 1
    dropper.drop_reply_to(b"second-value")
    err = await _failure(
        gw.stub.Set(pb.SetRequest(key="cas", value=b"second-value", if_version=1), timeout=5)
    )
    assert dropper.dropped == 1
    # Not VERSION_CONFLICT: that would be the write conflicting with itself, re-run.
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert "may or may not have been applied" in (err.details() or "")
    got = await gw.stub.Get(pb.GetRequest(key="cas"), timeout=3)
    assert (got.status, got.value, got.version) == (pb.STATUS_HIT, b"second-value", 2)


async def test_a_lease_fill_whose_reply_was_lost_is_not_refused_by_itself(
    gateway_factory: GatewayFactory, dropper: ReplyDropper
) -> None:
    gw = await gateway_factory(redis_url=dropper.url)
    # Redis knows the Set script, so the reply dropped below is the fill's, not NOSCRIPT.
    await gw.stub.Set(pb.SetRequest(key="other", value=b"v"))
    leased = await gw.stub.Get(pb.GetRequest(key="fill", lease=True))
    assert leased.status == pb.STATUS_LEASED
    dropper.drop_reply_to(b"the-loaded-value")
    err = await _failure(
        gw.stub.Set(
            pb.SetRequest(key="fill", value=b"the-loaded-value", lease_token=leased.lease_token),
            timeout=5,
        )
    )
    assert dropper.dropped == 1
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()  # not LEASE_INVALID
    assert "may or may not have been applied" in (err.details() or "")
    got = await gw.stub.Get(pb.GetRequest(key="fill"), timeout=3)
    assert (got.status, got.value, got.version) == (pb.STATUS_HIT, b"the-loaded-value", 1)


async def test_a_read_whose_reply_was_lost_is_retried_once(
    gateway_factory: GatewayFactory, dropper: ReplyDropper
) -> None:
    gw = await gateway_factory(redis_url=dropper.url)
    await gw.stub.Set(pb.SetRequest(key="read-me", value=b"v"))
    gw.server.l1.clear()
    dropper.drop_reply_to(b"{read-me}")
    got = await gw.stub.Get(pb.GetRequest(key="read-me"), timeout=5)
    assert dropper.dropped == 1
    assert (got.status, got.value) == (pb.STATUS_HIT, b"v")


async def test_a_lease_grant_whose_reply_was_lost_is_handed_back(
    gateway_factory: GatewayFactory, dropper: ReplyDropper
) -> None:
    gw = await gateway_factory(
        "[default_class]\nlease_timeout_seconds = 30\n", redis_url=dropper.url
    )
    dropper.drop_reply_to(b"{grant}:lease")
    err = await _failure(gw.stub.Get(pb.GetRequest(key="grant", lease=True), timeout=5))
    assert dropper.dropped == 1
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    # Redis granted the lease to a token nobody holds; the gateway released it, so the
    # next caller gets the lease now, not after the 30 s lease timeout.
    got = await gw.stub.Get(pb.GetRequest(key="grant", lease=True, max_wait_ms=2000), timeout=5)
    assert got.status == pb.STATUS_LEASED
