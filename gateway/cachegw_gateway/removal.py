"""Delete through the origin: a Delete (or DeleteMany) of keys of write-through classes
removes them from their origin first (one `Remove` per origin), then from the cache (one
Delete script: values, leases, counters, limiters, and its event), as write-through Set
stores in the origin first (writethrough.py), by the same rules:

- The origin answers first. A failure that says nothing was removed (the origin's own
  UNAVAILABLE, a call that never left: breaker open, no slot, no connection) changes
  nothing in the cache and answers the failure's status.
- A failure that leaves the origin's state unknown (no answer in time, a connection lost
  mid-call, an answer the gateway cannot read) drops the keys' cached entries, so the
  next read loads whatever the origin holds, and answers the failure's status.
- Removed: the cache's entries go, with their leases (so a Load that read the old value
  before the removal cannot fill it), and every gateway's L1 copy with the event. Where
  the class caches NOT_FOUND (negative_ttl_seconds), a tombstone carrying the removal's
  version is stored in their place, so that a Load that read the old value (an older
  version) cannot bring it back, and reads are answered NOT_FOUND without a Load.
- If Redis fails after the origin removed, the caller gets UNAVAILABLE saying so: the
  origin no longer has the keys, the cache may serve them until their TTL ends.

Keys of other classes in the same call are deleted from the cache alone, in the same
Delete script, once every origin removed its keys. When an origin fails, the call fails
and the cache keeps every key but those whose state that origin left unknown.

The count a Delete answers, and DeleteMany's per-key flags, are the origin's `removed`
for keys of write-through classes (whether the data existed), and whether a value was
cached for the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from cachegw_gateway import envelope
from cachegw_gateway.l2 import L2Unavailable
from cachegw_gateway.origin import OriginError, Origins, Removed
from cachegw_gateway.policy import PolicyTable
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.writes import SetItem, WritePath
from cachegw_gateway.writethrough import CacheNotUpdated

log = logging.getLogger(__name__)


class RemoveThrough:
    def __init__(
        self, writes: WritePath, origins: Origins, policy: PolicyTable, stats: GatewayStats
    ) -> None:
        self._writes = writes
        self._origins = origins
        self._policy = policy
        self._stats = stats

    def applies(self, keys: Sequence[str]) -> bool:
        """Some of `keys` belong to a write-through class."""
        return any(self._policy.classify(k).write_through for k in keys)

    async def delete_each(self, keys: Sequence[str]) -> tuple[list[bool], str]:
        """Remove `keys` (write-through ones from their origin first); per key whether it
        existed (see the module's docstring), and the cache's event id."""
        groups: dict[str, list[str]] = {}
        for key in dict.fromkeys(keys):
            kc = self._policy.classify(key)
            if kc.write_through:
                groups.setdefault(kc.origin, []).append(key)
        answers = await asyncio.gather(
            *(self._remove(origin, group) for origin, group in groups.items())
        )
        removed: dict[str, Removed] = {}
        failures: list[OriginError] = []
        unknown: list[str] = []
        for group, answer in zip(groups.values(), answers, strict=True):
            if isinstance(answer, OriginError):
                failures.append(answer)
                if answer.sent:
                    unknown += group
            else:
                removed.update((r.key, r) for r in answer)
        if failures:
            await self._fail(failures[0], list(removed), unknown)
        try:
            each, event_id = await self._writes.delete_each(keys)
        except L2Unavailable as exc:
            if not removed:
                raise
            raise CacheNotUpdated(
                f"the origin removed {_shown(list(removed))} but redis did not delete them "
                f"from the cache: {exc}; readers may see the cached values until their TTL "
                "ends"
            ) from None
        await self._tombstones(removed)
        flags = [removed[k].removed if k in removed else e for k, e in zip(keys, each, strict=True)]
        return flags, event_id

    async def _remove(self, origin: str, keys: list[str]) -> list[Removed] | OriginError:
        try:
            answer = await self._origins.client(origin).remove(keys, None)
        except OriginError as exc:
            for name in {self._policy.classify(k).name for k in keys}:
                self._stats.for_class(name).origin_errors += 1
            return exc
        return answer

    async def _fail(self, failure: OriginError, removed: list[str], unknown: list[str]) -> None:
        """An origin failed: drop what another origin removed and what this one may have
        removed, keep the rest, and answer the failure."""
        dropped = True
        if removed or unknown:
            try:
                await self._writes.delete_each([*removed, *unknown])
            except L2Unavailable:
                dropped = False
        if not failure.sent:
            what = "the origin did not remove them and nothing changed in the cache"
        elif dropped:
            what = (
                "the origin may or may not have removed them, so their cached entries were "
                "dropped (the next read loads the origin's state)"
            )
        else:
            what = (
                "the origin may or may not have removed them; the gateway tried to drop their "
                "cached entries and Redis failed: readers may see them until their TTL ends"
            )
        also = (
            f"; other origins removed {_shown(removed)}, and their cached entries were dropped"
            if removed and dropped
            else ""
        )
        raise type(failure)(f"removing keys: {failure}; {what}{also}", sent=failure.sent)

    async def _tombstones(self, removed: dict[str, Removed]) -> None:
        """Tombstones with the removals' versions where the class caches NOT_FOUND. Best
        effort: the values and leases are gone already; without a tombstone a read loads
        NOT_FOUND from the origin."""
        items = []
        for key, r in removed.items():
            kc = self._policy.classify(key)
            if kc.negative_ttl_ms:
                items.append(
                    SetItem(
                        key,
                        b"",
                        kc,
                        ttl_ms=kc.negative_ttl_ms,
                        origin_version=r.version,
                        flags=envelope.NOT_FOUND,
                    )
                )
        if not items:
            return
        try:
            results = await self._writes.set_many(items)
        except L2Unavailable as exc:
            results = [exc]
        for result in results:
            if isinstance(result, L2Unavailable):
                log.warning("tombstones of removed keys not stored (reads will load): %s", result)
                break


def _shown(keys: Sequence[str]) -> str:
    head = ", ".join(repr(k) for k in keys[:3])
    return head + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
