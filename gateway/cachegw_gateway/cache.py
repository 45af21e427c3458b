"""The read and write paths: L1 (native) in front of Redis (L2), per key class, with leases,
early refresh and invalidation.

Answers come back as encoded cachegw.v1 messages (see wire.py) because the servicer
hands them to gRPC as raw bytes: an L1 hit builds no protobuf object at all.

Freshness of a stored entry is read off Redis's own clock: a class with a stale window
of S ms stores each value for its fresh TTL + S, so ``PTTL - S`` is the fresh time left
(no wall clock of any gateway is trusted). An entry written under an older class
generation is dead (Invalidate(class) bumped it).

Consistency rules kept here:
- an L1 copy expires no later than the fresh life of the Redis entry it copies, counted
  from a moment before the read was sent, and before XFetch might pick a refresher;
- a Redis read that was in flight while this gateway wrote or invalidated the same key
  never fills L1 (it may carry the value from before); a broad invalidation (prefix, tag,
  class, lost subscription) bumps an epoch so that no read in flight across it fills L1;
- a write that starts detaches the key's in-flight read, so Gets that arrive after it
  read Redis anew instead of joining a read that may predate it;
- L1 is only filled while this gateway's invalidation subscription is live.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import envelope, events, wire
from cachegw_gateway.config import InvalidationConfig
from cachegw_gateway.l2 import L2Entry, L2Unavailable, RedisStore, SetResult
from cachegw_gateway.leases import LeaseTable, LeaseToken
from cachegw_gateway.policy import KeyClass, PolicyTable
from cachegw_gateway.stats import ClassCounters, GatewayStats
from cachegw_gateway.telemetry import tracing
from cachegw_native.coalescer import Coalescer
from cachegw_native.hotkeys import HotKeys
from cachegw_native.l1 import L1Cache

log = logging.getLogger(__name__)

# Bytes charged per L1 entry on top of key and encoded answer (object headers, links).
L1_ENTRY_OVERHEAD = 96
# XFetch: with fresh time left above cost * beta * ln(1000), a caller is picked to refresh
# with probability under 0.1 %, so L1 may serve the key until then.
XFETCH_HORIZON = math.log(1000)
# Recompute cost assumed for an entry written without a lease (none was measured).
DEFAULT_COST_MS = 100
# Kept back from a waiting caller's deadline, so that its MISS reaches it in time.
WAIT_MARGIN = 0.025

FRESH, STALE, DEAD = 0, 1, 2

# An L1 entry: the encoded HIT answer with tier L1 (no TTL), the monotonic time at which
# the Redis entry's fresh life ends, its class's counters (so a hit counts itself without
# classifying the key) and its tags (for tag invalidation).
L1Value = tuple[bytes, float, ClassCounters, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    stored: bool
    version: int
    ttl_ms: int
    key_class: str
    lease_invalid: bool = False


class Cache:
    def __init__(
        self,
        store: RedisStore,
        l1: L1Cache,
        policy: PolicyTable,
        *,
        gateway_id: str = "",
        invalidation: InvalidationConfig | None = None,
        hotkeys: HotKeys | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._l1 = l1
        self._policy = policy
        self._gateway_id = gateway_id
        self._events = invalidation or InvalidationConfig()
        self._hotkeys = hotkeys
        self._clock = clock
        self._wall_ms = wall_clock_ms
        self._rand = rand
        self.stats: GatewayStats = store.stats
        self._counters = {kc.name: self.stats.for_class(kc.name) for kc in policy.classes}
        self._reads: Coalescer[L2Entry | None] = Coalescer()
        # key -> token of the Redis read whose result may fill L1; a write drops it.
        self._fill_tokens: dict[str, object] = {}
        self._epoch = 0
        # Whether L1 may be filled: the invalidation subscription is live.
        self.fills_allowed = True
        self._gens: dict[str, int] = {}
        # L1 as it was when the invalidation subscription dropped: served only while Redis
        # cannot be reached, within each copy's own L1 deadline (see flush()).
        self._fallback: dict[str, tuple[L1Value, float]] = {}
        self.leases = LeaseTable(clock)
        self._miss_answers: dict[str, bytes] = {}

    @property
    def l1(self) -> L1Cache:
        return self._l1

    @property
    def reads(self) -> Coalescer[L2Entry | None]:
        return self._reads

    # -- reads ---------------------------------------------------------------------------

    def l1_answer(self, key: str) -> bytes | None:
        """The encoded answer from L1, or None. Never touches Redis."""
        hit: L1Value | None = self._l1.get(key)  # type: ignore[assignment]
        if hit is None:
            return None
        body, fresh_until, counters, _ = hit
        counters.hits_l1 += 1
        if self._hotkeys is not None:
            self._hotkeys.add(key)
        return body + wire.ttl_field(int((fresh_until - self._clock()) * 1000))

    async def fetch(
        self,
        key: str,
        *,
        lease: bool = False,
        max_wait_ms: int = 0,
        allow_stale: bool = False,
        time_remaining: float | None = None,
    ) -> bytes:
        """An encoded GetResponse for a key L1 did not answer (see `l1_answer`): Redis (one
        coalesced read per key), else MISS, or with `lease` a lease or the value another
        holder filled meanwhile."""
        deadline = None if time_remaining is None else self._clock() + time_remaining
        if self._hotkeys is not None:
            self._hotkeys.add(key)
        kc = self._policy.classify(key)
        tracing.annotate(key_class=kc.name)
        if (
            lease
            and not allow_stale
            and (self.leases.held(key) or self.leases.attempt_in_flight(key) is not None)
        ):
            # Someone is filling it: join the waiters without a Redis read of our own.
            return await self._lease(key, kc, None, max_wait_ms, deadline, allow_stale)
        tracing.annotate(coalesced=key in self._reads)  # in flight: run() joins it
        try:
            entry = await self._reads.run(key, partial(self._read_one, key))
        except L2Unavailable:
            answer = self._fallback_answer(key)
            if answer is None:
                raise
            tracing.annotate(tier="l1", fallback=True)
            return answer
        tracing.annotate(tier="miss" if entry is None else "l2")
        counters = self._counters[kc.name]
        unusable: int | None = None
        if entry is not None:
            verdict, fresh_left = self._judge(entry, kc)
            env = entry.envelope
            if verdict == FRESH:
                counters.hits_l2 += 1
                if lease and kc.early_refresh_beta > 0 and self._xfetch(env, kc, fresh_left):
                    token = await self._try_refresh(key, kc, env.version)
                    if token is not None:
                        tracing.annotate(refresh=True, lease="granted")
                        return self._entry_answer(
                            pb.STATUS_HIT, kc, entry, fresh_left, token, refresh=True
                        )
                return self._hit_answer(kc, entry, fresh_left)
            if verdict == STALE and allow_stale:
                counters.stale += 1
                token = await self._try_refresh(key, kc, env.version) if lease else None
                if token is not None:
                    tracing.annotate(refresh=True, lease="granted")
                return self._entry_answer(pb.STATUS_STALE, kc, entry, 0, token, refresh=True)
            unusable = env.version
        if not lease:
            counters.misses += 1
            return self._miss_answer(kc)
        return await self._lease(key, kc, unusable, max_wait_ms, deadline, allow_stale)

    async def get_many(self, keys: Sequence[str], *, allow_stale: bool = False) -> bytes:
        """An encoded GetManyResponse, in key order; one Redis round trip for the L1 misses."""
        answers: list[bytes | None] = [self.l1_answer(k) for k in keys]
        missing = [k for k, a in zip(keys, answers, strict=True) if a is None]
        tracing.annotate(l1_hits=len(keys) - len(missing))
        if missing:
            try:
                found = await self._reads.run_many(missing, self._read_many)
            except L2Unavailable:
                saved = [self._fallback_answer(k) for k in missing]
                if any(a is None for a in saved):
                    raise
                found_answers = iter(saved)
                answers = [a if a is not None else next(found_answers) for a in answers]
                return wire.get_many(a for a in answers if a is not None)
            entries = iter(found)
            answers = [
                a if a is not None else self._batch_answer(k, next(entries), allow_stale)
                for k, a in zip(keys, answers, strict=True)
            ]
        return wire.get_many(a for a in answers if a is not None)

    def _batch_answer(self, key: str, entry: L2Entry | None, allow_stale: bool) -> bytes:
        kc = self._policy.classify(key)
        counters = self._counters[kc.name]
        if entry is not None:
            verdict, fresh_left = self._judge(entry, kc)
            if verdict == FRESH:
                counters.hits_l2 += 1
                return self._hit_answer(kc, entry, fresh_left)
            if verdict == STALE and allow_stale:
                counters.stale += 1
                return self._entry_answer(pb.STATUS_STALE, kc, entry, 0, None)
        counters.misses += 1
        return self._miss_answer(kc)

    def _judge(self, entry: L2Entry, kc: KeyClass) -> tuple[int, int]:
        """(FRESH | STALE | DEAD, fresh milliseconds left) of a stored entry."""
        if entry.envelope.generation != self._gens.get(kc.name, 0):
            return DEAD, 0
        if entry.pttl_ms < 0:  # no expiry: not written by a gateway; served, never copied
            return FRESH, 0
        fresh_left = entry.pttl_ms - kc.stale_ms
        if fresh_left > 0:
            return FRESH, fresh_left
        return (STALE if kc.stale_ms > 0 else DEAD), 0

    def _xfetch(self, env: envelope.Envelope, kc: KeyClass, fresh_left_ms: int) -> bool:
        """Probabilistic early expiration: refresh now with a probability that rises as
        expiry nears, faster for values that take long to recompute."""
        if fresh_left_ms <= 0:  # no expiry known (not written by a gateway): nothing to beat
            return False
        cost = env.cost_ms or DEFAULT_COST_MS
        return -cost * kc.early_refresh_beta * math.log(1.0 - self._rand()) >= fresh_left_ms

    async def _read_one(self, key: str) -> L2Entry | None:
        return (await self._read_many([key]))[0]

    async def _read_many(self, keys: list[str]) -> list[L2Entry | None]:
        tokens = [object() for _ in keys]
        for key, token in zip(keys, tokens, strict=True):
            self._fill_tokens[key] = token
        classes = {self._policy.classify(k).name for k in keys}
        epoch = self._epoch
        sent_at = self._clock()
        try:
            entries, gens = await self._store.read(keys, classes)
        finally:
            # Only a read no write overtook may fill L1.
            fillable = [self._fill_tokens.get(k) is t for k, t in zip(keys, tokens, strict=True)]
            for key, token in zip(keys, tokens, strict=True):
                if self._fill_tokens.get(key) is token:
                    del self._fill_tokens[key]
        self._gens.update(gens)
        if epoch == self._epoch:
            for key, entry, ok in zip(keys, entries, fillable, strict=True):
                if entry is not None and ok:
                    kc = self._policy.classify(key)
                    verdict, fresh_left = self._judge(entry, kc)
                    if verdict == FRESH:
                        self._fill_l1(key, kc, entry.envelope, fresh_left, sent_at)
        return entries

    def _hit_answer(self, kc: KeyClass, entry: L2Entry, fresh_left_ms: int) -> bytes:
        env = entry.envelope
        body = wire.hit_body(env.value, env.version, kc.name, env.tags)
        return body + wire.TIER_L2 + wire.ttl_field(fresh_left_ms)

    def _entry_answer(
        self,
        status: pb.Status.ValueType,
        kc: KeyClass,
        entry: L2Entry,
        ttl_ms: int,
        token: LeaseToken | None,
        *,
        refresh: bool = False,
    ) -> bytes:
        env = entry.envelope
        return wire.answer(
            status,
            key_class=kc.name,
            value=env.value,
            version=env.version,
            ttl_ms=ttl_ms,
            tags=env.tags,
            lease_token=b"" if token is None else token.raw,
            refresh=refresh and token is not None,
        )

    def _miss_answer(self, kc: KeyClass) -> bytes:
        answer = self._miss_answers.get(kc.name)
        if answer is None:
            answer = self._miss_answers[kc.name] = wire.miss(kc.name)
        return answer

    def _fill_l1(
        self, key: str, kc: KeyClass, env: envelope.Envelope, fresh_left_ms: int, since: float
    ) -> None:
        """Copy an entry into L1 for at most min(class L1 TTL, its fresh life left, the
        time before XFetch may pick a refresher)."""
        if not kc.l1 or not self.fills_allowed or fresh_left_ms <= 0:
            return
        horizon = float(fresh_left_ms)
        if kc.early_refresh_beta > 0:
            cost = env.cost_ms or DEFAULT_COST_MS
            horizon -= cost * kc.early_refresh_beta * XFETCH_HORIZON
        l1_ttl = min(kc.l1_ttl_ms, horizon) / 1000
        elapsed = self._clock() - since
        if l1_ttl <= elapsed:
            return
        body = wire.hit_body(env.value, env.version, kc.name, env.tags) + wire.TIER_L1
        value: L1Value = (body, since + fresh_left_ms / 1000, self._counters[kc.name], env.tags)
        # The L1 counts its TTL from now; subtract what already passed since `since`.
        self._l1.set(key, value, len(body) + len(key) + L1_ENTRY_OVERHEAD, l1_ttl - elapsed)

    # -- leases ---------------------------------------------------------------------------

    async def _try_refresh(self, key: str, kc: KeyClass, version: int) -> LeaseToken | None:
        """A refresh lease for a value still served (XFetch or stale window), if nobody
        holds one; never fails the read it rides on."""
        if self.leases.held(key) or self.leases.attempt_in_flight(key) is not None:
            return None
        token = LeaseToken.new(self._wall_ms(), self._gens.get(kc.name, 0))
        self.leases.begin_attempt(key)
        try:
            got = await self._store.acquire(key, token.raw, kc.lease_timeout_ms, version)
        except L2Unavailable:
            return None
        finally:
            self.leases.end_attempt(key)
        if got.granted:
            self.leases.note_held(key, kc.lease_timeout_ms / 1000)
            counters = self._counters[kc.name]
            counters.refreshes += 1
            counters.leases_granted += 1
            return token
        if got.holder_pttl_ms:
            self.leases.note_held(key, got.holder_pttl_ms / 1000)
        return None

    async def _lease(
        self,
        key: str,
        kc: KeyClass,
        unusable: int | None,
        max_wait_ms: int,
        deadline: float | None,
        allow_stale: bool,
    ) -> bytes:
        """A miss with lease: grant the lease, or wait for the holder's value.

        One caller per gateway asks Redis at a time; the others wait on that attempt or
        on the key's wake-up (the fills channel, an invalidation) and then share one
        Redis read. A holder that never fills loses its lease when it expires, and the
        next attempt here (or in another gateway) takes it over."""
        started = self._clock()
        end = started + (max_wait_ms or kc.max_wait_ms) / 1000
        if deadline is not None:
            end = min(end, deadline - WAIT_MARGIN)
        answer, outcome, waited = await self._lease_loop(key, kc, unusable, end, allow_stale)
        tracing.annotate(lease=outcome)
        if waited:
            tracing.annotate(lease_wait_ms=(self._clock() - started) * 1000)
        return answer

    async def _lease_loop(
        self, key: str, kc: KeyClass, unusable: int | None, end: float, allow_stale: bool
    ) -> tuple[bytes, str, bool]:
        """(answer, how the lease went, whether this caller waited)."""
        counters = self._counters[kc.name]
        waited = saw_holder = False
        while True:
            if not self.leases.held(key) and self.leases.attempt_in_flight(key) is None:
                token = LeaseToken.new(self._wall_ms(), self._gens.get(kc.name, 0))
                self.leases.begin_attempt(key)
                try:
                    got = await self._store.acquire(key, token.raw, kc.lease_timeout_ms, unusable)
                finally:
                    self.leases.end_attempt(key)
                if got.granted:
                    self.leases.note_held(key, kc.lease_timeout_ms / 1000)
                    counters.misses += 1
                    counters.leases_granted += 1
                    if saw_holder:
                        counters.leases_taken_over += 1
                    leased = wire.answer(
                        pb.STATUS_LEASED,
                        tier=pb.TIER_ORIGIN,
                        key_class=kc.name,
                        lease_token=token.raw,
                    )
                    return leased, "taken_over" if saw_holder else "granted", waited
                if got.entry is not None:
                    answer = self._usable(kc, got.entry, allow_stale)
                    if answer is not None:
                        return answer, "waited", waited
                    unusable = got.entry.envelope.version
                    continue
                if got.raw_mismatch:
                    unusable = 0  # not an envelope: the script reads its version as 0
                    continue
                saw_holder = True
                self.leases.note_held(key, max(got.holder_pttl_ms, 1) / 1000)
            now = self._clock()
            if now < end:
                if not waited:
                    waited = True
                    counters.lease_waits += 1
                held_until = self.leases.held_until(key) or end
                await self.leases.wait(key, min(end, held_until) - now)
            if self._clock() >= end:
                counters.misses += 1
                counters.lease_wait_timeouts += 1
                return self._miss_answer(kc), "timed_out", waited
            entry = await self._reads.run(key, partial(self._read_one, key))
            if entry is not None:
                answer = self._usable(kc, entry, allow_stale)
                if answer is not None:
                    return answer, "waited", waited
                unusable = entry.envelope.version

    def _usable(self, kc: KeyClass, entry: L2Entry, allow_stale: bool) -> bytes | None:
        """The answer for a value found while waiting: fresh, or stale when accepted."""
        verdict, fresh_left = self._judge(entry, kc)
        if verdict == FRESH:
            self._counters[kc.name].hits_l2 += 1
            return self._hit_answer(kc, entry, fresh_left)
        if verdict == STALE and allow_stale:
            self._counters[kc.name].stale += 1
            return self._entry_answer(pb.STATUS_STALE, kc, entry, 0, None)
        return None

    async def release(self, key: str, token: LeaseToken) -> bool:
        """End a lease without storing (its loader failed): the value stays as it is."""
        released = await self._store.release(key, token.raw)
        self.leases.wake(key)
        return released

    # -- writes ---------------------------------------------------------------------------

    def _begin_write(self, key: str) -> None:
        self._fallback.pop(key, None)
        self._fill_tokens.pop(key, None)
        self._reads.forget(key)
        self._l1.delete(key)

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
        gen = lease_token.generation if lease_token is not None else self._gens.get(kc.name, 0)

        async def write(generation: int, expected: int | None) -> SetResult:
            tail = envelope.encode_tail(
                value,
                created_ms=now_ms,
                cost_ms=cost,
                soft_expiry_ms=now_ms + fresh_ttl,
                generation=generation,
                tags=tags,
            )
            return await self._store.set(
                key,
                tail,
                px,
                expected,
                lease_token=b"" if lease_token is None else lease_token.raw,
                key_class=kc.name,
                tags=tags,
                expires_at_ms=now_ms + px,
                now_ms=now_ms,
            )

        self._begin_write(key)
        sent_at = self._clock()
        result = await write(gen, if_version)
        counters = self._counters[kc.name]
        fill = result.stored
        if result.stored and result.generation != gen:
            # Invalidate(class) ran since this gateway last saw the class generation: the
            # value landed under a dead generation, where nobody will read it.
            self._gens[kc.name] = result.generation
            gen = result.generation
            if lease_token is not None:
                # Granted before the class was invalidated: the load may predate it.
                result = SetResult(stored=False, version=0, lease_invalid=True)
            else:
                retry = await write(gen, result.version)
                # Not stored: another write landed in between and supersedes this one.
                fill = retry.stored
                result = retry if retry.stored else result
        self._begin_write(key)  # reads that started while the write was in flight
        if lease_token is not None:
            self.leases.wake(key)
        if result.lease_invalid:
            counters.lease_fills_refused += 1
            return WriteOutcome(False, 0, fresh_ttl, kc.name, lease_invalid=True)
        if not result.stored:
            return WriteOutcome(False, result.version, fresh_ttl, kc.name)
        counters.sets += 1
        if lease_token is not None:
            counters.lease_fills += 1
        if fill:
            env = envelope.Envelope(
                result.version, now_ms, cost, now_ms + fresh_ttl, gen, tuple(tags), value
            )
            self._fill_l1(key, kc, env, fresh_ttl, sent_at)
        if result.replaced and kc.events:
            await self._publish_quietly(keys=[key])
        return WriteOutcome(True, result.version, fresh_ttl, kc.name)

    async def delete(self, keys: Sequence[str]) -> int:
        for key in keys:
            self._begin_write(key)
            self._counters[self._policy.classify(key).name].deletes += 1
        try:
            deleted = await self._store.delete(keys)
        finally:
            for key in keys:
                self._begin_write(key)
                self.leases.wake(key)
        await self._publish_quietly(keys=list(keys))
        return deleted

    # -- invalidation ---------------------------------------------------------------------

    async def invalidate(
        self,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        tags: Sequence[str] = (),
        classes: Sequence[str] = (),
    ) -> tuple[int, str]:
        """Apply an invalidation to Redis, then publish it; returns (removed, event id).

        This gateway's own L1 is cleared before and after the Redis part (a read racing
        the deletes must not refill it); the others clear theirs when the event lands."""
        self.drop_local(keys, prefixes, tags, classes)
        removed = 0
        try:
            if keys:
                removed += await self._store.delete(keys)
            if prefixes:
                removed += await self._store.delete_prefixes(prefixes)
            if tags:
                removed += (await self._store.delete_tags(tags))[0]
            if classes:
                self._gens.update(await self._store.bump_generations(classes))
        finally:
            self.drop_local(keys, prefixes, tags, classes)
        event_id = await self.publish(keys=keys, prefixes=prefixes, tags=tags, classes=classes)
        return removed, event_id

    async def publish(
        self,
        *,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        tags: Sequence[str] = (),
        classes: Sequence[str] = (),
    ) -> str:
        event = events.make(
            origin=self._gateway_id, keys=keys, prefixes=prefixes, tags=tags, classes=classes
        )
        return await self._store.publish(event.SerializeToString(), self._events.stream_max_len)

    async def _publish_quietly(self, **fields: Sequence[str]) -> None:
        """Publish after a write that already landed: a failure here cannot undo the write,
        so it is logged and the other gateways' copies age out within their L1 TTL."""
        try:
            await self.publish(**fields)
        except L2Unavailable as exc:
            log.warning("could not publish an invalidation after a write: %s", exc)

    def drop_local(
        self,
        keys: Sequence[str] = (),
        prefixes: Sequence[str] = (),
        tags: Sequence[str] = (),
        classes: Sequence[str] = (),
    ) -> None:
        """Forget everything this gateway holds that an invalidation names."""
        for key in keys:
            self._begin_write(key)
            self._fallback.pop(key, None)
            self.leases.wake(key)
        if not (prefixes or tags or classes):
            return
        self.new_epoch()
        self._fallback = {}
        for prefix in prefixes:
            self._l1.delete_prefix(prefix)
        if tags or classes:
            wanted_tags = frozenset(tags)
            wanted = {id(self._counters[c]) for c in classes if c in self._counters}
            doomed = [
                key
                for key, value in self._l1.items()
                if id(value[2]) in wanted or (wanted_tags and not wanted_tags.isdisjoint(value[3]))  # type: ignore[index]
            ]
            for key in doomed:
                self._l1.delete(key)

    def new_epoch(self) -> None:
        """No Redis read in flight now may fill L1 when it lands."""
        self._epoch += 1
        self._fill_tokens.clear()
        self._reads.forget_all()
        self.leases.wake_all()

    def apply_event(self, event: pb.InvalidationEvent) -> None:
        """An event from the bus. This gateway's own events were applied when made."""
        if events.is_reset(event):
            self.flush("a RESET event")
        elif event.origin != self._gateway_id:
            self.drop_local(event.keys, event.prefixes, event.tags, event.classes)

    def flush(self, reason: str, *, keep_fallback: bool = False) -> None:
        """Drop all of L1: this gateway may have missed invalidations.

        With `keep_fallback` (the subscription dropped), the copies are set aside and
        answered only while Redis cannot be reached: each within its own L1 deadline,
        which is inside the class's promise (an L1 copy is at most l1_ttl old even when
        an invalidation was missed), and better than UNAVAILABLE. Any later flush, and
        the subscription coming back, drops them for good."""
        self._fallback = {}
        if keep_fallback:
            now = self._clock()
            for key, value in self._l1.items():
                left = self._l1.expires_in(key)
                if left is not None:
                    self._fallback[key] = (value, now + left)  # type: ignore[assignment]
        self._l1.clear()
        self.new_epoch()
        self.stats.l1_flushes += 1
        log.info("L1 flushed: %s", reason)

    def drop_fallback(self) -> None:
        """The subscription is back: nothing kept aside for an outage may be served."""
        self._fallback = {}

    def _fallback_answer(self, key: str) -> bytes | None:
        saved = self._fallback.get(key)
        if saved is None:
            return None
        (body, fresh_until, counters, _), until = saved
        now = self._clock()
        if now >= until:
            del self._fallback[key]
            return None
        counters.hits_l1 += 1
        return body + wire.ttl_field(int((fresh_until - now) * 1000))

    def on_fill(self, key: str) -> None:
        """A value landed where a lease was held (any gateway): wake our waiters."""
        self.leases.wake(key)

    # -- warm-up --------------------------------------------------------------------------

    async def warm(self, keys: Sequence[str], batch: int = 1000) -> tuple[int, int]:
        """Copy `keys` from Redis into L1; returns (loaded, missing)."""
        loaded = missing = 0
        for i in range(0, len(keys), batch):
            chunk = list(dict.fromkeys(keys[i : i + batch]))
            for key, entry in zip(chunk, await self._read_many(chunk), strict=True):
                if entry is not None and self._judge(entry, self._policy.classify(key))[0] == FRESH:
                    loaded += 1
                else:
                    missing += 1
        return loaded, missing
