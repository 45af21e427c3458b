"""GetStream: Gets multiplexed over one bidi stream, each with an id its answer echoes.

The other way (besides the client's auto-batching into GetMany) to pay less than one
unary call per Get. Each request is served from the same Cache paths as a unary Get: an
L1 hit is answered at once from its pre-encoded GetResponse bytes (framed with the id,
no protobuf object built); anything else runs as a task of its own, so a Redis read never
holds up the L1 hits behind it, within the request's own deadline (`timeout_ms` from
when it is read, bounded by the stream's). A failure answers that request alone with a
status code and message; the stream goes on.

Admission: each request that needs work counts as a call in flight against
`server.max_concurrent_rpcs` and is refused (RESOURCE_EXHAUSTED, that request only) when
the gateway is full, as a unary Get would be. Drain: the gateway stops reading every
stream, lets the requests already read finish, then ends the stream with UNAVAILABLE
(the client opens another, on another gateway or worker).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.cache import Cache
from cachegw_gateway.validation import BadMessage, InvalidRequest, check_key

Context = Any  # grpc.aio.ServicerContext
# Maps a failure of the read path to (status, message), as a unary Get's would be.
FailureStatus = Callable[[BaseException], "tuple[grpc.StatusCode, str] | None"]
Admit = Callable[[], "str | None"]  # None: admitted (release() later); else why not

DRAINING = (
    "the gateway is draining (shutting down): requests read before it started were "
    "answered; open a new stream (it reaches another gateway or worker)"
)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def frame(rid: int, answer: bytes) -> bytes:
    """GetStreamResponse{id, get} around a pre-encoded GetResponse, without protobuf."""
    head = b"\x08" + _varint(rid) if rid else b""
    return head + b"\x12" + _varint(len(answer)) + answer


def failed(rid: int, code: grpc.StatusCode, message: str) -> bytes:
    return pb.GetStreamResponse(id=rid, code=code.value[0], message=message).SerializeToString()


class GetStreams:
    """Serves GetStream calls; one per gateway (its event loop)."""

    def __init__(
        self,
        cache: Cache,
        max_key: int,
        failure: FailureStatus,
        admit: Admit,
        release: Callable[[], None],
    ) -> None:
        self._cache = cache
        self._max_key = max_key
        self._failure = failure
        self._admit = admit
        self._release = release
        self._readers: set[asyncio.Task[None]] = set()
        self._draining = False

    def drain(self) -> None:
        """Stop reading every stream; each ends with UNAVAILABLE once its requests are
        answered."""
        self._draining = True
        for reader in list(self._readers):
            reader.cancel()

    async def serve(
        self, requests: AsyncIterator[pb.GetStreamRequest | BadMessage], context: Context
    ) -> AsyncIterator[bytes]:
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
        out: asyncio.Queue[bytes | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()
        bad: list[str] = []
        reader = asyncio.ensure_future(self._read(requests, context, out, pending, bad))
        self._readers.add(reader)
        try:
            done = False
            while not done:
                items = [await out.get()]
                while not out.empty():  # what is ready, without a wait per answer
                    items.append(out.get_nowait())
                for item in items:
                    if item is None:
                        done = True
                        break
                    yield item
        finally:
            self._readers.discard(reader)
            reader.cancel()
            for task in pending:
                task.cancel()
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad[0])
        if self._draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)

    async def _read(
        self,
        requests: AsyncIterator[pb.GetStreamRequest | BadMessage],
        context: Context,
        out: asyncio.Queue[bytes | None],
        pending: set[asyncio.Task[None]],
        bad: list[str],
    ) -> None:
        cache = self._cache
        try:
            async for request in requests:
                if isinstance(request, BadMessage):  # no id to answer: the stream ends
                    bad.append(request.reason)
                    break
                rid, get = request.id, request.get
                key = get.key
                answer = cache.l1_answer(key) if key else None
                if answer is not None:
                    out.put_nowait(frame(rid, answer))
                    continue
                refusal = self._admit()
                if refusal is not None:
                    out.put_nowait(failed(rid, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal))
                    continue
                task = asyncio.ensure_future(self._one(rid, get, request.timeout_ms, context, out))
                pending.add(task)
                task.add_done_callback(pending.discard)
        except asyncio.CancelledError:  # drain, or the stream is over
            if not self._draining:
                raise
        if pending:
            await asyncio.gather(*list(pending), return_exceptions=True)
        out.put_nowait(None)

    async def _one(
        self,
        rid: int,
        get: pb.GetRequest,
        timeout_ms: int,
        context: Context,
        out: asyncio.Queue[bytes | None],
    ) -> None:
        try:
            remaining = context.time_remaining()
            if timeout_ms:
                mine = timeout_ms / 1000
                remaining = mine if remaining is None else min(remaining, mine)
            try:
                check_key(get.key, self._max_key)
                async with asyncio.timeout(remaining):
                    answer = await self._fetch(get, remaining)
                out.put_nowait(frame(rid, answer))
            except InvalidRequest as exc:
                out.put_nowait(failed(rid, grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
            except TimeoutError:
                out.put_nowait(
                    failed(
                        rid,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "this Get's deadline passed while waiting for redis or the key's origin",
                    )
                )
            except Exception as exc:  # mapped as a unary Get's would be; else a bug
                status = self._failure(exc)
                if status is None:
                    raise
                out.put_nowait(failed(rid, *status))
        finally:
            self._release()

    def _fetch(self, get: pb.GetRequest, remaining: float | None) -> Awaitable[bytes]:
        return self._cache.fetch(
            get.key,
            lease=get.lease,
            max_wait_ms=get.max_wait_ms,
            allow_stale=get.allow_stale,
            time_remaining=remaining,
        )

