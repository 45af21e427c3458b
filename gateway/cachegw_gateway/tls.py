"""TLS and mutual TLS on the gRPC port, with certificates reloaded without a restart.

`ServerTls` reads and checks the PEM files of ``[server] tls_cert / tls_key /
tls_client_ca`` (a key that does not match its certificate, an unreadable or non-PEM file
is refused at start with the config key and the file named), and makes gRPC's dynamic
server credentials: gRPC asks `ServerTls.fetch` at the start of every TLS handshake, which
looks at the files (inode, size, mtime: a symlink swap, as Kubernetes does for secrets,
counts) and hands gRPC the new certificate when they changed, so new connections use it
while connections already open keep theirs. A replacement that does not load (a key
that no longer matches, a half-written file) is logged once and the previous
certificate stays in use until the files change again.

`peer_identities` gives the verified client certificate's names (common name and subject
alternative names) of a call, for mapping certificates to tokens.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, cast

import grpc

from cachegw_gateway.config import ConfigError, ServerConfig
from cachegw_gateway.peer_identity import identities_of

log = logging.getLogger(__name__)

Signature = tuple[tuple[int, int, int, int], ...]


class TlsError(ConfigError):
    """A TLS file that cannot be used; the message names the config key and the file."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: str = ""  # "" = no client certificates asked for (TLS, not mTLS)

    @classmethod
    def from_config(cls, server: ServerConfig) -> TlsFiles | None:
        """The files of ``[server]``, or None when TLS is off (config.py checked the
        combination: a key with its certificate, a client CA only with both)."""
        if not server.tls_cert:
            return None
        return cls(server.tls_cert, server.tls_key, server.tls_client_ca)

    @classmethod
    def check(cls, server: ServerConfig) -> None:
        """Raise TlsError when the configured files cannot be used (at start)."""
        files = cls.from_config(server)
        if files is not None:
            load_at_start(files)

    def paths(self) -> tuple[tuple[str, str], ...]:
        named = (("server.tls_cert", self.cert), ("server.tls_key", self.key))
        return (*named, ("server.tls_client_ca", self.client_ca)) if self.client_ca else named


@dataclass(frozen=True, slots=True)
class Material:
    """What was read from the files, checked, and the files' signature at the time."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    signature: Signature

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca
        )


class _Changing(Exception):
    """The files changed while they were read: look again at the next handshake."""


def signature(files: TlsFiles) -> Signature:
    """What tells a changed file: device, inode, size and mtime of each (raises OSError)."""
    out = []
    for _, path in files.paths():
        st = os.stat(path)
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None


def _check_certificates(key: str, path: str, pem: bytes) -> None:
    """`pem` holds at least one PEM certificate (and nothing OpenSSL cannot parse)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=pem.decode("ascii"))
    except (ValueError, ssl.SSLError):  # UnicodeDecodeError is a ValueError
        raise TlsError(
            f"{key}: {path} holds no PEM certificate (a file starting with "
            "-----BEGIN CERTIFICATE-----)"
        ) from None


def _no_password() -> str:
    raise TlsError("encrypted")


