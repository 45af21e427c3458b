"""The Redis deployments the chaos routines run against, behind one small interface.

A routine never starts Redis itself: it gets a `Topology` and asks it for the URL to
give the gateways, to kill a node, to bring the node back, and where partition proxies
stand (one in front of every address a gateway connects to) and how the partitioned
gateway is pointed at them. `Standalone` is one managed redis-server; a Sentinel or Cluster topology
(tests/topology.py) plugs in by implementing the same few methods and being named in
`TOPOLOGIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from cachegw_gateway.managed_redis import ManagedRedis
from tests.cluster_topology import ClusterTopology


class Topology(Protocol):
    """What a chaos routine needs of a Redis deployment. Every method blocks until done
    (routines call them from a worker thread, so the load keeps running)."""

    name: str

    def start(self) -> None:
        """Start every process and return once the deployment serves."""

    def stop(self) -> None:
        """Stop every process; idempotent."""

    @property
    def url(self) -> str:
        """What gateways get as --redis-url."""

    def kill_node(self) -> str:
        """SIGKILL the node that serves writes (standalone: the only one), as a crash;
        returns what was killed, for the table."""

    def restore_node(self) -> None:
        """Bring back what kill_node took: standalone restarts it on its port, empty
        (it keeps nothing on disk: the data is lost); with replicas the old primary
        rejoins. Returns once it answers."""

    def single_node(self) -> tuple[str, int] | None:
        """The one Redis address, where the mass invalidations' bulk loader opens raw
        connections; None when keys live on several nodes (then they are loaded
        through the gateways)."""

    def partition_targets(self) -> list[tuple[str, int]]:
        """Every address a gateway connects to: the partition routine puts a proxy in
        front of each (for one gateway); none means the routine is skipped."""

    def partitioned_flags(self, proxies: Mapping[tuple[str, int], int]) -> list[str]:
        """The `cachegw serve` flags (`--redis-url` and what else it needs) of the
        gateway that reaches each target through its proxy (target -> the proxy's port
        on 127.0.0.1)."""


class Standalone:
    """One managed redis-server on a free loopback port."""

    name = "standalone"

    def __init__(self, extra_args: tuple[str, ...] = ()) -> None:
        self._redis = ManagedRedis(extra_args=extra_args)

    def start(self) -> None:
        self._redis.start()

    def stop(self) -> None:
        self._redis.stop()

    @property
    def url(self) -> str:
        return self._redis.url

    def kill_node(self) -> str:
        pid = self._redis.pid
        self._redis.kill()
        return f"redis-server pid {pid} (SIGKILL)"

    def restore_node(self) -> None:
        self._redis.start()  # same port, empty

    def single_node(self) -> tuple[str, int] | None:
        return self._redis.host, self._redis.port

    def partition_targets(self) -> list[tuple[str, int]]:
        return [(self._redis.host, self._redis.port)]

    def partitioned_flags(self, proxies: Mapping[tuple[str, int], int]) -> list[str]:
        port = proxies[self._redis.host, self._redis.port]
        return ["--redis-url", f"redis://127.0.0.1:{port}/0"]


class Cluster:
    """A 3-primary, 3-replica Redis Cluster (tests/cluster_topology.py). Eviction kills
    the primary of the gateways' audit stream's slot: its replica is promoted, and the
    dead node stays out (its replica is now a primary without one)."""

    name = "cluster"

    def __init__(self) -> None:
        self._cluster = ClusterTopology(primaries=3, replicas=1)
        self._killed: ManagedRedis | None = None

    def start(self) -> None:
        self._cluster.start()

    def stop(self) -> None:
        self._cluster.stop()

    @property
    def url(self) -> str:
        return self._cluster.url

    def kill_node(self) -> str:
        victim = self._cluster.node_of_key("cg:{meta}:events")
        self._cluster.kill(victim)
        self._killed = victim
        return f"the primary on port {victim.port} (SIGKILL; it held the audit stream)"

    def restore_node(self) -> None:
        """The cluster's own recovery: wait until the replica took the dead primary's
        slots (the node itself is not brought back)."""
        if self._killed is not None:
            self._cluster.wait_failover(self._killed)

    def single_node(self) -> tuple[str, int] | None:
        return None  # keys live on three primaries

    def partition_targets(self) -> list[tuple[str, int]]:
        """Every node, replicas included (a failover makes one a primary): a cluster
        client goes wherever the cluster says its nodes are, so each needs a proxy."""
        return [("127.0.0.1", node.port) for node in self._cluster.nodes]

    def partitioned_flags(self, proxies: Mapping[tuple[str, int], int]) -> list[str]:
        """The same URL as the others, and redis.address_map: every node's address ->
        its proxy (the URL's seeds go through the map too)."""
        pairs = ",".join(f"{host}:{port}=127.0.0.1:{p}" for (host, port), p in proxies.items())
        return ["--redis-url", self.url, "--redis-address-map", pairs]


# Topologies by the name `chaos.py --topology` takes.
TOPOLOGIES: dict[str, Callable[[], Topology]] = {"standalone": Standalone, "cluster": Cluster}
