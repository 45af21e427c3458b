"""cachegw: the Python client of the cachegw gRPC cache gateway.

    from cachegw import Client

    with Client("127.0.0.1:50051") as cache:
        cache.set("product:42", b"...", ttl=300)
        value = cache.get("product:42")

`AsyncClient` is the same API for asyncio. Failures raise `CacheError` subclasses.
Over TLS, with a token: ``Client(target, tls=TLSConfig(ca="ca.pem"), token="...")``.
"""

from cachegw._calls import DEFAULT, Timeout
from cachegw._security import TLSConfig, TokenSource
from cachegw.aio import AsyncClient
from cachegw.client import DEFAULT_TARGET, Client
from cachegw.errors import (
    CacheError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
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
from cachegw.near import NearCache

__all__ = [
    "DEFAULT",
    "DEFAULT_TARGET",
    "AllowResult",
    "AsyncClient",
    "CacheError",
    "Client",
    "DeadlineExceeded",
    "Entry",
    "Event",
    "EventKind",
    "FailedPrecondition",
    "InvalidArgument",
    "InvalidateResult",
    "NearCache",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "RebuildProgress",
    "ResourceExhausted",
    "SetOutcome",
    "SetResult",
    "Status",
    "TLSConfig",
    "Tier",
    "Timeout",
    "TokenSource",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