def _check_pair(files: TlsFiles) -> None:
    """The key is a PEM private key without a passphrase, and it matches the certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key, password=_no_password)
    except TlsError:
        raise TlsError(
            f"server.tls_key: {files.key} is encrypted; gRPC needs an unencrypted PEM key "
            f"(e.g. openssl pkey -in {files.key} -out plain.key)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"server.tls_key: {files.key} does not match the certificate in "
                f"{files.cert} (server.tls_cert): give the key the certificate was made for"
            ) from None
        raise TlsError(
            f"server.tls_key: {files.key} holds no PEM private key (a file starting with "
            "-----BEGIN PRIVATE KEY----- or -----BEGIN EC/RSA PRIVATE KEY-----)"
        ) from None
    except OSError as exc:
        raise TlsError(f"server.tls_key: cannot read {files.key}: {exc.strerror or exc}") from None


def load(files: TlsFiles) -> Material:
    """Read and check the files. Raises TlsError, or _Changing when a file changed while
    it was read (a rotation in progress)."""
    try:
        before = signature(files)
    except OSError as exc:
        name = next((k for k, p in files.paths() if p == exc.filename), "server.tls_cert")
        raise TlsError(f"{name}: cannot read {exc.filename}: {exc.strerror or exc}") from None
    cert = _read("server.tls_cert", files.cert)
    key = _read("server.tls_key", files.key)
    client_ca = _read("server.tls_client_ca", files.client_ca) if files.client_ca else None
    _check_certificates("server.tls_cert", files.cert, cert)
    if client_ca is not None:
        _check_certificates("server.tls_client_ca", files.client_ca, client_ca)
    _check_pair(files)  # reads the files again, by path (the ssl module takes no bytes)
    try:
        unchanged = signature(files) == before
    except OSError:
        unchanged = False
    if not unchanged or _read("server.tls_cert", files.cert) != cert:
        raise _Changing
    if _read("server.tls_key", files.key) != key:
        raise _Changing
    return Material(cert, key, client_ca, before)


def load_at_start(files: TlsFiles, attempts: int = 3) -> Material:
    """`load`, tried again if the files are being replaced just then."""
    for _ in range(attempts):
        try:
            return load(files)
        except _Changing:
            continue
    raise TlsError(
        f"server.tls_cert: {files.cert} and its key kept changing while being read; "
        "start again once they are in place"
    )


class ServerTls:
    """The gateway's TLS: its credentials for `add_secure_port`, kept up to date with the
    files. Raises TlsError at construction when the files cannot be used."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.current = load_at_start(files)
        self.reloads = 0
        self._lock = threading.Lock()  # gRPC calls fetch from its own threads
        self._failed: Signature | str | None = None  # what was last warned about

    @classmethod
    def from_config(cls, server: ServerConfig) -> ServerTls | None:
        files = TlsFiles.from_config(server)
        return cls(files) if files is not None else None

    @property
    def mutual(self) -> bool:
        return bool(self.files.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.current.configuration(),
            # grpc-stubs leave out the None that means "no change".
            cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch),
            require_client_authentication=self.mutual,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher: a new configuration when the files
        changed and load, else None (keep the current one). Never raises."""
        with self._lock:
            try:
                return self._fetch()
            except Exception as exc:  # a failing fetcher would fail the handshake
                self._warn_once(repr(exc), "could not check the TLS files: %s", exc)
                return None

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            now = signature(self.files)
        except OSError as exc:
            self._warn_once(
                f"stat {exc.filename} {exc.errno}",
                "TLS file %s cannot be read (%s); serving with the previous certificate "
                "until it can",
                exc.filename,
                exc.strerror,
            )
            return None
        if now == self.current.signature or now == self._failed:
            return None
        try:
            material = load(self.files)
        except _Changing:
            return None  # mid-rotation: the next handshake looks again
        except TlsError as exc:
            self._failed = now
            log.warning(
                "the TLS files changed but cannot be used (%s); serving with the previous "
                "certificate until they are fixed",
                exc,
                extra={"event": "tls_reload_failed"},
            )
            return None
        self.current, self._failed = material, None
        self.reloads += 1
        log.info(
            "TLS certificate reloaded from %s%s",
            self.files.cert,
            f" (client CA {self.files.client_ca})" if self.files.client_ca else "",
            extra={"event": "tls_reload", "cert": self.files.cert},
        )
        return material.configuration()

    def _warn_once(self, what: str, message: str, *args: object) -> None:
        if self._failed != what:
            self._failed = what
            log.warning(message, *args, extra={"event": "tls_reload_failed"})


class _HasAuthContext(Protocol):
    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


def peer_identities(context: _HasAuthContext) -> tuple[str, ...]:
    """The identities of the call's verified client certificate, typed as the tokens
    file's [[identities]] name them ("URI:spiffe://...", "DNS:host", ..., "CN=name":
    peer_identity.py); () for a plaintext call or a TLS call without a client certificate.

    A certificate only reaches a call when the port requires client certificates
    (``server.tls_client_ca``): gRPC then has verified it against that CA."""
    auth = context.auth_context()
    if not auth or b"ssl" not in auth.get("transport_security_type", ()):
        return ()
    return identities_of(auth)
