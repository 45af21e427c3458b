"""`cachegw relay`'s work: carry invalidation events from one region to another.

A region is one deployment: its Redis (URL), its key prefix and a name. A `Link` tails
the source region's audit stream (``<p>:events``, XREAD BLOCK from the last id) and
applies each event in the destination the way an Invalidate there would (RedisStore's
own delete / prefix / tag / generation calls), then publishes a copy on the
destination's stream and channel, so that its gateways drop their L1 copies and its
Subscribe streams see the event. One relay process runs a `Link` each way.

No loops: the copy carries ``relayed_from`` (the source region) and ``relayed_id`` (the
id in the source stream); a link only carries events born in its source region, so a
copy is never carried back, nor on to a third region (a mesh needs a link per pair).

Checkpoint: ``<dest p>:relay:<source name>`` in the destination Redis holds
"<last source id> <source entries-added at that id>", written after a batch was applied:
a crash in between applies the batch again (invalidations are idempotent), never skips.
The checkpoint is also the link's proof that the destination still holds what it
applied: each write expects the one before it, and a quiet round reads it back. A
destination that lost writes (a Sentinel failover to a replica the last writes had not
reached: the copies applied and the checkpoint written after them are gone together)
shows an older checkpoint; the link carries on from that one, applying again what the
destination lost.

Lost events: if the source stream no longer holds every event after the checkpoint
(trimmed past it, or the stream was lost or replaced: a Redis restart without
persistence, a failover that lost writes), the link cannot know what it missed: it drops
every cached value in the destination and publishes RESET there (gateways flush L1,
Subscribe streams get RESET), then carries on from the source stream's current end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import redis_errors
from cachegw_gateway.events import StreamId, format_id, parse_id
from cachegw_gateway.l2 import RedisStore, glob_escape
from cachegw_gateway.scripts import Script

log = logging.getLogger("cachegw.relay")

BATCH = 500  # source events read per round trip
CONCURRENCY = 32  # copies of one batch applied at once (each its own Redis call)
FLUSH_SCAN = 1000  # keys per SCAN step of the fallback
ZERO: StreamId = (0, 0)

# KEYS[1] the checkpoint; ARGV[1] the one this link wrote last, ARGV[2] the new one.
# Written (1) only over the one written last; otherwise the stored one, or 0 if gone.
_CHECKPOINT_SCRIPT = """
local now = redis.call('GET', KEYS[1])
if now == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
if not now then
  return 0
end
return now
"""


class RelayError(Exception):
    """A region the relay cannot work with."""


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    url: str
    prefix: str = "cg"


@dataclass(slots=True)
class LinkStats:
    """One direction's figures (read by the log line and /metrics)."""

    applied: int = 0  # events applied in the destination
    skipped: int = 0  # events that were themselves relayed copies (never carried on)
    fallbacks: int = 0  # times the destination was flushed because events were lost
    rewinds: int = 0  # times the destination's checkpoint was not the one last written
    errors: int = 0  # failed rounds (Redis trouble on either side), retried
    behind: int = 0  # source events after the checkpoint, as last measured
    last_applied_id: str = ""
    last_applied_ms: int = 0  # source-stream time of the newest applied event
    last_delay_ms: int = 0  # from its publication in the source to its copy's
    up: bool = False  # the last round reached both Redis


@dataclass(frozen=True, slots=True)
class StreamState:
    """What XINFO STREAM says of the source stream (all zero when there is none)."""

    exists: bool
    last_id: StreamId
    max_deleted: StreamId
    entries_added: int
    length: int = 0
    first_id: StreamId | None = None  # None when it holds no entry


