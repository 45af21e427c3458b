"""Write-through: a Set of a write-through class stores in the class's origin first, then
in the cache (and publishes), so the cache never holds what the origin does not.

- The origin's `Store` answers first. VERSION_CONFLICT (the caller's `if_version` is the
  origin's compare-and-set) and REFUSED change nothing anywhere; nor does a failure that
  says nothing was stored: the origin's own UNAVAILABLE (origin.proto), or a call that
  never left (the origin's breaker open, no free slot, no connection).
- A failure that leaves the origin's state unknown (no answer in time, a connection lost
  mid-call, an answer the gateway cannot read) makes the gateway drop the key's cached
  entry (value, lease, an event to every gateway), so that the next read
  loads whatever the origin holds rather than keep serving a value it may have replaced.
- STORED: the value goes to Redis with the origin's version (the Set script, writes.py).
  A cached entry of a newer origin version, written by a concurrent writer or loader that
  the origin ordered after this one, stays: the cache never goes back to an older state
  of the origin. The caller is answered STORED with the origin's version either way.
- If Redis fails after the origin stored, the caller gets UNAVAILABLE saying so: the
  origin has the value, and the cache may serve the previous one until its TTL ends or
  the next write.

The whole sequence runs shielded from the caller (cache.py): a caller that leaves does
not cut it between the origin and the cache.

A batch (SetMany, Warmup entries: `set_many`) is one Store per origin for all its
entries and one Redis pipeline for what was stored, and follows the same rules entry by
entry: each entry is stored in the origin and the cache, or changes nothing (its cached
entry dropped when the origin's state is unknown), and has its own answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

from cachegw_gateway.l2 import L2Unavailable
from cachegw_gateway.origin import OriginError, OriginRefused, Origins, StoreAnswer, StoreEntry
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.writes import SetItem, WriteOutcome, WritePath


class CacheNotUpdated(OriginError):
    """The origin stored the value, Redis did not take it (UNAVAILABLE)."""


class WriteThrough:
    def __init__(self, writes: WritePath, origins: Origins, stats: GatewayStats) -> None:
        self._writes = writes
        self._origins = origins
        self._stats = stats

    async def set(self, item: SetItem) -> WriteOutcome:
        kc = item.kc
        counters = self._stats.for_class(kc.name)
        client = self._origins.client(kc.origin)
        try:
            answer = await client.store(
                item.key,
                item.value,
                ttl_ms=item.ttl_ms,
                tags=item.tags,
                if_version=item.if_version,
                deadline=None,
            )
        except OriginError as exc:
            counters.origin_errors += 1
            if not exc.sent:
                raise type(exc)(
                    f"storing {item.key!r}: {exc}; the origin did not store it and nothing "
                    "changed in the cache",
                    sent=False,
                ) from None
            dropped = await self._drop(item.key)
            raise type(exc)(
                f"storing {item.key!r}: {exc}; the origin may or may not have stored it, so "
                + (
                    "the cached entry was dropped (the next read loads the origin's state)"
                    if dropped
                    else "the gateway tried to drop the cached entry and Redis failed: "
                    "readers may see the previous value until its TTL ends"
                )
            ) from None
        if answer.outcome == "conflict":
            return WriteOutcome(False, answer.version, 0, kc.name)
        if answer.outcome == "refused":
            raise OriginRefused(
                f"origin {kc.origin} refused the value of {item.key!r}: {answer.message}; "
                "nothing was stored, nothing changed in the cache",
                sent=False,
            )
        counters.origin_stores += 1
        cached = dataclasses.replace(
            item,
            if_version=None,
            # Unversioned (0): the gateway numbers it (the stored version + 1).
            origin_version=answer.version or None,
        )
        try:
            out = await self._writes.set(cached)
        except L2Unavailable as exc:
            raise CacheNotUpdated(
                f"origin {kc.origin} stored {item.key!r} (version {answer.version}) but "
                f"redis did not take it: {exc}; readers may see the previous cached value "
                "until its TTL ends or the next write"
            ) from None
        if out.superseded:
            # A newer state of the origin is cached already: ours is stored, and older.
            return WriteOutcome(True, answer.version, out.ttl_ms, kc.name)
        return out

    async def set_many(self, items: Sequence[SetItem]) -> list[WriteOutcome | OriginError]:
        """Write-through `items`: one Store per origin, then one Redis pipeline for what
        the origins stored; per item its outcome, or the OriginError that item gets."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.kc.origin, []).append(i)
        out: list[WriteOutcome | OriginError | None] = [None] * len(items)
        answered = await asyncio.gather(
            *(self._store_group([items[i] for i in at]) for at in groups.values())
        )
        cached: list[tuple[int, SetItem, StoreAnswer]] = []
        for at, answers in zip(groups.values(), answered, strict=True):
            for i, answer in zip(at, answers, strict=True):
                item = items[i]
                if isinstance(answer, OriginError):
                    out[i] = answer
                elif answer.outcome == "conflict":
                    out[i] = WriteOutcome(False, answer.version, 0, item.kc.name)
                elif answer.outcome == "refused":
                    out[i] = OriginRefused(
                        f"origin {item.kc.origin} refused the value of {item.key!r}: "
                        f"{answer.message}; nothing was stored, nothing changed in the cache",
                        sent=False,
                    )
                else:
                    self._stats.for_class(item.kc.name).origin_stores += 1
                    cached.append((i, item, answer))
        if cached:
            writes = [
                dataclasses.replace(item, if_version=None, origin_version=answer.version or None)
                for _, item, answer in cached
            ]
            done: list[WriteOutcome | L2Unavailable]
            try:
                done = await self._writes.set_many(writes)
            except L2Unavailable as exc:
                done = [exc] * len(writes)
            for (i, item, answer), result in zip(cached, done, strict=True):
                if isinstance(result, L2Unavailable):
                    out[i] = CacheNotUpdated(
                        f"origin {item.kc.origin} stored {item.key!r} (version "
                        f"{answer.version}) but redis did not take it: {result}; readers may "
                        "see the previous cached value until its TTL ends or the next write"
                    )
                elif result.superseded:
                    out[i] = WriteOutcome(True, answer.version, result.ttl_ms, item.kc.name)
                else:
                    out[i] = result
        return [o for o in out if o is not None]

    async def _store_group(self, items: Sequence[SetItem]) -> list[StoreAnswer | OriginError]:
        """One Store call for `items` (one origin): per item the origin's answer, or the
        failure each of them gets (the cached entries dropped when it may have stored)."""
        client = self._origins.client(items[0].kc.origin)
        entries = [
            StoreEntry(item.key, item.value, item.ttl_ms, item.tags, item.if_version)
            for item in items
        ]
        try:
            return list(await client.store_many(entries, None))
        except OriginError as exc:
            for name in {item.kc.name for item in items}:
                self._stats.for_class(name).origin_errors += 1
            if not exc.sent:
                what = "the origin did not store it and nothing changed in the cache"
            elif await self._drop_many([item.key for item in items]):
                what = (
                    "the origin may or may not have stored it, so the cached entry was "
                    "dropped (the next read loads the origin's state)"
                )
            else:
                what = (
                    "the origin may or may not have stored it; the gateway tried to drop "
                    "the cached entry and Redis failed: readers may see the previous value "
                    "until its TTL ends"
                )
            return [
                type(exc)(f"storing {item.key!r} (one of {len(items)}): {exc}; {what}", sent=False)
                for item in items
            ]

    async def _drop_many(self, keys: Sequence[str]) -> bool:
        try:
            await self._writes.delete(list(dict.fromkeys(keys)))
        except L2Unavailable:
            return False
        return True

    async def _drop(self, key: str) -> bool:
        try:
            await self._writes.delete([key])
        except L2Unavailable:
            return False
        return True
