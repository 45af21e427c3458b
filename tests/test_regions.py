"""Two regions linked by `cachegw relay`: real redis-servers (one per region), real
`cachegw serve` processes (one per region) and a real `cachegw relay` process.

Each test fails when the behaviour it names is removed: without the relay's apply the
other region keeps serving the old value; without the loop guard each event comes back;
without the checkpoint the events made while the relay was down are skipped; without the
fallback a value no event named survives in the destination."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from cachegw.client import Client
from cachegw.models import Tier
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from tests.conftest import BIN, GatewayProcess

# Classes the gateways of both regions share (class invalidation needs one).
TOML = """
[[classes]]
name = "prod"
patterns = ["prod:*"]
ttl_seconds = 600
l1_ttl_seconds = 600
"""
WITHIN = 15.0  # seconds any cross-region effect may take here (2 shared cores)


def wait_until(check: Callable[[], bool], within: float = WITHIN, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {within}s: {what}")
        time.sleep(0.02)


@dataclass
class RelayProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    metrics_port: int

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Region:
    name: str
    server: ManagedRedis
    r: redis.Redis
    gateway: GatewayProcess
    client: Client

    def events(self) -> list[tuple[str, pb.InvalidationEvent]]:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = self.r.xrange("cg:events")  # type: ignore[assignment]
        return [
            (eid.decode(), pb.InvalidationEvent.FromString(fields[b"e"])) for eid, fields in entries
        ]

    def in_l1(self, key: str) -> bool:
        entry = self.client.lookup(key)
        return entry.value is not None and entry.tier == Tier.L1


@dataclass
class TwoRegions:
    a: Region
    b: Region
    start_relay: Callable[..., RelayProcess]


def relay_args(a: Region, b: Region) -> list[str]:
    return ["--region", f"a={a.server.url}", "--region", f"b={b.server.url}"]


@pytest.fixture
def regions(tmp_path: Path, gateway_process: Callable[..., GatewayProcess]) -> Iterator[TwoRegions]:
    config = tmp_path / "cachegw.toml"
    config.write_text(TOML)
    servers: list[ManagedRedis] = []
    relays: list[RelayProcess] = []
    built: list[Region] = []
    try:
        for name in ("a", "b"):
            server = ManagedRedis()
            servers.append(server)
            server.start()
            gw = gateway_process(
                "--config",
                str(config),
                "--redis-url",
                server.url,
                "--gateway-id",
                f"gw-{name}",
                "--log-level",
                "WARNING",
            )
            built.append(
                Region(name, server, redis.Redis.from_url(server.url), gw, Client(gw.address))
            )
        a, b = built

        def start_relay(*extra: str) -> RelayProcess:
            port = free_port()
            log = tmp_path / f"relay-{len(relays)}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [
                        str(BIN / "cachegw"),
                        "relay",
                        *relay_args(a, b),
                        "--metrics-port",
                        str(port),
                        "--report-every",
                        "0.5",
                        "--block-ms",
                        "200",
                        *extra,
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=dict(os.environ),
                )
            relay = RelayProcess(proc, log, port)
            relays.append(relay)
            # Ready once each direction holds its checkpoint (written before tailing).
            wait_until(
                lambda: (
                    proc.poll() is not None
                    or (b.r.exists("cg:relay:a") == 1 and a.r.exists("cg:relay:b") == 1)
                ),
                what="relay checkpoints",
            )
            assert proc.poll() is None, relay.output()
            return relay

        yield TwoRegions(a, b, start_relay)
    finally:
        for relay in relays:
            relay.stop()
        for region in built:
            region.client.close()
            region.gateway.stop()
            region.r.close()
        for server in servers:
            server.stop()


def cached_in_l1(region: Region, key: str, value: str, tags: tuple[str, ...] = ()) -> None:
    """`key` stored in `region` and copied into its gateway's L1 (read twice)."""
    assert region.client.set(key, value, tags=tags).stored
    wait_until(lambda: region.in_l1(key), what=f"{key} in {region.name}'s L1")
    assert region.client.get(key) == value.encode()


def gone(region: Region, key: str) -> Callable[[], bool]:
    return lambda: region.client.get(key) is None


def born_in(region: Region) -> list[str]:
    return [eid for eid, ev in region.events() if not ev.relayed_from]


def copies_of(region: Region, source: str) -> list[str]:
    return [ev.relayed_id for _, ev in region.events() if ev.relayed_from == source]


