"""The Redis clients of one gateway, built for the target `redis.url` names (redis_url.py).

Two clients: the command client (a blocking pool of `redis.max_connections`) and a
factory of pub/sub clients (bus.py takes a fresh one per subscription). Either way no
command is ever sent twice by redis-py (see `no_retry`).

Standalone: redis-py's URL handling, the URL without its credentials. Every connection
authenticates through a credential provider (redis_auth.py) and, for a TLS URL, speaks
TLS with ``redis.tls_*`` (redis_tls.py). Sentinel: redis-py's asyncio `Sentinel`
asks the listed Sentinels for the service's primary whenever a connection is opened, so
a connection lost in a failover reconnects to whichever node they name then. A demoted
primary answers writes with READONLY while its connections stay open; `_PrimaryConnection`
then sends every connection of the pool back to the Sentinels (the idle ones at once, the
busy ones when their call ends) and lets READONLY through as it is: the write was
refused, not lost, and RedisStore counts Redis down until its health probe finds a
primary that takes writes (l2.py, `ping`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool, Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cachegw_gateway import redis_auth, redis_tls, redis_url
from cachegw_gateway.config import RedisConfig


def no_retry() -> Retry:
    """No automatic retry: redis-py would send a command (or a whole pipeline, scripts
    included) again after a lost reply, and a write that already ran must not run twice
    (a compare-and-set would answer VERSION_CONFLICT, a lease fill LEASE_INVALID, an event
    would go out twice). Reads are sent once more by `RedisStore._retrying`; a write whose
    reply was lost answers UNAVAILABLE saying it may have been applied. (Retry(..., 0)
    still drops the broken connection; the pool replaces connections found closed.)"""
    return Retry(NoBackoff(), 0)


# Seconds a pub/sub connection may stay silent before a read fails (bus.py pings sooner).
PUBSUB_SOCKET_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 30


@dataclass(frozen=True, slots=True)
class RedisClients:
    client: aioredis.Redis
    pubsub_client: Callable[[], aioredis.Redis]
    # Closes what `client` does not own (the Sentinel connections); after client.aclose.
    close: Callable[[], Awaitable[None]]


async def _nothing() -> None:
    return None


def connect(config: RedisConfig, url: str) -> RedisClients:
    """The clients for `url` (already checked by config.py; ValueError otherwise)."""
    target = redis_url.parse(url)
    if target.kind == "sentinel":
        return _sentinel(config, target)
    return _standalone(config, target)


def security(config: RedisConfig, target: redis_url.RedisTarget) -> dict[str, Any]:
    """The credential provider and TLS arguments of every connection to `target`'s
    nodes (redis-py keyword arguments; empty for a plaintext Redis without AUTH)."""
    out: dict[str, Any] = {}
    credentials = redis_auth.node_credentials(config, target)
    if credentials is not None:
        out["credential_provider"] = credentials
    if target.tls:
        out.update(redis_tls.kwargs(config))
    return out


def _standalone(config: RedisConfig, target: redis_url.RedisTarget) -> RedisClients:
    url, _, _ = redis_url.without_credentials(target.url)
    secure = security(config, target)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=config.max_connections,
        socket_timeout=config.socket_timeout,
        socket_connect_timeout=config.connect_timeout,
        retry=no_retry(),
        health_check_interval=HEALTH_CHECK_INTERVAL,
        **secure,
    )

    def pubsub_client() -> aioredis.Redis:
        # Its own connection, and no retries: a silent reconnect would hide lost events.
        return aioredis.Redis.from_url(
            url,
            socket_timeout=max(config.socket_timeout, PUBSUB_SOCKET_TIMEOUT),
            socket_connect_timeout=config.connect_timeout,
            retry=no_retry(),
            single_connection_client=False,
            **secure,
        )

    return RedisClients(aioredis.Redis(connection_pool=pool), pubsub_client, _nothing)


class _PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary that leaves a demoted one (see the module's text).

    redis-py's own class disconnects inside read_response and raises ConnectionError,
    which in a pipeline loses the replies still to read and turns a refused write into
    one whose outcome is unknown."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await Connection.read_response(self, *args, **kwargs)
        except ReadOnlyError:
            if self.connection_pool.is_master:
                self.mark_for_reconnect()  # type: ignore[no-untyped-call]  # rediscovers
                pool = self.connection_pool
                await pool.update_active_connections_for_reconnect()
                await pool.disconnect(inuse_connections=False)
            raise


class _PrimarySSLConnection(_PrimaryConnection, SSLConnection):
    """`_PrimaryConnection` over TLS (rediss+sentinel://)."""


class _Sentinels(Sentinel):
    """redis-py's Sentinel, with a discovery that concurrent tasks cannot garble.

    redis-py moves the Sentinel that answered to the front of its list with a swap by
    index taken before an await: two discoveries at once (every connection of a pool
    after a failover) can then write one Sentinel over another, which is never asked
    again nor closed (a leaked connection per discovery). Here the list is only
    reordered in one step, and stays a permutation of the Sentinels given."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        errors: list[str] = []
        for sentinel in list(self.sentinels):
            try:
                masters: Any = await sentinel.sentinel_masters()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                where = sentinel.connection_pool.connection_kwargs
                errors.append(f"{where.get('host')}:{where.get('port')}: {exc}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                self.sentinels.remove(sentinel)
                self.sentinels.insert(0, sentinel)
                return state["ip"], int(state["port"])
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise MasterNotFoundError(
            f"no Sentinel names a primary for {service_name!r} that is up{detail}"
        )


class _BlockingPrimaryPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool, waiting for a free connection as the standalone pool does."""


def _sentinel(config: RedisConfig, target: redis_url.RedisTarget) -> RedisClients:
    # Sentinels are asked with their own credentials (redis.sentinel_*, not the nodes'),
    # one after the other: a dead one costs a refused connection or connect_timeout,
    # never a retry loop. TLS, when the URL asks for it, to the Sentinels and the nodes.
    tls: dict[str, Any] = {"ssl": True, **redis_tls.kwargs(config)} if target.tls else {}
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": config.socket_timeout,
        "socket_connect_timeout": config.connect_timeout,
        "retry": no_retry(),
        **tls,
    }
    sentinel_auth = redis_auth.sentinel_credentials(config)
    if sentinel_auth is not None:
        sentinel_kwargs["credential_provider"] = sentinel_auth
    sentinel = _Sentinels(  # type: ignore[no-untyped-call]
        list(target.hosts), sentinel_kwargs=sentinel_kwargs
    )
    node: dict[str, Any] = {
        "db": target.db,
        "socket_connect_timeout": config.connect_timeout,
        "retry": no_retry(),
        **tls,
    }
    node_auth = redis_auth.node_credentials(config, target)
    if node_auth is not None:
        node["credential_provider"] = node_auth
    client = sentinel.master_for(
        target.service,
        connection_pool_class=_BlockingPrimaryPool,
        connection_class=_PrimarySSLConnection if target.tls else _PrimaryConnection,
        max_connections=config.max_connections,
        socket_timeout=config.socket_timeout,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        **node,
    )

    def pubsub_client() -> aioredis.Redis:
        # A new pool per subscription: it asks the Sentinels for the primary afresh.
        fresh: aioredis.Redis = sentinel.master_for(
            target.service,
            socket_timeout=max(config.socket_timeout, PUBSUB_SOCKET_TIMEOUT),
            **node,
        )
        return fresh

    return RedisClients(client, pubsub_client, sentinel.aclose)
