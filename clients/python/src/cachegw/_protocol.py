"""The client's protocols, once, without I/O: `Client` and `AsyncClient` each drive them.

get_or_load's lease protocol is a generator of steps. It yields what it needs done —
an `Rpc` to make, a `Load` (call the loader), an `InBackground` protocol to start — and
is sent back the step's result, or has the step's exception thrown in, so that it
decides, in one place, what a failure means::

    lookup (Get with lease) ──► HIT/STALE ──► the value (and, when handed a refresh
       │                                      lease, `refresh` in the background)
       ├─► LEASED ──► `fill`: load ──► Set with the token
       │                 └─► loader raised, caller cancelled, Set failed ──► ReleaseLease
       ├─► MISS (the wait ran out) ──► load here, store nothing
       └─► gateway unreachable ──► load here, store nothing

A lease is ended only with ReleaseLease, which removes it while this caller's token
still holds it and never touches the value: on the refresh and stale paths the value is
still being served, and must stay so exactly when the source of truth is failing.

The blocking client runs a protocol with its `_drive` on the caller's thread; the
asyncio client with its own `_drive`, awaiting each step and shielding an
`Rpc(shield=True)` from the caller's cancellation. `NearCacheKeeper` is the near
cache's subscription minus the stream itself: each client's loop only reads the stream
and calls it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, TypeVar

import grpc

from cachegw import _calls
from cachegw._calls import DEFAULT, Call, Timeout
from cachegw.errors import CacheError, DeadlineExceeded, Unavailable
from cachegw.models import Entry, Status
from cachegw.near import NearCache
from cachegw.v1 import cache_pb2 as pb

log = logging.getLogger("cachegw")

T = TypeVar("T")

# The gateway cannot be asked: get_or_load calls the loader itself.
_GATEWAY_DOWN = (Unavailable, DeadlineExceeded)


@dataclass(frozen=True, slots=True)
class Rpc:
    """Make this unary call; send back its decoded answer (a `CacheError` is thrown in)."""

    method: Literal["Get", "Set", "ReleaseLease"]
    """The CacheService method (the stub's attribute)."""
    call: Call[Any, Any, Any]
    timeout: Timeout
    shield: bool = False
    """It must run to its end even when the caller is cancelled (the lease it ends would
    otherwise stay held until it times out)."""


@dataclass(frozen=True, slots=True)
class Load:
    """Call the loader (awaiting what it returns, if awaitable); send back its result.
    Its exception, or the caller's cancellation meanwhile, is thrown in."""

    loader: Callable[[], object]


@dataclass(frozen=True, slots=True)
class InBackground:
    """Start `steps` apart from the caller (a thread, a task); send back nothing."""

    name: str
    steps: Steps[None]


Step: TypeAlias = Rpc | Load | InBackground
Steps: TypeAlias = Generator[Step, Any, T]
"""A protocol run: the steps it yields, what it returns."""


def get_or_load(
    near: NearCache | None,
    key: str,
    loader: Callable[[], object],
    *,
    ttl: float | None,
    tags: Iterable[str],
    max_wait: float | None,
    allow_stale: bool,
    timeout: Timeout,
) -> Steps[bytes]:
    """`Client.get_or_load` / `AsyncClient.get_or_load`, whose docstrings say what it does."""
    if near is not None:
        cached = near.get(key)
        if cached is not None:
            return cached
    tag_list = list(tags)
    call = _calls.lookup(key, lease=True, max_wait=max_wait, allow_stale=allow_stale)
    ticket = near.ticket() if near is not None else 0
    try:
        entry: Entry = yield Rpc("Get", call, timeout)
    except _GATEWAY_DOWN as exc:
        log.warning("cachegw: %s; loading %r without the cache", exc, key)
        return loaded((yield Load(loader)))
    if entry.value is not None:
        if near is not None:
            near.fill(key, entry, ticket)
        if entry.refresh and entry.lease_token:
            filling = fill(near, key, loader, entry.lease_token, ttl, tag_list)
            yield InBackground(f"cachegw-refresh-{key[:40]}", refresh(key, filling))
        return entry.value
    if entry.status is Status.LEASED:
        return (yield from fill(near, key, loader, entry.lease_token, ttl, tag_list))
    # MISS: the wait for another holder's value ran out. Load here and store nothing:
    # the holder's fill is the one the lease protects. (NOT_FOUND, from a read-through
    # class's origin, also leaves it to the loader, whose own answer stands.)
    return loaded((yield Load(loader)))


def refresh(key: str, filling: Steps[bytes]) -> Steps[None]:
    """A refresh lease's `fill`, run in the background: a failure is logged, not raised."""
    try:
        yield from filling
    except Exception:
        log.exception("cachegw: refreshing %r failed", key)


def fill(
    near: NearCache | None,
    key: str,
    loader: Callable[[], object],
    token: bytes,
    ttl: float | None,
    tags: list[str],
) -> Steps[bytes]:
    """Load the value and store it under the lease `token`; the loaded value either way.

    A lease left unfilled is released at once, so that another caller loads now instead
    of after the lease timeout: when the loader raised or the caller was cancelled (then
    re-raised), or when the Set did not get through (logged)."""
    try:
        value = loaded((yield Load(loader)))
        stored = yield from _store(near, key, value, ttl, tags, token)
    except GeneratorExit:  # the driver itself is being torn down: no more steps
        raise
    except BaseException:
        yield from release(key, token)
        raise
    if not stored:
        yield from release(key, token)
    return value


def _store(
    near: NearCache | None,
    key: str,
    value: bytes,
    ttl: float | None,
    tags: list[str],
    token: bytes,
) -> Steps[bool]:
    """`set(key, value, lease_token=token)`; False (logged) when it failed."""
    try:
        call = _calls.set_(key, value, ttl=ttl, tags=tags, lease_token=token, if_version=None)
        if near is not None:
            near.forget([key])
        yield Rpc("Set", call, DEFAULT)
    except CacheError as exc:
        log.warning("cachegw: could not store %r after loading it: %s", key, exc)
        return False
    # STORED, or LEASE_INVALID: the key changed meanwhile and the lease is gone anyway.
    return True


def release(key: str, token: bytes) -> Steps[bool]:
    """End this caller's lease without storing (`release_lease`): the gateway removes it
    only while `token` holds it, never the value, and wakes its waiters. The near cache
    keeps its copy. Shielded from the caller's cancellation; a failure is logged."""
    try:
        released: bool = yield Rpc(
            "ReleaseLease", _calls.release_lease(key, token), DEFAULT, shield=True
        )
    except CacheError as exc:
        log.warning("cachegw: could not release the lease of %r: %s", key, exc)
        return False
    return released


def loaded(value: object) -> bytes:
    """What a get_or_load loader returned, as the bytes to store."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"the loader must return bytes or str, not {type(value).__name__}")


# --- the near cache's stream ------------------------------------------------------------

BACKOFF_FIRST: Final = 0.05
BACKOFF_MAX: Final = 2.0


class NearCacheKeeper:
    """What keeps a near cache honest, minus the stream: a client's loop subscribes with
    `request`, calls `registered` once the gateway sent the initial metadata (from then
    on every event reaches the stream), `event` for each event, `dropped` when the
    stream failed, and `ended` when it is over whatever the reason, then waits the pause
    `ended` returns before subscribing again."""

    def __init__(self, near: NearCache) -> None:
        self.near = near
        self.request: Final = _calls.subscribe((), (), "")
        self._backoff = BACKOFF_FIRST

    def registered(self) -> None:
        self.near.go_live()
        self._backoff = BACKOFF_FIRST

    def event(self, message: pb.InvalidationEvent) -> None:
        self.near.apply(_calls.decode_event(message))

    def dropped(self, error: grpc.RpcError) -> None:
        log.info("cachegw: near-cache stream dropped (%s); flushed", error.code())

    def no_token(self, error: Exception) -> None:
        # The type only: the application's message might quote the token.
        log.warning(
            "cachegw: near-cache stream not opened: the token function raised %s; flushed",
            type(error).__name__,
        )

    def ended(self) -> float:
        """Flush (events may be missed until the next stream registers); the pause, in
        seconds, before subscribing again: doubling up to BACKOFF_MAX while it fails."""
        self.near.go_dark()
        pause = self._backoff
        self._backoff = min(pause * 2, BACKOFF_MAX)
        return pause
