"""Redis as L2: every Redis command the gateway sends goes through `RedisStore`.

Layout: the value of cache key K lives at ``<prefix>:{K}``; the braces are a Redis
Cluster hash tag, so the lease and index keys added later (``<prefix>:{K}:lease``) share
its slot and one script can touch them together.

Reads pipeline GET and PTTL (one round trip however many keys) because the L1 copy
must never outlive the Redis entry: Redis's own remaining TTL bounds it, not a clock on
this host. Writes go through one Lua script that assigns the entry version atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cachegw_gateway import envelope
from cachegw_gateway.config import RedisConfig
from cachegw_gateway.stats import GatewayStats

log = logging.getLogger(__name__)

# Errors that mean "Redis cannot answer now" (as opposed to a bug in what we sent).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
)

_PING_ERRORS: tuple[type[BaseException], ...] = (RedisError, *UNAVAILABLE_ERRORS)

# KEYS[1] value key. ARGV[1] envelope tail (after the entry version), ARGV[2] TTL ms,
# ARGV[3] required current version ('' = any). Returns {stored 0/1, version}.
_SET_SCRIPT = f"""
local old = redis.call('GET', KEYS[1])
local ver = 0
if old and string.len(old) >= {envelope.PREFIX_SIZE}
    and string.byte(old, 1) == {envelope.MAGIC} then
  ver = struct.unpack('>I8', old, {envelope.VERSION_OFFSET + 1})
end
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= ver then
  return {{0, ver}}
end
ver = ver + 1
redis.call('SET', KEYS[1],
  string.char({envelope.MAGIC}, {envelope.FORMAT_VERSION}) .. struct.pack('>I8', ver) .. ARGV[1],
  'PX', ARGV[2])
return {{1, ver}}
"""


class L2Unavailable(Exception):
    """Redis could not be reached or did not answer in time."""


@dataclass(frozen=True, slots=True)
class L2Entry:
    envelope: envelope.Envelope
    # Milliseconds left in Redis; -1 when the key has no expiry (not written by us).
    pttl_ms: int


@dataclass(frozen=True, slots=True)
class SetResult:
    stored: bool
    version: int


class RedisStore:
    def __init__(
        self, client: aioredis.Redis, prefix: str, stats: GatewayStats | None = None
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._set_script = client.register_script(_SET_SCRIPT)
        self.stats = GatewayStats() if stats is None else stats

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client (telemetry instruments it when tracing is on)."""
        return self._client

    @property
    def envelope_mismatches(self) -> int:
        """Stored values this gateway could not read (served as misses)."""
        return self.stats.envelope_mismatches

    @classmethod
    def from_config(
        cls, config: RedisConfig, url: str, stats: GatewayStats | None = None
    ) -> RedisStore:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis url {url!r}: only standalone Redis is supported so far")
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=config.max_connections,
            socket_timeout=config.socket_timeout,
            socket_connect_timeout=config.connect_timeout,
            # One quick retry rides out a dropped idle connection; more would only
            # delay the UNAVAILABLE a caller is owed (its deadline also bounds this).
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            health_check_interval=30,
        )
        return cls(aioredis.Redis(connection_pool=pool), config.prefix, stats)

    def _down(self, exc: BaseException) -> L2Unavailable:
        self.stats.redis_errors += 1
        self.stats.redis_up = False
        return L2Unavailable(f"redis did not answer: {exc}")

    def redis_key(self, key: str) -> str:
        return f"{self._prefix}:{{{key}}}"

    async def get(self, key: str) -> L2Entry | None:
        return (await self.get_many((key,)))[0]

    async def get_many(self, keys: Sequence[str]) -> list[L2Entry | None]:
        """One round trip: GET and PTTL of every key, pipelined."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    rkey = self.redis_key(key)
                    pipe.get(rkey)
                    pipe.pttl(rkey)
                replies = await pipe.execute()
        except UNAVAILABLE_ERRORS as exc:
            raise self._down(exc) from exc
        self.stats.redis_up = True
        out: list[L2Entry | None] = []
        for i in range(0, len(replies), 2):
            raw, pttl = replies[i], replies[i + 1]
            if raw is None or pttl == -2:
                out.append(None)
                continue
            try:
                out.append(L2Entry(envelope.decode(raw), pttl))
            except envelope.EnvelopeError as exc:
                self.stats.envelope_mismatches += 1
                log.warning("treating %s as a miss: %s", keys[i // 2][:80], exc)
                out.append(None)
        return out

    async def set(
        self, key: str, tail: bytes, ttl_ms: int, if_version: int | None = None
    ) -> SetResult:
        try:
            stored, version = await self._set_script(
                keys=[self.redis_key(key)],
                args=[tail, ttl_ms, "" if if_version is None else if_version],
            )
        except UNAVAILABLE_ERRORS as exc:
            raise self._down(exc) from exc
        return SetResult(bool(stored), int(version))

    async def delete(self, keys: Sequence[str]) -> int:
        """UNLINK each key (pipelined: the keys may sit in different cluster slots)."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.unlink(self.redis_key(key))
                replies = await pipe.execute()
        except UNAVAILABLE_ERRORS as exc:
            raise self._down(exc) from exc
        return sum(int(r) for r in replies)

    async def ping(self) -> bool:
        try:
            up = bool(await self._client.ping())
        except _PING_ERRORS:
            up = False
        self.stats.redis_up = up
        return up

    async def close(self) -> None:
        await self._client.aclose(close_connection_pool=True)
