"""Tenant quotas shared by three gateway processes (`cachegw serve`, one Redis): the call
rate and the open Subscribe streams are the tenant's across all of them, and a tenant
without a quota of its own is not slowed by another's."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from tests.conftest import GatewayCluster
from tests.tenancy.test_isolation import auth_toml, md, tokens_file

RATE, BURST = 40, 20


@pytest.fixture
def three(tmp_path: Path, gateway_cluster: GatewayCluster) -> list[str]:
    quota = (
        f'[[tenant]]\nname = "alpha"\nrequests_per_second = {RATE}\nburst = {BURST}\n'
        "max_subscribers = 2\n"
    )
    gateways = gateway_cluster(3, auth_toml(tokens_file(tmp_path), quota))
    return [g.address for g in gateways]


async def test_one_call_rate_across_three_gateways(three: list[str]) -> None:
    channels = [grpc.aio.insecure_channel(a) for a in three]
    stubs = [cache_pb2_grpc.CacheServiceStub(c) for c in channels]
    try:
        # Each gateway makes alpha's space on its first call: not timed.
        for stub in stubs:
            await stub.Get(pb.GetRequest(key="warm"), metadata=md("beta"), timeout=10)
        allowed = refused = 0
        started = time.monotonic()
        for i in range(300):  # bounded: far more than the rate allows in the time it takes
            try:
                await stubs[i % 3].Get(pb.GetRequest(key="k"), metadata=md("alpha"), timeout=10)
                allowed += 1
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                refused += 1
        elapsed = time.monotonic() - started
        # Never more than the one bucket handed out, whichever gateway was called.
        assert allowed <= BURST + RATE * elapsed + 3, (allowed, elapsed)
        assert refused > 0
        # Beta shares the gateways and Redis, not alpha's bucket.
        for i in range(30):
            await stubs[i % 3].Get(pb.GetRequest(key="k"), metadata=md("beta"), timeout=10)
    finally:
        for c in channels:
            await c.close(None)


async def test_subscribe_streams_counted_across_gateways(three: list[str]) -> None:
    channels = [grpc.aio.insecure_channel(a) for a in three]
    stubs = [cache_pb2_grpc.CacheServiceStub(c) for c in channels]
    try:
        streams = []
        for stub in stubs[:2]:
            stream = stub.Subscribe(pb.SubscribeRequest(), metadata=md("alpha"))
            await stream.initial_metadata()
            streams.append(stream)
        third = stubs[2].Subscribe(pb.SubscribeRequest(), metadata=md("alpha"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with asyncio.timeout(10):
                async for _ in third:
                    pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "alpha has 2 Subscribe streams open" in (err.value.details() or "")
        # Another tenant is not counted against alpha.
        other = stubs[2].Subscribe(pb.SubscribeRequest(), metadata=md("beta"))
        await other.initial_metadata()
        other.cancel()
        # A stream that ends frees its place, on any gateway.
        streams[0].cancel()
        for _ in range(50):  # bounded: the place is given back as the call ends
            again = stubs[2].Subscribe(pb.SubscribeRequest(), metadata=md("alpha"))
            try:
                async with asyncio.timeout(0.3):
                    await again.initial_metadata()
                    async for _ in again:
                        break
            except TimeoutError:
                again.cancel()
                break  # subscribed and waiting for events: admitted
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the freed place was never given back")
        for s in streams[1:]:
            s.cancel()
    finally:
        for c in channels:
            await c.close(None)
