"""Invalidation: applying Invalidate to Redis and publishing it, applying the events of
other gateways, and what the subscription's health means for L1.

An Invalidate is applied to Redis first, then published: the event goes out even when
applying failed halfway (whatever was removed must be evicted elsewhere, and evicting
more than was removed is harmless). The caller's deadline cannot split the two: the
Cache runs writes shielded from the caller's cancellation (see cache.py).

Events from other gateways evict what they name from L1 and wake the lease waiters of
the keys they concern, at a cost proportional to what they evict. When the subscription
drops, L1 is flushed (this gateway may have missed events) and set aside for a Redis
outage; Subscribe streams get RESET.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from google.protobuf.message import DecodeError

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import events
from cachegw_gateway.config import InvalidationConfig
from cachegw_gateway.events import StreamId
from cachegw_gateway.freshness import Generations
from cachegw_gateway.l1tier import L1Tier
from cachegw_gateway.l2 import L2Unavailable, RedisStore
from cachegw_gateway.leases import Leases
from cachegw_gateway.policy import PolicyTable
from cachegw_gateway.stats import GatewayStats

log = logging.getLogger(__name__)

# Audit-stream entries read per round trip when a Subscribe replays what was missed.
REPLAY_BATCH = 1000


class Invalidation:
    def __init__(
        self,
        store: RedisStore,
        tier: L1Tier,
        policy: PolicyTable,
        stats: GatewayStats,
        generations: Generations,
        leases: Leases,
        *,
        origin: str,
        invalidation: InvalidationConfig,
    ) -> None:
        self._store = store
        self._tier = tier
        self._policy = policy
        self._stats = stats
        self._gens = generations
        self._leases = leases
        self._origin = origin
        self._config = invalidation

    async def invalidate(
        self,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        tags: Sequence[str] = (),
        classes: Sequence[str] = (),
    ) -> tuple[int, str]:
        """Apply an invalidation to Redis, then publish it; returns (removed, event id).

        This gateway's own L1 is cleared before and after the Redis part (a read racing
        the deletes must not refill it); the others clear theirs when the event lands."""
        self.evict(keys, prefixes, tags, classes)
        if keys and not (prefixes or tags or classes):
            # Keys alone: removed and published by one script, in one round trip.
            try:
                removed, event_id = await self._store.delete(
                    keys, event=self._event(keys), max_events=self._config.stream_max_len
                )
            finally:
                self.evict(keys)
            self._stats.invalidations_published += 1
            return removed, event_id
        removed = 0
        try:
            if keys:
                removed += await self._store.unlink(keys)
            if prefixes:
                removed += await self._store.delete_prefixes(prefixes)
            if tags:
                removed += await self._store.delete_tags(tags)
            if classes:
                self._gens.update(await self._store.bump_generations(classes))
        except BaseException:
            # Part of it may have been applied: whatever was, must be evicted everywhere.
            await self._publish_after_failure(keys, prefixes, tags, classes)
            raise
        finally:
            self.evict(keys, prefixes, tags, classes)
        event_id = await self.publish(keys=keys, prefixes=prefixes, tags=tags, classes=classes)
        return removed, event_id

    async def publish(
        self,
        *,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        tags: Sequence[str] = (),
        classes: Sequence[str] = (),
    ) -> str:
        event = events.make(
            origin=self._origin, keys=keys, prefixes=prefixes, tags=tags, classes=classes
        )
        event_id = await self._store.publish(event.SerializeToString(), self._config.stream_max_len)
        self._stats.invalidations_published += 1
        return event_id

    def _event(
        self,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        tags: Sequence[str] = (),
        classes: Sequence[str] = (),
    ) -> bytes:
        return events.make(
            origin=self._origin, keys=keys, prefixes=prefixes, tags=tags, classes=classes
        ).SerializeToString()

    async def _publish_after_failure(
        self,
        keys: Sequence[str],
        prefixes: Sequence[str],
        tags: Sequence[str],
        classes: Sequence[str],
    ) -> None:
        try:
            await self.publish(keys=keys, prefixes=prefixes, tags=tags, classes=classes)
        except L2Unavailable as exc:
            # Other gateways' copies age out within their class's l1_ttl (the bound
            # docs/consistency.md states for a lost event).
            log.warning("could not publish an invalidation that was partly applied: %s", exc)

    # -- this gateway's copies -------------------------------------------------------------

    def evict(
        self,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        tags: Sequence[str] = (),
        classes: Sequence[str] = (),
    ) -> None:
        """Forget everything this gateway holds that an invalidation names, and wake the
        lease waiters of the keys it concerns (they look at Redis again)."""
        self._tier.evict(keys, prefixes, tags, classes)
        table = self._leases.table
        for key in keys:
            table.wake(key)
        if prefixes or classes:
            wanted_prefixes = tuple(prefixes)
            wanted_classes = frozenset(classes)
            table.wake_matching(
                lambda key: (
                    key.startswith(wanted_prefixes)
                    or (bool(wanted_classes) and self._policy.classify(key).name in wanted_classes)
                )
            )
        # A tag names values, and a waited-on key has none usable: its waiters stay put
        # (a refused or released lease, or the safety poll, wakes them).

    def apply_event(self, event: pb.InvalidationEvent) -> None:
        """An event from the bus. This gateway's own events were applied when made."""
        self._stats.invalidations_received += 1
        if events.is_reset(event):
            self._store.on_class_event()
            self.flush("a RESET event")
        elif event.origin != self._origin:
            if event.classes:
                self._store.on_class_event()
            self.evict(event.keys, event.prefixes, event.tags, event.classes)

    def flush(self, reason: str, *, keep_fallback: bool = False) -> None:
        self._tier.flush(reason, keep_fallback=keep_fallback)
        self._leases.table.wake_all()

    def subscription_lost(self, reason: str) -> None:
        self._store.on_subscription(False)
        self._tier.suspend_fills()
        self.flush(f"invalidation subscription lost ({reason})", keep_fallback=True)

    def subscription_live(self, again: bool) -> None:
        if again:
            self._stats.redis_reconnects += 1
            log.info("invalidation subscription re-established")
        self._store.on_subscription(True)
        self._tier.resume_fills()
        self._leases.table.wake_all()

    # -- Subscribe's replay ----------------------------------------------------------------

    async def replay(self, since: StreamId) -> AsyncIterator[pb.InvalidationEvent]:
        """The events after `since` from the audit stream, in order; a single RESET when
        the stream can no longer tell (it was trimmed past `since`, or lost)."""
        if await self._store.events_lost_after(since):
            yield events.reset(self._origin)
            return
        cursor = events.format_id(since)
        while True:
            batch = await self._store.events_after(cursor, REPLAY_BATCH)
            for event_id, payload in batch:
                try:
                    event = pb.InvalidationEvent.FromString(payload)
                except DecodeError:
                    log.warning("unreadable event %s in the audit stream: sending RESET", event_id)
                    event = events.reset(self._origin)
                event.id = event_id
                yield event
                cursor = event_id
            if len(batch) < REPLAY_BATCH:
                return
