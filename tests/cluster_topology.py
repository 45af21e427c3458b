"""A real Redis Cluster for the tests and benchmarks: redis-server processes started with
``--cluster-enabled yes`` on free loopback ports and joined by ``redis-cli --cluster
create``, the way an operator builds one. Everything it starts, it stops.

With ``tls=`` (a `tests.redis_certs.Pki`) every node also has a TLS port, its cluster bus
and replication speak TLS (``tls-cluster yes``, ``tls-replication yes``), the cluster is
created over TLS, and `url` is the ``rediss+cluster://`` of the TLS ports. The plaintext
ports stay, for the topology's own looks inside (CLUSTER SLOTS answers a plaintext
client with plaintext ports).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import redis

from cachegw_gateway.managed_redis import ManagedRedis

if TYPE_CHECKING:
    from tests.redis_certs import Pki

NODE_TIMEOUT_MS = 1500  # how long a silent primary takes to be failed over


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _node_port(taken: set[int]) -> int:
    """A port for a cluster node. Its cluster bus listens on port + 10000, so the port
    must be 55535 or less (a free port picked by the kernel was above that about one time
    in five: the node refused to start) and both must be free. Picked below the kernel's
    ephemeral range (32768 up), so that no client socket takes them before the node
    starts."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(10_000, 22_768)
        if port not in taken and _free(port) and _free(port + 10_000):
            taken.add(port)
            return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


def _cli() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        raise RuntimeError("redis-cli not found (Debian: apt-get install redis-tools)")
    return path


