"""Allow: rate limits on one key, each decision one Lua script run atomically in Redis.

The state of key K's limiter is a hash at ``<p>:{K}:rl`` (`RedisStore.limiter_key`), in
K's slot beside its value, so Delete(K) removes it too. Both algorithms read the time
from Redis (``TIME``) inside the script: every gateway sees the same clock whatever its
own says, and a decision and the state it leaves are one atomic step.

GCRA (the generic cell rate algorithm, as go-redis's redis_rate implements it): a limit
of `rate` per `period` has an emission interval T = period / rate; the hash's field ``t``
is the theoretical arrival time (TAT) of the next request. A request of cost n at time
`now` moves the TAT to max(TAT, now) + n*T, and is allowed when that new TAT is at most
burst*T ahead of `now`. So a fresh key admits `burst` at once and then one every T; over
any interval of length d, at most burst + floor(d / T) are admitted. The hash expires
when the TAT has passed (nothing to remember).

Sliding-window counter: the counts of two fixed windows of one period (fields ``w``: the
current window's index, ``c``: its count, ``p``: the previous window's count). The
estimate of the last period's requests is p * (1 - elapsed/period) + c; a request of cost
n is allowed when estimate + n <= rate. The hash expires at the end of the next window.

Times in the scripts are microseconds since 2024-01-01 held in Lua doubles: integers up
to 2^53 (~285 years of microseconds) are exact, and their fractions (an emission interval
need not be a whole microsecond) are kept to better than 0.01 µs for decades; TATs are
stored as text with three decimals (Lua's own number-to-text keeps 14 digits only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.config import (
    MAX_BURST_REFILL_SECONDS,
    MAX_RATE,
    MAX_RATE_PERIOD_SECONDS,
    MIN_EMISSION_INTERVAL_US,
)
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.policy import KeyClass, RateLimit
from cachegw_gateway.scripts import Script
from cachegw_gateway.validation import InvalidRequest

__all__ = ["GCRA", "SLIDING_WINDOW", "Decision", "RateLimit", "RateLimiter", "resolve", "to_proto"]

GCRA = "gcra"
SLIDING_WINDOW = "sliding_window"
MAX_PERIOD_MS = round(MAX_RATE_PERIOD_SECONDS * 1000)
_EPOCH = 1_704_067_200  # 2024-01-01T00:00:00Z, in Unix seconds

_NOW = f"""
local t = redis.call('TIME')
local now = (tonumber(t[1]) - {_EPOCH}) * 1000000 + tonumber(t[2])
"""

# KEYS[1] the limiter hash; ARGV: period (µs), rate, burst, cost.
# Returns {allowed (0/1), remaining, retry_after_us, reset_after_us} (times as text).
GCRA_SOURCE = f"""
local key = KEYS[1]
local interval = tonumber(ARGV[1]) / tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
{_NOW}
local tat = redis.call('HGET', key, 't')
tat = tat and tonumber(tat) or now
if tat < now then tat = now end
local new_tat = tat + interval * cost
local diff = now + interval * burst - new_tat
if diff < 0 then
  local left = math.floor((now + interval * burst - tat) / interval + 1e-9)
  if left < 0 then left = 0 end
  return {{0, left, string.format('%.3f', -diff), string.format('%.3f', tat - now)}}
end
redis.call('HSET', key, 't', string.format('%.3f', new_tat))
redis.call('PEXPIRE', key, math.ceil((new_tat - now) / 1000))
return {{1, math.floor(diff / interval + 1e-9), '0', string.format('%.3f', new_tat - now)}}
"""

# KEYS[1] the limiter hash; ARGV: period (µs), rate, cost. Returns as GCRA_SOURCE.
SLIDING_WINDOW_SOURCE = f"""
local key = KEYS[1]
local period = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
{_NOW}
local win = math.floor(now / period)
local elapsed = now - win * period
local s = redis.call('HMGET', key, 'w', 'c', 'p')
local cur, prev = 0, 0
if s[1] then
  local w = tonumber(s[1])
  if w == win then
    cur, prev = tonumber(s[2]) or 0, tonumber(s[3]) or 0
  elseif w == win - 1 then
    prev = tonumber(s[2]) or 0
  end
end
local estimate = prev * (period - elapsed) / period + cur
if estimate + cost <= rate then
  cur = cur + cost
  redis.call('HSET', key, 'w', string.format('%.0f', win), 'c', string.format('%.0f', cur),
    'p', string.format('%.0f', prev))
  redis.call('PEXPIRE', key, math.ceil((2 * period - elapsed) / 1000))
  local left = math.floor(rate - estimate - cost + 1e-9)
  if left < 0 then left = 0 end
  return {{1, left, '0', string.format('%.3f', 2 * period - elapsed)}}
end
local retry
if cur + cost > rate then
  -- Only the next window can admit it, once this window's count has faded enough.
  retry = (period - elapsed) + math.max(0, period * (1 - (rate - cost) / cur))
else
  -- The previous window's share must fade to rate - cost - cur.
  retry = period * (1 - (rate - cost - cur) / prev) - elapsed
