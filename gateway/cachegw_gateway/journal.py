"""The write-behind journal in Redis: what a write-behind Set or Delete appends before it
touches the cache, and what the flushers (flusher.py) read, settle and dead-letter.

Layout, per write-behind class C and shard n in [0, write_behind.shards):

    <p>:{wb:C:n}:journal  stream; one entry per write: o (s = store, r = remove),
                          w (its write version), e (a StoreEntry: key, value, ttl, tags);
                          consumer group "flushers", one consumer per gateway (its id)
    <p>:{wb:C:n}:ver      the shard's last write version
    <p>:{wb:C:n}:dead     dead-letter stream: entries the origin refused, or answered
                          unusably `max_attempts` times (the entry's fields, plus
                          id = its journal id and why = the reason), MAXLEN ~ bounded

A key belongs to one shard (blake2b of the key, so every gateway agrees), and each
shard's three keys share one hash tag: on a Redis Cluster every script here touches one
slot, and the shards of a class spread over the nodes. A write and the cached value it
stands beside are in different slots, so they are two calls (writebehind.py says in
which order, and what a fault between them leaves).

**Write versions.** The append script numbers each write: the Redis clock in
microseconds, or the shard's last version + 1 when that is not above it (a clock that
went back, a failover to a node whose clock is behind). A key's writes all go through
one shard, so its versions only grow, and the journal's order and the versions agree.
They stay below 2^53 (exact in Lua and in a double) until the year 2255. The cache
stores the value with that version and the origin orders writes by it
(StoreEntry.write_version): a redelivered or overtaken write never takes either back.

Settled entries are acknowledged and deleted in one step, so XLEN is the backlog.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from cachegw.v1 import origin_pb2 as opb
from cachegw_gateway import redis_errors
from cachegw_gateway.l2 import _SET_SCRIPT, L2Unavailable, RedisStore, SetCall, SetResult
from cachegw_gateway.scripts import Script

GROUP = "flushers"
STORE, REMOVE = "s", "r"
CHUNK = 500  # entry ids per settle or dead-letter script (Lua's unpack has a limit)

# KEYS[1] journal, KEYS[2] the shard's last version. ARGV[1] group, ARGV[2] op, ARGV[3]
# the encoded StoreEntry. Creates the stream and its group when missing (a Redis that
# lost them, or the first write), numbers the write and appends it. Returns {write
# version as text, entry id}.
_APPEND_SCRIPT = """
local t = redis.call('TIME')
local ver = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if last >= ver then ver = last + 1 end
local v = string.format('%.0f', ver)
redis.call('SET', KEYS[2], v)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
end
local id = redis.call('XADD', KEYS[1], '*', 'o', ARGV[2], 'w', v, 'e', ARGV[3])
return {v, id}
"""

# KEYS[1] journal. ARGV[1] group, ARGV[2..] entry ids. Acknowledges and deletes them:
# returns how many were still pending (an entry another gateway settled meanwhile is
# not counted twice).
_SETTLE_SCRIPT = """
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
return n
"""

# KEYS[1] journal, KEYS[2] dead-letter stream. ARGV[1] group, ARGV[2] MAXLEN, then
# pairs (entry id, reason). Copies each entry still in the journal to the dead-letter
# stream with its id and the reason, then acknowledges and deletes it. Returns how many
# were moved.
_DEAD_LETTER_SCRIPT = """
local n = 0
for i = 3, #ARGV, 2 do
  local got = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #got == 1 and redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    local f = got[1][2]
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'id', ARGV[i],
      'why', ARGV[i + 1], unpack(f))
    n = n + 1
  end
  redis.call('XDEL', KEYS[1], ARGV[i])
