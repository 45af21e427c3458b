"""The asyncio client: a grpc.aio channel, one awaited call per method, nothing else.

Every method takes `timeout` (ruff ASYNC109 is silenced for it): it is the gRPC deadline,
which the gateway sees and honours server-side, not a local `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio

from cachegw import _calls, _tracing
from cachegw._calls import DEFAULT, Call, Timeout
from cachegw.client import DEFAULT_TARGET
from cachegw.errors import CacheError, DeadlineExceeded, Unavailable, error_from_rpc
from cachegw.models import Entry, Event, InvalidateResult, SetResult, Status
from cachegw.near import NearCache
from cachegw.v1 import cache_pb2_grpc

log = logging.getLogger("cachegw")

Loader = Callable[[], bytes | str | Awaitable[bytes | str]]
"""A get_or_load loader: a plain function or a coroutine function."""

_GATEWAY_DOWN = (Unavailable, DeadlineExceeded)
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 2.0

__all__ = ["AsyncClient"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Out = TypeVar("_Out")


class AsyncClient:
    """An asyncio cachegw client over one grpc.aio channel; create it inside the event loop.

    `timeout` is the default deadline of every call in seconds (None = no deadline); each
    method's own `timeout` overrides it. Failures raise `cachegw.CacheError` subclasses.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 5.0,
        channel_options: Sequence[tuple[str, Any]] = (),
        near_cache: NearCache | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        # With the application's OpenTelemetry set up, calls carry its trace context.
        self._channel = grpc.aio.insecure_channel(
            target, options=list(channel_options), interceptors=_tracing.aio_interceptors()
        )
        self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)
        self.near_cache = near_cache
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stream_task: asyncio.Task[None] | None = None
        if near_cache is not None:
            self._stream_task = asyncio.get_running_loop().create_task(
                self._keep_near_cache(near_cache), name="cachegw-near-cache"
            )

    async def get(self, key: str, *, timeout: Timeout = DEFAULT) -> bytes | None:  # noqa: ASYNC109
        """The value of `key`, or None on a miss (from the near cache when it has it)."""
        near = self.near_cache
        if near is None:
            return await self._call(self._stub.Get, _calls.get(key), timeout)
        value = near.get(key)
        if value is not None:
            return value
        ticket = near.ticket()
        entry = await self._call(self._stub.Get, _calls.lookup(key, **_calls.PLAIN), timeout)
        near.fill(key, entry, ticket)
        return entry.value

    async def lookup(
        self,
        key: str,
        *,
        lease: bool = False,
        max_wait: float | None = None,
        allow_stale: bool = False,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> Entry:
        """Everything the gateway knows about `key`; with `lease`, a miss may grant a lease."""
        call = _calls.lookup(key, lease=lease, max_wait=max_wait, allow_stale=allow_stale)
        return await self._call(self._stub.Get, call, timeout)

    async def get_many(
        self,
        keys: Iterable[str],
        *,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> list[bytes | None]:
        """The values of `keys` in order, None for each miss."""
        near = self.near_cache
        if near is None:
            return await self._call(self._stub.GetMany, _calls.get_many(keys), timeout)
        wanted = list(keys)
        values, missing = near.get_many(wanted)
        if not missing:
            return values
        ticket = near.ticket()
        call = _calls.lookup_many(missing, allow_stale=False)
        entries: list[Entry] = await self._call(self._stub.GetMany, call, timeout)
        return near.fill_many(wanted, values, entries, ticket)

    async def lookup_many(
        self,
        keys: Iterable[str],
        *,
        allow_stale: bool = False,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> list[Entry]:
        """One `Entry` per key, in order."""
        call = _calls.lookup_many(keys, allow_stale=allow_stale)
        return await self._call(self._stub.GetMany, call, timeout)

    async def set(
        self,
        key: str,
        value: bytes | str,
        *,
        ttl: float | None = None,
        tags: Iterable[str] = (),
        lease_token: bytes = b"",
        if_version: int | None = None,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> SetResult:
        """Store `value` (a str is UTF-8 encoded) for `ttl` seconds (None = the class TTL)."""
        call = _calls.set_(
            key, value, ttl=ttl, tags=tags, lease_token=lease_token, if_version=if_version
        )
        if self.near_cache is not None:
            self.near_cache.forget([key])
        return await self._call(self._stub.Set, call, timeout)

    async def delete(self, *keys: str, timeout: Timeout = DEFAULT) -> int:  # noqa: ASYNC109
        """Remove `keys`; returns how many of them existed."""
        call = _calls.delete(keys)
        if self.near_cache is not None:
            self.near_cache.forget(keys)
        return await self._call(self._stub.Delete, call, timeout)

    async def invalidate(
        self,
        keys: Iterable[str] = (),
        *,
        prefixes: Iterable[str] = (),
        tags: Iterable[str] = (),
        classes: Iterable[str] = (),
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> InvalidateResult:
        """Remove keys by key, prefix, tag or class from every tier of every gateway."""
        call = _calls.invalidate(keys, prefixes, tags, classes)
        if self.near_cache is not None:
            self.near_cache.apply(_calls.event_of(call.request))
        return await self._call(self._stub.Invalidate, call, timeout)

    async def warmup(
        self,
        keys: Iterable[str] = (),
        *,
        entries: Iterable[tuple[str, bytes | str]] = (),
        hot_keys: bool = False,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> tuple[int, int, int]:
        """Load keys (and the recorded hot keys) into the gateway's L1, and store entries;
        returns (loaded, missing, stored)."""
        call = _calls.warmup(keys, entries, hot_keys)
        return await self._call(self._stub.Warmup, call, timeout)

    async def subscribe(
        self, *, prefixes: Iterable[str] = (), classes: Iterable[str] = (), since: str = ""
    ) -> AsyncGenerator[Event, None]:
        """Invalidation events as they happen (after `since`, an event id, when given).

        Runs until the caller stops iterating; a RESET means drop everything cached."""
        stream = self._stub.Subscribe(_calls.subscribe(prefixes, classes, since))
        try:
            async for event in stream:
                yield _calls.decode_event(event)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            stream.cancel()

    async def get_or_load(
        self,
        key: str,
        loader: Loader,
        *,
        ttl: float | None = None,
        tags: Iterable[str] = (),
        max_wait: float | None = None,
        allow_stale: bool = True,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> bytes:
        """The value of `key`; on a miss, `loader` runs in exactly one caller across all
        gateways (the lease holder) and the others get its value.

        A STALE value (within the class's stale window) is returned at once; when this
        caller was picked to refresh (early refresh or stale), `loader` runs in a
        background task. When the gateway cannot be reached, `loader` runs here and its
        value is returned (logged), so the service keeps working."""
        near = self.near_cache
        if near is not None:
            cached = near.get(key)
            if cached is not None:
                return cached
        tag_list = list(tags)
        call = _calls.lookup(key, lease=True, max_wait=max_wait, allow_stale=allow_stale)
        ticket = near.ticket() if near is not None else 0
        try:
            entry = await self._call(self._stub.Get, call, timeout)
        except _GATEWAY_DOWN as exc:
            log.warning("cachegw: %s; loading %r without the cache", exc, key)
            return await _load(loader)
        if entry.value is not None:
            if near is not None:
                near.fill(key, entry, ticket)
            if entry.refresh and entry.lease_token:
                task = asyncio.create_task(
                    self._refresh(key, loader, entry.lease_token, ttl, tag_list)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return entry.value
        if entry.status is Status.LEASED:
            return await self._fill(key, loader, entry.lease_token, ttl, tag_list)
        # MISS: the wait for another holder's value ran out. Load here and store nothing:
        # the holder's fill is the one the lease protects.
        return await _load(loader)

    async def _fill(
        self, key: str, loader: Loader, token: bytes, ttl: float | None, tags: list[str]
    ) -> bytes:
        try:
            value = await _load(loader)
        except BaseException:
            await self._release(key)
            raise
        try:
            await self.set(key, value, ttl=ttl, tags=tags, lease_token=token)
        except CacheError as exc:
            log.warning("cachegw: could not store %r after loading it: %s", key, exc)
        return value

    async def _release(self, key: str) -> None:
        # The loader failed: end the lease at once (a delete ends it), so that another
        # caller loads now instead of after the lease timeout. Nothing is stored anyway.
        try:
            await asyncio.shield(self.delete(key))
        except CacheError as exc:
            log.warning("cachegw: could not release the lease of %r: %s", key, exc)

    async def _refresh(
        self, key: str, loader: Loader, token: bytes, ttl: float | None, tags: list[str]
    ) -> None:
        try:
            await self._fill(key, loader, token, ttl, tags)
        except Exception:
            log.exception("cachegw: refreshing %r failed", key)

    async def _keep_near_cache(self, near: NearCache) -> None:
        """The near cache's stream: live while registered, dark (and empty) otherwise."""
        backoff = _BACKOFF_FIRST
        while not self._closed:
            stream = self._stub.Subscribe(_calls.subscribe((), (), ""))
            try:
                await stream.initial_metadata()  # sent once the gateway registered the stream
                near.go_live()
                backoff = _BACKOFF_FIRST
                async for event in stream:
                    near.apply(_calls.decode_event(event))
            except grpc.RpcError as exc:
                log.info("cachegw: near-cache stream dropped (%s); flushed", exc.code())
            finally:
                near.go_dark()
                stream.cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    async def close(self) -> None:
        self._closed = True
        if self._stream_task is not None:
            self._stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stream_task
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self.timeout!r})"

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
        call: Call[_Req, _Resp, _Out],
        timeout: Timeout,  # noqa: ASYNC109
    ) -> _Out:
        try:
            response = await method(call.request, timeout=_calls.deadline(self.timeout, timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return call.decode(response)


async def _load(loader: Loader) -> bytes:
    value = loader()
    if inspect.isawaitable(value):
        value = await value
    return _calls.loaded(value)
