"""Gateways with telemetry on, over real gRPC and a real redis-server.

`traced` starts a gateway whose tracer provider is the one `[telemetry]` builds
(`tracing.build_provider`), with an in-memory exporter instead of OTLP, so the sampler
and batching the gateway really uses are under test. Everything started is stopped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.server import GatewayServer
from cachegw_gateway.telemetry import tracing
from tests.conftest import make_config

GET = "cachegw.v1.CacheService/Get"


@dataclass
class TracedGateway:
    server: GatewayServer
    stub: cache_pb2_grpc.CacheServiceAsyncStub
    provider: TracerProvider | None
    exporter: InMemorySpanExporter

    def spans(self) -> list[ReadableSpan]:
        """Every span finished so far (flushes the batch processor first)."""
        if self.provider is not None:
            self.provider.force_flush()
        return list(self.exporter.get_finished_spans())

    def server_spans(self, name: str = GET) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name]

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        pid = parent.context.span_id
        return [s for s in self.spans() if s.parent is not None and s.parent.span_id == pid]

    def clear(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()
        self.exporter.clear()


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


TracedFactory = Callable[..., Any]


@pytest.fixture
async def traced_factory(
    tmp_path: Path, redis_server: ManagedRedis
) -> AsyncIterator[TracedFactory]:
    """start(toml="", tracing=True, **overrides) -> TracedGateway."""
    started: list[tuple[TracedGateway, grpc.aio.Channel]] = []

    async def start(toml: str = "", tracing_on: bool = True, **overrides: Any) -> TracedGateway:
        folder = tmp_path / f"gw{len(started)}"
        folder.mkdir()
        overrides.setdefault("telemetry__exporter", "console")  # replaced by the exporter
        config = make_config(folder, redis_server.url, toml, **overrides)
        exporter = InMemorySpanExporter()
        provider = (
            tracing.build_provider(config.telemetry, config.server.gateway_id, exporter)
            if tracing_on
            else None
        )
        server = GatewayServer(config, redis_server.url, tracer_provider=provider)
        await server.start()
        channel = grpc.aio.insecure_channel(server.address)
        gw = TracedGateway(server, cache_pb2_grpc.CacheServiceStub(channel), provider, exporter)
        started.append((gw, channel))
        return gw

    yield start
    for gw, channel in started:
        await channel.close(None)
        await gw.server.stop(grace=0)
        if gw.provider is not None:
            gw.provider.shutdown()
