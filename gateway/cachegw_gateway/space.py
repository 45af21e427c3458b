"""One key space: everything a set of keys lives in, from the L1 to the Redis prefix.

A gateway without tenants has one space, at `redis.prefix`. With tenants (auth on, see
tenancy.py) each tenant has its own, at ``<redis.prefix>:t:<tenant>``: its own Redis keys,
class generations, tag indexes, event stream and channel, hot-key list and write-behind
journal, its own L1, Subscribe hub and counters. Nothing is shared but the Redis
deployment, so no RPC can reach another tenant's keys, events or figures: isolation by
construction rather than by a check in every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.bus import EventBus
from cachegw_gateway.cache import Cache
from cachegw_gateway.config import GatewayConfig, L1Config
from cachegw_gateway.flusher import Flusher
from cachegw_gateway.journal import Journal
from cachegw_gateway.l1tier import new_l1
from cachegw_gateway.l2 import L2Unavailable, RedisStore
from cachegw_gateway.lastknown import LastKnown
from cachegw_gateway.origin import Origins
from cachegw_gateway.policy import PolicyTable
from cachegw_gateway.servicer import CacheServicer, StatsSource
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.subscriptions import SubscriberHub
from cachegw_gateway.warmup import HOT_KEYS_TRACKED
from cachegw_native.hotkeys import HotKeys

log = logging.getLogger(__name__)

TENANT_METADATA = "cachegw-tenant"


class Space:
    """The store, L1, cache, event bus and Subscribe hub of one key space.

    `tenant` is "" for the one space of a gateway without tenants. Origin calls made for
    a tenant carry its name in the ``cachegw-tenant`` metadata: an origin serving several
    tenants must keep their rows apart by it.
    """

    def __init__(
        self,
        config: GatewayConfig,
        redis_url: str,
        policy: PolicyTable,
        *,
        tenant: str = "",
        prefix: str | None = None,
        l1: L1Config | None = None,
        stats: GatewayStats | None = None,
        stats_source: StatsSource | None = None,
    ) -> None:
        self.tenant = tenant
        self.policy = policy
        self.stats = GatewayStats() if stats is None else stats
        redis = config.redis
        if prefix is not None and prefix != redis.prefix:
            redis = dataclasses.replace(redis, prefix=prefix)
        self.store = RedisStore.from_config(redis, redis_url, self.stats)
        l1_config = config.l1 if l1 is None else l1
        self.l1 = new_l1(l1_config)
        self.hotkeys = HotKeys(HOT_KEYS_TRACKED)
        # Stale-if-error's last known copies, only when a class asks for them.
        self.last_known = (
            LastKnown(l1_config.max_entries, l1_config.stale_if_error_max_bytes)
            if any(kc.stale_if_error_ms for kc in policy.classes)
            else None
        )
        self.gateway_id = config.server.gateway_id
        # Events carry this as their origin; the random part tells this process's own
        # events apart even when two gateways were given the same id.
        self.origin = f"{self.gateway_id}/{secrets.token_hex(3)}"
        # One client per origin address the classes name (read- and write-through).
        self.origins = Origins(
            config.origin,
            [
                kc.origin
                for kc in policy.classes
                if kc.read_through or kc.write_through or kc.write_behind
            ],
            metadata=((TENANT_METADATA, tenant),) if tenant else (),
        )
        # Write-behind: the journal in Redis, and this gateway's flusher of it.
        wb = config.write_behind
        self.journal = Journal(self.store, wb.shards, wb.dead_letter_max_len)
        self.flusher = Flusher(self.journal, self.origins, policy, self.stats, wb, self.gateway_id)
        self.cache = Cache(
            self.store,
            self.l1,
            policy,
            self.hotkeys,
            origin=self.origin,
            invalidation=config.invalidation,
            last_known=self.last_known,
            origins=self.origins,
            journal=self.journal,
            max_ttl_ms=round(config.server.max_ttl_seconds * 1000),
            max_key_bytes=config.server.max_key_bytes,
        )
        self.hub = SubscriberHub(
            self.origin,
            config.invalidation.subscriber_queue,
            self.stats,
            max_bytes=config.invalidation.subscriber_queue_bytes,
        )
        self.bus = EventBus(
            self.store.pubsub_client,
            self.store.events_channel,
            self.store.fills_channel,
            on_event=self._on_event,
            on_fill=self.cache.on_fill,
            on_lost=self._on_lost,
            on_live=self.cache.subscription_live,
            max_backoff=config.invalidation.resubscribe_max_backoff_seconds,
        )
        self.servicer = CacheServicer(
            self.cache, policy, config.server, self.hub, stats=stats_source
        )
        self._warm_keys = l1_config.warm_keys
        self._background: list[asyncio.Task[None]] = []
        self._refresher: asyncio.Task[None] | None = None

    # -- the invalidation bus -------------------------------------------------------------

    def _on_event(self, event: pb.InvalidationEvent) -> None:
        self.cache.on_event(event)
        self.hub.deliver(event)

    def _on_lost(self, reason: str) -> None:
        self.cache.subscription_lost(reason)
        self.hub.reset_all()

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Scripts loaded, the event subscription live (or on its way), the L1 warmed
        from the hot keys, the hot-key recorder, write-behind flusher and refresh-ahead
        worker running. Redis trouble only delays what needs it."""
        try:
            await self.store.load_scripts()
        except L2Unavailable as exc:
            log.warning("could not load the Lua scripts at start (loaded on first use): %s", exc)
        if not await self.bus.start(wait=2.0):
            log.warning("invalidation subscription not live yet: serving without L1 fills")
        if self._warm_keys and self.bus.live:
            await self.cache.warm_from_hot_keys(self._warm_keys)
        self._background.append(asyncio.create_task(self.cache.record_hot_keys_forever()))
        self.flusher.start()
        if self.cache.refresh_ahead is not None:
            self._refresher = asyncio.create_task(self.cache.refresh_ahead.run_forever())

    def end_streams(self) -> None:
        """Subscribe streams end (after what they buffered) with UNAVAILABLE."""
        self.hub.drain()

    async def close(self, grace: float) -> None:
        """After the gRPC server stopped: background work stopped, writes and loads in
        flight finished (up to `grace`), hot keys recorded, Redis closed."""
        if self._refresher is not None:  # before drain closes the origins' channels
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.flusher.stop(within=grace)
        await self.cache.drain()
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(L2Unavailable):
            await self.cache.record_hot_keys()
        await self.bus.stop()
        await self.store.close()
