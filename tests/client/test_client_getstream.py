"""GetStream (Gets multiplexed over one bidi stream) and the AsyncClient's stream_gets
path, against a real gateway: ids, L1 hits and Redis reads, per-Get errors and
deadlines, admission, drain."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cachegw import AsyncClient
from cachegw.errors import InvalidArgument, Unavailable
from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayFactory


async def test_gets_over_one_stream(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    client = AsyncClient(gw.address, stream_gets=True)
    try:
        await client.set_many([(f"s:{i}", f"v{i}".encode()) for i in range(50)])
        keys = [f"s:{i % 60}" for i in range(300)]  # L2 reads, L1 hits, ten misses
        values = await asyncio.gather(*(client.get(k) for k in keys))
        assert values == [f"v{i % 60}".encode() if i % 60 < 50 else None for i in range(300)]
        rpcs = {name: h.calls for name, h in gw.server.telemetry.latency.methods.items()}
        assert not rpcs.get("Get") and not rpcs.get("GetMany")  # all on the stream
        bad, good = await asyncio.gather(
            client.get("x" * 600), client.get("s:1"), return_exceptions=True
        )
        assert isinstance(bad, InvalidArgument) and good == b"v1"  # a bad key fails alone
        assert gw.server.admission.in_flight == 0
    finally:
        await client.close()


async def test_raw_stream_answers_each_id_and_refuses_when_full(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory()
    await gw.stub.Set(pb.SetRequest(key="hot", value=b"h"))
    await gw.stub.Get(pb.GetRequest(key="hot"))  # now in L1
    gw.server.admission._max_rpcs = 0  # full: only L1 hits are answered
    requests = [
        pb.GetStreamRequest(id=7, get=pb.GetRequest(key="hot")),
        pb.GetStreamRequest(id=8, get=pb.GetRequest(key="cold"), timeout_ms=1000),
    ]
    call = gw.stub.GetStream(iter(requests))
    answers = {a.id: a async for a in call}
    assert answers[7].code == 0 and answers[7].get.value == b"h"
    assert answers[8].code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "overloaded" in answers[8].message
    assert await call.code() == grpc.StatusCode.OK


async def test_drain_ends_the_stream_unavailable(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    client = AsyncClient(gw.address, stream_gets=True)
    try:
        await client.set("k", b"v")
        assert await client.get("k") == b"v"  # the stream is open
        gw.server.servicer.streams.drain()
        with pytest.raises(Unavailable, match="draining"):
            for _ in range(3):  # bounded: the stream ends, the next opens and is refused
                await client.get("k")
    finally:
        await client.close()
