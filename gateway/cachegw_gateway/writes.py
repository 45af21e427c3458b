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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachegw_gateway import envelope, events
from cachegw_gateway.config import InvalidationConfig
from cachegw_gateway.freshness import Generations
from cachegw_gateway.l1tier import L1Tier
from cachegw_gateway.l2 import RedisStore
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
        self,
        key: str,
        value: bytes,
        kc: KeyClass,
        ttl_ms: int | None,
        if_version: int | None,
        *,
        tags: Sequence[str] = (),
        lease_token: LeaseToken | None = None,
    ) -> WriteOutcome:
        now_ms = self._wall_ms()
        fresh_ttl = kc.ttl_for_write(key, ttl_ms, now_ms)
        px = fresh_ttl + kc.stale_ms
        cost = max(0, now_ms - lease_token.granted_ms) if lease_token is not None else 0
        # A fill carries the generation its lease was granted under (Redis refuses it if
        # the class was invalidated since); a plain write is stamped with Redis's own.
        gen = lease_token.generation if lease_token is not None else self._gens[kc.name]
        tail = envelope.encode_tail(
            value,
            created_ms=now_ms,
            cost_ms=cost,
            soft_expiry_ms=now_ms + fresh_ttl,
            generation=gen,
            tags=tags,
        )
        self._tier.detach(key)
        ticket = self._tier.ticket([key])
        try:
            result = await self._store.set(
                key,
                tail,
                px,
                if_version,
                lease_token=b"" if lease_token is None else lease_token.raw,
                key_class=kc.name,
                lease_generation=gen,
                tags=tags,
                expires_at_ms=now_ms + px,
                event=self.event([key]) if kc.events else b"",
                max_events=self._events.stream_max_len,
            )
        finally:
            fillable = self._tier.settle(ticket)[0]
            # Reads that started while the write was in flight may carry either value.
            self._tier.detach(key)
            if lease_token is not None:
                self._leases.table.wake(key)
        self._gens.update({kc.name: result.generation})
        counters = self._stats.for_class(kc.name)
        if result.lease_invalid:
            counters.lease_fills_refused += 1
            return WriteOutcome(False, 0, fresh_ttl, kc.name, lease_invalid=True)
        if not result.stored:
            return WriteOutcome(False, result.version, fresh_ttl, kc.name)
        counters.sets += 1
        if result.event_id:
            self._stats.invalidations_published += 1
        if lease_token is not None:
            counters.lease_fills += 1
        if fillable:
            env = envelope.Envelope(
                result.version,
                now_ms,
                cost,
                now_ms + fresh_ttl,
                result.generation,
                tuple(tags),
                value,
            )
            self._tier.fill(key, kc, env, fresh_ttl, ticket.sent_at)
        return WriteOutcome(True, result.version, fresh_ttl, kc.name)

    async def delete(self, keys: Sequence[str]) -> tuple[int, str]:
        """Remove `keys` (values and leases) and publish one event, in one script;
        returns (how many existed, the event id)."""
        for key in keys:
            self._tier.detach(key)
            self._stats.for_class(self._policy.classify(key).name).deletes += 1
        try:
            deleted, event_id = await self._store.delete(
                keys, event=self.event(keys), max_events=self._events.stream_max_len
            )
        finally:
            for key in keys:
                self._tier.detach(key)
                self._leases.table.wake(key)
        self._stats.invalidations_published += 1
        return deleted, event_id
