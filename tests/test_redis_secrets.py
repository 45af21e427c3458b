"""Redis credentials from the URL, the environment or a file, and no secret anywhere:
not in the log (start, Redis lost and back, refused credentials, a denied command), not
in Stats, /metrics, spans or error messages. Real `cachegw serve` processes and a real
redis-server with an ACL user."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from cachegw_gateway.server import GatewayServer
from cachegw_gateway.telemetry import tracing
from tests.conftest import GatewayProcess, make_config
from tests.redis_exercise import every_rpc
from tests.test_redis_acl import documented_rules

SECRET = "Sup3r-s3cret-XYZZY"  # must appear nowhere the gateway writes or answers
ROTATED = "R0tated-s3cret-PLUGH"
USER = "cachegw"


def _grant(port: int, password: str = SECRET, extra: tuple[str, ...] = ()) -> None:
    with redis.Redis(port=port) as admin:
        admin.execute_command(
            "ACL", "SETUSER", USER, "reset", "on", f">{password}", *documented_rules(), *extra
        )


@pytest.fixture
def acl_redis() -> Iterator[ManagedRedis]:
    with ManagedRedis() as server:
        _grant(server.port)
        yield server


def _url(server: ManagedRedis, password: str | None = SECRET) -> str:
    auth = f"{USER}:{password}@" if password is not None else ""
    return f"redis://{auth}127.0.0.1:{server.port}/0"


def _call(address: str, fn: Callable[[cache_pb2_grpc.CacheServiceStub], Any]) -> Any:
    with grpc.insecure_channel(address) as channel:
        return fn(cache_pb2_grpc.CacheServiceStub(channel))


def _scrape(metrics: str) -> str:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def _wait(check: Callable[[], bool], within: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {within}s")
        time.sleep(0.1)


def _redis_up(address: str) -> bool:
    stats = _call(address, lambda s: s.Stats(pb.StatsRequest(), timeout=5))
    return bool(stats.redis.up)


def test_no_secret_in_logs_stats_metrics_spans_or_errors(
    acl_redis: ManagedRedis, gateway_process: Callable[..., GatewayProcess]
) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    gw = gateway_process(
        "--redis-url", _url(acl_redis),
        "--metrics-listen", metrics,
        "--trace-exporter", "console",  # spans printed to the log: checked with it
        "--log-level", "DEBUG",
    )  # fmt: skip
    seen: list[str] = []

    async def rpcs() -> None:
        channel = grpc.aio.insecure_channel(gw.address)
        await every_rpc(cache_pb2_grpc.CacheServiceStub(channel))
        await channel.close(None)

    asyncio.run(rpcs())
    seen.append(str(_call(gw.address, lambda s: s.Stats(pb.StatsRequest(), timeout=5))))
    seen.append(_scrape(metrics))

    # A denied command: the error names NOPERM, not the password.
    _grant(acl_redis.port, extra=("-xadd",))
    with pytest.raises(grpc.RpcError) as info:
        _call(gw.address, lambda s: s.Invalidate(pb.InvalidateRequest(keys=["x"]), timeout=5))
    seen.append(str(info.value.details()))
    _grant(acl_redis.port)

    # Redis restarts without the user (no persistence): WRONGPASS until it is back.
    acl_redis.restart()
    _wait(lambda: not _redis_up(gw.address))
    with pytest.raises(grpc.RpcError) as info:
        _call(gw.address, lambda s: s.Set(pb.SetRequest(key="k", value=b"v"), timeout=5))
    seen.append(str(info.value.details()))
    assert "WRONGPASS" in str(info.value.details())
    _grant(acl_redis.port)
    _wait(lambda: _redis_up(gw.address))
    _call(gw.address, lambda s: s.Set(pb.SetRequest(key="k", value=b"v"), timeout=5))
    seen.append(str(_call(gw.address, lambda s: s.Stats(pb.StatsRequest(), timeout=5))))
    seen.append(_scrape(metrics))

    assert gw.stop() == 0
    log = gw.output()
    assert "serving on" in log and "redis://cachegw:***@" in log
    assert "user 'cachegw' (from the URL), password from the URL" in log
    assert "redis connection lost" in log and "WRONGPASS" in log
    assert '"name": "EVALSHA"' in log or "EVALSHA" in log  # Redis spans were exported
    for text in (log, *seen):
        assert SECRET not in text


async def test_no_secret_in_spans(acl_redis: ManagedRedis, tmp_path: Path) -> None:
    url = _url(acl_redis)
    config = make_config(tmp_path, url, telemetry__exporter="console")
    exporter = InMemorySpanExporter()
    provider = tracing.build_provider(config.telemetry, config.server.gateway_id, exporter)
    assert provider is not None
    server = GatewayServer(config, url, tracer_provider=provider)
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        await every_rpc(cache_pb2_grpc.CacheServiceStub(channel))
        provider.force_flush()
        spans = exporter.get_finished_spans()
        redis_spans = [s for s in spans if any(k.startswith("db.") for k in s.attributes or {})]
        assert redis_spans, "the Redis client is instrumented"
        for span in spans:
            text = f"{span.name} {dict(span.attributes or {})} {span.events} {span.status}"
            assert SECRET not in text
    finally:
        await channel.close(None)
        await server.stop(grace=0)
        provider.shutdown()


def test_password_from_a_file_is_read_again_for_new_connections(
    acl_redis: ManagedRedis, gateway_process: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    secret_file = tmp_path / "redis-password"
    secret_file.write_text(SECRET + "\n")
    gw = gateway_process(
        "--redis-url", _url(acl_redis, None),
        "--redis-username", USER,
        "--redis-password-file", str(secret_file),
    )  # fmt: skip
    _call(gw.address, lambda s: s.Set(pb.SetRequest(key="k", value=b"1"), timeout=5))
    # Rotate: Redis takes the new password only, the file holds it, old connections go.
    with redis.Redis(port=acl_redis.port) as admin:
        admin.execute_command("ACL", "SETUSER", USER, "resetpass", f">{ROTATED}")
        secret_file.write_text(ROTATED + "\n")
        admin.execute_command("CLIENT", "KILL", "USER", USER)

    def stored() -> bool:
        # A killed connection fails the write that finds it (never resent); the next
        # connection reads the file again and logs in with the new password.
        try:
            _call(gw.address, lambda s: s.Set(pb.SetRequest(key="k", value=b"2"), timeout=5))
        except grpc.RpcError:
            return False
        return True

    _wait(stored)
    with redis.Redis(port=acl_redis.port) as admin:
        assert admin.get("cg:{k}") is not None
    assert gw.stop() == 0
    log = gw.output()
    assert "user 'cachegw' (redis.username), password from redis.password_file" in log
    assert SECRET not in log and ROTATED not in log


def test_password_from_the_environment(
    acl_redis: ManagedRedis, gateway_process: Callable[..., GatewayProcess]
) -> None:
    gw = gateway_process(
        "--redis-url",
        _url(acl_redis, None),
        env={"CACHEGW_REDIS_USERNAME": USER, "CACHEGW_REDIS_PASSWORD": SECRET},
    )
    _call(gw.address, lambda s: s.Set(pb.SetRequest(key="k", value=b"v"), timeout=5))
    assert gw.stop() == 0
    log = gw.output()
    assert "password from $CACHEGW_REDIS_PASSWORD" in log and SECRET not in log


def test_a_wrong_password_is_said_at_start_and_in_each_error(
    acl_redis: ManagedRedis, gateway_process: Callable[..., GatewayProcess]
) -> None:
    wrong = "Wr0ng-s3cret-FROB"
    gw = gateway_process("--redis-url", _url(acl_redis, wrong))
    with pytest.raises(grpc.RpcError) as info:
        _call(gw.address, lambda s: s.Set(pb.SetRequest(key="k", value=b"v"), timeout=5))
    details = str(info.value.details())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "WRONGPASS" in details and wrong not in details
    assert gw.stop() == 0
    log = gw.output()
    assert "refused this gateway (WRONGPASS; user 'cachegw' (from the URL)" in log
    assert wrong not in log


def test_no_password_where_one_is_needed_says_noauth(
    gateway_process: Callable[..., GatewayProcess],
) -> None:
    with ManagedRedis() as server:
        with redis.Redis(port=server.port) as admin:
            admin.config_set("requirepass", SECRET)
        gw = gateway_process("--redis-url", server.url)
        with pytest.raises(grpc.RpcError) as info:
            _call(gw.address, lambda s: s.Set(pb.SetRequest(key="k", value=b"v"), timeout=5))
        assert "NOAUTH" in str(info.value.details())
        assert gw.stop() == 0
        assert "refused this gateway (NOAUTH" in gw.output()
