"""The gateway's TLS files (tls.py): what is refused at start and why, the reload on
change, and `peer_identities` of a call, over a real mutual-TLS port."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives import serialization

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway import main
from cachegw_gateway.config import ConfigError, load_config
from cachegw_gateway.tls import ServerTls, TlsError, TlsFiles, peer_identities
from tests.tlscerts import CA, Pair


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


@pytest.fixture
def server_files(tmp_path: Path, ca: CA) -> TlsFiles:
    cert, key = ca.server().write(tmp_path, "server")
    client_ca = tmp_path / "clients-ca.crt"
    client_ca.write_bytes(ca.pem)
    return TlsFiles(str(cert), str(key), str(client_ca))


def replace(path: str, data: bytes) -> None:
    """Write `path` anew (a new inode, as `mv` of a finished file gives)."""
    tmp = f"{path}.new"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)


# -- refused at start -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"server.tls_cert": "a.crt"}, "server.tls_cert needs server.tls_key (--tls-key)"),
        ({"server.tls_key": "a.key"}, "server.tls_key needs server.tls_cert (--tls-cert)"),
        ({"server.tls_client_ca": "ca.crt"}, "server.tls_client_ca needs server.tls_cert"),
    ],
)
def test_keys_that_need_each_other(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(env={}, overrides=overrides)


def test_bad_files_are_named(tmp_path: Path, ca: CA, server_files: TlsFiles) -> None:
    other = ca.server()
    wrong_key = tmp_path / "other.key"
    wrong_key.write_bytes(other.key)
    not_pem = tmp_path / "junk.crt"
    not_pem.write_bytes(b"not a certificate\n")
    missing = str(tmp_path / "missing.crt")
    cases = [
        (TlsFiles(missing, server_files.key), f"server.tls_cert: cannot read {missing}"),
        (
            TlsFiles(server_files.cert, str(wrong_key)),
            f"server.tls_key: {wrong_key} does not match the certificate in {server_files.cert}",
        ),
        (TlsFiles(str(not_pem), server_files.key), f"{not_pem} holds no PEM certificate"),
        (TlsFiles(server_files.cert, str(not_pem)), f"{not_pem} holds no PEM private key"),
        (
            TlsFiles(server_files.cert, server_files.key, str(not_pem)),
            f"server.tls_client_ca: {not_pem} holds no PEM certificate",
        ),
    ]
    for files, message in cases:
        with pytest.raises(TlsError) as caught:
            ServerTls(files)
        assert message in str(caught.value)


def test_encrypted_key_is_refused(tmp_path: Path, server_files: TlsFiles) -> None:
    key = serialization.load_pem_private_key(Path(server_files.key).read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsError, match="is encrypted; gRPC needs an unencrypted PEM key"):
        ServerTls(TlsFiles(server_files.cert, str(encrypted)))


def test_serve_refuses_a_mismatched_key(
    tmp_path: Path, ca: CA, server_files: TlsFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(ca.server().key)
    argv = ["--embedded-redis", "--listen", "127.0.0.1:0", "--tls-cert", server_files.cert]
    assert main.main([*argv, "--tls-key", str(other)]) == 2
    err = capsys.readouterr().err
    assert "cachegw: configuration error: server.tls_key:" in err
    assert "does not match the certificate" in err
    assert main.main(argv) == 2
    assert "command line: server.tls_cert needs server.tls_key" in capsys.readouterr().err


# -- reload on change --------------------------------------------------------------------


def test_fetch_reloads_changed_files_and_keeps_the_old_on_a_broken_one(
    ca: CA, server_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    tls = ServerTls(server_files)
    first = tls.current
    assert tls.fetch() is None  # nothing changed

    new = ca.server("rotated")
    replace(server_files.key, new.key)
    replace(server_files.cert, new.cert)
    assert tls.fetch() is not None
    assert tls.current.cert == new.cert and tls.current is not first
    assert tls.fetch() is None

    caplog.set_level(logging.WARNING, logger="cachegw_gateway.tls")
    replace(server_files.key, ca.server().key)  # a key for another certificate
    for _ in range(3):
        assert tls.fetch() is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once, not per handshake
    assert "does not match" in warnings[0].getMessage()
    assert tls.current.cert == new.cert  # still serving the last good one

    os.remove(server_files.cert)  # gone altogether: the same, one warning
    for _ in range(3):
        assert tls.fetch() is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2

    fixed = ca.server("fixed")
    replace(server_files.key, fixed.key)
    replace(server_files.cert, fixed.cert)
    assert tls.fetch() is not None
    assert tls.current.cert == fixed.cert
    assert tls.reloads == 2


# -- peer identities ---------------------------------------------------------------------


class _Context:
    def __init__(self, auth: Mapping[str, Iterable[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return self._auth


def test_peer_identities_from_an_auth_context() -> None:
    assert peer_identities(_Context({})) == ()
    assert peer_identities(_Context({"transport_security_type": [b"insecure"]})) == ()
    assert peer_identities(_Context({"transport_security_type": [b"ssl"]})) == ()
    auth = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"orders"],
        "x509_subject_alternative_name": [b"orders.svc", b"orders", b"spiffe://x/\xff"],
    }
    # Typed as the tokens file names them: SANs (kind guessed when gRPC gives one list),
    # then the common name.
    assert peer_identities(_Context(auth)) == (
        "DNS:orders.svc",
        "DNS:orders",
        "URI:spiffe://x/\\xff",
        "CN=orders",
    )


class _Recorder(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []

    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetResponse:
        self.seen.append(peer_identities(context))
        return pb.GetResponse(status=pb.STATUS_MISS)


@pytest.fixture
async def recording_server(
    server_files: TlsFiles,
) -> AsyncIterator[tuple[_Recorder, int, int]]:
    """(servicer, mutual-TLS port, plaintext port) of one grpc.aio server."""
    recorder = _Recorder()  # type: ignore[abstract]  # only Get is called
    server = grpc.aio.server()
    cache_pb2_grpc.add_CacheServiceServicer_to_server(recorder, server)
    secure = server.add_secure_port("127.0.0.1:0", ServerTls(server_files).credentials())
    plain = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield recorder, secure, plain
    await server.stop(None)


async def _get(target: str, credentials: grpc.ChannelCredentials | None) -> None:
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        await asyncio.wait_for(stub.Get(pb.GetRequest(key="k"), timeout=5), 10)


async def test_peer_identities_of_a_call(
    ca: CA, recording_server: tuple[_Recorder, int, int]
) -> None:
    recorder, secure, plain = recording_server
    client: Pair = ca.client("orders", dns=("orders.svc",), uris=("spiffe://shop/orders",))
    creds = grpc.ssl_channel_credentials(ca.pem, client.key, client.cert)
    await _get(f"127.0.0.1:{secure}", creds)
    await _get(f"127.0.0.1:{plain}", None)
    assert recorder.seen == [("URI:spiffe://shop/orders", "DNS:orders.svc", "CN=orders"), ()]
