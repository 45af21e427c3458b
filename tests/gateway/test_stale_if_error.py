"""Stale-if-error against a real Redis: while Redis fails, a class with
stale_if_error_seconds answers STALE with the last copy past its freshness, up to the
bound and never as HIT; a class without it answers UNAVAILABLE; writes and invalidations
(this gateway's and other gateways') still remove the copy. The breaker is off here, so
what is tested is a failed read; test_breaker.py covers the open breaker."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from cachegw import AsyncClient, Status
from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.envelope import Envelope
from cachegw_gateway.lastknown import LastKnown
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.policy import KeyClass
from cachegw_gateway.stats import ClassCounters
from tests.conftest import GatewayFactory, eventually

TTL = 1.0
BOUND = 2.0

CLASSES = f"""
[redis.breaker]
enabled = false
[[classes]]
name = "sie"
patterns = ["sie:*"]
ttl_seconds = {TTL}
jitter = 0
l1_ttl_seconds = {TTL}
stale_if_error_seconds = {BOUND}
[[classes]]
name = "plain"
patterns = ["plain:*"]
ttl_seconds = {TTL}
jitter = 0
stale_seconds = 30
"""


async def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


async def _until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def test_stale_past_freshness_up_to_the_bound_never_hit(
    gateway_factory: GatewayFactory, redis_server: ManagedRedis
) -> None:
    gw = await gateway_factory(CLASSES)
    before = time.monotonic()
    await gw.stub.Set(pb.SetRequest(key="sie:a", value=b"old"))
    await gw.stub.Set(pb.SetRequest(key="plain:a", value=b"p"))
    written = time.monotonic()  # each fresh life (and L1 copy) ends before written + TTL
    redis_server.kill()

    await _until(written + TTL + 0.1)  # both are past their fresh life now
    got = await gw.stub.Get(pb.GetRequest(key="sie:a"), timeout=3)
    assert (got.status, got.value, got.ttl_remaining_ms, got.key_class) == (
        pb.STATUS_STALE,
        b"old",
        0,
        "sie",
    )
    many = await gw.stub.GetMany(pb.GetManyRequest(keys=["sie:a"]), timeout=3)
    assert (many.results[0].status, many.results[0].value) == (pb.STATUS_STALE, b"old")
    # No stale-if-error: its stale window is in Redis, which cannot be read.
    for allow_stale in (False, True):
        request = pb.GetRequest(key="plain:a", allow_stale=allow_stale)
        assert await _code(gw.stub.Get(request, timeout=3)) == grpc.StatusCode.UNAVAILABLE
    stats = await gw.stub.Stats(pb.StatsRequest(classes=["sie"]))
    assert stats.classes[0].stale_if_error == 2

    # STALE until the bound, then UNAVAILABLE: never HIT, never past the bound.
    answers: list[int] = []
    gone_at = 0.0
    deadline = before + TTL + BOUND + 5
    while time.monotonic() < deadline:
        try:
            got = await gw.stub.Get(pb.GetRequest(key="sie:a"), timeout=3)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            gone_at = time.monotonic() - before
            break
        answers.append(got.status)
        assert got.value == b"old"
        await asyncio.sleep(0.05)
    assert answers and set(answers) == {pb.STATUS_STALE}
    assert TTL + BOUND - 0.05 <= gone_at <= TTL + BOUND + 2, gone_at


async def test_writes_and_invalidations_remove_the_last_known_copy(
    gateway_factory: GatewayFactory, redis_server: ManagedRedis
) -> None:
    toml = CLASSES.replace(f"stale_if_error_seconds = {BOUND}", "stale_if_error_seconds = 600")
    gw = await gateway_factory(toml)
    other = await gateway_factory(toml)
    for key in ("sie:a", "sie:b", "sie:c", "sie:d", "sie:e", "sie:f"):
        await gw.stub.Set(pb.SetRequest(key=key, value=b"old", tags=[f"t-{key}"]))
    await gw.stub.Set(pb.SetRequest(key="sie:c", value=b"new"))
    await gw.stub.Invalidate(pb.InvalidateRequest(keys=["sie:a"]))
    await gw.stub.Invalidate(pb.InvalidateRequest(prefixes=["sie:b"]))
    await gw.stub.Invalidate(pb.InvalidateRequest(tags=["t-sie:e"]))
    # Another gateway's invalidation reaches this one as an event.
    received = gw.server.stats.invalidations_received
    await other.stub.Invalidate(pb.InvalidateRequest(keys=["sie:f"]))
    await eventually(lambda: gw.server.stats.invalidations_received > received)
    written = time.monotonic()
    redis_server.kill()

    await _until(written + TTL + 0.1)
    for key in ("sie:a", "sie:b", "sie:e", "sie:f"):
        code = await _code(gw.stub.Get(pb.GetRequest(key=key), timeout=3))
        assert code == grpc.StatusCode.UNAVAILABLE, key
    got = await gw.stub.Get(pb.GetRequest(key="sie:c"), timeout=3)
    assert (got.status, got.value) == (pb.STATUS_STALE, b"new")
    got = await gw.stub.Get(pb.GetRequest(key="sie:d"), timeout=3)
    assert (got.status, got.value) == (pb.STATUS_STALE, b"old")


async def test_a_class_invalidation_removes_its_copies_and_redis_back_drops_them(
    gateway_factory: GatewayFactory, redis_server: ManagedRedis
) -> None:
    toml = CLASSES.replace(f"stale_if_error_seconds = {BOUND}", "stale_if_error_seconds = 600")
    gw = await gateway_factory(toml)
    await gw.stub.Set(pb.SetRequest(key="sie:a", value=b"old"))
    await gw.stub.Invalidate(pb.InvalidateRequest(classes=["sie"]))
    await gw.stub.Set(pb.SetRequest(key="sie:b", value=b"old"))
    written = time.monotonic()  # after the last write: its L1 copy ends before written + TTL
    redis_server.kill()
    await _until(written + TTL + 0.1)
    assert await _code(gw.stub.Get(pb.GetRequest(key="sie:a"), timeout=3)) == (
        grpc.StatusCode.UNAVAILABLE
    )
    assert (await gw.stub.Get(pb.GetRequest(key="sie:b"), timeout=3)).status == pb.STATUS_STALE

    # The subscription back (events may have been missed meanwhile): copies dropped, so
    # the next outage has none to answer with.
    redis_server.restart()
    await eventually(lambda: gw.server.bus.live, 15)
    redis_server.kill()
    assert await _code(gw.stub.Get(pb.GetRequest(key="sie:b"), timeout=3)) == (
        grpc.StatusCode.UNAVAILABLE
    )


def test_last_known_copies_stay_within_their_byte_bound() -> None:
    last = LastKnown(1000, 10_000)
    kc = KeyClass("sie", 1000, 0.0, True, 1000, 1 << 20, stale_if_error_ms=60_000)
    counters = ClassCounters()
    for i in range(100):
        env = Envelope(1, 0, 0, 0, 0, (), b"x" * 500)
        last.keep(f"k{i}", kc, env, 1000, time.monotonic(), counters, ())
        assert last.copies.nbytes <= 10_000
    assert last.answer("k99") is not None
    assert last.answer("k0") is None  # evicted, least recently used


async def test_the_python_client_takes_a_stale_if_error_answer(
    gateway_factory: GatewayFactory, redis_server: ManagedRedis
) -> None:
    gw = await gateway_factory(CLASSES)
    loads = 0

    def loader() -> bytes:
        nonlocal loads
        loads += 1
        return b"from-origin"

    async with AsyncClient(gw.address, timeout=3) as client:
        await client.set("sie:a", b"old")
        await client.set("plain:a", b"p")
        written = time.monotonic()
        redis_server.kill()
        await _until(written + TTL + 0.1)
        entry = await client.lookup("sie:a")
        assert (entry.status, entry.value, entry.hit) == (Status.STALE, b"old", True)
        assert await client.get("sie:a") == b"old"
        # get_or_load takes the copy and spares the origin...
        assert await client.get_or_load("sie:a", loader) == b"old"
        assert loads == 0
        # ...and without one it loads by itself, as when the gateway is unreachable.
        assert await client.get_or_load("plain:a", loader) == b"from-origin"
        assert loads == 1
