"""Per-tenant quotas shared by every gateway: a call rate and open Subscribe streams.

The rate is a GCRA token bucket in Redis (ratelimit.py's script), one per tenant. Asking
Redis on every call would put a round trip on the L1-hit path, so a gateway takes tokens
in chunks (a twentieth of a second's worth) and spends them locally; a chunk it has not
spent within a second is dropped. Every call spends a token that Redis handed out, so
all gateways together never pass the bucket's rate plus its burst; at worst a gateway
holds a chunk another one could have used.

Open streams are members of a sorted set per tenant, scored by when they lapse: each
gateway renews its own every `RENEW_SECONDS` and removes them when they end, so a
gateway that dies frees its streams' places within `LAPSE_SECONDS`. Admission, renewal
and expiry are one script each (atomic across gateways, Redis' clock).

Redis trouble never refuses a call: a quota that cannot be checked lets it through (the
cache itself degrades as usual) and counts it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable

from cachegw_gateway.l2 import L2Unavailable, RedisStore
from cachegw_gateway.policy import RateLimit
from cachegw_gateway.ratelimit import GCRA, RateLimiter
from cachegw_gateway.scripts import Script

CHUNK_SECONDS = 0.05  # a chunk of tokens: this long at the tenant's rate
CHUNK_KEEP_SECONDS = 1.0  # unspent tokens of a chunk are dropped after this long
RENEW_SECONDS = 10.0
LAPSE_SECONDS = 30.0

# KEYS[1] the tenant's stream set; ARGV: member, lapse (ms), limit. 1 = admitted.
_OPEN_STREAM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# KEYS[1] the tenant's stream set; ARGV: lapse (ms), members... (renewed if still there).
_RENEW_STREAMS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""


class RateQuota:
    """One tenant's call rate on this gateway: `take()` is 0 (go on) or the ms to wait."""

    def __init__(self, limiter: RateLimiter, name: str, per_second: float, burst: int) -> None:
        self._limiter = limiter
        self._name = name
        # GCRA in whole requests per period: per_second requests a second, as a rate over
        # 1000 s so that fractional rates (0.5/s) stay exact enough.
        self.limit = RateLimit(
            rate=max(1, round(per_second * 1000)),
            period_ms=1_000_000,
            burst=burst or max(1, math.ceil(per_second)),
            algorithm=GCRA,
        )
        self._chunk = max(1, min(self.limit.burst, math.ceil(per_second * CHUNK_SECONDS)))
        self._tokens = 0
        self._tokens_until = 0.0
        self._refused_until = 0.0
        self._lock = asyncio.Lock()
        self.refused = 0  # calls refused on this gateway
        self.unchecked = 0  # calls let through because Redis did not answer

    def take_now(self) -> bool:
        """A token from the chunk at hand, without waiting (the hit path's check)."""
        if self._tokens > 0 and time.monotonic() < self._tokens_until:
            self._tokens -= 1
            return True
        return False

    async def take(self) -> int:
        """0 when the call may go on, else the milliseconds to wait before retrying."""
        if self.take_now():
            return 0
        async with self._lock:  # one refill at a time; the others then spend from it
            if self.take_now():
                return 0
            now = time.monotonic()
            if now < self._refused_until:
                self.refused += 1
                return max(1, math.ceil((self._refused_until - now) * 1000))
            try:
                decision = await self._limiter.allow(self._name, self.limit, self._chunk)
                got = self._chunk
                if not decision.allowed and self._chunk > 1:  # the bucket's last few tokens
                    decision = await self._limiter.allow(self._name, self.limit, 1)
                    got = 1
            except L2Unavailable:
                self.unchecked += 1
                return 0
            if not decision.allowed:
                self.refused += 1
                self._refused_until = time.monotonic() + decision.retry_after_ms / 1000
                return max(1, decision.retry_after_ms)
            self._tokens = got - 1
            self._tokens_until = time.monotonic() + CHUNK_KEEP_SECONDS
            return 0


class StreamQuota:
    """One tenant's open Subscribe streams across gateways (at most `limit`)."""

    def __init__(
        self, store: RedisStore, key: str, limit: int, lapse_seconds: float = LAPSE_SECONDS
    ) -> None:
        self._store = store
        self._key = key
        self.limit = limit
        self._lapse_ms = round(lapse_seconds * 1000)
        self._open = Script(store.client, _OPEN_STREAM)
        self._renew = Script(store.client, _RENEW_STREAMS)
        self._mine: set[str] = set()
        self.refused = 0  # streams refused on this gateway
        self.unchecked = 0

    async def open(self, member: str) -> bool:
        """Count one more stream (`member`, unique); False when the tenant is at its limit."""
        try:
            with self._store.calls([self._key], write=True):
                admitted = await self._open(
                    keys=[self._key], args=[member, self._lapse_ms, self.limit]
                )
        except L2Unavailable:
            self.unchecked += 1
            admitted = 1
        if not int(admitted):
            self.refused += 1
            return False
        self._mine.add(member)
        return True

    async def close(self, member: str) -> None:
        self._mine.discard(member)
        try:
            with self._store.calls([self._key], write=True):
                await self._store.client.zrem(self._key, member)
        except L2Unavailable:
            pass  # it lapses by itself

    async def renew(self) -> None:
        """Keep this gateway's streams counted (called every RENEW_SECONDS)."""
        if not self._mine:
            return
        members: Iterable[str] = list(self._mine)
        try:
            with self._store.calls([self._key], write=True):
                await self._renew(keys=[self._key], args=[self._lapse_ms, *members])
        except L2Unavailable:
            pass  # renewed at the next round; a lapse only frees places early
