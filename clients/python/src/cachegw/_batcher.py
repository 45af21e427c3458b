"""Auto-batching for the asyncio client: the `get()`s issued in one event-loop tick share
one GetMany (DataLoader-style).

A unary call costs the gateway about the same whatever it carries (~450 µs of server
time here), while each extra key of a GetMany costs a few µs: a service whose many
concurrent requests each `await cache.get(k)` pays for hundreds of calls where one would
do. The batcher collects the keys asked for until the running callbacks yield to the
event loop, then sends them as one GetMany (distinct keys, at most `max_keys`; more go
in further batches) and hands each caller its value. Nothing is delayed by a timer: a
lone `get()` goes out one loop iteration later than it would have.

Each caller keeps its own deadline (it stops waiting when it is up, DEADLINE_EXCEEDED);
the batch runs until the latest of them. A GetMany fails whole when one of its keys
fails: INVALID_ARGUMENT for one bad key, UNAVAILABLE when one key's Redis node is down
(a Cluster primary failing over) and no copy was set aside for it. Then the batch's keys
are asked for one by one, so that only those keys' callers get the error, as without
batching. (GetMany is not among the calls the channel resends on UNAVAILABLE, for this
reason: see _channel.py.) Any other failure is every caller's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from cachegw.errors import CacheError, DeadlineExceeded, InvalidArgument, Unavailable

Fetch = Callable[[list[str], float | None], Awaitable[list[bytes | None]]]
FetchOne = Callable[[str, float | None], Awaitable[bytes | None]]


class GetBatcher:
    """One per client; single event loop."""

    def __init__(self, fetch: Fetch, fetch_one: FetchOne, *, max_keys: int = 1000) -> None:
        self._fetch = fetch
        self._fetch_one = fetch_one
        self._max_keys = max_keys
        self._waiting: dict[str, list[asyncio.Future[bytes | None]]] = {}
        self._deadline: float | None = 0.0  # the batch's: the latest caller's; None = none
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # GetMany calls sent (for tests and benchmarks)

    async def get(self, key: str, timeout: float | None) -> bytes | None:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        future.add_done_callback(_retrieved)  # a caller that gave up never awaits it
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = [future]
        else:
            waiting.append(future)
        if timeout is None:
            self._deadline = None
        elif self._deadline is not None:
            self._deadline = max(self._deadline, time.monotonic() + timeout)
        if len(self._waiting) >= self._max_keys:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError as exc:
            if isinstance(exc, CacheError):  # the gateway's DEADLINE_EXCEEDED, as it was
                raise
            raise DeadlineExceeded(
                f"no answer for {key!r} within {timeout}s (batched into a GetMany)"
            ) from None

    def _flush(self) -> None:
        self._scheduled = False
        if not self._waiting:
            return
        batch, self._waiting = self._waiting, {}
        deadline, self._deadline = self._deadline, 0.0
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        task = asyncio.get_running_loop().create_task(self._send(batch, timeout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(
        self,
        batch: dict[str, list[asyncio.Future[bytes | None]]],
        timeout: float | None,  # noqa: ASYNC109
    ) -> None:
        keys = list(batch)
        self.batches += 1
        try:
            values = await self._fetch(keys, timeout)
        except (InvalidArgument, Unavailable):
            # One key may be the cause (a bad key; its Redis node down, with no copy set
            # aside for it): asked one by one, only its callers get the error.
            await asyncio.gather(*(self._one(key, batch[key], timeout) for key in keys))
            return
        except Exception as exc:
            for futures in batch.values():
                _fail(futures, exc)
            return
        for key, value in zip(keys, values, strict=True):
            for future in batch[key]:
                if not future.done():
                    future.set_result(value)

    async def _one(
        self,
        key: str,
        futures: list[asyncio.Future[bytes | None]],
        timeout: float | None,  # noqa: ASYNC109
    ) -> None:
        try:
            value = await self._fetch_one(key, timeout)
        except Exception as exc:
            _fail(futures, exc)
            return
        for future in futures:
            if not future.done():
                future.set_result(value)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _retrieved(future: asyncio.Future[bytes | None]) -> None:
    if not future.cancelled():
        future.exception()


def _fail(futures: list[asyncio.Future[bytes | None]], exc: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
