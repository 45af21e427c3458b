"""The circuit breaker against a real Redis: a hung (SIGSTOP) Redis opens it, calls then
fail fast while L1 still answers, Stats, /metrics and the log show it, and once Redis is
back a half-open probe closes it; a failure rate over the window opens it too."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayFactory, RunningGateway, eventually
from tests.faults import ReplyDropper

SOCKET_TIMEOUT = 2.0
# A refused call answers in microseconds; this bound only has to be well under the
# socket timeout that a call to the hung Redis waits for, on a loaded 2-core machine.
FAST = SOCKET_TIMEOUT / 2

HUNG = f"""
[redis]
socket_timeout = {SOCKET_TIMEOUT}
[redis.breaker]
failures = 3
failure_rate = 0
cooldown_seconds = 5
[telemetry]
metrics_listen = "127.0.0.1:0"
[[classes]]
name = "sie"
patterns = ["sie:*"]
ttl_seconds = 1
jitter = 0
stale_if_error_seconds = 600
"""


async def _failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def _stats(gw: RunningGateway) -> pb.RedisStats:
    stats = await gw.stub.Stats(pb.StatsRequest(), timeout=5)
    redis: pb.RedisStats = stats.redis
    return redis


def _scrape(gw: RunningGateway) -> dict[str, float]:
    address = gw.server.metrics_address
    assert address is not None
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("cachegw_breaker_")
    }


@contextlib.contextmanager
def _stopped(server: ManagedRedis) -> Iterator[None]:
    """redis-server hung (SIGSTOP) inside the block, resumed (SIGCONT) whatever happens."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


async def test_a_hung_redis_opens_the_breaker_calls_fail_fast_and_a_probe_closes_it(
    gateway_factory: GatewayFactory,
    redis_server: ManagedRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cachegw.redis")
    gw = await gateway_factory(HUNG)
    await gw.stub.Set(pb.SetRequest(key="hot", value=b"in-l1"))
    await gw.stub.Set(pb.SetRequest(key="sie:k", value=b"last-known"))
    assert (await _stats(gw)).breaker_state == pb.BREAKER_STATE_CLOSED

    with _stopped(redis_server):
        # Three writes wait for the socket timeout and fail: the third opens it.
        slow = await asyncio.gather(
            *(
                _failure(gw.stub.Set(pb.SetRequest(key=f"w{i}", value=b"v"), timeout=10))
                for i in range(3)
            )
        )
        assert [e.code() for e in slow] == [grpc.StatusCode.UNAVAILABLE] * 3
        redis = await _stats(gw)
        assert (redis.breaker_state, redis.breaker_trips) == (pb.BREAKER_STATE_OPEN, 1)

        # Now every call fails at once, saying why, without reaching Redis.
        # (One call after the other: a gRPC call starts when it is created.)
        calls: list[Callable[[], object]] = [
            lambda: gw.stub.Set(pb.SetRequest(key="x", value=b"v"), timeout=10),
            lambda: gw.stub.Get(pb.GetRequest(key="cold"), timeout=10),
            lambda: gw.stub.Get(pb.GetRequest(key="cold2", lease=True), timeout=10),
            lambda: gw.stub.Delete(pb.DeleteRequest(keys=["x"]), timeout=10),
        ]
        for call in calls:
            started = time.monotonic()
            err = await _failure(call())
            assert time.monotonic() - started < FAST
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert "circuit breaker is open" in (err.details() or ""), err.details()
            assert "3 consecutive failures" in (err.details() or "")

        # What L1 holds is still answered, as is stale-if-error's last known copy
        # (its fresh second is over: STALE, never HIT).
        started = time.monotonic()
        hot = await gw.stub.Get(pb.GetRequest(key="hot"), timeout=10)
        assert (hot.status, hot.tier, hot.value) == (pb.STATUS_HIT, pb.TIER_L1, b"in-l1")
        stale = await gw.stub.Get(pb.GetRequest(key="sie:k"), timeout=10)
        assert (stale.status, stale.value) == (pb.STATUS_STALE, b"last-known")
        assert time.monotonic() - started < FAST

        redis = await _stats(gw)
        assert redis.breaker_state == pb.BREAKER_STATE_OPEN
        assert redis.breaker_refused >= 5  # four calls, and the read of sie:k
        metrics = await asyncio.to_thread(_scrape, gw)
        assert metrics["cachegw_breaker_state"] == 1
        assert metrics["cachegw_breaker_trips_total"] == 1
        assert metrics["cachegw_breaker_refused_total"] >= 5

    # Redis is back: after the cool-down the health probe (a PING every 2 s) goes through
    # as the half-open probe and closes the breaker, with no call risked.
    async def closed() -> bool:
        return (await _stats(gw)).breaker_state == pb.BREAKER_STATE_CLOSED

    deadline = time.monotonic() + 15  # cool-down 5 s, then a PING within 2 s (+ slack)
    while not await closed():
        assert time.monotonic() < deadline, "the breaker did not close after Redis came back"
        await asyncio.sleep(0.1)
    stored = await gw.stub.Set(pb.SetRequest(key="x", value=b"back"), timeout=5)
    assert stored.outcome == pb.SET_OUTCOME_STORED
    assert (await asyncio.to_thread(_scrape, gw))["cachegw_breaker_state"] == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "cachegw.redis"]
    assert any("closed -> open: 3 consecutive failures" in m for m in logged), logged
    assert any("-> closed: the health probe was answered" in m for m in logged), logged


