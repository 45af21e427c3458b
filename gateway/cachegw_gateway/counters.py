"""Counters (Incr), Touch and Ttl: small Redis scripts beside the value, never L1.

A key's counter is ``<p>:{K}:n`` (`RedisStore.counter_key`), a plain Redis integer in
the same slot as K's value. It never enters the read path: a Get of K reads the value,
never the counter, and no counter is ever copied into L1, so every Incr goes to Redis
and is atomic across all gateways. Reading a counter is ``Incr(K, 0)``, which never
creates one: a missing counter answers 0, ``created=False``, TTL 0, and nothing is
stored. Delete(K) and Invalidate(keys / prefixes) remove the counter with the value;
Invalidate(classes) does not reset counters (a class generation only marks values).

Redis decides the integer semantics: the delta goes to INCRBY as a decimal string and
the value comes back as GET's string, never through a Lua number (a double, which would
round values beyond 2**53).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cachegw_gateway import envelope
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.policy import KeyClass
from cachegw_gateway.scripts import Script

__all__ = [
    "CounterOverflow",
    "Counters",
    "Incremented",
    "KeyTtl",
    "NotACounter",
    "Touched",
]

# KEYS[1] counter. ARGV[1] delta (decimal), ARGV[2] PX of a counter this call creates.
# Returns {0, value, pttl, created} applied; {1, value} the sum would overflow int64
# (nothing changed); {2, error} the key holds no integer (nothing changed); {3} the
# counter is missing and the delta is 0 (a read: nothing created). Any other error
# (OOM, READONLY, ...) is passed on as the error reply, classified like any other.
_INCR_SCRIPT = """
local existed = redis.call('EXISTS', KEYS[1])
if existed == 0 and ARGV[1] == '0' then
  return {3}
end
local v = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(v) == 'table' and v.err then
  if string.find(v.err, 'overflow', 1, true) then
    return {1, redis.call('GET', KEYS[1])}
  end
  if string.find(v.err, 'not an integer', 1, true) or string.sub(v.err, 1, 9) == 'WRONGTYPE' then
    return {2, v.err}
  end
  return redis.error_reply(v.err)
end
if existed == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {0, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1]), 1 - existed}
"""

# KEYS[1] value, KEYS[2] counter. ARGV[1] PX of the value (fresh TTL + stale window),
# ARGV[2] PX of the counter (fresh TTL). PEXPIRE only sets a TTL on a key that exists.
# Returns {value touched, counter touched}.
_TOUCH_SCRIPT = """
return {redis.call('PEXPIRE', KEYS[1], ARGV[1]), redis.call('PEXPIRE', KEYS[2], ARGV[2])}
"""

# KEYS[1] value, KEYS[2] class generation (absent on a Cluster: the gateway holds the
# generations). Returns {pttl, the envelope's first bytes (marker, format, entry version,
# ..., class generation), the class generation}: the value itself is never read.
_TTL_SCRIPT = f"""
local pttl = redis.call('PTTL', KEYS[1])
if pttl == -2 then
  return {{-2, '', '0'}}
end
local gen = '0'
if #KEYS > 1 then
  gen = redis.call('GET', KEYS[2]) or '0'
