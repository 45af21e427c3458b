"""`cachegw serve` with TLS and mutual TLS: real gateway processes on loopback, real
clients. What is refused (plaintext, a wrong CA, an expired certificate, a missing or
foreign client certificate), what is served, and certificates replaced while it runs."""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import GatewayProcess
from tests.tlscerts import CA, Pair

Start = Callable[..., GatewayProcess]
TRIES = 200  # fresh connections tried to reach each worker


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


@pytest.fixture(scope="module")
def other_ca() -> CA:
    return CA("another CA")


def creds(ca: CA, client: Pair | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(ca.pem)
    return grpc.ssl_channel_credentials(ca.pem, client.key, client.cert)


@contextmanager
def stub(
    address: str, credentials: grpc.ChannelCredentials | None
) -> Iterator[cache_pb2_grpc.CacheServiceStub]:
    """A stub on a channel with a connection of its own (a new TLS handshake)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (
        grpc.insecure_channel(address, options=options)
        if credentials is None
        else grpc.secure_channel(address, credentials, options=options)
    )
    with channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)


def get_code(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status of one Get over a new connection."""
    with stub(address, credentials) as s:
        try:
            s.Get(pb.GetRequest(key="probe"), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def served_certificate(address: str) -> x509.Certificate:
    """The certificate the gateway presents to a new connection (not verified here: the
    test asks which one it is)."""
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def replace(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def rotate(cert: Path, key: Path, pair: Pair) -> None:
    replace(key, pair.key)
    replace(cert, pair.cert)


def serve_tls(
    start: Start, redis: ManagedRedis, folder: Path, ca: CA, pair: Pair, *, mutual: bool = False
) -> tuple[GatewayProcess, Path, Path]:
    cert, key = pair.write(folder, "server")
    flags = ["--redis-url", redis.url, "--tls-cert", str(cert), "--tls-key", str(key)]
    check = creds(ca)
    if mutual:
        client_ca = folder / "clients-ca.crt"
        client_ca.write_bytes(ca.pem)
        flags += ["--tls-client-ca", str(client_ca)]
        check = creds(ca, ca.client("health-checker"))
    return start(*flags, credentials=check), cert, key


def test_tls_port_refuses_plaintext_and_a_wrong_ca(
    gateway_process: Start, redis_server: ManagedRedis, tmp_path: Path, ca: CA, other_ca: CA
) -> None:
    gw, _, _ = serve_tls(gateway_process, redis_server, tmp_path, ca, ca.server())
    assert get_code(gw.address, None) == grpc.StatusCode.UNAVAILABLE
    assert get_code(gw.address, creds(other_ca)) == grpc.StatusCode.UNAVAILABLE
    assert get_code(gw.address, creds(ca)) == grpc.StatusCode.OK
    # Health shares the port: over TLS too.
    with grpc.secure_channel(gw.address, creds(ca)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert "with TLS (certificate" in gw.output()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    gateway_process: Start, redis_server: ManagedRedis, tmp_path: Path, ca: CA, other_ca: CA
) -> None:
    gw, _, _ = serve_tls(gateway_process, redis_server, tmp_path, ca, ca.server(), mutual=True)
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert get_code(gw.address, creds(ca)) == unavailable  # no client certificate
    foreign = other_ca.client("intruder")
    assert get_code(gw.address, creds(ca, foreign)) == unavailable
    expired = ca.client("retired", expired=True)
    assert get_code(gw.address, creds(ca, expired)) == unavailable
    assert get_code(gw.address, creds(ca, ca.client("orders"))) == grpc.StatusCode.OK
    assert "with mutual TLS" in gw.output()


def test_certificates_replaced_while_serving(
    gateway_process: Start, redis_server: ManagedRedis, tmp_path: Path, ca: CA, other_ca: CA
) -> None:
    first = ca.server()
    gw, cert, key = serve_tls(gateway_process, redis_server, tmp_path, ca, first)
    assert served_certificate(gw.address).serial_number == first.serial

    with grpc.secure_channel(gw.address, creds(ca)) as kept:
        kept_stub = cache_pb2_grpc.CacheServiceStub(kept)
        kept_stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=5)
        events = kept_stub.Subscribe(pb.SubscribeRequest(prefixes=["k"]))
        events.initial_metadata()  # registered before the rotation

        second = other_ca.server()
        rotate(cert, key, second)
        # A new connection gets the new certificate, from the new CA.
        assert served_certificate(gw.address).serial_number == second.serial
        assert get_code(gw.address, creds(other_ca)) == grpc.StatusCode.OK
        assert get_code(gw.address, creds(ca)) == grpc.StatusCode.UNAVAILABLE
        # The connection made before keeps working, its stream too.
        assert kept_stub.Get(pb.GetRequest(key="k"), timeout=5).value == b"v"
        with stub(gw.address, creds(other_ca)) as fresh:
            fresh.Invalidate(pb.InvalidateRequest(keys=["k"]), timeout=5)
        event = next(iter(events))
        assert list(event.keys) == ["k"]
        events.cancel()  # type: ignore[no-untyped-call]

        # A broken replacement: the gateway keeps the last good certificate, and says
        # so once, however many connections come.
        replace(cert, b"-----BEGIN CERTIFICATE-----\ntruncated")
        for _ in range(3):
            assert served_certificate(gw.address).serial_number == second.serial
        assert get_code(gw.address, creds(other_ca)) == grpc.StatusCode.OK
        assert kept_stub.Get(pb.GetRequest(key="k"), timeout=5).status == pb.STATUS_MISS

    warnings = [line for line in gw.output().splitlines() if "holds no PEM certificate" in line]
    assert len(warnings) == 1, gw.output()
    assert "serving with the previous certificate" in warnings[0]

    third = ca.server("fixed")  # fixed files are picked up again
    rotate(cert, key, third)
    assert served_certificate(gw.address).serial_number == third.serial
    assert gw.stop() == 0


def test_a_replaced_client_ca_takes_effect_for_new_connections(
    gateway_process: Start, redis_server: ManagedRedis, tmp_path: Path, ca: CA, other_ca: CA
) -> None:
    gw, _, _ = serve_tls(gateway_process, redis_server, tmp_path, ca, ca.server(), mutual=True)
    ours, theirs = creds(ca, ca.client("orders")), creds(ca, other_ca.client("billing"))
    assert get_code(gw.address, ours) == grpc.StatusCode.OK
    assert get_code(gw.address, theirs) == grpc.StatusCode.UNAVAILABLE
    replace(tmp_path / "clients-ca.crt", other_ca.pem)  # now only the other CA's clients
    assert get_code(gw.address, theirs) == grpc.StatusCode.OK
    assert get_code(gw.address, ours) == grpc.StatusCode.UNAVAILABLE


def test_an_expired_server_certificate_is_refused_by_clients(
    gateway_process: Start, redis_server: ManagedRedis, tmp_path: Path, ca: CA
) -> None:
    # Started with a valid certificate (the fixture waits for SERVING over TLS), then
    # given an expired one: new connections get it, and refuse it.
    gw, cert, key = serve_tls(gateway_process, redis_server, tmp_path, ca, ca.server())
    expired = ca.server("expired", expired=True)
    rotate(cert, key, expired)
    assert served_certificate(gw.address).serial_number == expired.serial
    assert get_code(gw.address, creds(ca)) == grpc.StatusCode.UNAVAILABLE


def test_workers_share_a_tls_port(
    gateway_process: Start, redis_server: ManagedRedis, tmp_path: Path, ca: CA
) -> None:
    pair = ca.server()
    cert, key = pair.write(tmp_path, "server")
    client_ca = tmp_path / "clients-ca.crt"
    client_ca.write_bytes(ca.pem)
    client = creds(ca, ca.client("orders"))
    gw = gateway_process(
        "--workers", "2", "--redis-url", redis_server.url,
        "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(client_ca),
        credentials=client,
    )  # fmt: skip
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    for _ in range(TRIES):  # fresh connections land on both workers, each over mTLS
        with stub(gw.address, client) as s:
            seen.add(s.Stats(pb.StatsRequest(), timeout=5).worker_index)
        if seen == {0, 1} or time.monotonic() > deadline:
            break
    assert seen == {0, 1}
    assert get_code(gw.address, creds(ca)) == grpc.StatusCode.UNAVAILABLE
    assert gw.stop() == 0
