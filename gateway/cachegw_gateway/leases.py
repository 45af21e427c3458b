"""The lease protocol: one home for stampede protection's second layer.

The lease itself lives in Redis (``<p>:{K}:lease``, SET NX PX with the token; see l2.py):
across every gateway only the caller holding the token may fill K. `Leases` runs the
protocol for one gateway: grant the lease on a miss, or wait server-side for the
holder's value; hand out refresh leases (XFetch, stale-while-revalidate); release a
lease whose loader failed. `LeaseTable` keeps what one gateway needs so that its own
callers of a key cost one Redis call, not one each: whether a lease of K is known to be
held (here or elsewhere) and until when, one lease attempt in flight per key, and one
shared wake-up per key for everyone waiting for K's value to land. Wake-ups come from
the fills channel, from invalidation events and from the bus reconnecting; waiters also
poll Redis with backoff as a safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import freshness
from cachegw_gateway.freshness import FRESH, STALE, Generations
from cachegw_gateway.l2 import Acquired, L2Entry, L2Unavailable, RedisStore
from cachegw_gateway.policy import KeyClass
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.telemetry import tracing

_TOKEN = struct.Struct(">16sQI")
TOKEN_SIZE = _TOKEN.size
_PRUNE_AT = 4096
# Waiters look at Redis themselves at these intervals (doubling per key) in case a
# wake-up was lost: the fills channel is the fast path, polling only the safety net.
POLL_FIRST, POLL_MAX = 0.05, 1.0
# Kept back from a waiting caller's deadline, so that its MISS reaches it in time.
WAIT_MARGIN = 0.025


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

    def wake_matching(self, wanted: Callable[[str], bool]) -> None:
        """Wake the waiters (and forget the holders) of the keys `wanted` picks: a broad
        invalidation costs the keys waited on, not a stampede of every waiter."""
        for key in [k for k in self._waiters if wanted(k)]:
            self.wake(key)
        for key in [k for k in self._held_until if wanted(k)]:
            del self._held_until[key]


ReadOne = Callable[[str], Awaitable[L2Entry | None]]


class Leases:
    """The lease protocol of one gateway (one event loop)."""

    def __init__(
        self,
        store: RedisStore,
        stats: GatewayStats,
        generations: Generations,
        read: ReadOne,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._store = store
        self._stats = stats
        self._gens = generations
        self._read = read  # the read path's coalesced Redis read (which may fill L1)
        self._clock = clock
        self._wall_ms = wall_clock_ms
        self.table = LeaseTable(clock)
        # Releases of leases whose grant may have landed with nobody to use it.
        self.cleanups: set[asyncio.Task[None]] = set()

    def abandon(self, key: str, token: LeaseToken) -> None:
        """An attempt failed or was cancelled while in flight: Redis may have granted the
        lease anyway, to a token nobody holds, and everyone would wait for it until it
        expires. Release it (compare-and-delete: a no-op unless it was granted), in the
        background, since the caller may be leaving because of a deadline."""

        async def release() -> None:
            with contextlib.suppress(L2Unavailable):
                if await self._store.release(key, token.raw):
                    self.table.wake(key)

        task = asyncio.get_running_loop().create_task(release())
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)

    def busy(self, key: str) -> bool:
        """A lease of `key` is known to be held, or an attempt at it is in flight here."""
        return self.table.held(key) or self.table.attempt_in_flight(key) is not None

    def token_for(self, kc: KeyClass) -> LeaseToken:
        return LeaseToken.new(self._wall_ms(), self._gens[kc.name])

    async def try_refresh(self, key: str, kc: KeyClass, version: int) -> LeaseToken | None:
        """A refresh lease for a value still served (XFetch or stale window), if nobody
        holds one; never fails the read it rides on."""
        if self.busy(key):
            return None
        try:
            token, got = await self._attempt(key, kc, version)
        except L2Unavailable:
            return None
        if got.granted:
            self.table.note_held(key, kc.lease_timeout_ms / 1000)
            counters = self._stats.for_class(kc.name)
            counters.refreshes += 1
            counters.leases_granted += 1
            tracing.annotate(refresh=True, lease="granted")
            return token
        if got.holder_pttl_ms:
            self.table.note_held(key, got.holder_pttl_ms / 1000)
        return None

    async def _attempt(
        self, key: str, kc: KeyClass, unusable: int | None
    ) -> tuple[LeaseToken, Acquired]:
        """One lease attempt in Redis, the only one in flight for `key` here."""
        token = self.token_for(kc)
        self.table.begin_attempt(key)
        try:
            return token, await self._store.acquire(key, token.raw, kc.lease_timeout_ms, unusable)
        except BaseException:
            self.abandon(key, token)
            raise
        finally:
            self.table.end_attempt(key)

    async def obtain(
        self,
        key: str,
        kc: KeyClass,
        unusable: int | None,
        max_wait_ms: int,
        deadline: float | None,
        allow_stale: bool,
    ) -> bytes:
        """A miss with lease: grant the lease, or wait for the holder's value.

        One caller per gateway asks Redis at a time; the others wait on that attempt or
        on the key's wake-up (the fills channel, an invalidation) and then share one
        Redis read. A holder that never fills loses its lease when it expires (or
        releases it), and the next attempt here or in another gateway takes it over. A
        wait ends WAIT_MARGIN before the caller's deadline, or at `max_wait`, with MISS."""
        got = await self.contend(key, kc, unusable, max_wait_ms, deadline, allow_stale)
        if isinstance(got, LeaseToken):
            return freshness.leased(kc, got.raw)
        if got is None:
            self._stats.for_class(kc.name).misses += 1
            return freshness.miss(kc)
        return got

    async def contend(
        self,
        key: str,
        kc: KeyClass,
        unusable: int | None,
        max_wait_ms: int,
        deadline: float | None,
        allow_stale: bool,
    ) -> bytes | LeaseToken | None:
        """`obtain`'s protocol, for any loader: the lease (this caller loads: the
        cache-aside caller, or the gateway itself for a read-through class), the answer
        for the value another holder stored meanwhile, or None when the wait ran out."""
        started = self._clock()
        end = started + (max_wait_ms or kc.max_wait_ms) / 1000
        if deadline is not None:
            end = min(end, deadline - WAIT_MARGIN)
        got, outcome, waited = await self._loop(key, kc, unusable, end, allow_stale)
        tracing.annotate(lease=outcome)
        if waited:
            tracing.annotate(lease_wait_ms=(self._clock() - started) * 1000)
        return got

    async def try_once(
        self, key: str, kc: KeyClass, unusable: int | None, allow_stale: bool
    ) -> bytes | LeaseToken | None:
        """One lease attempt without waiting (a batch takes its leases this way before
        it loads): the lease, the answer for a value stored meanwhile, or None when
        another caller holds the lease (or an attempt at it is in flight here)."""
        if self.busy(key):
            return None
        token, got = await self._attempt(key, kc, unusable)
        if got.granted:
            self.table.note_held(key, kc.lease_timeout_ms / 1000)
            counters = self._stats.for_class(kc.name)
            counters.misses += 1
            counters.leases_granted += 1
            return token
        if got.entry is not None:
            return self._usable(kc, got.entry, allow_stale)
        if got.holder_pttl_ms:
            self.table.note_held(key, got.holder_pttl_ms / 1000)
        return None

    async def _loop(
        self, key: str, kc: KeyClass, unusable: int | None, end: float, allow_stale: bool
    ) -> tuple[bytes | LeaseToken | None, str, bool]:
        """(the lease or an answer or None, how the lease went, whether this caller
        waited)."""
        counters = self._stats.for_class(kc.name)
        waited = saw_holder = False
        while True:
            if not self.busy(key):
                token, got = await self._attempt(key, kc, unusable)
                if got.granted:
                    self.table.note_held(key, kc.lease_timeout_ms / 1000)
                    counters.misses += 1
                    counters.leases_granted += 1
                    if saw_holder:
                        counters.leases_taken_over += 1
                    outcome = "taken_over" if saw_holder else "granted"
                    return token, outcome, waited
                if got.entry is not None:
                    answer = self._usable(kc, got.entry, allow_stale)
                    if answer is not None:
                        return answer, "waited", waited
                    unusable = got.entry.envelope.version
                    continue
                if got.raw_mismatch:
                    unusable = 0  # not an envelope: the script reads its version as 0
                    continue
                saw_holder = True
                self.table.note_held(key, max(got.holder_pttl_ms, 1) / 1000)
            now = self._clock()
            if now < end:
                if not waited:
                    waited = True
                    counters.lease_waits += 1
                held_until = self.table.held_until(key) or end
                await self.table.wait(key, min(end, held_until) - now)
            if self._clock() >= end:
                counters.lease_wait_timeouts += 1
                return None, "timed_out", waited
            entry = await self._read(key)
            if entry is not None:
                answer = self._usable(kc, entry, allow_stale)
                if answer is not None:
                    return answer, "waited", waited
                unusable = entry.envelope.version

    def _usable(self, kc: KeyClass, entry: L2Entry, allow_stale: bool) -> bytes | None:
        """The answer for a value found while waiting: fresh, or stale when accepted."""
        verdict, fresh_left = freshness.judge(entry, kc, self._gens[kc.name])
        if verdict == FRESH:
            freshness.count_found(self._stats.for_class(kc.name), entry)
            return freshness.hit(kc, entry, fresh_left)
        if verdict == STALE and allow_stale:
            self._stats.for_class(kc.name).stale += 1
            return freshness.with_status(pb.STATUS_STALE, kc, entry, 0)
        return None

    async def release(self, key: str, token: LeaseToken) -> bool:
        """End a lease without storing (its loader failed): the value stays as it is, and
        the waiters here wake to take the lease over at once."""
        released = await self._store.release(key, token.raw)
        self.table.wake(key)
        return released
