"""Admission: what one gateway takes on at once, and what it refuses at once.

A gateway under more load than its event loop can serve would otherwise queue every
call: each waits behind the others, answers after its caller gave up, and the backlog
only grows. Admission refuses instead, cheaply and before any work:

- **concurrent unary calls** over `server.max_concurrent_rpcs`: RESOURCE_EXHAUSTED at
  once, with ``retry-after-ms`` in the trailing metadata (how long to back off). Never
  refused (but counted): a lease holder's fill (Set with a lease token) and ReleaseLease,
  which end the waits of the calls that fill the gateway (refusing them would keep it
  full until every waiter timed out), and Stats, which an operator needs most then;
- **a call whose deadline has already passed** when its handler starts (it waited in
  the server's queue): DEADLINE_EXCEEDED at once, no work done for nobody;
- **Subscribe streams** over `server.max_subscribers` in all or
  `server.max_subscribers_per_peer` from one client host: RESOURCE_EXHAUSTED.

Subscribe streams are not unary calls: they last as long as their subscriber and are
counted apart. Health checks and reflection are other services and never refused. The
sizes of GetMany answers and of subscriber queues are bounded where they are built
(servicer.py, subscriptions.py). Counts show in Stats (`admission`) and /metrics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc

from cachegw_gateway.config import ServerConfig
from cachegw_gateway.stats import GatewayStats

# Strings: grpc's stub types are generic for type checkers only.
MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Unary: TypeAlias = "Callable[[Any, Context], Awaitable[Any]]"
Stream: TypeAlias = "Callable[[Any, Context], AsyncIterator[Any]]"

RETRY_AFTER = "retry-after-ms"
# The back-off suggested to a refused caller: long enough for the calls in flight to
# end (a few milliseconds each when Redis answers), short enough not to idle the gateway.
RETRY_AFTER_MS = 100


def _always(request: Any) -> bool:
    return True


# Methods whose calls are admitted even when the gateway is full (see the docstring).
EXEMPT: dict[str, Callable[[Any], bool]] = {
    "Set": lambda request: bool(getattr(request, "lease_token", b"")),
    "ReleaseLease": _always,
    "Stats": _always,
}


def peer_host(peer: str) -> str:
    """The client host of a gRPC peer string ("ipv4:127.0.0.1:5123" -> "127.0.0.1",
    "ipv6:[::1]:5123" -> "::1"): streams are limited per host, not per connection."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer  # unix sockets and the like: the whole string


class Admission:
    """Wraps each method's handler (single-threaded: the gateway's event loop)."""

    def __init__(self, config: ServerConfig, stats: GatewayStats) -> None:
        self._max_rpcs = config.max_concurrent_rpcs
        self._max_streams = config.max_subscribers
        self._max_per_peer = config.max_subscribers_per_peer
        self._stats = stats
        self.in_flight = 0
        self._streams = 0
        self._per_peer: dict[str, int] = {}

    def wrap(self, method: str, handler: MethodHandler) -> MethodHandler:
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(cast(Unary, handler.unary_unary), EXEMPT.get(method)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(cast(Stream, handler.unary_stream)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, fn: Unary, exempt: Callable[[Any], bool] | None = None) -> Unary:
        stats = self._stats

        async def admitted(request: Any, context: Context) -> Any:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                stats.rpcs_expired_on_arrival += 1
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the call's deadline passed while it waited to be served (the gateway "
                    "is overloaded): nothing was done",
                )
            if self.in_flight >= self._max_rpcs and not (exempt is not None and exempt(request)):
                stats.rpcs_shed += 1
                context.set_trailing_metadata(((RETRY_AFTER, str(RETRY_AFTER_MS)),))
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the gateway is overloaded: {self.in_flight} calls in flight, "
                    f"server.max_concurrent_rpcs is {self._max_rpcs}; nothing was done, "
                    f"retry after {RETRY_AFTER_MS} ms (trailing metadata {RETRY_AFTER}) "
                    "or on another gateway",
                )
            self.in_flight += 1
            stats.rpcs_in_flight = self.in_flight
            try:
                return await fn(request, context)
            finally:
                self.in_flight -= 1
                stats.rpcs_in_flight = self.in_flight

        return admitted

    def _stream(self, fn: Stream) -> Stream:
        stats = self._stats

        async def admitted(request: Any, context: Context) -> AsyncIterator[Any]:
            host = peer_host(context.peer())
            mine = self._per_peer.get(host, 0)
            refusal = ""
            if self._streams >= self._max_streams:
                refusal = (
                    f"{self._streams} Subscribe streams are open on this gateway, "
                    f"server.max_subscribers is {self._max_streams}: subscribe to another "
                    "gateway or retry later"
                )
            elif mine >= self._max_per_peer:
                refusal = (
                    f"{host} has {mine} Subscribe streams open on this gateway, "
                    f"server.max_subscribers_per_peer is {self._max_per_peer}: share one "
                    "stream per process (a stream takes prefixes and classes)"
                )
            if refusal:
                stats.subscribers_refused += 1
                context.set_trailing_metadata(((RETRY_AFTER, str(RETRY_AFTER_MS * 10)),))
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            self._streams += 1
            self._per_peer[host] = mine + 1
            try:
                async for message in fn(request, context):
                    yield message
            finally:
                self._streams -= 1
                left = self._per_peer[host] - 1
                if left:
                    self._per_peer[host] = left
                else:
                    del self._per_peer[host]

        return admitted
