"""Spans: one per RPC on the server, Redis commands as children, trace context from the
caller's gRPC metadata.

Nothing here runs when tracing is off: `GatewayServer` wraps handlers with `traced` and
instruments its Redis client only when it is given a tracer provider, and `annotate` is
a flag test. The provider is built from `[telemetry]` by the entry point (main.py), never
by the library, as OpenTelemetry asks of libraries.

The cache code describes a call with `annotate(tier="l2", coalesced=True, ...)`; the
names are in `names.py`. Each becomes a ``cachegw.*`` attribute of the current span
when that span is being recorded, and costs one global read when tracing is off.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from random import random
from typing import Any, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from cachegw_gateway.config import TelemetryConfig
from cachegw_gateway.telemetry import names
from cachegw_gateway.telemetry.latency import status_of

INSTRUMENTATION_NAME = "cachegw_gateway"

# How many gateways in this process trace; `annotate` does nothing while it is 0.
_tracing_gateways = 0
# Whether any does: hot paths test this flag before building annotate()'s arguments.
active = False


def annotate(**attrs: AttributeValue) -> None:
    """Set ``cachegw.<name>`` attributes on the current span, if one is being recorded."""
    if not active:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({names.ATTRIBUTE_PREFIX + k: v for k, v in attrs.items()})


def enable() -> None:
    global _tracing_gateways, active
    _tracing_gateways += 1
    active = True


def disable() -> None:
    global _tracing_gateways, active
    _tracing_gateways = max(0, _tracing_gateways - 1)
    active = _tracing_gateways > 0


# -- provider (entry point only) ---------------------------------------------------------


def build_provider(
    config: TelemetryConfig, gateway_id: str, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """The tracer provider `[telemetry]` asks for, or None when tracing is off.

    Spans are exported in batches from a background thread. Sampling follows the
    caller's decision when a trace context came with the call, else `sample_ratio`.
    `exporter` replaces the configured one (tests, benchmarks).
    """
    if exporter is None:
        if config.exporter == "none":
            return None
        exporter = _exporter(config)
    resource = Resource.create(
        {
            "service.name": config.service_name,
            "service.instance.id": gateway_id,
            "service.version": _version(),
        }
    )
    # Calls without a caller's context are sampled at `sample_ratio` by ServerSpans
    # before any span exists (cheaper than an unsampled SDK span); everything else
    # follows its parent.
    provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _version() -> str:
    try:
        return importlib.metadata.version("cachegw-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _exporter(config: TelemetryConfig) -> SpanExporter:
    if config.exporter == "console":
        return ConsoleSpanExporter(out=sys.stdout)
    # Imported here: the OTLP exporter pulls in its own protobuf modules.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    scheme, _, address = config.otlp_endpoint.partition("://")
    return OTLPSpanExporter(endpoint=address.rstrip("/"), insecure=scheme == "http")


# -- server spans ------------------------------------------------------------------------


class _MetadataGetter(Getter[Sequence[tuple[str, Any]]]):
    """Reads W3C trace context (and baggage) out of gRPC invocation metadata."""

    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


_METADATA = _MetadataGetter()

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Any]]
StreamHandler = Callable[[Any, Context], AsyncIterator[Any]]


class ServerSpans:
    """Wraps a gateway's handlers so each call runs in a SERVER span."""

    def __init__(
        self,
        provider: trace.TracerProvider,
        service: str,
        classify: Callable[[str], str],
        sample_ratio: float = 1.0,
    ) -> None:
        self._tracer = provider.get_tracer(INSTRUMENTATION_NAME)
        self._ratio = sample_ratio
        # The context of every call that starts a trace here and is not sampled: a span
        # that records nothing, so Redis spans under it are dropped too. Shared, since
        # nothing is ever exported or propagated from it.
        self._unsampled = trace.set_span_in_context(
            trace.NonRecordingSpan(
                trace.SpanContext(
                    trace_id=1, span_id=1, is_remote=False, trace_flags=trace.TraceFlags(0)
                )
            )
        )
        # Header names the configured propagators read (traceparent, tracestate, baggage).
        self._fields = frozenset(propagate.get_global_textmap().fields)
        self._service = service
        self._classify = classify

    def _start(self, method: str, request: Any, context: Context) -> trace.Span:
        carrier = cast(Sequence[tuple[str, Any]], context.invocation_metadata() or ())
        # Most calls carry no trace context: skip the propagators' parsing for them.
        fields = self._fields
        parent = (
            propagate.extract(carrier, getter=_METADATA)
            if any(k in fields for k, _ in carrier)
            else None
        )
        span = self._tracer.start_span(
            f"{self._service}/{method}", context=parent, kind=SpanKind.SERVER
        )
        if span.is_recording():
            span.set_attributes(
                {
                    names.RPC_SYSTEM: "grpc",
                    names.RPC_SERVICE: self._service,
                    names.RPC_METHOD: method,
                }
            )
            key = getattr(request, "key", None)
            if isinstance(key, str) and key:
                span.set_attribute(names.ATTRIBUTE_PREFIX + names.KEY_CLASS, self._classify(key))
            keys = getattr(request, "keys", None)
            if keys is not None:
                span.set_attribute(names.ATTRIBUTE_PREFIX + names.KEYS, len(keys))
        return span

    def unary(self, method: str, fn: Handler) -> Handler:
        fields, ratio, unsampled = self._fields, self._ratio, self._unsampled

        async def handler(request: Any, context: Context) -> Any:
            metadata = context.invocation_metadata() or ()
            if random() >= ratio and not any(k in fields for k, _ in metadata):
                token = otel_context.attach(unsampled)  # a root not picked: no span at all
                try:
                    return await fn(request, context)
                finally:
                    otel_context.detach(token)
            span = self._start(method, request, context)
            with trace.use_span(
                span, end_on_exit=True, record_exception=False, set_status_on_exception=False
            ):
                try:
                    result = await fn(request, context)
                except BaseException as exc:
                    _failed(span, context, exc)
                    raise
                span.set_attribute(names.RPC_GRPC_STATUS_CODE, 0)
                return result

        return handler

    def stream(self, method: str, fn: StreamHandler) -> StreamHandler:
        """A server stream's span covers the whole stream (every stream is traced). It is
        not made current: a generator resumes in its consumer's context, where attaching
        it would leak."""

        async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
            span = self._start(method, request, context)
            try:
                async for item in fn(request, context):
                    yield item
            except BaseException as exc:
                _failed(span, context, exc)
                raise
            else:
                span.set_attribute(names.RPC_GRPC_STATUS_CODE, 0)
            finally:
                span.end()

        return handler


def _failed(span: trace.Span, context: Context, exc: BaseException) -> None:
    if not span.is_recording():
        return
    code = status_of(context, exc)
    span.set_attribute(names.RPC_GRPC_STATUS_CODE, code.value[0])
    details = context.details() if code is not grpc.StatusCode.CANCELLED else None
    description = f"{code.name}: {details}" if details else code.name
    span.set_status(Status(StatusCode.ERROR, description))
    if code is grpc.StatusCode.UNKNOWN:  # not an abort: a bug worth its traceback
        span.record_exception(exc)


def instrument_redis(client: Any, provider: trace.TracerProvider) -> None:
    """Redis commands of `client` (and its pipelines) become CLIENT spans under the
    current one. Only this client is patched; nothing is when tracing is off."""
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor.instrument_client(client, tracer_provider=provider)
