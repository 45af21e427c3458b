"""Trace context for the gateway: a CLIENT span per call, its W3C `traceparent` sent in
the call's metadata, so the gateway's spans join the caller's trace.

Installed on a channel only when OpenTelemetry's API is importable (``cachegw[tracing]``)
and the application has set a tracer provider before creating the client; otherwise the
channel is left as it is and calls pay nothing. This package never configures
OpenTelemetry: it uses the application's provider and propagators.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    # grpc-stubs makes these generic; at run time they are plain classes.
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.UnaryStreamClientInterceptor[Any, Any]
    _AioUnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _AioUnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.UnaryStreamClientInterceptor
    _AioUnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _AioUnaryStream = grpc.aio.UnaryStreamClientInterceptor

INSTRUMENTATION_NAME = "cachegw"


def _tracer() -> Tracer | None:
    """The application's tracer, or None when it has not set up OpenTelemetry."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):  # nothing configured (yet)
        return None
    return provider.get_tracer(INSTRUMENTATION_NAME)


# opentelemetry.trace once imported (False: not installed); `recording` runs per get().
_trace_api: Any = None


def recording() -> bool:
    """Whether the caller is inside a sampled span of the application's trace: then its
    call goes out on its own, so that the trace shows it (auto-batching would send it in
    another caller's GetMany, under that caller's trace)."""
    global _trace_api
    api = _trace_api
    if api is None:
        try:
            from opentelemetry import trace as api
        except ImportError:
            api = False
        _trace_api = api
    return bool(api) and bool(api.get_current_span().is_recording())


def intercept(channel: grpc.Channel) -> grpc.Channel:
    """`channel`, with the tracing interceptor when the application traces."""
    tracer = _tracer()
    return channel if tracer is None else grpc.intercept_channel(channel, _SyncSpans(tracer))


def aio_interceptors() -> Any:
    """The interceptors for a grpc.aio channel: the tracing ones, or an empty list.

    (Typed Any: grpc-stubs leaves grpc.aio's interceptor list type unusable.)
    """
    tracer = _tracer()
    return [] if tracer is None else [_AioUnarySpans(tracer), _AioStreamSpans(tracer)]


def _start(tracer: Tracer, details: Any) -> tuple[Span, list[tuple[str, Any]]]:
    """A CLIENT span for the call and its metadata with the span's context added."""
    from opentelemetry import propagate, trace

    method = details.method
    method = method.decode() if isinstance(method, bytes) else method  # bytes in grpc.aio
    metadata = details.metadata
    service, _, name = method.lstrip("/").partition("/")
    span = tracer.start_span(
        method.lstrip("/"),
        kind=trace.SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, [*(metadata or ()), *carrier.items()]


def _end(span: Span, code: grpc.StatusCode | None, details: str | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    code = code if code is not None else grpc.StatusCode.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}".rstrip(": ")))
    span.end()


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: Any) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _SyncSpans(_UnaryUnary, _UnaryStream):
    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def _call(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        span, metadata = _start(self._tracer, details)
        try:
            outcome = continuation(_SyncDetails(details, metadata), request)
        except BaseException:
            _end(span, grpc.StatusCode.UNKNOWN, None)
            raise
        outcome.add_done_callback(lambda call: _end(span, call.code(), call.details()))
        return outcome

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return self._call(continuation, client_call_details, request)


def _aio_details(details: grpc.aio.ClientCallDetails, metadata: Any) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


class _AioUnarySpans(_AioUnaryUnary):
    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        span, metadata = _start(self._tracer, client_call_details)
        try:
            call = await continuation(_aio_details(client_call_details, metadata), request)
            code = await call.code()  # the span ends with the call
            details = await call.details()
        except BaseException:  # cancelled while waiting
            _end(span, grpc.StatusCode.CANCELLED, None)
            raise
        _end(span, code, details)
        return call


class _AioStreamSpans(_AioUnaryStream):
    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer
        self._open: set[asyncio.Task[None]] = set()

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        span, metadata = _start(self._tracer, client_call_details)
        call = await continuation(_aio_details(client_call_details, metadata), request)

        async def finish() -> None:  # a stream's span ends when the stream does
            code = await call.code()
            _end(span, code, await call.details())

        task = asyncio.ensure_future(finish())
        self._open.add(task)
        task.add_done_callback(self._open.discard)
        return call
