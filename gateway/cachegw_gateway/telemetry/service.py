"""Telemetry of one gateway: latency per RPC, optional spans, /metrics, the Redis probe,
and the Stats answer. `GatewayServer` creates one and starts and stops it with itself.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, TypeAlias, cast

import grpc
from opentelemetry.trace import TracerProvider

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.config import GatewayConfig
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.origin import Origins
from cachegw_gateway.policy import PolicyTable
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.telemetry import tracing
from cachegw_gateway.telemetry.latency import RpcLatency
from cachegw_gateway.telemetry.metrics import MetricsServer
from cachegw_gateway.telemetry.redis_watch import RedisWatch
from cachegw_gateway.telemetry.snapshot import Snapshot, Sources, merge_snapshots, stats_response
from cachegw_native.coalescer import Coalescer
from cachegw_native.hotkeys import HotKeys
from cachegw_native.l1 import L1Cache

log = logging.getLogger("cachegw.telemetry")

MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class Telemetry:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        service: str,
        stats: GatewayStats,
        l1: L1Cache,
        reads: Coalescer[Any],
        hotkeys: HotKeys,
        store: RedisStore,
        policy: PolicyTable,
        tracer_provider: TracerProvider | None = None,
        origins: Origins | None = None,
        worker_index: int = 0,
        workers: int = 0,
        parts: Callable[[], list[Snapshot]] | None = None,
        tenants: Callable[[], dict[str, dict[str, int]]] | None = None,
    ) -> None:
        t = config.telemetry
        # With tenants: each tenant space's figures, added to this gateway's own.
        self._parts = parts
        self._tenants = tenants
        self.latency = RpcLatency()
        self.redis_watch = RedisWatch(store)
        self.tracer_provider = tracer_provider
        exporter = t.exporter if tracer_provider is not None else "none"
        if tracer_provider is not None and exporter == "none":
            exporter = "custom"  # a provider handed in by code (tests, benchmarks)
        self.sources = Sources(
            gateway_id=config.server.gateway_id,
            stats=stats,
            l1=l1,
            reads=reads,
            hotkeys=hotkeys,
            latency=self.latency,
            redis_ping_seconds=lambda: self.redis_watch.ping_seconds,
            trace_exporter=exporter,
            sample_ratio=t.sample_ratio if tracer_provider is not None else 0.0,
            origins=origins,
            worker_index=worker_index,
            workers=workers,
        )
        self._spans: tracing.ServerSpans | None = None
        if tracer_provider is not None:
            self._spans = tracing.ServerSpans(
                tracer_provider, service, lambda key: policy.classify(key).name, t.sample_ratio
            )
            tracing.instrument_redis(store.client, tracer_provider)
            tracing.enable()
        self.metrics = MetricsServer(t.metrics_listen, self.snapshot) if t.metrics_listen else None

    @property
    def tracing(self) -> bool:
        return self._spans is not None

    def snapshot(self, top_keys: int = 0) -> Snapshot:
        own = self.sources.snapshot(top_keys)
        if self._parts is not None:
            own = merge_snapshots(own, self._parts())
        if self._tenants is not None:
            own = dataclasses.replace(own, tenants=self._tenants())
        return own

    def stats(self, request: pb.StatsRequest) -> pb.StatsResponse:
        """The Stats answer; raises InvalidRequest for an unknown class."""
        return stats_response(self.snapshot(request.top_keys), list(request.classes))

    def wrap(self, method: str, handler: MethodHandler) -> MethodHandler:
        """`handler` with its latency recorded and, when tracing is on, inside a span."""
        if handler.unary_unary is not None:
            fn = cast(tracing.Handler, handler.unary_unary)
            if self._spans is not None:
                fn = self._spans.unary(method, fn)
            return grpc.unary_unary_rpc_method_handler(
                self.latency.timed(method, fn),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and self._spans is not None:
            # A stream's duration is how long a subscriber stayed: not a latency.
            return grpc.unary_stream_rpc_method_handler(
                self._spans.stream(method, cast(tracing.StreamHandler, handler.unary_stream)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def start(self) -> None:
        self.redis_watch.start()
        if self.metrics is not None:
            self.metrics.start()

    async def stop(self) -> None:
        if self.metrics is not None:
            await self.metrics.stop()
        await self.redis_watch.stop()
        if self._spans is not None:
            self._spans = None
            tracing.disable()
