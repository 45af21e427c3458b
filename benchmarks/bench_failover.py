"""Failover blackout: how long writes stop, and how Gets fare, when the Redis primary dies.

In one run: a Redis topology (`--topology`; sentinel: one primary, two replicas, three
Sentinels on loopback, tests/topology.py) and three `cachegw serve` processes on its URL.
Per round, with every gateway under continuous load from this process (each gateway:
a Get of a key hot in its L1, a Get of a key of a class without L1, a Set; each call
with a 1 s deadline):

1. 1 s of steady load, then SIGKILL of the primary;
2. measured from the kill: when the topology names a new primary ("promoted"), and per
   gateway when its first Set succeeds ("first write"); the blackout is the latest
   first write; "gateway share" is blackout - promoted, the part the gateway adds;
3. Gets during the blackout: p99 latency and the share answered, for the L1-hot keys
   (served from the copies set aside when the subscription dropped) and the L2-only
   keys (UNAVAILABLE until the new primary), against their p99 before the kill;
4. the dead node comes back as a replica; the topology settles before the next round.

A topology is one function (`TOPOLOGIES`) returning a `Topology`: its URL, how to kill
the primary, how to wait for the promotion and how to heal. `--topology cluster`: a
3-primary, 3-replica Redis Cluster (tests/cluster_topology.py); each round kills another
primary (3 rounds at most) and the Sets go to keys of that primary's slots (writes to
the other primaries never stop).

The aims are in AIMS below; a missed aim makes the script exit 1.

Run (from the repository root, after `make setup`):

    .venv/bin/python benchmarks/bench_failover.py             # 5 rounds, about 1 minute
    .venv/bin/python benchmarks/bench_failover.py --quick     # 2 rounds
    .venv/bin/python benchmarks/bench_failover.py --topology cluster   # 3 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Healing forks redis-server children from this process, which runs gRPC clients: with
# gRPC's fork handlers on, a child could run gRPC code between fork and exec and abort.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc
from redis.crc import key_slot

from benchmarks.harness import (
    Aim,
    check_aims,
    median,
    percentile,
    render_table,
    sigterm_as_interrupt,
    start_gateways,
)
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from tests.cluster_topology import ClusterTopology
from tests.topology import SentinelTopology

AIMS = [
    # Sentinel's own share (down-after 1 s, vote, promotion) is the floor; the gateway
    # should write within a second of the promotion.
    Aim("gateway share", "first write - promotion (median of rounds)", "<=", 1.0, "s"),
    # Gets of L1-hot keys go on being answered through the blackout.
    Aim("hot Gets answered", "share answered during the blackout (min)", ">=", 1.0, ""),
]

CONFIG = """
[[classes]]
name = "hot"
patterns = ["hot:*"]
ttl_seconds = 300
l1_ttl_seconds = 120

[[classes]]
name = "l2only"
patterns = ["l2:*"]
ttl_seconds = 300
l1 = false

