"""Authentication and permissions over real gRPC: statuses, each token source, reloads of
the tokens and key files, open Subscribe streams ended when their credential stops
holding, health open and reflection switchable (auth.py)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.principal import METHOD_PERMISSIONS
from cachegw_gateway.servicer import SERVICE_NAME
from tests.conftest import GatewayFactory, RunningGateway, eventually
from tests.gateway.authkit import (
    OTHER_SECRET,
    SECRET,
    bearer,
    ec_key,
    entry,
    new_token,
    public_pem,
    sign,
    write_atomic,
)

RELOAD = 0.1  # auth.reload_seconds in these tests


@dataclass
class Tokens:
    path: Path
    reader: str
    writer: str
    admin: str
    watcher: str

    def text(self, *extra: str) -> str:
        return "\n".join(
            [
                entry(self.reader, "reader", ["read"]),
                entry(self.writer, "writer", ["read", "write"]),
                entry(self.admin, "admin", ["all"]),
                entry(self.watcher, "watcher", ["subscribe"]),
                *extra,
            ]
        )


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    t = Tokens(tmp_path / "tokens.toml", new_token(), new_token(), new_token(), new_token())
    write_atomic(t.path, t.text())
    return t


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwt.key"
    path.write_text(SECRET + "\n")
    return path


async def start(
    gateway_factory: GatewayFactory, tokens: Tokens, key_file: Path | None = None, **more: Any
) -> RunningGateway:
    extra: dict[str, Any] = {}
    if key_file is not None:
        extra["auth__jwt_key_file"] = str(key_file)
    gw: RunningGateway = await gateway_factory(
        auth__enabled=True,
        auth__tokens_file=str(tokens.path),
        auth__reload_seconds=RELOAD,
        **extra,
        **more,
    )
    return gw


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def no_secret(error: grpc.aio.AioRpcError, *secrets: str) -> None:
    details = error.details() or ""
    for secret in secrets:
        assert secret not in details and secret[:12] not in details


# -- statuses -------------------------------------------------------------------------------


async def test_missing_malformed_unknown_and_expired_tokens_are_unauthenticated(
    gateway_factory: GatewayFactory, tokens: Tokens
) -> None:
    expired = new_token()
    write_atomic(
        tokens.path, tokens.text(entry(expired, "old", ["read"], expires="2020-01-01T00:00:00Z"))
    )
    gw = await start(gateway_factory, tokens)
    get = pb.GetRequest(key="k")
    unknown = new_token()
    cases = {
        "needs a token": (),
        "must be 'Bearer <token>'": (("authorization", f"Basic {tokens.reader}"),),
        "unknown to this gateway": bearer(unknown),
        "'old' expired at 2020-01-01T00:00:00Z": bearer(expired),
    }
    for why, metadata in cases.items():
        error = await refused(gw.stub.Get(get, metadata=metadata, timeout=5))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED, why
        assert why in (error.details() or ""), error.details()
        no_secret(error, tokens.reader, unknown, expired)
    # The same calls with a valid token are served.
    reply = await gw.stub.Get(get, metadata=bearer(tokens.reader), timeout=5)
    assert reply.status == pb.STATUS_MISS
    # Authentication figures are the gateway's (its /metrics and its own Stats answer), not
    # a tenant's: a tenant's Stats holds its own figures only.
    await gw.stub.Stats(pb.StatsRequest(), metadata=bearer(tokens.admin), timeout=5)
    stats = gw.server.telemetry.stats(pb.StatsRequest())
    assert stats.auth.unauthenticated == len(cases)
    assert stats.auth.credentials == 5


async def test_each_method_needs_its_permission(
    gateway_factory: GatewayFactory, tokens: Tokens
) -> None:
    gw = await start(gateway_factory, tokens)
    s = gw.stub
    calls: dict[str, Callable[[Any], Awaitable[Any]]] = {
        "Get": lambda md: s.Get(pb.GetRequest(key="k"), metadata=md, timeout=5),
        "GetMany": lambda md: s.GetMany(pb.GetManyRequest(keys=["k"]), metadata=md, timeout=5),
        "Ttl": lambda md: s.Ttl(pb.TtlRequest(key="k"), metadata=md, timeout=5),
        "ReleaseLease": lambda md: s.ReleaseLease(
            pb.ReleaseLeaseRequest(key="k", lease_token=b"x"), metadata=md, timeout=5
        ),
        "Set": lambda md: s.Set(pb.SetRequest(key="k", value=b"v"), metadata=md, timeout=5),
        "SetMany": lambda md: s.SetMany(
            pb.SetManyRequest(entries=[pb.SetRequest(key="k", value=b"v")]), metadata=md, timeout=5
        ),
        "Delete": lambda md: s.Delete(pb.DeleteRequest(keys=["k"]), metadata=md, timeout=5),
        "DeleteMany": lambda md: s.DeleteMany(
            pb.DeleteManyRequest(keys=["k"]), metadata=md, timeout=5
        ),
        "Incr": lambda md: s.Incr(pb.IncrRequest(key="n", delta=1), metadata=md, timeout=5),
        "Touch": lambda md: s.Touch(pb.TouchRequest(key="k", ttl_ms=1000), metadata=md, timeout=5),
        "Allow": lambda md: s.Allow(pb.AllowRequest(key="r"), metadata=md, timeout=5),
        "Invalidate": lambda md: s.Invalidate(
            pb.InvalidateRequest(keys=["k"]), metadata=md, timeout=5
        ),
        "Stats": lambda md: s.Stats(pb.StatsRequest(), metadata=md, timeout=5),
        "Warmup": lambda md: s.Warmup(pb.WarmupRequest(), metadata=md, timeout=5),
    }
    assert set(calls) | {"Subscribe"} == set(METHOD_PERMISSIONS)
    allowed = {
        "reader": {"Get", "GetMany", "Ttl", "ReleaseLease"},
        "writer": {"Get", "GetMany", "Ttl", "ReleaseLease"}
        | {"Set", "SetMany", "Delete", "DeleteMany", "Incr", "Touch", "Allow"},
        "admin": set(calls),
        "watcher": set(),
    }
    for name, token in [
        ("reader", tokens.reader),
        ("writer", tokens.writer),
        ("admin", tokens.admin),
        ("watcher", tokens.watcher),
    ]:
        for method, call in calls.items():
            try:
                await call(bearer(token))
            except grpc.aio.AioRpcError as exc:
                if method in allowed[name]:
                    # Served, then refused for what the request says (not for auth).
                    assert exc.code() not in (
                        grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.UNAUTHENTICATED,
                    ), (name, method, exc.details())
                else:
                    assert exc.code() is grpc.StatusCode.PERMISSION_DENIED, (name, method)
                    assert f"'{name}' (tenant shop) may not call {method}" in (exc.details() or "")
            else:
                assert method in allowed[name], (name, method)
    # Subscribe: only with the subscribe permission.
    error = await refused(
        s.Subscribe(pb.SubscribeRequest(prefixes=["k"]), metadata=bearer(tokens.reader)).read()
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "needs the subscribe permission" in (error.details() or "")


async def test_a_lease_needs_write_too(gateway_factory: GatewayFactory, tokens: Tokens) -> None:
    gw = await start(gateway_factory, tokens)
    leased = pb.GetRequest(key="k", lease=True)
    error = await refused(gw.stub.Get(leased, metadata=bearer(tokens.reader), timeout=5))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "to be granted a lease" in (error.details() or "")
    reply = await gw.stub.Get(leased, metadata=bearer(tokens.writer), timeout=5)
    assert reply.status == pb.STATUS_LEASED


async def test_health_stays_open_and_reflection_can_be_turned_off(
    gateway_factory: GatewayFactory, tokens: Tokens
) -> None:
    on = await start(gateway_factory, tokens)
    off = await start(gateway_factory, tokens, server__reflection=False)
    for gw in (on, off):
        health = health_pb2_grpc.HealthStub(gw.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    async def list_services(gw: RunningGateway) -> list[str]:
        stub = reflection_pb2_grpc.ServerReflectionStub(gw.channel)
        call = stub.ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.done_writing()
        return [s.name for s in answer.list_services_response.service]

    assert SERVICE_NAME in await list_services(on)
    error = await refused(list_services(off))
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED


# -- the tokens file ------------------------------------------------------------------------


async def test_tokens_file_changes_apply_without_a_restart(
    gateway_factory: GatewayFactory, tokens: Tokens, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start(gateway_factory, tokens)
    get = pb.GetRequest(key="k")

    async def code(token: str) -> grpc.StatusCode:
        try:
            await gw.stub.Get(get, metadata=bearer(token), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    added = new_token()
    assert await code(added) is grpc.StatusCode.UNAUTHENTICATED
    write_atomic(tokens.path, tokens.text(entry(added, "added", ["read"])))
    await eventually_async(lambda: code(added), grpc.StatusCode.OK)
    # Removed (the reader's entry goes): refused within a reload period, though remembered.
    assert await code(tokens.reader) is grpc.StatusCode.OK
    write_atomic(
        tokens.path,
        "\n".join(
            [
                entry(tokens.admin, "admin", ["all"]),
                entry(added, "added", ["read"]),
            ]
        ),
    )
    await eventually_async(lambda: code(tokens.reader), grpc.StatusCode.UNAUTHENTICATED)
    # A broken file keeps what was in force, and says so once.
    caplog.set_level(logging.ERROR, logger="cachegw_gateway.auth")
    write_atomic(tokens.path, "[[tokens]]\nname = 'x'\nhash = 'nope'\n")
    await eventually(lambda: gw.server.stats.auth_reload_errors == 1)
    await asyncio.sleep(RELOAD * 5)
    assert await code(added) is grpc.StatusCode.OK
    failures = [r for r in caplog.records if "not reloaded" in r.getMessage()]
    assert len(failures) == 1 and "tokens[0].hash must be" in failures[0].getMessage()
    assert gw.server.stats.auth_reload_errors == 1
    # A missing file too.
    os.unlink(tokens.path)
    await eventually(lambda: gw.server.stats.auth_reload_errors == 2)
    assert await code(added) is grpc.StatusCode.OK
    # Fixed: its contents apply.
    write_atomic(tokens.path, entry(tokens.reader, "reader", ["read"]))
    await eventually_async(lambda: code(added), grpc.StatusCode.UNAUTHENTICATED)
    assert await code(tokens.reader) is grpc.StatusCode.OK


async def eventually_async(check: Any, expected: object, within: float = 5.0) -> None:
    """Wait (bounded) until `await check()` returns `expected`."""
    deadline = asyncio.get_running_loop().time() + within
    while (got := await check()) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still {got} after {within}s, expected {expected}")
        await asyncio.sleep(0.02)


async def test_a_certificate_identity_stands_for_a_token(
    gateway_factory: GatewayFactory, tokens: Tokens
) -> None:
    identity = '[[identities]]\nsubject = "URI:spiffe://shop/orders"\ntenant = "shop"\n'
    write_atomic(tokens.path, tokens.text(identity + 'permissions = ["read"]\n'))
    gw = await start(gateway_factory, tokens)
    assert gw.server.auth is not None
    # The TLS handshake is tls.py's to test: here the verified identities are given.
    presented: tuple[str, ...] = ()
    gw.server.auth._identities = lambda context: presented
    get = pb.GetRequest(key="k")
    assert (await refused(gw.stub.Get(get, timeout=5))).code() is grpc.StatusCode.UNAUTHENTICATED
    presented = ("URI:spiffe://shop/other", "CN=other")
    error = await refused(gw.stub.Get(get, timeout=5))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "URI:spiffe://shop/other, CN=other" in (error.details() or "")
    presented = ("URI:spiffe://shop/orders", "CN=orders")
    assert (await gw.stub.Get(get, timeout=5)).status == pb.STATUS_MISS
    error = await refused(gw.stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=5))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "'URI:spiffe://shop/orders'" in (error.details() or "")
    # A token, when given, decides (a wrong one is not saved by the certificate).
    error = await refused(gw.stub.Get(get, metadata=bearer(new_token()), timeout=5))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED


# -- signed tokens ----------------------------------------------------------------------------


async def test_signed_tokens_are_checked(
    gateway_factory: GatewayFactory, tokens: Tokens, key_file: Path
) -> None:
    gw = await start(gateway_factory, tokens, key_file, auth__jwt_audience="cachegw")
    get = pb.GetRequest(key="k")
    good = sign(SECRET, aud="cachegw")
    assert (await gw.stub.Get(get, metadata=bearer(good), timeout=5)).status == pb.STATUS_MISS
    cases = {
        "has expired": sign(SECRET, aud="cachegw", ttl=-5),
        "does not verify": sign(OTHER_SECRET, aud="cachegw"),
        "its aud is not 'cachegw'": sign(SECRET, aud="elsewhere"),
        "no 'exp' claim": sign(SECRET, aud="cachegw", exp=None),
        "not signed with HS256": sign(SECRET, aud="cachegw", algorithm="HS512"),
        "claims are not usable: tenant must be": sign(SECRET, aud="cachegw", tenant="Shop!"),
        "unknown permission 'root'": sign(SECRET, aud="cachegw", permissions=["root"]),
    }
    for why, token in cases.items():
        error = await refused(gw.stub.Get(get, metadata=bearer(token), timeout=5))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED, why
        assert why in (error.details() or ""), (why, error.details())
        no_secret(error, token)
    # Permissions from the claims: a read-only signed token may not write.
    reader = sign(SECRET, aud="cachegw", permissions=["read"], sub="jwt-reader")
    error = await refused(
        gw.stub.Set(pb.SetRequest(key="k", value=b"v"), metadata=bearer(reader), timeout=5)
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "'jwt-reader'" in (error.details() or "")


async def test_public_key_tokens_and_key_rotation(
    gateway_factory: GatewayFactory, tokens: Tokens, tmp_path: Path
) -> None:
    old, new = ec_key(), ec_key()
    key_file = tmp_path / "issuer.pem"
    write_atomic(key_file, public_pem(old))
    gw = await start(gateway_factory, tokens, key_file, auth__jwt_algorithm="ES256")
    get = pb.GetRequest(key="k")
    by_old, by_new = sign(old, algorithm="ES256"), sign(new, algorithm="ES256")
    assert (await gw.stub.Get(get, metadata=bearer(by_old), timeout=5)).status == pb.STATUS_MISS
    error = await refused(gw.stub.Get(get, metadata=bearer(by_new), timeout=5))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    # A rotation: both keys for a while, then only the new one.
    write_atomic(key_file, public_pem(old) + public_pem(new))
    await eventually(lambda: gw.server.stats.auth_credentials == 4 + 2)
    assert (await gw.stub.Get(get, metadata=bearer(by_new), timeout=5)).status == pb.STATUS_MISS
    assert (await gw.stub.Get(get, metadata=bearer(by_old), timeout=5)).status == pb.STATUS_MISS
    write_atomic(key_file, public_pem(new))
    await eventually(lambda: gw.server.stats.auth_credentials == 4 + 1)
    error = await refused(gw.stub.Get(get, metadata=bearer(by_old), timeout=5))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "does not verify" in (error.details() or "")


# -- open streams ---------------------------------------------------------------------------


async def open_stream(gw: RunningGateway, token: str) -> Any:
    stream = gw.stub.Subscribe(pb.SubscribeRequest(prefixes=["k"]), metadata=bearer(token))
    await stream.initial_metadata()
    assert gw.server.auth is not None
    await eventually(lambda: gw.server.auth is not None and gw.server.auth.open_streams >= 1)
    return stream


async def ended(stream: Any, within: float = 10.0) -> grpc.aio.AioRpcError:
    """The stream's end, read with a bound (no event is published meanwhile)."""

    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(within):
            async for _ in stream:
                pass
    return info.value


