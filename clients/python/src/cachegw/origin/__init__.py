"""Implement a cachegw origin in Python: the service a gateway calls to load, store and
remove the data it caches (`cachegw.v1.Origin`, protos/cachegw/v1/origin.proto).

    from cachegw.origin import Found, Origin, Stored

    class Products(Origin):
        async def load(self, keys):
            rows = await db.fetch("SELECT key, value, version FROM products WHERE key = ANY($1)",
                                  keys)
            return {r["key"]: Found(r["value"], version=r["version"]) for r in rows}

        async def store(self, entries):
            return [Stored(await db.save(e.key, e.value)) for e in entries]

    asyncio.run(Products().serve("127.0.0.1:7000"))

A key `load` leaves out of its answer does not exist (NOT_FOUND). What you return is
checked before it is sent (a result of the wrong type, a tag that is empty, a version
past 2^53 are the origin's bug: the call fails INTERNAL with the reason, logged here);
raise `OriginUnavailable` (or let an `OSError` / `TimeoutError` escape) when the data
cannot be reached now: the gateway answers its callers UNAVAILABLE and tries again for
the next one. `store`, `remove` and `list_keys` are optional: a method not overridden
answers UNIMPLEMENTED. Behind a gateway with tenants, `current_tenant()` names the
tenant a call is made for ("" without tenants): an origin serving several tenants keeps
their data apart by it, as the gateway does in Redis. Every call is logged at INFO
(method and keys) on the ``cachegw.origin`` logger. `cachegw.origin.postgres` is a
complete example over a PostgreSQL table.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from cachegw.v1 import origin_pb2 as pb

__all__ = [
    "MAX_VERSION",
    "Conflict",
    "Found",
    "Origin",
    "OriginUnavailable",
    "Refused",
    "StoreAnswer",
    "Stored",
    "Write",
    "current_tenant",
]

log = logging.getLogger("cachegw.origin")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Origin"].full_name
# Versions travel through Redis scripts as Lua numbers (doubles): exact below 2^53.
MAX_VERSION = 2**53 - 1

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

# The gateway names the tenant of each call in this metadata (gateway: space.py).
TENANT_METADATA = "cachegw-tenant"
_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("cachegw_origin_tenant", default="")


def current_tenant() -> str:
    """The tenant the call being served is made for; "" from a gateway without tenants."""
    return _tenant.get()


def _tenant_of(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_METADATA:
            return value if isinstance(value, str) else value.decode()
    return ""


class OriginUnavailable(Exception):
    """The data cannot be reached now (the database is down, a pool is exhausted): the
    call answers UNAVAILABLE with this message."""


@dataclass(frozen=True, slots=True)
class Found:
    """A key's value as `load` returns it."""

    value: bytes
    version: int = 0
    """The key's version in the source of truth (grows with every write and removal of
    the key, never reused); 0 = unversioned. See origin.proto, "Versions"."""
    ttl: float | None = None
    """Seconds the gateway may cache it; None = the key class's TTL."""
    tags: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Write:
    """One entry `store` is asked to write."""

    key: str
    value: bytes
    ttl: float | None = None
    """The TTL the caller gave the cache, for information."""
    tags: tuple[str, ...] = ()
    if_version: int | None = None
    """Compare-and-set: write only if the key's version equals this (0 = only if absent)."""
    write_version: int | None = None
    """Write-behind: the version the gateways gave this write. Store it only when it is
    above the write_version of the key's last write-behind store or removal you applied,
    else answer `Conflict` (a redelivery, or a write another one overtook). None = not a
    write-behind write."""


@dataclass(frozen=True, slots=True)
class Stored:
    """`store` wrote the entry; `version` is the key's new version (0 = unversioned)."""

    version: int = 0


