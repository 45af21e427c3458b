"""The write path: Set and Delete.

Each write is one Redis script that applies it and, when other gateways may hold a copy,
publishes the invalidation event in the same step: a write applied in Redis is a write
published (see l2.py). Around it, this gateway keeps its own L1 honest: the key's copy
and in-flight read are dropped before the write is sent and again when it lands, and
the written value is copied into L1 only under a fill ticket that no invalidation or
other write of the key voided meanwhile (the read path's guard, see l1tier.py).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from cachegw_gateway import envelope, events
from cachegw_gateway.config import InvalidationConfig
from cachegw_gateway.freshness import Generations
from cachegw_gateway.l1tier import FillTicket, L1Tier
from cachegw_gateway.l2 import L2Unavailable, RedisStore, SetCall, SetResult
from cachegw_gateway.leases import Leases, LeaseToken
from cachegw_gateway.policy import KeyClass, PolicyTable
from cachegw_gateway.stats import GatewayStats


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    stored: bool
    version: int
    ttl_ms: int
    key_class: str
    lease_invalid: bool = False
    condition_failed: bool = False
    superseded: bool = False  # a live entry of a newer origin version stays
    replaced: bool = False  # stored over a value that existed


@dataclass(frozen=True, slots=True)
class SetItem:
    """One Set as the servicer checked it."""

    key: str
    value: bytes
    kc: KeyClass
    ttl_ms: int | None = None
    if_version: int | None = None
    tags: Sequence[str] = ()
    lease_token: LeaseToken | None = None
    condition: str = ""  # '', 'absent' or 'present'
    # Through the origin (read- and write-through): the origin's version, stored unless a
    # live newer one is there; None = the stored version + 1. Flags: envelope.NOT_FOUND
    # for a tombstone.
    origin_version: int | None = None
    flags: int = 0


@dataclass(slots=True)
class _Pending:
    item: SetItem
    call: SetCall
    ticket: FillTicket
    now_ms: int
    fresh_ttl: int
    cost: int
    fillable: bool = False


class WritePath:
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
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._store = store
        self._tier = tier
        self._policy = policy
        self._stats = stats
        self._gens = generations
        self._leases = leases
        self._origin = origin
        self._events = invalidation
        self._wall_ms = wall_clock_ms

    def event(self, keys: Sequence[str]) -> bytes:
        """The encoded KEYS event a write of `keys` publishes."""
        return events.make(origin=self._origin, keys=keys).SerializeToString()

    async def set(
        self, item: SetItem, via: Callable[[SetCall], Awaitable[SetResult]] | None = None
    ) -> WriteOutcome:
        """Write one value; `via` sends the Set script's call instead of the store (the
        write-behind journal's one-step append-and-set, writebehind.py)."""
        pending = self._begin(item)
        try:
            result = await (self._store.set if via is None else via)(pending.call)
        finally:
            self._settle(pending)
        return self._outcome(pending, result)

    async def set_many(self, items: Sequence[SetItem]) -> list[WriteOutcome | L2Unavailable]:
        """Many Sets in one Redis round trip; per item its outcome or its failure."""
        pending = [self._begin(item) for item in items]
        try:
            results = await self._store.set_many([p.call for p in pending])
        finally:
            for p in pending:
                self._settle(p)
        return [
            r if isinstance(r, L2Unavailable) else self._outcome(p, r)
            for p, r in zip(pending, results, strict=True)
        ]

    def _begin(self, item: SetItem) -> _Pending:
        """The Set script's call for `item`, with the key detached from L1 and a fill
        ticket taken before it is sent."""
        kc, token = item.kc, item.lease_token
        now_ms = self._wall_ms()
        fresh_ttl = kc.ttl_for_write(item.key, item.ttl_ms, now_ms)
        px = fresh_ttl + kc.keep_ms  # kept past freshness: stale window, fail-safe
        cost = max(0, now_ms - token.granted_ms) if token is not None else 0
        # A fill carries the generation its lease was granted under (Redis refuses it if
        # the class was invalidated since); a plain write is stamped with Redis's own.
        gen = token.generation if token is not None else self._gens[kc.name]
        tail = envelope.encode_tail(
            item.value,
            created_ms=now_ms,
            cost_ms=cost,
            soft_expiry_ms=now_ms + fresh_ttl,
            generation=gen,
            tags=item.tags,
            flags=item.flags,
        )
        call = SetCall(
            item.key,
            tail,
            px,
            item.if_version,
            lease_token=b"" if token is None else token.raw,
            key_class=kc.name,
            lease_generation=gen,
            tags=item.tags,
            expires_at_ms=now_ms + px,
            event=self.event([item.key]) if kc.events else b"",
            max_events=self._events.stream_max_len,
            condition=item.condition,
            origin_version=item.origin_version,
            format=envelope.format_of(item.flags),
        )
        self._tier.detach(item.key)
        return _Pending(item, call, self._tier.ticket([item.key]), now_ms, fresh_ttl, cost)

    def _settle(self, pending: _Pending) -> None:
        key = pending.item.key
        pending.fillable = self._tier.settle(pending.ticket)[0]
        # Reads that started while the write was in flight may carry either value.
        self._tier.detach(key)
        if pending.item.lease_token is not None:
            self._leases.table.wake(key)

    def _outcome(self, pending: _Pending, result: SetResult) -> WriteOutcome:
        item, kc, fresh_ttl = pending.item, pending.item.kc, pending.fresh_ttl
        self._gens.update({kc.name: result.generation})
        counters = self._stats.for_class(kc.name)
        if result.lease_invalid:
            counters.lease_fills_refused += 1
            return WriteOutcome(False, 0, fresh_ttl, kc.name, lease_invalid=True)
        if result.condition_failed:
            return WriteOutcome(False, result.version, fresh_ttl, kc.name, condition_failed=True)
        if result.superseded:
            return WriteOutcome(False, result.version, fresh_ttl, kc.name, superseded=True)
        if not result.stored:
            return WriteOutcome(False, result.version, fresh_ttl, kc.name)
        counters.sets += 1
        if result.event_id:
            self._stats.invalidations_published += 1
        if item.lease_token is not None:
            counters.lease_fills += 1
        if pending.fillable:
            env = envelope.Envelope(
                result.version,
                pending.now_ms,
                pending.cost,
                pending.now_ms + fresh_ttl,
                result.generation,
                tuple(item.tags),
                item.value,
                item.flags,
            )
            self._tier.fill(item.key, kc, env, fresh_ttl, pending.ticket.sent_at)
        return WriteOutcome(True, result.version, fresh_ttl, kc.name, replaced=result.replaced)

    async def delete(self, keys: Sequence[str]) -> tuple[int, str]:
        """Remove `keys` (values, leases, counters, limiters) and publish one event, in
        one script; returns (how many values existed, the event id)."""
        each, event_id = await self.delete_each(keys)
        return sum(each), event_id

    async def delete_each(self, keys: Sequence[str]) -> tuple[list[bool], str]:
        """`delete`, saying per key whether a value existed."""
        for key in keys:
            self._tier.detach(key)
            self._stats.for_class(self._policy.classify(key).name).deletes += 1
        try:
            _, event_id, each = await self._store.delete_each(
                keys, event=self.event(keys), max_events=self._events.stream_max_len
            )
        finally:
            for key in keys:
                self._tier.detach(key)
                self._leases.table.wake(key)
        self._stats.invalidations_published += 1
        return each, event_id