class Link:
    """Events of `source` applied in `dest`; see the module's docstring."""

    def __init__(
        self,
        source: Region,
        source_store: RedisStore,
        dest: Region,
        dest_store: RedisStore,
        *,
        stream_max_len: int = 100_000,
        block_ms: int = 1000,
    ) -> None:
        self.source = source
        self.dest = dest
        self._src = source_store
        self._dst = dest_store
        self._max_len = stream_max_len
        self._block_ms = block_ms
        self.origin = f"relay:{source.name}"
        self.checkpoint_key = f"{dest_store.prefix}:relay:{source.name}"
        self.stats = LinkStats()
        self.cursor: StreamId | None = None  # last source id applied (None: not loaded)
        self._position = 0  # the source's entries-added count at `cursor`
        self._saved = ""  # the checkpoint as this link last wrote (or read) it
        self._advance = Script(dest_store.client, _CHECKPOINT_SCRIPT)

    @property
    def name(self) -> str:
        return f"{self.source.name}->{self.dest.name}"

    # -- checkpoint -----------------------------------------------------------------------

    async def load_checkpoint(self) -> None:
        """Resume from the destination's checkpoint; without one, start at the source
        stream's current end (what happened before the link existed is not carried)."""
        for region, store in ((self.source, self._src), (self.dest, self._dst)):
            with store.reading:
                info = await store.client.info("server")
            version = str(info.get("redis_version", "0"))
            if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (7, 0):
                # Loss detection reads XINFO STREAM's entries-added and max-deleted-entry-id.
                raise RelayError(f"region {region.name}: Redis {version}; the relay needs 7.0+")
        await self._dst.load_scripts()  # so that each script's first call is one round trip
        with self._dst.reading:
            raw = await self._dst.client.get(self.checkpoint_key)
        if raw is not None:
            text = _text(raw)
            id_text = text.partition(" ")[0]
            if not await self._resume_from(text):
                return
            log.info(
                "relay %s: resuming after %s (checkpoint %s)",
                self.name,
                id_text,
                self.checkpoint_key,
                extra={"event": "relay_resume", "link": self.name, "after": id_text},
            )
            return
        state = await self.stream_state()
        self.cursor, self._position = state.last_id, state.entries_added
        await self._save_checkpoint()
        log.info(
            "relay %s: no checkpoint, starting at the end of %s's stream (%s)",
            self.name,
            self.source.name,
            format_id(state.last_id),
            extra={"event": "relay_start", "link": self.name, "after": format_id(state.last_id)},
        )

    async def _resume_from(self, text: str) -> bool:
        """Carry on after checkpoint `text`; an unreadable one takes the fallback (where
        it stopped is unknown: what it may have missed is unknown too). Returns whether
        `text` was read."""
        id_text, _, pos = text.partition(" ")
        try:
            self.cursor, self._position = parse_id(id_text), int(pos or 0)
        except ValueError:
            await self.fallback(f"unreadable checkpoint {text[:80]!r}")
            return False
        self._saved = text
        return True

    def _checkpoint_text(self) -> str:
        assert self.cursor is not None
        return f"{format_id(self.cursor)} {self._position}"

    async def _save_checkpoint(self) -> None:
        """Write the checkpoint whatever the destination holds (a start, a fallback)."""
        text = self._checkpoint_text()
        with self._dst.writing:
            await self._dst.client.set(self.checkpoint_key, text)
        self._saved = text

    async def _advance_checkpoint(self) -> None:
        """Write the checkpoint after a batch, if the destination still holds the one
        written before it; otherwise carry on from the one it holds (`_rewind`)."""
        text = self._checkpoint_text()
        with self._dst.writing:
            stored = await self._advance(keys=[self.checkpoint_key], args=[self._saved, text])
        if stored == 1:
            self._saved = text
        else:
            await self._rewind(None if stored == 0 else _text(stored))

    async def _verify_checkpoint(self) -> None:
        """A quiet round: the destination must still hold the checkpoint written last
        (a failover there may have lost it with the copies before it)."""
        with self._dst.reading:
            stored = await self._dst.client.get(self.checkpoint_key)
        if stored is None or _text(stored) != self._saved:
            await self._rewind(None if stored is None else _text(stored))

    async def _rewind(self, stored: str | None) -> None:
        """The destination holds another checkpoint than the one this link wrote last:
        it lost writes (an older one: the copies applied after it may be gone too), or
        another relay for the same pair wrote it. Carry on from it. (One equal to where
        the link is: a write whose reply was lost, or another relay just as far.) None:
        the checkpoint is gone, and what else the destination lost is unknown (all of
        it, after a restart without persistence; its last writes, after a failover to a
        replica that never had the checkpoint): the fallback."""
        if stored is None:
            await self.fallback(
                f"{self.dest.name}'s checkpoint {self.checkpoint_key} is gone (its Redis "
                "lost data: a restart without persistence, a failover, a flush)"
            )
            return
        if stored == self._checkpoint_text():
            self._saved = stored
            return
        was = self._saved
        log.warning(
            "relay %s: %s holds checkpoint %r, not %r as written last (it lost writes: a "
            "failover, a restore; or another relay links the same regions); carrying on "
            "from it, applying again what follows",
            self.name,
            self.dest.name,
            stored[:80],
            was,
            extra={"event": "relay_rewind", "link": self.name, "stored": stored[:80], "was": was},
        )
        self.stats.rewinds += 1
        await self._resume_from(stored)

    # -- the source stream ----------------------------------------------------------------

    async def stream_state(self) -> StreamState:
        with self._src.reading:
            try:
                info = await self._src.client.xinfo_stream(self._src.events_key)
            except redis_errors.FAILURES as exc:
                if redis_errors.no_such_key(exc):
                    return StreamState(False, ZERO, ZERO, 0)
                raise
        first = info.get("first-entry")
        return StreamState(
            True,
            parse_id(_text(info.get("last-generated-id") or "0-0")),
            parse_id(_text(info.get("max-deleted-entry-id") or "0-0")),
            int(info.get("entries-added") or 0),
            int(info.get("length") or 0),
            parse_id(_text(first[0])) if first else None,
        )

    async def _lost_after(self, cursor: StreamId) -> tuple[bool, StreamState]:
        """Whether events after `cursor` may be missing from the source stream.

        - no stream: lost unless nothing had ever been read (Redis lost it);
        - the stream is not the one `cursor` came from: its last id is before `cursor`,
          or it counts fewer entries ever added than the checkpoint did (it was lost and
          made again), or `cursor`'s own entry vanished while older ones are kept (a
          failover that lost writes);
        - an entry after `cursor` was deleted (XDEL: max-deleted-entry-id);
        - trimming passed `cursor` (the oldest kept entry is after it) and the entries
          after `cursor` now held are fewer than the entries added since (Redis 7's
          entries-added; the checkpoint keeps the count at `cursor`)."""
        state = await self.stream_state()
        if not state.exists:
            return cursor != ZERO, state
        if (
            state.last_id < cursor
            or state.entries_added < self._position
            or state.max_deleted > cursor
        ):
            return True, state
        if state.first_id is not None and state.first_id <= cursor:
            if cursor == ZERO or state.max_deleted >= cursor:
                return False, state
            with self._src.reading:
                here = await self._src.client.xrange(
                    self._src.events_key, min=format_id(cursor), max=format_id(cursor), count=1
                )
            return not here, state
        return state.entries_added - self._position > state.length, state

    async def _read(self, block_ms: int | None) -> list[tuple[str, bytes]]:
        assert self.cursor is not None
        with self._src.reading:
            reply: Any = await self._src.client.xread(
                {self._src.events_key: format_id(self.cursor)}, count=BATCH, block=block_ms
            )
        out: list[tuple[str, bytes]] = []
        # RESP2: [[stream, [(id, {field: value})...]]]; RESP3 would answer a dict.
        streams = reply.items() if isinstance(reply, dict) else (reply or ())
        for _stream, entries in streams:
            for entry_id, fields in entries:
                payload = (fields or {}).get(b"e", b"")
                out.append((_text(entry_id), payload if isinstance(payload, bytes) else b""))
        return out

    # -- one round ------------------------------------------------------------------------

    async def step(self, *, block: bool = True) -> int:
        """Read what follows the checkpoint (waiting up to block_ms for it when `block`),
        apply it in the destination, checkpoint. Returns the source events consumed."""
        if self.cursor is None:
            await self.load_checkpoint()
        assert self.cursor is not None
        batch = await self._read(self._block_ms if block else None)
        # Checked after the read: trimming only ever moves forward, so a stream that
        # still holds `cursor` now held every event between it and the batch.
        lost, state = await self._lost_after(self.cursor)
        if lost:
            await self.fallback(
                f"{self.source.name}'s stream no longer holds every event after "
                f"{format_id(self.cursor)}"
            )
            self.stats.up = True
            return len(batch)
        if not batch:
            await self._verify_checkpoint()
            self.stats.behind = max(0, state.entries_added - self._position)
            self.stats.up = True
            return 0
        copies: list[pb.InvalidationEvent] = []
        for entry_id, payload in batch:
            copy, trouble = self._copy_of(entry_id, payload)
            if trouble:
                # The fallback covers every event up to the source's end, this batch's too.
                await self.fallback(trouble)
                return len(batch)
            if copy is not None:
                copies.append(copy)
        await self._apply_all(copies)
        self.cursor = parse_id(batch[-1][0])
        self._position += len(batch)
        await self._advance_checkpoint()
        self.stats.behind = max(0, state.entries_added - self._position)
        self.stats.up = True
        return len(batch)

    async def catch_up(self, max_rounds: int = 10_000) -> int:
        """Apply everything the source holds now (for `--once`); returns events consumed."""
        total = 0
        for _ in range(max_rounds):
            rewinds = self.stats.rewinds
            n = await self.step(block=False)
            total += n
            if n == 0 and self.stats.rewinds == rewinds:  # a rewind has more to apply
                break
        return total

    # -- applying -------------------------------------------------------------------------

    def _copy_of(self, entry_id: str, payload: bytes) -> tuple[pb.InvalidationEvent | None, str]:
        """(the copy to apply, or None for a relayed copy; why to fall back instead)."""
        try:
            event = pb.InvalidationEvent.FromString(payload)
        except DecodeError:
            # It may have named anything: the destination can keep nothing it holds.
            return None, f"unreadable event {entry_id} in {self.source.name}'s stream"
        if event.relayed_from:
            self.stats.skipped += 1
            return None, ""
        if event.kind == pb.EVENT_KIND_RESET:
            return None, f"RESET event {entry_id} in {self.source.name}'s stream"
        copy = pb.InvalidationEvent(
            kind=event.kind,
            keys=event.keys,
            prefixes=event.prefixes,
            tags=event.tags,
            classes=event.classes,
            origin=self.origin,
            relayed_from=self.source.name,
            relayed_id=entry_id,
        )
        return copy, ""

    async def _apply_all(self, copies: Sequence[pb.InvalidationEvent]) -> None:
        """Apply a batch's copies, up to CONCURRENCY at once: invalidations only remove,
        so they commute (their copies may reach the destination's stream in another
        order). Every one is awaited; the first failure is raised (the batch is not
        checkpointed and is applied again)."""
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(copy: pb.InvalidationEvent) -> None:
            async with gate:
                copy.timestamp_ms = time.time_ns() // 1_000_000
                await self.invalidate(copy)

        outcomes = await asyncio.gather(*(one(c) for c in copies), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if copies:
            newest = copies[-1]
            source_ms = parse_id(newest.relayed_id)[0]
            self.stats.applied += len(copies)
            self.stats.last_applied_id = newest.relayed_id
            self.stats.last_applied_ms = source_ms
            self.stats.last_delay_ms = max(0, newest.timestamp_ms - source_ms)

    async def invalidate(self, event: pb.InvalidationEvent) -> None:
        """What Invalidate does in Redis (l2.py's calls, same layout), then publish
        `event`: keys alone in one script, anything else step by step. A failure midway
        leaves the checkpoint where it was: the whole event is applied again."""
        d = self._dst
        payload = event.SerializeToString()
        keys, prefixes, tags = list(event.keys), list(event.prefixes), list(event.tags)
        if keys and not (prefixes or tags or event.classes):
            await d.delete(keys, event=payload, max_events=self._max_len)
            return
        if keys:
            await d.unlink(keys)
        if prefixes:
            await d.delete_prefixes(prefixes)
        for tag in tags:
            await d.delete_tag(tag)
        if event.classes:
            await d.bump_generations(list(event.classes))
        await d.publish(payload, self._max_len)

    async def fallback(self, reason: str) -> None:
        """Events were lost: drop every cached value (and lease) in the destination and
        publish RESET there, then carry on from the source's current end. The end is
        read before the flush, so every event up to it is covered by the flush."""
        log.warning(
            "relay %s: %s; dropping every cached value in %s and publishing RESET there",
            self.name,
            reason,
            self.dest.name,
            extra={"event": "relay_fallback", "link": self.name, "reason": reason},
        )
        state = await self.stream_state()
        removed = await drop_cached_values(self._dst)
        reset = pb.InvalidationEvent(
            kind=pb.EVENT_KIND_RESET,
            timestamp_ms=time.time_ns() // 1_000_000,
            origin=self.origin,
            relayed_from=self.source.name,
            relayed_id=format_id(state.last_id),
        )
        await self._dst.publish(reset.SerializeToString(), self._max_len)
        self.cursor, self._position = state.last_id, state.entries_added
        await self._save_checkpoint()
        self.stats.fallbacks += 1
        self.stats.behind = 0
        log.warning(
            "relay %s: dropped %d cached values in %s; carrying on after %s",
            self.name,
            removed,
            self.dest.name,
            format_id(state.last_id),
            extra={"event": "relay_fallback_done", "link": self.name, "removed": removed},
        )

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event, max_backoff: float = 2.0) -> None:
        """`step` until `stopping` is set; Redis trouble on either side is logged (once
        per outage) and retried with capped backoff, never ending the loop."""
        backoff = 0.05
        failing = False
        while not stopping.is_set():
            try:
                await self.step()
            except (asyncio.CancelledError, RelayError):
                raise
            except Exception as exc:
                self.stats.errors += 1
                self.stats.up = False
                if not failing:
                    log.warning(
                        "relay %s: %s; retrying",
                        self.name,
                        exc,
                        extra={"event": "relay_error", "link": self.name},
                    )
                failing = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), backoff)
                backoff = min(backoff * 2, max_backoff)
                continue
            if failing:
                log.info("relay %s: running again", self.name, extra={"event": "relay_ok"})
            failing, backoff = False, 0.05


