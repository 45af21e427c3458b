"""A small in-test gateway double for the client tests, served by grpc.aio on port 0.

The double keeps a dict, records every request, and can be told to fail every call with
a chosen status code (`failure`) or to sleep before answering (`delay`). It runs in its
own thread and event loop, so the blocking `Client` can call it from the test's thread.
It stands in for the gateway only as far as the client's encoding, decoding and error
mapping go; the gateway's own behaviour is tested against the real service.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from google.protobuf.message import Message

from cachegw import AsyncClient, Client
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc

DEFAULT_TTL_MS = 60_000
START_TIMEOUT = 10.0


@dataclass
class Stored:
    value: bytes
    version: int
    ttl_ms: int
    tags: list[str]


class FakeGateway(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self) -> None:
        self.store: dict[str, Stored] = {}
        self.leases: dict[str, bytes] = {}
        # Answers given as they are, to test the decoding of every field.
        self.canned: dict[str, pb.GetResponse] = {}
        self.requests: list[Message] = []
        self.failure: tuple[grpc.StatusCode, str] | None = None
        # Keys whose reads answer UNAVAILABLE (their Redis node down), alone or in a batch.
        self.unavailable_keys: set[str] = set()
        self.delay = 0.0
        self._versions = 0

    async def _enter(self, request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failure is not None:
            await context.abort(*self.failure)
        keys = [getattr(request, "key", ""), *getattr(request, "keys", ())]
        if any(k in self.unavailable_keys for k in keys):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "that key's redis node is down")

    def _read(self, key: str, *, lease: bool = False) -> pb.GetResponse:
        if key in self.canned:
            return self.canned[key]
        stored = self.store.get(key)
        if stored is None:
            if not lease:
                return pb.GetResponse(
                    status=pb.STATUS_MISS, tier=pb.TIER_ORIGIN, key_class="default"
                )
            token = self.leases.setdefault(key, f"lease:{key}".encode())
            return pb.GetResponse(
                status=pb.STATUS_LEASED, tier=pb.TIER_ORIGIN, lease_token=token, key_class="default"
            )
        return pb.GetResponse(
            status=pb.STATUS_HIT,
            value=stored.value,
            tier=pb.TIER_L1,
            ttl_remaining_ms=stored.ttl_ms,
            version=stored.version,
            key_class="default",
        )

    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetResponse:
        await self._enter(request, context)
        return self._read(request.key, lease=request.lease)

    async def GetMany(
        self, request: pb.GetManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetManyResponse:
        await self._enter(request, context)
        results = [self._read(key) for key in request.keys]
        return pb.GetManyResponse(results=results)

    async def Set(
        self, request: pb.SetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetResponse:
        await self._enter(request, context)
        current = self.store.get(request.key)
        current_version = 0 if current is None else current.version
        if request.lease_token and self.leases.get(request.key) != request.lease_token:
            return pb.SetResponse(outcome=pb.SET_OUTCOME_LEASE_INVALID, key_class="default")
        if request.HasField("if_version") and request.if_version != current_version:
            return pb.SetResponse(
                outcome=pb.SET_OUTCOME_VERSION_CONFLICT,
                version=current_version,
                key_class="default",
            )
        self.leases.pop(request.key, None)
        self._versions += 1
        ttl_ms = request.ttl_ms if request.HasField("ttl_ms") else DEFAULT_TTL_MS
        self.store[request.key] = Stored(request.value, self._versions, ttl_ms, list(request.tags))
        return pb.SetResponse(
            outcome=pb.SET_OUTCOME_STORED,
            version=self._versions,
            ttl_ms=ttl_ms,
            key_class="default",
        )

    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteResponse:
        await self._enter(request, context)
        return pb.DeleteResponse(
            deleted=sum(self.store.pop(key, None) is not None for key in request.keys)
        )

    async def ReleaseLease(
        self, request: pb.ReleaseLeaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseLeaseResponse:
        await self._enter(request, context)
        held = self.leases.get(request.key) == request.lease_token
        if held:
            del self.leases[request.key]
        return pb.ReleaseLeaseResponse(released=held)

    # The client does not call these yet.
    async def Invalidate(
        self, request: pb.InvalidateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.InvalidateResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the test double")

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.InvalidationEvent]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the test double")
        yield pb.InvalidationEvent()

    async def Warmup(
        self, request: pb.WarmupRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.WarmupResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the test double")

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StatsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the test double")

    # Counters, Touch and Ttl are tested against the real gateway (test_client_counters.py).

    async def Incr(
        self, request: pb.IncrRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.IncrResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the test double")

    async def Touch(
        self, request: pb.TouchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TouchResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the test double")

    async def Ttl(
        self, request: pb.TtlRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TtlResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the test double")

    async def SetMany(
        self, request: pb.SetManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetManyResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the test double")

    async def DeleteMany(
        self, request: pb.DeleteManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteManyResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the test double")

    async def Allow(
        self, request: pb.AllowRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AllowResponse:
        await self._enter(request, context)
        # Allowed while the cost fits a burst of 3, whatever was asked before.
        allowed = (request.cost or 1) <= 3
        return pb.AllowResponse(
            allowed=allowed,
            remaining=3 - (request.cost or 1) if allowed else 0,
            retry_after_ms=0 if allowed else 1500,
            reset_after_ms=250,
            limit=request.limit,
            key_class="default",
        )


class ServerThread:
    """A grpc.aio server on 127.0.0.1:0 in a thread with its own event loop."""

    def __init__(
        self,
        servicer: FakeGateway,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.servicer = servicer
        self._interceptors = interceptors
        self._credentials = credentials
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-gateway")
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(timeout=START_TIMEOUT)

    async def _start(self) -> int:
        self._server = grpc.aio.server(interceptors=self._interceptors)
        cache_pb2_grpc.add_CacheServiceServicer_to_server(self.servicer, self._server)
        if self._credentials is None:
            port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            port = self._server.add_secure_port("127.0.0.1:0", self._credentials)
        await self._server.start()
        return port

    def stop(self) -> None:
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
            future.result(timeout=START_TIMEOUT)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=START_TIMEOUT)
        self._loop.close()

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)  # no grace: handlers still sleeping are cancelled
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._loop.shutdown_asyncgens()


@dataclass
class Gateway:
    servicer: FakeGateway
    target: str


@pytest.fixture
def fake_gateway() -> Iterator[Gateway]:
    server = ServerThread(FakeGateway())
    try:
        server.start()
        yield Gateway(server.servicer, f"127.0.0.1:{server.port}")
    finally:
        server.stop()


@pytest.fixture
def client(fake_gateway: Gateway) -> Iterator[Client]:
    with Client(fake_gateway.target) as client:
        yield client


class _SyncAsAsync:
    """The blocking client behind AsyncClient's awaitable methods, to run one test on both.

    Blocking the test's event loop is fine here: the server has a loop of its own.
    """

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return method(*args, **kwargs)

        return call


@pytest.fixture(params=["sync", "async"])
async def any_client(
    request: pytest.FixtureRequest, fake_gateway: Gateway
) -> AsyncIterator[AsyncClient]:
    """`Client` or `AsyncClient` against the double, both with AsyncClient's (awaited) API."""
    if request.param == "sync":
        with Client(fake_gateway.target) as sync_client:
            yield cast(AsyncClient, _SyncAsAsync(sync_client))
    else:
        async with AsyncClient(fake_gateway.target) as async_client:
            yield async_client