def test_invalidations_cross_both_ways_once(regions: TwoRegions) -> None:
    a, b = regions.a, regions.b
    relay = regions.start_relay()
    for key in ("k", "set:k", "p:1", "p:2", "q:1", "t:1", "prod:1", "back"):
        cached_in_l1(b, key, f"b-{key}", tags=("T",) if key == "t:1" else ())
        cached_in_l1(a, key, f"a-{key}")

    # A Subscribe stream in b gets the copy (near caches there evict too).
    channel = grpc.insecure_channel(b.gateway.address)
    stream = cache_pb2_grpc.CacheServiceStub(channel).Subscribe(pb.SubscribeRequest())
    stream.initial_metadata()  # sent once the stream is registered
    seen: list[pb.InvalidationEvent] = []

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # CANCELLED when the test ends it
            seen.extend(stream)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        a.client.invalidate(["k"])  # by key
        wait_until(gone(b, "k"), what="key event applied in b")
        assert b.r.exists("cg:{k}") == 0
        wait_until(
            lambda: any(list(e.keys) == ["k"] and e.relayed_from == "a" for e in seen),
            what="the copy on b's Subscribe stream",
        )
    finally:
        stream.cancel()  # type: ignore[no-untyped-call]
        reader.join(5)
        channel.close()

    a.client.set("set:k", "a-new")  # a Set that replaced a value publishes an event
    wait_until(gone(b, "set:k"), what="replacing Set applied in b")

    a.client.invalidate(prefixes=["p:"])
    wait_until(lambda: gone(b, "p:1")() and gone(b, "p:2")(), what="prefix applied in b")

    a.client.invalidate(tags=["T"])  # b's index of T, not a's, names t:1
    wait_until(gone(b, "t:1"), what="tag applied in b")

    a.client.invalidate(classes=["prod"])
    wait_until(gone(b, "prod:1"), what="class applied in b")

    # Only what the events named: b's other copy is still served from its L1.
    assert b.in_l1("q:1")

    b.client.invalidate(["back"])  # and from b to a
    wait_until(gone(a, "back"), what="b's event applied in a")
    assert a.in_l1("q:1")

    # No loop: each event crosses exactly once. Markers each way make sure the relay
    # has read past every copy it published (a looped copy would be there by then).
    a.client.invalidate(["marker-a"])
    b.client.invalidate(["marker-b"])
    wait_until(
        lambda: (
            sorted(copies_of(b, "a")) == sorted(born_in(a))
            and sorted(copies_of(a, "b")) == sorted(born_in(b))
        ),
        what="every event copied once",
    )
    assert len(born_in(a)) == 6 and len(born_in(b)) == 2
    assert copies_of(a, "a") == [] and copies_of(b, "b") == []
    assert len(a.events()) == 6 + 2 and len(b.events()) == 2 + 6

    # Lag: the log line and the metrics.
    wait_until(lambda: "relay a->b: 0 events behind" in relay.output(), what="lag line")
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.metrics_port}/metrics") as reply:
        text = reply.read().decode()
    assert 'cachegw_relay_applied_total{dest="b",source="a"} 6.0' in text
    assert 'cachegw_relay_skipped_total{dest="b",source="a"} 2.0' in text
    assert 'cachegw_relay_behind_events{dest="a",source="b"} 0.0' in text
    assert relay.stop() == 0


def test_killed_relay_resumes_from_its_checkpoint(regions: TwoRegions) -> None:
    a, b = regions.a, regions.b
    relay = regions.start_relay()
    for key in ("before", "while-down", "while-down-2"):
        cached_in_l1(b, key, "b")
    cached_in_l1(a, "from-b", "a")
    a.client.invalidate(["before"])
    wait_until(gone(b, "before"), what="applied before the kill")

    relay.stop(signal.SIGKILL)
    a.client.invalidate(["while-down"])
    a.client.set("while-down-2", "a")  # not a replacement in a: no event
    a.client.set("while-down-2", "a2")  # a replacement: an event
    b.client.invalidate(["from-b"])
    time.sleep(0.3)  # nothing may carry them now: the relay is dead
    assert b.client.get("while-down") == b"b"
    assert a.client.get("from-b") == b"a"

    relay = regions.start_relay()
    wait_until(gone(b, "while-down"), what="a's event made while down, applied")
    wait_until(gone(b, "while-down-2"), what="a's Set made while down, applied")
    wait_until(gone(a, "from-b"), what="b's event made while down, applied")
    # Nothing lost: every event born in a has a copy in b (a crash may repeat a batch).
    assert set(born_in(a)) <= set(copies_of(b, "a"))
    assert "resuming after" in relay.output()
    assert "relay_fallback" not in relay.output() and "dropping every" not in relay.output()


def run_once(regions: TwoRegions) -> dict[str, dict[str, object]]:
    done = subprocess.run(
        [str(BIN / "cachegw"), "relay", *relay_args(regions.a, regions.b), "--once"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    figures: dict[str, dict[str, object]] = json.loads(done.stdout)
    return figures


def test_trimmed_source_flushes_the_destination(regions: TwoRegions) -> None:
    a, b = regions.a, regions.b
    assert run_once(regions)["a->b"]["fallbacks"] == 0  # checkpoints at both ends
    cached_in_l1(b, "named", "b")
    cached_in_l1(b, "unnamed", "b")  # no event names it: only a flush removes it
    assert b.client.incr("counter", 5) == 5
    for i in range(20):
        a.client.invalidate([f"gone-{i}"])
    a.client.invalidate(["named"])
    a.r.xtrim("cg:events", maxlen=1, approximate=False)  # past the checkpoint

    figures = run_once(regions)
    assert figures["a->b"]["fallbacks"] == 1
    assert figures["b->a"]["fallbacks"] == 0
    wait_until(gone(b, "named"), what="named key gone")
    wait_until(gone(b, "unnamed"), what="b's L1 flushed by the RESET")
    assert b.r.exists("cg:{unnamed}") == 0
    assert b.client.incr("counter", 1) == 6  # counters are not copies: kept
    resets = [ev for _, ev in b.events() if ev.kind == pb.EVENT_KIND_RESET]
    assert len(resets) == 1 and resets[0].relayed_from == "a"

    # Carried on from a's end: the next event crosses normally, no second fallback.
    cached_in_l1(b, "after", "b")
    a.client.invalidate(["after"])
    figures = run_once(regions)
    assert figures["a->b"]["fallbacks"] == 0 and figures["a->b"]["applied"] == 1
    wait_until(gone(b, "after"), what="event after the fallback applied")