end
return n
"""

# KEYS[1] journal. ARGV[1] group, ARGV[2] idle ms, ARGV[3] the caller's consumer name.
# Deletes the group's consumers (gateways gone for good) that hold no pending entry and
# were idle longer than ARGV[2]: atomic, so one that reads meanwhile is never deleted
# with entries (their pending record would go with it). Returns how many.
_FORGET_SCRIPT = """
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['pending'] == 0 and f['idle'] > tonumber(ARGV[2]) and f['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    n = n + 1
  end
end
return n
"""

# One Redis (standalone or Sentinel): the append and the Set script in one step. KEYS:
# the Set script's, then the journal and the shard's last version; ARGV: the Set
# script's (ARGV[14], the origin version, is replaced by the write version), then the
# group and the encoded StoreEntry. Returns the Set script's reply and the write version.
_APPEND_AND_SET_SCRIPT = f"""
local vkey = table.remove(KEYS)
local jkey = table.remove(KEYS)
local entry = table.remove(ARGV)
local group = table.remove(ARGV)
local t = redis.call('TIME')
local ver = tonumber(t[1]) * 1000000 + tonumber(t[2])
local last = tonumber(redis.call('GET', vkey) or '0')
if last >= ver then ver = last + 1 end
local v = string.format('%.0f', ver)
redis.call('SET', vkey, v)
if redis.call('EXISTS', jkey) == 0 then
  redis.call('XGROUP', 'CREATE', jkey, group, '0', 'MKSTREAM')
end
redis.call('XADD', jkey, '*', 'o', 's', 'w', v, 'e', entry)
ARGV[14] = v
local function set_part()
{_SET_SCRIPT}
end
local r = set_part()
r[#r + 1] = v
return r
"""


@dataclass(frozen=True, slots=True)
class Shard:
    """One journal stream of one class."""

    key_class: str
    number: int
    journal: str
    version: str
    dead: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One journal entry as read back."""

    id: str
    op: str  # STORE or REMOVE
    write_version: int
    store: opb.StoreEntry  # key (and for STORE: value, ttl_ms, tags)
    fields: tuple[bytes, ...] = ()

    @property
    def key(self) -> str:
        return self.store.key


class BadEntry(Exception):
    """A journal entry this gateway cannot read (written by another version, or by hand)."""

    def __init__(self, entry_id: str, why: str) -> None:
        super().__init__(why)
        self.entry_id = entry_id


def shard_number(key: str, shards: int) -> int:
    digest = hashlib.blake2b(key.encode(errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def _text(raw: object) -> str:
    return raw.decode(errors="surrogateescape") if isinstance(raw, bytes) else str(raw)


def id_ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def _entries(raw: Any) -> tuple[list[Entry], list[BadEntry]]:
    out: list[Entry] = []
    bad: list[BadEntry] = []
    for entry_id_raw, fields in raw or ():
        entry_id = _text(entry_id_raw)
        if fields is None:  # deleted while pending (XAUTOCLAIM reports those apart)
            continue
        try:
            out.append(_entry(entry_id, fields))
        except (KeyError, ValueError, TypeError) as exc:
            bad.append(BadEntry(entry_id, f"unreadable journal entry: {exc}"))
    return out, bad


def _entry(entry_id: str, fields: dict[Any, Any]) -> Entry:
    got = {_text(k): v for k, v in fields.items()}
    op = _text(got["o"])
    if op not in (STORE, REMOVE):
        raise ValueError(f"op {op!r} is neither 's' nor 'r'")
    version = int(_text(got["w"]))
    try:
        store = opb.StoreEntry.FromString(got["e"])
    except Exception as exc:  # DecodeError
        raise ValueError(f"e is not a StoreEntry ({exc})") from None
    if not store.key:
        raise ValueError("the entry names no key")
    flat: list[bytes] = []
    for k, v in fields.items():
        flat += (k if isinstance(k, bytes) else str(k).encode(), v)
    return Entry(entry_id, op, version, store, tuple(flat))


class Journal:
    """The journal of every write-behind class, over one `RedisStore` (any topology)."""

    def __init__(self, store: RedisStore, shards: int, dead_letter_max_len: int) -> None:
        self._store = store
        self.shards = shards
        self.dead_letter_max_len = dead_letter_max_len
        client = store.client
        self._client = client
        self._append = Script(client, _APPEND_SCRIPT)
        self._settle = Script(client, _SETTLE_SCRIPT)
        self._dead_letter = Script(client, _DEAD_LETTER_SCRIPT)
        self._forget = Script(client, _FORGET_SCRIPT)
        # One Redis holds the value and the journal: both in one script (a Cluster store
        # reads generations in memory, and its scripts touch one slot: two steps there).
        self.one_step = not store.in_memory_generations
        self._append_and_set = Script(client, _APPEND_AND_SET_SCRIPT)

    def shard(self, key_class: str, number: int) -> Shard:
        tag = f"{self._store.prefix}:{{wb:{key_class}:{number}}}"
        return Shard(key_class, number, f"{tag}:journal", f"{tag}:ver", f"{tag}:dead")

    def shard_of(self, key_class: str, key: str) -> Shard:
        return self.shard(key_class, shard_number(key, self.shards))

    def shards_of(self, key_class: str) -> list[Shard]:
        return [self.shard(key_class, n) for n in range(self.shards)]

    # -- the write path -------------------------------------------------------------------

    def _append_call(
        self, key_class: str, op: str, entry: opb.StoreEntry
    ) -> tuple[list[str], list[Any]]:
        shard = self.shard_of(key_class, entry.key)
        return [shard.journal, shard.version], [GROUP, op, entry.SerializeToString()]

    async def append(self, key_class: str, op: str, entry: opb.StoreEntry) -> int:
        """Journal one write; its write version. Raises L2Unavailable (with a lost reply,
        L2OutcomeUnknown: it may have been journaled)."""
        keys, args = self._append_call(key_class, op, entry)
        with self._store.calls(keys[:1], write=True):
            reply = await self._append(keys=keys, args=args)
        return int(_text(reply[0]))

    async def append_and_set(
        self, key_class: str, entry: opb.StoreEntry, call: SetCall
    ) -> tuple[SetResult, int]:
        """One Redis only (`one_step`): journal a STORE and run the Set script's `call`
        in one script; the Set's result and the write version."""
        keys, args = self._store._set_keys_args(call, time.time_ns() // 1_000_000)
        shard = self.shard_of(key_class, entry.key)
        with self._store.calls([keys[0]], write=True):
            reply = await self._append_and_set(
                keys=[*keys, shard.journal, shard.version],
                args=[*args, GROUP, entry.SerializeToString()],
            )
        return SetResult.from_reply(reply[:5]), int(_text(reply[5]))

    async def append_many(
        self, key_class: str, op: str, entries: Sequence[opb.StoreEntry]
    ) -> list[int | L2Unavailable]:
        """Journal many writes in one pipeline (per node): per write its version or its
        failure."""
        replies = await self._store.run_each(
            self._append, [self._append_call(key_class, op, e) for e in entries]
        )
        return [r if isinstance(r, L2Unavailable) else int(_text(r[0])) for r in replies]

    # -- the flusher's side ---------------------------------------------------------------

    async def ensure_group(self, shard: Shard) -> None:
        """The consumer group (and the stream) exist."""
        with self._store.calls([shard.journal], write=True):
            try:
                await self._client.xgroup_create(shard.journal, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(
        self, shard: Shard, consumer: str, count: int, *, own: bool
    ) -> tuple[list[Entry], list[BadEntry]]:
        """Up to `count` entries for `consumer`: its own pending ones (`own`: delivered to
        it before, not settled; after a restart with the same gateway id), else new ones.
        A stream or group Redis lost is made again first (NOGROUP)."""
        start = "0" if own else ">"
        for attempt in range(2):
            try:
                with self._store.calls([shard.journal], write=True):
                    reply = await self._client.xreadgroup(
                        GROUP, consumer, {shard.journal: start}, count=count
                    )
                break
            except L2Unavailable as exc:
                if attempt or "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group(shard)
        if not reply:
            return [], []
        # RESP2: [[stream, [[id, {fields}], ...]]]
        got: Any = reply
        _, raw = got[0]
        return _entries(raw)

    async def claim(
        self, shard: Shard, consumer: str, min_idle_ms: int, count: int, cursor: str
    ) -> tuple[list[Entry], list[BadEntry], str]:
        """XAUTOCLAIM: entries pending for longer than `min_idle_ms` with any consumer (a
        gateway that died or hangs) become `consumer`'s, from `cursor`; the next cursor
        ("0-0" when the pending list was walked to its end)."""
        with self._store.calls([shard.journal], write=True):
            reply = await self._client.xautoclaim(
                shard.journal, GROUP, consumer, min_idle_ms, start_id=cursor, count=count
            )
        cursor_next, raw = _text(reply[0]), reply[1]
        got, bad = _entries(raw)
        return got, bad, cursor_next

    async def keep(self, shard: Shard, consumer: str, ids: Sequence[str], min_idle_ms: int) -> None:
        """Reset the idle time of entries this gateway still works on (XCLAIM JUSTID, to
        itself), so that other gateways do not take them as a dead gateway's; entries
        idle less than `min_idle_ms` are left alone (one another gateway claimed lately
        stays with it)."""
        if not ids:
            return
        with self._store.calls([shard.journal], write=True):
            await self._client.xclaim(
                shard.journal, GROUP, consumer, min_idle_ms, list(ids), justid=True
            )

    async def forget_consumers(self, shard: Shard, consumer: str, idle_ms: int) -> int:
        """Delete consumers other than `consumer` that hold nothing and were idle longer
        than `idle_ms` (gateways that are gone: their names would pile up)."""
        with self._store.calls([shard.journal], write=True):
            return int(await self._forget(keys=[shard.journal], args=[GROUP, idle_ms, consumer]))

    async def settle(self, shard: Shard, ids: Sequence[str]) -> int:
        """Acknowledge and delete `ids`: the origin has them (or newer)."""
        n = 0
        for at in range(0, len(ids), CHUNK):
            chunk = ids[at : at + CHUNK]
            with self._store.calls([shard.journal], write=True):
                n += int(await self._settle(keys=[shard.journal], args=[GROUP, *chunk]))
        return n

    async def dead_letter(self, shard: Shard, why: Sequence[tuple[str, str]]) -> int:
        """Move entries (id, reason) to the shard's dead-letter stream."""
        n = 0
        for at in range(0, len(why), CHUNK):
            args: list[Any] = [GROUP, self.dead_letter_max_len]
            for entry_id, reason in why[at : at + CHUNK]:
                args += (entry_id, reason[:1000])
            with self._store.calls([shard.journal], write=True):
                n += int(await self._dead_letter(keys=[shard.journal, shard.dead], args=args))
        return n

    async def figures(self, shards: Sequence[Shard]) -> tuple[int, int]:
        """(entries not yet settled, age in ms of the oldest of them) over `shards`."""
        backlog, oldest = 0, 0
        for shard in shards:
            with self._store.calls([shard.journal], write=False):
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.xlen(shard.journal)
                    pipe.xrange(shard.journal, count=1)
                    n, first = redis_errors.raise_first(await pipe.execute(raise_on_error=False))
            backlog += int(n)
            if first:
                ms = id_ms(_text(first[0][0]))
                oldest = ms if not oldest else min(oldest, ms)
        lag = max(0, time.time_ns() // 1_000_000 - oldest) if oldest else 0
        return backlog, lag

    async def dead_letters(self, shard: Shard, count: int = 100) -> list[dict[str, bytes]]:
        """The oldest dead-lettered entries of `shard` (for tests and operators)."""
        with self._store.calls([shard.dead], write=False):
            raw = await self._client.xrange(shard.dead, count=count)
        return [
            {_text(k): v if isinstance(v, bytes) else str(v).encode() for k, v in fields.items()}
            for _, fields in raw or ()
            if fields
        ]
