"""Tenants: every call runs in its caller's tenant's key space, within its quotas.

With ``[auth]`` on, the auth wrap has put the caller's principal (tenant, permissions,
key-prefix scopes) in a context variable before a call gets here. `TenantRouter` then
  - finds the tenant's `Space` (space.py: its own Redis prefix ``<prefix>:t:<tenant>``,
    L1, event stream, hub and counters), making it on the tenant's first call, at most
    `tenants.max_per_gateway` per process;
  - checks the request against the token's key-prefix scopes (scopes.py);
  - spends a token of the tenant's call rate, shared by every gateway (quotas.py);
  - hands the call to that space's servicer, as a gateway without tenants would.

Subscribe streams are also counted against the tenant's stream quota. A tenant's Stats
holds its own figures only (classes, L1, hot keys, its Redis keys' errors); the
gateway-wide ones (calls per RPC, admission, the process) are on /metrics, for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.admission import RETRY_AFTER
from cachegw_gateway.config import GatewayConfig, TenantConfig
from cachegw_gateway.l2 import RedisStore
from cachegw_gateway.policy import PolicyTable
from cachegw_gateway.quotas import RENEW_SECONDS, RateQuota, StreamQuota
from cachegw_gateway.ratelimit import RateLimiter
from cachegw_gateway.scopes import OutOfScope, check, narrow_subscribe
from cachegw_gateway.servicer import HandlerWrap, service_handler
from cachegw_gateway.space import Space
from cachegw_gateway.telemetry.latency import RpcLatency
from cachegw_gateway.telemetry.snapshot import Snapshot, Sources, stats_response
from cachegw_gateway.validation import BadMessage

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class Principal(Protocol):
    """What the router needs of an authenticated caller (auth.py's Principal)."""

    @property
    def name(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def prefixes(self) -> tuple[str, ...]: ...


def tenant_prefix(redis_prefix: str, tenant: str) -> str:
    """The Redis prefix of a tenant's keys. Tenant names are [a-z0-9_-], so no two
    tenants' prefixes nest, and none meets the keys of a gateway without tenants
    (``<prefix>:{key}``)."""
    return f"{redis_prefix}:t:{tenant}"


class ShuttingDown(RuntimeError):
    """No new tenant space while the gateway drains (UNAVAILABLE: call another)."""


@dataclass
class Tenant:
    name: str
    space: Space
    rate: RateQuota | None
    streams: StreamQuota | None


class TenantRouter:
    """The CacheService handlers of a gateway with tenants (see the module docstring)."""

    def __init__(
        self,
        config: GatewayConfig,
        redis_url: str,
        policy: PolicyTable,
        base: RedisStore,
        principal: Callable[[], Principal | None],
        *,
        ping_seconds: Callable[[], float] = lambda: 0.0,
        trace_exporter: str = "none",
        sample_ratio: float = 0.0,
        on_space: Callable[[Space], None] = lambda space: None,
    ) -> None:
        self._config = config
        self._redis_url = redis_url
        self._policy = policy
        self._base = base  # the gateway's own prefix: quotas live there
        self._limiter = RateLimiter(base)
        self._principal = principal
        self._own = {t.name: t for t in config.tenant}
        self._tenants: dict[str, Tenant] = {}
        self._starting: dict[str, asyncio.Task[Tenant]] = {}
        self._ping_seconds = ping_seconds
        self._trace_exporter = trace_exporter
        self._sample_ratio = sample_ratio
        self._on_space = on_space  # e.g. tracing of the space's Redis client
        t = config.tenants
        n = t.max_per_gateway
        self._l1 = dataclasses.replace(
            config.l1,
            max_bytes=t.l1_max_bytes or max(1 << 20, config.l1.max_bytes // n),
            max_entries=t.l1_max_entries or max(1000, config.l1.max_entries // n),
            stale_if_error_max_bytes=max(1 << 20, config.l1.stale_if_error_max_bytes // n),
        )
        self._renewer: asyncio.Task[None] | None = None
        self.draining = False
        # get, get_many, set, ...: the servicer's unary handlers, routed (service_handler
        # finds them by these names).
        for attr, method in _METHODS.items():
            setattr(self, attr, self._unary(method, attr))

    @property
    def tenants(self) -> dict[str, Tenant]:
        return self._tenants

    # -- spaces ---------------------------------------------------------------------------

    def _quotas(self, name: str) -> tuple[RateQuota | None, StreamQuota | None]:
        t = self._config.tenants
        own = self._own.get(name, TenantConfig(name))
        rate = (
            own.requests_per_second
            if own.requests_per_second is not None
            else t.requests_per_second
        )
        burst = own.burst if own.burst is not None else t.burst
        subs = own.max_subscribers if own.max_subscribers is not None else t.max_subscribers
        quota = RateQuota(self._limiter, f"tenant-rate:{name}", rate, burst) if rate else None
        key = f"{self._base.prefix}:tenant-streams:{name}"
        streams = StreamQuota(self._base, key, subs) if subs else None
        return quota, streams

    async def _start(self, name: str) -> Tenant:
        space = Space(
            self._config,
            self._redis_url,
            self._policy,
            tenant=name,
            prefix=tenant_prefix(self._config.redis.prefix, name),
            l1=self._l1,
        )
        space.servicer.stats_source = self._stats_source(space)
        self._on_space(space)
        try:
            await space.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await space.close(0)  # its Redis connections and background tasks
            raise
        rate, streams = self._quotas(name)
        tenant = Tenant(name, space, rate, streams)
        self._tenants[name] = tenant
        log.info(
            "tenant %s: key space ready", name, extra={"event": "tenant_ready", "tenant": name}
        )
        return tenant

    async def tenant(self, name: str) -> Tenant:
        """The tenant's state, its space started on first use (concurrent first calls
        wait for the same start). RuntimeError past tenants.max_per_gateway, ShuttingDown
        while the gateway drains."""
        found = self._tenants.get(name)
        if found is not None:
            return found
        task = self._starting.get(name)
        if task is None:
            if self.draining:
                raise ShuttingDown("the gateway is shutting down: call another gateway")
            if len(self._tenants) + len(self._starting) >= self._config.tenants.max_per_gateway:
                raise RuntimeError(
                    f"this gateway already holds {self._config.tenants.max_per_gateway} tenants "
                    "(tenants.max_per_gateway); nothing was done: retry on another gateway, or "
                    "raise the limit"
                )
            task = asyncio.ensure_future(self._start(name))
            self._starting[name] = task
            task.add_done_callback(lambda _: self._starting.pop(name, None))
        return await asyncio.shield(task)

    async def start(self) -> None:
        """The tenants named in the config get their space now (their write-behind
        journals are flushed, their hot keys warmed, before any call)."""
        for t in self._config.tenant:
            await self.tenant(t.name)
        self._renewer = asyncio.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            for t in list(self._tenants.values()):
                if t.streams is not None:
                    await t.streams.renew()

    def end_streams(self) -> None:
        self.draining = True
        for t in self._tenants.values():
            t.space.end_streams()

    async def close(self, grace: float) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for task in list(self._starting.values()):
            with contextlib.suppress(Exception):
                await task
        await asyncio.gather(*(t.space.close(grace) for t in self._tenants.values()))

    # -- figures --------------------------------------------------------------------------

    def _sources(self, space: Space) -> Sources:
        return Sources(
            gateway_id=self._config.server.gateway_id,
            stats=space.stats,
            l1=space.l1,
            reads=space.cache.reads,
            hotkeys=space.hotkeys,
            latency=RpcLatency(),  # calls per RPC are gateway-wide: on /metrics
            redis_ping_seconds=self._ping_seconds,
            trace_exporter=self._trace_exporter,
            sample_ratio=self._sample_ratio,
        )

    def _stats_source(self, space: Space) -> Callable[[pb.StatsRequest], pb.StatsResponse]:
        sources = self._sources(space)

        def answer(request: pb.StatsRequest) -> pb.StatsResponse:
            snap = dataclasses.replace(sources.snapshot(request.top_keys), process={}, pid=0)
            return stats_response(snap, list(request.classes))

        return answer

    def figures(self) -> dict[str, dict[str, int]]:
        """Per tenant, on this gateway: calls refused over its rate, Subscribe streams
        refused over its limit, its L1's entries and bytes (for /metrics)."""
        out: dict[str, dict[str, int]] = {}
        for name, t in self._tenants.items():
            l1 = t.space.l1.stats()
            out[name] = {
                "rate_refused": t.rate.refused if t.rate is not None else 0,
                "streams_refused": t.streams.refused if t.streams is not None else 0,
                "l1_entries": int(l1.get("entries", 0)),
                "l1_bytes": int(l1.get("bytes", 0)),
            }
        return out

    def snapshots(self) -> list[Snapshot]:
        """Every tenant space's figures (for the gateway-wide /metrics)."""
        return [self._sources(t.space).snapshot() for t in self._tenants.values()]

    # -- routing --------------------------------------------------------------------------

    async def _enter(self, method: str, request: Any, context: Context) -> Tenant:
        """The caller's tenant, after the scope and rate checks (aborts otherwise)."""
        principal = self._principal()
        if principal is None:  # the auth wrap lets no call through without one
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no credentials")
        tenant = self._tenants.get(principal.tenant)  # the hit path: no coroutine
        if tenant is None:
            try:
                tenant = await self.tenant(principal.tenant)
            except ShuttingDown as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except RuntimeError as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if principal.prefixes and not isinstance(request, BadMessage):
            try:
                check(method, request, principal.prefixes, principal.name)
            except OutOfScope as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        if tenant.rate is not None:
            wait_ms = 0 if tenant.rate.take_now() else await tenant.rate.take()
            if wait_ms:
                await _over_quota(
                    context,
                    wait_ms,
                    f"tenant {tenant.name} is over its call rate "
                    f"({tenant.rate.limit.rate / 1000:g}/s across every gateway, burst "
                    f"{tenant.rate.limit.burst})",
                )
        return tenant

    def _unary(self, method: str, attr: str) -> Callable[[Any, Context], Awaitable[Any]]:
        async def routed(request: Any, context: Context) -> Any:
            tenant = await self._enter(method, request, context)
            fn: Callable[[Any, Context], Awaitable[Any]] = getattr(tenant.space.servicer, attr)
            return await fn(request, context)

        routed.__name__ = attr
        return routed

    async def subscribe(
        self, request: pb.SubscribeRequest | BadMessage, context: Context
    ) -> AsyncIterator[pb.InvalidationEvent]:
        tenant = await self._enter("Subscribe", request, context)
        principal = self._principal()  # set: _enter aborted the call otherwise
        if principal is not None and principal.prefixes and not isinstance(request, BadMessage):
            try:
                request = narrow_subscribe(request, principal.prefixes, principal.name)
            except OutOfScope as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        member = ""
        if tenant.streams is not None and not isinstance(request, BadMessage):
            member = f"{tenant.space.origin}/{secrets.token_hex(6)}"
            if not await tenant.streams.open(member):
                await _over_quota(
                    context,
                    int(RENEW_SECONDS * 1000),
                    f"tenant {tenant.name} has {tenant.streams.limit} Subscribe streams open "
                    "across every gateway (its max_subscribers)",
                )
        try:
            async for event in tenant.space.servicer.subscribe(request, context):
                yield event
        finally:
            if member and tenant.streams is not None:
                await asyncio.shield(tenant.streams.close(member))

    def handler(self, wrap: HandlerWrap | None = None) -> grpc.GenericRpcHandler[Any, Any]:
        return service_handler(self, wrap)


_METHODS = {
    "get": "Get",
    "get_many": "GetMany",
    "set": "Set",
    "set_many": "SetMany",
    "delete": "Delete",
    "delete_many": "DeleteMany",
    "invalidate": "Invalidate",
    "warmup": "Warmup",
    "stats": "Stats",
    "allow": "Allow",
    "incr": "Incr",
    "touch": "Touch",
    "ttl": "Ttl",
    "release_lease": "ReleaseLease",
}


async def _over_quota(context: Context, wait_ms: int, why: str) -> NoReturn:
    context.set_trailing_metadata(((RETRY_AFTER, str(wait_ms)),))
    await context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{why}: nothing was done; retry after {wait_ms} ms (trailing metadata {RETRY_AFTER})",
    )
