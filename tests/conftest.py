"""Shared fixtures: real redis-server processes on free loopback ports, gateways over
real gRPC (in-process, or as `cachegw serve` processes started the way a user does).
Everything a fixture starts, it stops.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

# Before grpc is imported: its fork handlers run in every child this process forks
# (redis-server children start through fork + exec with a pre-exec hook), and with gRPC
# threads alive a child was seen to abort before its exec (a redis-server restarted by
# a failure test died with SIGABRT).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.config import GatewayConfig, load_config
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from cachegw_gateway.server import GatewayServer

BIN = Path(sys.executable).parent


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Wait (bounded) until `check()` holds, e.g. an event reached another gateway."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {within}s")
        await asyncio.sleep(0.01)


@pytest.fixture
def redis_server() -> Iterator[ManagedRedis]:
    with ManagedRedis() as server:
        yield server


@pytest.fixture
def dead_address() -> Iterator[str]:
    """host:port where nothing listens, for the whole test: a bound socket that does not
    listen holds the port (connections are refused), so no other process of a busy
    machine can start a server there meanwhile, as a port merely found free could."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture
def redis_client(redis_server: ManagedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def make_config(
    tmp_path: Path, redis_url: str, toml: str = "", **overrides: object
) -> GatewayConfig:
    """A gateway config on a free port: `toml` adds tables (e.g. [[classes]])."""
    path = tmp_path / "cachegw.toml"
    path.write_text(toml)
    values: dict[str, object] = {"redis.url": redis_url, "server.listen": "127.0.0.1:0"}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(path, env={}, overrides=values)


@dataclass
class RunningGateway:
    server: GatewayServer
    channel: grpc.aio.Channel
    stub: cache_pb2_grpc.CacheServiceAsyncStub
    address: str


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def gateway_factory(
    tmp_path: Path, redis_server: ManagedRedis
) -> AsyncIterator[GatewayFactory]:
    """start(toml="", redis_url=None, **overrides) -> RunningGateway, in this event loop."""
    running: list[RunningGateway] = []

    async def start(
        toml: str = "", redis_url: str | None = None, **overrides: object
    ) -> RunningGateway:
        folder = tmp_path / f"gw{len(running)}"
        folder.mkdir()
        config = make_config(folder, redis_url or redis_server.url, toml, **overrides)
        server = GatewayServer(config, redis_url or redis_server.url)
        await server.start()
        channel = grpc.aio.insecure_channel(server.address)
        gw = RunningGateway(
            server, channel, cache_pb2_grpc.CacheServiceStub(channel), server.address
        )
        running.append(gw)
        return gw

    yield start
    for gw in running:
        await gw.channel.close(None)
        await gw.server.stop(grace=0)


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> RunningGateway:
    gw: RunningGateway = await gateway_factory()
    return gw


def wait_serving(
    address: str,
    timeout: float = 20.0,
    alive: Callable[[], bool] = lambda: True,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Poll standard gRPC health until SERVING (bounded; over at once when not `alive()`);
    over TLS with `credentials`."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    channel = (
        grpc.insecure_channel(address)
        if credentials is None
        else grpc.secure_channel(address, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and alive():
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.05)
    if not alive():
        raise TimeoutError(f"gateway at {address} exited before SERVING: {last}")
    raise TimeoutError(f"gateway at {address} not SERVING after {timeout}s: {last}")


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    address: str
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


PORT_ATTEMPTS = 5  # free ports tried by gateway_process when the one picked was taken


def _running(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """start(*flags, env=None, credentials=None) -> a `cachegw serve` process on a free
    port, SERVING (its health checked over TLS with `credentials`)."""
    started: list[GatewayProcess] = []

    def start(
        *flags: str,
        env: dict[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> GatewayProcess:
        for attempt in range(PORT_ATTEMPTS):
            address = f"127.0.0.1:{free_port()}"
            log = tmp_path / f"gateway-{len(started)}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [str(BIN / "cachegw"), "serve", "--listen", address, *flags],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})},
                )
            gp = GatewayProcess(proc, address, log)
            started.append(gp)
            try:
                wait_serving(address, alive=partial(_running, proc), credentials=credentials)
            except TimeoutError as exc:
                gp.stop(signal.SIGKILL)
                # The port was free when picked; another process (a parallel test run)
                # may have bound it before the gateway did: pick another.
                if "cannot listen on" in gp.output() and attempt + 1 < PORT_ATTEMPTS:
                    continue
                raise AssertionError(f"{exc}\n--- gateway output ---\n{gp.output()}") from exc
            return gp
        raise AssertionError("unreachable")

    yield start
    for gp in started:
        gp.stop()


GatewayCluster = Callable[..., list[GatewayProcess]]


@pytest.fixture
def gateway_cluster(
    tmp_path: Path,
    redis_server: ManagedRedis,
    gateway_process: Callable[..., GatewayProcess],
) -> GatewayCluster:
    """start(n, toml="") -> n `cachegw serve` processes sharing `redis_server`, SERVING.

    Each gets the same config file and its own gateway id (gw0, gw1, ...)."""
    clusters = 0

    def start(n: int, toml: str = "") -> list[GatewayProcess]:
        nonlocal clusters
        config = tmp_path / f"cluster{clusters}.toml"
        clusters += 1
        config.write_text(toml)
        return [
            gateway_process(
                "--config",
                str(config),
                "--redis-url",
                redis_server.url,
                "--gateway-id",
                f"gw{i}",
                "--log-level",
                "WARNING",
            )
            for i in range(n)
        ]

    return start


# Multi-process Redis topologies (tests/topology.py), as fixtures.
from tests.topology import sentinel_topology  # noqa: E402, F401
