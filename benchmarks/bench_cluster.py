"""The gateway on a 3-primary Redis Cluster against the gateway on one standalone Redis,
in the same run, and classic against sharded pub/sub on that cluster.

  Get        a key of a class with `l1 = false` (every Get reads Redis)
  GetMany    100 such keys (the cluster splits them over the three primaries and reads
             the nodes concurrently)
  Get (L1)   an L1 hit: no Redis at all, so the topology should not matter

Each case: one `cachegw serve` process per topology, a Python asyncio client at
concurrency 64 from this process, interleaved rounds; the ratio is cluster/standalone.
All of it (client, gateways, one standalone Redis, six cluster nodes) shares the
machine's 2 cores, so the cluster's extra nodes cost CPU that a real deployment spreads
over hosts: read the ratios as a floor.

Pub/sub: one publisher, one subscriber on another node; `n` messages published at a
steady rate, each stamped with its send time; the receiver's delay (p50/p99) and the
rate of a burst. Classic PUBLISH is forwarded by the cluster bus to every node (any node
can listen); SPUBLISH goes to the shard of the channel's slot only (the subscriber must
listen there, and follow the slot when it moves).

Run (from the repository root, after `make setup`):

    .venv/bin/python benchmarks/bench_cluster.py            # about 1.5 minutes
    .venv/bin/python benchmarks/bench_cluster.py --quick    # about 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from benchmarks.harness import (
    Budget,
    Case,
    Sample,
    ServerProcess,
    fmt_number,
    measure_async,
    percentile,
    render_table,
    run_interleaved,
)
from cachegw import AsyncClient
from cachegw_gateway.managed_redis import ManagedRedis, free_port
from tests.cluster_topology import ClusterTopology

BIN = Path(sys.executable).parent
BATCH = 100

CONFIG = """
[[classes]]
name = "direct"
patterns = ["d:*"]
l1 = false
ttl_seconds = 600

