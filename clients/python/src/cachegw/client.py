"""The blocking client: a grpc sync channel, one call per method, nothing else."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from cachegw import _calls, _tracing
from cachegw._calls import DEFAULT, Call, Timeout
from cachegw.errors import error_from_rpc
from cachegw.models import Entry, SetResult
from cachegw.v1 import cache_pb2_grpc

__all__ = ["DEFAULT_TARGET", "Client"]

DEFAULT_TARGET = "127.0.0.1:50051"

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Out = TypeVar("_Out")


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
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=list(channel_options))
        # With the application's OpenTelemetry set up, calls carry its trace context.
        self._stub = cache_pb2_grpc.CacheServiceStub(_tracing.intercept(self._channel))

    def get(self, key: str, *, timeout: Timeout = DEFAULT) -> bytes | None:
        """The value of `key`, or None on a miss."""
        return self._call(self._stub.Get, _calls.get(key), timeout)

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
        return self._call(self._stub.GetMany, _calls.get_many(keys), timeout)

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
        timeout: Timeout = DEFAULT,
    ) -> SetResult:
        """Store `value` (a str is UTF-8 encoded) for `ttl` seconds (None = the class TTL)."""
        call = _calls.set_(
            key, value, ttl=ttl, tags=tags, lease_token=lease_token, if_version=if_version
        )
        return self._call(self._stub.Set, call, timeout)

    def delete(self, *keys: str, timeout: Timeout = DEFAULT) -> int:
        """Remove `keys`; returns how many of them existed."""
        return self._call(self._stub.Delete, _calls.delete(keys), timeout)

    def close(self) -> None:
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self.timeout!r})"

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
        call: Call[_Req, _Resp, _Out],
        timeout: Timeout,
    ) -> _Out:
        try:
            response = method(call.request, timeout=_calls.deadline(self.timeout, timeout))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return call.decode(response)
