"""Everything about a call except making it, shared by `Client` and `AsyncClient`.

Each builder checks its arguments (only what is cheap and obvious: the gateway is the
authority on keys, sizes and TTL limits), builds the request, and returns it with the
function that reads the response. The two clients only send the request over their
channel and map a gRPC failure with `error_from_rpc`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeAlias, TypeVar

import grpc

from cachegw.errors import CacheError, InvalidArgument, error_from_status
from cachegw.models import (
    AllowResult,
    Entry,
    Event,
    EventKind,
    InvalidateResult,
    RebuildProgress,
    SetOutcome,
    SetResult,
    Status,
    Tier,
)
from cachegw.v1 import cache_pb2 as pb

ReqT = TypeVar("ReqT")
RespT = TypeVar("RespT")
OutT = TypeVar("OutT")

_UINT32_MAX: Final = 2**32 - 1
_INT64_MAX: Final = 2**63 - 1
_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1


class _Default(enum.Enum):
    DEFAULT = "DEFAULT"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default.DEFAULT
"""The `timeout` of a call that was given none: the client's default deadline applies."""

Timeout: TypeAlias = float | _Default | None
"""A per-call deadline in seconds; None = no deadline; DEFAULT = the client's default."""


@dataclass(frozen=True, slots=True)
class Call(Generic[ReqT, RespT, OutT]):
    """A request ready to send and how to read its response."""

    request: ReqT
    decode: Callable[[RespT], OutT]


def deadline(default: float | None, timeout: Timeout) -> float | None:
    """The timeout to hand to grpc: the call's own, else the client's default."""
    return default if timeout is DEFAULT else timeout


# --- reads -------------------------------------------------------------------------------


def get(key: str) -> Call[pb.GetRequest, pb.GetResponse, bytes | None]:
    return Call(pb.GetRequest(key=_key(key)), _value)


def lookup(
    key: str, *, lease: bool, max_wait: float | None, allow_stale: bool
) -> Call[pb.GetRequest, pb.GetResponse, Entry]:
    request = pb.GetRequest(
        key=_key(key),
        lease=lease,
        max_wait_ms=0 if max_wait is None else _max_wait_ms(max_wait),
        allow_stale=allow_stale,
    )
    return Call(request, decode_entry)


def get_many(
    keys: Iterable[str],
) -> Call[pb.GetManyRequest, pb.GetManyResponse, list[bytes | None]]:
    checked = _keys(keys, "keys")

    def decode(response: pb.GetManyResponse) -> list[bytes | None]:
        return [_value(result) for result in _results(response, len(checked))]

    return Call(pb.GetManyRequest(keys=checked), decode)


def lookup_many(
    keys: Iterable[str], *, allow_stale: bool
) -> Call[pb.GetManyRequest, pb.GetManyResponse, list[Entry]]:
    checked = _keys(keys, "keys")

    def decode(response: pb.GetManyResponse) -> list[Entry]:
        return [decode_entry(result) for result in _results(response, len(checked))]

    return Call(pb.GetManyRequest(keys=checked, allow_stale=allow_stale), decode)


# --- writes ------------------------------------------------------------------------------


def set_(
    key: str,
    value: bytes | str,
    *,
    ttl: float | None,
    tags: Iterable[str],
    lease_token: bytes,
    if_version: int | None,
    if_absent: bool = False,
    if_present: bool = False,
    origin_version: int | None = None,
) -> Call[pb.SetRequest, pb.SetResponse, SetResult]:
    request = _set_request(key, value, ttl, tags, lease_token, if_version, if_absent, if_present)
    if origin_version is not None:
        request.origin_version = _origin_version(origin_version)
    return Call(request, decode_set)


