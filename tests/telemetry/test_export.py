"""Spans leave the gateway through the configured exporter: OTLP/gRPC to a collector."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayProcess


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on loopback: what a collector receives, recorded."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, bytes]] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            for scope in resource_spans.scope_spans:
                self.spans += [(span.name, span.trace_id) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


def test_serve_with_otlp_exporter_sends_spans_to_the_collector(
    gateway_process: Callable[..., GatewayProcess], redis_server: ManagedRedis
) -> None:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        gw = gateway_process(
            "--redis-url", redis_server.url,
            "--trace-exporter", "otlp",
            "--otlp-endpoint", f"http://127.0.0.1:{port}",
        )  # fmt: skip
        traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        with grpc.insecure_channel(gw.address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            stub.Get(pb.GetRequest(key="k"), timeout=5, metadata=(("traceparent", traceparent),))
        assert gw.stop() == 0  # stopping flushes the batched spans to the collector
    finally:
        server.stop(0)
    # The Get's span and its Redis read arrive under the caller's trace (other traces,
    # e.g. the gateway's own Redis probes, may arrive too).
    ours = {name for name, trace_id in collector.spans if trace_id.hex() == traceparent[3:35]}
    assert {"cachegw.v1.CacheService/Get", "GET PTTL GET"} <= ours, collector.spans