async def test_streams_end_when_their_token_is_removed_and_rotation_keeps_calls_working(
    gateway_factory: GatewayFactory, tokens: Tokens
) -> None:
    gw = await start(gateway_factory, tokens)
    stream = await open_stream(gw, tokens.watcher)
    kept = await open_stream(gw, tokens.admin)
    rotated = new_token()
    # Rotation: the watcher's new token is added and its old one removed.
    write_atomic(
        tokens.path,
        "\n".join(
            [
                entry(tokens.reader, "reader", ["read"]),
                entry(tokens.admin, "admin", ["all"]),
                entry(rotated, "watcher-2", ["subscribe", "read"]),
            ]
        ),
    )
    error = await ended(stream)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "unknown to this gateway" in (error.details() or "")
    # The new token works at once for new calls and streams; the other stream goes on.
    again = await open_stream(gw, rotated)
    assert (await gw.stub.Get(pb.GetRequest(key="k"), metadata=bearer(rotated))).status
    await gw.stub.Invalidate(pb.InvalidateRequest(keys=["k1"]), metadata=bearer(tokens.admin))
    for s in (kept, again):
        event = await asyncio.wait_for(s.read(), 5)
        assert list(event.keys) == ["k1"]
    assert gw.server.stats.auth_streams_ended == 1
    kept.cancel()
    again.cancel()
    await eventually(lambda: gw.server.auth is not None and gw.server.auth.open_streams == 0)


async def test_streams_end_when_their_signed_token_expires_or_its_key_changes(
    gateway_factory: GatewayFactory, tokens: Tokens, key_file: Path
) -> None:
    gw = await start(gateway_factory, tokens, key_file)
    short = await open_stream(gw, sign(SECRET, ttl=1.5, permissions=["subscribe"]))
    long = await open_stream(gw, sign(SECRET, ttl=600, permissions=["subscribe"]))
    error = await ended(short)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "expired at" in (error.details() or "")
    write_atomic(key_file, OTHER_SECRET + "\n")
    error = await ended(long)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "does not verify" in (error.details() or "")
    await eventually(lambda: gw.server.auth is not None and gw.server.auth.open_streams == 0)
    await eventually(lambda: gw.server.stats.subscribers == 0)  # subscriptions let go
