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
"""

from __future__ import annotations

import dataclasses

from cachegw_gateway.l2 import L2Unavailable
from cachegw_gateway.origin import OriginError, OriginRefused, Origins
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

    async def _drop(self, key: str) -> bool:
        try:
            await self._writes.delete([key])
        except L2Unavailable:
            return False
        return True