@dataclass(frozen=True, slots=True)
class Conflict:
    """`if_version` did not match: nothing written; `version` is the current one (0 = absent)."""

    version: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The value breaks a rule of the data: nothing written; `message` tells the caller why."""

    message: str


StoreAnswer = Stored | Conflict | Refused


@dataclass(slots=True)
class CallCounts:
    """Calls and keys per method since start (also logged per call)."""

    calls: dict[str, int] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)

    def add(self, method: str, keys: int) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        self.keys[method] = self.keys.get(method, 0) + keys


class _Bad(Exception):
    """What the subclass returned cannot be sent (INTERNAL)."""


def _version(v: object, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_VERSION:
        raise _Bad(f"{where}: version must be an int in [0, 2^53) (got {v!r})")
    return v


def _tags(tags: object, where: str) -> list[str]:
    if isinstance(tags, str) or not isinstance(tags, Sequence):
        raise _Bad(f"{where}: tags must be a sequence of strings (got {tags!r})")
    out = list(tags)
    for t in out:
        if not isinstance(t, str) or not t:
            raise _Bad(f"{where}: every tag must be a non-empty string (got {t!r})")
    return out


def _load_result(key: str, found: object) -> pb.LoadResult:
    if found is None:
        return pb.LoadResult(key=key, status=pb.LOAD_STATUS_NOT_FOUND)
    if not isinstance(found, Found):
        raise _Bad(f"load()[{key!r}] must be a Found (got {type(found).__name__})")
    if not isinstance(found.value, bytes | bytearray | memoryview):
        raise _Bad(f"load()[{key!r}].value must be bytes (got {type(found.value).__name__})")
    result = pb.LoadResult(
        key=key,
        status=pb.LOAD_STATUS_FOUND,
        value=bytes(found.value),
        tags=_tags(found.tags, f"load()[{key!r}]"),
        version=_version(found.version, f"load()[{key!r}]"),
    )
    if found.ttl is not None:
        ms = round(found.ttl * 1000) if isinstance(found.ttl, int | float) else 0
        if ms <= 0:
            raise _Bad(f"load()[{key!r}].ttl must be a positive number (got {found.ttl!r})")
        result.ttl_ms = ms
    return result


def _store_result(key: str, answer: object) -> pb.StoreResult:
    if isinstance(answer, Stored):
        version = _version(answer.version, f"store() of {key!r}")
        return pb.StoreResult(key=key, outcome=pb.STORE_OUTCOME_STORED, version=version)
    if isinstance(answer, Conflict):
        version = _version(answer.version, f"store() of {key!r}")
        return pb.StoreResult(key=key, outcome=pb.STORE_OUTCOME_VERSION_CONFLICT, version=version)
    if isinstance(answer, Refused):
        return pb.StoreResult(key=key, outcome=pb.STORE_OUTCOME_REFUSED, message=answer.message)
    raise _Bad(f"store() of {key!r} must answer Stored, Conflict or Refused (got {answer!r})")


class Origin:
    """Subclass it and implement `load` (and `store`, `remove`, `list_keys` as offered)."""

    def __init__(self) -> None:
        self.counts = CallCounts()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    # -- what a subclass implements --------------------------------------------------------

    async def load(self, keys: Sequence[str]) -> Mapping[str, Found | None]:
        """The values of `keys` (each asked once); a key absent (or None) does not exist."""
        raise NotImplementedError

    async def store(self, entries: Sequence[Write]) -> Sequence[StoreAnswer]:
        """Write `entries`; one answer per entry, in order."""
        raise NotImplementedError

    async def remove(self, keys: Sequence[str]) -> Mapping[str, int]:
        """Remove `keys`: the keys that existed, each with the version of its removal
        (0 = unversioned); keys left out did not exist."""
        raise NotImplementedError

    async def remove_written(
        self, keys: Sequence[str], write_versions: Sequence[int]
    ) -> Mapping[str, int]:
        """Write-behind removals: remove each key only when its write version is above
        the write_version of the key's last write-behind store or removal applied, and
        remember it (a later, older store must not bring the key back). Answers as
        `remove`. Not overridden: UNIMPLEMENTED (the gateway dead-letters the removals)."""
        raise NotImplementedError

    async def list_keys(self, prefix: str, limit: int, page_token: str) -> tuple[list[str], str]:
        """A page of the keys starting with `prefix` (at most `limit`, 0 = your choice)
        after `page_token`, and the token of the next page ('' = none)."""
        raise NotImplementedError

    # -- the gRPC face ---------------------------------------------------------------------

    async def _call(self, context: Context, method: str, work: Callable[[], Awaitable[T]]) -> T:
        _tenant.set(_tenant_of(context))  # this call's task only
        try:
            return await work()
        except NotImplementedError:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"this origin does not implement {method}"
            )
        except (OriginUnavailable, OSError, TimeoutError) as exc:
            log.warning("origin %s: unavailable: %s", method, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"origin {method}: {exc}")
        except _Bad as exc:
            log.error("origin %s: %s", method, exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"origin {method}: {exc}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("origin %s failed", method)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"origin {method} failed: {type(exc).__name__}: {exc}"
            )

    def _shown(self, keys: Sequence[str]) -> str:
        return ", ".join(keys[:5]) + (f", ... ({len(keys)} keys)" if len(keys) > 5 else "")

    async def _load(self, request: pb.LoadRequest, context: Context) -> pb.LoadResponse:
        keys = list(request.keys)
        self.counts.add("Load", len(keys))
        log.info("origin Load: %d keys: %s", len(keys), self._shown(keys))

        async def work() -> pb.LoadResponse:
            found = await self.load(keys)
            if not isinstance(found, Mapping):
                raise _Bad(f"load() must return a mapping (got {type(found).__name__})")
            return pb.LoadResponse(results=[_load_result(k, found.get(k)) for k in keys])

        return await self._call(context, "Load", work)

    async def _store(self, request: pb.StoreRequest, context: Context) -> pb.StoreResponse:
        writes = [
            Write(
                e.key,
                e.value,
                e.ttl_ms / 1000 if e.HasField("ttl_ms") else None,
                tuple(e.tags),
                e.if_version if e.HasField("if_version") else None,
                e.write_version if e.HasField("write_version") else None,
            )
            for e in request.entries
        ]
        self.counts.add("Store", len(writes))
        log.info("origin Store: %d entries: %s", len(writes), self._shown([w.key for w in writes]))

        async def work() -> pb.StoreResponse:
            answers = list(await self.store(writes))
            if len(answers) != len(writes):
                raise _Bad(f"store() answered {len(answers)} results for {len(writes)} entries")
            return pb.StoreResponse(
                results=[_store_result(w.key, a) for w, a in zip(writes, answers, strict=True)]
            )

        return await self._call(context, "Store", work)

    async def _remove(self, request: pb.RemoveRequest, context: Context) -> pb.RemoveResponse:
        keys = list(request.keys)
        versions = list(request.write_versions)
        self.counts.add("Remove", len(keys))
        log.info("origin Remove: %d keys: %s", len(keys), self._shown(keys))

        async def work() -> pb.RemoveResponse:
            if versions and len(versions) != len(keys):
                raise _Bad(f"{len(versions)} write_versions for {len(keys)} keys")
            gone = await (self.remove_written(keys, versions) if versions else self.remove(keys))
            if not isinstance(gone, Mapping):
                raise _Bad(f"remove() must return a mapping (got {type(gone).__name__})")
            return pb.RemoveResponse(
                results=[
                    pb.RemoveResult(
                        key=k,
                        removed=k in gone,
                        version=_version(gone.get(k, 0), f"remove() of {k!r}"),
                    )
                    for k in keys
                ]
            )

        return await self._call(context, "Remove", work)

    async def _list(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:
        self.counts.add("List", 0)
        log.info("origin List: prefix %r", request.prefix)

        async def work() -> pb.ListResponse:
            keys, token = await self.list_keys(request.prefix, request.limit, request.page_token)
            return pb.ListResponse(keys=keys, next_page_token=token)

        return await self._call(context, "List", work)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The `cachegw.v1.Origin` handlers of this origin, for a server of your own."""

        def unary(fn: Callable[..., Awaitable[Any]], req: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=req.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )

        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Load": unary(self._load, pb.LoadRequest),
                "Store": unary(self._store, pb.StoreRequest),
                "Remove": unary(self._remove, pb.RemoveRequest),
                "List": unary(self._list, pb.ListRequest),
            },
        )

    # -- running it -------------------------------------------------------------------

    async def start(self, listen: str = "127.0.0.1:0") -> int:
        """Serve on `listen` (port 0: a free one); returns the port."""
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ]
        )
        server.add_generic_rpc_handlers((self.handler(),))
        self.port = server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"could not listen on {listen}")
        await server.start()
        self._server = server
        log.info("origin serving on %s", f"{listen.rsplit(':', 1)[0]}:{self.port}")
        return self.port

    async def stop(self, grace: float = 2.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def serve(self, listen: str = "127.0.0.1:0", grace: float = 2.0) -> None:
        """Serve until SIGINT or SIGTERM, then drain in-flight calls for `grace` seconds."""
        await self.start(listen)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # not on Windows
                loop.add_signal_handler(sig, stopping.set)
        try:
            await stopping.wait()
        finally:
            await self.stop(grace)
