"""AsyncClient auto-batching: concurrent get()s of one event-loop tick share one GetMany
(cachegw/_batcher.py), against a real gateway; each caller keeps its own deadline and its
own errors."""

from __future__ import annotations

import asyncio

import pytest

from cachegw import AsyncClient, NearCache
from cachegw.errors import DeadlineExceeded, InvalidArgument, Unavailable
from tests.client.conftest import Gateway
from tests.conftest import GatewayFactory


async def test_concurrent_gets_go_out_as_one_getmany(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    client = AsyncClient(gw.address)
    try:
        await client.set_many([(f"b:{i}", f"v{i}".encode()) for i in range(50)])
        keys = [f"b:{i % 60}" for i in range(200)]  # repeats, and ten keys never set
        values = await asyncio.gather(*(client.get(k) for k in keys))
        assert values == [f"v{i % 60}".encode() if i % 60 < 50 else None for i in range(200)]
        assert client._batcher is not None and client._batcher.batches == 1
        # The gateway saw one GetMany of the 60 distinct keys, no Get.
        rpcs = {name: h.calls for name, h in gw.server.telemetry.latency.methods.items()}
        assert rpcs.get("GetMany") == 1 and not rpcs.get("Get")
    finally:
        await client.close()


async def test_a_bad_key_fails_its_own_caller_only(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    client = AsyncClient(gw.address)
    try:
        await client.set("ok", b"v")
        good, bad = await asyncio.gather(
            client.get("ok"), client.get("x" * 600), return_exceptions=True
        )
        assert good == b"v"
        assert isinstance(bad, InvalidArgument) and "512" in str(bad)
    finally:
        await client.close()


async def test_a_key_whose_node_is_down_fails_its_own_caller_only(
    fake_gateway: Gateway,
) -> None:
    """A GetMany fails whole when one key's Redis node is down; batched, the other keys'
    callers still get their values (the batch is asked for key by key), as they would
    without batching. GetMany itself is not resent by the channel (it would fail alike)."""
    fake_gateway.servicer.unavailable_keys = {"down"}
    client = AsyncClient(fake_gateway.target)
    try:
        await client.set("up", b"v")
        got = client.get("up"), client.get("down")
        up, down = await asyncio.gather(*got, return_exceptions=True)
        assert up == b"v"
        assert isinstance(down, Unavailable)
        many = [r for r in fake_gateway.servicer.requests if hasattr(r, "keys")]
        assert len(many) == 1  # one GetMany, not resent
    finally:
        await client.close()


async def test_each_caller_keeps_its_own_deadline(fake_gateway: Gateway) -> None:
    fake_gateway.servicer.delay = 0.5
    client = AsyncClient(fake_gateway.target)
    try:
        short = asyncio.ensure_future(client.get("k", timeout=0.1))
        long = asyncio.ensure_future(client.get("k2", timeout=5.0))
        with pytest.raises(DeadlineExceeded):
            await short
        assert await long is None  # the batch ran on until the latest deadline
        assert client._batcher is not None and client._batcher.batches == 1
    finally:
        await client.close()


async def test_a_failed_batch_fails_every_caller(fake_gateway: Gateway) -> None:
    import grpc

    fake_gateway.servicer.failure = (grpc.StatusCode.UNAVAILABLE, "down")
    client = AsyncClient(fake_gateway.target, retries=False)
    try:
        outcomes = await asyncio.gather(
            *(client.get(f"k{i}") for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    finally:
        await client.close()


async def test_batched_gets_fill_the_near_cache(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    client = AsyncClient(gw.address, near_cache=NearCache(max_entries=100))
    try:
        await client.set_many([(f"n:{i}", b"v") for i in range(10)])
        near = client.near_cache
        assert near is not None
        for _ in range(200):  # the near cache's stream registers in the background
            if near.live:
                break
            await asyncio.sleep(0.02)
        assert near.live
        await asyncio.gather(*(client.get(f"n:{i}") for i in range(10)))
        batches = client._batcher.batches if client._batcher else 0
        assert await asyncio.gather(*(client.get(f"n:{i}") for i in range(10))) == [b"v"] * 10
        assert client._batcher is not None and client._batcher.batches == batches  # all near
    finally:
        await client.close()
