"""Each origin's circuit breaker shows in the Stats RPC and on /metrics: an origin that
cannot be reached opens it, the refused calls are counted, and a working origin's stays
closed."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc

from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayFactory
from tests.origin.flaky import Flaky, flaky

__all__ = ["flaky"]  # the fixture


async def test_the_breaker_of_each_origin_is_in_stats_and_metrics(
    gateway_factory: GatewayFactory, flaky: Flaky, dead_address: str
) -> None:
    dead = dead_address
    gw = await gateway_factory(
        f"""
[origin]
timeout_seconds = 1.0
[origin.breaker]
failures = 2
cooldown_seconds = 60

[[classes]]
name = "gone"
patterns = ["gone:*"]
origin = "{dead}"
read_policy = "read-through"

[[classes]]
name = "fine"
patterns = ["fine:*"]
origin = "{flaky.address}"
read_policy = "read-through"
""",
        telemetry__metrics_listen="127.0.0.1:0",
    )
    stats = await gw.stub.Stats(pb.StatsRequest())
    shown = {o.address: o.breaker_state for o in stats.origins}
    assert shown == {dead: pb.BREAKER_STATE_CLOSED, flaky.address: pb.BREAKER_STATE_CLOSED}
    assert (await gw.stub.Get(pb.GetRequest(key="fine:a"))).status == pb.STATUS_HIT
    details = []
    for i in range(4):
        try:
            await gw.stub.Get(pb.GetRequest(key=f"gone:{i}"))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            details.append(exc.details() or "")
    assert len(details) == 4 and "circuit breaker for it is open" in details[-1]
    stats = await gw.stub.Stats(pb.StatsRequest())
    by_address = {o.address: o for o in stats.origins}
    gone, fine = by_address[dead], by_address[flaky.address]
    assert (gone.breaker_state, gone.breaker_trips, gone.breaker_refused) == (
        pb.BREAKER_STATE_OPEN,
        1,
        2,
    )
    assert (fine.breaker_state, fine.breaker_trips, fine.breaker_refused) == (
        pb.BREAKER_STATE_CLOSED,
        0,
        0,
    )
    url = f"http://{gw.server.metrics_address}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert f'cachegw_origin_breaker_state{{origin="{dead}"}} 1.0' in text
    assert f'cachegw_origin_breaker_state{{origin="{flaky.address}"}} 0.0' in text
    assert f'cachegw_origin_breaker_trips_total{{origin="{dead}"}} 1.0' in text
    assert f'cachegw_origin_breaker_refused_total{{origin="{dead}"}} 2.0' in text
