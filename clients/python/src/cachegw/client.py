"""The blocking client: a grpc sync channel, one call per method. `get_or_load` and the
near cache's stream are driven here, on threads, from their one implementation in
`cachegw._protocol`."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from cachegw import _calls, _channel, _protocol, _security, _tracing
from cachegw._calls import DEFAULT, Call, Timeout
from cachegw._protocol import InBackground, Load, NearCacheKeeper, Rpc, Step, Steps
from cachegw._security import TLSConfig, TokenSource
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

__all__ = ["DEFAULT_TARGET", "Client"]

DEFAULT_TARGET = "127.0.0.1:50051"

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Out = TypeVar("_Out")
_T = TypeVar("_T")


class Client:
    """A blocking cachegw client over one gRPC channel; safe to share between threads.

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
    ) -> None:
        self.target = target
        self.timeout = timeout
        # Retries of idempotent calls and keepalive (see _channel.py); `channel_options`
        # override them.
        # TLS when `tls` is given (True: the system's trusted CAs); the token in the
        # metadata of every call (see _security.py).
        self.tls = _security.resolve_tls(tls)
        self._bearer = _security.bearer(token, target=target, secure=self.tls is not None)
        self._channel = _security.sync_channel(
            target, self.tls, _channel.channel_options(channel_options, retries=retries)
        )
        # With the application's OpenTelemetry set up, calls carry its trace context.
        self._stub = cache_pb2_grpc.CacheServiceStub(_tracing.intercept(self._channel))
        self.near_cache = near_cache
        self._closed = threading.Event()
        self._stream: Any = None
        self._stream_thread: threading.Thread | None = None
        self._refreshes: set[threading.Thread] = set()
        if near_cache is not None:
            self._stream_thread = threading.Thread(
                target=self._keep_near_cache,
                args=(NearCacheKeeper(near_cache),),
                name="cachegw-near-cache",
                daemon=True,
            )
            self._stream_thread.start()

    def get(self, key: str, *, timeout: Timeout = DEFAULT) -> bytes | None:
        """The value of `key`, or None on a miss (from the near cache when it has it)."""
        near = self.near_cache
        if near is None:
            return self._call(self._stub.Get, _calls.get(key), timeout)
        value = near.get(key)
        if value is not None:
            return value
        ticket = near.ticket()
        entry = self._call(self._stub.Get, _calls.lookup(key, **_calls.PLAIN), timeout)
        near.fill(key, entry, ticket)
        return entry.value

    def lookup(
        self,
        key: str,
        *,
        lease: bool = False,
        max_wait: float | None = None,
        allow_stale: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> Entry:
        """Everything the gateway knows about `key`; with `lease`, a miss may grant a lease."""
        call = _calls.lookup(key, lease=lease, max_wait=max_wait, allow_stale=allow_stale)
        return self._call(self._stub.Get, call, timeout)

    def get_many(self, keys: Iterable[str], *, timeout: Timeout = DEFAULT) -> list[bytes | None]:
        """The values of `keys` in order, None for each miss."""
        near = self.near_cache
        if near is None:
            return self._call(self._stub.GetMany, _calls.get_many(keys), timeout)
        wanted = list(keys)
        values, missing = near.get_many(wanted)
        if not missing:
            return values
        ticket = near.ticket()
        call = _calls.lookup_many(missing, allow_stale=False)
        entries: list[Entry] = self._call(self._stub.GetMany, call, timeout)
        return near.fill_many(wanted, values, entries, ticket)

    def lookup_many(
        self, keys: Iterable[str], *, allow_stale: bool = False, timeout: Timeout = DEFAULT
    ) -> list[Entry]:
        """One `Entry` per key, in order."""
        call = _calls.lookup_many(keys, allow_stale=allow_stale)
        return self._call(self._stub.GetMany, call, timeout)

    def set(
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
        timeout: Timeout = DEFAULT,
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
        return self._call(self._stub.Set, call, timeout)

    def set_many(
        self,
        entries: Iterable[_calls.SetManyEntry],
        *,
        tags: Iterable[str] = (),
        if_absent: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> list[SetResult | CacheError]:
        """Store many values in one call (one Redis round trip): `entries` of (key, value)
        or (key, value, ttl seconds). Per entry, in order, its `SetResult`, or the
        `CacheError` of that entry alone (e.g. `ResourceExhausted` when Redis ran out of
        memory part-way). Bad input in any entry refuses the whole call before Redis."""
        call = _calls.set_many(entries, tags=tags, if_absent=if_absent)
        if self.near_cache is not None:
            self.near_cache.forget([e.key for e in call.request.entries])
        return self._call(self._stub.SetMany, call, timeout)

    def delete_many(self, keys: Iterable[str], *, timeout: Timeout = DEFAULT) -> list[bool]:
        """Remove `keys` in one call; per key, in order, whether a value existed."""
        call = _calls.delete_many(keys)
        if self.near_cache is not None:
            self.near_cache.forget(list(call.request.keys))
        return self._call(self._stub.DeleteMany, call, timeout)

    def release_lease(self, key: str, lease_token: bytes, *, timeout: Timeout = DEFAULT) -> bool:
        """End the lease `lease_token` (of a LEASED or refresh lookup) without storing:
        the gateway removes it only while that token holds it, never the stored value,
        and wakes its waiters. False when it no longer held it (nothing changed)."""
        call = _calls.release_lease(key, lease_token)
        return self._call(self._stub.ReleaseLease, call, timeout)

    def delete(self, *keys: str, timeout: Timeout = DEFAULT) -> int:
        """Remove `keys`; returns how many of them existed."""
        call = _calls.delete(keys)
        if self.near_cache is not None:
            self.near_cache.forget(keys)
        return self._call(self._stub.Delete, call, timeout)

    def invalidate(
        self,
        keys: Iterable[str] = (),
        *,
        prefixes: Iterable[str] = (),
        tags: Iterable[str] = (),
        classes: Iterable[str] = (),
        timeout: Timeout = DEFAULT,
    ) -> InvalidateResult:
        """Remove keys by key, prefix, tag or class from every tier of every gateway."""
        call = _calls.invalidate(keys, prefixes, tags, classes)
        if self.near_cache is not None:
            self.near_cache.apply(_calls.event_of(call.request))
        return self._call(self._stub.Invalidate, call, timeout)

    def incr(
        self, key: str, delta: int = 1, *, ttl: float | None = None, timeout: Timeout = DEFAULT
    ) -> int:
        """Add `delta` (may be negative) to the counter `key`, atomically across every
        gateway, and return the new value. A missing counter is created at `delta` with
        `ttl` seconds (None = the class TTL); an existing one keeps its TTL. `incr(key, 0)`
        reads it (0 when missing, and creates nothing). Counters live beside values: `get`
        never returns one. Raises `OutOfRange` when the sum would leave a signed 64-bit
        integer, `FailedPrecondition` when the counter key holds no integer."""
        return self._call(self._stub.Incr, _calls.incr(key, delta, ttl), timeout)

    def touch(self, key: str, *, ttl: float | None = None, timeout: Timeout = DEFAULT) -> bool:
        """Give the value and counter of `key` a new TTL (`ttl` seconds; None = the class
        TTL) without rewriting them; False when neither exists."""
        return self._call(self._stub.Touch, _calls.touch(key, ttl), timeout)

    def allow(
        self,
        key: str,
        *,
        rate: int | None = None,
        period: float | None = None,
        burst: int | None = None,
        cost: int = 1,
        algorithm: str | None = None,
        timeout: Timeout = DEFAULT,
    ) -> AllowResult:
        """May a request of `cost` on `key` go ahead under `rate` per `period` seconds
        (bursts of `burst`, default `rate`; algorithm "gcra" by default, or
        "sliding_window")? With none of them, the limit named by the key's class applies.
        One atomic decision shared by every gateway; a refusal says `retry_after`."""
        call = _calls.allow(
            key, rate=rate, period=period, burst=burst, cost=cost, algorithm=algorithm
        )
        return self._call(self._stub.Allow, call, timeout)

    def ttl(self, key: str, *, timeout: Timeout = DEFAULT) -> float | None:
        """Seconds of fresh time left for the value of `key` (0.0 inside the class's stale
        window), read without the value; None when there is no value."""
        return self._call(self._stub.Ttl, _calls.ttl_left(key), timeout)

    def warmup(
        self,
        keys: Iterable[str] = (),
        *,
        entries: Iterable[tuple[str, bytes | str]] = (),
        hot_keys: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> tuple[int, int, int]:
        """Load keys (and the recorded hot keys) into the gateway's L1, and store entries;
        returns (loaded, missing, stored)."""
        return self._call(self._stub.Warmup, _calls.warmup(keys, entries, hot_keys), timeout)

    def rebuild(
        self,
        keys: Iterable[str] = (),
        *,
        prefixes: Iterable[str] = (),
        hot_keys: bool = False,
        resume: str = "",
        timeout: Timeout = DEFAULT,
    ) -> RebuildProgress:
        """Rebuild from the origins (Warmup): load what Redis lacks of `keys`, of the keys
        the origins list under `prefixes` and (with `hot_keys`) of the recorded hot set,
        in batches at the origin's warm rate. One call goes as far as its deadline
        allows: while the answer is not `done`, call again with its `resume` (loading is
        idempotent)."""
        call = _calls.rebuild(keys, prefixes, hot_keys, resume)
        return self._call(self._stub.Warmup, call, timeout)

    def subscribe(
        self,
        *,
        prefixes: Iterable[str] = (),
        classes: Iterable[str] = (),
        since: str = "",
        resume: bool = True,
    ) -> Generator[Event, None, None]:
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
                reset = state.opened(stream.initial_metadata())
                if reset is not None:
                    yield reset
                for message in stream:
                    event = _calls.decode_event(message)
                    state.delivered(event)
                    yield event
            except grpc.RpcError as exc:
                error = exc
            finally:
                stream.cancel()  # type: ignore[no-untyped-call]
            if self._closed.is_set() or not state.should_resume(error):
                if error is not None:
                    raise error_from_rpc(error) from error
                return
            if self._closed.wait(state.pause()):
                return

    def get_or_load(
        self,
        key: str,
        loader: Callable[[], bytes | str],
        *,
        ttl: float | None = None,
        tags: Iterable[str] = (),
        max_wait: float | None = None,
        allow_stale: bool = True,
        timeout: Timeout = DEFAULT,
    ) -> bytes:
        """The value of `key`; on a miss, `loader()` runs in exactly one caller across all
        gateways (the lease holder) and the others get its value.

        A STALE value (within the class's stale window, or while Redis fails the last
        copy of a class with stale_if_error_seconds) is returned at once; when this
        caller was picked to refresh (early refresh or stale), `loader` runs in a
        background thread. When the gateway cannot be reached, `loader` runs here and
        its value is returned (logged), so the service keeps working."""
        return self._drive(
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

    def _drive(self, steps: Steps[_T]) -> _T:
        """Run a protocol on this thread: do each step, send back its result, or throw its
        exception in (the protocol decides what a failure means)."""
        send: Callable[[Any], Step] = steps.send
        reply: Any = None
        while True:
            try:
                step = send(reply)
            except StopIteration as done:
                result: _T = done.value
                return result
            try:
                reply, send = self._do(step), steps.send
            except BaseException as exc:
                reply, send = exc, steps.throw

    def _do(self, step: Step) -> object:
        if isinstance(step, Rpc):
            return self._call(getattr(self._stub, step.method), step.call, step.timeout)
        if isinstance(step, Load):
            return step.loader()
        self._in_background(step)
        return None

    def _in_background(self, job: InBackground) -> None:
        def run() -> None:
            try:
                self._drive(job.steps)
            finally:
                self._refreshes.discard(thread)

        thread = threading.Thread(target=run, name=job.name, daemon=True)
        self._refreshes.add(thread)
        thread.start()

    def _keep_near_cache(self, keeper: NearCacheKeeper) -> None:
        """The near cache's stream: live while registered, dark (and empty) otherwise."""
        while not self._closed.is_set():
            try:
                metadata = self._metadata()
            except Exception as exc:  # the application's token function failed
                keeper.no_token(exc)
                self._closed.wait(keeper.ended())
                continue
            stream = self._stream = self._stub.Subscribe(keeper.request, metadata=metadata)
            try:
                stream.initial_metadata()  # sent once the gateway registered the stream
                if self._closed.is_set():
                    break
                keeper.registered()
                for event in stream:
                    keeper.event(event)
            except grpc.RpcError as exc:
                if not self._closed.is_set():
                    keeper.dropped(exc)
            finally:
                pause = keeper.ended()
                stream.cancel()  # type: ignore[no-untyped-call]
            self._closed.wait(pause)

    def close(self) -> None:
        self._closed.set()
        if self._stream is not None:
            self._stream.cancel()
        if self._stream_thread is not None:
            self._stream_thread.join(5)
        for thread in list(self._refreshes):
            thread.join(5)
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _metadata(self) -> _security.Metadata | None:
        bearer = self._bearer
        return None if bearer is None else bearer.metadata()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self.timeout!r})"

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        call: Call[_Req, _Resp, _Out],
        timeout: Timeout,
    ) -> _Out:
        try:
            response = method(
                call.request,
                timeout=_calls.deadline(self.timeout, timeout),
                metadata=self._metadata(),
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return call.decode(response)