async def test_after_the_cooldown_the_next_call_is_the_probe(
    gateway_factory: GatewayFactory, redis_server: ManagedRedis
) -> None:
    gw = await gateway_factory(
        "[redis.breaker]\nfailures = 2\nfailure_rate = 0\ncooldown_seconds = 0.5\n"
    )
    # No health probe: its PING would be the half-open probe whenever it came first.
    await gw.server.telemetry.redis_watch.stop()
    await gw.stub.Set(pb.SetRequest(key="k", value=b"v"))
    redis_server.kill()
    for i in range(2):  # refused connections: fast failures, counted
        err = await _failure(gw.stub.Set(pb.SetRequest(key=f"w{i}", value=b"v"), timeout=5))
        assert "circuit breaker" not in (err.details() or "")
    err = await _failure(gw.stub.Set(pb.SetRequest(key="w", value=b"v"), timeout=5))
    assert "circuit breaker is open" in (err.details() or "")

    # Still down after the cool-down: the probe call fails and opens it again.
    await asyncio.sleep(0.6)
    err = await _failure(gw.stub.Set(pb.SetRequest(key="w", value=b"v"), timeout=5))
    assert "circuit breaker" not in (err.details() or "")  # it was sent: the probe
    redis = await _stats(gw)
    assert (redis.breaker_state, redis.breaker_trips) == (pb.BREAKER_STATE_OPEN, 2)

    redis_server.restart()
    await asyncio.sleep(0.6)
    stored = await gw.stub.Set(pb.SetRequest(key="w", value=b"back"), timeout=5)
    assert stored.outcome == pb.SET_OUTCOME_STORED
    assert (await _stats(gw)).breaker_state == pb.BREAKER_STATE_CLOSED


@pytest.fixture
async def dropper(redis_server: ManagedRedis) -> AsyncIterator[ReplyDropper]:
    async with ReplyDropper(redis_server.host, redis_server.port) as proxy:
        yield proxy


async def test_a_failure_rate_over_the_window_opens_it_without_consecutive_failures(
    gateway_factory: GatewayFactory, dropper: ReplyDropper
) -> None:
    # Two failures, then an answer, over and over: never 3 in a row, but 2 of 3 fail.
    gw = await gateway_factory(
        "[redis.breaker]\nfailures = 3\nfailure_rate = 0.5\nmin_calls = 12\n"
        "window_seconds = 600\ncooldown_seconds = 600\n",
        redis_url=dropper.url,
    )
    calls = 0
    for i, kind in enumerate(["lost", "lost", "answered"] * 10):
        if (await _stats(gw)).breaker_state == pb.BREAKER_STATE_OPEN:
            break
        if kind == "lost":
            marker = f"lost-{i}"
            dropper.drop_reply_to(marker.encode())
            err = await _failure(gw.stub.Set(pb.SetRequest(key=marker, value=b"v"), timeout=5))
            assert "circuit breaker" not in (err.details() or "")
        else:
            await gw.stub.Set(pb.SetRequest(key=f"ok-{i}", value=b"v"), timeout=5)
        calls += 1
        # Up to min_calls it stays closed, whatever the rate (start-up calls count too:
        # loading the scripts and reading the hot keys, two answers).
        if calls + 2 < 12:
            assert (await _stats(gw)).breaker_state == pb.BREAKER_STATE_CLOSED
    assert (await _stats(gw)).breaker_state == pb.BREAKER_STATE_OPEN
    assert calls + 2 >= 12
    err = await _failure(gw.stub.Set(pb.SetRequest(key="refused", value=b"v"), timeout=5))
    assert "circuit breaker is open" in (err.details() or "")
    assert "calls failed within 600s (failure_rate 0.5" in (err.details() or ""), err.details()


async def test_a_replica_refusing_writes_never_opens_it_one_without_its_primary_does(
    gateway_factory: GatewayFactory, redis_server: ManagedRedis
) -> None:
    toml = "[redis.breaker]\nfailures = 2\nfailure_rate = 0\ncooldown_seconds = 600\n"
    of_primary = ["--replicaof", "127.0.0.1", str(redis_server.port)]
    with ManagedRedis(extra_args=[*of_primary, "--replica-serve-stale-data", "no"]) as replica:
        await eventually(lambda: _link_status(replica) == "up", 15)
        gw = await gateway_factory(toml, redis_url=replica.url)
        # READONLY: Redis answers, reads work: the breaker stays closed.
        for i in range(4):
            err = await _failure(gw.stub.Set(pb.SetRequest(key=f"k{i}", value=b"v"), timeout=3))
            assert "READONLY" in (err.details() or ""), err.details()
            assert "circuit breaker" not in (err.details() or "")
        got = await gw.stub.Get(pb.GetRequest(key="k"), timeout=3)
        assert got.status == pb.STATUS_MISS
        assert (await _stats(gw)).breaker_state == pb.BREAKER_STATE_CLOSED

        # MASTERDOWN: the replica lost its primary and serves nothing: it opens.
        redis_server.stop()
        await eventually(lambda: _link_status(replica) == "down", 15)
        for i in range(2):
            err = await _failure(gw.stub.Get(pb.GetRequest(key=f"r{i}"), timeout=3))
            assert "MASTERDOWN" in (err.details() or ""), err.details()
            assert "circuit breaker" not in (err.details() or "")
        err = await _failure(gw.stub.Get(pb.GetRequest(key="r"), timeout=3))
        assert "circuit breaker is open" in (err.details() or "")
        assert "MASTERDOWN" in (err.details() or "")  # why it opened


def _link_status(server: ManagedRedis) -> str:
    with redis.Redis.from_url(server.url) as client:
        info = client.info("replication")
    return str(info.get("master_link_status", ""))
