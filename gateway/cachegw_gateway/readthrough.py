"""Read-through: the gateway loads a miss of a read-through class from the class's origin
itself, under the same lease a cache-aside caller would get.

After the read path found nothing usable in L1 and Redis:

- **one key** (`one`): the lease protocol (`Leases.contend`) decides who loads. The
  caller that gets the lease, on any gateway, loads; every other caller of the key, on
  every gateway, waits server-side for the value the holder stores (woken by the fills
  channel) and is answered it. A holder that dies loses its lease when it expires and a
  waiter takes over. A wait that ends without a value (the caller's deadline, or the
  class's max_wait_seconds) is DEADLINE_EXCEEDED: never MISS, nobody else would load.
- **a batch** (`many`, GetMany): one lease attempt per missing key without waiting, then
  one `Load` per origin for every key whose lease was granted, stored in one pipeline;
  the keys another caller holds are waited for as above (one `Load` each if a lease
  holder dies and the wait takes it over).

The load and its fill run as a task of their own (shielded): the holder's caller leaving
(a deadline, a cancellation) does not cut off the load every waiter depends on. The
origin call has its own deadline (origin.timeout_seconds, below the lease's timeout).
What was loaded is stored with the origin's version (writes.py, the Set script): a fill
that a newer write or load overtook is not applied, and the loaded value is still this
caller's answer (it was the origin's state when the load read it). A key the origin says
does not exist is stored as a tombstone for the class's negative_ttl_seconds, or, with
none, its lease is released. When the origin fails, the leases are released at once (so
the next caller tries again) and the caller gets the failure's status (origin.py);
nothing is cached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import envelope, freshness, wire
from cachegw_gateway.l2 import L2Unavailable
from cachegw_gateway.leases import Leases, LeaseToken
from cachegw_gateway.origin import Limits, Loaded, LoadWaitTimeout, OriginError, Origins
from cachegw_gateway.policy import KeyClass
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.telemetry import tracing
from cachegw_gateway.writes import SetItem, WriteOutcome, WritePath

T = TypeVar("T")
Shield = Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Miss:
    """A key the read path found nothing usable for."""

    key: str
    kc: KeyClass
    unusable: int | None  # the version of a stored value that cannot be answered


@dataclass(frozen=True, slots=True)
class _Granted:
    miss: Miss
    token: LeaseToken


class ReadThrough:
    def __init__(
        self,
        leases: Leases,
        writes: WritePath,
        origins: Origins,
        stats: GatewayStats,
        *,
        max_ttl_ms: int,
        max_key_bytes: int,
        shield: Shield,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._leases = leases
        self._writes = writes
        self._origins = origins
        self._stats = stats
        self._max_ttl_ms = max_ttl_ms
        self._max_key_bytes = max_key_bytes
        self._shield = shield
        self._clock = clock
        self._wall_ms = wall_clock_ms

    async def one(self, miss: Miss, deadline: float | None, allow_stale: bool) -> bytes:
        """The answer for one key: loaded here, or stored meanwhile by whoever held the
        lease. Raises OriginError (LoadWaitTimeout when the wait ran out)."""
        key, kc = miss.key, miss.kc
        got = await self._leases.contend(key, kc, miss.unusable, 0, deadline, allow_stale)
        if isinstance(got, bytes):
            return got
        if got is None:
            waited = kc.max_wait_ms / 1000
            raise LoadWaitTimeout(
                f"{key!r} (read-through class {kc.name}): another caller's load from origin "
                f"{kc.origin} did not land within this call's deadline or the class's "
                f"max_wait_seconds ({waited:g}s); retry"
            )
        answers: list[bytes] = await self._shield(self._load([_Granted(miss, got)]))
        return answers[0]

    async def many(
        self, misses: Sequence[Miss], deadline: float | None, allow_stale: bool
    ) -> list[bytes]:
        """Answers for `misses` (distinct keys), in order: the keys whose lease this call
        gets are loaded in one `Load` per origin; the others wait for their holders."""
        # Taking the leases and loading is one shielded task: a caller that leaves in
        # between cannot strand a lease it was granted.
        first: list[bytes | None] = await self._shield(self._claim_and_load(misses, allow_stale))
        waiting = [i for i, answer in enumerate(first) if answer is None]
        waited = await _gather([self.one(misses[i], deadline, allow_stale) for i in waiting])
        for i, answer in zip(waiting, waited, strict=True):
            first[i] = answer
        out = [a for a in first if a is not None]
        assert len(out) == len(misses)
        return out

    async def _claim_and_load(
        self, misses: Sequence[Miss], allow_stale: bool
    ) -> list[bytes | None]:
        """One lease attempt per key (no waiting), then one Load per origin for the keys
        granted; per key its answer, or None when another caller holds the lease."""
        attempts = await asyncio.gather(
            *(self._leases.try_once(m.key, m.kc, m.unusable, allow_stale) for m in misses),
            return_exceptions=True,
        )
        failed = next((a for a in attempts if isinstance(a, BaseException)), None)
        if failed is not None:  # (Redis failed some attempts) give back those granted
            for miss, got in zip(misses, attempts, strict=True):
                if isinstance(got, LeaseToken):
                    self._leases.abandon(miss.key, got)
            raise failed
        answers: list[bytes | None] = [None] * len(misses)
        granted: dict[str, list[tuple[int, _Granted]]] = {}
        for i, (miss, got) in enumerate(zip(misses, attempts, strict=True)):
            if isinstance(got, bytes):
                answers[i] = got
            elif isinstance(got, LeaseToken):
                granted.setdefault(miss.kc.origin, []).append((i, _Granted(miss, got)))
        loaded = await _gather([self._load([g for _, g in group]) for group in granted.values()])
        for group, group_answers in zip(granted.values(), loaded, strict=True):
            for (i, _), answer in zip(group, group_answers, strict=True):
                answers[i] = answer
        return answers

    async def _load(self, granted: Sequence[_Granted]) -> list[bytes]:
        """Load the keys whose leases are granted (one origin), store what came back,
        answer it. On failure every lease is released and the error raised."""
        loaded, outcomes = await self._load_and_store(granted)
        return [
            self._answer(g.miss.kc, got, out)
            for g, got, out in zip(granted, loaded, outcomes, strict=True)
        ]

    async def refresh(
        self, granted: Sequence[tuple[Miss, LeaseToken]]
    ) -> list[WriteOutcome | L2Unavailable | None]:
        """Refresh-ahead (refreshahead.py): load keys whose refresh leases are granted
        (one origin) and store them as a miss's load would (under the lease, with the
        origin's version: a write or load that overtook it wins). Per key its store's
        outcome (None: nothing stored, a NOT_FOUND without negative caching); raises the
        OriginError of a failed Load, every lease released."""
        _, outcomes = await self._load_and_store([_Granted(m, t) for m, t in granted])
        return outcomes

    async def _load_and_store(
        self, granted: Sequence[_Granted]
    ) -> tuple[list[Loaded], list[WriteOutcome | L2Unavailable | None]]:
        kcs = [g.miss.kc for g in granted]
        keys = [g.miss.key for g in granted]
        client = self._origins.client(kcs[0].origin)
        limits = Limits([kc.max_value_bytes for kc in kcs], self._max_ttl_ms, self._max_key_bytes)
        for name in {kc.name for kc in kcs}:
            self._stats.for_class(name).origin_load_calls += 1
        tracing.annotate(tier="origin", origin_keys=len(keys))
        # A class's hard_timeout_seconds replaces origin.timeout_seconds (the shortest
        # of a batch's classes).
        hard = min((kc.hard_timeout_ms for kc in kcs if kc.hard_timeout_ms), default=0)
        try:
            loaded = await client.load(keys, limits, None, hard / 1000 or None)
        except BaseException as exc:
            for g in granted:
                self._leases.abandon(g.miss.key, g.token)
            if isinstance(exc, OriginError):
                for kc in kcs:
                    self._stats.for_class(kc.name).origin_errors += 1
                raise type(exc)(
                    f"loading {_shown(keys)}: {exc}; nothing was cached, and the lease was "
                    "released for the next caller",
                    sent=exc.sent,
                ) from None
            raise
        items: list[SetItem] = []
        stored_at: list[int] = []
        for i, (g, got) in enumerate(zip(granted, loaded, strict=True)):
            kc = g.miss.kc
            counters = self._stats.for_class(kc.name)
            counters.origin_loads += 1
            if got.found:
                items.append(self._fill(g, got))
                stored_at.append(i)
            else:
                counters.origin_not_found += 1
                if kc.negative_ttl_ms:
                    items.append(self._tombstone(g, got))
                    stored_at.append(i)
                else:
                    self._leases.abandon(g.miss.key, g.token)  # nothing to store: next caller
        outcomes: list[WriteOutcome | L2Unavailable | None] = [None] * len(granted)
        if items:
            done: list[WriteOutcome | L2Unavailable]
            try:
                done = await self._writes.set_many(items)
            except L2Unavailable as exc:
                done = [exc] * len(items)
            for i, one in zip(stored_at, done, strict=True):
                outcomes[i] = one
        for g, out in zip(granted, outcomes, strict=True):
            if isinstance(out, L2Unavailable):
                # Redis did not take it: the caller still gets what the origin said, and
                # the lease goes, so that a waiter loads again rather than wait for it.
                self._leases.abandon(g.miss.key, g.token)
        return loaded, outcomes

    def _fill(self, g: _Granted, got: Loaded) -> SetItem:
        return SetItem(
            g.miss.key,
            got.value,
            g.miss.kc,
            ttl_ms=got.ttl_ms,
            tags=got.tags,
            lease_token=g.token,
            # Unversioned (0): the gateway numbers it (the stored version + 1).
            origin_version=got.version or None,
        )

    def _tombstone(self, g: _Granted, got: Loaded) -> SetItem:
        # The origin's version of the removal, 0 when it keeps none: a tombstone of 0
        # never hides a value that any write creates.
        return SetItem(
            g.miss.key,
            b"",
            g.miss.kc,
            ttl_ms=g.miss.kc.negative_ttl_ms,
            lease_token=g.token,
            origin_version=got.version,
            flags=envelope.NOT_FOUND,
        )

    def _answer(self, kc: KeyClass, got: Loaded, out: WriteOutcome | L2Unavailable | None) -> bytes:
        counters = self._stats.for_class(kc.name)
        stored = isinstance(out, WriteOutcome) and out.stored
        ttl_ms = out.ttl_ms if isinstance(out, WriteOutcome) and stored else 0
        if not got.found:
            counters.not_found += 1
            return freshness.not_found(kc, got.version, ttl_ms, pb.TIER_ORIGIN)
        version = out.version if isinstance(out, WriteOutcome) and stored else got.version
        return wire.answer(
            pb.STATUS_HIT,
            key_class=kc.name,
            tier=pb.TIER_ORIGIN,
            value=got.value,
            version=version,
            ttl_ms=ttl_ms,
            tags=got.tags,
        )


async def _gather(work: Sequence[Awaitable[T]]) -> list[T]:
    """Every result, or the first failure once all have ended (none left running)."""
    results = await asyncio.gather(*work, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def _shown(keys: Sequence[str]) -> str:
    head = ", ".join(repr(k) for k in keys[:3])
    return head + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
