"""Authentication and permissions on every CacheService call (`[auth] enabled = true`).

Each call carries `authorization: Bearer <token>` metadata: a static token whose hash is
in the tokens file (tokens.py), or a signed token (jwt_tokens.py). With mTLS, a call
without a token may be made by a client certificate the tokens file names
([[identities]]). What it stands for is a `Principal`; the call then needs the method's
permission (principal.METHOD_PERMISSIONS), and the handler finds the principal with
`current_principal()`.

- UNAUTHENTICATED: no token, not "Bearer <token>", unknown, expired, a signed token
  that does not verify; the message says which and never repeats the token.
- PERMISSION_DENIED: the principal lacks the method's permission.

A token checked once is remembered (bounded), so a call with a known token costs a
metadata scan and a dict lookup, no hash and no signature. The tokens file and the JWT
key file are polled every `auth.reload_seconds`; a change empties that memory, and every
open Subscribe stream is checked again: a stream whose token was removed, no longer
verifies or has expired ends with UNAUTHENTICATED within one period, not at its next
event. Health checking and reflection are other services: never wrapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc

from cachegw_gateway.admission import Context, MethodHandler, Stream, Unary
from cachegw_gateway.config import AuthConfig, ConfigError
from cachegw_gateway.jwt_tokens import JwtRefused, JwtRules, VerifyKey, load_keys, looks_like_jwt
from cachegw_gateway.jwt_tokens import verify as verify_jwt
from cachegw_gateway.principal import (
    METHOD_PERMISSIONS,
    CredentialError,
    Permission,
    Principal,
    permission_names,
)
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.tls import peer_identities
from cachegw_gateway.tokens import MAX_TOKEN_CHARS, TokenTable, parse_tokens_bytes

log = logging.getLogger(__name__)

_current: ContextVar[Principal | None] = ContextVar("cachegw_principal", default=None)

# What a stream's credential was: the authorization header, or the certificate identities.
Credential = str | tuple[str, ...]

# Files are re-read (not only stat'ed) this long after their last change: a rewrite in
# place within the file system's timestamp granularity may keep mtime and size.
_RECENT_SECONDS = 2.0


def current_principal() -> Principal | None:
    """The principal of the call being served; None when [auth] is off."""
    return _current.get()


class Unauthenticated(Exception):
    """The call's credential is missing or not valid; the message says why."""


def check_config(config: AuthConfig) -> None:
    """Load the tokens and key files once, as `cachegw serve` starts: ConfigError if not usable."""
    if not config.enabled:
        return
    try:
        if config.tokens_file:
            parse_tokens_bytes(_read(config.tokens_file), config.tokens_file)
        if config.jwt_key_file:
            load_keys(config.jwt_key_file, config.jwt_algorithm)
    except CredentialError as exc:
        raise ConfigError(str(exc)) from None


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{path}: file not found") from None
    except OSError as exc:
        raise CredentialError(f"{path}: cannot read: {exc.strerror}") from None


