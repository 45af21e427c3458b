"""The clients' transport security and token: `Client`, `AsyncClient` and the CLI over TLS
and mutual TLS against a real gateway process, and the `authorization` metadata as a
test server receives it (unary calls, Subscribe and its reconnects, a rotating token)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio
import pytest

from cachegw import AsyncClient, Client, NearCache, TLSConfig, Unavailable, cli
from cachegw._security import is_loopback
from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.managed_redis import ManagedRedis
from tests.client.conftest import FakeGateway, ServerThread
from tests.conftest import GatewayProcess
from tests.tlscerts import CA


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


@dataclass
class Files:
    ca: Path
    cert: Path  # a client certificate the gateway accepts
    key: Path


@pytest.fixture
def mtls_gateway(
    gateway_process: Callable[..., GatewayProcess],
    redis_server: ManagedRedis,
    tmp_path: Path,
    ca: CA,
) -> tuple[GatewayProcess, Files]:
    cert, key = ca.server().write(tmp_path, "server")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem)
    client_cert, client_key = ca.client("orders").write(tmp_path, "client")
    gw = gateway_process(
        "--redis-url", redis_server.url, "--tls-cert", str(cert), "--tls-key", str(key),
        "--tls-client-ca", str(ca_file),
        credentials=grpc.ssl_channel_credentials(
            ca.pem, client_key.read_bytes(), client_cert.read_bytes()
        ),
    )  # fmt: skip
    return gw, Files(ca_file, client_cert, client_key)


def test_clients_over_mutual_tls(mtls_gateway: tuple[GatewayProcess, Files]) -> None:
    gw, files = mtls_gateway
    paths = TLSConfig(ca=str(files.ca), cert=files.cert, key=str(files.key))
    with Client(gw.address, tls=paths) as client:
        assert client.set("k", b"v").stored
        assert client.get("k") == b"v"
    pem = TLSConfig(
        ca=files.ca.read_bytes(), cert=files.cert.read_bytes(), key=files.key.read_bytes()
    )

    async def over_asyncio() -> bytes | None:
        async with AsyncClient(gw.address, tls=pem) as client:
            return await client.get("k")

    assert asyncio.run(over_asyncio()) == b"v"
    # The certificate names 127.0.0.1 and localhost; another name is refused.
    named = TLSConfig(ca=files.ca, cert=files.cert, key=files.key, server_name="localhost")
    with Client(gw.address, tls=named) as client:
        assert client.get("k") == b"v"
    wrong = TLSConfig(ca=files.ca, cert=files.cert, key=files.key, server_name="elsewhere")
    with Client(gw.address, tls=wrong, timeout=5) as client, pytest.raises(Unavailable):
        client.get("k")
    # No client certificate: the gateway refuses the connection.
    no_cert = TLSConfig(ca=files.ca)
    with Client(gw.address, tls=no_cert, timeout=5) as client, pytest.raises(Unavailable):
        client.get("k")


def test_tls_settings_that_cannot_be_used(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give both cert and key"):
        Client("127.0.0.1:1", tls=TLSConfig(cert=b"x"))
    with pytest.raises(ValueError, match="tls ca: cannot read"):
        Client("127.0.0.1:1", tls=TLSConfig(ca=str(tmp_path / "none.pem")))
    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    with pytest.raises(ValueError, match="is not a PEM file"):
        Client("127.0.0.1:1", tls=TLSConfig(ca=junk))


def test_cli_over_mutual_tls(
    mtls_gateway: tuple[GatewayProcess, Files],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw, files = mtls_gateway
    flags = ["--target", gw.address, "--tls-ca", str(files.ca)]
    mtls = [*flags, "--tls-cert", str(files.cert), "--tls-key", str(files.key)]
    assert cli.main([*mtls, "set", "k", "v"]) == 0
    assert capsys.readouterr().out.startswith("stored version=")
    assert cli.main(["get", "k", *mtls]) == 0  # the options after the subcommand too
    assert capsys.readouterr().out == "v"
    assert cli.main([*flags, "get", "k"]) == 1  # no client certificate
    assert capsys.readouterr().err.startswith("cachegw: Unavailable: ")
    assert cli.main([*flags, "--tls-cert", str(files.cert), "get", "k"]) == 2
    assert "give both cert and key" in capsys.readouterr().err

    monkeypatch.setenv("CACHEGW_TARGET", gw.address)
    monkeypatch.setenv("CACHEGW_TLS_CA", str(files.ca))
    monkeypatch.setenv("CACHEGW_TLS_CERT", str(files.cert))
    monkeypatch.setenv("CACHEGW_TLS_KEY", str(files.key))
    assert cli.main(["get", "k"]) == 0
    assert capsys.readouterr().out == "v"
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["top", "--count", "1"]) == 0
    out = capsys.readouterr().out
    assert gw.address in out and "UNAVAILABLE" not in out


# -- the token ---------------------------------------------------------------------------


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class Recorder(_Interceptor):
    """Records the `authorization` metadata of every call, by method."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        metadata = dict(details.invocation_metadata or ())
        value = metadata.get("authorization", "")
        method = details.method.rpartition("/")[2]
        self.seen.append((method, value if isinstance(value, str) else value.decode()))
        return await continuation(details)


