"""Gets multiplexed over one GetStream bidi call, for the asyncio client.

The alternative to auto-batching (_batcher.py) the issue asked to measure: each `get()`
writes one GetStreamRequest with an id of its own onto a stream the client keeps open,
and is answered by the GetStreamResponse with that id. One stream per client, opened on
the first `get()` and again after it ends (the gateway drains, the connection drops):
the Gets in flight when it ends fail with its status (UNAVAILABLE on a drain), the
next ones open a new stream. Each Get carries its own deadline (`timeout_ms`) and the
caller stops waiting when it is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc

from cachegw._calls import _value
from cachegw.errors import CacheError, DeadlineExceeded, error_from_rpc, error_from_status
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc


class GetStreamMux:
    """One per client; single event loop."""

    def __init__(self, stub: cache_pb2_grpc.CacheServiceStub) -> None:
        self._stub = stub
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[pb.GetResponse]] = {}
        self._outbox: asyncio.Queue[pb.GetStreamRequest | None] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def get(self, request: pb.GetRequest, timeout: float | None) -> bytes | None:  # noqa: ASYNC109
        if self._outbox is None:
            self._open()
        assert self._outbox is not None
        rid = next(self._ids)
        future: asyncio.Future[pb.GetResponse] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        timeout_ms = 0 if timeout is None else max(1, round(timeout * 1000))
        self._outbox.put_nowait(pb.GetStreamRequest(id=rid, get=request, timeout_ms=timeout_ms))
        try:
            return _value(await asyncio.wait_for(future, timeout))
        except TimeoutError as exc:
            if isinstance(exc, CacheError):
                raise
            raise DeadlineExceeded(
                f"no answer for {request.key!r} within {timeout}s (on the GetStream)"
            ) from None
        finally:
            self._waiting.pop(rid, None)

    def _open(self) -> None:
        outbox: asyncio.Queue[pb.GetStreamRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb.GetStreamRequest]:
            while (item := await outbox.get()) is not None:
                yield item
                while not outbox.empty():  # what is queued, without a wait each
                    item = outbox.get_nowait()
                    if item is None:
                        return
                    yield item

        self._outbox = outbox
        # The generated stub is typed for the sync API; on an aio channel it takes an
        # async iterator and returns a grpc.aio.StreamStreamCall.
        call: Any = self._stub.GetStream(requests())  # type: ignore[arg-type]
        self._reader = asyncio.get_running_loop().create_task(self._read(call, outbox))

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall[pb.GetStreamRequest, pb.GetStreamResponse],
        outbox: asyncio.Queue[pb.GetStreamRequest | None],
    ) -> None:
        error: CacheError | None = None
        try:
            async for answer in call:
                future = self._waiting.get(answer.id)
                if future is None or future.done():
                    continue  # its caller gave up
                if answer.code:
                    future.set_exception(error_from_status(answer.code, answer.message))
                else:
                    future.set_result(answer.get)
        except grpc.RpcError as exc:
            error = error_from_rpc(exc)
        finally:
            if self._outbox is outbox:  # the next get() opens a new stream
                self._outbox = None
            failure = error or error_from_status(
                grpc.StatusCode.UNAVAILABLE.value[0], "the GetStream ended before this answer"
            )
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(failure)

    async def close(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(None)
            self._outbox = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
