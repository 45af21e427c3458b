"""Certificates for TLS to Redis, made in the tests (`cryptography`), and a TLS Redis.

`make_pki(dir)` writes a CA, a server certificate for 127.0.0.1 / localhost signed by it,
a client certificate signed by it, and a second, unrelated CA (the "wrong CA"), as PEM
files. `TlsRedis` is a `ManagedRedis` with a TLS port beside its plaintext one (the
plaintext port is how ManagedRedis knows its child is up, and how tests look inside).
(tests/tlscerts.py makes the certificates, here and for the gRPC port.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cachegw_gateway.managed_redis import ManagedRedis, free_port
from tests.tlscerts import CA


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # signed nothing here: trusting only it must refuse the server


def make_pki(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> Pki:
    """The PEM files of a CA, a server and a client certificate, and another CA
    (tests/tlscerts.py makes them)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = CA("cachegw test Redis CA"), CA("cachegw unrelated CA")
    server_cert, server_key = ca.node("redis.test", hosts).write(directory, "server")
    client_cert, client_key = ca.client("cachegw-gateway").write(directory, "client")
    for key in (server_key, client_key):
        key.chmod(0o600)
    pki = Pki(
        ca=directory / "ca.pem",
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        other_ca=directory / "other-ca.pem",
    )
    pki.ca.write_bytes(ca.pem)
    pki.other_ca.write_bytes(other.pem)
    return pki


def server_tls_args(pki: Pki, tls_port: int, *, auth_clients: bool) -> list[str]:
    """redis-server flags: a TLS port with `pki`'s server certificate, client
    certificates required (mTLS) when `auth_clients`."""
    return [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca),
        "--tls-auth-clients", "yes" if auth_clients else "no",
    ]  # fmt: skip


class TlsRedis:
    """A redis-server with a TLS port (`tls_port`) beside its plaintext one."""

    def __init__(
        self, pki: Pki, *, auth_clients: bool = False, extra_args: Sequence[str] = ()
    ) -> None:
        self.tls_port = free_port()
        self.server = ManagedRedis(
            extra_args=[
                *server_tls_args(pki, self.tls_port, auth_clients=auth_clients),
                *extra_args,
            ]
        )

    def url(self, scheme: str = "rediss", auth: str = "") -> str:
        return f"{scheme}://{auth}127.0.0.1:{self.tls_port}/0"

    def __enter__(self) -> TlsRedis:
        self.server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.stop()
