"""The asyncio client: a grpc.aio channel, one awaited call per method. `get_or_load`
and the near cache's stream are driven here, as tasks, from their one implementation in
`cachegw._protocol`.

Every method takes `timeout` (ruff ASYNC109 is silenced for it): it is the gRPC deadline,
which the gateway sees and honours server-side, not a local `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio

from cachegw import _batcher, _calls, _channel, _protocol, _security, _tracing
from cachegw._calls import DEFAULT, Call, Timeout
from cachegw._protocol import Load, NearCacheKeeper, Rpc, Step, Steps
from cachegw._security import TLSConfig, TokenSource
from cachegw.client import DEFAULT_TARGET
from cachegw.errors import CacheError, error_from_rpc
from cachegw.models import (
    AllowResult,
    Entry,
    Event,
    InvalidateResult,
    RebuildProgress,
    SetResult,
)
from cachegw.near import NearCache
from cachegw.v1 import cache_pb2_grpc

Loader = Callable[[], bytes | str | Awaitable[bytes | str]]
"""A get_or_load loader: a plain function or a coroutine function."""

__all__ = ["AsyncClient"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Out = TypeVar("_Out")
_T = TypeVar("_T")


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
        retries: bool = True,
        tls: TLSConfig | bool | None = None,
        token: TokenSource = None,
        batch_gets: bool = True,
    ) -> None:
        self.target = target
        self.timeout = timeout
        # Retries of idempotent calls and keepalive (see _channel.py); `channel_options`
        # override them. With the application's OpenTelemetry set up, calls carry its
        # trace context.
        # TLS when `tls` is given (True: the system's trusted CAs); the token in the
        # metadata of every call (see _security.py).
        self.tls = _security.resolve_tls(tls)
        self._bearer = _security.bearer(token, target=target, secure=self.tls is not None)
        self._channel = _security.aio_channel(
            target,
            self.tls,
            _channel.channel_options(channel_options, retries=retries),
            _tracing.aio_interceptors(),
        )
        self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)
        self.near_cache = near_cache
        # `get()`s of one event-loop tick share one GetMany (see _batcher.py).
        self._batcher = (
            _batcher.GetBatcher(self._fetch_batch, self._fetch_one) if batch_gets else None
        )
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stream_task: asyncio.Task[None] | None = None
        if near_cache is not None:
            self._stream_task = asyncio.get_running_loop().create_task(
                self._keep_near_cache(NearCacheKeeper(near_cache)), name="cachegw-near-cache"
            )

    async def get(self, key: str, *, timeout: Timeout = DEFAULT) -> bytes | None:  # noqa: ASYNC109
        """The value of `key`, or None on a miss (from the near cache when it has it).

        Concurrent `get()`s are sent together as one GetMany unless the client was made
        with ``batch_gets=False`` (see _batcher.py); a `get()` inside a sampled span of
        the application's trace goes out on its own, so that its trace shows it."""
        near = self.near_cache
        if near is not None:
            value = near.get(key)
            if value is not None:
                return value
        if self._batcher is not None and not _tracing.recording():
            _calls.get(key)  # a bad key fails its own caller here, not the batch
            return await self._batcher.get(key, _calls.deadline(self.timeout, timeout))
        return await self._fetch_one(key, _calls.deadline(self.timeout, timeout))

    async def _fetch_one(self, key: str, timeout: float | None) -> bytes | None:  # noqa: ASYNC109
        near = self.near_cache
        if near is None:
            return await self._call(self._stub.Get, _calls.get(key), timeout)
        ticket = near.ticket()
        entry = await self._call(self._stub.Get, _calls.lookup(key, **_calls.PLAIN), timeout)
        near.fill(key, entry, ticket)
        return entry.value

    async def _fetch_batch(self, keys: list[str], timeout: float | None) -> list[bytes | None]:  # noqa: ASYNC109
        near = self.near_cache
        if near is None:
            return await self._call(self._stub.GetMany, _calls.get_many(keys), timeout)
        ticket = near.ticket()
        call = _calls.lookup_many(keys, allow_stale=False)
        entries: list[Entry] = await self._call(self._stub.GetMany, call, timeout)
        return near.fill_many(keys, [None] * len(keys), entries, ticket)

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
        if_absent: bool = False,
        if_present: bool = False,
        origin_version: int | None = None,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> SetResult:
        """Store `value` (a str is UTF-8 encoded) for `ttl` seconds (None = the class TTL);
        with `if_absent` only when no value is stored, with `if_present` only when one is
        (else the outcome is CONDITION_FAILED and nothing is written). With
        `origin_version`, `value` is the source of truth's state at that version: stored
        unless a newer one is cached (the outcome is then VERSION_CONFLICT), so putting a
        committed row in the cache can never leave it older than the database."""
        call = _calls.set_(
            key,
            value,
            ttl=ttl,
            tags=tags,
            lease_token=lease_token,
            if_version=if_version,
            if_absent=if_absent,
            if_present=if_present,
            origin_version=origin_version,
        )
        if self.near_cache is not None:
            self.near_cache.forget([key])
        return await self._call(self._stub.Set, call, timeout)

    async def set_many(
        self,
        entries: Iterable[_calls.SetManyEntry],
        *,
        tags: Iterable[str] = (),
        if_absent: bool = False,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> list[SetResult | CacheError]:
        """Store many values in one call (one Redis round trip): `entries` of (key, value)
        or (key, value, ttl seconds). Per entry, in order, its `SetResult`, or the
        `CacheError` of that entry alone (e.g. `ResourceExhausted` when Redis ran out of
        memory part-way). Bad input in any entry refuses the whole call before Redis."""
        call = _calls.set_many(entries, tags=tags, if_absent=if_absent)
        if self.near_cache is not None:
            self.near_cache.forget([e.key for e in call.request.entries])
        return await self._call(self._stub.SetMany, call, timeout)

    async def delete_many(self, keys: Iterable[str], *, timeout: Timeout = DEFAULT) -> list[bool]:  # noqa: ASYNC109
        """Remove `keys` in one call; per key, in order, whether a value existed."""
        call = _calls.delete_many(keys)
        if self.near_cache is not None:
            self.near_cache.forget(list(call.request.keys))
        return await self._call(self._stub.DeleteMany, call, timeout)

    async def release_lease(
        self,
        key: str,
        lease_token: bytes,
        *,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> bool:
        """End the lease `lease_token` (of a LEASED or refresh lookup) without storing:
        the gateway removes it only while that token holds it, never the stored value,
        and wakes its waiters. False when it no longer held it (nothing changed)."""
        call = _calls.release_lease(key, lease_token)
        return await self._call(self._stub.ReleaseLease, call, timeout)

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

    async def incr(
        self,
        key: str,
        delta: int = 1,
        *,
        ttl: float | None = None,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> int:
        """Add `delta` to the counter `key` atomically and return the new value (see
        `Client.incr`)."""
        return await self._call(self._stub.Incr, _calls.incr(key, delta, ttl), timeout)

    async def touch(
        self,
        key: str,
        *,
        ttl: float | None = None,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> bool:
        """A new TTL for the value and counter of `key`; False when neither exists."""
        return await self._call(self._stub.Touch, _calls.touch(key, ttl), timeout)

    async def allow(
        self,
        key: str,
        *,
        rate: int | None = None,
        period: float | None = None,
        burst: int | None = None,
        cost: int = 1,
        algorithm: str | None = None,
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> AllowResult:
        """May a request of `cost` on `key` go ahead? See `Client.allow`."""
        call = _calls.allow(
            key, rate=rate, period=period, burst=burst, cost=cost, algorithm=algorithm
        )
        return await self._call(self._stub.Allow, call, timeout)

    async def ttl(self, key: str, *, timeout: Timeout = DEFAULT) -> float | None:  # noqa: ASYNC109
        """Seconds of fresh time left for the value of `key`; None when there is none."""
        return await self._call(self._stub.Ttl, _calls.ttl_left(key), timeout)

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

    async def rebuild(
        self,
        keys: Iterable[str] = (),
        *,
        prefixes: Iterable[str] = (),
        hot_keys: bool = False,
        resume: str = "",
        timeout: Timeout = DEFAULT,  # noqa: ASYNC109
    ) -> RebuildProgress:
        """Rebuild from the origins (Warmup): load what Redis lacks of `keys`, of the keys
        the origins list under `prefixes` and (with `hot_keys`) of the recorded hot set,
        in batches at the origin's warm rate. One call goes as far as its deadline
        allows: while the answer is not `done`, call again with its `resume` (loading is
        idempotent)."""
        call = _calls.rebuild(keys, prefixes, hot_keys, resume)
        return await self._call(self._stub.Warmup, call, timeout)

    async def subscribe(
        self,
        *,
        prefixes: Iterable[str] = (),
        classes: Iterable[str] = (),
        since: str = "",
        resume: bool = True,
    ) -> AsyncGenerator[Event, None]:
        """Invalidation events as they happen (after `since`, an event id, when given).

        Runs until the caller stops iterating; a RESET means drop everything cached. With
        `resume`, a stream the gateway ends or loses (UNAVAILABLE) is opened again by
        itself, with backoff, from the last event delivered: nothing is missed (see
        _channel.py); without, that raises `Unavailable`."""
        request_prefixes, request_classes = list(prefixes), list(classes)
        state = _channel.Resumption(since, resume=resume)
        while True:
            stream = self._stub.Subscribe(
                _calls.subscribe(request_prefixes, request_classes, state.position),
                metadata=self._metadata(),  # per stream: a rotated token is picked up
            )
            error: grpc.RpcError | None = None
            try:
                reset = state.opened(await stream.initial_metadata())
                if reset is not None:
                    yield reset
                async for message in stream:
                    event = _calls.decode_event(message)
                    state.delivered(event)
                    yield event
            except grpc.RpcError as exc:
                error = exc
            finally:
                stream.cancel()
            if self._closed or not state.should_resume(error):
                if error is not None:
                    raise error_from_rpc(error) from error
                return
            await asyncio.sleep(state.pause())

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

        A STALE value (within the class's stale window, or while Redis fails the last
        copy of a class with stale_if_error_seconds) is returned at once; when this
        caller was picked to refresh (early refresh or stale), `loader` runs in a
        background task. When the gateway cannot be reached, `loader` runs here and its
        value is returned (logged), so the service keeps working."""
        return await self._drive(
            _protocol.get_or_load(
                self.near_cache,
                key,
                loader,
                ttl=ttl,
                tags=tags,
                max_wait=max_wait,
                allow_stale=allow_stale,
                timeout=timeout,
            )
        )

    async def _drive(self, steps: Steps[_T]) -> _T:
        """Run a protocol in this task: await each step, send back its result, or throw its
        exception in (the protocol decides what a failure or a cancellation means)."""
        send: Callable[[Any], Step] = steps.send
        reply: Any = None
        while True:
            try:
                step = send(reply)
            except StopIteration as done:
                result: _T = done.value
                return result
            try:
                reply, send = await self._do(step), steps.send
            except BaseException as exc:
                reply, send = exc, steps.throw

    async def _do(self, step: Step) -> object:
        if isinstance(step, Rpc):
            answer = self._call(getattr(self._stub, step.method), step.call, step.timeout)
            if step.shield:
                # Finishes even if this task is cancelled meanwhile; close() waits for it.
                return await asyncio.shield(self._spawn(answer))
            return await answer
        if isinstance(step, Load):
            value = step.loader()
            if inspect.isawaitable(value):
                value = await value
            return value
        self._spawn(self._drive(step.steps), step.name)
        return None

    def _spawn(self, work: Coroutine[Any, Any, _T], name: str | None = None) -> asyncio.Task[_T]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _keep_near_cache(self, keeper: NearCacheKeeper) -> None:
        """The near cache's stream: live while registered, dark (and empty) otherwise."""
        while not self._closed:
            try:
                metadata = self._metadata()
            except Exception as exc:  # the application's token function failed
                keeper.no_token(exc)
                await asyncio.sleep(keeper.ended())
                continue
            stream = self._stub.Subscribe(keeper.request, metadata=metadata)
            try:
                await stream.initial_metadata()  # sent once the gateway registered the stream
                keeper.registered()
                async for event in stream:
                    keeper.event(event)
            except grpc.RpcError as exc:
                keeper.dropped(exc)
            finally:
                pause = keeper.ended()
                stream.cancel()
            await asyncio.sleep(pause)

    async def close(self) -> None:
        self._closed = True
        if self._stream_task is not None:
            self._stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stream_task
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._batcher is not None:
            await self._batcher.close()
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

    def _metadata(self) -> _security.Metadata | None:
        bearer = self._bearer
        return None if bearer is None else bearer.metadata()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self.timeout!r})"

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
        call: Call[_Req, _Resp, _Out],
        timeout: Timeout,  # noqa: ASYNC109
    ) -> _Out:
        try:
            response = await method(
                call.request,
                timeout=_calls.deadline(self.timeout, timeout),
                metadata=self._metadata(),
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return call.decode(response)
