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

from cachegw_gateway.admission import Admission, MethodHandler
from cachegw_gateway.config import MAX_MESSAGE_BYTES, GatewayConfig, ServerConfig
from cachegw_gateway.policy import PolicyTable
from cachegw_gateway.servicer import SERVICE_NAME
from cachegw_gateway.space import Space
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.telemetry.service import Telemetry
from cachegw_gateway.workers import WorkerSlot

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
        # Without tenants, one key space at redis.prefix (space.py); the attributes below
        # are its parts, as tests and tools reach them.
        self.space = Space(config, redis_url, self.policy, stats=self.stats)
        self.store = self.space.store
        self.l1 = self.space.l1
        self.hotkeys = self.space.hotkeys
        self.last_known = self.space.last_known
        self.gateway_id = config.server.gateway_id
        self.origin = self.space.origin
        self.origins = self.space.origins
        self.journal = self.space.journal
        self.flusher = self.space.flusher
        self.cache = self.space.cache
        self.hub = self.space.hub
        self.bus = self.space.bus
        self.servicer = self.space.servicer
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
        self.servicer.stats_source = self.telemetry.stats
        self.health = health_aio.HealthServicer()
        self._server = grpc.aio.server(
            options=server_options(config.server, reuse_port=worker is not None)
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
        self.port = 0
        self.started_at = 0.0

    # -- life cycle -----------------------------------------------------------------------

    @property
    def address(self) -> str:
        host = self.config.server.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> int:
        self.port = self._server.add_insecure_port(self.config.server.listen)
        if self.port == 0:
            raise OSError(f"could not listen on {self.config.server.listen}")
        await self.space.start()
        await self._server.start()
        self.started_at = time.monotonic()
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
        self.space.end_streams()
        await self._server.stop(grace)
        await self.telemetry.stop()  # its Redis probe before the store closes
        await self.space.close(grace)

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
