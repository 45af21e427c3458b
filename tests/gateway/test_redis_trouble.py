"""Redis trouble degrades service: answers within the caller's deadline, L1 keeps serving."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import RunningGateway


async def _code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


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

    # Service comes back with Redis, on the same port.
    redis_server.restart()
    await gateway.stub.Set(pb.SetRequest(key="k", value=b"back"), timeout=5)
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
    await gateway.stub.Set(pb.SetRequest(key="k", value=b"v2"), timeout=5)
    assert (await gateway.stub.Get(pb.GetRequest(key="k"))).value == b"v2"
