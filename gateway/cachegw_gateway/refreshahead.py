"""Refresh-ahead: background reloads of hot read-through keys before they expire, so that
their callers never wait for a load.

Every gateway runs one worker (`RefreshAhead.run_forever`) for the classes with
``refresh_ahead = true``. Each tick:

1. **Which keys.** The hot keys of those classes: this gateway's own hot-key sketch
   (native `HotKeys`, fed by every Get) and the deployment's recorded hot set in Redis
   (`RedisStore.hot_keys`, merged from every gateway's sketch, re-read every
   `RECORDED_PERIOD`). Each is scheduled for the moment its fresh life left falls to
   the class's `refresh_ahead_before_seconds` (or `refresh_ahead_fraction` of its TTL),
   as last seen; a key is looked at again at least every `RECHECK_MAX`.
2. **Who reloads.** For each key that is due, one script (`_DUE_SCRIPT`) checks in Redis
   that its value is really due (a value, not a tombstone, whose fresh life left is at
   most the window) and takes its lease in the same step (SET NX PX: the lease protocol
   of leases.py, so readers and other gateways wait for this reload instead of loading
   too). Across the gateways one takes the lease; the fill renews the entry, so a
   gateway that comes after finds it no longer due.
3. **How many.** The keys whose lease was granted ask the class's token bucket in Redis
   (GCRA, ratelimit.py's script on ``<p>:refresh-ahead:<class>``, shared by every
   gateway): `refresh_ahead_rate` per second, bursts of one second's worth, the hottest
   keys (by this gateway's sketch) first. Keys beyond it give their lease back and wait
   for a later tick (`refresh_ahead_rate_limited`).
   So the origin never gets more than the rate from refresh-ahead (misses loaded for
   callers are not counted against it: they would load anyway).
4. **Reload.** One `Load` per origin for the rest, stored as a miss's load is
   (readthrough.py): under the lease, with the origin's version, so a write or load
   that overtook it wins (`refresh_ahead_superseded`); a failure releases the leases
   (`refresh_ahead_failed`) and the key is simply loaded on demand when it expires (or
   answered by fail-safe).

Nothing here runs on the request path; a tick's Redis failure is logged and the next
tick tries again.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachegw_gateway import envelope
from cachegw_gateway.l2 import L2Unavailable, RedisStore
from cachegw_gateway.leases import Leases, LeaseToken
from cachegw_gateway.origin import OriginError
from cachegw_gateway.policy import KeyClass, PolicyTable
from cachegw_gateway.ratelimit import GCRA_SOURCE
from cachegw_gateway.readthrough import Miss, ReadThrough
from cachegw_gateway.scripts import Script
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.writes import WriteOutcome
from cachegw_native.hotkeys import HotKeys

log = logging.getLogger(__name__)

# Hot keys taken from this gateway's sketch and from the recorded hot set, per look.
LOCAL_HOT_KEYS = 256
RECORDED_HOT_KEYS = 1000
RECORDED_PERIOD = 30.0  # seconds between reads of the recorded hot set
CANDIDATES_PERIOD = 1.0  # seconds between looks at the local sketch
RECHECK_MAX = 10.0  # a scheduled key is looked at again at least this often
MAX_PER_TICK = 500  # due keys checked in one tick (the soonest first)
REDIS_CALLS = 8  # the worker's Redis calls in flight at once
TICK_MIN, TICK_MAX = 0.05, 1.0

# KEYS[1] value, KEYS[2] lease. ARGV[1] lease token, ARGV[2] lease PX ms, ARGV[3] the
# class's keep_ms (how long values live past their fresh life), ARGV[4] the window (ms).
# Returns {0} no value (or not this gateway's envelope, a tombstone, no expiry); {1,
# fresh ms left} not due yet; {2, fresh ms left, version} due and the lease granted;
# {3, lease pttl} due but another caller holds the lease.
_DUE_SCRIPT = f"""
local old = redis.call('GET', KEYS[1])
if not old or string.len(old) < {envelope.PREFIX_SIZE}
    or string.byte(old, 1) ~= {envelope.MAGIC}
    or string.byte(old, 2) ~= {envelope.FORMAT_VERSION} then
  return {{0}}
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 0 then return {{0}} end
local fresh = pttl - tonumber(ARGV[3])
if fresh > tonumber(ARGV[4]) then return {{1, fresh}} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {{2, fresh, struct.unpack('>I8', old, {envelope.VERSION_OFFSET + 1})}}
end
return {{3, redis.call('PTTL', KEYS[2])}}
"""


@dataclass(frozen=True, slots=True)
class _Due:
    key: str
    kc: KeyClass
    token: LeaseToken
    version: int


class RefreshBudget:
    """Each refresh-ahead class's token bucket in Redis, shared by every gateway."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._gcra = Script(store.client, GCRA_SOURCE)

    def redis_key(self, kc: KeyClass) -> str:
        return f"{self._store.prefix}:refresh-ahead:{kc.name}"

    @staticmethod
    def burst(kc: KeyClass) -> int:
        return max(1, math.ceil(kc.refresh_ahead_rate))

    async def take(self, kc: KeyClass, wanted: int) -> int:
        """How many of `wanted` reloads the bucket allows now (taken from it)."""
        burst = self.burst(kc)
        ask = min(wanted, burst)
        for _ in range(2):  # all that is asked, else what the bucket said was left
            if ask <= 0:
                return 0
            rkey = self.redis_key(kc)
            with self._store.calls([rkey], write=True):
                reply = await self._gcra(
                    keys=[rkey], args=[1_000_000, repr(kc.refresh_ahead_rate), burst, ask]
                )
            if int(reply[0]):
                return ask
            ask = min(ask - 1, int(reply[1]))
        return 0


