"""The read and write paths: L1 (native) in front of Redis (L2), per key class.

Answers come back as encoded cachegw.v1 messages (see wire.py) because the servicer
hands them to gRPC as raw bytes: an L1 hit builds no protobuf object at all.

Consistency rules kept here:
- an L1 copy expires no later than the Redis entry it copies: its deadline is taken
  from Redis's own PTTL, counted from a moment before the request was sent;
- a Redis read that was in flight while this gateway wrote the same key never fills
  L1 (it may carry the value from before the write);
- a write that starts detaches the key's in-flight read, so Gets that arrive after it
  read Redis anew instead of joining a read that may predate it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachegw_gateway import envelope, wire
from cachegw_gateway.l2 import L2Entry, RedisStore
from cachegw_gateway.policy import KeyClass, PolicyTable, jittered_ttl_ms
from cachegw_gateway.stats import ClassCounters, GatewayStats
from cachegw_gateway.telemetry import tracing
from cachegw_native.coalescer import Coalescer
from cachegw_native.l1 import L1Cache

# Bytes charged per L1 entry on top of key and encoded answer (object headers, links).
L1_ENTRY_OVERHEAD = 96

# An L1 entry: the encoded HIT answer with tier L1 (no TTL), the monotonic time at which
# the Redis entry it copies expires, and its class's counters (so a hit counts itself
# without classifying the key).
L1Value = tuple[bytes, float, ClassCounters]


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    stored: bool
    version: int
    ttl_ms: int
    key_class: str


class Cache:
    def __init__(
        self,
        store: RedisStore,
        l1: L1Cache,
        policy: PolicyTable,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._store = store
        self._l1 = l1
        self._policy = policy
        self.stats: GatewayStats = store.stats
        self._counters = {kc.name: self.stats.for_class(kc.name) for kc in policy.classes}
        self._clock = clock
        self._wall_ms = wall_clock_ms
        self._reads: Coalescer[L2Entry | None] = Coalescer()
        # key -> token of the Redis read whose result may fill L1; a write drops it.
        self._fill_tokens: dict[str, object] = {}
        self._miss_answers: dict[str, bytes] = {}

    @property
    def l1(self) -> L1Cache:
        return self._l1

    @property
    def reads(self) -> Coalescer[L2Entry | None]:
        return self._reads

    # -- reads ---------------------------------------------------------------------

    def l1_answer(self, key: str) -> bytes | None:
        """The encoded answer from L1, or None. Never touches Redis."""
        hit: L1Value | None = self._l1.get(key)  # type: ignore[assignment]
        if hit is None:
            return None
        body, expires_at, counters = hit
        counters.hits_l1 += 1
        return body + wire.ttl_field(int((expires_at - self._clock()) * 1000))

    async def get(self, key: str) -> bytes:
        """An encoded GetResponse: L1, else Redis (one coalesced read per key), else MISS."""
        answer = self.l1_answer(key)
        if answer is not None:
            tracing.annotate(tier="l1")
            return answer
        tracing.annotate(coalesced=key in self._reads)  # in flight: run() joins it
        entry = await self._reads.run(key, lambda: self._read_one(key))
        tracing.annotate(tier="miss" if entry is None else "l2")
        return self._l2_answer(key, entry)

    async def get_many(self, keys: Sequence[str]) -> bytes:
        """An encoded GetManyResponse, in key order; one Redis round trip for the L1 misses."""
        answers: list[bytes | None] = [self.l1_answer(k) for k in keys]
        missing = [k for k, a in zip(keys, answers, strict=True) if a is None]
        tracing.annotate(l1_hits=len(keys) - len(missing))
        if missing:
            entries = iter(await self._reads.run_many(missing, self._read_many))
            answers = [
                a if a is not None else self._l2_answer(k, next(entries))
                for k, a in zip(keys, answers, strict=True)
            ]
        return wire.get_many(a for a in answers if a is not None)

    async def _read_one(self, key: str) -> L2Entry | None:
        return (await self._read_many([key]))[0]

    async def _read_many(self, keys: list[str]) -> list[L2Entry | None]:
        tokens = [object() for _ in keys]
        for key, token in zip(keys, tokens, strict=True):
            self._fill_tokens[key] = token
        sent_at = self._clock()
        try:
            entries = await self._store.get_many(keys)
        finally:
            # Only a read no write overtook may fill L1.
            fillable = [self._fill_tokens.get(k) is t for k, t in zip(keys, tokens, strict=True)]
            for key, token in zip(keys, tokens, strict=True):
                if self._fill_tokens.get(key) is token:
                    del self._fill_tokens[key]
        for key, entry, ok in zip(keys, entries, fillable, strict=True):
            if entry is not None and ok:
                self._fill_l1(key, entry.envelope, entry.pttl_ms, sent_at)
        return entries

    def _l2_answer(self, key: str, entry: L2Entry | None) -> bytes:
        kc = self._policy.classify(key)
        counters = self._counters[kc.name]
        if entry is None:
            counters.misses += 1
            return self._miss_answer(kc)
        counters.hits_l2 += 1
        env = entry.envelope
        body = wire.hit_body(env.value, env.version, kc.name)
        return body + wire.TIER_L2 + wire.ttl_field(entry.pttl_ms)

    def _miss_answer(self, kc: KeyClass) -> bytes:
        answer = self._miss_answers.get(kc.name)
        if answer is None:
            answer = self._miss_answers[kc.name] = wire.miss(kc.name)
        return answer

    def _fill_l1(self, key: str, env: envelope.Envelope, pttl_ms: int, since: float) -> None:
        """Copy an entry into L1 for at most min(class L1 TTL, what Redis has left)."""
        kc = self._policy.classify(key)
        if not kc.l1 or pttl_ms <= 0:  # pttl -1: no expiry in Redis, nothing bounds a copy
            return
        body = wire.hit_body(env.value, env.version, kc.name) + wire.TIER_L1
        l1_ttl = min(kc.l1_ttl_ms, pttl_ms) / 1000
        elapsed = self._clock() - since
        if l1_ttl <= elapsed:
            return
        value: L1Value = (body, since + pttl_ms / 1000, self._counters[kc.name])
        # The L1 counts its TTL from now; subtract what already passed since `since`.
        self._l1.set(key, value, len(body) + len(key) + L1_ENTRY_OVERHEAD, l1_ttl - elapsed)

    # -- writes --------------------------------------------------------------------

    def _begin_write(self, key: str) -> None:
        self._fill_tokens.pop(key, None)
        self._reads.forget(key)
        self._l1.delete(key)

    async def set(
        self, key: str, value: bytes, kc: KeyClass, ttl_ms: int | None, if_version: int | None
    ) -> WriteOutcome:
        ttl = jittered_ttl_ms(kc.ttl_ms if ttl_ms is None else ttl_ms, kc.jitter)
        tail = envelope.encode_tail(value, created_ms=self._wall_ms())
        self._begin_write(key)
        sent_at = self._clock()
        result = await self._store.set(key, tail, ttl, if_version)
        # Reads that started while the write was in flight must not fill L1 either.
        self._begin_write(key)
        if result.stored:
            self._counters[kc.name].sets += 1
            env = envelope.Envelope(result.version, 0, 0, 0, value)
            self._fill_l1(key, env, ttl, sent_at)
        return WriteOutcome(result.stored, result.version, ttl, kc.name)

    async def delete(self, keys: Sequence[str]) -> int:
        for key in keys:
            self._begin_write(key)
        for key in keys:
            self._counters[self._policy.classify(key).name].deletes += 1
        try:
            return await self._store.delete(keys)
        finally:
            for key in keys:
                self._begin_write(key)
