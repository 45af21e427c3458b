"""rediss+cluster://: a Redis Cluster whose nodes, cluster bus and replication speak TLS and
require client certificates, with the gateway logged in as the ACL user docs/config.md
gives: every RPC works (the per-node connections and the bus's included), Redis denies
nothing, and every gateway connection came in over TLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cachegw_gateway.managed_redis import ManagedRedis
from tests.cluster_topology import ClusterTopology
from tests.conftest import GatewayFactory
from tests.redis_certs import Pki, make_pki
from tests.redis_exercise import every_rpc
from tests.test_redis_acl import PASSWORD, deny_log, documented_rules

pytestmark = pytest.mark.slow  # a six-node cluster over TLS: about 15 s to build


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_cluster(pki: Pki) -> Iterator[ClusterTopology]:
    with ClusterTopology(primaries=3, replicas=1, tls=pki) as topology:
        for node in topology.nodes:
            with redis.Redis(port=node.port) as admin:
                admin.execute_command(
                    "ACL", "SETUSER", "cachegw", "reset", "on", f">{PASSWORD}",
                    *documented_rules(),
                )  # fmt: skip
        yield topology


def _admin(node: ManagedRedis) -> redis.Redis:
    return redis.Redis(port=node.port)


async def test_every_rpc_over_tls_as_the_documented_acl_user(
    gateway_factory: GatewayFactory, tls_cluster: ClusterTopology, pki: Pki, tmp_path: Path
) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD)
    for node in tls_cluster.nodes:
        with _admin(node) as admin:
            admin.execute_command("ACL", "LOG", "RESET")
    gw = await gateway_factory(
        redis_url=tls_cluster.url,
        redis__username="cachegw",
        redis__password_file=str(secret),
        redis__tls_ca=str(pki.ca),
        redis__tls_cert=str(pki.client_cert),
        redis__tls_key=str(pki.client_key),
    )
    await every_rpc(gw.stub)
    assert await gw.server.store.ping()
    seen = 0
    for node in tls_cluster.nodes:
        with _admin(node) as admin:
            assert deny_log(admin) == []
            tls_port = tls_cluster.tls_ports[node.port]
            mine = [c for c in admin.client_list() if c["user"] == "cachegw"]
            assert all(c["laddr"].endswith(f":{tls_port}") for c in mine), mine
            seen += len(mine)
    assert seen >= 3  # at least one per primary
