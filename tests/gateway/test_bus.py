"""The gateway's event bus on a real Redis: stopping it always ends it."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from cachegw_gateway.bus import EventBus
from cachegw_gateway.managed_redis import ManagedRedis


class _SwallowOnce:
    """A real PubSub whose get_message swallows the first cancellation that lands in it,
    returning None instead, as redis-py does now and then (a stop right after a Redis
    restart hung for good in tests/gateway/test_redis_trouble.py)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.polling = asyncio.Event()
        self.swallowed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get_message(self, **kwargs: Any) -> Any:
        self.polling.set()
        try:
            return await self._inner.get_message(**kwargs)
        except asyncio.CancelledError:
            if self.swallowed:
                raise
            self.swallowed += 1
            return None
        finally:
            self.polling.clear()


async def test_stop_ends_the_bus_even_when_a_cancellation_is_swallowed(
    redis_server: ManagedRedis,
) -> None:
    pubsubs: list[_SwallowOnce] = []

    class Client:
        def __init__(self) -> None:
            self._client = aioredis.Redis.from_url(redis_server.url)

        def pubsub(self) -> _SwallowOnce:
            pubsubs.append(_SwallowOnce(self._client.pubsub()))
            return pubsubs[-1]

        async def aclose(self, close_connection_pool: bool = True) -> None:
            await self._client.aclose(close_connection_pool=close_connection_pool)

    bus = EventBus(
        Client,  # type: ignore[arg-type]
        "test:events",
        "test:fills",
        on_event=lambda event: None,
        on_fill=lambda key: None,
        on_lost=lambda reason: None,
        on_live=lambda again: None,
    )
    assert await bus.start()
    task = bus._task
    assert task is not None
    stopping: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(pubsubs[-1].polling.wait(), 5)  # parked in get_message
        # Not wait_for(): its own cancellation on timeout would be the second cancel
        # that ends the bus, hiding the hang.
        stopping = asyncio.create_task(bus.stop())
        await asyncio.wait({stopping}, timeout=5)
        assert stopping.done(), "stop() hangs: the bus never saw its cancellation"
        assert task.done() and not bus.live
        assert pubsubs[-1].swallowed == 1
    finally:
        for _ in range(10):  # bounded clean-up of a bus that did not stop
            if task.done():
                break
            task.cancel()
            await asyncio.wait({task}, timeout=1)
        if stopping is not None and not stopping.done():
            await asyncio.wait({stopping}, timeout=1)
