"""Calling an origin (cachegw.v1.Origin, protos/cachegw/v1/origin.proto): the one place
where the gateway talks to the source of truth of a class.

One `OriginClient` per distinct origin address (`Origins` hands them out per class), each
with its own gRPC channel and three guards, so that the cache protects the database
instead of amplifying its trouble:

- a deadline on every call: `origin.timeout_seconds`, or less when the caller's own
  deadline is nearer (a call that cannot finish in time is not sent at all);
- a concurrency limit: at most `origin.max_in_flight` calls in flight from this gateway;
  a call that finds no slot within its time is refused (RESOURCE_EXHAUSTED);
- a circuit breaker of its own (breaker.py's machine, `[origin.breaker]`): after
  consecutive failures, or a failure rate, calls are refused at once (UNAVAILABLE,
  nothing sent) for a cool-down, then one probe goes through.

Failures become `OriginError`s carrying the status the caller gets (docs/errors.md):
unreachable or its own UNAVAILABLE → UNAVAILABLE; out of time → DEADLINE_EXCEEDED; no
slot → RESOURCE_EXHAUSTED; an answer the gateway cannot use (not parseable, the wrong
number of results or keys, no status, a value over the class's max_value_bytes, a bad
TTL, tag or version, or an error status that says the origin is broken) →
FAILED_PRECONDITION. Only unreachable and timed-out calls count for the breaker: an
origin that answers, even badly, is reachable. Every answer is checked whole before any
of it is used, so a bad answer never reaches the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from cachegw.v1 import origin_pb2 as pb
from cachegw_gateway.breaker import Breaker
from cachegw_gateway.config import OriginConfig
from cachegw_gateway.envelope import MAX_TAGS_BYTES

log = logging.getLogger("cachegw.origin")

# Versions travel through the Set script as Lua numbers (doubles): exact below 2^53.
MAX_VERSION = 2**53 - 1
# Kept back from a caller's deadline for the answer to reach it.
DEADLINE_MARGIN = 0.02
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A restarted origin is found again within a fraction of a second, not after grpc's
    # default reconnect backoff (up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class OriginError(Exception):
    """An origin call failed; `code` is the status the gateway's caller gets."""

    code = grpc.StatusCode.UNAVAILABLE
    counts = False  # whether it tells the breaker the origin is unreachable

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        # Whether the call may have reached the origin (a Store may have been applied).
        self.sent = sent


class OriginUnavailable(OriginError):
    counts = True


class OriginBreakerOpen(OriginError):
    """Refused by the origin's open circuit breaker: nothing was sent."""

    def __init__(self, message: str, *, sent: bool = False) -> None:
        super().__init__(message, sent=sent)


