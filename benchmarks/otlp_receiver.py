"""A loopback OTLP/gRPC trace receiver for benchmarks/bench_tracing.py.

What a collector does first, and nothing more: accept ExportTraceServiceRequest calls
(the OTLP exporter's batches), parse them, count the spans per `service.instance.id`
(the gateway id) and answer OK. Standard gRPC health is served so harnesses can wait
for it. On SIGTERM or SIGINT it prints one line per sender and exits:

    received <instance id> <spans> <export calls>

    .venv/bin/python benchmarks/otlp_receiver.py --listen 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent import futures
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            instance = "?"
            for attr in resource_spans.resource.attributes:
                if attr.key == "service.instance.id":
                    instance = attr.value.string_value
            n = sum(len(scope.spans) for scope in resource_spans.scope_spans)
            with self._lock:
                self.spans[instance] += n
                self.calls[instance] += 1
        return trace_service_pb2.ExportTraceServiceResponse()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--listen", required=True, help="host:port (loopback only)")
    a = p.parse_args(argv)
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(a.listen) == 0:
        print(f"otlp_receiver: cannot listen on {a.listen}", file=sys.stderr)
        return 1
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"otlp_receiver: serving on {a.listen}", flush=True)
    while not stopping.wait(0.5):
        pass
    server.stop(1).wait()
    with receiver._lock:
        for instance, spans in sorted(receiver.spans.items()):
            print(f"received {instance} {spans} {receiver.calls[instance]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
