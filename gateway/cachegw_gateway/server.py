"""Assembles one gateway: Redis store, L1, policy, cache, invalidation bus, Subscribe hub,
gRPC server with health and reflection. Start and stop it from an event loop; `main.py`
adds processes and signals.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health.aio is
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.admission import Admission, MethodHandler
from cachegw_gateway.auth import Authenticator, current_principal
from cachegw_gateway.bus import EventBus
from cachegw_gateway.cache import Cache
from cachegw_gateway.config import MAX_MESSAGE_BYTES, GatewayConfig, L1Config, ServerConfig
from cachegw_gateway.flusher import Flusher
from cachegw_gateway.journal import Journal
from cachegw_gateway.l1tier import new_l1
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.lastknown import LastKnown
from cachegw_gateway.origin import Origins
from cachegw_gateway.policy import PolicyTable
from cachegw_gateway.servicer import SERVICE_NAME, CacheServicer
from cachegw_gateway.space import Space
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.subscriptions import SubscriberHub
from cachegw_gateway.telemetry import tracing
from cachegw_gateway.telemetry.service import Telemetry
from cachegw_gateway.telemetry.snapshot import worker_summaries
from cachegw_gateway.tenancy import TenantRouter
from cachegw_gateway.tls import ServerTls
from cachegw_gateway.worker_status import fetch_summaries
from cachegw_gateway.workers import WorkerSlot
from cachegw_native.coalescer import Coalescer
from cachegw_native.hotkeys import HotKeys
from cachegw_native.l1 import L1Cache

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
        self.gateway_id = config.server.gateway_id
        worker_index = worker.index if worker is not None else 0
        workers = worker.count if worker is not None else 0
        self.space: Space | None = None
        self.tenants: TenantRouter | None = None
        target: CacheServicer | TenantRouter
        # With auth on, every token names a tenant, and each tenant has its own key space.
        if not config.auth.enabled:
            # Without tenants: one key space at redis.prefix (space.py).
            self.space = space = Space(config, redis_url, self.policy, stats=self.stats)
            self.store = space.store
            self.telemetry = Telemetry(
                config,
                service=SERVICE_NAME,
                stats=self.stats,
                l1=space.l1,
                reads=space.cache.reads,
                hotkeys=space.hotkeys,
                store=space.store,
                policy=self.policy,
                tracer_provider=tracer_provider,
                origins=space.origins,
                worker_index=worker_index,
                workers=workers,
            )
            space.servicer.stats_source = self.telemetry.stats
            if worker is not None and worker.status_address:
                space.servicer.workers = self._worker_summaries
            target = space.servicer
        else:
            # With tenants (tenancy.py): a space per tenant; this store, at redis.prefix,
            # holds the tenants' quotas and answers the Redis probe.
            self.store = RedisStore.from_config(config.redis, redis_url, self.stats)
            t = config.telemetry
            exporter = t.exporter if tracer_provider is not None else "none"
            self.tenants = TenantRouter(
                config,
                redis_url,
                self.policy,
                self.store,
                current_principal,
                ping_seconds=lambda: self.telemetry.redis_watch.ping_seconds,
                trace_exporter=exporter,
                sample_ratio=t.sample_ratio if tracer_provider is not None else 0.0,
                on_space=lambda space: self._traced(space, tracer_provider),
            )
            self.telemetry = Telemetry(
                config,
                service=SERVICE_NAME,
                stats=self.stats,
                l1=new_l1(L1Config(max_entries=1, max_bytes=1 << 20, warm_keys=0)),
                reads=Coalescer(),
                hotkeys=HotKeys(1),
                store=self.store,
                policy=self.policy,
                tracer_provider=tracer_provider,
                worker_index=worker_index,
                workers=workers,
                parts=self.tenants.snapshots,
                tenants=self.tenants.figures,
            )
            target = self.tenants
        # TLS when configured (tls.py); raises TlsError for files that cannot be used.
        self.tls = ServerTls.from_config(config.server)
        self.health = health_aio.HealthServicer()
        self._server = grpc.aio.server(
            options=server_options(config.server, reuse_port=worker is not None)
        )
        # Telemetry outside admission: refused calls show in the RPC figures too. Auth
        # before admission: a caller without a valid token takes no admission slot.
        self.admission = Admission(config.server, self.stats)
        self.auth = Authenticator(config.auth, self.stats) if config.auth.enabled else None

        def wrap(method: str, handler: MethodHandler) -> MethodHandler:
            handler = self.admission.wrap(method, handler)
            if self.auth is not None:
                handler = self.auth.wrap(method, handler)
            return self.telemetry.wrap(method, handler)

        self._server.add_generic_rpc_handlers((target.handler(wrap=wrap),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if config.server.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
            )
        self.port = 0
        self.started_at = 0.0

    @staticmethod
    def _traced(space: Space, provider: TracerProvider | None) -> None:
        """A tenant's space: its Redis commands traced as the gateway's are."""
        if provider is not None:
            tracing.instrument_redis(space.store.client, provider)

    # -- the key space of a gateway without tenants, as tests and tools reach it ----------

    def _space(self) -> Space:
        if self.space is None:
            raise AttributeError("a gateway with tenants has a key space per tenant")
        return self.space

    @property
    def cache(self) -> Cache:
        return self._space().cache

    @property
    def l1(self) -> L1Cache:
        return self._space().l1

    @property
    def hotkeys(self) -> HotKeys:
        return self._space().hotkeys

    @property
    def hub(self) -> SubscriberHub:
        return self._space().hub

    @property
    def bus(self) -> EventBus:
        return self._space().bus

    @property
    def journal(self) -> Journal:
        return self._space().journal

    @property
    def flusher(self) -> Flusher:
        return self._space().flusher

    @property
    def origins(self) -> Origins:
        return self._space().origins

    @property
    def origin(self) -> str:
        return self._space().origin

    @property
    def last_known(self) -> LastKnown | None:
        return self._space().last_known

    @property
    def servicer(self) -> CacheServicer:
        return self._space().servicer

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
        if self.space is not None:
            await self.space.start()
        if self.tenants is not None:
            await self.tenants.start()
        await self._server.start()
        self.started_at = time.monotonic()
        if self.auth is not None:
            self.auth.start()
        await self.telemetry.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(SERVICE_NAME, serving)
        return self.port

    async def record_hot_keys(self) -> None:
        if self.space is not None:
            await self.space.cache.record_hot_keys()
        if self.tenants is not None:
            for t in self.tenants.tenants.values():
                await t.space.cache.record_hot_keys()

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
        if self.space is not None:
            self.space.end_streams()
        if self.tenants is not None:
            self.tenants.end_streams()
        await self._server.stop(grace)
        await self.telemetry.stop()  # its Redis probe before the store closes
        if self.auth is not None:
            await self.auth.stop()
        if self.space is not None:
            await self.space.close(grace)
        if self.tenants is not None:
            await self.tenants.close(grace)
            await self.store.close()

    async def _worker_summaries(self) -> list[pb.WorkerSummary]:
        assert self.worker is not None
        return worker_summaries(await fetch_summaries(self.worker.status_address))

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
