"""Write-behind: a Set of a write-behind class is acknowledged once it is in the journal
(journal.py, a Redis Stream) and in the cache; the flusher (flusher.py) stores it in the
class's origin later, in batches.

**One Redis (standalone, Sentinel): one script.** The journal append and the Set script
run as one script (journal.py's `append_and_set`): a write is journaled exactly when it is
cached, whatever happens to the caller, the connection or the gateway. A lost reply
leaves both written or neither (the caller is told it may or may not have been applied).

**Redis Cluster: journal first, then cache.** The two live in different slots (the value
in its key's, the journal in its shard's), so they are two calls. What a fault between
them leaves:

- The journal append fails, and said so (an error reply, a refused connection, the
  breaker): nothing was written anywhere; the caller gets UNAVAILABLE.
- The append's reply was lost (a timeout, a dropped connection): it may have been
  journaled, and then it reaches the origin; the cache was not touched. The caller gets
  UNAVAILABLE saying so; readers see the previous value until it expires.
- The append landed and the cache write failed: the write is journaled and will reach the
  origin; the caller gets UNAVAILABLE saying so (`JournaledNotCached`); readers may see
  the previous cached value until its TTL ends or the next write.
- The caller leaves (deadline, cancellation) between the two: the sequence runs
  shielded from the caller (cache.py), so both are written; the caller gets
  DEADLINE_EXCEEDED or CANCELLED, and the write stands.
- The gateway dies between the two: as the failed cache write.
The other order (cache first) would leave, after a fault, a value readers see that no
journal entry will ever bring to the origin: lost once it expires.

The value is cached with its write version (the Set script's origin version): a write
that another one overtook (two gateways, one key) leaves the newer one cached, exactly
as the origin, which orders by the same versions, will.

A Delete of write-behind keys journals a Remove for each, then caches a tombstone with
the removal's version for the class's TTL: readers see NOT_FOUND at once, and a
read-through miss cannot load the old value back from an origin the Remove has not
reached yet.

Conditional Sets (if_version, condition) and lease fills are refused for write-behind
classes (servicer.py): the journal entry is appended before the cache decides the
condition, so a refused condition would still reach the origin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grpc

from cachegw.v1 import origin_pb2 as opb
from cachegw_gateway import envelope
from cachegw_gateway.journal import REMOVE, STORE, Journal
from cachegw_gateway.l2 import L2Unavailable, SetCall, SetResult
from cachegw_gateway.origin import OriginError
from cachegw_gateway.policy import KeyClass, PolicyTable
from cachegw_gateway.redis_errors import CONNECTION, PROTOCOL, TIMEOUT, L2OutcomeUnknown
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.writes import SetItem, WriteOutcome, WritePath


class JournaledNotCached(OriginError):
    """The write is journaled (it will reach the origin), the cache did not take it."""

    code = grpc.StatusCode.UNAVAILABLE


class NotJournaled(OriginError):
    """The journal did not take the write (or its reply was lost)."""

    code = grpc.StatusCode.UNAVAILABLE


def _maybe_applied(err: L2Unavailable) -> bool:
    return isinstance(err, L2OutcomeUnknown) or err.kind in (TIMEOUT, CONNECTION, PROTOCOL)


def _not_journaled(key: str, err: L2Unavailable, *, with_cache: bool = False) -> NotJournaled:
    if _maybe_applied(err) and with_cache:
        said = (
            "its reply was lost, so it may have been journaled and cached (it then reaches "
            "the origin) or neither"
        )
    elif _maybe_applied(err):
        said = (
            "its reply was lost, so it may have been journaled (it then reaches the origin) "
            "or not; the cache was not changed"
        )
    else:
        said = "nothing was journaled and nothing changed in the cache"
    return NotJournaled(f"journaling the write-behind write of {key!r} failed: {err}; {said}")


class WriteBehind:
    def __init__(
        self, writes: WritePath, journal: Journal, policy: PolicyTable, stats: GatewayStats
    ) -> None:
        self._writes = writes
        self._journal = journal
        self._policy = policy
        self._stats = stats

    async def set(self, item: SetItem) -> WriteOutcome:
        kc = item.kc
        entry = opb.StoreEntry(key=item.key, value=item.value, tags=item.tags)
        if item.ttl_ms is not None:
            entry.ttl_ms = item.ttl_ms
        if self._journal.one_step:
            return await self._set_one_step(item, entry)
        try:
            version = await self._journal.append(kc.name, STORE, entry)
        except L2Unavailable as exc:
            raise _not_journaled(item.key, exc) from None
        self._stats.for_class(kc.name).wb_journaled += 1
        cached = dataclasses.replace(item, if_version=None, origin_version=version)
        try:
            out = await self._writes.set(cached)
        except L2Unavailable as exc:
            raise JournaledNotCached(
                f"the write-behind write of {item.key!r} is journaled (version {version}; it "
                f"will reach origin {kc.origin}) but redis did not cache it: {exc}; readers "
                "may see the previous cached value until its TTL ends or the next write"
            ) from None
        if out.superseded:
            # A newer write of the key is cached (and journaled) already: ours stands in
            # the journal, older, and the origin will keep the newer one too.
            return WriteOutcome(True, version, out.ttl_ms, kc.name)
        return out

    async def _set_one_step(self, item: SetItem, entry: opb.StoreEntry) -> WriteOutcome:
        """One Redis: the journal entry and the value in one script, so that neither is
        ever written without the other."""
        kc = item.kc
        versions: list[int] = []

        async def journal_and_set(call: SetCall) -> SetResult:
            result, version = await self._journal.append_and_set(kc.name, entry, call)
            versions.append(version)
            return result

        # The origin version is the script's to give (the write version): 0 stands in.
        cached = dataclasses.replace(item, if_version=None, origin_version=0)
        try:
            out = await self._writes.set(cached, via=journal_and_set)
        except L2Unavailable as exc:
            raise _not_journaled(item.key, exc, with_cache=True) from None
        self._stats.for_class(kc.name).wb_journaled += 1
        if out.superseded:
            return WriteOutcome(True, versions[0], out.ttl_ms, kc.name)
        return out

    async def delete_each(self, keys: Sequence[str]) -> tuple[list[bool], str]:
        """Delete `keys`: those of write-behind classes journaled as Removes and cached as
        tombstones, the others deleted as usual. Per key whether a value existed (a
        write-behind key: whether a live entry was replaced), and the event id of the
        plain delete ('' when every key is write-behind)."""
        classes = [self._policy.classify(k) for k in keys]
        behind = [i for i, kc in enumerate(classes) if kc.write_behind]
        plain = [i for i, kc in enumerate(classes) if not kc.write_behind]
        out = [False] * len(keys)
        event_id = ""
        if plain:
            each, event_id = await self._writes.delete_each([keys[i] for i in plain])
            for i, existed in zip(plain, each, strict=True):
                out[i] = existed
        by_class: dict[str, list[int]] = {}
        for i in behind:
            by_class.setdefault(classes[i].name, []).append(i)
        for at in by_class.values():
            kc = classes[at[0]]
            for i, existed in zip(at, await self._remove(kc, [keys[i] for i in at]), strict=True):
                out[i] = existed
        return out, event_id

    async def _remove(self, kc: KeyClass, keys: list[str]) -> list[bool]:
        versions = await self._journal.append_many(
            kc.name, REMOVE, [opb.StoreEntry(key=k) for k in keys]
        )
        failed = next((v for v in versions if isinstance(v, L2Unavailable)), None)
        journaled = [(k, v) for k, v in zip(keys, versions, strict=True) if isinstance(v, int)]
        self._stats.for_class(kc.name).wb_journaled += len(journaled)
        self._stats.for_class(kc.name).deletes += len(keys)
        tombstones = [
            SetItem(key, b"", kc, ttl_ms=kc.ttl_ms, origin_version=v, flags=envelope.NOT_FOUND)
            for key, v in journaled
        ]
        outcomes = await self._writes.set_many(tombstones) if tombstones else []
        if failed is not None:
            raise _not_journaled(keys[versions.index(failed)], failed)
        not_cached = next((o for o in outcomes if isinstance(o, L2Unavailable)), None)
        if not_cached is not None:
            raise JournaledNotCached(
                f"the write-behind removal of {len(keys)} keys is journaled (it will reach "
                f"origin {kc.origin}) but redis did not cache every tombstone: {not_cached}; "
                "readers may see the previous value until its TTL ends"
            )
        done = {key: o for (key, _), o in zip(journaled, outcomes, strict=True)}
        return [isinstance(o := done.get(k), WriteOutcome) and o.replaced for k in keys]
