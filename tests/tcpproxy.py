"""A TCP proxy between a gateway and Redis whose behaviour is switched at run time.

The proxy listens on a free 127.0.0.1 port and forwards to one upstream (a Redis). It
runs its own asyncio loop in a thread of its own, so a sync test, an async test (whose
loop it never blocks) and a benchmark script drive it alike; every method is called from
the caller's thread and returns once the switch took effect.

Modes:

- ``pass``: bytes flow both ways.
- ``reset``: every open connection is reset (RST, not FIN: as a peer that crashed or a
  firewall's reject) and the listening socket is closed, so new connections are
  refused (ECONNREFUSED). Back to ``pass``, the proxy listens again on the same port.
- ``blackhole``: a silent partition. Connections are accepted and what clients send is
  read and dropped; nothing reaches Redis and nothing comes back, so callers learn of it
  only through their own timeouts. A connection that was open across a blackhole stays
  silent until the client closes it (bytes were lost mid-stream: the Redis protocol on
  it cannot be trusted any more, as after a real partition the client's timeout closed
  it); connections opened after it ends pass again.

    with TcpProxy("127.0.0.1", redis_port) as proxy:
        start_gateway(redis_url=proxy.url)
        proxy.set_mode("blackhole")
        ...
        proxy.set_mode("pass")
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar, get_args

Mode = Literal["pass", "reset", "blackhole"]
_CLOSE_ROUNDS = 50  # x 0.1 s: how long stop() waits for connection handlers to end
MODES: tuple[str, ...] = get_args(Mode)
T = TypeVar("T")

_CHUNK = 65536
_CALL_TIMEOUT = 10.0  # longest a call from another thread waits for the proxy's loop
_LISTEN_ATTEMPTS = 50  # re-listening after `reset`: the port may linger a moment
_LISTEN_RETRY = 0.02


@dataclass(eq=False)  # hashed by identity: held in a set
class _Link:
    """One client connection and, unless blackholed from its start, its upstream."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    silent: bool = False  # saw a blackhole: never forwards again


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER 0 makes close() abort the connection."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        if upstream_host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"the proxy forwards to loopback only (got {upstream_host!r})")
        self._upstream = (upstream_host, upstream_port)
        self._mode: Mode = "pass"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.port = 0
        # Counters (read from any thread; written on the proxy's loop only).
        self.accepted = 0  # client connections accepted
        self.resets = 0  # connections reset by `reset`
        self.dropped_bytes = 0  # bytes swallowed by `blackhole`

    # -- the caller's side -----------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def url(self) -> str:
        """A redis:// URL that reaches the upstream through this proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def start(self) -> TcpProxy:
        if self._thread is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"tcpproxy->{self._upstream[1]}", daemon=True
        )
        self._thread.start()
        self._call(self._listen(0))
        return self

    def set_mode(self, mode: Mode) -> None:
        """Switch; returns once the new mode holds for every connection."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        self._call(self._switch(mode))

    def stop(self) -> None:
        """Close everything and end the proxy's thread; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._close())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_CALL_TIMEOUT)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the proxy is not running: start() it first")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(_CALL_TIMEOUT)

    # -- the proxy's loop ------------------------------------------------------------------

    async def _listen(self, port: int) -> None:
        last: OSError | None = None
        for _ in range(_LISTEN_ATTEMPTS):
            try:
                self._server = await asyncio.start_server(
                    self._accept, "127.0.0.1", port, reuse_address=True
                )
                self.port = self._server.sockets[0].getsockname()[1]
                return
            except OSError as exc:  # the port is still held a moment after a close
                last = exc
                await asyncio.sleep(_LISTEN_RETRY)
        raise RuntimeError(f"the proxy cannot listen on 127.0.0.1:{port} again: {last}")

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            # wait_closed() also waits for the connection handlers: they are reset below.

    async def _switch(self, mode: Mode) -> None:
        previous, self._mode = self._mode, mode
        if mode == "reset":
            await self._unlisten()
            for link in list(self._links):
                self.resets += 1
                self._cut(link)
        elif mode == "blackhole":
            for link in self._links:
                link.silent = True
            if previous == "reset":
                await self._listen(self.port)
        elif previous == "reset":
            await self._listen(self.port)

    def _cut(self, link: _Link) -> None:
        _rst(link.client)
        if link.upstream is not None:
            _rst(link.upstream)

    async def _close(self) -> None:
        self._closing = True  # a handler that starts from now on resets its connection
        await self._unlisten()
        # Bounded: every round resets what is open, including connections whose handler
        # started after the round before (left open, a blackholed one would wait forever
        # and its socket be found unclosed when the loop is gone).
        for _ in range(_CLOSE_ROUNDS):
            for link in list(self._links):
                self._cut(link)
            if not self._tasks:
                break
            await asyncio.wait(set(self._tasks), timeout=0.1)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.accepted += 1
        link = _Link(writer, silent=self._mode == "blackhole")
        if self._mode == "reset" or self._closing:  # accepted just before the listener closed
            _rst(writer)
            return
        self._tasks.add(task)
        self._links.add(link)
        try:
            if link.silent:
                await self._swallow(reader, link)
                return
            try:
                up_reader, link.upstream = await asyncio.open_connection(*self._upstream)
            except OSError:
                _rst(writer)  # upstream down: the client sees what it would see directly
                return
            pumps = [
                asyncio.create_task(self._pump(reader, link.upstream, link)),
                asyncio.create_task(self._pump(up_reader, writer, link)),
            ]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if link.silent and not pumps[0].done():
                # Redis closed during a blackhole: the client must not learn of it either.
                await pumps[0]
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        except OSError:
            pass
        finally:
            for w in (writer, link.upstream):
                if w is not None:
                    w.transport.abort()
            self._links.discard(link)
            self._tasks.discard(task)

    async def _swallow(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while chunk := await reader.read(_CHUNK):
            self.dropped_bytes += len(chunk)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link
    ) -> None:
        while chunk := await src.read(_CHUNK):
            if link.silent:
                self.dropped_bytes += len(chunk)
                continue
            dst.write(chunk)
            await dst.drain()