[default_class]
ttl_seconds = 600
"""


def gateway(stack: ExitStack, name: str, url: str, work: Path) -> ServerProcess:
    config = work / "gateway.toml"
    config.write_text(CONFIG)
    address = f"127.0.0.1:{free_port()}"
    argv = [str(BIN / "cachegw"), "serve", "--listen", address, "--redis-url", url,
            "--config", str(config), "--log-level", "WARNING"]  # fmt: skip
    return stack.enter_context(ServerProcess(name, argv, address, work / f"{name}.log"))


async def pubsub_delays(
    cluster: ClusterTopology, sharded: bool, n: int, rate: float, same_node: bool = False
) -> tuple[list[float], float]:
    """(delays in ms of `n` messages at `rate`/s, messages/s of a burst of `n`)."""
    seeds = [ClusterNode("127.0.0.1", node.port) for node in cluster.nodes]
    publisher = RedisCluster(startup_nodes=seeds)
    await publisher.initialize()
    channel = "bench:{events}"
    pubsub: Any
    owner = publisher.get_node_from_key(channel)
    assert owner is not None
    if sharded:
        pubsub = publisher.pubsub()
        await pubsub.ssubscribe(channel)
    else:
        # The node the publisher's PUBLISH goes to (where the gateways listen: the
        # events are published on the audit stream's node), or any other node.
        node = (
            owner if same_node else next(n for n in publisher.get_nodes() if n.name != owner.name)
        )
        single = aioredis.Redis(host=node.host, port=int(node.port))
        pubsub = single.pubsub()
        await pubsub.subscribe(channel)
    received: list[tuple[float, bytes]] = []

    async def listen(count: int) -> None:
        while len(received) < count:
            msg = await (
                pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=1.0)
                if sharded
                else pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            )
            if msg is not None and msg["type"] in ("message", "smessage"):
                received.append((time.perf_counter(), msg["data"]))

    async def send(count: int, gap: float) -> None:
        for _ in range(count):
            stamp = str(time.perf_counter()).encode()
            if sharded:
                await publisher.execute_command("SPUBLISH", channel, stamp)
            else:  # on the channel's node, as the gateway's publish script runs there
                await publisher.execute_command("PUBLISH", channel, stamp, target_nodes=owner)
            if gap:
                await asyncio.sleep(gap)

    await asyncio.sleep(0.2)  # subscribed
    async with asyncio.timeout(60):
        listener = asyncio.create_task(listen(n))
        await send(n, 1 / rate)
        await listener
    delays = sorted((at - float(data)) * 1000 for at, data in received)
    received.clear()
    async with asyncio.timeout(60):
        listener = asyncio.create_task(listen(n))
        t0 = time.perf_counter()
        await send(n, 0)
        await listener
        burst = n / (time.perf_counter() - t0)
    await pubsub.aclose()
    await publisher.aclose()
    return delays, burst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run, for smoke tests")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per case (2)")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight (64)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    budget = Budget(args.seconds or (0.7 if args.quick else 2.0), 0.2)
    c = args.concurrency
    work = Path(tempfile.mkdtemp(prefix="cachegw-bench-"))
    t0 = time.monotonic()
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        standalone = stack.enter_context(ManagedRedis())
        cluster = stack.enter_context(ClusterTopology())
        gw_one = gateway(stack, "standalone", standalone.url, work)
        gw_cluster = gateway(stack, "cluster", cluster.url, work)
        runner = stack.enter_context(asyncio.Runner())
        clients = {
            "standalone": runner.run(_client(gw_one.address)),
            "cluster": runner.run(_client(gw_cluster.address)),
        }
        stack.callback(lambda: runner.run(_close(list(clients.values()))))
        direct = [f"d:{i}" for i in range(BATCH)]
        for client in clients.values():
            runner.run(client.set_many([(k, b"v" * 100) for k in direct]))
            runner.run(client.set("hot", b"h" * 100))
            runner.run(client.get("hot"))

        def case(name: str, call: Callable[[], Awaitable[object]], items: int) -> Case:
            def run() -> Sample:
                return runner.run(measure_async(call, c, budget, items))

            return Case(name, run)

        cases = []
        for topo, client in clients.items():
            cases += [
                case(f"get.{topo}", partial(client.get, "d:7"), 1),
                case(f"getmany.{topo}", partial(client.get_many, direct), BATCH),
                case(f"l1.{topo}", partial(client.get, "hot"), 1),
            ]
        results = run_interleaved(cases, rounds, rotate=True)
        n = 300 if args.quick else 2000
        pubsub = {
            "classic, other node": runner.run(pubsub_delays(cluster, False, n, 500.0)),
            "classic, same node": runner.run(pubsub_delays(cluster, False, n, 500.0, True)),
            "sharded": runner.run(pubsub_delays(cluster, True, n, 500.0)),
        }
        if not (gw_one.running and gw_cluster.running):
            raise RuntimeError("a gateway died during the run")
    rows: list[list[str]] = []
    for prefix, label in (("get", "Get (Redis)"), ("getmany", "GetMany(100)"), ("l1", "Get (L1)")):
        one, many = results.summary(f"{prefix}.standalone"), results.summary(f"{prefix}.cluster")
        ratio = results.ratio(f"{prefix}.cluster", f"{prefix}.standalone")
        spread = results.spread(f"{prefix}.cluster", f"{prefix}.standalone")
        rows.append([label, "standalone", fmt_number(one.items_per_s), fmt_number(one.p50_us),
                     fmt_number(one.p99_us), ""])  # fmt: skip
        rows.append([label, "cluster 3+3", fmt_number(many.items_per_s), fmt_number(many.p50_us),
                     fmt_number(many.p99_us), f"{ratio:.2f} ({spread})"])  # fmt: skip
    print(
        f"gateway on a 3-primary cluster vs one Redis: concurrency {c}, {rounds} interleaved "
        f"rounds x {budget.seconds:g} s per case; 2 cores shared by client, 2 gateways, 7 Redis"
    )
    print(render_table(["call", "Redis", "values/s", "p50 us", "p99 us", "cluster/one"],
                       rows, right="llrrrl"))  # fmt: skip
    prow = [
        [kind, str(len(d)), f"{percentile(d, 50):.2f}", f"{percentile(d, 99):.2f}",
         f"{statistics.mean(d):.2f}", fmt_number(burst)]
        for kind, (d, burst) in pubsub.items()
    ]  # fmt: skip
    print(f"\npub/sub on the cluster: {n} messages at 500/s, then a burst of {n}")
    print(render_table(["pub/sub", "messages", "p50 ms", "p99 ms", "mean ms", "burst msg/s"],
                       prow, right="lrrrrr"))  # fmt: skip
    print(f"total wall time {time.monotonic() - t0:.0f} s")
    return 0


async def _client(address: str) -> AsyncClient:
    return AsyncClient(address, timeout=30)


async def _close(clients: list[AsyncClient]) -> None:
    for client in clients:
        await client.close()


if __name__ == "__main__":
    sys.exit(main())