class OriginTimeout(OriginError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    counts = True


class OriginBusy(OriginError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OriginBadAnswer(OriginError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OriginRefused(OriginError):
    """The origin answered REFUSED for a Store: the value breaks a rule of its data."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class OriginUnimplemented(OriginBadAnswer):
    """The origin answered UNIMPLEMENTED: it does not offer the method (FAILED_PRECONDITION
    for Load, Store and Remove, which a class's policy needs; List, which is optional,
    turns it into `ListUnsupported`)."""


class ListUnsupported(OriginError):
    """The origin does not implement List (optional): a warm-up by prefix cannot list."""

    code = grpc.StatusCode.UNIMPLEMENTED


class LoadWaitTimeout(OriginError):
    """A read-through caller waited for another caller's load of the key until its
    deadline (or the class's max_wait_seconds), and no value landed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def _counts(err: Exception) -> bool:
    return isinstance(err, OriginError) and err.counts


@dataclass(frozen=True, slots=True)
class Loaded:
    """One key of a checked Load answer."""

    key: str
    found: bool
    value: bytes = b""
    ttl_ms: int | None = None
    tags: tuple[str, ...] = ()
    version: int = 0


@dataclass(frozen=True, slots=True)
class StoreAnswer:
    """A checked Store answer for one entry: 'stored', 'conflict' or 'refused'."""

    outcome: str
    version: int = 0
    message: str = ""


@dataclass(frozen=True, slots=True)
class StoreEntry:
    """One entry of a batched Store (write-through SetMany and Warmup entries)."""

    key: str
    value: bytes
    ttl_ms: int | None = None
    tags: Sequence[str] = ()
    if_version: int | None = None


@dataclass(frozen=True, slots=True)
class Removed:
    """A checked Remove answer for one key."""

    key: str
    removed: bool
    version: int = 0


@dataclass(slots=True)
class OriginGauges:
    """The breaker's figures for one origin (logged on every transition)."""

    breaker_state: int = 0
    breaker_trips: int = 0
    breaker_refused: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    """What a Load answer must keep, per key, beside its shape."""

    max_value_bytes: Sequence[int]
    max_ttl_ms: int
    max_key_bytes: int


class OriginClient:
    """Calls to one origin address from this gateway (one event loop)."""

    def __init__(
        self,
        address: str,
        config: OriginConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.address = address
        self.config = config
        # Sent with every call (a tenant's space names its tenant: space.py).
        self._metadata = metadata or None
        self._clock = clock
        self._channel: grpc.aio.Channel | None = None
        self._slots = asyncio.Semaphore(config.max_in_flight)
        self.gauges = OriginGauges()
        self.breaker = (
            Breaker(
                config.breaker,
                self.gauges,
                clock=clock,
                subject=f"origin {address}",
                counting=_counts,
                refuse=OriginBreakerOpen,
                refusal=self._refusal,
                logger=log,
            )
            if config.breaker.enabled
            else None
        )

    def _refusal(self, when: str, reason: str) -> str:
        return (
            f"origin {self.address} is unavailable: the gateway's circuit breaker for it is "
            f"open, so nothing was sent to it and nothing changed in the cache; retry "
            f"later: {when}. It opened after {reason}"
        )

    def _stub_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None

    # -- one guarded call ----------------------------------------------------------------

    async def _call(
        self,
        method: str,
        request: bytes,
        deadline: float | None,
        limit: float | None = None,
    ) -> bytes:
        """Send `request` (encoded) to `method` within the deadline, the concurrency limit
        and the breaker; the encoded answer, or an OriginError. `limit` replaces
        origin.timeout_seconds (a class's hard_timeout_seconds)."""
        timeout = limit or self.config.timeout_seconds
        if deadline is not None:
            timeout = min(timeout, deadline - self._clock() - DEADLINE_MARGIN)
        if timeout <= 0:
            raise OriginTimeout(
                f"no time left to call origin {self.address} {method} within the call's "
                "deadline; nothing was sent",
                sent=False,
            )
        ticket = self.breaker.admit() if self.breaker is not None else 0
        started = self._clock()
        try:
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
        except TimeoutError:
            if self.breaker is not None:
                self.breaker.cancelled(ticket)
            raise OriginBusy(
                f"origin {self.address}: {self.config.max_in_flight} calls already in flight "
                f"(origin.max_in_flight) and none ended within {timeout:.3g}s; nothing was "
                "sent; retry later",
                sent=False,
            ) from None
        except BaseException:
            if self.breaker is not None:
                self.breaker.cancelled(ticket)
            raise
        err: OriginError | None = None
        try:
            left = timeout - (self._clock() - started)
            call = self._stub_channel().unary_unary(
                f"/cachegw.v1.Origin/{method}",
                request_serializer=None,
                response_deserializer=None,
            )
            try:
                answer: bytes = await call(
                    request, timeout=max(left, 0.001), metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                err = self._failure(method, exc, timeout)
                raise err from None
            return answer
        except asyncio.CancelledError:
            if self.breaker is not None:
                self.breaker.cancelled(ticket)
            raise
        finally:
            self._slots.release()
            if self.breaker is not None and not _cancelling():
                self.breaker.done(ticket, err)

    def _failure(self, method: str, exc: grpc.aio.AioRpcError, timeout: float) -> OriginError:
        code, details = exc.code(), exc.details() or ""
        where = f"origin {self.address} {method}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return OriginTimeout(
                f"{where} did not answer within {timeout:.3g}s (origin.timeout_seconds or "
                "the class's hard_timeout_seconds, or the call's own deadline); retry later"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            # The origin's own UNAVAILABLE means nothing was applied (origin.proto), and so
            # does a connection that could not be made; a connection lost mid-call leaves
            # it unknown.
            return OriginUnavailable(
                f"{where} is unavailable: {details}; retry later",
                sent=_connection_lost(details),
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
            return OriginBadAnswer(
                f"{where} answered more than {MAX_MESSAGE_BYTES} bytes ({details})"
            )
        if code == grpc.StatusCode.INTERNAL and "deserializ" in details.lower():
            return OriginBadAnswer(
                f"{where} answered something that is not a cachegw.v1.{method}Response "
                f"({details}): fix the origin"
            )
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return OriginUnimplemented(f"{where} is not implemented by the origin ({details})")
        return OriginBadAnswer(
            f"{where} failed with {code.name}: {details}: fix the origin or its configuration"
        )

    # -- Load ----------------------------------------------------------------------------

    async def load(
        self,
        keys: Sequence[str],
        limits: Limits,
        deadline: float | None,
        limit: float | None = None,
    ) -> list[Loaded]:
        """The origin's answer for `keys` (distinct), checked whole: one `Loaded` per key
        in order, or an OriginError (nothing of a bad answer is returned). `limit`
        (seconds) replaces origin.timeout_seconds for this call."""
        request = pb.LoadRequest(keys=keys).SerializeToString()
        raw = await self._call("Load", request, deadline, limit)
        where = f"origin {self.address} Load"
        try:
            answer = pb.LoadResponse.FromString(raw)
        except Exception as exc:  # DecodeError, or worse from a hostile peer
            raise OriginBadAnswer(
                f"{where} answered bytes that are not a LoadResponse ({exc}); nothing was cached"
            ) from None
        if len(answer.results) != len(keys):
            raise OriginBadAnswer(
                f"{where} answered {len(answer.results)} results for {len(keys)} keys "
                "(one per key, in request order); nothing was cached"
            )
        return [
            _checked_load(where, i, key, r, limits, max_bytes)
            for i, (key, r, max_bytes) in enumerate(
                zip(keys, answer.results, limits.max_value_bytes, strict=True)
            )
        ]

    # -- Store ---------------------------------------------------------------------------

    async def store(
        self,
        key: str,
        value: bytes,
        *,
        ttl_ms: int | None,
        tags: Sequence[str],
        if_version: int | None,
        deadline: float | None,
    ) -> StoreAnswer:
        entry = pb.StoreEntry(key=key, value=value, tags=tags)
        if ttl_ms is not None:
            entry.ttl_ms = ttl_ms
        if if_version is not None:
            entry.if_version = if_version
        request = pb.StoreRequest(entries=[entry]).SerializeToString()
        raw = await self._call("Store", request, deadline)
        where = f"origin {self.address} Store of {key!r}"
        try:
            answer = pb.StoreResponse.FromString(raw)
        except Exception as exc:
            raise OriginBadAnswer(
                f"{where}: the answer is not a StoreResponse ({exc}); the origin may or may "
                "not have stored it; the cache was not changed"
            ) from None
        if len(answer.results) != 1 or answer.results[0].key != key:
            raise OriginBadAnswer(
                f"{where}: answered {len(answer.results)} results (or another key) for one "
                "entry; the origin may or may not have stored it; the cache was not changed"
            )
        r = answer.results[0]
        if r.version > MAX_VERSION:
            raise OriginBadAnswer(
                f"{where}: version {r.version} is not below 2^53; the origin may have stored "
                "it; the cache was not changed"
            )
        if r.outcome == pb.STORE_OUTCOME_STORED:
            return StoreAnswer("stored", r.version)
        if r.outcome == pb.STORE_OUTCOME_VERSION_CONFLICT:
            return StoreAnswer("conflict", r.version)
        if r.outcome == pb.STORE_OUTCOME_REFUSED:
            return StoreAnswer("refused", r.version, r.message or "no reason given")
        raise OriginBadAnswer(
            f"{where}: answered outcome {r.outcome} (not STORED, VERSION_CONFLICT or "
            "REFUSED); the origin may or may not have stored it; the cache was not changed"
        )

    async def store_many(
        self, entries: Sequence[StoreEntry], deadline: float | None
    ) -> list[StoreAnswer]:
        """One Store call for `entries`: per entry its checked answer, in order, or an
        OriginError for the whole call (nothing of an unusable answer is returned)."""
        request = pb.StoreRequest()
        for e in entries:
            entry = request.entries.add(key=e.key, value=e.value, tags=e.tags)
            if e.ttl_ms is not None:
                entry.ttl_ms = e.ttl_ms
            if e.if_version is not None:
                entry.if_version = e.if_version
        raw = await self._call("Store", request.SerializeToString(), deadline)
        where = f"origin {self.address} Store of {len(entries)} entries"
        unknown = "; the origin may or may not have stored them"
        try:
            answer = pb.StoreResponse.FromString(raw)
        except Exception as exc:
            raise OriginBadAnswer(
                f"{where}: the answer is not a StoreResponse ({exc}){unknown}"
            ) from None
        if len(answer.results) != len(entries):
            raise OriginBadAnswer(
                f"{where}: answered {len(answer.results)} results (one per entry, in order)"
                + unknown
            )
        out: list[StoreAnswer] = []
        for i, (e, r) in enumerate(zip(entries, answer.results, strict=True)):
            at = f"{where}: results[{i}] ({e.key!r})"
            if r.key != e.key:
                raise OriginBadAnswer(f"{at} is for key {r.key!r}{unknown}")
            if r.version > MAX_VERSION:
                raise OriginBadAnswer(f"{at} has version {r.version}, not below 2^53{unknown}")
            if r.outcome == pb.STORE_OUTCOME_STORED:
                out.append(StoreAnswer("stored", r.version))
            elif r.outcome == pb.STORE_OUTCOME_VERSION_CONFLICT:
                out.append(StoreAnswer("conflict", r.version))
            elif r.outcome == pb.STORE_OUTCOME_REFUSED:
                out.append(StoreAnswer("refused", r.version, r.message or "no reason given"))
            else:
                raise OriginBadAnswer(
                    f"{at} has outcome {r.outcome} (not STORED, VERSION_CONFLICT or "
                    f"REFUSED){unknown}"
                )
        return out

    # -- Remove --------------------------------------------------------------------------

    async def remove(self, keys: Sequence[str], deadline: float | None) -> list[Removed]:
        """One Remove call for `keys` (distinct): per key its checked answer, in order."""
        raw = await self._call("Remove", pb.RemoveRequest(keys=keys).SerializeToString(), deadline)
        where = f"origin {self.address} Remove"
        unknown = "; the origin may or may not have removed them"
        try:
            answer = pb.RemoveResponse.FromString(raw)
        except Exception as exc:
            raise OriginBadAnswer(
                f"{where}: the answer is not a RemoveResponse ({exc}){unknown}"
            ) from None
        if len(answer.results) != len(keys):
            raise OriginBadAnswer(
                f"{where}: answered {len(answer.results)} results for {len(keys)} keys (one "
                f"per key, in order){unknown}"
            )
        out: list[Removed] = []
        for i, (key, r) in enumerate(zip(keys, answer.results, strict=True)):
            if r.key != key:
                raise OriginBadAnswer(f"{where}: results[{i}] is for key {r.key!r}, not {key!r}")
            if r.version > MAX_VERSION:
                raise OriginBadAnswer(
                    f"{where}: results[{i}] ({key!r}) has version {r.version}, not below 2^53"
                    + unknown
                )
            out.append(Removed(key, r.removed, r.version))
        return out

    # -- List ----------------------------------------------------------------------------

    async def list_keys(
        self, prefix: str, limit: int, page_token: str, max_key_bytes: int, deadline: float | None
    ) -> tuple[list[str], str]:
        """One page of the origin's keys starting with `prefix`: (keys, next page token, ''
        at the end). ListUnsupported when the origin does not implement List."""
        request = pb.ListRequest(prefix=prefix, limit=limit, page_token=page_token)
        where = f"origin {self.address} List of {prefix!r}"
        try:
            raw = await self._call("List", request.SerializeToString(), deadline)
        except OriginUnimplemented:
            raise ListUnsupported(
                f"{where}: the origin does not implement List (it is optional), so keys "
                "cannot be warmed by prefix from it; nothing was loaded: warm by keys, or "
                "implement List in the origin",
                sent=False,
            ) from None
        try:
            answer = pb.ListResponse.FromString(raw)
        except Exception as exc:
            raise OriginBadAnswer(f"{where}: the answer is not a ListResponse ({exc})") from None
        keys = list(answer.keys)
        if limit and len(keys) > limit:
            raise OriginBadAnswer(f"{where}: answered {len(keys)} keys, over the limit {limit}")
        for key in keys:
            if not key.startswith(prefix) or not 0 < len(key.encode()) <= max_key_bytes:
                raise OriginBadAnswer(
                    f"{where}: answered the key {key[:80]!r}, which does not start with the "
                    f"prefix or is empty or over {max_key_bytes} bytes: fix the origin"
                )
        if answer.next_page_token and answer.next_page_token == page_token:
            raise OriginBadAnswer(
                f"{where}: answered the page token it was given as the next one (a listing "
                "that would never end): fix the origin"
            )
        return keys, answer.next_page_token


# How grpc core reports a connection that broke while a call was on it (the request may
# have been applied), as opposed to one never made ("failed to connect") or a status the
# origin answered itself.
_LOST = ("socket closed", "connection reset", "goaway", "broken pipe", "stream removed",
         "connection aborted", "end of stream")  # fmt: skip


def _connection_lost(details: str) -> bool:
    text = details.lower()
    return "failed to connect" not in text and any(p in text for p in _LOST)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _checked_load(
    where: str, i: int, key: str, r: pb.LoadResult, limits: Limits, max_bytes: int
) -> Loaded:
    at = f"{where}: results[{i}] ({key!r})"
    bad = "; nothing was cached: fix the origin"
    if r.key != key:
        raise OriginBadAnswer(f"{at} is for key {r.key!r}: one result per key, in order{bad}")
    if r.version > MAX_VERSION:
        raise OriginBadAnswer(f"{at} has version {r.version}, not below 2^53{bad}")
    if r.status == pb.LOAD_STATUS_NOT_FOUND:
        return Loaded(key, False, version=r.version)
    if r.status != pb.LOAD_STATUS_FOUND:
        raise OriginBadAnswer(f"{at} has status {r.status}, neither FOUND nor NOT_FOUND{bad}")
    if len(r.value) > max_bytes:
        raise OriginBadAnswer(
            f"{at} is {len(r.value)} bytes, over its class's max_value_bytes ({max_bytes}); "
            "nothing was cached: raise max_value_bytes or store less"
        )
    ttl_ms: int | None = None
    if r.HasField("ttl_ms"):
        if not 0 < r.ttl_ms <= limits.max_ttl_ms:
            raise OriginBadAnswer(
                f"{at} has ttl_ms {r.ttl_ms}: must be in [1, {limits.max_ttl_ms}] "
                f"(server.max_ttl_seconds){bad}"
            )
        ttl_ms = r.ttl_ms
    tags = tuple(r.tags)
    size = 0
    for tag in tags:
        n = len(tag.encode())
        if not 0 < n <= limits.max_key_bytes:
            raise OriginBadAnswer(
                f"{at} has a tag of {n} bytes: tags must be non-empty and at most "
                f"{limits.max_key_bytes} bytes{bad}"
            )
        size += n + 2
    if size > MAX_TAGS_BYTES:
        raise OriginBadAnswer(f"{at} has {size} bytes of tags, over {MAX_TAGS_BYTES}{bad}")
    return Loaded(key, True, r.value, ttl_ms, tags, r.version)


class Origins:
    """The origin clients of one gateway, one per address the classes name."""

    def __init__(
        self,
        config: OriginConfig,
        addresses: Sequence[str],
        *,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._clients = {
            a: OriginClient(a, config, metadata=metadata) for a in dict.fromkeys(addresses) if a
        }

    def __bool__(self) -> bool:
        return bool(self._clients)

    def client(self, address: str) -> OriginClient:
        return self._clients[address]

    @property
    def clients(self) -> list[OriginClient]:
        return list(self._clients.values())

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
