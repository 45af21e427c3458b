"""Subscribe(since=...) across a failover: events that async replication lost are never
claimed replayable; the stream answers RESET instead."""

from __future__ import annotations

import asyncio
import time

import grpc

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import events
from tests.conftest import GatewayFactory, RunningGateway, eventually
from tests.topology import SentinelTopology, client

# Appends an event to the audit stream of the primary only: `set_repl(REPL_NONE)` keeps
# it from the replicas, exactly what a primary that dies before replicating leaves.
_UNREPLICATED_XADD = """
redis.set_repl(redis.REPL_NONE)
return redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
"""


async def _first_event(gw: RunningGateway, since: str) -> pb.InvalidationEvent:
    stream = gw.stub.Subscribe(pb.SubscribeRequest(since=since))
    try:
        event = await asyncio.wait_for(stream.read(), 5)
        assert isinstance(event, pb.InvalidationEvent)
        return event
    finally:
        stream.cancel()


async def _invalidate_when_writable(gw: RunningGateway, key: str) -> str:
    """Invalidate(key) until one is accepted (bounded): the new primary takes writes."""
    deadline = time.monotonic() + 30
    while True:
        try:
            reply = await gw.stub.Invalidate(pb.InvalidateRequest(keys=[key]), timeout=2)
            return reply.event_id
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert time.monotonic() < deadline, "writes did not resume after the failover"
            await asyncio.sleep(0.1)


async def test_events_lost_in_a_failover_answer_reset(
    sentinel_topology: SentinelTopology, gateway_factory: GatewayFactory
) -> None:
    topo = sentinel_topology
    gw: RunningGateway = await gateway_factory(redis_url=topo.url)
    await gw.stub.Invalidate(pb.InvalidateRequest(keys=["e1"]))
    kept = (await gw.stub.Invalidate(pb.InvalidateRequest(keys=["e2"]))).event_id
    await asyncio.to_thread(topo.wait_replicated)
    payload = events.make(origin="lost", keys=["e-lost"]).SerializeToString()
    with client(topo.address(topo.primary)) as c:
        raw = c.eval(_UNREPLICATED_XADD, 1, gw.server.store.events_key, payload)
    lost = raw.decode() if isinstance(raw, bytes) else str(raw)
    assert events.parse_id(lost) > events.parse_id(kept)
    # Before the failover the primary holds it: a plain replay.
    assert (await _first_event(gw, kept)).id == lost

    old = topo.address(topo.kill_primary())
    await eventually(lambda: not gw.server.bus.live)
    await asyncio.to_thread(topo.wait_for_new_primary, old)
    # Re-subscribed on the new primary (so no RESET below comes from a dead subscription).
    await eventually(lambda: gw.server.bus.live and gw.server.cache.fills_allowed, within=30)

    # The new primary's stream ends before `lost`: nothing after it can be vouched for.
    head = await _first_event(gw, lost)
    assert head.kind == pb.EVENT_KIND_RESET

    # New events now follow; `lost` sits between two entries without being one.
    after = await _invalidate_when_writable(gw, "e3")
    assert events.parse_id(after) > events.parse_id(lost)
    head = await _first_event(gw, lost)
    assert head.kind == pb.EVENT_KIND_RESET

    # What the new primary does hold is still replayed exactly, without a RESET.
    head = await _first_event(gw, kept)
    assert head.kind != pb.EVENT_KIND_RESET
    assert head.id == after