end
return {{pttl, redis.call('GETRANGE', KEYS[1], 0, {envelope.GENERATION_OFFSET + 3}), gen}}
"""

_HEAD_SIZE = envelope.GENERATION_OFFSET + 4


class CounterOverflow(Exception):
    """The sum would leave a signed 64-bit integer; nothing changed (OUT_OF_RANGE)."""


class NotACounter(Exception):
    """The counter key holds something that is not an integer (FAILED_PRECONDITION)."""


@dataclass(frozen=True, slots=True)
class Incremented:
    value: int
    ttl_ms: int  # left before the counter expires; 0 when there is none, -1 no expiry
    key_class: str
    created: bool


@dataclass(frozen=True, slots=True)
class Touched:
    touched: bool  # a value or a counter existed and got the TTL
    ttl_ms: int  # the fresh TTL applied (jittered as a write's)
    key_class: str


@dataclass(frozen=True, slots=True)
class KeyTtl:
    exists: bool
    ttl_remaining_ms: int  # fresh time left, never negative; 0 when absent
    version: int
    key_class: str


def _int(raw: object) -> int:
    return int(raw.decode() if isinstance(raw, bytes) else str(raw))


def _text(raw: object) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


class Counters:
    def __init__(
        self,
        store: RedisStore,
        *,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._store = store
        self._wall_ms = wall_clock_ms
        self._incr_script = Script(store.client, _INCR_SCRIPT)
        self._touch_script = Script(store.client, _TOUCH_SCRIPT)
        self._ttl_script = Script(store.client, _TTL_SCRIPT)

    async def incr(self, key: str, delta: int, kc: KeyClass, ttl_ms: int | None) -> Incremented:
        """Add `delta` to K's counter, creating it at `delta` with the class TTL (or
        `ttl_ms`, jittered as a write's; counters have no stale window) when missing.
        An existing counter keeps its TTL."""
        px = kc.ttl_for_write(key, ttl_ms, self._wall_ms())
        with self._store.calls([self._store.counter_key(key)], write=True):
            reply = await self._incr_script(
                keys=[self._store.counter_key(key)], args=[str(delta), px]
            )
        code = int(reply[0])
        if code == 0:
            return Incremented(_int(reply[1]), int(reply[2]), kc.name, bool(int(reply[3])))
        if code == 3:
            return Incremented(0, 0, kc.name, False)
        if code == 1:
            raise CounterOverflow(
                f"counter {key!r} would overflow a signed 64-bit integer "
                f"(value {_int(reply[1])}, delta {delta}); nothing changed"
            )
        raise NotACounter(
            f"counter {key!r} holds something that is not a 64-bit integer (redis: "
            f"{_text(reply[1])}); nothing changed. Delete({key!r}) removes it "
            "(and the value)"
        )

    async def touch(self, key: str, kc: KeyClass, ttl_ms: int | None) -> Touched:
        """Give K's value (fresh TTL + the class's stale window, as a Set would) and
        counter (the fresh TTL) a new TTL, if they exist. L1 copies keep their own,
        shorter deadlines."""
        fresh = kc.ttl_for_write(key, ttl_ms, self._wall_ms())
        with self._store.calls([self._store.counter_key(key)], write=True):
            value, counter = await self._touch_script(
                keys=[self._store.redis_key(key), self._store.counter_key(key)],
                args=[fresh + kc.keep_ms, fresh],
            )
        touched = bool(int(value)) or bool(int(counter))
        return Touched(touched, fresh if touched else 0, kc.name)

    async def ttl(self, key: str, kc: KeyClass) -> KeyTtl:
        """The fresh time left of K's value (PTTL minus the stale window) and its entry
        version, read with GETRANGE off the envelope's header: never the value.

        Absent, as a Get would find it: no value, a value that is not an envelope of
        this gateway's format, or one of an older class generation (Invalidate(class)).
        A value in its stale window exists with 0 fresh time left; one without an expiry
        (not written by a gateway) exists with 0."""
        store = self._store
        with store.calls([store.redis_key(key)], write=False):
            pttl, head, gen = await self._ttl_script(
                keys=[store.redis_key(key), *store.generation_keys(kc.name)]
            )
        if store.in_memory_generations:
            gen = await store.generation(kc.name)
        absent = KeyTtl(False, 0, 0, kc.name)
        pttl = int(pttl)
        if pttl == -2 or not isinstance(head, bytes) or len(head) < _HEAD_SIZE:
            return absent
        if head[0] != envelope.MAGIC or head[1] != envelope.FORMAT_VERSION:
            return absent
        version = int.from_bytes(head[envelope.VERSION_OFFSET : envelope.VERSION_OFFSET + 8])
        generation = int.from_bytes(head[envelope.GENERATION_OFFSET : _HEAD_SIZE])
        if generation != _int(gen):
            return absent
        fresh = max(0, pttl - kc.keep_ms) if pttl > 0 else 0
        return KeyTtl(True, fresh, version, kc.name)
