"""Stale-if-error: the last copy of each key of a class with ``stale_if_error_seconds``,
kept to be answered STALE while Redis cannot be reached.

An L1 copy is served as HIT, so it may not outlive the value's fresh life nor the
class's ``l1_ttl_seconds`` (the bound on a missed invalidation). The copies kept here
are another matter: they are only ever answered after a Redis read failed (or the
circuit breaker refused it), always as STATUS_STALE with no remaining TTL, and at most
``stale_if_error_seconds`` past the fresh life the copied Redis entry had. They live in
a second native LRU of their own (`l1.stale_if_error_max_bytes`, `l1.max_entries`), so
the hot L1 path is unchanged and the memory they take is bounded.

They enter exactly where L1 copies do (`L1Tier.fill`: under a read's or write's fill
ticket, while the invalidation subscription is live), whether or not the class keeps L1
copies, and leave the same ways: a write or invalidation of the key, a prefix, tag or
class invalidation, a flush. When the subscription drops they are kept (Redis is likely
down: that is what they are for); when it comes back they are dropped, because events
may have been missed meanwhile and Redis answers again anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import envelope, wire
from cachegw_gateway.policy import KeyClass
from cachegw_gateway.stats import ClassCounters
from cachegw_native.l1 import L1Cache, footprint

# A copy: value, version, tags, key class name, the class's counters.
_Copy = tuple[bytes, int, tuple[str, ...], str, ClassCounters]


class LastKnown:
    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Charged as L1 entries are (l1tier.entry_charge): the objects a copy holds as
        # allocated, plus the native cache's own memory per copy, group and name.
        self._copies = L1Cache(max_entries, max_bytes, clock=clock, charge_overhead=True)
        self._clock = clock

    @property
    def copies(self) -> L1Cache:
        return self._copies

    def keep(
        self,
        key: str,
        kc: KeyClass,
        env: envelope.Envelope,
        fresh_left_ms: int,
        since: float,
        counters: ClassCounters,
        groups: tuple[str, ...],
    ) -> None:
        """Keep `env` as K's last known copy, answerable until its fresh life (counted
        from `since`, before the Redis call was sent) plus the class's bound."""
        ttl = (fresh_left_ms + kc.stale_if_error_ms) / 1000 - (self._clock() - since)
        if ttl <= 0:
            self._copies.delete(key)
            return
        copy: _Copy = (env.value, env.version, env.tags, kc.name, counters)
        # The key, the tuple, value, version and tags (the class name and counters are
        # shared).
        size = footprint(key, copy, env.value, env.version)
        if env.tags:
            size += footprint(env.tags, *env.tags)
        if not self._copies.set(key, copy, size, ttl, groups):
            self._copies.delete(key)  # not admitted: an older copy must not stay behind

    def answer(self, key: str) -> bytes | None:
        """K's last known copy as a STALE answer, or None (none, or past its bound)."""
        copy: _Copy | None = self._copies.get(key)  # type: ignore[assignment]
        if copy is None:
            return None
        value, version, tags, key_class, counters = copy
        counters.stale += 1
        counters.stale_if_error += 1
        return wire.answer(
            pb.STATUS_STALE,
            tier=pb.TIER_L1,
            key_class=key_class,
            value=value,
            version=version,
            ttl_ms=0,
            tags=tags,
        )

    def forget(self, key: str) -> None:
        self._copies.delete(key)

    def forget_prefix(self, prefix: str) -> None:
        self._copies.delete_prefix(prefix)

    def forget_group(self, group: str) -> None:
        self._copies.delete_group(group)

    def clear(self) -> None:
        self._copies.clear()
