"""rediss+sentinel://: TLS to the Sentinel and to the primary it names, the nodes' ACL user
from the URL and the Sentinel's own user from redis.sentinel_*. A primary and one Sentinel,
both TLS only for the gateway (their plaintext ports are how the test looks inside)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from tests.conftest import GatewayFactory
from tests.redis_certs import Pki, TlsRedis, make_pki

SERVICE = "tlsvc"
NODE_PASSWORD = "node-s3cret"
SENTINEL_PASSWORD = "sentinel-s3cret"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_sentinel(pki: Pki) -> Iterator[tuple[TlsRedis, int]]:
    """(the TLS primary, the Sentinel's TLS port)."""
    with TlsRedis(pki, extra_args=["--tls-replication", "yes"]) as primary:
        with redis.Redis(port=primary.server.port) as admin:
            admin.execute_command(
                "ACL", "SETUSER", "gw", "on", f">{NODE_PASSWORD}", "~*", "&*", "+@all"
            )
        tls_port = free_port()
        sentinel = ManagedRedis(
            extra_args=["--sentinel"],
            config="\n".join(
                [
                    f"tls-port {tls_port}",
                    f"tls-cert-file {pki.server_cert}",
                    f"tls-key-file {pki.server_key}",
                    f"tls-ca-cert-file {pki.ca}",
                    "tls-auth-clients no",
                    "tls-replication yes",  # Sentinel talks TLS to the nodes
                    f"sentinel monitor {SERVICE} 127.0.0.1 {primary.tls_port} 1",
                    f"sentinel down-after-milliseconds {SERVICE} 1000",
                    "",
                ]
            ),
        )
        with sentinel:
            with redis.Redis(port=sentinel.port) as s:
                # The Sentinel's own user (a Sentinel answers ACL SETUSER), and no
                # anonymous access over TLS for anyone else.
                s.execute_command(
                    "ACL", "SETUSER", "sentuser", "on", f">{SENTINEL_PASSWORD}", "+@all"
                )
                deadline = time.monotonic() + 20
                while True:
                    master = s.sentinel_master(SERVICE)
                    if master.get("is_master") and not master.get("is_sdown"):
                        break
                    assert time.monotonic() < deadline, (
                        f"sentinel does not see the primary: {master}"
                    )
                    time.sleep(0.1)
                s.execute_command("ACL", "SETUSER", "default", "off")
            yield primary, tls_port


async def test_tls_to_the_sentinel_and_the_primary(
    gateway_factory: GatewayFactory, tls_sentinel: tuple[TlsRedis, int], pki: Pki, tmp_path: Path
) -> None:
    primary, sentinel_port = tls_sentinel
    secret = tmp_path / "sentinel-password"
    secret.write_text(SENTINEL_PASSWORD)
    url = f"rediss+sentinel://gw:{NODE_PASSWORD}@127.0.0.1:{sentinel_port}/{SERVICE}"
    gw = await gateway_factory(
        redis_url=url,
        redis__tls_ca=str(pki.ca),
        redis__sentinel_username="sentuser",
        redis__sentinel_password_file=str(secret),
    )
    await gw.stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=5)
    assert (await gw.stub.Get(pb.GetRequest(key="k"), timeout=5)).value == b"v"
    with redis.Redis(port=primary.server.port) as admin:
        assert admin.exists("cg:{k}") == 1
        mine = [c for c in admin.client_list() if c["user"] == "gw"]
    assert mine and all(c["laddr"].endswith(f":{primary.tls_port}") for c in mine)


async def test_the_sentinel_refuses_without_its_credentials(
    gateway_factory: GatewayFactory, tls_sentinel: tuple[TlsRedis, int], pki: Pki
) -> None:
    _, sentinel_port = tls_sentinel
    url = f"rediss+sentinel://gw:{NODE_PASSWORD}@127.0.0.1:{sentinel_port}/{SERVICE}"
    gw = await gateway_factory(redis_url=url, redis__tls_ca=str(pki.ca))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw.stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    details = info.value.details() or ""
    assert "authenticated" in details and NODE_PASSWORD not in details
