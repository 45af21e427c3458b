"""A gateway for benchmarks/bench_tracing.py: `cachegw serve` with tracing set up in code.

Spans go through the same provider, sampler and batch processor `[telemetry]` builds.
By default the exporter drops them (counting them), so a run measures what tracing costs
the gateway, not a collector or a console; with `--otlp-endpoint` they go to that
OTLP/gRPC receiver through the configured OTLP exporter, as with `--trace-exporter
otlp`. SIGTERM stops it; the dropped-span count is printed last.

    .venv/bin/python benchmarks/traced_gateway.py --listen 127.0.0.1:PORT \\
        --redis-url redis://127.0.0.1:6379/0 [--config FILE] [--sample-ratio 0.01 | --off]
        [--otlp-endpoint http://127.0.0.1:4317] [--gateway-id NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from cachegw_gateway.config import load_config
from cachegw_gateway.main import serve
from cachegw_gateway.telemetry import logs, tracing


class DiscardExporter(SpanExporter):
    """Counts spans and drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listen", required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--config")
    p.add_argument("--redis-prefix", default="cg")
    p.add_argument("--sample-ratio", type=float, default=1.0)
    p.add_argument("--off", action="store_true", help="no tracer provider: tracing off")
    p.add_argument("--otlp-endpoint", help="export to this OTLP/gRPC receiver, e.g. http://...")
    p.add_argument("--gateway-id", help="service.instance.id of the spans")
    a = p.parse_args(argv)
    overrides: dict[str, object] = {
        "server.listen": a.listen,
        "redis.url": a.redis_url,
        "redis.prefix": a.redis_prefix,
        "telemetry.sample_ratio": a.sample_ratio,
    }
    if a.otlp_endpoint:
        overrides["telemetry.exporter"] = "otlp"
        overrides["telemetry.otlp_endpoint"] = a.otlp_endpoint
    if a.gateway_id:
        overrides["server.gateway_id"] = a.gateway_id
    config = load_config(a.config, env={}, overrides=overrides)
    logs.setup("WARNING", "text")
    exporter = DiscardExporter()
    provider = (
        None
        if a.off
        else tracing.build_provider(
            config.telemetry,
            config.server.gateway_id,
            None if a.otlp_endpoint else exporter,  # None: the configured OTLP exporter
        )
    )
    try:
        return asyncio.run(serve(config, a.redis_url, provider))
    finally:
        if provider is not None:
            provider.shutdown()
        print(f"spans exported: {exporter.spans}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