[default_class]
ttl_seconds = 300
"""
HOT = [f"hot:{i}" for i in range(50)]
L2 = [f"l2:{i}" for i in range(50)]
DEADLINE = 1.0
STEADY = 1.0  # seconds of load before the kill
AFTER = 0.5  # seconds of load after the last gateway wrote again


@dataclass
class Topology:
    """What the benchmark needs of a Redis topology."""

    url: str
    kill: Callable[[], object]  # SIGKILL the primary; returns a token for the others
    wait_promoted: Callable[[object], None]  # until a new primary serves
    heal: Callable[[object], None]  # the killed node back (as a replica); settled
    # The keys gateway g writes in the next round (by default w:g:0..99). A cluster
    # gives keys of the primary it will kill: the others' writes never stop.
    write_keys: Callable[[int], list[str]] | None = None
    max_rounds: int = 1_000


def sentinel(stack: ExitStack) -> Topology:
    topo = stack.enter_context(SentinelTopology())

    def kill() -> object:
        return topo.kill_primary()

    def wait_promoted(token: object) -> None:
        assert not isinstance(token, tuple)
        # Promoted once one Sentinel names it: clients ask until one does.
        topo.wait_for_new_primary(topo.address(token), everywhere=False)  # type: ignore[arg-type]

    def heal(token: object) -> None:
        topo.restart(token)  # type: ignore[arg-type]
        topo.wait_ready()

    return Topology(topo.url, kill, wait_promoted, heal)


def cluster(stack: ExitStack) -> Topology:
    """3 primaries with a replica each. Each round kills another primary that still has
    a replica (so 3 rounds at most); the dead node stays out."""
    topo = stack.enter_context(ClusterTopology(primaries=3, replicas=1))
    state: dict[str, Any] = {"done": set()}

    def victim() -> Any:
        if "victim" not in state:
            for node in topo.primaries():
                if node.port not in state["done"]:
                    state["victim"] = node
                    break
        return state["victim"]

    def write_keys(gateway: int) -> list[str]:
        ranges = topo.slots_of(victim())  # a key's slot is its hash tag's: {key}
        mine = (
            k
            for k in (f"w:{gateway}:{i}" for i in range(100_000))
            if any(lo <= key_slot(k.encode()) <= hi for lo, hi in ranges)
        )
        return [next(mine) for _ in range(20)]

    def kill() -> object:
        node = victim()
        topo.kill(node)
        return node

    def wait_promoted(token: object) -> None:
        topo.wait_failover(token)  # type: ignore[arg-type]

    def heal(token: object) -> None:
        state["done"].add(token.port)  # type: ignore[attr-defined]
        del state["victim"]

    return Topology(topo.url, kill, wait_promoted, heal, write_keys, max_rounds=3)


TOPOLOGIES: dict[str, Callable[[ExitStack], Topology]] = {
    "sentinel": sentinel,
    "cluster": cluster,
}


@dataclass
class Call:
    gateway: int
    kind: str  # "hot", "l2" or "set"
    ok: bool
    started: float
    seconds: float
    what: str = ""  # why it failed: a status code, or the answer's status


@dataclass
class Round:
    promoted: float = 0.0  # seconds after the kill
    first_write: dict[int, float] = field(default_factory=dict)  # gateway -> s after kill
    calls: list[Call] = field(default_factory=list)
    killed_at: float = 0.0

    @property
    def blackout(self) -> float:
        return max(self.first_write.values())

    def gets(self, kind: str, during: bool) -> list[Call]:
        end = self.killed_at + self.blackout
        return [
            c
            for c in self.calls
            if c.kind == kind
            and (self.killed_at <= c.started < end) == during
            and (during or c.started < self.killed_at)
        ]


async def _timed(log: list[Call], gateway: int, kind: str, call: Awaitable[object]) -> bool:
    started = time.monotonic()
    what = ""
    try:
        reply = await call
        if isinstance(reply, pb.GetResponse):
            ok = reply.status == pb.STATUS_HIT
            what = "" if ok else pb.Status.Name(reply.status)
        else:
            assert isinstance(reply, pb.SetResponse)
            ok = reply.outcome == pb.SET_OUTCOME_STORED
            what = "" if ok else pb.SetOutcome.Name(reply.outcome)
    except grpc.aio.AioRpcError as exc:
        ok = False
        what = exc.code().name
    log.append(Call(gateway, kind, ok, started, time.monotonic() - started, what))
    return ok


async def _load(
    gateway: int,
    stub: cache_pb2_grpc.CacheServiceAsyncStub,
    stop: asyncio.Event,
    log: list[Call],
    writes: list[str],
) -> None:
    rng = random.Random(gateway)
    n = 0
    while not stop.is_set() and n < 1_000_000:
        n += 1
        hot = pb.GetRequest(key=rng.choice(HOT))
        await _timed(log, gateway, "hot", stub.Get(hot, timeout=DEADLINE))
        l2 = pb.GetRequest(key=rng.choice(L2))
        await _timed(log, gateway, "l2", stub.Get(l2, timeout=DEADLINE))
        put = pb.SetRequest(key=writes[n % len(writes)], value=b"x" * 100)
        await _timed(log, gateway, "set", stub.Set(put, timeout=DEADLINE))
        await asyncio.sleep(0.002)


async def one_round(topo: Topology, stubs: Sequence[cache_pb2_grpc.CacheServiceAsyncStub]) -> Round:
    for i, stub in enumerate(stubs):  # the hot keys into every L1
        for key in HOT:
            # Bounded: L1 fills wait for the gateway's subscription, which may still be
            # coming back from the previous round.
            for _ in range(250):
                reply = await stub.Get(pb.GetRequest(key=key), timeout=5)
                if reply.tier == pb.TIER_L1:
                    break
                await asyncio.sleep(0.02)
            else:
                raise RuntimeError(f"{key} did not reach gateway {i}'s L1")
    result = Round()
    stop = asyncio.Event()
    writes = [
        topo.write_keys(i) if topo.write_keys else [f"w:{i}:{n}" for n in range(100)]
        for i in range(len(stubs))
    ]
    tasks = [
        asyncio.create_task(_load(i, s, stop, result.calls, writes[i])) for i, s in enumerate(stubs)
    ]
    try:
        await asyncio.sleep(STEADY)
        token = await asyncio.to_thread(topo.kill)
        # From the moment the primary is dead: calls started earlier are not counted.
        result.killed_at = time.monotonic()
        await asyncio.to_thread(topo.wait_promoted, token)
        result.promoted = time.monotonic() - result.killed_at
        deadline = time.monotonic() + 30
        while len(result.first_write) < len(stubs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"writes resumed on gateways {sorted(result.first_write)} only")
            for c in result.calls:
                if c.kind == "set" and c.ok and c.started >= result.killed_at:
                    done = c.started + c.seconds - result.killed_at
                    result.first_write[c.gateway] = min(
                        result.first_write.get(c.gateway, done), done
                    )
            await asyncio.sleep(0.05)
        await asyncio.sleep(AFTER)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    await asyncio.to_thread(topo.heal, token)
    return result


async def run_rounds(topo: Topology, addresses: list[str], rounds: int) -> list[Round]:
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs: list[cache_pb2_grpc.CacheServiceAsyncStub] = [
        cache_pb2_grpc.CacheServiceStub(ch) for ch in channels
    ]
    try:
        for key in [*HOT, *L2]:
            await stubs[0].Set(pb.SetRequest(key=key, value=b"v" * 100), timeout=5)
        out = []
        for r in range(rounds):
            out.append(await one_round(topo, stubs))
            print(f"round {r + 1}: blackout {out[-1].blackout:.2f} s", flush=True)
        return out
    finally:
        for ch in channels:
            await ch.close(None)


def _p99_ms(calls: list[Call]) -> float:
    return percentile(sorted(c.seconds * 1000 for c in calls), 99)


def _share(calls: list[Call]) -> float:
    return sum(c.ok for c in calls) / len(calls) if calls else float("nan")


def report(rounds: list[Round]) -> tuple[str, dict[str, float]]:
    rows = []
    for i, r in enumerate(rounds, 1):
        hot, l2 = r.gets("hot", True), r.gets("l2", True)
        rows.append(
            [
                str(i),
                f"{r.promoted:.2f}",
                f"{r.blackout:.2f}",
                f"{r.blackout - r.promoted:+.2f}",
                f"{_p99_ms(r.gets('hot', False)):.1f}",
                f"{_p99_ms(hot):.1f}",
                f"{_share(hot):.3f}",
                f"{_p99_ms(l2):.1f}",
                f"{_share(l2):.3f}",
            ]
        )
    headers = [
        "round",
        "promoted s",
        "first write s",
        "gateway share s",
        "hot p99 before ms",
        "hot p99 blackout ms",
        "hot answered",
        "L2 p99 blackout ms",
        "L2 answered",
    ]
    measured = {
        "gateway share": median([r.blackout - r.promoted for r in rounds]),
        "hot Gets answered": min(_share(r.gets("hot", True)) for r in rounds),
    }
    return render_table(headers, rows, right="rrrrrrrrr"), measured


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--topology", choices=sorted(TOPOLOGIES), default="sentinel")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 rounds")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    rounds = 2 if s.quick else max(1, s.rounds)
    work = Path(tempfile.mkdtemp(prefix="cachegw-failover-"))
    t0 = time.monotonic()
    try:
        with sigterm_as_interrupt(), ExitStack() as stack:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
            topo = TOPOLOGIES[s.topology](stack)
            rounds = min(rounds, topo.max_rounds)  # a cluster: a primary a round
            gateways = start_gateways(stack, 3, topo.url, CONFIG, work)
            results = asyncio.run(run_rounds(topo, [g.address for g in gateways], rounds))
            for gw in gateways:
                if not gw.running:
                    raise RuntimeError(f"{gw.name} died during the run")
    except KeyboardInterrupt:
        print("interrupted; every started process was stopped", file=sys.stderr)
        return 130
    print(
        f"\nfailover benchmark: {s.topology}, 3 gateways under load, {rounds} rounds, "
        f"{os.cpu_count()} CPUs shared by everything; times from the SIGKILL of the primary\n"
    )
    table, measured = report(results)
    print(table)
    met = check_aims(AIMS, measured)
    print(f"total wall time {time.monotonic() - t0:.0f} s")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
