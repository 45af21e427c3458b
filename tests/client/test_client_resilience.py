"""The clients' channel: retries of idempotent calls, and Subscribe streams that resume.

Retries are the channel's (gRPC service config), so they are shown against a gRPC server
in the test that answers UNAVAILABLE a given number of times: what is under test is
which calls the client sends again, and how often. Resuming Subscribe runs against real
gateways whose connections are closed by `server.max_connection_age_seconds`, as a
gateway behind a load balancer closes them to spread the load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from cachegw import AsyncClient, Client, Event, EventKind
from cachegw.errors import Unavailable
from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayFactory

Context = grpc.aio.ServicerContext[Any, Any]


class Flaky:
    """Answers UNAVAILABLE to the first `failures` calls of each method, then for real."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}

    async def _attempt(self, method: str, context: Context) -> None:
        n = self.calls[method] = self.calls.get(method, 0) + 1
        if n <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")

    async def get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        await self._attempt("Get", context)
        return pb.GetResponse(status=pb.STATUS_HIT, value=b"v")

    async def delete(self, request: pb.DeleteRequest, context: Context) -> pb.DeleteResponse:
        await self._attempt("Delete", context)
        return pb.DeleteResponse()

    async def set(self, request: pb.SetRequest, context: Context) -> pb.SetResponse:
        await self._attempt("Set", context)
        return pb.SetResponse(outcome=pb.SET_OUTCOME_STORED)


def _unary(method: Any, request: Any, response: Any) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        method,
        request_deserializer=request.FromString,
        response_serializer=response.SerializeToString,
    )


async def _flaky(failures: int) -> tuple[grpc.aio.Server, Flaky, str]:
    server = grpc.aio.server()
    flaky = Flaky(failures)
    handlers = {
        "Get": _unary(flaky.get, pb.GetRequest, pb.GetResponse),
        "Delete": _unary(flaky.delete, pb.DeleteRequest, pb.DeleteResponse),
        "Set": _unary(flaky.set, pb.SetRequest, pb.SetResponse),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("cachegw.v1.CacheService", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, flaky, f"127.0.0.1:{port}"


async def test_reads_and_removals_are_retried_on_unavailable_writes_are_not() -> None:
    server, flaky, address = await _flaky(failures=2)
    client = AsyncClient(address, batch_gets=False)  # unary Gets: this server has no GetMany
    try:
        assert await client.get("k") == b"v"
        await client.delete("k")
        assert flaky.calls == {"Get": 3, "Delete": 3}  # two refusals, then answered
        with pytest.raises(Unavailable):
            await client.set("k", b"v")  # a Set may have been applied: never resent
        assert flaky.calls["Set"] == 1
    finally:
        await client.close()
        await server.stop(None)


async def test_retries_give_up_after_four_attempts_and_can_be_turned_off() -> None:
    server, flaky, address = await _flaky(failures=10)
    client = AsyncClient(address, batch_gets=False)
    plain = AsyncClient(address, retries=False, batch_gets=False)
    try:
        with pytest.raises(Unavailable):
            await client.get("k")
        assert flaky.calls["Get"] == 4
        with pytest.raises(Unavailable):
            await plain.get("k")
        assert flaky.calls["Get"] == 5
    finally:
        await client.close()
        await plain.close()
        await server.stop(None)


def test_the_blocking_client_retries_too() -> None:
    async def scenario() -> dict[str, int]:
        server, flaky, address = await _flaky(failures=1)
        try:
            value = await asyncio.to_thread(_blocking_get, address)
            assert value == b"v"
            return flaky.calls
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == {"Get": 2}


def _blocking_get(address: str) -> bytes | None:
    with Client(address) as client:
        return client.get("k")


AGE = {"server__max_connection_age_seconds": 0.5, "server__max_connection_age_grace_seconds": 0.2}


async def _events(stream: AsyncIterator[Event], n: int, within: float) -> list[Event]:
    out: list[Event] = []
    deadline = time.monotonic() + within
    while len(out) < n:
        out.append(await asyncio.wait_for(anext(stream), deadline - time.monotonic()))
    return out


async def test_subscribe_resumes_by_itself_and_misses_nothing(
    gateway_factory: GatewayFactory,
) -> None:
    """The gateway closes the subscriber's connection every 0.5 s (+0.2 s grace) while
    another gateway invalidates a key every 50 ms: every event arrives once, in order,
    without a RESET, across several reconnections."""
    aged = await gateway_factory(**AGE)
    writer = await gateway_factory()
    sub, pub = AsyncClient(aged.address), AsyncClient(writer.address)
    stream = sub.subscribe(prefixes=["r:"])
    try:
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)  # registered (nothing to read yet)
        await pub.invalidate(keys=["r:0"])
        got = [await asyncio.wait_for(first, 5)]
        started = time.monotonic()
        sent = 1
        while time.monotonic() - started < 2.0:  # four connection ages or so
            await pub.invalidate(keys=[f"r:{sent}"])
            sent += 1
            await asyncio.sleep(0.05)
        got += await _events(stream, sent - 1, within=10)
        assert all(e.kind is EventKind.KEYS for e in got), [
            e for e in got if e.kind is not EventKind.KEYS
        ]
        assert [e.keys[0] for e in got] == [f"r:{i}" for i in range(sent)]
    finally:
        await stream.aclose()
        await sub.close()
        await pub.close()


async def test_without_resume_the_closed_connection_ends_the_stream(
    gateway_factory: GatewayFactory,
) -> None:
    aged = await gateway_factory(**AGE)
    sub = AsyncClient(aged.address)
    stream = sub.subscribe(prefixes=["r:"], resume=False)
    try:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(anext(stream), 10)
    finally:
        await stream.aclose()
        await sub.close()


async def test_a_stream_lost_before_any_position_is_known_resumes_with_a_reset(
    gateway_factory: GatewayFactory,
) -> None:
    """A fresh gateway has delivered no event, so it cannot say where the stream stands:
    when the connection is lost, the client cannot know what it missed, and tells the
    caller to drop what it caches (a RESET of its own) before the live events."""
    aged = await gateway_factory(**AGE)
    sub = AsyncClient(aged.address)
    stream = sub.subscribe(prefixes=["q:"])
    try:
        event = await asyncio.wait_for(anext(stream), 10)
        assert event.kind is EventKind.RESET and event.origin == "client"
    finally:
        await stream.aclose()
        await sub.close()