def _set_request(
    key: str,
    value: bytes | str,
    ttl: float | None,
    tags: Iterable[str],
    lease_token: bytes,
    if_version: int | None,
    if_absent: bool,
    if_present: bool,
) -> pb.SetRequest:
    if if_absent and if_present:
        raise InvalidArgument("if_absent and if_present cannot both hold")
    request = pb.SetRequest(
        key=_key(key),
        value=_value_bytes(value),
        tags=_tags(tags),
        lease_token=_bytes(lease_token, "lease_token"),
    )
    if ttl is not None:
        request.ttl_ms = _ttl_ms(ttl)
    if if_version is not None:
        request.if_version = _if_version(if_version)
    if if_absent:
        request.condition = pb.SET_CONDITION_IF_ABSENT
    elif if_present:
        request.condition = pb.SET_CONDITION_IF_PRESENT
    return request


SetManyEntry: TypeAlias = tuple[str, bytes | str] | tuple[str, bytes | str, float | None]
"""(key, value) or (key, value, ttl in seconds) for `set_many`."""


def set_many(
    entries: Iterable[SetManyEntry], *, tags: Iterable[str] = (), if_absent: bool = False
) -> Call[pb.SetManyRequest, pb.SetManyResponse, list[SetResult | CacheError]]:
    tag_list = list(tags)
    requests: list[pb.SetRequest] = []
    for entry in entries:
        key, value = entry[0], entry[1]
        ttl = entry[2] if len(entry) > 2 else None
        requests.append(_set_request(key, value, ttl, tag_list, b"", None, if_absent, False))
    return Call(pb.SetManyRequest(entries=requests), _set_many_results)


def _set_many_results(response: pb.SetManyResponse) -> list[SetResult | CacheError]:
    return [
        error_from_status(r.code, r.error) if r.code else decode_set(r.response)
        for r in response.results
    ]


def delete_many(
    keys: Iterable[str],
) -> Call[pb.DeleteManyRequest, pb.DeleteManyResponse, list[bool]]:
    return Call(pb.DeleteManyRequest(keys=_keys(keys, "keys")), lambda r: list(r.deleted))


def release_lease(
    key: str, lease_token: bytes
) -> Call[pb.ReleaseLeaseRequest, pb.ReleaseLeaseResponse, bool]:
    if not _bytes(lease_token, "lease_token"):
        raise InvalidArgument("lease_token must not be empty")
    return Call(pb.ReleaseLeaseRequest(key=_key(key), lease_token=lease_token), _released)


def delete(keys: Iterable[str]) -> Call[pb.DeleteRequest, pb.DeleteResponse, int]:
    return Call(pb.DeleteRequest(keys=_keys(keys, "keys")), _deleted)


def invalidate(
    keys: Iterable[str], prefixes: Iterable[str], tags: Iterable[str], classes: Iterable[str]
) -> Call[pb.InvalidateRequest, pb.InvalidateResponse, InvalidateResult]:
    request = pb.InvalidateRequest(
        keys=_keys(keys, "keys"),
        prefixes=_keys(prefixes, "prefixes"),
        tags=_tags(tags),
        classes=_names(classes, "classes"),
    )
    if not (request.keys or request.prefixes or request.tags or request.classes):
        raise InvalidArgument("invalidate needs at least one key, prefix, tag or class")
    return Call(request, _invalidated)


def subscribe(prefixes: Iterable[str], classes: Iterable[str], since: str) -> pb.SubscribeRequest:
    if not isinstance(since, str):
        raise TypeError(f"since must be an event id (str), not {type(since).__name__}")
    return pb.SubscribeRequest(
        prefixes=_keys(prefixes, "prefixes"), classes=_names(classes, "classes"), since=since
    )


def warmup(
    keys: Iterable[str], entries: Iterable[tuple[str, bytes | str]], hot_keys: bool
) -> Call[pb.WarmupRequest, pb.WarmupResponse, tuple[int, int, int]]:
    request = pb.WarmupRequest(keys=_keys(keys, "keys"), hot_keys=hot_keys)
    for key, value in entries:
        request.entries.add(key=_key(key), value=_value_bytes(value))
    return Call(request, _warmed)


