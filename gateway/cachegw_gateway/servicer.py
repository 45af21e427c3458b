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
from cachegw_gateway import events
from cachegw_gateway.cache import Cache, SetItem, WriteOutcome
from cachegw_gateway.config import ServerConfig
from cachegw_gateway.counters import CounterOverflow, NotACounter
from cachegw_gateway.events import StreamId
from cachegw_gateway.l2 import L2Unavailable
from cachegw_gateway.leases import LeaseToken
from cachegw_gateway.origin import OriginError
from cachegw_gateway.policy import KeyClass, PolicyTable
from cachegw_gateway.ratelimit import RateLimit, resolve, to_proto
from cachegw_gateway.redis_errors import FAILURES, L2OutOfMemory, classify
from cachegw_gateway.subscriptions import StreamEnded, SubscriberHub
from cachegw_gateway.telemetry import tracing
from cachegw_gateway.validation import (
    BadMessage,
    InvalidRequest,
    check_classes,
    check_key,
    check_keys,
    check_prefixes,
    check_tags,
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


_CONDITIONS = {
    pb.SET_CONDITION_ANY: "",
    pb.SET_CONDITION_IF_ABSENT: "absent",
    pb.SET_CONDITION_IF_PRESENT: "present",
}


def _set_response(out: WriteOutcome) -> pb.SetResponse:
    if out.stored:
        outcome = pb.SET_OUTCOME_STORED
    elif out.lease_invalid:
        outcome = pb.SET_OUTCOME_LEASE_INVALID
    elif out.condition_failed:
        outcome = pb.SET_OUTCOME_CONDITION_FAILED
    else:
        outcome = pb.SET_OUTCOME_VERSION_CONFLICT
    return pb.SetResponse(
        outcome=outcome, version=out.version, ttl_ms=out.ttl_ms, key_class=out.key_class
    )


# Origin versions stay below 2^53 (origin.proto), so that a JSON number holds them.
MAX_ORIGIN_VERSION = 2**53 - 1


def _check_origin_version(
    version: int, kc: KeyClass, if_version: int | None, condition: str, where: str
) -> None:
    """A Set's origin_version: in range, alone, and on a class the caller may version."""
    if not 1 <= version <= MAX_ORIGIN_VERSION:
        raise InvalidRequest(
            f"{where}origin_version must be 1 to 2^53-1 (got {version}): the version of the "
            "value in the source of truth"
        )
    if if_version is not None or condition:
        raise InvalidRequest(
            f"{where}origin_version cannot go with if_version or a condition: the origin's "
            "version orders the writes (a newer cached one stays)"
        )
    if kc.write_through or kc.write_behind:
        policy = "write-through" if kc.write_through else "write-behind"
        raise InvalidRequest(
            f"{where}origin_version: class {kc.name} is {policy}, its origin numbers the "
            "versions; Set without origin_version"
        )


def _status_of(err: L2Unavailable) -> grpc.StatusCode:
    """The status a Redis failure maps to (docs/errors.md)."""
    if isinstance(err, L2OutOfMemory):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.UNAVAILABLE


StatsSource = Callable[[pb.StatsRequest], pb.StatsResponse]
# Under a supervisor: every worker's summary (worker_status.py), for Stats answers.
WorkersSource = Callable[[], Awaitable[list[pb.WorkerSummary]]]
HandlerWrap = Callable[[str, "grpc.RpcMethodHandler[Any, Any]"], "grpc.RpcMethodHandler[Any, Any]"]


class CacheServicer:
    def __init__(
        self,
        cache: Cache,
        policy: PolicyTable,
        limits: ServerConfig,
        hub: SubscriberHub,
        *,
        stats: StatsSource | None = None,
        workers: WorkersSource | None = None,
    ) -> None:
        self._cache = cache
        self._policy = policy
        self._hub = hub
        # The Stats answer (the gateway's telemetry, or a tenant's own figures), and the
        # workers' summaries under a supervisor (gateway-wide: not in a tenant's Stats).
        self.stats_source = stats
        self.workers = workers
        self._max_key = limits.max_key_bytes
        self._max_batch = limits.max_batch_keys
        self._max_response = limits.max_response_bytes
        self._max_ttl_ms = int(limits.max_ttl_seconds * 1000)
        self._class_names = [kc.name for kc in policy.classes]

    async def _guard(self, context: Context, work: Awaitable[T]) -> T:
        """Run `work` within the caller's deadline and map failures to status codes
        (docs/errors.md); an L2Unavailable's message says what happened and what to do."""
        remaining = context.time_remaining()
        try:
            async with asyncio.timeout(remaining):
                return await work
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except L2Unavailable as exc:
            await context.abort(_status_of(exc), str(exc))
        except OriginError as exc:
            await context.abort(exc.code, str(exc))
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the call's deadline passed while waiting for redis or the key's origin (a "
                "write already sent may or may not have been applied; a read-through load "
                "goes on for the next caller)",
            )
        except FAILURES as exc:
            # A Redis failure that bypassed RedisStore (a bug there): still a status a
            # caller can act on, never UNKNOWN.
            log.warning("redis failure outside RedisStore: %r", exc)
            err = classify(exc)
            await context.abort(_status_of(err), str(err))

    @staticmethod
    async def _reject(context: Context, bad: BadMessage) -> NoReturn:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.reason)

    @staticmethod
    async def _invalid(context: Context, exc: InvalidRequest) -> NoReturn:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    # -- reads (raw bytes out) -----------------------------------------------------------

    async def get(self, request: pb.GetRequest | BadMessage, context: Context) -> bytes:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        key = request.key
        answer = self._cache.l1_answer(key) if key else None
        if answer is not None:
            if tracing.active:  # a flag test: no call, no kwargs dict on the hit path
                tracing.annotate(tier="l1")
            return answer
        try:
            check_key(key, self._max_key)
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        work = self._cache.fetch(
            key,
            lease=request.lease,
            max_wait_ms=request.max_wait_ms,
            allow_stale=request.allow_stale,
            time_remaining=context.time_remaining(),
        )
        return await self._guard(context, work)

    async def get_many(self, request: pb.GetManyRequest | BadMessage, context: Context) -> bytes:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        keys = list(request.keys)
        try:
            check_keys(keys, self._max_key, self._max_batch)
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        pieces, at = self._cache.l1_many(keys)
        if tracing.active:
            tracing.annotate(l1_hits=len(keys) - len(at))
        if not at:  # all from L1: no Redis, no coroutine, no timeout to arm
            return await self._sized(context, b"".join(pieces))
        work = self._cache.complete_many(
            keys,
            pieces,
            at,
            allow_stale=request.allow_stale,
            time_remaining=context.time_remaining(),
        )
        return await self._sized(context, await self._guard(context, work))

    async def _sized(self, context: Context, answer: bytes) -> bytes:
        """`answer`, unless it is larger than server.max_response_bytes (one caller asking
        for many large values must not make the gateway build and send hundreds of MB)."""
        if len(answer) > self._max_response:
            self._cache.stats.answers_too_large += 1
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the answer would be {len(answer)} bytes, over server.max_response_bytes "
                f"({self._max_response}): ask for fewer keys per GetMany",
            )
        return answer

    # -- writes --------------------------------------------------------------------------

    def _checked_write(
        self, key: str, value: bytes, ttl_ms: int | None, where: str = ""
    ) -> KeyClass:
        check_key(key, self._max_key, f"{where}key")
        kc = self._policy.classify(key)
        check_value(value, kc.max_value_bytes, kc.name)
        if ttl_ms is not None:
            check_ttl_ms(ttl_ms, self._max_ttl_ms, f"{where}ttl_ms")
        return kc

    @staticmethod
    def _not_behind(kc: KeyClass, where: str, rpc: str) -> None:
        """Batched writes do not go through the write-behind journal: refused on
        write-behind classes rather than skip it."""
        if kc.write_behind:
            raise InvalidRequest(
                f"{where}: class {kc.name} is write-behind, and {rpc} does not journal its "
                "writes; use Set for its keys"
            )

    def _set_item(self, request: pb.SetRequest, where: str = "") -> SetItem:
        """A Set request checked against every rule (InvalidRequest names the field)."""
        ttl_ms = request.ttl_ms if request.HasField("ttl_ms") else None
        tags = list(request.tags)
        kc = self._checked_write(request.key, request.value, ttl_ms, where)
        check_tags(tags, self._max_key, where)
        token: LeaseToken | None = None
        if request.lease_token:
            try:
                token = LeaseToken.parse(request.lease_token)
            except ValueError as exc:
                raise InvalidRequest(f"{where}{exc}") from None
        condition = _CONDITIONS.get(request.condition)
        if condition is None:
            raise InvalidRequest(f"{where}condition {request.condition} is not a SetCondition")
        if_version = request.if_version if request.HasField("if_version") else None
        if kc.write_through:
            if token is not None:
                raise InvalidRequest(
                    f"{where}lease_token: class {kc.name} is read-through, the gateway fills "
                    "it from its origin; Set without a lease_token to store through the origin"
                )
            if condition:
                raise InvalidRequest(
                    f"{where}condition: class {kc.name} is write-through; conditions are not "
                    "passed to its origin: use if_version (0 = only if absent)"
                )
        origin_version = request.origin_version if request.HasField("origin_version") else None
        if origin_version is not None:
            _check_origin_version(origin_version, kc, if_version, condition, where)
        if kc.write_behind and (token is not None or condition or if_version is not None):
            raise InvalidRequest(
                f"{where}: class {kc.name} is write-behind: a Set is journaled for its origin "
                "before the cache could check a lease_token, condition or if_version, so "
                "none is taken; Set without them (the last write wins, by write version)"
            )
        return SetItem(
            request.key,
            request.value,
            kc,
            ttl_ms,
            if_version,
            tags,
            token,
            condition,
            origin_version=origin_version,
        )

    async def set(self, request: pb.SetRequest | BadMessage, context: Context) -> pb.SetResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        try:
            item = self._set_item(request)
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        return _set_response(await self._guard(context, self._cache.set(item)))

    async def set_many(
        self, request: pb.SetManyRequest | BadMessage, context: Context
    ) -> pb.SetManyResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        try:
            if len(request.entries) > self._max_batch:
                raise InvalidRequest(
                    f"entries has {len(request.entries)} entries; at most {self._max_batch} "
                    "per call (split the batch)"
                )
            # Every entry is checked before any is written: bad input never half-applies.
            items = [self._set_item(e, f"entries[{i}].") for i, e in enumerate(request.entries)]
            for i, item in enumerate(items):
                self._not_behind(item.kc, f"entries[{i}].key", "SetMany")
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        if not items:
            return pb.SetManyResponse()
        outcomes = await self._guard(context, self._cache.set_many(items))
        results: list[pb.SetManyResult] = []
        for out in outcomes:
            if isinstance(out, L2Unavailable):
                code = _status_of(out)
                results.append(pb.SetManyResult(code=code.value[0], error=str(out)))
            elif isinstance(out, OriginError):  # a write-through entry (writethrough.py)
                results.append(pb.SetManyResult(code=out.code.value[0], error=str(out)))
            else:
                results.append(pb.SetManyResult(response=_set_response(out)))
        return pb.SetManyResponse(results=results)

    async def delete(
        self, request: pb.DeleteRequest | BadMessage, context: Context
    ) -> pb.DeleteResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        keys = list(request.keys)
        try:
            check_keys(keys, self._max_key, self._max_batch)
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        if not keys:
            return pb.DeleteResponse(deleted=0)
        return pb.DeleteResponse(deleted=await self._guard(context, self._cache.delete(keys)))

    async def delete_many(
        self, request: pb.DeleteManyRequest | BadMessage, context: Context
    ) -> pb.DeleteManyResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        keys = list(request.keys)
        try:
            check_keys(keys, self._max_key, self._max_batch)
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        if not keys:
            return pb.DeleteManyResponse()
        each, event_id = await self._guard(context, self._cache.delete_each(keys))
        return pb.DeleteManyResponse(deleted=each, event_id=event_id)

    async def release_lease(
        self, request: pb.ReleaseLeaseRequest | BadMessage, context: Context
    ) -> pb.ReleaseLeaseResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        try:
            check_key(request.key, self._max_key)
            try:
                token = LeaseToken.parse(request.lease_token)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        released = await self._guard(context, self._cache.release(request.key, token))
        return pb.ReleaseLeaseResponse(released=released)

    # -- invalidation --------------------------------------------------------------------

    async def invalidate(
        self, request: pb.InvalidateRequest | BadMessage, context: Context
    ) -> pb.InvalidateResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        keys, prefixes = list(request.keys), list(request.prefixes)
        tags, classes = list(request.tags), list(request.classes)
        try:
            if not (keys or prefixes or tags or classes):
                raise InvalidRequest("name at least one of keys, prefixes, tags or classes")
            check_keys(keys, self._max_key, self._max_batch)
            check_prefixes(prefixes, self._max_key, self._max_batch)
            if len(tags) > self._max_batch:
                raise InvalidRequest(f"tags has {len(tags)} entries; at most {self._max_batch}")
            for i, tag in enumerate(tags):
                check_key(tag, self._max_key, f"tags[{i}]")
            check_classes(classes, self._class_names)
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        removed, event_id = await self._guard(
            context, self._cache.invalidate(keys, prefixes, tags, classes)
        )
        return pb.InvalidateResponse(removed=removed, event_id=event_id)

    async def subscribe(
        self, request: pb.SubscribeRequest | BadMessage, context: Context
    ) -> AsyncIterator[pb.InvalidationEvent]:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        prefixes, classes = list(request.prefixes), list(request.classes)
        since: StreamId | None = None
        try:
            check_prefixes(prefixes, self._max_key, self._max_batch)
            check_classes(classes, self._class_names)
            if request.since:
                try:
                    since = events.parse_id(request.since)
                except ValueError as exc:
                    raise InvalidRequest(f"since: {exc}") from None
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        if self._hub.draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the gateway is shutting down: subscribe to another gateway",
            )
        wanted = events.EventFilter(prefixes, classes, lambda key: self._policy.classify(key).name)
        # Open the live queue first: whatever is published from now on is caught there,
        # and whatever the replay below also returned is skipped by id.
        queue = self._hub.open(wanted)
        try:
            # The stream is registered: a near cache may fill from this moment on. Every
            # event after `position` reaches it (a client resumes there: `since`).
            position = request.since or self._hub.last_id
            await context.send_initial_metadata(
                (("cachegw-subscribed", "1"), ("cachegw-position", position))
            )
            if not self._cache.fills_allowed:  # our own subscription is not live
                queue.push(events.reset(self._hub.origin))
            last = since
            if since is not None:
                replay = self._cache.events_after(since)
                while True:
                    event = await self._guard(context, anext(replay, None))
                    if event is None:
                        break
                    if event.id:
                        last = events.parse_id(event.id)
                    chosen = wanted.select(event)
                    if chosen is not None:
                        yield chosen
            while True:
                try:
                    event = await queue.get()
                except StreamEnded:
                    break
                if event.id and last is not None and events.parse_id(event.id) <= last:
                    continue
                yield event
        finally:
            self._hub.close(queue)
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            "the gateway is shutting down: subscribe again, with since = the last event id "
            "you applied (the cachegw clients resume by themselves)",
        )

    # -- warm-up ---------------------------------------------------------------------------

    async def warmup(
        self, request: pb.WarmupRequest | BadMessage, context: Context
    ) -> pb.WarmupResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        keys = list(request.keys)
        entries = list(request.entries)
        prefixes = list(request.prefixes)
        classes: list[KeyClass] = []
        try:
            check_keys(keys, self._max_key, self._max_batch)
            check_prefixes(prefixes, self._max_key, self._max_batch)
            if len(entries) > self._max_batch:
                raise InvalidRequest(
                    f"entries has {len(entries)} entries; at most {self._max_batch} per call"
                )
            # Every entry is checked before the first is stored: no half-applied warm-up.
            for i, e in enumerate(entries):
                ttl = e.ttl_ms if e.HasField("ttl_ms") else None
                classes.append(self._checked_write(e.key, e.value, ttl, f"entries[{i}]."))
                self._not_behind(classes[-1], f"entries[{i}].key", "Warmup")
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        remaining = context.time_remaining()
        work = self._cache.warmup(
            keys,
            list(zip(entries, classes, strict=True)),
            hot_keys=request.hot_keys,
            prefixes=prefixes,
            resume=request.resume,
            time_remaining=remaining,
        )
        return await self._guard(context, work)

    async def stats(
        self, request: pb.StatsRequest | BadMessage, context: Context
    ) -> pb.StatsResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        if self.stats_source is None:
            await _abort_unimplemented(context, "Stats", "observability")
        try:
            reply = self.stats_source(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.workers is not None:
            reply.worker_summaries.extend(await self.workers())
        return reply

    # -- counters, Touch, Ttl ------------------------------------------------------------

    def _checked_key_ttl(self, key: str, ttl_ms: int | None) -> KeyClass:
        check_key(key, self._max_key)
        if ttl_ms is not None:
            check_ttl_ms(ttl_ms, self._max_ttl_ms)
        return self._policy.classify(key)

    async def incr(self, request: pb.IncrRequest | BadMessage, context: Context) -> pb.IncrResponse:
        """Any int64 delta is accepted (INT64_MIN too: INCRBY takes it); a sum leaving
        int64 is OUT_OF_RANGE, a counter key holding no integer FAILED_PRECONDITION."""
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        ttl_ms = request.ttl_ms if request.HasField("ttl_ms") else None
        try:
            kc = self._checked_key_ttl(request.key, ttl_ms)
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        try:
            out = await self._guard(
                context, self._cache.incr(request.key, request.delta, kc, ttl_ms)
            )
        except CounterOverflow as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
        except NotACounter as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.IncrResponse(
            value=out.value, ttl_ms=out.ttl_ms, key_class=out.key_class, created=out.created
        )

    async def touch(
        self, request: pb.TouchRequest | BadMessage, context: Context
    ) -> pb.TouchResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        ttl_ms = request.ttl_ms if request.HasField("ttl_ms") else None
        try:
            kc = self._checked_key_ttl(request.key, ttl_ms)
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        out = await self._guard(context, self._cache.touch(request.key, kc, ttl_ms))
        return pb.TouchResponse(touched=out.touched, ttl_ms=out.ttl_ms, key_class=out.key_class)

    async def ttl(self, request: pb.TtlRequest | BadMessage, context: Context) -> pb.TtlResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        try:
            kc = self._checked_key_ttl(request.key, None)
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        out = await self._guard(context, self._cache.ttl(request.key, kc))
        return pb.TtlResponse(
            exists=out.exists,
            ttl_remaining_ms=out.ttl_remaining_ms,
            version=out.version,
            key_class=out.key_class,
        )

    async def allow(
        self, request: pb.AllowRequest | BadMessage, context: Context
    ) -> pb.AllowResponse:
        if isinstance(request, BadMessage):
            await self._reject(context, request)
        key = request.key
        limit: RateLimit
        try:
            check_key(key, self._max_key)
            kc = self._policy.classify(key)
            given = request.limit if request.HasField("limit") else None
            limit, cost = resolve(given, kc, request.cost)
        except InvalidRequest as exc:
            await self._invalid(context, exc)
        decision = await self._guard(context, self._cache.allow(key, limit, cost))
        return pb.AllowResponse(
            allowed=decision.allowed,
            remaining=decision.remaining,
            retry_after_ms=decision.retry_after_ms,
            reset_after_ms=decision.reset_after_ms,
            limit=to_proto(limit),
            key_class=kc.name,
        )

    # -- registration --------------------------------------------------------------

    def handler(self, wrap: HandlerWrap | None = None) -> grpc.GenericRpcHandler[Any, Any]:
        """The service's handlers; `wrap(method, handler)` may decorate each (telemetry)."""
        return service_handler(self, wrap)


def service_handler(
    target: Any, wrap: HandlerWrap | None = None
) -> grpc.GenericRpcHandler[Any, Any]:
    """CacheService's handlers calling `target`'s methods (a CacheServicer, or the
    tenant router with the same methods); `wrap(method, handler)` may decorate each."""

    def unary(name: str, req: Any, resp: Any | None) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            getattr(target, name),
            request_deserializer=lenient_parser(req),  # type: ignore[arg-type]
            response_serializer=None if resp is None else resp.SerializeToString,
        )

    handlers = {
        # None: the handler already returns encoded bytes.
        "Get": unary("get", pb.GetRequest, None),
        "GetMany": unary("get_many", pb.GetManyRequest, None),
        "Set": unary("set", pb.SetRequest, pb.SetResponse),
        "SetMany": unary("set_many", pb.SetManyRequest, pb.SetManyResponse),
        "DeleteMany": unary("delete_many", pb.DeleteManyRequest, pb.DeleteManyResponse),
        "Delete": unary("delete", pb.DeleteRequest, pb.DeleteResponse),
        "Invalidate": unary("invalidate", pb.InvalidateRequest, pb.InvalidateResponse),
        "Warmup": unary("warmup", pb.WarmupRequest, pb.WarmupResponse),
        "Stats": unary("stats", pb.StatsRequest, pb.StatsResponse),
        "Allow": unary("allow", pb.AllowRequest, pb.AllowResponse),
        "Incr": unary("incr", pb.IncrRequest, pb.IncrResponse),
        "Touch": unary("touch", pb.TouchRequest, pb.TouchResponse),
        "Ttl": unary("ttl", pb.TtlRequest, pb.TtlResponse),
        "ReleaseLease": unary("release_lease", pb.ReleaseLeaseRequest, pb.ReleaseLeaseResponse),
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            target.subscribe,
            request_deserializer=lenient_parser(pb.SubscribeRequest),  # type: ignore[arg-type]
            response_serializer=pb.InvalidationEvent.SerializeToString,
        ),
    }
    if wrap is not None:
        handlers = {name: wrap(name, h) for name, h in handlers.items()}
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
