"""Two regions linked by a real `cachegw relay` process, whatever each region's Redis is
(standalone, Sentinel or Cluster): a `cachegw serve` gateway per region, a Redis client
that reads the region's keys and audit stream, and the relay started and stopped the way
an operator does it. Used by tests/test_regions.py, tests/cluster/test_cluster_relay.py
and tests/sentinel/test_sentinel_relay.py; every process a helper starts, its caller's
fixture stops (`Regions.close`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cachegw.client import Client
from cachegw.models import Tier
from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.managed_redis import free_port
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

# A client for a region's keys: a plain Redis, a Sentinel-managed one (follows the
# primary), or a cluster client.
RedisLike = redis.Redis | redis.RedisCluster


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

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text: str = reply.read().decode()
        return text

    def metric(self, name: str, source: str, dest: str) -> float | None:
        """The value of `name`{source, dest} on /metrics (None when not exported)."""
        wanted = f'{name}{{dest="{dest}",source="{source}"}} '
        for line in self.metrics().splitlines():
            if line.startswith(wanted):
                return float(line[len(wanted) :])
        return None


@dataclass
class LinkedRegion:
    name: str
    url: str  # the URL the gateway and the relay are given
    prefix: str
    r: RedisLike
    gateway: GatewayProcess
    client: Client
    events_key: str  # <prefix>:events, or <prefix>:{meta}:events on a Cluster

    def key(self, key: str) -> str:
        return f"{self.prefix}:{{{key}}}"

    def checkpoint_key(self, source: str) -> str:
        """Where the relay keeps, in this region, its checkpoint of `source`'s stream."""
        return f"{self.prefix}:relay:{source}"

    def events(self) -> list[tuple[str, pb.InvalidationEvent]]:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = self.r.xrange(self.events_key)  # type: ignore[assignment]
        return [
            (eid.decode(), pb.InvalidationEvent.FromString(fields[b"e"])) for eid, fields in entries
        ]

    def in_l1(self, key: str) -> bool:
        entry = self.client.lookup(key)
        return entry.value is not None and entry.tier == Tier.L1

    def born(self) -> list[str]:
        """Ids of the events born in this region (not relayed copies)."""
        return [eid for eid, ev in self.events() if not ev.relayed_from]

    def copies_of(self, source: str) -> list[str]:
        """Source ids of the copies of `source`'s events held in this region's stream."""
        return [ev.relayed_id for _, ev in self.events() if ev.relayed_from == source]

    def resets(self) -> list[pb.InvalidationEvent]:
        return [ev for _, ev in self.events() if ev.kind == pb.EVENT_KIND_RESET]


def gateway_flags(config: Path, url: str, prefix: str, name: str) -> list[str]:
    return [
        "--config",
        str(config),
        "--redis-url",
        url,
        "--redis-prefix",
        prefix,
        "--gateway-id",
        f"gw-{name}",
        "--log-level",
        "WARNING",
    ]


@dataclass
class Regions:
    """Two regions and the relay processes started between them."""

    a: LinkedRegion
    b: LinkedRegion
    tmp_path: Path
    relays: list[RelayProcess] = field(default_factory=list)

    def relay_args(self) -> list[str]:
        a, b = self.a, self.b
        return [
            "--region",
            f"{a.name}={a.url}",
            "--region",
            f"{b.name}={b.url}",
            "--prefix",
            f"{a.name}={a.prefix}",
            "--prefix",
            f"{b.name}={b.prefix}",
        ]

    def start_relay(self, *extra: str) -> RelayProcess:
        port = free_port()
        log = self.tmp_path / f"relay-{len(self.relays)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    str(BIN / "cachegw"),
                    "relay",
                    *self.relay_args(),
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
        self.relays.append(relay)
        a, b = self.a, self.b
        # Ready once each direction holds its checkpoint (written before tailing).
        wait_until(
            lambda: (
                proc.poll() is not None
                or (
                    b.r.exists(b.checkpoint_key(a.name)) == 1
                    and a.r.exists(a.checkpoint_key(b.name)) == 1
                )
            ),
            what="relay checkpoints",
        )
        assert proc.poll() is None, relay.output()
        return relay

    def run_once(self) -> dict[str, dict[str, object]]:
        done = subprocess.run(
            [str(BIN / "cachegw"), "relay", *self.relay_args(), "--once"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        figures: dict[str, dict[str, object]] = json.loads(done.stdout)
        return figures

    def close(self) -> None:
        for relay in self.relays:
            relay.stop()
        for region in (self.a, self.b):
            region.client.close()
            region.gateway.stop()
            region.r.close()


def cached_in_l1(region: LinkedRegion, key: str, value: str, tags: Sequence[str] = ()) -> None:
    """`key` stored in `region` and copied into its gateway's L1 (read twice)."""
    assert region.client.set(key, value, tags=tuple(tags)).stored
    wait_until(lambda: region.in_l1(key), what=f"{key} in {region.name}'s L1")
    assert region.client.get(key) == value.encode()


def gone(region: LinkedRegion, key: str) -> Callable[[], bool]:
    return lambda: region.client.get(key) is None


def cross_every_kind(src: LinkedRegion, dst: LinkedRegion) -> int:
    """Keys, a prefix, a tag and a class invalidated through `src`'s gateway leave
    `dst`'s L1 and L2; `dst`'s other copies stay. Returns the events born in `src`."""
    s = src.name
    keys = [f"{s}-k{i}" for i in range(6)]  # on a Cluster, over its three primaries
    for key in keys:
        cached_in_l1(dst, key, "v")
    for key in (f"{s}-p:1", f"{s}-p:2", f"prod:{s}", f"{s}-keep"):
        cached_in_l1(dst, key, "v")
    cached_in_l1(dst, f"{s}-t:1", "v", tags=[f"{s}-T"])  # dst's own index names it

    src.client.invalidate(keys)
    wait_until(lambda: all(gone(dst, k)() for k in keys), what=f"{s}'s keys in {dst.name}")
    assert all(dst.r.exists(dst.key(k)) == 0 for k in keys)
    src.client.invalidate(prefixes=[f"{s}-p:"])
    wait_until(
        lambda: gone(dst, f"{s}-p:1")() and gone(dst, f"{s}-p:2")(),
        what=f"{s}'s prefix in {dst.name}",
    )
    assert dst.r.exists(dst.key(f"{s}-p:1"), dst.key(f"{s}-p:2")) == 0
    src.client.invalidate(tags=[f"{s}-T"])
    wait_until(gone(dst, f"{s}-t:1"), what=f"{s}'s tag in {dst.name}")
    assert dst.r.exists(dst.key(f"{s}-t:1")) == 0
    src.client.invalidate(classes=["prod"])
    wait_until(gone(dst, f"prod:{s}"), what=f"{s}'s class in {dst.name}")
    assert dst.in_l1(f"{s}-keep")  # only what the events named
    return 4


def checkpointed(region: LinkedRegion, source: LinkedRegion) -> Callable[[], bool]:
    """True once `region` holds the relay's checkpoint at `source`'s newest event."""

    def check() -> bool:
        events = source.events()
        raw = region.r.get(region.checkpoint_key(source.name))
        return bool(events) and isinstance(raw, bytes) and raw.split()[0].decode() == events[-1][0]

    return check
