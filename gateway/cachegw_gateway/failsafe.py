"""Fail-safe: while a read-through class's origin fails or is slow, answer the last value,
STALE, for a bounded time, instead of an error or a long wait.

The last value is the one Redis already holds: a class with ``fail_safe_seconds = F``
has every value kept in Redis F past its fresh life (the stale window's mechanism:
`KeyClass.keep_ms`, the Set script's PX), so every gateway sees the same last value, and
a gateway restarted meanwhile still has it. Past its fresh life such an entry is dead to
every reader (`freshness.judge`); only this module answers it, and only as STATUS_STALE
(tier L2, no remaining TTL), never HIT.

A Get (or GetMany) of such a class that finds its value past its fresh life, still
within F (`freshness.kept_for_fail_safe`), loads it as read-through does
(readthrough.py: under the lease, one Load per key across the gateways), and:

- the load lands within the class's ``soft_timeout_seconds`` (0: whenever it lands):
  the loaded value, as without fail-safe;
- the load fails (the origin unreachable, its breaker open, out of time, a bad answer;
  or a wait for another gateway's load ran out): the last value, STALE;
- the soft timeout (or the caller's own deadline, less a margin) comes first: the last
  value, STALE, while the load goes on in the background (it is a task of its own,
  shielded: readthrough.py) and fills the cache when it completes, for the next callers.

A Load gives up at the class's ``hard_timeout_seconds`` (origin.timeout_seconds when 0):
a caller with no last value (a cold key, or one past F) then gets DEADLINE_EXCEEDED, as
without fail-safe. Counted per class: `fail_safe_errors`, `fail_safe_timeouts` (both in
`stale` too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import freshness, wire
from cachegw_gateway.freshness import Generations
from cachegw_gateway.l2 import L2Entry
from cachegw_gateway.origin import OriginError
from cachegw_gateway.readthrough import Miss, ReadThrough
from cachegw_gateway.stats import GatewayStats

log = logging.getLogger(__name__)

# Kept back from a caller's deadline, so that its STALE answer reaches it in time.
DEADLINE_MARGIN = 0.025


class FailSafe:
    def __init__(
        self,
        through: ReadThrough,
        stats: GatewayStats,
        generations: Generations,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._through = through
        self._stats = stats
        self._gens = generations
        self._clock = clock

    def fallback(self, miss: Miss, entry: L2Entry | None) -> L2Entry | None:
        """`entry` when fail-safe may answer it for `miss`, else None."""
        kc = miss.kc
        if entry is None or not kc.fail_safe_ms:
            return None
        return entry if freshness.kept_for_fail_safe(entry, kc, self._gens[kc.name]) else None

    def _patience(self, soft_ms: int, deadline: float | None) -> float | None:
        """How long a caller with a last value waits for the load (None: until it ends)."""
        wait = soft_ms / 1000 if soft_ms else None
        if deadline is not None:
            left = max(0.0, deadline - self._clock() - DEADLINE_MARGIN)
            wait = left if wait is None else min(wait, left)
        return wait

    async def one(
        self, miss: Miss, last: L2Entry, deadline: float | None, allow_stale: bool
    ) -> bytes:
        """The loaded value, or `last` STALE when the load fails or outlasts the caller's
        patience (the load goes on)."""
        wait = self._patience(miss.kc.soft_timeout_ms, deadline)
        try:
            async with asyncio.timeout(wait):
                return await self._through.one(miss, deadline, allow_stale)
        except TimeoutError:
            self._stats.for_class(miss.kc.name).fail_safe_timeouts += 1
            return self._stale(miss, last)
        except OriginError as exc:
            log.debug("fail-safe: answering %r STALE: %s", miss.key, exc)
            self._stats.for_class(miss.kc.name).fail_safe_errors += 1
            return self._stale(miss, last)

    async def many(
        self,
        misses: Sequence[Miss],
        entries: Sequence[L2Entry | None],
        deadline: float | None,
        allow_stale: bool,
    ) -> list[bytes]:
        """`ReadThrough.many` for a batch, with fail-safe where every key of it has a
        last value (a GetMany fails or waits whole: a key without one needs its load)."""
        lasts = [self.fallback(m, e) for m, e in zip(misses, entries, strict=True)]
        covered: list[L2Entry] = [e for e in lasts if e is not None]
        if len(covered) < len(misses):
            return await self._through.many(misses, deadline, allow_stale)
        softs = [m.kc.soft_timeout_ms for m in misses]
        soft = 0 if 0 in softs else min(softs)  # 0: a class that waits for the whole load
        task = asyncio.ensure_future(self._through.many(misses, deadline, allow_stale))
        try:
            done, _ = await asyncio.wait({task}, timeout=self._patience(soft, deadline))
        except BaseException:
            task.cancel()  # the loads themselves are shielded (readthrough.py)
            raise
        if not done:
            task.cancel()
            for m in misses:
                self._stats.for_class(m.kc.name).fail_safe_timeouts += 1
            return [self._stale(m, e) for m, e in zip(misses, covered, strict=True)]
        exc = task.exception()
        if exc is None:
            return task.result()
        if not isinstance(exc, OriginError):
            raise exc
        log.debug("fail-safe: answering %d keys STALE: %s", len(misses), exc)
        for m in misses:
            self._stats.for_class(m.kc.name).fail_safe_errors += 1
        return [self._stale(m, e) for m, e in zip(misses, covered, strict=True)]

    def _stale(self, miss: Miss, last: L2Entry) -> bytes:
        counters = self._stats.for_class(miss.kc.name)
        counters.stale += 1
        env = last.envelope
        return wire.answer(
            pb.STATUS_STALE,
            key_class=miss.kc.name,
            tier=pb.TIER_L2,
            value=env.value,
            version=env.version,
            ttl_ms=0,
            tags=env.tags,
        )