class ClusterTopology:
    """`primaries` primaries with `replicas` replicas each, all on 127.0.0.1."""

    def __init__(self, primaries: int = 3, replicas: int = 1, tls: Pki | None = None) -> None:
        flags = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # A replica takes over however long its link was down (loopback: it is
            # never far behind), so a failover never waits for a human.
            "--cluster-replica-validity-factor", "0",
            "--cluster-require-full-coverage", "no",
        ]  # fmt: skip
        taken: set[int] = set()
        self.tls = tls
        self.tls_ports: dict[int, int] = {}  # plaintext port -> TLS port (with `tls`)
        self.nodes = []
        for _ in range(primaries * (1 + replicas)):
            extra = list(flags)
            if tls is not None:
                from tests.redis_certs import server_tls_args

                tls_port = _node_port(taken)  # the bus is on tls_port + 10000
                extra += server_tls_args(tls, tls_port, auth_clients=True)
                extra += ["--tls-cluster", "yes", "--tls-replication", "yes"]
            node = ManagedRedis(port=_node_port(taken), extra_args=extra)
            if tls is not None:
                self.tls_ports[node.port] = tls_port
            self.nodes.append(node)
        self._primaries = primaries
        self._replicas = replicas

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        addrs = [f"127.0.0.1:{self._port(n)}" for n in self.nodes]
        replicas = ["--cluster-replicas", str(self._replicas)]
        done = subprocess.run(
            [_cli(), *self._cli_tls(), "--cluster", "create", *addrs, *replicas, "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        self.wait_healthy(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            if node.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
            node.stop()

    def __enter__(self) -> ClusterTopology:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _port(self, node: ManagedRedis) -> int:
        """The port clients use: the TLS one with `tls`."""
        return self.tls_ports.get(node.port, node.port)

    def _cli_tls(self) -> list[str]:
        if self.tls is None:
            return []
        t = self.tls
        return [
            "--tls",
            "--cacert",
            str(t.ca),
            "--cert",
            str(t.client_cert),
            "--key",
            str(t.client_key),
        ]

    # -- views --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The gateway's URL: every node as a seed (``rediss+cluster://`` with `tls`)."""
        scheme = "rediss+cluster://" if self.tls is not None else "redis+cluster://"
        return scheme + ",".join(f"127.0.0.1:{self._port(n)}" for n in self.nodes)

    def client(self, node: ManagedRedis) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=2.0)

    def _info(self, node: ManagedRedis, section: str) -> dict[str, object]:
        with self.client(node) as c:
            return dict(c.info(section))

    def running_nodes(self) -> list[ManagedRedis]:
        return [n for n in self.nodes if n.running]

    def primaries(self) -> list[ManagedRedis]:
        return [n for n in self.running_nodes() if self._info(n, "replication")["role"] == "master"]

    def cluster_client(self) -> redis.RedisCluster:
        node = self.running_nodes()[0]
        return redis.RedisCluster(host="127.0.0.1", port=node.port, socket_timeout=2.0)

    def slots_of(self, node: ManagedRedis) -> list[tuple[int, int]]:
        """The slot ranges `node` serves now."""
        with self.client(node) as c:
            return [
                (int(s), int(e))
                for s, e, owner, *_ in c.execute_command("CLUSTER", "SLOTS")
                if int(owner[1]) == node.port
            ]

    def primary_of_slot(self, slot: int) -> ManagedRedis:
        for node in self.running_nodes():
            with self.client(node) as c:
                for start, end, owner, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        port = int(owner[1])
                        return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def node_of_key(self, name: str) -> ManagedRedis:
        """The primary serving Redis key `name` now."""
        with self.client(self.running_nodes()[0]) as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", name))
        return self.primary_of_slot(slot)

    # -- health -------------------------------------------------------------------------

    def healthy(self) -> bool:
        """Every running node sees the cluster ok, every slot covered by a running
        primary, and every primary's replicas attached."""
        try:
            nodes = self.running_nodes()
            for node in nodes:
                with self.client(node) as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text:
                        return False
            primaries = self.primaries()
            if len(primaries) < self._primaries:
                return False
            for node in nodes:
                rep = self._info(node, "replication")
                if rep["role"] == "slave" and rep.get("master_link_status") != "up":
                    return False
            return True
        except redis.RedisError:
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster was not healthy within {timeout:g}s")
            time.sleep(0.1)

    # -- faults -------------------------------------------------------------------------

    def kill(self, node: ManagedRedis) -> None:
        node.kill()

    def pause(self, node: ManagedRedis) -> None:
        assert node.pid is not None
        os.kill(node.pid, signal.SIGSTOP)

    def resume(self, node: ManagedRedis) -> None:
        assert node.pid is not None
        os.kill(node.pid, signal.SIGCONT)

    def wait_failover(self, old: ManagedRedis, timeout: float = 20.0) -> ManagedRedis:
        """Wait until the slots `old` served are served by another running primary."""
        with self.client(next(n for n in self.running_nodes() if n is not old)) as c:
            slots = [
                (int(s), int(e))
                for s, e, owner, *_ in c.execute_command("CLUSTER", "SLOTS")
                if int(owner[1]) == old.port
            ]
        slot = slots[0][0] if slots else 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                new = self.primary_of_slot(slot)
                if new is not old and new.running and self.healthy_except(old):
                    return new
            except (redis.RedisError, LookupError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no failover of {old} within {timeout:g}s")
            time.sleep(0.1)

    def healthy_except(self, gone: ManagedRedis) -> bool:
        for node in self.running_nodes():
            if node is gone:
                continue
            try:
                with self.client(node) as c:
                    info = c.execute_command("CLUSTER", "INFO")
            except redis.RedisError:
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        return True

    def move_slots(self, source: ManagedRedis, target: ManagedRedis, count: int) -> None:
        """Move `count` slots from `source` to `target` with their keys, the way an
        operator does (redis-cli --cluster reshard)."""
        with self.client(source) as c:
            src_id = c.execute_command("CLUSTER", "MYID")
        with self.client(target) as c:
            dst_id = c.execute_command("CLUSTER", "MYID")
        args = [
            _cli(), *self._cli_tls(), "--cluster", "reshard", f"127.0.0.1:{self._port(source)}",
            "--cluster-from", _s(src_id), "--cluster-to", _s(dst_id),
            "--cluster-slots", str(count), "--cluster-yes",
            "--cluster-pipeline", "100",
        ]  # fmt: skip
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"reshard failed:\n{done.stdout[-2000:]}{done.stderr}")


def _s(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def seeds(topology: ClusterTopology) -> Sequence[tuple[str, int]]:
    return [("127.0.0.1", n.port) for n in topology.nodes]
