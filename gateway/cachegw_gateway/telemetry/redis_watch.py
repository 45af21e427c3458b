"""A Redis health probe: one PING every few seconds, one log line per change.

The request path already marks Redis down on a failed call and up on a good one
(`GatewayStats.redis_up`); the probe keeps that gauge true when no traffic flows, times
the round trip for the Stats RPC and /metrics, and logs when the connection is lost or
comes back, and when the pub/sub connection was re-established (`redis_reconnects`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from opentelemetry.instrumentation.utils import suppress_instrumentation

from cachegw_gateway.l2 import RedisStore

log = logging.getLogger("cachegw.redis")

PROBE_INTERVAL = 2.0  # seconds between PINGs: a Redis outage shows within this


class RedisWatch:
    def __init__(self, store: RedisStore, interval: float = PROBE_INTERVAL) -> None:
        self._store = store
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._up: bool | None = None  # unknown until the first probe
        self._down_since = 0.0
        self._reconnects = store.stats.redis_reconnects
        self.ping_seconds = 0.0

    async def probe(self) -> bool:
        """One PING; logs a change of state since the previous probe."""
        t0 = time.perf_counter()
        with suppress_instrumentation():  # a probe every 2 s is not a trace anyone wants
            up = await self._store.ping()
        if up:
            self.ping_seconds = time.perf_counter() - t0
        if self._up is not None and up != self._up:
            if up:
                down_for = time.monotonic() - self._down_since
                log.info(
                    "redis connection restored after %.1fs",
                    down_for,
                    extra={"event": "redis_up", "down_seconds": round(down_for, 3)},
                )
            else:
                why = self._store.last_probe_error
                log.warning(
                    "redis connection lost; serving L1 only until it answers again%s",
                    f" ({why})" if why is not None else "",
                    extra={
                        "event": "redis_down",
                        "redis_errors": self._store.stats.redis_errors,
                        "kind": why.kind if why is not None else None,
                    },
                )
        if not up and self._up is not False:
            self._down_since = time.monotonic()
        self._up = up
        reconnects = self._store.stats.redis_reconnects
        if reconnects != self._reconnects:
            log.info(
                "redis pub/sub reconnected (%d times since start)",
                reconnects,
                extra={"event": "redis_reconnect", "redis_reconnects": reconnects},
            )
            self._reconnects = reconnects
        return up

    async def _run(self) -> None:
        # A flag as well as cancel(): redis-py can swallow a cancellation that lands
        # inside a command, and the loop must end anyway.
        while not self._stopping.is_set():
            await self.probe()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    def start(self) -> None:
        if self._task is None:
            self._stopping = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="cachegw-redis-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            task.cancel()
            await asyncio.wait({task}, timeout=self._interval + 5)
