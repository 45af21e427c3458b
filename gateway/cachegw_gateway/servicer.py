"""The gRPC face of the cache: validate, call one Cache method, map results and errors.

Handlers are registered by hand (not through the generated base class) so that Get and
GetMany can answer with pre-encoded bytes and every request is parsed leniently (a
malformed message becomes INVALID_ARGUMENT, not INTERNAL).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.cache import Cache
from cachegw_gateway.config import ServerConfig
from cachegw_gateway.l2 import L2Unavailable
from cachegw_gateway.policy import PolicyTable
from cachegw_gateway.telemetry import tracing
from cachegw_gateway.validation import (
    BadMessage,
    InvalidRequest,
    check_key,
    check_keys,
    check_ttl_ms,
    check_value,
    lenient_parser,
)

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CacheService"].full_name

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


async def _abort_unimplemented(context: Context, what: str, issue: str) -> NoReturn:
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{what} is not served by this gateway yet (it arrives with {issue})",
    )


StatsSource = Callable[[pb.StatsRequest], pb.StatsResponse]
HandlerWrap = Callable[[str, "grpc.RpcMethodHandler[Any, Any]"], "grpc.RpcMethodHandler[Any, Any]"]


class CacheServicer:
    def __init__(
        self,
        cache: Cache,
        policy: PolicyTable,
        limits: ServerConfig,
        *,
        stats: StatsSource | None = None,
    ) -> None:
        self._cache = cache
        self._policy = policy
        self._stats = stats
        self._max_key = limits.max_key_bytes
        self._max_batch = limits.max_batch_keys
        self._max_ttl_ms = int(limits.max_ttl_seconds * 1000)

    async def _guard(self, context: Context, work: Awaitable[T]) -> T:
        """Run `work` within the caller's deadline and map failures to status codes."""
        remaining = context.time_remaining()
        try:
            async with asyncio.timeout(remaining):
                return await work
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except L2Unavailable as exc:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"redis (L2) is unavailable, retry later: {exc}"
            )
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the call's deadline passed while waiting for redis",
            )

    @staticmethod
    async def _reject(context: Context, bad: BadMessage) -> NoReturn:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.reason)

    # -- reads (raw bytes out) -----------------------------------------------------

    async def get(self, request: pb.GetRequest | BadMessage, context: Context) -> bytes:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        key = request.key
        answer = self._cache.l1_answer(key) if key else None
        if answer is not None:
            tracing.annotate(tier="l1")
            return answer
        try:
            check_key(key, self._max_key)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.lease:
            await _abort_unimplemented(context, "Get with lease", "stampede protection")
        return await self._guard(context, self._cache.get(key))

    async def get_many(self, request: pb.GetManyRequest | BadMessage, context: Context) -> bytes:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        keys = list(request.keys)
        try:
            check_keys(keys, self._max_key, self._max_batch)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return await self._guard(context, self._cache.get_many(keys))

    # -- writes --------------------------------------------------------------------

    async def set(self, request: pb.SetRequest | BadMessage, context: Context) -> pb.SetResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        if request.lease_token:
            await _abort_unimplemented(context, "Set with lease_token", "stampede protection")
        if request.tags:
            await _abort_unimplemented(context, "Set with tags", "invalidation fan-out")
        try:
            check_key(request.key, self._max_key)
            kc = self._policy.classify(request.key)
            check_value(request.value, kc.max_value_bytes, kc.name)
            ttl_ms = request.ttl_ms if request.HasField("ttl_ms") else None
            if ttl_ms is not None:
                check_ttl_ms(ttl_ms, self._max_ttl_ms)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if_version = request.if_version if request.HasField("if_version") else None
        out = await self._guard(
            context, self._cache.set(request.key, request.value, kc, ttl_ms, if_version)
        )
        outcome = pb.SET_OUTCOME_STORED if out.stored else pb.SET_OUTCOME_VERSION_CONFLICT
        return pb.SetResponse(
            outcome=outcome, version=out.version, ttl_ms=out.ttl_ms, key_class=out.key_class
        )

    async def delete(
        self, request: pb.DeleteRequest | BadMessage, context: Context
    ) -> pb.DeleteResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        keys = list(request.keys)
        try:
            check_keys(keys, self._max_key, self._max_batch)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not keys:
            return pb.DeleteResponse(deleted=0)
        return pb.DeleteResponse(deleted=await self._guard(context, self._cache.delete(keys)))

    # -- later capabilities --------------------------------------------------------

    async def invalidate(self, request: object, context: Context) -> pb.InvalidateResponse:
        await _abort_unimplemented(context, "Invalidate", "invalidation fan-out")

    async def subscribe(
        self, request: object, context: Context
    ) -> AsyncIterator[pb.InvalidationEvent]:
        await _abort_unimplemented(context, "Subscribe", "invalidation fan-out")
        yield pb.InvalidationEvent()  # pragma: no cover - makes this an async generator

    async def warmup(self, request: object, context: Context) -> pb.WarmupResponse:
        await _abort_unimplemented(context, "Warmup", "the native-core and observability work")

    async def stats(
        self, request: pb.StatsRequest | BadMessage, context: Context
    ) -> pb.StatsResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        if self._stats is None:
            await _abort_unimplemented(context, "Stats", "observability")
        try:
            return self._stats(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    # -- registration --------------------------------------------------------------

    def handler(self, wrap: HandlerWrap | None = None) -> grpc.GenericRpcHandler[Any, Any]:
        """The service's handlers; `wrap(method, handler)` may decorate each (telemetry)."""

        def unary(
            fn: Callable[..., Awaitable[Any]], req: Any, resp: Any | None
        ) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=lenient_parser(req),  # type: ignore[arg-type]
                response_serializer=None if resp is None else resp.SerializeToString,
            )

        handlers = {
            # None: the handler already returns encoded bytes.
            "Get": unary(self.get, pb.GetRequest, None),
            "GetMany": unary(self.get_many, pb.GetManyRequest, None),
            "Set": unary(self.set, pb.SetRequest, pb.SetResponse),
            "Delete": unary(self.delete, pb.DeleteRequest, pb.DeleteResponse),
            "Invalidate": unary(self.invalidate, pb.InvalidateRequest, pb.InvalidateResponse),
            "Warmup": unary(self.warmup, pb.WarmupRequest, pb.WarmupResponse),
            "Stats": unary(self.stats, pb.StatsRequest, pb.StatsResponse),
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                self.subscribe,
                request_deserializer=lenient_parser(pb.SubscribeRequest),  # type: ignore[arg-type]
                response_serializer=pb.InvalidationEvent.SerializeToString,
            ),
        }
        if wrap is not None:
            handlers = {name: wrap(name, h) for name, h in handlers.items()}
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
