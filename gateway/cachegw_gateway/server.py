"""Assembles one gateway: Redis store, L1, policy, cache, invalidation bus, Subscribe hub,
gRPC server with health and reflection. Start and stop it from an event loop; `main.py`
adds processes and signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

import grpc
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health.aio is
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.admission import Admission, MethodHandler
from cachegw_gateway.bus import EventBus
from cachegw_gateway.cache import Cache
from cachegw_gateway.config import MAX_MESSAGE_BYTES, GatewayConfig, ServerConfig
from cachegw_gateway.flusher import Flusher
from cachegw_gateway.journal import Journal
from cachegw_gateway.l1tier import new_l1
from cachegw_gateway.l2 import L2Unavailable, RedisStore
from cachegw_gateway.lastknown import LastKnown
from cachegw_gateway.origin import Origins
from cachegw_gateway.policy import PolicyTable
from cachegw_gateway.servicer import SERVICE_NAME, CacheServicer
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.subscriptions import SubscriberHub
from cachegw_gateway.telemetry.service import Telemetry
from cachegw_gateway.tls import ServerTls
from cachegw_gateway.warmup import HOT_KEYS_TRACKED
from cachegw_gateway.workers import WorkerSlot
from cachegw_native.hotkeys import HotKeys

log = logging.getLogger(__name__)


class GatewayServer:
    """One gateway on one event loop.

    ``await start()`` subscribes to invalidations, binds the listen address (port 0
    picks a free one) and reports SERVING; ``await stop()`` reports NOT_SERVING first, so
    load balancers stop sending, then drains in-flight calls within the grace period,
    records the hot keys and closes Redis.
    """

    def __init__(
        self,
        config: GatewayConfig,
        redis_url: str,
        *,
        tracer_provider: TracerProvider | None = None,
        worker: WorkerSlot | None = None,
    ) -> None:
        self.config = config
        # Under a supervisor (workers.py): every worker binds the same port.
        self.worker = worker
        self.redis_url = redis_url
        self.policy = PolicyTable.from_config(config)
        self.stats = GatewayStats()
        self.store = RedisStore.from_config(config.redis, redis_url, self.stats)
        self.l1 = new_l1(config.l1)
        self.hotkeys = HotKeys(HOT_KEYS_TRACKED)
        # Stale-if-error's last known copies, only when a class asks for them.
        self.last_known = (
            LastKnown(config.l1.max_entries, config.l1.stale_if_error_max_bytes)
            if any(kc.stale_if_error_ms for kc in self.policy.classes)
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
                for kc in self.policy.classes
                if kc.read_through or kc.write_through or kc.write_behind
            ],
        )
        # Write-behind: the journal in Redis, and this gateway's flusher of it.
        wb = config.write_behind
        self.journal = Journal(self.store, wb.shards, wb.dead_letter_max_len)
        self.flusher = Flusher(
            self.journal, self.origins, self.policy, self.stats, wb, self.gateway_id
        )
        self.cache = Cache(
            self.store,
            self.l1,
            self.policy,
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
        # Tracing is on exactly when a provider is given (main.py builds it from config).
        self.telemetry = Telemetry(
            config,
            service=SERVICE_NAME,
            stats=self.stats,
            l1=self.l1,
            reads=self.cache.reads,
            hotkeys=self.hotkeys,
            store=self.store,
            policy=self.policy,
            tracer_provider=tracer_provider,
            origins=self.origins,
            worker_index=worker.index if worker is not None else 0,
            workers=worker.count if worker is not None else 0,
        )
        # TLS when configured (tls.py); raises TlsError for files that cannot be used.
        self.tls = ServerTls.from_config(config.server)
        self.health = health_aio.HealthServicer()
        self._server = grpc.aio.server(
            options=server_options(config.server, reuse_port=worker is not None)
        )
        self.servicer = CacheServicer(
            self.cache,
            self.policy,
            config.server,
            self.hub,
            stats=self.telemetry.stats,
        )
        # Telemetry outside admission: refused calls show in the RPC figures too.
        self.admission = Admission(config.server, self.stats)

        def wrap(method: str, handler: MethodHandler) -> MethodHandler:
            return self.telemetry.wrap(method, self.admission.wrap(method, handler))

        self._server.add_generic_rpc_handlers((self.servicer.handler(wrap=wrap),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._background: list[asyncio.Task[None]] = []
        self._refresher: asyncio.Task[None] | None = None
        self.port = 0
        self.started_at = 0.0

    # -- the invalidation bus -------------------------------------------------------------

    def _on_event(self, event: pb.InvalidationEvent) -> None:
        self.cache.on_event(event)
        self.hub.deliver(event)

    def _on_lost(self, reason: str) -> None:
        self.cache.subscription_lost(reason)
        self.hub.reset_all()

    # -- life cycle -----------------------------------------------------------------------

    @property
    def address(self) -> str:
        host = self.config.server.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> int:
        listen = self.config.server.listen
        if self.tls is None:
            self.port = self._server.add_insecure_port(listen)
        else:  # health and reflection share the port, so they are over TLS too
            self.port = self._server.add_secure_port(listen, self.tls.credentials())
        if self.port == 0:
            raise OSError(f"could not listen on {self.config.server.listen}")
        try:
            await self.store.load_scripts()
        except L2Unavailable as exc:
            log.warning("could not load the Lua scripts at start (loaded on first use): %s", exc)
        if not await self.bus.start(wait=2.0):
            log.warning("invalidation subscription not live yet: serving without L1 fills")
        if self.config.l1.warm_keys and self.bus.live:
            await self.cache.warm_from_hot_keys(self.config.l1.warm_keys)
        await self._server.start()
        self.started_at = time.monotonic()
        self._background.append(asyncio.create_task(self.cache.record_hot_keys_forever()))
        self.flusher.start()
        if self.cache.refresh_ahead is not None:
            self._refresher = asyncio.create_task(self.cache.refresh_ahead.run_forever())
        await self.telemetry.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(SERVICE_NAME, serving)
        return self.port

    async def record_hot_keys(self) -> None:
        await self.cache.record_hot_keys()

    async def stop(self, grace: float | None = None, drain_delay: float | None = None) -> None:
        """Drain: NOT_SERVING (calls still served for `server.drain_delay_seconds`, while
        load balancers notice), then Subscribe streams end with UNAVAILABLE (clients
        subscribe again elsewhere), no new calls are accepted and calls in flight get up to
        `grace` seconds; then the hot keys are recorded and everything closes."""
        if grace is None:
            grace = self.config.server.grace_seconds
        await self.health.enter_graceful_shutdown()
        delay = self.config.server.drain_delay_seconds if drain_delay is None else drain_delay
        if delay > 0:
            await asyncio.sleep(delay)
        self.hub.drain()
        await self._server.stop(grace)
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
            await self.record_hot_keys()
        await self.bus.stop()
        await self.telemetry.stop()
        await self.store.close()

    @property
    def metrics_address(self) -> str | None:
        """host:port of the Prometheus endpoint once started, or None without one."""
        metrics = self.telemetry.metrics
        return metrics.address if metrics is not None and metrics.port else None

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


# Keepalive: clients ping idle connections every 30 s (cachegw._channel); the gateway
# accepts pings every 10 s without data (stricter, and gRPC would end the connection with
# "too_many_pings"), and pings its own idle connections every minute, so that the
# Subscribe streams of a client that vanished are noticed and closed.
KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]


def server_options(c: ServerConfig, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """gRPC server options. SO_REUSEPORT only for workers, which share their supervisor's
    port on purpose; anywhere else it would let two gateways share a port by accident."""
    options = [
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        *KEEPALIVE_OPTIONS,
    ]
    if c.max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", max(1, round(c.max_connection_age_seconds * 1000))),
            ("grpc.max_connection_age_grace_ms", round(c.max_connection_age_grace_seconds * 1000)),
        ]
    return options
