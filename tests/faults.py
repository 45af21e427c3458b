"""Fault injection between a gateway and Redis: a TCP proxy on 127.0.0.1.

`ReplyDropper` forwards bytes both ways. Armed with `drop_reply_to(marker)`, the next
client request that contains `marker` is forwarded to Redis, Redis's reply is awaited
(so the command has run) and then swallowed, and both connections are closed: the
client sees its connection drop with the command applied but unanswered, as when a
network path fails after Redis did the work.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

_SETTLE = 0.05  # seconds to keep reading a swallowed reply (a pipeline's replies)


class ReplyDropper:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._marker: bytes | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.dropped = 0  # replies swallowed so far
        self.connections = 0  # client connections accepted so far

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def drop_reply_to(self, marker: bytes) -> None:
        """Swallow the reply to the next request containing `marker` (once)."""
        self._marker = marker

    async def start(self) -> ReplyDropper:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Cutting the connections ends each connection's task (cancelling the task
        # instead would make asyncio log an error for it).
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ReplyDropper:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            self._writers.add(up_writer)
            swallow = asyncio.Event()
            to_redis = asyncio.create_task(self._requests(reader, up_writer, swallow))
            to_client = asyncio.create_task(self._replies(up_reader, writer, swallow))
            await asyncio.wait({to_redis, to_client}, return_when=asyncio.FIRST_COMPLETED)
            for t in (to_redis, to_client):
                t.cancel()
            await asyncio.gather(to_redis, to_client, return_exceptions=True)
        except OSError:
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.transport.abort()
                    self._writers.discard(w)
            self._tasks.discard(task)

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, swallow: asyncio.Event
    ) -> None:
        tail = b""  # the end of the previous chunk: a marker may straddle two reads
        while chunk := await reader.read(65536):
            marker = self._marker
            if marker is not None and marker in tail[len(tail) - len(marker) + 1 :] + chunk:
                self._marker = None
                swallow.set()
            tail = (tail + chunk)[-256:]
            up.write(chunk)
            await up.drain()

    async def _replies(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, swallow: asyncio.Event
    ) -> None:
        while chunk := await up.read(65536):
            if swallow.is_set():
                # Redis has answered, so it ran the command: let the rest of a pipeline's
                # replies arrive, then cut the client off without any of them.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_SETTLE):
                        while await up.read(65536):
                            pass
                self.dropped += 1
                return
            writer.write(chunk)
            await writer.drain()
