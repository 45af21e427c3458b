"""Assembles one gateway: Redis store, L1, policy, cache, gRPC server with health and
reflection. Start and stop it from an event loop; `main.py` adds processes and signals.
"""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health.aio is
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider

from cachegw_gateway.cache import Cache
from cachegw_gateway.config import GatewayConfig
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.policy import PolicyTable
from cachegw_gateway.servicer import SERVICE_NAME, CacheServicer
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.telemetry.service import Telemetry
from cachegw_native.hotkeys import HotKeys
from cachegw_native.l1 import L1Cache

log = logging.getLogger(__name__)


class GatewayServer:
    """One gateway on one event loop.

    ``await start()`` binds the listen address (port 0 picks a free one) and reports
    SERVING; ``await stop()`` reports NOT_SERVING first, so load balancers stop sending,
    then drains in-flight calls within the grace period and closes Redis.
    """

    def __init__(
        self,
        config: GatewayConfig,
        redis_url: str,
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.config = config
        self.redis_url = redis_url
        self.policy = PolicyTable.from_config(config)
        self.stats = GatewayStats()
        self.store = RedisStore.from_config(config.redis, redis_url, self.stats)
        self.l1 = L1Cache(config.l1.max_entries, config.l1.max_bytes, admission=config.l1.admission)
        self.cache = Cache(self.store, self.l1, self.policy)
        self.hotkeys = HotKeys()  # fed from Gets by the read path; read by Stats
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
        )
        self.health = health_aio.HealthServicer()
        self._server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ]
        )
        servicer = CacheServicer(self.cache, self.policy, config.server, stats=self.telemetry.stats)
        self._server.add_generic_rpc_handlers((servicer.handler(wrap=self.telemetry.wrap),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = 0
        self.started_at = 0.0

    @property
    def address(self) -> str:
        host = self.config.server.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> int:
        self.port = self._server.add_insecure_port(self.config.server.listen)
        if self.port == 0:
            raise OSError(f"could not listen on {self.config.server.listen}")
        await self._server.start()
        self.started_at = time.monotonic()
        await self.telemetry.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(SERVICE_NAME, serving)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        if grace is None:
            grace = self.config.server.grace_seconds
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await self.telemetry.stop()
        await self.store.close()

    @property
    def metrics_address(self) -> str | None:
        """host:port of the Prometheus endpoint once started, or None without one."""
        metrics = self.telemetry.metrics
        return metrics.address if metrics is not None and metrics.port else None

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
