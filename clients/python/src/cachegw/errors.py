"""Exceptions of the cachegw client: one class per gRPC status code the gateway answers.

Every exception is a `CacheError` carrying the status `code` and the server's `details`.
`error_from_rpc` turns a grpc error (sync or asyncio) into the matching class; codes this
client has no class for come back as a plain `CacheError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import grpc

__all__ = [
    "CacheError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_from_rpc",
]


class CacheError(Exception):
    """A call to the gateway failed; `code` is the gRPC status, `details` its message."""

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    code: grpc.StatusCode
    details: str

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.code = self.default_code if code is None else code
        self.details = details

    def __str__(self) -> str:
        if type(self) is CacheError:
            # No class says what went wrong, so the code has to.
            return f"{self.code.name}: {self.details}"
        return self.details

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.details!r}, code={self.code})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The code is keyword-only, so the default pickling (type(self)(*self.args)) would
        # lose it for the base class.
        return (_rebuild, (type(self), self.details, self.code))


def _rebuild(cls: type[CacheError], details: str, code: grpc.StatusCode) -> CacheError:
    return cls(details, code=code)


class InvalidArgument(CacheError, ValueError):
    """Bad key, value, TTL or request shape (checked by the server, a few things locally)."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CacheError):
    default_code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(CacheError):
    """A request valid in itself that the gateway cannot apply now."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(CacheError):
    """A result would leave its range, e.g. `incr` past a signed 64-bit integer (nothing
    changed)."""

    default_code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(CacheError):
    """A limit was reached: the gateway's calls in flight or Subscribe streams, an answer's
    size, or a tenant's quota. Nothing was done. `retry_after_ms` is how long the gateway
    asks the caller to wait before trying again (its ``retry-after-ms`` trailing
    metadata), None when it named no delay (a size limit: retrying will not help)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_ms: int | None = None


class Unavailable(CacheError):
    """The gateway, or the Redis behind it, cannot be reached; retry later."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CacheError, TimeoutError):
    """The call's deadline passed before the gateway answered."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(CacheError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CacheError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(CacheError):
    """The RPC belongs to a capability this gateway does not serve (yet)."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[CacheError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        OutOfRange,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Unimplemented,
    )
}


def error_from_status(code_number: int, details: str) -> CacheError:
    """The error for a status carried in a message (e.g. one SetMany entry's failure)."""
    code = next((c for c in grpc.StatusCode if c.value[0] == code_number), grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, CacheError)(details, code=code)


def error_from_rpc(error: grpc.RpcError) -> CacheError:
    """The `CacheError` for a failed call of a sync or asyncio channel."""
    # A bare RpcError (raised by some interceptors) has neither method.
    code_of = getattr(error, "code", None)
    code = code_of() if callable(code_of) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_of = getattr(error, "details", None)
    details = details_of() if callable(details_of) else None
    if not isinstance(details, str) or not details:
        details = _describe(code)
    out = _BY_CODE.get(code, CacheError)(details, code=code)
    if isinstance(out, ResourceExhausted):
        out.retry_after_ms = _retry_after_ms(error)
    return out


RETRY_AFTER = "retry-after-ms"


def _retry_after_ms(error: grpc.RpcError) -> int | None:
    """The gateway's ``retry-after-ms`` trailing metadata, if it sent one. Only for a
    finished sync call or an AioRpcError, whose trailers are already here (never waits)."""
    trailing_of = getattr(error, "trailing_metadata", None)
    if not callable(trailing_of):
        return None
    try:
        trailing = trailing_of()
    except Exception:  # a call object that has no trailers to give
        return None
    if not isinstance(trailing, Iterable) or isinstance(trailing, str | bytes):
        return None  # e.g. an awaitable of a live aio call: not ours to wait on
    for item in trailing:
        key, value = item[0], item[1]
        if key == RETRY_AFTER:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return int(text) if text.isdigit() else None
    return None


def _describe(code: grpc.StatusCode) -> str:
    # StatusCode values are (number, "words"), e.g. (4, "deadline exceeded").
    words = code.value[1] if isinstance(code.value, tuple) else code.name
    return str(words)
