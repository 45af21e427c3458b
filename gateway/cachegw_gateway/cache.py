"""The cache as the servicer and the server see it: one narrow face over the jobs that
each live in a module of their own.

    l1tier.py        L1, and the rules for what may enter it (fill tickets, epochs)
    reads.py         the read path after an L1 miss (coalesced Redis reads)
    leases.py        the lease protocol (grant, wait, refresh, release)
    writes.py        Set and Delete
    counters.py      Incr, Touch and Ttl (counters never enter L1)
    ratelimit.py     Allow: GCRA and sliding-window limits, one script per decision
    invalidation.py  Invalidate, the events of other gateways, the subscription's health
    warmup.py        Warmup and the recorded hot keys
    freshness.py     judging a stored entry, and the answers built from it
    l2.py            every Redis command
    readthrough.py   misses of read-through classes, loaded from their origin
    writethrough.py  Sets of write-through classes, stored in their origin first
    removal.py       Deletes of write-through classes, removed from their origin first
    rebuild.py       Warmup from the origins (keys, prefixes, the hot set), rate-limited
    writebehind.py   Sets and Deletes of write-behind classes, journaled (journal.py)
                     and flushed to their origin later (flusher.py, run by the server)
    origin.py        every origin call

A Get's key crosses each once: servicer → L1Tier.answer → ReadPath.fetch → (Leases) →
RedisStore. Writes run shielded from the caller's cancellation: once a write was sent
to Redis, its bookkeeping and its event are not cut off by a deadline that fires in
between (the caller still gets DEADLINE_EXCEEDED at its deadline).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.config import InvalidationConfig
from cachegw_gateway.counters import Counters, Incremented, KeyTtl, Touched
from cachegw_gateway.events import StreamId
from cachegw_gateway.failsafe import FailSafe
from cachegw_gateway.freshness import Generations
from cachegw_gateway.invalidation import Invalidation
from cachegw_gateway.journal import Journal
from cachegw_gateway.l1tier import L1Tier
from cachegw_gateway.l2 import L2Entry, L2Unavailable, RedisStore
from cachegw_gateway.lastknown import LastKnown
from cachegw_gateway.leases import Leases, LeaseTable, LeaseToken
from cachegw_gateway.origin import OriginError, Origins
from cachegw_gateway.policy import KeyClass, PolicyTable
from cachegw_gateway.ratelimit import Decision, RateLimit, RateLimiter
from cachegw_gateway.reads import ReadPath
from cachegw_gateway.readthrough import ReadThrough
from cachegw_gateway.rebuild import Rebuild
from cachegw_gateway.refreshahead import RefreshAhead
from cachegw_gateway.removal import RemoveThrough
from cachegw_gateway.warmup import Warmup, hot_set
from cachegw_gateway.writebehind import WriteBehind
from cachegw_gateway.writes import SetItem, WriteOutcome, WritePath
from cachegw_gateway.writethrough import WriteThrough
from cachegw_native.coalescer import Coalescer
from cachegw_native.hotkeys import HotKeys
from cachegw_native.l1 import L1Cache

__all__ = ["Cache", "SetItem", "WriteOutcome"]

T = TypeVar("T")


class Cache:
    def __init__(
        self,
        store: RedisStore,
        l1: L1Cache,
        policy: PolicyTable,
        hotkeys: HotKeys,
        *,
        origin: str = "",
        invalidation: InvalidationConfig | None = None,
        last_known: LastKnown | None = None,
        origins: Origins | None = None,
        journal: Journal | None = None,
        max_ttl_ms: int = 30 * 86_400_000,
        max_key_bytes: int = 512,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        rand: Callable[[], float] = random.random,
    ) -> None:
        stats = self.stats = store.stats
        config = invalidation or InvalidationConfig()
        gens = Generations()
        for kc in policy.classes:  # every class shows in Stats from the start
            stats.for_class(kc.name)
        self._tier = L1Tier(l1, stats, hotkeys=hotkeys, last_known=last_known, clock=clock)
        reads: ReadPath
        self._leases = Leases(
            store,
            stats,
            gens,
            lambda key: reads.read_one(key),
            clock=clock,
            wall_clock_ms=wall_clock_ms,
        )
        reads = ReadPath(
            store,
            self._tier,
            policy,
            stats,
            gens,
            self._leases,
            hotkeys=hotkeys,
            clock=clock,
            rand=rand,
        )
        self._reads = reads
        self._writes = WritePath(
            store,
            self._tier,
            policy,
            stats,
            gens,
            self._leases,
            origin=origin,
            invalidation=config,
            wall_clock_ms=wall_clock_ms,
        )
        self._origins = origins
        self._write_through: WriteThrough | None = None
        self._remove_through: RemoveThrough | None = None
        rebuild: Rebuild | None = None
        # The refresh-ahead worker, when a read-through class asks for it (the server
        # runs it: refreshahead.py).
        self.refresh_ahead: RefreshAhead | None = None
        if origins:
            reads.through = ReadThrough(
                self._leases,
                self._writes,
                origins,
                stats,
                max_ttl_ms=max_ttl_ms,
                max_key_bytes=max_key_bytes,
                shield=self._shielded,
                clock=clock,
                wall_clock_ms=wall_clock_ms,
            )
            self._write_through = WriteThrough(self._writes, origins, stats)
            self._remove_through = RemoveThrough(self._writes, origins, policy, stats)
            rebuild = Rebuild(
                store,
                reads,
                self._writes,
                self._leases,
                origins,
                policy,
                stats,
                hot_keys=lambda: hot_set(store, hotkeys),
                max_ttl_ms=max_ttl_ms,
                max_key_bytes=max_key_bytes,
                clock=clock,
            )
            if any(kc.fail_safe_ms for kc in policy.classes):
                reads.fail_safe = FailSafe(reads.through, stats, gens, clock=clock)
            refresher = RefreshAhead(store, policy, self._leases, reads.through, hotkeys, stats)
            self.refresh_ahead = refresher if refresher else None
        self._write_behind: WriteBehind | None = None
        if journal is not None and any(kc.write_behind for kc in policy.classes):
            self._write_behind = WriteBehind(self._writes, journal, policy, stats)
        self._policy = policy
        self._invalidation = Invalidation(
            store, self._tier, policy, stats, gens, self._leases, origin=origin, invalidation=config
        )
        self._warmup = Warmup(
            store,
            reads,
            self._writes,
            hotkeys,
            rebuild=rebuild,
            write_through=self._write_through,
        )
        self._limiter = RateLimiter(store)
        self._counters = Counters(store, wall_clock_ms=wall_clock_ms)
        self._in_flight: set[asyncio.Task[Any]] = set()
        # The hot path, bound once: an L1 hit is one call into the tier.
        self.l1_answer = self._tier.answer
        self.fetch = reads.fetch
        self.l1_many = self._tier.answer_many
        self.complete_many = reads.complete_many
        # The bus's callbacks.
        self.on_event = self._invalidation.apply_event
        self.subscription_lost = self._invalidation.subscription_lost
        self.subscription_live = self._invalidation.subscription_live
        self.warm_from_hot_keys = self._warmup.warm_from_hot_keys
        self.record_hot_keys = self._warmup.record_hot_keys
        self.record_hot_keys_forever = self._warmup.record_hot_keys_forever

    @property
    def fills_allowed(self) -> bool:
        """L1 may be filled: the invalidation subscription is live."""
        return self._tier.fills_allowed

    @property
    def reads(self) -> Coalescer[L2Entry | None]:
        """Redis reads in flight (telemetry counts coalescing from it)."""
        return self._tier.reads

    @property
    def leases(self) -> LeaseTable:
        return self._leases.table

    def on_fill(self, key: str) -> None:
        """A value landed where a lease was held (any gateway): wake our waiters."""
        self._leases.table.wake(key)

    # -- writes: shielded from the caller's cancellation -----------------------------------

    async def _shielded(self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.get_running_loop().create_task(work)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(task)

    async def drain(self, within: float = 5.0) -> None:
        """Let the writes and loads in flight finish (at stop, before Redis and the
        origins are closed)."""
        pending = self._in_flight | self._leases.cleanups
        if pending:
            await asyncio.wait(pending, timeout=within)
        if self._origins is not None:
            await self._origins.close()

    def set(self, item: SetItem) -> Awaitable[WriteOutcome]:
        if item.kc.write_through and self._write_through is not None:
            return self._shielded(self._write_through.set(item))
        if item.kc.write_behind and self._write_behind is not None:
            return self._shielded(self._write_behind.set(item))
        return self._shielded(self._writes.set(item))

    def set_many(
        self, items: Sequence[SetItem]
    ) -> Awaitable[list[WriteOutcome | L2Unavailable | OriginError]]:
        """Per item its outcome or failure; write-through items go through their origin
        (one Store per origin), the others in one Redis pipeline."""
        return self._shielded(self._set_many(items))

    async def _set_many(
        self, items: Sequence[SetItem]
    ) -> list[WriteOutcome | L2Unavailable | OriginError]:
        through = self._write_through
        at = [i for i, item in enumerate(items) if item.kc.write_through]
        if not at or through is None:
            return list(await self._writes.set_many(items))
        out: list[WriteOutcome | L2Unavailable | OriginError | None] = [None] * len(items)
        plain = [i for i, item in enumerate(items) if not item.kc.write_through]
        if plain:
            done = await self._writes.set_many([items[i] for i in plain])
            for i, one in zip(plain, done, strict=True):
                out[i] = one
        for i, result in zip(at, await through.set_many([items[i] for i in at]), strict=True):
            out[i] = result
        return [o for o in out if o is not None]

    def delete_each(self, keys: Sequence[str]) -> Awaitable[tuple[list[bool], str]]:
        """Per key whether it existed, and the event id; keys of write-through classes are
        removed from their origin first (removal.py), keys of write-behind classes
        journaled as Removes (writebehind.py)."""
        return self._shielded(self._delete_each(keys))

    async def _delete_each(self, keys: Sequence[str]) -> tuple[list[bool], str]:
        wb = self._write_behind
        behind = (
            []
            if wb is None
            else [i for i, k in enumerate(keys) if self._policy.classify(k).write_behind]
        )
        if wb is not None and len(behind) == len(keys):
            return await wb.delete_each(keys)
        skip = set(behind)
        rest = [i for i in range(len(keys)) if i not in skip]
        rest_keys = [keys[i] for i in rest]
        removal = self._remove_through
        if removal is not None and removal.applies(rest_keys):
            each, event_id = await removal.delete_each(rest_keys)
        else:
            each, event_id = await self._writes.delete_each(rest_keys)
        if not behind or wb is None:
            return each, event_id
        out = [False] * len(keys)
        for i, existed in zip(rest, each, strict=True):
            out[i] = existed
        done, _ = await wb.delete_each([keys[i] for i in behind])
        for i, existed in zip(behind, done, strict=True):
            out[i] = existed
        return out, event_id

    async def delete(self, keys: Sequence[str]) -> int:
        each, _ = await self.delete_each(keys)
        return sum(each)

    def incr(
        self, key: str, delta: int, kc: KeyClass, ttl_ms: int | None
    ) -> Awaitable[Incremented]:
        """Add `delta` to K's counter (never L1); see counters.py."""
        return self._shielded(self._counters.incr(key, delta, kc, ttl_ms))

    def touch(self, key: str, kc: KeyClass, ttl_ms: int | None) -> Awaitable[Touched]:
        """A new TTL for K's value and counter; L1 copies keep their shorter deadlines."""
        return self._shielded(self._counters.touch(key, kc, ttl_ms))

    def ttl(self, key: str, kc: KeyClass) -> Awaitable[KeyTtl]:
        """K's fresh time left and version in Redis, without reading the value."""
        return self._counters.ttl(key, kc)

    def release(self, key: str, token: LeaseToken) -> Awaitable[bool]:
        return self._shielded(self._leases.release(key, token))

    def invalidate(
        self,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        tags: Sequence[str] = (),
        classes: Sequence[str] = (),
    ) -> Awaitable[tuple[int, str]]:
        return self._shielded(self._invalidation.invalidate(keys, prefixes, tags, classes))

    def allow(self, key: str, limit: RateLimit, cost: int) -> Awaitable[Decision]:
        """Is a request of `cost` on `key` allowed under `limit`? See ratelimit.py."""
        return self._shielded(self._limiter.allow(key, limit, cost))

    def warmup(
        self,
        keys: Sequence[str],
        entries: Sequence[tuple[pb.WarmupEntry, KeyClass]],
        *,
        hot_keys: bool,
        prefixes: Sequence[str] = (),
        resume: str = "",
        time_remaining: float | None = None,
    ) -> Awaitable[pb.WarmupResponse]:
        return self._shielded(
            self._warmup.warmup(
                keys,
                entries,
                hot_keys=hot_keys,
                prefixes=prefixes,
                resume=resume,
                time_remaining=time_remaining,
            )
        )

    def events_after(self, since: StreamId) -> AsyncIterator[pb.InvalidationEvent]:
        """Subscribe's replay: the events after `since`, or one RESET."""
        return self._invalidation.replay(since)
