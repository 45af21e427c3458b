"""Admission: calls and streams beyond the limits are refused at once, with the status and
metadata a client acts on, and nothing is done for them (admission.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import events
from cachegw_gateway.admission import RETRY_AFTER, Admission, peer_host
from cachegw_gateway.config import ServerConfig
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.subscriptions import SubscriberQueue
from tests.conftest import GatewayFactory, eventually

LEASES = """
[default_class]
lease_timeout_seconds = 3
max_wait_seconds = 4
"""


def lease_get(key: str) -> pb.GetRequest:
    return pb.GetRequest(key=key, lease=True)


async def test_calls_beyond_max_concurrent_rpcs_are_refused_at_once(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(LEASES, server__max_concurrent_rpcs=2)
    first = await gw.stub.Get(lease_get("k"))
    assert first.status == pb.STATUS_LEASED
    # Two callers wait server-side for the holder's fill: the gateway is full.
    waiters = [asyncio.ensure_future(gw.stub.Get(lease_get("k"), timeout=5)) for _ in range(2)]
    await eventually(lambda: gw.server.admission.in_flight == 2)
    call = gw.stub.Get(pb.GetRequest(key="other"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server.max_concurrent_rpcs is 2" in (refused.value.details() or "")
    trailers = dict(await call.trailing_metadata() or ())
    assert int(trailers[RETRY_AFTER]) > 0
    # The calls in flight are not disturbed: the fill answers them.
    filled = await gw.stub.Set(pb.SetRequest(key="k", value=b"v", lease_token=first.lease_token))
    assert filled.outcome == pb.SET_OUTCOME_STORED
    answers = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert [a.value for a in answers] == [b"v", b"v"]
    await eventually(lambda: gw.server.admission.in_flight == 0)
    stats = await gw.stub.Stats(pb.StatsRequest(), timeout=5)
    assert stats.admission.rpcs_shed == 1 and stats.admission.rpcs_in_flight == 1  # Stats


async def test_subscribe_streams_are_limited_in_all_and_per_client_host(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(server__max_subscribers=3, server__max_subscribers_per_peer=2)
    open_streams = []
    for _ in range(2):
        stream = gw.stub.Subscribe(pb.SubscribeRequest(prefixes=["s:"]))
        await stream.initial_metadata()
        open_streams.append(stream)
    third = gw.stub.Subscribe(pb.SubscribeRequest(prefixes=["s:"]))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await third.read()
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "127.0.0.1 has 2 Subscribe streams" in (refused.value.details() or "")
    # One ends: a new one is admitted in its place.
    open_streams.pop().cancel()
    await eventually(lambda: gw.server.stats.subscribers == 1)
    again = gw.stub.Subscribe(pb.SubscribeRequest(prefixes=["s:"]))
    await again.initial_metadata()
    open_streams.append(again)
    stats = await gw.stub.Stats(pb.StatsRequest(), timeout=5)
    assert stats.admission.subscribers_refused == 1
    for stream in open_streams:
        stream.cancel()


async def test_a_getmany_answer_over_max_response_bytes_is_refused(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(server__max_response_bytes=2000)
    keys = [f"big:{i}" for i in range(20)]
    for key in keys:
        await gw.stub.Set(pb.SetRequest(key=key, value=b"x" * 200))
    small = await gw.stub.GetMany(pb.GetManyRequest(keys=keys[:3]), timeout=5)
    assert [r.value for r in small.results] == [b"x" * 200] * 3
    for _ in range(2):  # from Redis, then from L1: refused either way
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gw.stub.GetMany(pb.GetManyRequest(keys=keys), timeout=5)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ask for fewer keys" in (refused.value.details() or "")
    assert gw.server.stats.answers_too_large == 2


class _Aborted(Exception):
    pass


class _Context:
    """The part of a servicer context admission uses, for a call already out of time."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float | None:
        return self.remaining

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted


async def test_a_call_whose_deadline_passed_in_the_queue_is_not_served() -> None:
    stats = GatewayStats()
    admission = Admission(ServerConfig(), stats)
    served: list[object] = []

    async def handler(request: object, context: object) -> bytes:
        served.append(request)
        return b""

    wrapped = admission._unary(handler)
    late = _Context(remaining=-0.01)
    with pytest.raises(_Aborted):
        await wrapped("req", late)  # type: ignore[arg-type]
    assert late.aborted is not None and late.aborted[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    assert not served and stats.rpcs_expired_on_arrival == 1
    await wrapped("req", _Context(remaining=1.0))  # type: ignore[arg-type]
    assert served == ["req"] and admission.in_flight == 0


def test_peer_hosts() -> None:
    assert peer_host("ipv4:127.0.0.1:5123") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5123") == "::1"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"


def test_a_subscriber_queue_is_bounded_in_bytes_too() -> None:
    stats = GatewayStats()
    queue = SubscriberQueue(
        events.EventFilter([], [], lambda key: "default"), 1000, "gw", stats, max_bytes=2000
    )
    queue.push(events.make(origin="gw", keys=["a"]))
    assert len(queue) == 1
    # One event naming many keys outweighs the byte bound: the buffer goes, RESET next.
    queue.push(events.make(origin="gw", keys=[f"k{i:04}" for i in range(400)]))
    assert len(queue) == 0
    first = asyncio.run(queue.get())
    assert events.is_reset(first)
