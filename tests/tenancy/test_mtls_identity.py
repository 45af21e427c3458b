"""A client certificate stands for a token: mutual TLS plus an [[identities]] entry in the
tokens file, end to end through a `cachegw serve` process. The certificate's identity
picks the tenant and permissions; another certificate from the same CA, named nowhere,
gets UNAUTHENTICATED; a bearer token on the same connection decides instead."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.managed_redis import ManagedRedis
from tests.gateway.test_tls_serve import Start, creds, stub
from tests.tenancy.test_isolation import TOKENS, md, tokens_file
from tests.tlscerts import CA


def test_a_certificate_identity_is_a_tenants_credential(
    gateway_process: Start, redis_server: ManagedRedis, tmp_path: Path
) -> None:
    ca = CA()
    identities = (
        '\n[[identities]]\nsubject = "URI:spiffe://shop/orders"\nname = "orders-svc"\n'
        'tenant = "alpha"\npermissions = ["read", "write"]\n'
    )
    tokens = tokens_file(tmp_path, identities)
    cert, key = ca.server().write(tmp_path, "server")
    client_ca = tmp_path / "clients-ca.crt"
    client_ca.write_bytes(ca.pem)
    gw = gateway_process(
        "--redis-url", redis_server.url,
        "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(client_ca),
        "--auth", "--tokens-file", str(tokens),
        credentials=creds(ca, ca.client("health-checker")),
    )  # fmt: skip
    orders = creds(ca, ca.client("orders", uris=("spiffe://shop/orders",)))
    with stub(gw.address, orders) as s:
        s.Set(pb.SetRequest(key="order:1", value=b"o"), timeout=5)
        assert s.Get(pb.GetRequest(key="order:1"), timeout=5).value == b"o"
        with pytest.raises(grpc.RpcError) as err:
            s.Invalidate(pb.InvalidateRequest(keys=["order:1"]), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # A bearer token on the same connection decides: beta's space, not alpha's.
        miss = s.Get(pb.GetRequest(key="order:1"), metadata=md("beta"), timeout=5)
        assert miss.status == pb.STATUS_MISS
    # The value is alpha's, as a token of alpha sees it and Redis holds it.
    with stub(gw.address, creds(ca, ca.client("ops"))) as s:
        got = s.Get(pb.GetRequest(key="order:1"), metadata=md("alpha"), timeout=5)
        assert got.value == b"o"
        # A certificate of the same CA that no [[identities]] entry names, and no token.
        with pytest.raises(grpc.RpcError) as err:
            s.Get(pb.GetRequest(key="order:1"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.exists("cg:t:alpha:{order:1}") == 1
        assert client.exists("cg:{order:1}") == 0
    finally:
        client.close()
    assert TOKENS["alpha"] not in gw.output()
