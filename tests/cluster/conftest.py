"""A real 3-primary, 3-replica Redis Cluster per test module (started in a few seconds
from the redis-server and redis-cli binaries), and gateways on it, each test under a
prefix of its own so that tests sharing the cluster never see each other's keys."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster_topology import ClusterTopology
from tests.conftest import GatewayCluster, GatewayFactory, GatewayProcess, RunningGateway

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterTopology]:
    with ClusterTopology(primaries=3, replicas=1) as topology:
        yield topology


ClusterGateways = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
def prefix() -> str:
    return f"t{next(_prefixes)}"


@pytest.fixture
def cluster_gateway(
    cluster: ClusterTopology, gateway_factory: GatewayFactory, prefix: str
) -> ClusterGateways:
    """start(toml="", **overrides) -> a gateway on the cluster, under this test's prefix."""

    async def start(toml: str = "", **overrides: object) -> RunningGateway:
        gw: RunningGateway = await gateway_factory(
            toml, redis_url=cluster.url, redis__prefix=prefix, **overrides
        )
        return gw

    return start


@pytest.fixture
def gateway_cluster(
    tmp_path: Path,
    cluster: ClusterTopology,
    gateway_process: Callable[..., GatewayProcess],
    prefix: str,
) -> GatewayCluster:
    """As tests/conftest.py's `gateway_cluster`, on the Redis Cluster: the fan-out and
    stampede tests run unchanged over it (tests/cluster/test_cluster_storms.py)."""
    started = 0

    def start(n: int, toml: str = "") -> list[GatewayProcess]:
        nonlocal started
        config = tmp_path / f"cluster{started}.toml"
        started += 1
        config.write_text(toml)
        flags = ["--config", str(config), "--redis-url", cluster.url, "--redis-prefix", prefix]
        return [
            gateway_process(*flags, "--gateway-id", f"gw{i}", "--log-level", "WARNING")
            for i in range(n)
        ]

    return start
