"""The read path after an L1 miss: one coalesced Redis read per key, judged for
freshness, copied into L1 when the L1 tier allows, and handed to the lease protocol on a
miss with lease (or to pick an early refresher on a hit).

Answers are encoded cachegw.v1 messages (see wire.py): the servicer hands them to gRPC
as raw bytes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from functools import partial

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway import freshness, wire
from cachegw_gateway.failsafe import FailSafe
from cachegw_gateway.freshness import FRESH, STALE, Generations
from cachegw_gateway.l1tier import L1Tier
from cachegw_gateway.l2 import L2Entry, L2Unavailable, RedisStore
from cachegw_gateway.leases import Leases
from cachegw_gateway.policy import KeyClass, PolicyTable
from cachegw_gateway.readthrough import Miss, ReadThrough
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.telemetry import tracing
from cachegw_native.hotkeys import HotKeys


class ReadPath:
    def __init__(
        self,
        store: RedisStore,
        tier: L1Tier,
        policy: PolicyTable,
        stats: GatewayStats,
        generations: Generations,
        leases: Leases,
        *,
        hotkeys: HotKeys | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._tier = tier
        self._policy = policy
        self._stats = stats
        self._gens = generations
        self._hotkeys = hotkeys
        self._clock = clock
        self._rand = rand
        self._leases = leases
        # Loads misses of read-through classes (set once the write path exists), and
        # answers their last value STALE when that fails (classes with fail-safe).
        self.through: ReadThrough | None = None
        self.fail_safe: FailSafe | None = None

    async def fetch(
        self,
        key: str,
        *,
        lease: bool = False,
        max_wait_ms: int = 0,
        allow_stale: bool = False,
        time_remaining: float | None = None,
    ) -> bytes:
        """An encoded GetResponse for a key L1 did not answer: Redis (one coalesced read
        per key), else MISS, or with `lease` a lease or the value another holder filled
        meanwhile. When Redis fails (or the circuit breaker refuses the call), a copy
        kept for that (`L1Tier.error_answer`), else the L2Unavailable."""
        try:
            return await self._fetch(key, lease, max_wait_ms, allow_stale, time_remaining)
        except L2Unavailable:
            answer = self._tier.error_answer(key)
            if answer is None:
                raise
            tracing.annotate(tier="l1", fallback=True)
            return answer

    async def _fetch(
        self,
        key: str,
        lease: bool,
        max_wait_ms: int,
        allow_stale: bool,
        time_remaining: float | None,
    ) -> bytes:
        leases = self._leases
        deadline = None if time_remaining is None else self._clock() + time_remaining
        if self._hotkeys is not None:
            self._hotkeys.add(key)
        kc = self._policy.classify(key)
        tracing.annotate(key_class=kc.name)
        if kc.read_through and self.through is not None:
            return await self._fetch_through(self.through, key, kc, allow_stale, deadline)
        if lease and not allow_stale and leases.busy(key):
            # Someone is filling it: join the waiters without a Redis read of our own.
            return await leases.obtain(key, kc, None, max_wait_ms, deadline, allow_stale)
        tracing.annotate(coalesced=key in self._tier.reads)  # in flight: run() joins it
        entry = await self.read_one(key)
        tracing.annotate(tier="miss" if entry is None else "l2")
        counters = self._stats.for_class(kc.name)
        unusable: int | None = None
        if entry is not None:
            verdict, fresh_left = freshness.judge(entry, kc, self._gens[kc.name])
            env = entry.envelope
            if verdict == FRESH:
                freshness.count_found(counters, entry)
                if (
                    lease
                    and kc.early_refresh_beta > 0
                    and freshness.xfetch(env, kc, fresh_left, self._rand)
                ):
                    token = await leases.try_refresh(key, kc, env.version)
                    if token is not None:
                        return freshness.with_status(
                            pb.STATUS_HIT, kc, entry, fresh_left, token.raw
                        )
                return freshness.hit(kc, entry, fresh_left)
            if verdict == STALE and allow_stale:
                counters.stale += 1
                token = await leases.try_refresh(key, kc, env.version) if lease else None
                raw = b"" if token is None else token.raw
                return freshness.with_status(pb.STATUS_STALE, kc, entry, 0, raw)
            unusable = env.version
        if not lease:
            counters.misses += 1
            return freshness.miss(kc)
        return await leases.obtain(key, kc, unusable, max_wait_ms, deadline, allow_stale)

    async def _fetch_through(
        self,
        through: ReadThrough,
        key: str,
        kc: KeyClass,
        allow_stale: bool,
        deadline: float | None,
    ) -> bytes:
        """A read-through class: Redis, else the gateway loads it (readthrough.py). The
        caller's `lease` does not matter: the gateway is the loader, and hands no lease
        (nor an early refresh lease) to its callers."""
        if not allow_stale and not kc.fail_safe_ms and self._leases.busy(key):
            # Being loaded (here or elsewhere): join the waiters without a read of our own.
            return await through.one(Miss(key, kc, None), deadline, allow_stale)
        entry = await self.read_one(key)
        tracing.annotate(tier="miss" if entry is None else "l2")
        answer = self._batch_answer(key, entry, allow_stale)
        if answer is not None:
            return answer
        miss = Miss(key, kc, None if entry is None else entry.envelope.version)
        last = None if self.fail_safe is None else self.fail_safe.fallback(miss, entry)
        if last is not None and self.fail_safe is not None:
            return await self.fail_safe.one(miss, last, deadline, allow_stale)
        return await through.one(miss, deadline, allow_stale)

    async def complete_many(
        self,
        keys: list[str],
        pieces: list[bytes],
        at: list[int],
        *,
        allow_stale: bool = False,
        time_remaining: float | None = None,
    ) -> bytes:
        """The encoded GetManyResponse, in key order, from the L1 part (`L1Tier.answer_many`:
        its pieces and the positions L1 did not answer): one Redis round trip for those,
        then one origin Load for the misses of read-through classes."""
        if at:
            deadline = None if time_remaining is None else self._clock() + time_remaining
            missing = [keys[i] for i in at]
            try:
                found = await self._tier.reads.run_many(missing, self.read_many)
            except L2Unavailable:
                saved = [self._tier.error_answer(k) for k in missing]
                if any(a is None for a in saved):
                    raise
                answers: list[bytes] = saved  # type: ignore[assignment]
            else:
                answers = await self._answers(missing, found, allow_stale, deadline)
            for i, answer in zip(at, answers, strict=True):
                pieces[5 * i] = wire.result(answer)
        return b"".join(pieces)

    async def _answers(
        self,
        keys: list[str],
        found: list[L2Entry | None],
        allow_stale: bool,
        deadline: float | None,
    ) -> list[bytes]:
        out: list[bytes | None] = []
        through: dict[str, tuple[int, Miss]] = {}  # a key asked twice is loaded once
        for i, (key, entry) in enumerate(zip(keys, found, strict=True)):
            answer = self._batch_answer(key, entry, allow_stale)
            out.append(answer)
            if answer is None and key not in through:
                kc = self._policy.classify(key)
                unusable = None if entry is None else entry.envelope.version
                through[key] = (i, Miss(key, kc, unusable))
        if through and self.through is not None:
            misses = [m for _, m in through.values()]
            if self.fail_safe is not None:
                lasts = [found[i] for i, _ in through.values()]
                loaded = await self.fail_safe.many(misses, lasts, deadline, allow_stale)
            else:
                loaded = await self.through.many(misses, deadline, allow_stale)
            by_key = dict(zip(through, loaded, strict=True))
            out = [by_key[k] if a is None else a for k, a in zip(keys, out, strict=True)]
        return out  # type: ignore[return-value]

    def _batch_answer(self, key: str, entry: L2Entry | None, allow_stale: bool) -> bytes | None:
        """The answer for what Redis held; None for a miss of a read-through class (the
        gateway loads it)."""
        kc = self._policy.classify(key)
        counters = self._stats.for_class(kc.name)
        if entry is not None:
            verdict, fresh_left = freshness.judge(entry, kc, self._gens[kc.name])
            if verdict == FRESH:
                freshness.count_found(counters, entry)
                return freshness.hit(kc, entry, fresh_left)
            if verdict == STALE and allow_stale:
                counters.stale += 1
                return freshness.with_status(pb.STATUS_STALE, kc, entry, 0)
        if kc.read_through and self.through is not None:
            return None
        counters.misses += 1
        return freshness.miss(kc)

    async def read_one(self, key: str) -> L2Entry | None:
        """The key's stored entry, through the coalescer (one Redis read per key)."""
        return await self._tier.reads.run(key, partial(self._read_single, key))

    async def _read_single(self, key: str) -> L2Entry | None:
        return (await self.read_many([key]))[0]

    async def read_many(self, keys: list[str]) -> list[L2Entry | None]:
        """One Redis round trip for `keys` (not coalesced); fresh entries fill L1 when
        nothing overtook the read."""
        classes = {self._policy.classify(k).name for k in keys}
        ticket = self._tier.ticket(keys)
        try:
            entries, gens = await self._store.read(keys, classes)
        finally:
            fillable = self._tier.settle(ticket)
        self._gens.update(gens)
        for key, entry, ok in zip(keys, entries, fillable, strict=True):
            if entry is not None and ok:
                kc = self._policy.classify(key)
                verdict, fresh_left = freshness.judge(entry, kc, self._gens[kc.name])
                if verdict == FRESH:
                    self._tier.fill(key, kc, entry.envelope, fresh_left, ticket.sent_at)
        return entries

    def is_fresh(self, key: str, entry: L2Entry | None) -> bool:
        if entry is None:
            return False
        kc = self._policy.classify(key)
        return freshness.judge(entry, kc, self._gens[kc.name])[0] == FRESH
