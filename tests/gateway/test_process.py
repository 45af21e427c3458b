"""The gateway as a user runs it: `cachegw serve`, the CLI, health, reflection, shutdown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import BIN, GatewayProcess

Start = Callable[..., GatewayProcess]


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "cachegw"), *args], input=stdin, capture_output=True, timeout=30, check=False
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def _env_without_redis() -> dict[str, str]:
    """The environment minus anything that could name a Redis or ask for an embedded one."""
    names = ("CACHEGW_REDIS_URL", "CACHEGW_EMBEDDED_REDIS", "CACHEGW_CONFIG")
    return {k: v for k, v in os.environ.items() if k not in names}


def test_serve_without_a_redis_refuses_to_start() -> None:
    # No URL and no --embedded-redis: a private redis-server would share nothing with
    # the other gateways (no L2, no invalidation), so serve says what to do instead.
    for extra in ([], ["--log-format", "json"]):
        proc = subprocess.run(
            [str(BIN / "cachegw"), "serve", "--listen", "127.0.0.1:0", *extra],
            capture_output=True,
            timeout=20,  # a gateway that serves instead would hang here: a failure
            check=False,
            env=_env_without_redis(),
        )
        assert proc.returncode == 2, proc
        err = proc.stderr.decode()
        assert "no Redis configured" in err, err
        for hint in ("--redis-url", "CACHEGW_REDIS_URL", "--embedded-redis"):
            assert hint in err, err
        assert b"managed redis-server" not in proc.stdout + proc.stderr


def test_embedded_redis_from_the_environment_and_the_file(
    gateway_process: Start, tmp_path: Path
) -> None:
    env = {**_env_without_redis(), "CACHEGW_EMBEDDED_REDIS": "1"}
    gw = gateway_process(env=env)
    assert "started a managed redis-server" in gw.output()
    assert cli("set", "a", "1", "--target", gw.address).returncode == 0
    assert gw.stop() == 0
    config = tmp_path / "embedded.toml"
    config.write_text("[redis]\nembedded = true\n")
    gw = gateway_process("--config", str(config))
    assert "started a managed redis-server" in gw.output()
    assert gw.stop() == 0


def test_serve_with_managed_redis_end_to_end(gateway_process: Start) -> None:
    gw = gateway_process("--embedded-redis")
    match = re.search(r"managed redis-server at (\S+) \(pid (\d+)\)", gw.output())
    assert match, gw.output()
    redis_pid = int(match.group(2))

    with grpc.insecure_channel(gw.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cachegw.v1.CacheService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "cachegw.v1.CacheService" in services
        assert "grpc.health.v1.Health" in services

    assert cli("set", "greeting", "hello", "--target", gw.address).returncode == 0
    got = cli("get", "greeting", "--target", gw.address)
    assert (got.returncode, got.stdout) == (0, b"hello")
    miss = cli("get", "nothing", "--target", gw.address)
    assert miss.returncode == 1
    deleted = cli("del", "greeting", "--target", gw.address)
    assert (deleted.returncode, deleted.stdout.strip()) == (0, b"1")

    assert gw.stop() == 0
    assert "stopped the managed redis-server" in gw.output()
    assert not _pid_alive(redis_pid)


def test_serve_uses_the_configured_redis(
    gateway_process: Start, redis_server: ManagedRedis, redis_client: redis.Redis, tmp_path: Path
) -> None:
    # From the environment...
    gw = gateway_process(env={"CACHEGW_REDIS_URL": redis_server.url})
    assert cli("set", "a", "1", "--target", gw.address).returncode == 0
    assert redis_client.exists("cg:{a}") == 1
    assert "managed redis-server" not in gw.output()
    assert gw.stop() == 0
    # ...and from a config file, with its own prefix.
    config = tmp_path / "gw.toml"
    config.write_text(f'[redis]\nurl = "{redis_server.url}"\nprefix = "shop"\n')
    gw = gateway_process("--config", str(config))
    assert cli("set", "b", "2", "--target", gw.address).returncode == 0
    assert redis_client.exists("shop:{b}") == 1
    assert gw.stop() == 0
    # A URL wins over a request for an embedded Redis (e.g. `make run ARGS=--redis-url`).
    gw = gateway_process("--embedded-redis", "--redis-url", redis_server.url)
    assert cli("set", "c", "3", "--target", gw.address).returncode == 0
    assert redis_client.exists("cg:{c}") == 1
    assert "managed redis-server" not in gw.output()
    assert gw.stop() == 0


def test_bad_config_exits_with_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[[classes]]\nname = 'x'\nttl_seconds = -5\n")
    proc = subprocess.run(
        [str(BIN / "cachegw"), "serve", "--config", str(config)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert b"configuration error" in proc.stderr
    assert b"ttl_seconds" in proc.stderr


def test_sigterm_drains_in_flight_calls(gateway_process: Start, redis_server: ManagedRedis) -> None:
    gw = gateway_process("--redis-url", redis_server.url, "--grace", "8")
    assert redis_server.pid is not None
    results: list[grpc.StatusCode] = []

    def slow_get() -> None:
        with grpc.insecure_channel(gw.address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            try:
                stub.Get(pb.GetRequest(key="k"), timeout=6)
                results.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                results.append(exc.code())

    # A hung Redis keeps the Get in flight (until the gateway's Redis timeout).
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        caller = threading.Thread(target=slow_get)
        caller.start()
        time.sleep(0.3)
        gw.proc.send_signal(signal.SIGTERM)
        caller.join(timeout=10)
        assert not caller.is_alive()
        assert gw.proc.wait(timeout=10) == 0
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    # The in-flight call got the handler's own answer, not a cut connection.
    assert results == [grpc.StatusCode.UNAVAILABLE], gw.output()
    assert "draining" in gw.output()


def test_sigterm_reports_not_serving_keeps_serving_then_ends_streams_unavailable(
    gateway_process: Start, redis_server: ManagedRedis
) -> None:
    """The drain, in order: NOT_SERVING at once, calls still answered during the drain
    delay (load balancers are still catching up), then the Subscribe stream ends with
    UNAVAILABLE (the clients' cue to subscribe again elsewhere), and a clean exit."""
    gw = gateway_process("--redis-url", redis_server.url, "--drain-delay", "3", "--grace", "5")
    ended: list[tuple[grpc.StatusCode, str]] = []
    with grpc.insecure_channel(gw.address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        stream = stub.Subscribe(pb.SubscribeRequest(prefixes=["d:"]))

        def read() -> None:
            try:
                for _ in stream:
                    pass
            except grpc.RpcError as exc:
                ended.append((exc.code(), exc.details() or ""))

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 20
        while stub.Stats(pb.StatsRequest(), timeout=5).subscribers < 1:
            assert time.monotonic() < deadline, "the stream never registered"
            time.sleep(0.02)
        gw.proc.send_signal(signal.SIGTERM)
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != not_serving:
            assert time.monotonic() < deadline, "never reported NOT_SERVING"
            time.sleep(0.02)
        assert not ended  # the stream is still open during the drain delay
        assert stub.Set(pb.SetRequest(key="d:1", value=b"v"), timeout=5).outcome == (
            pb.SET_OUTCOME_STORED
        )
        assert stub.Get(pb.GetRequest(key="d:1"), timeout=5).value == b"v"
        reader.join(timeout=15)
        assert not reader.is_alive()
    assert gw.proc.wait(timeout=15) == 0
    assert len(ended) == 1 and ended[0][0] is grpc.StatusCode.UNAVAILABLE, ended
    assert "shutting down" in ended[0][1]


def test_cli_invalidate_and_watch(gateway_process: Start) -> None:
    gw = gateway_process("--embedded-redis")
    assert cli("set", "inv:1", "v", "--tag", "sku", "--target", gw.address).returncode == 0
    watcher = subprocess.Popen(
        [str(BIN / "cachegw"), "watch", "--prefix", "inv:", "--count", "2", "--target", gw.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # The watcher's stream must be open before the events (a fixed sleep raced the
        # start of a Python process under load).
        deadline = time.monotonic() + 20
        with grpc.insecure_channel(gw.address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            while stub.Stats(pb.StatsRequest(), timeout=5).subscribers < 1:
                assert watcher.poll() is None, watcher.communicate(timeout=5)
                assert time.monotonic() < deadline, "the watcher never subscribed"
                time.sleep(0.02)
        out = cli("invalidate", "inv:1", "other", "--target", gw.address)
        assert out.returncode == 0 and out.stdout.startswith(b"removed=1 event="), out
        out = cli("invalidate", "--tag", "sku", "--target", gw.address)
        assert out.returncode == 0, out
        stdout, stderr = watcher.communicate(timeout=15)
    finally:
        watcher.kill()
        watcher.wait(5)
    lines = stdout.decode().splitlines()
    assert len(lines) == 2, (stdout, stderr)
    assert " KEYS keys=inv:1 " in lines[0]  # "other" is filtered out by --prefix
    assert " TAGS tags=sku " in lines[1]
    bad = cli("invalidate", "--target", gw.address)
    assert bad.returncode == 1 and b"at least one" in bad.stderr
