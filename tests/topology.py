"""Real multi-process Redis topologies for tests and benchmarks.

`SentinelTopology`: one primary, two replicas (``redis-server --replicaof``) and three
Sentinels (``redis-server <conf> --sentinel``, each with its own writable config file in
its own temp dir), all on free loopback ports: the design review's shape. Entering it
waits (bounded polling) until both replicas are attached and in sync and every Sentinel
sees the primary, both replicas and the two other Sentinels; leaving it stops every
process, also when a test failed. Failures are injected as a crash would be (SIGKILL).

Redis's own timings, chosen for tests: a node is down after 1 s without an answer
(``down-after-milliseconds``), so a SIGKILLed primary is replaced in about 3-5 s here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cachegw_gateway.managed_redis import ManagedRedis

Address = tuple[str, int]

HOST = "127.0.0.1"
SERVICE = "cachegw"
DOWN_AFTER_MS = 1000
# Longer than a promotion can take on a loaded 2-core machine: a failover that overruns
# it is abandoned and another Sentinel promotes a second replica, leaving two primaries
# for a while (the first keeps the writes of the clients still connected to it).
FAILOVER_TIMEOUT_MS = 10_000
READY_WITHIN = 30.0  # seconds for a topology to start and settle
# Every node: an initial full sync at once (the default waits 5 s for more replicas).
_NODE_ARGS = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")


def poll(check: Callable[[], bool], within: float, what: str, step: float = 0.05) -> None:
    """Wait until `check()` holds, at most `within` seconds (errors count as not yet)."""
    deadline = time.monotonic() + within
    last: Exception | None = None
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last})" if last is not None else ""
            raise TimeoutError(f"{what}: not true after {within:g}s{detail}")
        time.sleep(step)


def client(address: Address, timeout: float = 1.0, password: str | None = None) -> redis.Redis:
    """A plain client for one node or Sentinel: short timeouts, no retries."""
    return redis.Redis(
        host=address[0],
        port=address[1],
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def info(
    address: Address, section: str = "replication", password: str | None = None
) -> dict[str, object]:
    with client(address, password=password) as c:
        out: dict[str, object] = c.info(section)
        return out


class SentinelTopology:
    """A primary, `replicas` replicas and `sentinels` Sentinels for service `service`."""

    def __init__(
        self,
        *,
        service: str = SERVICE,
        replicas: int = 2,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = DOWN_AFTER_MS,
        failover_timeout_ms: int = FAILOVER_TIMEOUT_MS,
        password: str | None = None,
    ) -> None:
        self.service = service
        # The data nodes' requirepass (and masterauth); the Sentinels have none.
        self.password = password
        self._replicas = replicas
        self._sentinel_count = sentinels
        self._quorum = quorum
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self.nodes: list[ManagedRedis] = []  # data nodes; nodes[0] is the first primary
        self.sentinels: list[ManagedRedis] = []

    # -- addresses ------------------------------------------------------------------------

    @staticmethod
    def address(node: ManagedRedis) -> Address:
        return (node.host, node.port)

    @property
    def sentinel_addresses(self) -> list[Address]:
        return [self.address(s) for s in self.sentinels]

    @property
    def url(self) -> str:
        """The gateway's URL: ``redis+sentinel://[:password@]h:p,h:p,h:p/SERVICE``."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinel_addresses)
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        return f"redis+sentinel://{auth}{hosts}/{self.service}"

    def node_at(self, address: Address) -> ManagedRedis:
        for node in self.nodes:
            if self.address(node) == address:
                return node
        raise KeyError(f"no data node at {address[0]}:{address[1]}")

    def sentinel_view(self, sentinel: ManagedRedis) -> Address | None:
        """The primary `sentinel` names for the service (None if it cannot say)."""
        with client(self.address(sentinel)) as c:
            reply = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        if not reply:
            return None
        host, port = reply
        return (host.decode() if isinstance(host, bytes) else str(host), int(port))

    def primary_address(self) -> Address:
        """The primary the running Sentinels agree on (ValueError if they do not)."""
        views = {self.sentinel_view(s) for s in self.sentinels if s.running}
        if len(views) != 1 or None in views:
            raise ValueError(f"the sentinels disagree on the primary: {views}")
        (view,) = views
        assert view is not None
        return view

    @property
    def primary(self) -> ManagedRedis:
        return self.node_at(self.primary_address())

    @property
    def replicas(self) -> list[ManagedRedis]:
        primary = self.primary
        return [n for n in self.nodes if n is not primary]

    # -- life cycle -----------------------------------------------------------------------

    def node_client(self, node: ManagedRedis | Address) -> redis.Redis:
        """A client for a data node (with the topology's password)."""
        address = node if isinstance(node, tuple) else self.address(node)
        return client(address, password=self.password)

    def _start_node(self, port: int = 0, primary: Address | None = None) -> ManagedRedis:
        args = list(_NODE_ARGS)
        if self.password is not None:
            args += ["--masterauth", self.password]
        if primary is not None:
            args += ["--replicaof", primary[0], str(primary[1])]
        node = ManagedRedis(port=port, extra_args=args)
        node.start()
        if self.password is not None:
            # After the start: ManagedRedis knows its child by an INFO sent without AUTH.
            with client(self.address(node)) as c:
                c.config_set("requirepass", self.password)
        return node

    def _sentinel_config(self, primary: Address) -> str:
        name = self.service
        return "\n".join(
            [
                f"sentinel monitor {name} {primary[0]} {primary[1]} {self._quorum}",
                f"sentinel down-after-milliseconds {name} {self._down_after_ms}",
                f"sentinel failover-timeout {name} {self._failover_timeout_ms}",
                f"sentinel parallel-syncs {name} {max(1, self._replicas)}",
                *([f"sentinel auth-pass {name} {self.password}"] if self.password else []),
                "",
            ]
        )

    def _start_sentinel(self, primary: Address, port: int = 0) -> ManagedRedis:
        sentinel = ManagedRedis(
            port=port, config=self._sentinel_config(primary), extra_args=["--sentinel"]
        )
        sentinel.start()
        return sentinel

    def start(self) -> SentinelTopology:
        try:
            primary = self._start_node()
            self.nodes.append(primary)
            for _ in range(self._replicas):
                self.nodes.append(self._start_node(primary=self.address(primary)))
            self.wait_replicated()
            for _ in range(self._sentinel_count):
                self.sentinels.append(self._start_sentinel(self.address(primary)))
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process (Sentinels first, so that none fails over meanwhile)."""
        for proc in [*self.sentinels, *self.nodes]:
            with contextlib.suppress(Exception):
                proc.stop()

    def __enter__(self) -> SentinelTopology:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- waiting --------------------------------------------------------------------------

    def _in_sync(self) -> bool:
        primary = self.address(self.primary_or_first())
        rep = info(primary, password=self.password)
        if rep.get("role") != "master":
            return False
        online = [
            v
            for k, v in rep.items()
            if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
        ]
        wanted = [n for n in self.nodes if n.running and self.address(n) != primary]
        if len(online) < len(wanted):
            return False
        offset = int(str(rep.get("master_repl_offset", 0)))
        for node in wanted:
            r = info(self.address(node), password=self.password)
            if r.get("master_link_status") != "up":
                return False
            if int(str(r.get("slave_repl_offset", -1))) < offset:
                return False
        return True

    def primary_or_first(self) -> ManagedRedis:
        """The current primary once Sentinels run; before that, the first node."""
        if not self.sentinels:
            return self.nodes[0]
        return self.primary

    def wait_replicated(self, within: float = READY_WITHIN) -> None:
        """Until every running replica is attached and holds all the primary wrote."""
        poll(self._in_sync, within, "replicas attached and in sync")

    def _sentinel_ready(self, sentinel: ManagedRedis, primary: Address) -> bool:
        with client(self.address(sentinel)) as c:
            master = c.sentinel_master(self.service)
            replicas = c.sentinel_slaves(self.service)
        if (master["ip"], int(master["port"])) != primary:
            return False
        if master.get("is_sdown") or master.get("is_odown") or not master.get("is_master"):
            return False
        good = [
            r
            for r in replicas
            if not r.get("is_sdown") and not r.get("is_disconnected") and r.get("is_slave")
        ]
        running = sum(1 for n in self.nodes if n.running) - 1
        others = sum(1 for s in self.sentinels if s.running) - 1
        return len(good) >= running and int(master["num-other-sentinels"]) >= others

    def wait_ready(self, within: float = READY_WITHIN) -> None:
        """Until every running Sentinel agrees on the primary and sees every running
        replica and every other running Sentinel, and the replicas are in sync."""
        primary = self.primary_address() if self.sentinels else self.address(self.nodes[0])

        def ready() -> bool:
            return (
                all(self._sentinel_ready(s, primary) for s in self.sentinels if s.running)
                and self._in_sync()
            )

        poll(ready, within, f"sentinels agree on {primary} and see the whole topology")

    # -- faults ---------------------------------------------------------------------------

    def kill_primary(self) -> ManagedRedis:
        """SIGKILL the current primary, as a crash would; returns it (now dead)."""
        primary = self.primary
        primary.kill()
        return primary

    def wait_for_new_primary(
        self, old: Address, within: float = 30.0, *, everywhere: bool = True
    ) -> ManagedRedis:
        """Until every running Sentinel (with `everywhere=False`: any one, which is
        what a client needs to find it) names a primary other than `old`, and that node
        says it is one. Returns it."""
        found: list[ManagedRedis] = []

        def named() -> set[Address | None]:
            views: set[Address | None] = set()
            for s in self.sentinels:
                if s.running:
                    try:
                        views.add(self.sentinel_view(s))
                    except (redis.RedisError, OSError):
                        views.add(None)
            return views

        def promoted() -> bool:
            views = named()
            if everywhere and len(views) != 1:
                return False
            for address in views - {None, old}:
                assert address is not None
                if info(address, password=self.password).get("role") == "master":
                    found[:] = [self.node_at(address)]
                    return True
            return False

        poll(promoted, within, f"a primary other than {old[0]}:{old[1]}")
        return found[0]

    def restart(self, proc: ManagedRedis) -> ManagedRedis:
        """Start a stopped or killed node or Sentinel again on its port. A data node comes
        back as a replica of the current primary (never as an empty primary its old
        replicas could sync from); a Sentinel comes back monitoring the current primary.
        Returns the new handle, which replaces the old one in `nodes`/`sentinels`.

        It forks a redis-server child: in a process with live gRPC channels set
        GRPC_ENABLE_FORK_SUPPORT=false before grpc is imported (benchmarks/
        bench_failover.py does), or the child can abort between fork and exec."""
        port = proc.port
        proc.stop()
        if proc in self.sentinels:
            i = self.sentinels.index(proc)
            primary = self.primary_address()
            self.sentinels[i] = self._start_sentinel(primary, port)
            return self.sentinels[i]
        i = self.nodes.index(proc)
        self.nodes[i] = self._start_node(port, primary=self.primary_address())
        return self.nodes[i]


@pytest.fixture
def sentinel_topology() -> Iterator[SentinelTopology]:
    """A running `SentinelTopology`, stopped after the test (also when it failed)."""
    with SentinelTopology() as topology:
        yield topology
