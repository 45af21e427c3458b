"""The asyncio client: a grpc.aio channel, one awaited call per method, nothing else.

Every method takes `timeout` (ruff ASYNC109 is silenced for it): it is the gRPC deadline,
which the gateway sees and honours server-side, not a local `asyncio.timeout`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio

from cachegw import _calls, _tracing
from cachegw._calls import DEFAULT, Call, Timeout
from cachegw.client import DEFAULT_TARGET
from cachegw.errors import error_from_rpc
from cachegw.models import Entry, SetResult
from cachegw.v1 import cache_pb2_grpc

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
    ) -> None:
        self.target = target
        self.timeout = timeout
        # With the application's OpenTelemetry set up, calls carry its trace context.
        self._channel = grpc.aio.insecure_channel(
            target, options=list(channel_options), interceptors=_tracing.aio_interceptors()
        )
        self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)

    async def get(self, key: str, *, timeout: Timeout = DEFAULT) -> bytes | None:  # noqa: ASYNC109
        """The value of `key`, or None on a miss."""
        return await self._call(self._stub.Get, _calls.get(key), timeout)

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
        return await self._call(self._stub.GetMany, _calls.get_many(keys), timeout)

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
        return await self._call(self._stub.Set, call, timeout)

    async def delete(self, *keys: str, timeout: Timeout = DEFAULT) -> int:  # noqa: ASYNC109
        """Remove `keys`; returns how many of them existed."""
        return await self._call(self._stub.Delete, _calls.delete(keys), timeout)

    async def close(self) -> None:
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
