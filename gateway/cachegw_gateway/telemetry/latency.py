"""Per-RPC latency histograms, recorded by a thin wrapper around each gRPC handler.

A call costs two `perf_counter()` reads, one `bisect` over ~20 floats and three integer
or float additions on objects the wrapper already holds (well under a microsecond; see
benchmarks/bench_tracing.py). Buckets are fixed so that Prometheus, the Stats RPC and
`cachegw top` share them, and a viewer can subtract two readings for a recent p99.
The time is the handler's: from the parsed request to the returned answer.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

# Upper bounds in seconds (a call of exactly a bound falls in that bucket, as Prometheus'
# `le`); an L1 hit takes tens of microseconds, a Redis read a few hundred.
BOUNDS: tuple[float, ...] = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

Handler = Callable[[Any, Any], Awaitable[Any]]
StreamHandler = Callable[[Any, Any], AsyncIterator[Any]]


class LatencyHistogram:
    """Calls of one RPC method: latency buckets (one more than BOUNDS), their sum, and
    failed calls by status code name. Single event loop; read at scrape time."""

    __slots__ = ("buckets", "errors", "total_seconds")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.total_seconds = 0.0
        self.errors: dict[str, int] = {}

    @property
    def calls(self) -> int:
        return sum(self.buckets)

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(BOUNDS, seconds)] += 1
        self.total_seconds += seconds

    def failed(self, code: grpc.StatusCode) -> None:
        self.errors[code.name] = self.errors.get(code.name, 0) + 1


def status_of(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> grpc.StatusCode:
    """The status a failed handler ends with: its abort's code, else what gRPC sends."""
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return code
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class RpcLatency:
    """One histogram per RPC method, and the handler wrapper that feeds them."""

    def __init__(self) -> None:
        self.methods: dict[str, LatencyHistogram] = {}

    def histogram(self, method: str) -> LatencyHistogram:
        hist = self.methods.get(method)
        if hist is None:
            hist = self.methods[method] = LatencyHistogram()
        return hist

    def timed(self, method: str, fn: Handler) -> Handler:
        """`fn` (a unary handler) that records its latency and outcome under `method`."""
        hist = self.histogram(method)
        buckets = hist.buckets
        clock = time.perf_counter

        async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            t0 = clock()
            try:
                return await fn(request, context)
            except BaseException as exc:  # an abort, a cancelled call, a bug: all failures
                hist.failed(status_of(context, exc))
                raise
            finally:
                dt = clock() - t0
                buckets[bisect_left(BOUNDS, dt)] += 1
                hist.total_seconds += dt

        return handler
