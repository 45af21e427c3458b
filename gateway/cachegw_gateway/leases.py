"""Lease tokens and this gateway's bookkeeping of leases and the callers waiting on them.

The lease itself lives in Redis (``<p>:{K}:lease``, SET NX PX with the token; see l2.py):
across every gateway only the caller holding the token may fill K. This module keeps
what one gateway needs so that its own callers of a key cost one Redis call, not one
each: whether a lease of K is known to be held (here or elsewhere) and until when, one
lease attempt in flight per key, and one shared wake-up per key for everyone waiting for
K's value to land. Wake-ups come from the fills channel, from invalidation events and
from the bus reconnecting; waiters also poll Redis with backoff as a safety net.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

_TOKEN = struct.Struct(">16sQI")
TOKEN_SIZE = _TOKEN.size
_PRUNE_AT = 4096
# Waiters look at Redis themselves at these intervals (doubling per key) in case a
# wake-up was lost: the fills channel is the fast path, polling only the safety net.
POLL_FIRST, POLL_MAX = 0.05, 1.0


@dataclass(frozen=True, slots=True)
class LeaseToken:
    """Opaque to callers. Carries when the lease was granted (the fill measures the
    recompute cost from it, for XFetch) and the class generation it was granted under (a
    fill after a class-wide invalidation is refused)."""

    raw: bytes
    granted_ms: int
    generation: int

    @classmethod
    def new(cls, granted_ms: int, generation: int) -> LeaseToken:
        raw = _TOKEN.pack(secrets.token_bytes(16), granted_ms, generation)
        return cls(raw, granted_ms, generation)

    @classmethod
    def parse(cls, raw: bytes) -> LeaseToken:
        if len(raw) != TOKEN_SIZE:
            raise ValueError(
                f"lease_token is {len(raw)} bytes, not a token this gateway issued "
                f"({TOKEN_SIZE} bytes); pass back the lease_token of a LEASED or refresh Get"
            )
        _, granted_ms, generation = _TOKEN.unpack(raw)
        return cls(raw, granted_ms, generation)


class LeaseTable:
    """Per-key lease state of one gateway (one event loop, no locks)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._held_until: dict[str, float] = {}
        self._attempts: dict[str, asyncio.Future[None]] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._counts: dict[str, int] = {}  # callers in wait() per key
        # The next poll interval per waited-on key, and when it was last used: it outlives
        # one round of waiters (they leave wait() to read Redis and come back), so that
        # the interval keeps doubling across rounds.
        self._poll: dict[str, tuple[float, float]] = {}
        self._ticks: dict[str, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        """Keys with any state (tests check nothing leaks)."""
        return len(self._attempts) + len(self._waiters)

    def held(self, key: str) -> bool:
        until = self._held_until.get(key)
        if until is None:
            return False
        if until <= self._clock():
            del self._held_until[key]
            return False
        return True

    def held_until(self, key: str) -> float:
        return self._held_until.get(key, 0.0)

    def note_held(self, key: str, seconds: float) -> None:
        """A lease of `key` is held (by a caller of ours or elsewhere) for `seconds`."""
        now = self._clock()
        if len(self._held_until) >= _PRUNE_AT:
            self._held_until = {k: t for k, t in self._held_until.items() if t > now}
        self._held_until[key] = now + seconds

    # -- one attempt per key --------------------------------------------------------------

    def attempt_in_flight(self, key: str) -> asyncio.Future[None] | None:
        return self._attempts.get(key)

    def begin_attempt(self, key: str) -> None:
        self._attempts[key] = asyncio.get_running_loop().create_future()

    def end_attempt(self, key: str) -> None:
        fut = self._attempts.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- waiting for a value ---------------------------------------------------------------

    async def wait(self, key: str, seconds: float) -> bool:
        """Wait up to `seconds` for `key` to be woken: its value landed, its lease ended,
        the lease attempt in flight for it finished, or the key's poll tick came. True
        when woken. All waiters of a key share one future, so they wake together and
        share the Redis read that follows."""
        fut = self._waiters.get(key)
        if fut is None:
            fut = self._waiters[key] = asyncio.get_running_loop().create_future()
            interval = self._next_poll(key)
            self._ticks[key] = asyncio.get_running_loop().call_later(interval, self._tick, key, fut)
        self._counts[key] = self._counts.get(key, 0) + 1
        waits: set[asyncio.Future[None]] = {fut}
        attempt = self._attempts.get(key)
        if attempt is not None:
            waits.add(attempt)
        try:
            done, _ = await asyncio.wait(
                waits, timeout=max(seconds, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
            return bool(done)
        finally:
            left = self._counts[key] - 1
            if left:
                self._counts[key] = left
            else:  # the last waiter out drops the key's state
                del self._counts[key]
                self._waiters.pop(key, None)
                tick = self._ticks.pop(key, None)
                if tick is not None:
                    tick.cancel()

    def _next_poll(self, key: str) -> float:
        now = self._clock()
        interval, used = self._poll.get(key, (POLL_FIRST, now))
        if now - used > 2 * POLL_MAX:  # a new episode of waiting: start fast again
            interval = POLL_FIRST
        if len(self._poll) >= _PRUNE_AT:
            self._poll = {k: v for k, v in self._poll.items() if now - v[1] <= 2 * POLL_MAX}
        self._poll[key] = (min(interval * 2, POLL_MAX), now)
        return interval

    def _tick(self, key: str, fut: asyncio.Future[None]) -> None:
        # The safety-net poll: wake the key's waiters to look at Redis themselves.
        if self._waiters.get(key) is fut:
            del self._waiters[key]
            self._ticks.pop(key, None)
        if not fut.done():
            fut.set_result(None)

    def wake(self, key: str) -> None:
        """`key`'s value landed, or its lease ended: wake its waiters."""
        self._held_until.pop(key, None)
        self._poll.pop(key, None)
        tick = self._ticks.pop(key, None)
        if tick is not None:
            tick.cancel()
        fut = self._waiters.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def wake_all(self) -> None:
        for key in list(self._waiters):
            self.wake(key)
        self._held_until.clear()