def rebuild(
    keys: Iterable[str], prefixes: Iterable[str], hot_keys: bool, resume: str
) -> Call[pb.WarmupRequest, pb.WarmupResponse, RebuildProgress]:
    if not isinstance(resume, str):
        raise TypeError(
            f"resume must be the str an earlier answer gave, not {type(resume).__name__}"
        )
    request = pb.WarmupRequest(
        keys=_keys(keys, "keys"),
        prefixes=_keys(prefixes, "prefixes"),
        hot_keys=hot_keys,
        resume=resume,
    )
    if not (request.keys or request.prefixes or request.hot_keys):
        raise InvalidArgument("rebuild needs keys, prefixes or hot_keys")
    return Call(request, _rebuilt)


# --- counters and TTLs ------------------------------------------------------------------


def incr(key: str, delta: int, ttl: float | None) -> Call[pb.IncrRequest, pb.IncrResponse, int]:
    request = pb.IncrRequest(key=_key(key), delta=_delta(delta))
    if ttl is not None:
        request.ttl_ms = _ttl_ms(ttl)
    return Call(request, _incremented)


def touch(key: str, ttl: float | None) -> Call[pb.TouchRequest, pb.TouchResponse, bool]:
    request = pb.TouchRequest(key=_key(key))
    if ttl is not None:
        request.ttl_ms = _ttl_ms(ttl)
    return Call(request, _touched)


def ttl_left(key: str) -> Call[pb.TtlRequest, pb.TtlResponse, float | None]:
    return Call(pb.TtlRequest(key=_key(key)), _ttl_left)


_ALGORITHMS: Final = {
    "gcra": pb.RATE_ALGORITHM_GCRA,
    "sliding_window": pb.RATE_ALGORITHM_SLIDING_WINDOW,
}


def allow(
    key: str,
    *,
    rate: int | None,
    period: float | None,
    burst: int | None,
    cost: int,
    algorithm: str | None,
) -> Call[pb.AllowRequest, pb.AllowResponse, AllowResult]:
    request = pb.AllowRequest(key=_key(key), cost=_count(cost, "cost"))
    if rate is None and period is None:
        if burst is not None or algorithm is not None:
            raise InvalidArgument(
                "burst and algorithm need rate and period; give none of them for the limit "
                "named by the key's class"
            )
        return Call(request, decode_allow)
    if rate is None or period is None:
        raise InvalidArgument("rate and period go together (or neither: the class's limit)")
    limit = request.limit
    limit.rate = _count(rate, "rate")
    limit.period_ms = _seconds_to_ms(period, "period", _UINT64_MAX)
    if burst is not None:
        limit.burst = _count(burst, "burst")
    if algorithm is not None:
        if algorithm not in _ALGORITHMS:
            raise InvalidArgument(
                f"algorithm must be 'gcra' or 'sliding_window' (got {algorithm!r})"
            )
        limit.algorithm = _ALGORITHMS[algorithm]
    return Call(request, decode_allow)


def decode_allow(response: pb.AllowResponse) -> AllowResult:
    return AllowResult(
        allowed=response.allowed,
        remaining=response.remaining,
        retry_after=response.retry_after_ms / 1000,
        reset_after=response.reset_after_ms / 1000,
        key_class=response.key_class,
    )