class Streams(FakeGateway):
    """Subscribe streams that deliver one event each and end: the client opens them again."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = 0

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        self.opened += 1
        await context.send_initial_metadata((("cachegw-position", "0-0"),))
        yield pb.InvalidationEvent(id=f"1-{self.opened}", kind=pb.EVENT_KIND_KEYS, keys=["k"])


@dataclass
class TokenServer:
    servicer: Streams
    recorder: Recorder
    target: str
    tls: TLSConfig | None


@pytest.fixture(params=["plaintext", "tls"])
def token_server(request: pytest.FixtureRequest, ca: CA) -> Iterator[TokenServer]:
    """A test server recording each call's token: on plaintext loopback, or over TLS."""
    recorder = Recorder()
    credentials, tls = None, None
    if request.param == "tls":
        pair = ca.server()
        credentials = grpc.ssl_server_credentials([(pair.key, pair.cert)])
        tls = TLSConfig(ca=ca.pem)
    server = ServerThread(Streams(), interceptors=[recorder], credentials=credentials)
    assert isinstance(server.servicer, Streams)
    try:
        server.start()
        yield TokenServer(server.servicer, recorder, f"127.0.0.1:{server.port}", tls)
    finally:
        server.stop()


def rotating() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"token-{next(counter)}"


def test_sync_client_sends_the_token(token_server: TokenServer) -> None:
    with Client(token_server.target, tls=token_server.tls, token="s3cret") as client:
        client.set("k", b"v")
        assert client.get("k") == b"v"
    assert token_server.recorder.seen == [("Set", "Bearer s3cret"), ("Get", "Bearer s3cret")]

    token_server.recorder.seen.clear()
    with Client(token_server.target, tls=token_server.tls, token=rotating()) as client:
        client.get("k")
        client.get_many(["k", "other"])
        events = client.subscribe(prefixes=["k"])
        got = [next(events).id for _ in range(3)]  # two reconnects
        events.close()
    assert got == ["1-1", "1-2", "1-3"]
    assert token_server.recorder.seen == [
        ("Get", "Bearer token-1"),
        ("GetMany", "Bearer token-2"),
        ("Subscribe", "Bearer token-3"),
        ("Subscribe", "Bearer token-4"),
        ("Subscribe", "Bearer token-5"),
    ]


async def test_async_client_sends_the_token(token_server: TokenServer) -> None:
    async with AsyncClient(token_server.target, tls=token_server.tls, token=rotating()) as client:
        await client.set("k", b"v")
        assert list(await asyncio.gather(client.get("k"), client.get("k"))) == [b"v", b"v"]
        got = []
        async for event in client.subscribe(prefixes=["k"]):
            got.append(event.id)
            if len(got) == 3:
                break
    assert got == ["1-1", "1-2", "1-3"]
    # The two gets went out as one GetMany (auto-batching), with one token.
    assert token_server.recorder.seen == [
        ("Set", "Bearer token-1"),
        ("GetMany", "Bearer token-2"),
        ("Subscribe", "Bearer token-3"),
        ("Subscribe", "Bearer token-4"),
        ("Subscribe", "Bearer token-5"),
    ]


def test_cli_sends_the_token_and_never_prints_it(
    token_server: TokenServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flags = ["--target", token_server.target]
    if token_server.tls is not None:
        ca = tmp_path / "ca.crt"
        assert isinstance(token_server.tls.ca, bytes)
        ca.write_bytes(token_server.tls.ca)
        flags += ["--tls-ca", str(ca)]
    assert cli.main([*flags, "--token", "flag-token", "set", "k", "v"]) == 0
    monkeypatch.setenv("CACHEGW_TOKEN", "env-token")
    assert cli.main([*flags, "get", "k"]) == 0
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    assert cli.main([*flags, "--token-file", str(token_file), "del", "k"]) == 0
    assert cli.main([*flags, "watch", "--count", "2"]) == 0
    assert token_server.recorder.seen == [
        ("Set", "Bearer flag-token"),
        ("Get", "Bearer env-token"),
        ("Delete", "Bearer file-token"),
        ("Subscribe", "Bearer env-token"),
        ("Subscribe", "Bearer env-token"),
    ]
    assert cli.main([*flags, "--token", "bad token with spaces", "get", "k"]) == 2
    out, err = capsys.readouterr()
    assert "token must be printable ASCII without spaces" in err
    for secret in ("flag-token", "env-token", "file-token", "bad token"):
        assert secret not in out + err


def test_a_token_never_goes_over_plaintext_to_another_host() -> None:
    with pytest.raises(ValueError, match="only to a loopback target"):
        Client("10.1.2.3:50051", token="t")
    with pytest.raises(ValueError, match="only to a loopback target"):
        Client("cache.internal:50051", token=lambda: "t")
    assert "t" not in repr(Client("127.0.0.1:1", token="t")._bearer).replace("Bearer", "")


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("[::1]:50051", True),
        ("localhost:50051", True),
        ("dns:///localhost:50051", True),
        ("ipv4:127.0.0.1:50051", True),
        ("unix:/run/cachegw.sock", True),
        ("::1", True),
        ("10.0.0.1:50051", False),
        ("[2001:db8::1]:50051", False),
        ("cache.svc:50051", False),
        ("dns:///cache.svc:50051", False),
    ],
)
def test_loopback_targets(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback


def test_near_cache_stream_survives_a_failing_token_function(
    token_server: TokenServer, caplog: pytest.LogCaptureFixture
) -> None:
    calls = itertools.count(1)

    def flaky() -> str:
        if next(calls) <= 2:
            raise RuntimeError("the token service is down")
        return "ok"

    near = NearCache(ttl=5)
    with Client(token_server.target, tls=token_server.tls, token=flaky, near_cache=near):
        deadline = time.monotonic() + 10
        while ("Subscribe", "Bearer ok") not in token_server.recorder.seen:
            assert time.monotonic() < deadline, "the near cache's stream never opened"
            time.sleep(0.02)
    failures = [r for r in caplog.records if "token function raised" in r.getMessage()]
    assert len(failures) == 2
    assert "the token service is down" not in caplog.text
