"""A real 3-primary, 3-replica Redis Cluster per test module (started in a few seconds
from the redis-server and redis-cli binaries), and gateways on it, each test under a
prefix of its own so that tests sharing the cluster never see each other's keys."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator

import pytest

from tests.cluster_topology import ClusterTopology
from tests.conftest import GatewayFactory, RunningGateway

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