def _count(value: int, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, not {type(value).__name__}")
    if not 1 <= value <= _UINT64_MAX:
        raise InvalidArgument(f"{field} must be a positive integer (got {value})")
    return value


# --- responses ---------------------------------------------------------------------------

_STATUS: Final = {
    pb.STATUS_HIT: Status.HIT,
    pb.STATUS_MISS: Status.MISS,
    pb.STATUS_LEASED: Status.LEASED,
    pb.STATUS_STALE: Status.STALE,
    pb.STATUS_NOT_FOUND: Status.NOT_FOUND,
}
_TIER: Final = {pb.TIER_L1: Tier.L1, pb.TIER_L2: Tier.L2, pb.TIER_ORIGIN: Tier.ORIGIN}
_OUTCOME: Final = {
    pb.SET_OUTCOME_STORED: SetOutcome.STORED,
    pb.SET_OUTCOME_LEASE_INVALID: SetOutcome.LEASE_INVALID,
    pb.SET_OUTCOME_VERSION_CONFLICT: SetOutcome.VERSION_CONFLICT,
    pb.SET_OUTCOME_CONDITION_FAILED: SetOutcome.CONDITION_FAILED,
}


def decode_entry(response: pb.GetResponse) -> Entry:
    status = _status(response)
    return Entry(
        status=status,
        value=response.value if status is Status.HIT or status is Status.STALE else None,
        tier=_TIER.get(response.tier, Tier.NONE),
        lease_token=response.lease_token,
        refresh=response.refresh,
        ttl_remaining=response.ttl_remaining_ms / 1000,
        version=response.version,
        key_class=response.key_class,
        tags=tuple(response.tags),
    )


def decode_set(response: pb.SetResponse) -> SetResult:
    outcome = _OUTCOME.get(response.outcome)
    if outcome is None:
        raise _protocol_error(f"a Set outcome this client does not know ({response.outcome})")
    return SetResult(
        outcome=outcome,
        version=response.version,
        ttl=response.ttl_ms / 1000,
        key_class=response.key_class,
    )


def _value(response: pb.GetResponse) -> bytes | None:
    status = _status(response)
    return response.value if status is Status.HIT or status is Status.STALE else None


def _status(response: pb.GetResponse) -> Status:
    status = _STATUS.get(response.status)
    if status is None:
        raise _protocol_error(f"a Get status this client does not know ({response.status})")
    return status


def _results(response: pb.GetManyResponse, expected: int) -> Iterable[pb.GetResponse]:
    if len(response.results) != expected:
        raise _protocol_error(f"{len(response.results)} results for {expected} keys")
    return response.results


def _released(response: pb.ReleaseLeaseResponse) -> bool:
    return response.released


def _deleted(response: pb.DeleteResponse) -> int:
    return response.deleted


def _invalidated(response: pb.InvalidateResponse) -> InvalidateResult:
    return InvalidateResult(removed=response.removed, event_id=response.event_id)


def _incremented(response: pb.IncrResponse) -> int:
    return response.value


def _touched(response: pb.TouchResponse) -> bool:
    return response.touched


def _ttl_left(response: pb.TtlResponse) -> float | None:
    return response.ttl_remaining_ms / 1000 if response.exists else None


def _rebuilt(response: pb.WarmupResponse) -> RebuildProgress:
    return RebuildProgress(
        done=response.done,
        resume=response.resume,
        loaded=response.loaded,
        origin_loaded=response.origin_loaded,
        not_found=response.not_found,
        listed=response.listed,
        skipped=response.skipped,
        missing=response.missing,
        failed=response.failed,
        error=response.error,
        retry_after_ms=response.retry_after_ms,
    )


def _warmed(response: pb.WarmupResponse) -> tuple[int, int, int]:
    return response.loaded, response.missing, response.stored


_EVENT_KIND: Final = {
    pb.EVENT_KIND_KEYS: EventKind.KEYS,
    pb.EVENT_KIND_PREFIXES: EventKind.PREFIXES,
    pb.EVENT_KIND_TAGS: EventKind.TAGS,
    pb.EVENT_KIND_CLASSES: EventKind.CLASSES,
    pb.EVENT_KIND_RESET: EventKind.RESET,
}


def decode_event(event: pb.InvalidationEvent) -> Event:
    kind = _EVENT_KIND.get(event.kind)
    if kind is None:
        # An event kind this client does not know may name anything: treat it as RESET.
        kind = EventKind.RESET
    return Event(
        id=event.id,
        kind=kind,
        keys=tuple(event.keys),
        prefixes=tuple(event.prefixes),
        tags=tuple(event.tags),
        classes=tuple(event.classes),
        timestamp=event.timestamp_ms / 1000,
        origin=event.origin,
    )


def _protocol_error(what: str) -> CacheError:
    # The gateway broke the cachegw.v1 contract (or speaks a newer one): never guess.
    return CacheError(f"the gateway answered {what}", code=grpc.StatusCode.UNKNOWN)


# --- argument checks ---------------------------------------------------------------------


def _key(key: str) -> str:
    if type(key) is not str:
        raise TypeError(f"a key must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidArgument("key must not be empty")
    if not key.isascii():
        _utf8(key, "key")
    return key


def _keys(keys: Iterable[str], field: str) -> list[str]:
    if isinstance(keys, str | bytes):
        raise TypeError(f"{field} must be an iterable of str, not a single {type(keys).__name__}")
    return [_key(key) for key in keys]


def _names(names: Iterable[str], field: str) -> list[str]:
    if isinstance(names, str | bytes):
        raise TypeError(f"{field} must be an iterable of str, not a single {type(names).__name__}")
    checked = list(names)
    for name in checked:
        if type(name) is not str:
            raise TypeError(f"{field} must hold str, not {type(name).__name__}")
    return checked


def _tags(tags: Iterable[str]) -> list[str]:
    if isinstance(tags, str | bytes):
        raise TypeError(f"tags must be an iterable of str, not a single {type(tags).__name__}")
    checked = list(tags)
    for tag in checked:
        if type(tag) is not str:
            raise TypeError(f"a tag must be a str, not {type(tag).__name__}")
        if not tag:
            raise InvalidArgument("tags must not be empty strings")
        if not tag.isascii():
            _utf8(tag, "tag")
    return checked


def _utf8(text: str, field: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"{field} must be valid UTF-8 (unpaired surrogate at index {exc.start})"
        ) from None


def _value_bytes(value: bytes | str) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        try:
            return value.encode()
        except UnicodeEncodeError as exc:
            raise InvalidArgument(
                f"a str value must be valid UTF-8 (unpaired surrogate at index {exc.start});"
                " pass bytes instead"
            ) from None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"value must be bytes or str, not {type(value).__name__}")


def _bytes(value: bytes, field: str) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{field} must be bytes, not {type(value).__name__}")
    return value


def _seconds_to_ms(seconds: float, field: str, limit: int) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"{field} must be a number of seconds, not {type(seconds).__name__}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidArgument(f"{field} must be a positive number of seconds (got {seconds!r})")
    # Positive stays positive: a sub-millisecond duration is sent as 1 ms.
    return min(max(1, round(seconds * 1000)), limit)


def _ttl_ms(ttl: float) -> int:
    ms = _seconds_to_ms(ttl, "ttl", _INT64_MAX + 1)
    if ms > _INT64_MAX:
        raise InvalidArgument(f"ttl is out of range (got {ttl!r} seconds)")
    return ms


def _delta(delta: int) -> int:
    if isinstance(delta, bool) or not isinstance(delta, int):
        raise TypeError(f"delta must be an int, not {type(delta).__name__}")
    if not _INT64_MIN <= delta <= _INT64_MAX:
        raise InvalidArgument(f"delta must fit a signed 64-bit integer (got {delta})")
    return delta


def _max_wait_ms(max_wait: float) -> int:
    # The wait is bounded by the call's deadline anyway, so a huge one is simply capped.
    return _seconds_to_ms(max_wait, "max_wait", _UINT32_MAX)


def _if_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"if_version must be an int, not {type(version).__name__}")
    if not 0 <= version <= _UINT64_MAX:
        raise InvalidArgument(f"if_version must be between 0 and 2**64-1 (got {version})")
    return version


def _origin_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"origin_version must be an int, not {type(version).__name__}")
    if not 1 <= version < 2**53:
        raise InvalidArgument(f"origin_version must be between 1 and 2**53-1 (got {version})")
    return version


# --- client-side pieces of the near cache ------------------------------------------------

PLAIN: Final[dict[str, Any]] = {"lease": False, "max_wait": None, "allow_stale": False}
"""`lookup` arguments of a plain get (the near cache needs the whole Entry)."""


def event_of(request: pb.InvalidateRequest) -> Event:
    """The event an invalidate request will publish, for the caller's own near cache."""
    return Event(
        id="",
        kind=EventKind.KEYS,
        keys=tuple(request.keys),
        prefixes=tuple(request.prefixes),
        tags=tuple(request.tags),
        classes=tuple(request.classes),
    )
