"""TLS to a standalone Redis (rediss://): a CA, mutual TLS, hostname checks, and what a
wrong setting looks like. Real redis-server processes with certificates made here."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.config import ConfigError
from tests.conftest import BIN, GatewayFactory, make_config
from tests.redis_certs import Pki, TlsRedis, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_redis(pki: Pki) -> Iterator[TlsRedis]:
    with TlsRedis(pki) as server:
        yield server


@pytest.fixture
def mtls_redis(pki: Pki) -> Iterator[TlsRedis]:
    with TlsRedis(pki, auth_clients=True) as server:
        yield server


async def _round_trip(gw: object) -> None:
    stub = gw.stub  # type: ignore[attr-defined]
    await stub.Set(pb.SetRequest(key="tls:k", value=b"v"), timeout=5)
    # L2, not L1: another key name would do, but the value must come back from Redis.
    reply = await stub.Get(pb.GetRequest(key="tls:k"), timeout=5)
    assert reply.value == b"v"


async def test_rediss_with_a_ca(
    gateway_factory: GatewayFactory, tls_redis: TlsRedis, pki: Pki
) -> None:
    gw = await gateway_factory(redis_url=tls_redis.url(), redis__tls_ca=str(pki.ca))
    await _round_trip(gw)
    assert await gw.server.store.ping()
    with redis.Redis(port=tls_redis.server.port) as plain:  # its plaintext port, to look
        assert plain.exists("cg:{tls:k}") == 1
        clients = plain.client_list()
    # The gateway's connections came in over TLS, and the invalidation bus's too.
    tls_port = str(tls_redis.tls_port)
    assert sum(1 for c in clients if c["laddr"].endswith(f":{tls_port}")) >= 2


async def test_mutual_tls(gateway_factory: GatewayFactory, mtls_redis: TlsRedis, pki: Pki) -> None:
    gw = await gateway_factory(
        redis_url=mtls_redis.url(),
        redis__tls_ca=str(pki.ca),
        redis__tls_cert=str(pki.client_cert),
        redis__tls_key=str(pki.client_key),
    )
    await _round_trip(gw)


async def test_mutual_tls_without_a_client_certificate_is_refused(
    gateway_factory: GatewayFactory, mtls_redis: TlsRedis, pki: Pki
) -> None:
    gw = await gateway_factory(redis_url=mtls_redis.url(), redis__tls_ca=str(pki.ca))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.stub.Set(pb.SetRequest(key="tls:k", value=b"v"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_wrong_ca_is_refused_with_a_clear_message(
    gateway_factory: GatewayFactory, tls_redis: TlsRedis, pki: Pki
) -> None:
    gw = await gateway_factory(redis_url=tls_redis.url(), redis__tls_ca=str(pki.other_ca))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.stub.Get(pb.GetRequest(key="tls:k"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in (info.value.details() or "")
    assert not await gw.server.store.ping()
    error = gw.server.store.last_probe_error
    assert error is not None and "certificate verify failed" in str(error)


async def test_plaintext_to_the_tls_port_fails(
    gateway_factory: GatewayFactory, tls_redis: TlsRedis
) -> None:
    gw = await gateway_factory(redis_url=tls_redis.url("redis"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.stub.Get(pb.GetRequest(key="tls:k"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_hostname_checking_is_on_and_can_be_turned_off(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    # A certificate naming another host only: refused as it is, accepted (the chain is
    # still checked) with tls_check_hostname = false.
    other = make_pki(tmp_path / "pki", hosts=("cache.example",))
    with TlsRedis(other) as server:
        strict = await gateway_factory(redis_url=server.url(), redis__tls_ca=str(other.ca))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await strict.stub.Get(pb.GetRequest(key="tls:k"), timeout=5)
        assert "match" in (info.value.details() or "").lower()
        relaxed = await gateway_factory(
            redis_url=server.url(),
            redis__tls_ca=str(other.ca),
            redis__tls_check_hostname="false",
        )
        await _round_trip(relaxed)


def test_tls_files_are_checked_at_start(tmp_path: Path, pki: Pki) -> None:
    url = "rediss://127.0.0.1:6380/0"
    with pytest.raises(ConfigError, match=r"redis.tls_ca names .*which does not exist"):
        make_config(tmp_path, url, redis__tls_ca=str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match=r"redis.tls_key must be given with its pair"):
        make_config(tmp_path, url, redis__tls_cert=str(pki.client_cert))
    with pytest.raises(ConfigError, match=r"redis.tls_cert .* are not a PEM certificate"):
        make_config(
            tmp_path, url, redis__tls_cert=str(pki.client_cert), redis__tls_key=str(pki.server_key)
        )
    with pytest.raises(ConfigError, match=r"redis.tls_ca names .* holds no PEM CA"):
        make_config(tmp_path, url, redis__tls_ca=str(pki.client_key))


def test_the_relay_speaks_tls_with_an_acl_user(pki: Pki, tmp_path: Path) -> None:
    password = "relay-s3cret-QUUX"
    secret = tmp_path / "pw"
    secret.write_text(password + "\n")
    with TlsRedis(pki, auth_clients=True) as eu, TlsRedis(pki, auth_clients=True) as us:
        for region in (eu, us):
            with redis.Redis(port=region.server.port) as admin:
                admin.execute_command(
                    "ACL", "SETUSER", "relay", "on", f">{password}", "~*", "&*", "+@all"
                )
        done = subprocess.run(
            [
                str(BIN / "cachegw"),
                "relay",
                "--once",
                "--region",
                f"eu={eu.url()}",
                "--region",
                f"us={us.url(auth=f'relay:{password}@')}",
                "--username",
                "eu=relay",
                "--password-file",
                f"eu={secret}",
                "--tls-ca",
                str(pki.ca),
                "--tls-cert",
                str(pki.client_cert),
                "--tls-key",
                str(pki.client_key),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1]).keys() == {"eu->us", "us->eu"}
        for region in (eu, us):
            with redis.Redis(port=region.server.port) as admin:
                users = {c["user"] for c in admin.client_list()}
            assert "relay" not in users  # --once closed its connections
        assert password not in done.stdout + done.stderr
