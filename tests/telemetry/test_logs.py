"""Log lines: JSON on request, with trace ids; one line per event, never per request."""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.telemetry.logs import JsonFormatter, TextFormatter
from tests.conftest import GatewayProcess, eventually
from tests.telemetry.conftest import TracedFactory


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "cachegw", "levelname": "INFO", "msg": msg})
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_extras_and_trace_ids() -> None:
    line = json.loads(JsonFormatter().format(_record("stopped", event="stop")))
    assert {"ts", "level", "logger", "msg", "event"} <= set(line)
    assert (line["msg"], line["event"], line["level"]) == ("stopped", "stop", "INFO")
    assert "trace_id" not in line  # no span, no ids

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        line = json.loads(JsonFormatter().format(_record("inside")))
        text = TextFormatter().format(_record("inside"))
    ctx = span.get_span_context()
    assert line["trace_id"] == f"{ctx.trace_id:032x}"
    assert line["span_id"] == f"{ctx.span_id:016x}"
    assert f"trace_id={ctx.trace_id:032x} span_id={ctx.span_id:016x}" in text


def test_serve_logs_json_events_and_serves_metrics(
    gateway_process: Callable[..., GatewayProcess], redis_server: ManagedRedis
) -> None:
    gw = gateway_process(
        "--redis-url", redis_server.url, "--log-format", "json", "--metrics-listen", "127.0.0.1:0"
    )
    with grpc.insecure_channel(gw.address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=5)
        for _ in range(20):
            stub.Get(pb.GetRequest(key="k"), timeout=5)
    lines = [json.loads(line) for line in gw.output().splitlines() if line.strip()]
    (start,) = [x for x in lines if x.get("event") == "start"]
    assert start["listen"] == gw.address and start["trace_exporter"] == "none"
    with urllib.request.urlopen(f"http://{start['metrics']}/metrics", timeout=10) as reply:
        body = reply.read().decode()
    assert re.search(r'^cachegw_rpc_duration_seconds_count\{method="Get"\} 20\.0$', body, re.M)
    assert gw.stop() == 0
    lines = [json.loads(line) for line in gw.output().splitlines() if line.strip()]
    events = [x.get("event") for x in lines]
    assert events[-2:] == ["stopping", "stop"]
    assert len(lines) < 10, "one line per event, none per request"


def test_config_error_as_json(gateway_process: Callable[..., GatewayProcess]) -> None:
    import subprocess

    from tests.conftest import BIN

    proc = subprocess.run(
        [str(BIN / "cachegw"), "serve", "--log-format", "json", "--sample-ratio", "2"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    line = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    assert line["event"] == "config_error" and line["level"] == "ERROR"
    assert "telemetry.sample_ratio must be in [0, 1]" in line["msg"]


async def test_redis_connection_changes_are_logged_once_each(
    traced_factory: TracedFactory, redis_server: ManagedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await traced_factory(tracing_on=False)
    watch = gw.server.telemetry.redis_watch
    await watch.stop()  # the test probes by hand, so no background probe races it
    caplog.set_level(logging.INFO, logger="cachegw.redis")
    assert await watch.probe()
    redis_server.stop()
    assert not await watch.probe()
    assert not await watch.probe()  # still down: no second line
    stats = await gw.stub.Stats(pb.StatsRequest())
    assert not stats.redis.up
    redis_server.start()
    # The bus re-subscribes on its own, with backoff (up to ~3 s): wait for it, so that
    # the next probe sees both changes whatever the timing. (Probing before it, as this
    # test once did, logged the reconnect only when the bus happened to be quicker.)
    await eventually(lambda: gw.server.stats.redis_reconnects == 1, within=15)
    assert await watch.probe()
    assert await watch.probe()  # nothing changed since: no line
    records = [r for r in caplog.records if r.name == "cachegw.redis"]
    events = [getattr(r, "event", None) for r in records]
    assert events == ["redis_down", "redis_up", "redis_reconnect"]
    assert "redis connection lost" in records[0].getMessage()
    assert "(1 times since start)" in records[2].getMessage()


def test_serve_with_console_exporter_prints_spans(
    gateway_process: Callable[..., GatewayProcess], redis_server: ManagedRedis
) -> None:
    # The entry point builds the provider from flags and flushes it on stop.
    gw = gateway_process("--redis-url", redis_server.url, "--trace-exporter", "console")
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with grpc.insecure_channel(gw.address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        stub.Get(pb.GetRequest(key="k"), timeout=5, metadata=(("traceparent", traceparent),))
    assert gw.stop() == 0
    out = gw.output()
    assert '"name": "cachegw.v1.CacheService/Get"' in out
    assert '"trace_id": "0x4bf92f3577b34da6a3ce929d0e0e4736"' in out
    assert '"cachegw.tier": "miss"' in out
    assert '"name": "GET PTTL GET"' in out  # its Redis read (value, TTL, class generation)
