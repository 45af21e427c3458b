"""Certificates for TLS to Redis, made in the tests (`cryptography`), and a TLS Redis.

`make_pki(dir)` writes a CA, a server certificate for 127.0.0.1 / localhost signed by it,
a client certificate signed by it, and a second, unrelated CA (the "wrong CA"), as PEM
files. `TlsRedis` is a `ManagedRedis` with a TLS port beside its plaintext one (the
plaintext port is how ManagedRedis knows its child is up, and how tests look inside).
(tests/tlscerts.py, another module, makes the gRPC port's certificates.)
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cachegw_gateway.managed_redis import ManagedRedis, free_port


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # signed nothing here: trusting only it must refuse the server


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    cn: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
    hosts: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # Redis uses its server certificate as a client too (replication, the
            # cluster bus, Sentinel's links): both usages on the server's.
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                if server
                else [ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca[1], hashes.SHA256()), key


def make_pki(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> Pki:
    """The PEM files of a CA, a server and a client certificate, and another CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("cachegw test Redis CA")
    other = _ca("cachegw unrelated CA")
    server = _leaf("redis.test", ca, server=True, hosts=hosts)
    client = _leaf("cachegw-gateway", ca, server=False)
    pem = serialization.Encoding.PEM
    pki = Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
    )
    pki.ca.write_bytes(ca[0].public_bytes(pem))
    pki.other_ca.write_bytes(other[0].public_bytes(pem))
    pki.server_cert.write_bytes(server[0].public_bytes(pem))
    _write_key(pki.server_key, server[1])
    pki.client_cert.write_bytes(client[0].public_bytes(pem))
    _write_key(pki.client_key, client[1])
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