end
if retry < 1 then retry = 1 end
local reset = 0
if cur > 0 then reset = 2 * period - elapsed elseif prev > 0 then reset = period - elapsed end
local left = math.floor(rate - estimate + 1e-9)
if left < 0 then left = 0 end
return {{0, left, string.format('%.3f', retry), string.format('%.3f', reset)}}
"""


@dataclass(frozen=True, slots=True)
class Decision:
    """One Allow answer."""

    allowed: bool
    remaining: int  # requests of cost 1 still allowed right now
    retry_after_ms: int  # when refused: wait this long (rounded up); 0 when allowed
    reset_after_ms: int  # until the limit is back to full (rounded up)
    limit: RateLimit


_ALGORITHMS = {
    pb.RATE_ALGORITHM_UNSPECIFIED: GCRA,
    pb.RATE_ALGORITHM_GCRA: GCRA,
    pb.RATE_ALGORITHM_SLIDING_WINDOW: SLIDING_WINDOW,
}
_TO_PROTO = {GCRA: pb.RATE_ALGORITHM_GCRA, SLIDING_WINDOW: pb.RATE_ALGORITHM_SLIDING_WINDOW}


def to_proto(limit: RateLimit) -> pb.RateLimit:
    return pb.RateLimit(
        rate=limit.rate,
        period_ms=limit.period_ms,
        burst=limit.burst,
        algorithm=_TO_PROTO[limit.algorithm],
    )


def resolve(given: pb.RateLimit | None, kc: KeyClass, cost: int) -> tuple[RateLimit, int]:
    """The limit and cost an Allow request applies, checked; raises `InvalidRequest`.

    `given` is the request's own limit (None: the class's); `cost` 0 means 1. The bounds
    are those of the config file (docs/config.md): rate in [1, 10^9] per a period of 1 ms
    to 1 day; GCRA: at most one request per microsecond (rate <= period_ms * 1000), burst
    in [cost, 10^9] (0 = rate) and a full burst back within 30 days; cost at most the
    burst (GCRA) or the rate (sliding window)."""
    if given is None:
        if kc.rate_limit is None:
            raise InvalidRequest(
                f"no rate limit: the request gives none and key class {kc.name!r} names "
                "none (set limit, or rate_limit in the class's config)"
            )
        limit = kc.rate_limit
    else:
        algorithm = _ALGORITHMS.get(given.algorithm)
        if algorithm is None:
            raise InvalidRequest(f"limit.algorithm {given.algorithm} is not known")
        if not 1 <= given.rate <= MAX_RATE:
            raise InvalidRequest(f"limit.rate must be in [1, {MAX_RATE}] (got {given.rate})")
        if not 1 <= given.period_ms <= MAX_PERIOD_MS:
            raise InvalidRequest(
                f"limit.period_ms must be in [1, {MAX_PERIOD_MS}] (1 ms to 1 day) "
                f"(got {given.period_ms})"
            )
        if algorithm == GCRA:
            if given.burst > MAX_RATE:
                raise InvalidRequest(
                    f"limit.burst must be at most {MAX_RATE}, 0 = rate (got {given.burst})"
                )
            burst = given.burst or given.rate
        else:
            burst = 0  # not used by the sliding window
        limit = RateLimit(given.rate, given.period_ms, burst, algorithm)
        if algorithm == GCRA:
            if limit.rate * MIN_EMISSION_INTERVAL_US > limit.period_ms * 1000:
                raise InvalidRequest(
                    f"limit.rate must be at most period_ms * 1000 ({limit.period_ms * 1000}): "
                    f"one request per microsecond per key at most (got {limit.rate})"
                )
            if burst * limit.period_ms > MAX_BURST_REFILL_SECONDS * 1000 * limit.rate:
                raise InvalidRequest(
                    "limit.burst: a full burst must come back within 30 days "
                    f"(burst * period_ms / rate <= {round(MAX_BURST_REFILL_SECONDS * 1000)}) "
                    f"(got burst {burst})"
                )
    cost = cost or 1
    if limit.algorithm == GCRA and cost > limit.burst:
        raise InvalidRequest(
            f"cost {cost} is above the burst ({limit.burst}): such a request could never be allowed"
        )
    if limit.algorithm == SLIDING_WINDOW and cost > limit.rate:
        raise InvalidRequest(
            f"cost {cost} is above the rate ({limit.rate}): such a request could never be allowed"
        )
    return limit, cost


def _ms(text: Any) -> int:
    """Microseconds as the script's text → whole milliseconds, rounded up."""
    us = float(text.decode() if isinstance(text, bytes) else text)
    return max(0, math.ceil(us / 1000 - 1e-9))


class RateLimiter:
    """Allow's decisions: one script call per request (see the module's docstring)."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._gcra = Script(store.client, GCRA_SOURCE)
        self._sliding = Script(store.client, SLIDING_WINDOW_SOURCE)

    async def allow(self, key: str, limit: RateLimit, cost: int) -> Decision:
        """Is a request of `cost` on `key` allowed under `limit` (checked by `resolve`)?"""
        store = self._store
        period_us = limit.period_ms * 1000
        args: tuple[int, ...]
        with store.calls([store.limiter_key(key)], write=True):
            if limit.algorithm == GCRA:
                args = (period_us, limit.rate, limit.burst, cost)
                reply = await self._gcra(keys=[store.limiter_key(key)], args=args)
            else:
                args = (period_us, limit.rate, cost)
                reply = await self._sliding(keys=[store.limiter_key(key)], args=args)
        allowed, remaining, retry_after, reset_after = reply
        return Decision(
            allowed=bool(int(allowed)),
            remaining=int(remaining),
            retry_after_ms=_ms(retry_after) if not int(allowed) else 0,
            reset_after_ms=_ms(reset_after),
            limit=limit,
        )