class _Watched:
    """A file polled for changes: stat first, the bytes when the stat moved or is recent."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature: tuple[int, ...] | None = self._stat()
        self._data: bytes | None = None

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)

    def first(self) -> bytes:
        self._data = _read(self.path)
        return self._data

    def changed(self) -> bytes | None:
        """The new contents if the file changed since it was last read, else None.
        Raises CredentialError when the file cannot be read (gone, no permission)."""
        signature = self._stat()
        if signature is None:
            _read(self.path)  # raises the reason
        assert signature is not None
        recent = time.time() - signature[0] / 1e9 < _RECENT_SECONDS
        if signature == self._signature and not recent:
            return None
        self._signature = signature
        data = _read(self.path)
        if data == self._data:
            return None
        self._data = data
        return data


@dataclass(eq=False)
class _OpenStream:
    principal: Principal
    credential: Credential
    context: Context
    task: asyncio.Task[Any]
    ended: bool = False


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _needs_write_for_lease(request: Any) -> bool:
    return bool(getattr(request, "lease", False))


# Calls whose request may need more than the method's permission (principal.py says why).
_EXTRA_WRITE: dict[str, Callable[[Any], bool]] = {"Get": _needs_write_for_lease}


class Authenticator:
    """Checks credentials and permissions for one gateway (its event loop)."""

    def __init__(
        self,
        config: AuthConfig,
        stats: GatewayStats,
        identities: Callable[[Context], tuple[str, ...]] = peer_identities,
    ) -> None:
        self.config = config
        self._stats = stats
        self._identities = identities
        self._rules = JwtRules(
            config.jwt_algorithm, config.jwt_issuer, config.jwt_audience, config.jwt_leeway_seconds
        )
        self.tokens = TokenTable()
        self.keys: tuple[VerifyKey, ...] = ()
        self._tokens_file = _Watched(config.tokens_file) if config.tokens_file else None
        self._key_file = _Watched(config.jwt_key_file) if config.jwt_key_file else None
        try:
            if self._tokens_file is not None:
                self.tokens = parse_tokens_bytes(self._tokens_file.first(), config.tokens_file)
            if self._key_file is not None:
                self._key_file.first()
                self.keys = load_keys(config.jwt_key_file, config.jwt_algorithm)
        except CredentialError as exc:
            raise ConfigError(str(exc)) from None
        stats.auth_credentials = self.tokens.size + len(self.keys)
        self._cache: dict[str, Principal] = {}
        self._streams: set[_OpenStream] = set()
        self._errors: dict[str, str] = {}  # path -> the error last logged for it
        self._task: asyncio.Task[None] | None = None

    # -- credentials ----------------------------------------------------------------------

    def principal_for(self, credential: Credential | None) -> Principal:
        """The principal of an authorization header value or certificate identities.
        Raises Unauthenticated, saying why (never echoing the token)."""
        if credential is None or credential == ():
            raise Unauthenticated(
                "this gateway needs a token: send the call metadata 'authorization: Bearer <token>'"
            )
        if isinstance(credential, tuple):
            principal = self.tokens.for_identities(credential)
            if principal is None:
                raise Unauthenticated(
                    "no token, and the client certificate (" + ", ".join(credential)[:200] + ") "
                    "is not one the tokens file names: send 'authorization: Bearer <token>'"
                )
        else:
            cached = self._cache.get(credential)
            principal = cached if cached is not None else self._verify(credential)
        if principal.expired(time.time()):
            if isinstance(credential, str):
                self._cache.pop(credential, None)
            raise Unauthenticated(
                f"the credential {principal.name!r} expired at "
                f"{_when(cast(float, principal.expires_at))}"
            )
        return principal

    def _verify(self, header: str) -> Principal:
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise Unauthenticated(
                "the authorization metadata must be 'Bearer <token>' (one space, then the token)"
            )
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated(f"the bearer token is longer than {MAX_TOKEN_CHARS} characters")
        if looks_like_jwt(token):
            if not self.keys:
                raise Unauthenticated(
                    "the bearer token is a signed token (JWT), and this gateway takes none "
                    "(auth.jwt_key_file is not set)"
                )
            try:
                principal = verify_jwt(token, self.keys, self._rules)
            except JwtRefused as exc:
                raise Unauthenticated(str(exc)) from None
        else:
            found = self.tokens.lookup(token)
            if found is None:
                raise Unauthenticated(
                    "the bearer token is unknown to this gateway: its hash is not in the "
                    "tokens file (never added, or removed)"
                )
            principal = found
        if not principal.expired(time.time()):
            if len(self._cache) >= self.config.cache_size:
                del self._cache[next(iter(self._cache))]  # the oldest: first inserted
            self._cache[header] = principal
        return principal

    def _credential(self, context: Context) -> Credential | None:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                return cast(str, value)
        if self.tokens.by_identity:
            return self._identities(context)
        return None

    # -- the wrap -------------------------------------------------------------------------

    def wrap(self, method: str, handler: MethodHandler) -> MethodHandler:
        needed = METHOD_PERMISSIONS[method]  # KeyError: a new method needs a permission
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, cast(Unary, handler.unary_unary), needed),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, cast(Stream, handler.unary_stream), needed),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise AssertionError(f"{method}: no auth wrap for this kind of handler")

    async def _refuse(self, context: Context, exc: Unauthenticated) -> None:
        self._stats.auth_unauthenticated += 1
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))

    async def _deny(
        self, context: Context, method: str, principal: Principal, needed: Permission, why: str = ""
    ) -> None:
        self._stats.auth_permission_denied += 1
        missing = needed & ~principal.permissions
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{principal.name!r} (tenant {principal.tenant}) may not call {method}: it needs "
            f"the {permission_names(missing)} permission{why}; it has "
            f"{permission_names(principal.permissions)}",
        )

    def _unary(self, method: str, fn: Unary, needed: Permission) -> Unary:
        cache = self._cache
        current = _current
        now = time.time
        extra = _EXTRA_WRITE.get(method)
        need = needed.value

        async def guarded(request: Any, context: Context) -> Any:
            # The hot path: a remembered authorization header, unexpired.
            header: str | None = None
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    header = cast(str, value)  # bytes only for keys ending in -bin
                    break
            principal = cache.get(header) if header is not None else None
            if principal is None or (
                principal.expires_at is not None and principal.expires_at <= now()
            ):
                try:
                    principal = self.principal_for(
                        header if header is not None else self._credential(context)
                    )
                except Unauthenticated as exc:
                    await self._refuse(context, exc)
                    raise  # not reached: abort raises
            if principal.mask & need != need:
                await self._deny(context, method, principal, needed)
            if extra is not None and extra(request) and not principal.may(Permission.WRITE):
                await self._deny(
                    context,
                    method,
                    principal,
                    Permission.WRITE,
                    " too, to be granted a lease (a lease is a promise to fill the key)",
                )
            # gRPC serves each call in its own task, with its own copy of the context: the
            # value ends with the call, no reset needed (it would cost as much again).
            current.set(principal)
            return await fn(request, context)

        return guarded

    def _stream(self, method: str, fn: Stream, needed: Permission) -> Stream:
        async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
            credential = self._credential(context)
            try:
                principal = self.principal_for(credential)
            except Unauthenticated as exc:
                await self._refuse(context, exc)
                raise
            assert credential is not None
            if not principal.may(needed):
                await self._deny(context, method, principal, needed)
            task = asyncio.current_task()
            assert task is not None
            stream = _OpenStream(principal, credential, context, task)
            self._streams.add(stream)
            _current.set(principal)  # the call's own task and context, as in _unary
            try:
                async for message in fn(request, context):
                    if stream.ended:
                        break  # its status went out already (_end)
                    yield message
            finally:
                self._streams.discard(stream)

        return guarded

    # -- reloads and open streams ---------------------------------------------------------

    def start(self) -> None:
        if self._task is None and (self._tokens_file or self._key_file):
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_seconds)
            try:
                await self.poll()
            except Exception:  # a bug here must not stop reloads for good
                log.exception("auth: checking the tokens and key files failed")

    async def poll(self) -> None:
        """Reload what changed; end the open streams whose credential no longer holds."""
        changed = False
        if self._tokens_file is not None:
            tokens = await self._reload(self._tokens_file, "tokens file", parse_tokens_bytes)
            if tokens is not None:
                self.tokens = tokens
                changed = True
                log.info(
                    "auth: reloaded %s: %d tokens, %d identities",
                    self.config.tokens_file,
                    len(tokens.by_digest),
                    len(tokens.by_identity),
                    extra={"event": "auth_reload", "path": self.config.tokens_file},
                )
        if self._key_file is not None:
            algorithm = self.config.jwt_algorithm
            keys = await self._reload(
                self._key_file, "JWT key file", lambda _data, path: load_keys(path, algorithm)
            )
            if keys is not None:
                self.keys = keys
                changed = True
                log.info(
                    "auth: reloaded %s: %d keys",
                    self.config.jwt_key_file,
                    len(keys),
                    extra={"event": "auth_reload", "path": self.config.jwt_key_file},
                )
        if changed:
            self._cache.clear()
            self._stats.auth_credentials = self.tokens.size + len(self.keys)
        await self._check_streams(recheck=changed)

    async def _reload(
        self, watched: _Watched, what: str, parse: Callable[[bytes, str], Any]
    ) -> Any:
        """The file's new contents parsed, None when unchanged or broken (then the
        previous contents stay, and the error is logged once)."""
        try:
            data = await asyncio.to_thread(watched.changed)
            parsed = None if data is None else await asyncio.to_thread(parse, data, watched.path)
        except CredentialError as exc:
            message = str(exc)
            if self._errors.get(watched.path) != message:
                self._errors[watched.path] = message
                self._stats.auth_reload_errors += 1
                log.error(
                    "auth: %s not reloaded, the previous contents stay in force: %s",
                    what,
                    message,
                    extra={"event": "auth_reload_failed", "path": watched.path},
                )
            return None
        if parsed is not None:
            self._errors.pop(watched.path, None)
        return parsed

    async def _check_streams(self, *, recheck: bool) -> None:
        now = time.time()
        for stream in list(self._streams):
            if stream.ended:
                continue
            try:
                if recheck:
                    principal = self.principal_for(stream.credential)
                elif stream.principal.expired(now):
                    raise Unauthenticated(
                        f"the credential {stream.principal.name!r} expired at "
                        f"{_when(cast(float, stream.principal.expires_at))}"
                    )
                else:
                    continue
            except Unauthenticated as exc:
                await self._end(stream, grpc.StatusCode.UNAUTHENTICATED, str(exc))
                continue
            old = stream.principal
            if not principal.may(Permission.SUBSCRIBE):
                await self._end(
                    stream,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{principal.name!r} no longer has the subscribe permission",
                )
            elif (principal.tenant, principal.prefixes) != (old.tenant, old.prefixes):
                await self._end(
                    stream,
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"the scope of {principal.name!r} changed (tenant or prefixes): "
                    "subscribe again",
                )
            else:
                stream.principal = principal  # e.g. a later expiry

    async def _end(self, stream: _OpenStream, code: grpc.StatusCode, message: str) -> None:
        """End a stream now: its status goes out at once, then its handler is cancelled
        (it may be waiting for an event that never comes)."""
        stream.ended = True
        self._streams.discard(stream)
        self._stats.auth_unauthenticated += code is grpc.StatusCode.UNAUTHENTICATED
        self._stats.auth_streams_ended += 1
        with contextlib.suppress(Exception):  # AbortError: how abort ends its caller
            await stream.context.abort(code, message)
        stream.task.cancel()

    @property
    def open_streams(self) -> int:
        return len(self._streams)