class RefreshAhead:
    """One gateway's refresh-ahead worker (one event loop)."""

    def __init__(
        self,
        store: RedisStore,
        policy: PolicyTable,
        leases: Leases,
        through: ReadThrough,
        hotkeys: HotKeys,
        stats: GatewayStats,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._policy = policy
        self._leases = leases
        self._through = through
        self._hotkeys = hotkeys
        self._stats = stats
        self._clock = clock
        self._due_script = Script(store.client, _DUE_SCRIPT)
        # The worker's Redis calls in flight at once: a tick with many due keys must not
        # take the connections the request path needs.
        self._redis_calls = asyncio.Semaphore(REDIS_CALLS)
        self.budget = RefreshBudget(store)
        self.classes = [kc for kc in policy.classes if kc.refresh_ahead_before_ms]
        shortest = min((kc.refresh_ahead_before_ms for kc in self.classes), default=1000)
        self.period = min(TICK_MAX, max(TICK_MIN, shortest / 4000))
        # key -> when to look at it next (monotonic); the hot keys of refresh-ahead classes.
        self._next: dict[str, float] = {}
        self._recorded: list[str] = []
        self._recorded_at = -math.inf
        self._candidates_at = -math.inf

    def __bool__(self) -> bool:
        return bool(self.classes)

    async def run_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except L2Unavailable as exc:
                log.debug("refresh-ahead tick skipped: %s", exc)
            except Exception:  # never let one bad tick end the worker
                log.exception("refresh-ahead tick failed")
            await asyncio.sleep(self.period)

    def _class_of(self, key: str) -> KeyClass | None:
        kc = self._policy.classify(key)
        return kc if kc.refresh_ahead_before_ms and kc.read_through else None

    async def _update_candidates(self) -> None:
        now = self._clock()
        if now - self._recorded_at >= RECORDED_PERIOD:
            self._recorded_at = now
            self._recorded = await self._store.hot_keys(RECORDED_HOT_KEYS)
        if now - self._candidates_at < CANDIDATES_PERIOD:
            return
        self._candidates_at = now
        hot = dict.fromkeys(k for k, _ in self._hotkeys.top(LOCAL_HOT_KEYS))
        hot.update(dict.fromkeys(self._recorded))
        wanted = {k for k in hot if self._class_of(k) is not None}
        self._next = {k: self._next.get(k, now) for k in wanted}

    async def tick(self) -> None:
        """One round: find the due hot keys, take their leases, reload within the rate."""
        await self._update_candidates()
        now = self._clock()
        due = [
            k
            for _, k in heapq.nsmallest(
                MAX_PER_TICK, ((t, k) for k, t in self._next.items() if t <= now)
            )
        ]
        if not due:
            return
        granted = await self._claim(due)
        by_origin: dict[str, list[_Due]] = {}
        for kc in {d.kc for d in granted}:
            # The hottest first: when the rate binds, they are the ones reloaded.
            mine = sorted(
                (d for d in granted if d.kc is kc),
                key=lambda d: self._hotkeys.estimate(d.key),
                reverse=True,
            )
            allowed = await self._allowed(kc, mine)
            for d in allowed:
                by_origin.setdefault(kc.origin, []).append(d)
        done = await asyncio.gather(
            *(self._reload(group) for group in by_origin.values()), return_exceptions=True
        )
        failed = next((r for r in done if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed

    async def _claim(self, keys: Sequence[str]) -> list[_Due]:
        """Check each key in Redis; the due ones whose lease this gateway got."""
        claims = []
        for key in keys:
            kc = self._class_of(key)
            if kc is None:
                self._next.pop(key, None)
                continue
            claims.append((key, kc, self._leases.token_for(kc)))
        replies = await asyncio.gather(
            *(self._check(key, kc, token) for key, kc, token in claims), return_exceptions=True
        )
        now = self._clock()
        granted: list[_Due] = []
        for (key, kc, token), reply in zip(claims, replies, strict=True):
            if isinstance(reply, BaseException):
                self._leases.abandon(key, token)  # the grant may have landed
                if not isinstance(reply, L2Unavailable):
                    raise reply
                continue
            # (The lease is not noted in the LeaseTable: the value is still fresh, and
            # this gateway's readers must read it, not wait for the reload.)
            outcome = int(reply[0])
            if outcome == 2:
                granted.append(_Due(key, kc, token, int(reply[2])))
                continue
            if outcome == 1:  # not due yet: look again when it is
                wait = (int(reply[1]) - kc.refresh_ahead_before_ms) / 1000
            elif outcome == 3:  # another caller is loading it
                wait = max(int(reply[1]), 1) / 1000
            else:  # absent: its next reader loads it; look again within the window
                wait = kc.refresh_ahead_before_ms / 2000
            self._next[key] = now + min(max(wait, self.period), RECHECK_MAX)
        return granted

    async def _check(self, key: str, kc: KeyClass, token: LeaseToken) -> list[int]:
        store = self._store
        rkeys = [store.redis_key(key), store.lease_key(key)]
        async with self._redis_calls:
            with store.calls(rkeys, write=True):
                reply: list[int] = await self._due_script(
                    keys=rkeys,
                    args=[token.raw, kc.lease_timeout_ms, kc.keep_ms, kc.refresh_ahead_before_ms],
                )
        return reply

    async def _allowed(self, kc: KeyClass, due: list[_Due]) -> list[_Due]:
        """The reloads the class's bucket allows, in `due`'s order; the others' leases
        go back and they stay due for the next tick."""
        try:
            n = await self.budget.take(kc, len(due))
        except BaseException:
            for d in due:
                self._leases.abandon(d.key, d.token)
            raise
        counters = self._stats.for_class(kc.name)
        for d in due[n:]:
            counters.refresh_ahead_rate_limited += 1
            self._leases.abandon(d.key, d.token)
        return due[:n]

    async def _reload(self, group: list[_Due]) -> None:
        """One Load for `group` (one origin), stored under the leases."""
        try:
            outcomes = await self._through.refresh(
                [(Miss(d.key, d.kc, d.version), d.token) for d in group]
            )
        except OriginError as exc:
            log.info("refresh-ahead of %d keys failed: %s", len(group), exc)
            for d in group:
                self._stats.for_class(d.kc.name).refresh_ahead_failed += 1
            return
        now = self._clock()
        for d, out in zip(group, outcomes, strict=True):
            counters = self._stats.for_class(d.kc.name)
            if isinstance(out, WriteOutcome) and out.stored:
                counters.refresh_ahead_loads += 1
                wait = (out.ttl_ms - d.kc.refresh_ahead_before_ms) / 1000
                self._next[d.key] = now + min(max(wait, self.period), RECHECK_MAX)
            elif isinstance(out, WriteOutcome) and (out.superseded or out.lease_invalid):
                counters.refresh_ahead_superseded += 1
            else:  # Redis failed the store, or the key is gone at the origin
                counters.refresh_ahead_failed += 1
