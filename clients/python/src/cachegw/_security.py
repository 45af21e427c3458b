"""Transport security and credentials of the clients' channels: TLS (mutual where asked)
and a bearer token in the `authorization` metadata of every call.

The token goes out as per-call metadata, on TLS and plaintext channels alike, rather
than as gRPC call credentials: grpc Python runs a call-credentials plugin on a new thread
for every call, which cost an L1-hit Get about 170 us more client CPU than the same
token as metadata (`benchmarks/bench_tls.py --call-credentials`: 1.40x plaintext's CPU
per call against 1.13x). gRPC refuses call credentials on plaintext channels so that a
token never travels in the clear; this module keeps that rule itself: a token over
plaintext is sent only to a loopback target (a gateway on the same host).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import grpc.aio

PEM: TypeAlias = bytes | str | os.PathLike[str]
"""PEM content (bytes), or the path of a PEM file (str or a path)."""

TokenSource: TypeAlias = str | Callable[[], str] | None
"""A bearer token, or a function called for each call (a rotated token is picked up)."""

AUTHORIZATION = "authorization"


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """How a client connects over TLS.

    `ca`: the CA certificates that signed the gateway's certificate (None = the system's
    trusted roots); `cert` and `key`: this client's certificate and key, for a gateway
    that requires client certificates (mutual TLS); `server_name`: the name to check the
    gateway's certificate against, when it differs from the target's host (e.g. a target
    given by IP address). Each PEM is bytes (its content) or a path (str or PathLike);
    files are read when the client is made."""

    ca: PEM | None = None
    cert: PEM | None = None
    key: PEM | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials; raises ValueError naming what cannot be used."""
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "tls: a client certificate needs its key and a key its certificate "
                "(give both cert and key, or neither)"
            )
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca, "ca"),
            private_key=_pem(self.key, "key"),
            certificate_chain=_pem(self.cert, "cert"),
        )

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _pem(value: PEM | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    path = os.fspath(value)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"tls {what}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"tls {what}: {path} is not a PEM file (no -----BEGIN line)")
    return data


def _check_token(token: object) -> str:
    """The token, if it can travel in metadata. The messages never show the token."""
    if not isinstance(token, str):
        raise TypeError(f"a token must be a str, not {type(token).__name__}")
    if not token:
        raise ValueError("the token is empty")
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise ValueError("a token must be printable ASCII without spaces")
    return token


Metadata: TypeAlias = tuple[tuple[str, str], ...]


class Bearer:
    """The `authorization: Bearer <token>` metadata of each call."""

    __slots__ = ("_metadata", "_source")

    def __init__(self, token: str | Callable[[], str]) -> None:
        if callable(token):
            self._source: Callable[[], str] | None = token
            self._metadata: Metadata | None = None
        else:
            self._source = None
            self._metadata = ((AUTHORIZATION, f"Bearer {_check_token(token)}"),)

    def metadata(self) -> Metadata:
        if self._metadata is not None:
            return self._metadata
        assert self._source is not None
        return ((AUTHORIZATION, f"Bearer {_check_token(self._source())}"),)

    def __repr__(self) -> str:
        return "Bearer(<hidden>)"


def bearer(token: TokenSource, *, target: str, secure: bool) -> Bearer | None:
    """The token's metadata source, or None without a token. Over plaintext only to a
    loopback target: anywhere else the token would cross the network in the clear."""
    if token is None:
        return None
    if not secure and not is_loopback(target):
        raise ValueError(
            f"a token is sent over plaintext only to a loopback target (127.0.0.1, ::1, "
            f"localhost), not {target!r}: connect with tls=... (CLI: --tls or --tls-ca)"
        )
    return Bearer(token)


_SCHEMES = ("dns:///", "dns:", "ipv4:", "ipv6:")


def is_loopback(target: str) -> bool:
    """Whether a gRPC target names this host (loopback address, localhost, unix socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in _SCHEMES:
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        host = target[1:].partition("]")[0]
    elif target.count(":") == 1:
        host = target.partition(":")[0]
    else:
        host = target  # a bare host, or a bare IPv6 address
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_tls(tls: TLSConfig | bool | None) -> TLSConfig | None:
    if tls is True:
        return TLSConfig()
    if tls is None or tls is False:
        return None
    if not isinstance(tls, TLSConfig):
        raise TypeError(f"tls must be a TLSConfig, True or None, not {type(tls).__name__}")
    return tls


def sync_channel(
    target: str, tls: TLSConfig | None, options: Sequence[tuple[str, Any]]
) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.credentials(), options=[*tls.options(), *options])


def aio_channel(
    target: str, tls: TLSConfig | None, options: Sequence[tuple[str, Any]], interceptors: Any
) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(
        target,
        tls.credentials(),
        options=[*tls.options(), *options],
        interceptors=interceptors,
    )