async def drop_cached_values(store: RedisStore, scan_count: int = FLUSH_SCAN) -> int:
    """Unlink every value and lease under `store`'s prefix (SCAN, in batches). Counters
    and rate-limiter state (``:n``, ``:rl``) are region-local data, not copies: kept."""
    match = f"{glob_escape(store.prefix)}:{{*"
    removed = 0
    doomed: list[bytes] = []

    async def unlink(rkeys: Sequence[bytes]) -> int:
        # One UNLINK per key (pipelined): keys of different slots in one command would
        # be refused by a Redis Cluster. Not pipe.unlink(): on a cluster pipeline
        # redis-py makes it a coroutine (it splits keys by slot) that never queues the
        # command, and the fallback failed on every attempt (l2.py does the same).
        async with store.client.pipeline(transaction=False) as pipe:
            for rkey in rkeys:
                pipe.execute_command("UNLINK", rkey)
            replies = redis_errors.raise_first(await pipe.execute(raise_on_error=False))
        # Values end with their hash tag's brace; the rest are leases.
        return sum(int(r) for k, r in zip(rkeys, replies, strict=True) if k.endswith(b"}"))

    with store.writing:
        async for rkey in store.client.scan_iter(match=match, count=scan_count):
            if rkey.endswith((b"}", b"}:lease")):
                doomed.append(rkey)
            if len(doomed) >= scan_count:
                removed += await unlink(doomed)
                doomed = []
        if doomed:
            removed += await unlink(doomed)
    return removed


def _text(raw: object) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
