"""The gateway's subscription to the deployment's invalidation and fill channels.

One pub/sub connection per gateway, on a Redis client of its own that never retries
silently: a reconnect that redis-py hid from us would hide the events lost meanwhile.
The bus is *live* once Redis confirmed both subscriptions. Whenever it stops being live
(the connection dropped, Redis killed it, a ping went unanswered) it calls `on_lost`
at once: the gateway cannot know what it missed, so it flushes its L1 and tells its
Subscribe streams RESET. It then re-subscribes with capped, jittered backoff and calls
`on_live` when confirmed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.l2 import UNAVAILABLE_ERRORS

log = logging.getLogger(__name__)

# No traffic for this long: ping; no answer for twice as long: the connection is dead.
PING_AFTER = 2.0
DEAD_AFTER = 6.0
_POLL = 0.5
STOP_WAIT = 5.0  # longest stop() waits for the subscription task to end


class SubscriptionLost(Exception):
    """The pub/sub connection stopped delivering (or could not be trusted to)."""


_LOST: tuple[type[BaseException], ...] = (SubscriptionLost, RedisError, *UNAVAILABLE_ERRORS)


class EventBus:
    def __init__(
        self,
        client_factory: Callable[[], aioredis.Redis],
        events_channel: str,
        fills_channel: str,
        *,
        on_event: Callable[[pb.InvalidationEvent], None],
        on_fill: Callable[[str], None],
        on_lost: Callable[[str], None],
        on_live: Callable[[bool], None],
        max_backoff: float = 2.0,
    ) -> None:
        self._factory = client_factory
        self._events = events_channel
        self._fills = fills_channel
        self._on_event = on_event
        self._on_fill = on_fill
        self._on_lost = on_lost
        self._on_live = on_live
        self._max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._live = asyncio.Event()
        self.connections = 0  # times the bus went live

    @property
    def live(self) -> bool:
        return self._live.is_set()

    async def start(self, wait: float = 5.0) -> bool:
        """Start subscribing; wait up to `wait` seconds for the first confirmation."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="cachegw-event-bus")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._live.wait()
        return self.live

    async def stop(self) -> None:
        """End the subscription: within one poll (0.5 s), at most STOP_WAIT seconds.

        A flag as well as cancel(): redis-py can swallow a cancellation that lands inside
        a command (get_message then answers None), and awaiting the task after a single
        cancel() then hung for good (a gateway that never finished stopping). The loops
        check the flag on every poll, and cancel() is repeated until the task is done."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            deadline = time.monotonic() + STOP_WAIT
            while not task.done() and time.monotonic() < deadline:
                task.cancel()
                await asyncio.wait({task}, timeout=_POLL)
            if not task.done():
                log.warning("invalidation subscription still running %.0fs after stop", STOP_WAIT)
            elif not task.cancelled() and task.exception() is not None:
                log.warning("invalidation subscription ended with %r", task.exception())
        self._live.clear()

    def _lose(self, reason: str) -> None:
        if self.live:
            self._live.clear()
            log.warning("invalidation subscription lost (%s): flushing L1", reason)
            self._on_lost(reason)

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stopping:
            sessions = self.connections
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except _LOST as exc:
                self._lose(str(exc) or type(exc).__name__)
            except Exception as exc:  # a bug here must not end invalidation for good
                log.exception("invalidation subscription failed")
                self._lose(f"unexpected {type(exc).__name__}")
            if self._stopping:
                return
            if self.connections != sessions:  # it was live: start the backoff over
                backoff = 0.05
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._max_backoff)

    async def _session(self) -> None:
        client = self._factory()
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self._events, self._fills)
            confirmed: set[str] = set()
            last_rx = time.monotonic()
            pinged = False
            while not self._stopping:
                msg = await pubsub.get_message(timeout=_POLL)
                now = time.monotonic()
                if msg is None:
                    if now - last_rx > DEAD_AFTER:
                        raise SubscriptionLost(f"no answer from redis for {DEAD_AFTER:.0f}s")
                    if now - last_rx > PING_AFTER and not pinged:
                        await pubsub.ping()
                        pinged = True
                    continue
                last_rx, pinged = now, False
                kind = msg["type"]
                if kind == "message":
                    self._dispatch(msg["channel"], msg["data"])
                elif kind == "subscribe":
                    channel = _text(msg["channel"])
                    if self.live:
                        # redis-py re-subscribed on a new connection behind our back.
                        raise SubscriptionLost("the subscription was re-established")
                    confirmed.add(channel)
                    if confirmed >= {self._events, self._fills}:
                        self.connections += 1
                        self._live.set()
                        log.info("invalidation subscription live on %s", self._events)
                        self._on_live(self.connections > 1)
                elif kind == "unsubscribe":
                    raise SubscriptionLost("unsubscribed by the server")
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                await client.aclose(close_connection_pool=True)

    def _dispatch(self, channel: bytes | str, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        if _text(channel) == self._fills:
            self._on_fill(raw.decode(errors="surrogateescape"))
            return
        try:
            event = pb.InvalidationEvent.FromString(raw)
        except DecodeError as exc:
            # An event we cannot read may have named anything we hold.
            raise SubscriptionLost(f"unreadable event: {exc}") from exc
        self._on_event(event)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
