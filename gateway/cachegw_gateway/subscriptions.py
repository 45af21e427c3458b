"""Subscribe streams: a bounded queue per stream, fed by the gateway's event bus.

A slow subscriber must not stall the gateway or grow its memory without bound: each
stream buffers at most `limit` events and `max_bytes` of them (an event naming a
thousand keys weighs what a thousand small ones do). When it falls that far behind, its buffer is
dropped and the next thing it reads is a RESET (it must drop what it caches, and may
resume with `since` = the last id it applied), then live events again.

When the gateway drains (SIGTERM), every stream is ended: what it has buffered is still
delivered, then `get` raises `StreamEnded` and the servicer ends the call with
UNAVAILABLE, which clients take as "subscribe again" (elsewhere, from their last id).
"""

from __future__ import annotations

import asyncio
from collections import deque

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import events
from cachegw_gateway.stats import GatewayStats


class StreamEnded(Exception):
    """The gateway is draining: this stream ends here (after what it had buffered)."""


class SubscriberQueue:
    __slots__ = (
        "_bytes",
        "_ended",
        "_events",
        "_limit",
        "_max_bytes",
        "_origin",
        "_overflowed",
        "_stats",
        "_waiter",
        "filter",
    )

    def __init__(
        self,
        event_filter: events.EventFilter,
        limit: int,
        origin: str,
        stats: GatewayStats,
        max_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.filter = event_filter
        self._events: deque[tuple[pb.InvalidationEvent, int]] = deque()
        self._bytes = 0
        self._limit = limit
        self._max_bytes = max_bytes
        self._origin = origin
        self._overflowed = False
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self._stats = stats

    def push(self, event: pb.InvalidationEvent) -> None:
        if self._overflowed:
            return  # a RESET is due anyway: nothing before it matters
        if events.is_reset(event):
            self._reset()
        else:
            wanted = self.filter.select(event)
            if wanted is None:
                return
            size = wanted.ByteSize()
            if len(self._events) >= self._limit or self._bytes + size > self._max_bytes:
                self._reset()
            else:
                self._events.append((wanted, size))
                self._bytes += size
        self._wake()

    def end(self) -> None:
        """No more events: `get` raises `StreamEnded` once the buffer is empty."""
        self._ended = True
        self._wake()

    def _reset(self) -> None:
        self._events.clear()
        self._bytes = 0
        self._overflowed = True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __len__(self) -> int:
        return len(self._events)

    async def get(self) -> pb.InvalidationEvent:
        """The next event for this stream, RESET first when it fell behind."""
        while True:
            if self._overflowed:
                self._overflowed = False
                self._stats.subscriber_resets += 1
                return events.reset(self._origin)
            if self._events:
                event, size = self._events.popleft()
                self._bytes -= size
                return event
            if self._ended:
                raise StreamEnded
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class SubscriberHub:
    """Every open Subscribe stream of this gateway."""

    def __init__(
        self, origin: str, limit: int, stats: GatewayStats, *, max_bytes: int = 4 * 1024 * 1024
    ) -> None:
        self._queues: set[SubscriberQueue] = set()
        # The id of the last event delivered ("" before the first): a stream opened now
        # gets every event after it, so a client that loses the stream can resume there
        # (Subscribe's `cachegw-position` metadata).
        self.last_id = ""
        self.draining = False
        self.origin = origin
        self._limit = limit
        self._max_bytes = max_bytes
        self._stats = stats

    def open(self, event_filter: events.EventFilter) -> SubscriberQueue:
        queue = SubscriberQueue(
            event_filter, self._limit, self.origin, self._stats, self._max_bytes
        )
        if self.draining:
            queue.end()
        self._queues.add(queue)
        self._stats.subscribers = len(self._queues)
        return queue

    def close(self, queue: SubscriberQueue) -> None:
        self._queues.discard(queue)
        self._stats.subscribers = len(self._queues)

    def __len__(self) -> int:
        return len(self._queues)

    def deliver(self, event: pb.InvalidationEvent) -> None:
        if event.id:
            self.last_id = event.id
        for queue in self._queues:
            queue.push(event)

    def drain(self) -> None:
        """End every stream, and every stream opened from now on (see the docstring)."""
        self.draining = True
        for queue in self._queues:
            queue.end()

    def reset_all(self) -> None:
        self.deliver(events.reset(self.origin))
