"""`make chaos`: the design note's chaos routines against a real topology while it serves.

Three `cachegw serve` processes share one Redis topology (standalone by default); gw2
reaches it through TCP proxies (tests/tcpproxy.py), one in front of every node (on a
cluster, `redis.address_map` sends it to each node's proxy), so that it can be
partitioned. A
steady load (chaos_load.py: one writer per gateway over its own keys, two readers per
gateway over every key, deadline 1.5 s per call) runs the whole time. Each routine
breaks something, heals it, waits until an end-to-end probe passes on every gateway
(write, L1 fill, a rewrite seen everywhere within a second: the data plane recovered)
and keeps serving for a few seconds more; then its checks are judged:

- node eviction: the Redis node is SIGKILLed and comes back empty (data lost);
- mass invalidation: N keys loaded (SetMany batches) and removed by prefix, then N by
  tag, then N by class (a generation bump), timing each and the Get latency meanwhile;
- partition: gw2's proxies blackhole (silent) for a while, then reset (loud).

Checks, per routine: it recovered; after recovery no call failed and no read was stale
beyond EPSILON; at no time a read older than the L1 bound (l1_ttl + EPSILON), a call past
its deadline (+1 s), or a status other than UNAVAILABLE / DEADLINE_EXCEEDED; for a
partition, gw0 and gw1 saw no failure at all and gw2's Stats said Redis was down.

    .venv/bin/python benchmarks/chaos.py [--quick] [--topology standalone] [--only NAME]

Exits 0 when every check passed, 1 otherwise. `--quick` (50k keys, short faults) runs in
well under a minute; the full run loads 1M keys per mass invalidation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# This process forks redis-server children (ManagedRedis: fork, then exec) while gRPC's
# threads run; gRPC's fork handlers then ran in a child and aborted it (seen: a restarted
# node died with SIGABRT before exec). Nothing here uses gRPC across a fork.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks.*, tests.tcpproxy

import grpc  # noqa: E402

from benchmarks import chaos_bulk  # noqa: E402
from benchmarks.chaos_load import Gateway, Load, Window, wait_recovered  # noqa: E402
from benchmarks.chaos_topology import TOPOLOGIES, Topology  # noqa: E402
from benchmarks.harness import ServerProcess, render_table, sigterm_as_interrupt  # noqa: E402
from cachegw.v1 import cache_pb2 as pb  # noqa: E402
from cachegw_gateway.managed_redis import free_port  # noqa: E402
from tests.tcpproxy import Mode, TcpProxy  # noqa: E402

L1_TTL = 10.0  # the hot keys' class: the staleness bound when an event is lost
EPSILON = 1.0  # invalidation delivery allowance (measured p99: tens of ms); generous
DEADLINE = 1.5  # every call of the load
RECOVER_WITHIN = 30.0
DOCUMENTED = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}  # docs/errors.md, for Redis trouble
PARTITIONED = 2  # gw2 reaches Redis through the proxies
BATCH = 1000  # keys per GetMany (server.max_batch_keys)

CONFIG = f"""
[redis]
socket_timeout = 0.5
connect_timeout = 0.5

[default_class]
l1_ttl_seconds = {L1_TTL}

[[classes]]
name = "bulk"
patterns = ["bulk:*"]
l1 = false
ttl_seconds = 900.0
"""


@dataclass(frozen=True)
class Sizes:
    keys: int  # per mass invalidation
    outage: float  # seconds the killed node stays down
    blackhole: float  # seconds of silent partition (> bus.DEAD_AFTER = 6 s)
    reset: float  # seconds of loud partition
    settle: float  # seconds served and judged after recovery (and before, as baseline)


QUICK = Sizes(keys=50_000, outage=1.5, blackhole=7.0, reset=2.0, settle=1.0)
FULL = Sizes(keys=1_000_000, outage=3.0, blackhole=10.0, reset=3.0, settle=5.0)


@dataclass
class Result:
    routine: str
    fault_s: float = math.nan
    recover_s: float = math.nan  # heal -> the probe passed on every gateway
    during: Window | None = None
    after: Window | None = None
    stale_during: int = 0  # beyond EPSILON, while broken (expected where L1 serves)
    stale_after: int = 0
    notes: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    skipped: str = ""

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.checks)

    def check(self, what: str, ok: bool) -> None:
        self.checks.append((what, ok))


@dataclass
class Deployment:
    topology: Topology
    proxies: list[TcpProxy]  # gw2's, one per node; none: no partition routine
    gateways: list[Gateway]
    load: Load
    sizes: Sizes
    load_via: str = "raw"  # how mass invalidations load their keys: "raw" or "rpc"

    async def stats(self, g: int) -> pb.StatsResponse | None:
        try:
            reply: pb.StatsResponse = await self.gateways[g].stub.Stats(
                pb.StatsRequest(), timeout=DEADLINE
            )
        except grpc.aio.AioRpcError:
            return None
        return reply


# -- judging -------------------------------------------------------------------------------


async def finish(d: Deployment, r: Result, started: float, broken: float, healed: float) -> None:
    """Wait for recovery, serve `settle` seconds more, and judge the routine."""
    recovery = await wait_recovered(d.gateways, RECOVER_WITHIN)
    recovered = recovery.at
    r.check(f"recovered within {RECOVER_WITHIN:.0f} s", recovered is not None)
    if recovery.failures:
        r.notes.append(
            "probes failed before recovery: "
            + "; ".join(f"{n} x {why}" for why, n in recovery.failures.most_common(3))
        )
    end_of_fault = recovered if recovered is not None else time.monotonic()
    r.recover_s = end_of_fault - healed if recovered is not None else math.nan
    r.during = d.load.window(broken, end_of_fault)
    r.stale_during = d.load.stale(broken, end_of_fault, EPSILON)
    await asyncio.sleep(d.sizes.settle)
    now = time.monotonic()
    r.after = d.load.window(end_of_fault, now)
    r.stale_after = d.load.stale(end_of_fault, now, EPSILON)
    whole = d.load.window(started, now)
    r.check("no failed call after recovery", not r.after.errors)
    r.check(f"no read stale beyond {EPSILON:g} s after recovery", r.stale_after == 0)
    r.check(
        f"no read older than the L1 bound ({L1_TTL:g} s + {EPSILON:g} s)",
        d.load.stale(started, now, L1_TTL + EPSILON) == 0,
    )
    r.check(f"every call ended by its deadline (+{d.load.slack:g} s)", whole.over_deadline == 0)
    odd = set(whole.errors) - DOCUMENTED
    r.check(f"only documented statuses{' (got ' + ', '.join(odd) + ')' if odd else ''}", not odd)


# -- routines ------------------------------------------------------------------------------


async def node_eviction(d: Deployment) -> list[Result]:
    r = Result("node eviction")
    started = time.monotonic()
    await asyncio.sleep(d.sizes.settle)
    what = await asyncio.to_thread(d.topology.kill_node)
    killed_at = time.monotonic()  # once it is dead: nothing sent after can succeed
    await asyncio.sleep(d.sizes.outage)
    await asyncio.to_thread(d.topology.restore_node)
    answered_at = time.monotonic()
    r.fault_s = answered_at - killed_at
    await finish(d, r, started, killed_at, answered_at)
    gws = range(len(d.gateways))
    resumed = [d.load.first_ok("Set", g, answered_at) for g in gws]
    blackout = [d.load.first_ok("Set", g, killed_at) for g in gws]
    r.check("writes resumed on every gateway", None not in resumed)
    last_resumed = max((t for t in resumed if t is not None), default=math.nan)
    last_first = max((t for t in blackout if t is not None), default=math.nan)
    r.notes.append(
        f"killed {what}; it answered again, empty, {r.fault_s:.1f} s later; writes "
        f"resumed on every gateway {last_resumed - answered_at:.2f} s after that (a "
        f"blackout of {last_first - killed_at:.2f} s from the kill)"
    )
    return [r]


async def _load_keys(
    d: Deployment, keys: Sequence[str], tags: Sequence[str]
) -> tuple[float, int, str]:
    """Load `keys` of class "bulk": (seconds, failures, how)."""
    target = d.topology.single_node()
    started = time.monotonic()
    if d.load_via == "raw" and target is not None:
        failed = await chaos_bulk.load_raw(*target, d.topology.url, "cg", keys, "bulk", tags)
        how = (
            f"the Set script pipelined x{chaos_bulk.PIPELINE} on "
            f"{chaos_bulk.CONNECTIONS} raw connections"
        )
    else:
        failed = await chaos_bulk.load_rpc([g.stub for g in d.gateways], keys, tags)
        how = f"SetMany x{chaos_bulk.BATCH}, {chaos_bulk.RPCS} in flight"
    return time.monotonic() - started, failed, how


async def _all_missing(d: Deployment, keys: Sequence[str]) -> bool:
    for gw in d.gateways:
        for i in range(0, len(keys), BATCH):
            batch = keys[i : i + BATCH]
            reply = await gw.stub.GetMany(pb.GetManyRequest(keys=batch), timeout=10)
            if any(x.status != pb.STATUS_MISS for x in reply.results):
                return False
    return True


async def mass_invalidation(d: Deployment) -> list[Result]:
    n = d.sizes.keys
    await asyncio.sleep(d.sizes.settle)
    base = d.load.window(time.monotonic() - d.sizes.settle, time.monotonic())
    results = []
    kinds: list[tuple[str, pb.InvalidateRequest, tuple[str, ...]]] = [
        ("prefix", pb.InvalidateRequest(prefixes=["bulk:prefix:"]), ()),
        ("tag", pb.InvalidateRequest(tags=["bulk-tag"]), ("bulk-tag",)),
        ("class", pb.InvalidateRequest(classes=["bulk"]), ()),
    ]
    for kind, request, tags in kinds:
        r = Result(f"mass invalidation: {kind}")
        keys = [f"bulk:{kind}:{i}" for i in range(n)]
        load_s, failed, how = await _load_keys(d, keys, tags)
        print(f"   {kind}: {n:,} keys loaded in {load_s:.1f} s; invalidating", flush=True)
        r.check(f"{n:,} keys loaded", failed == 0)
        started = time.monotonic()
        removed = -1
        try:
            reply = await d.gateways[0].stub.Invalidate(request, timeout=600)
            removed = reply.removed
        except grpc.aio.AioRpcError as exc:
            r.notes.append(f"Invalidate failed: {exc.code().name} {exc.details()}")
        done = time.monotonic()
        r.fault_s = done - started
        r.check("Invalidate answered", removed >= 0)
        if kind != "class":  # a class bump is O(1): it removes nothing, it kills
            r.check(f"removed all {n:,}", removed == n)
        sample = keys[:: max(1, n // 2000)]
        r.check("a sample of them misses on every gateway", await _all_missing(d, sample))
        during = d.load.window(started, max(done, started + 1e-3))
        r.notes.append(
            f"loaded {n:,} keys in {load_s:.1f} s ({n / load_s:,.0f} keys/s, "
            f"{how}); invalidated in {r.fault_s:.2f} s "
            f"({n / r.fault_s:,.0f} keys/s), removed {removed:,}; Get p50/p99 "
            f"{during.get_p50_ms:.1f}/{during.get_p99_ms:.1f} ms meanwhile vs "
            f"{base.get_p50_ms:.1f}/{base.get_p99_ms:.1f} ms before"
        )
        await finish(d, r, started, started, time.monotonic())
        results.append(r)
    return results


async def _partition(d: Deployment, mode: Mode, hold: float) -> Result:
    r = Result(f"partition: {mode}")
    if not d.proxies:
        r.skipped = f"{d.topology.name}: no address to partition"
        return r
    before = await d.stats(PARTITIONED)
    flushes = before.l1_flushes if before is not None else 0
    started = time.monotonic()
    for proxy in d.proxies:
        proxy.set_mode(mode)
    down_seen = flushed_seen = math.nan
    while time.monotonic() - started < hold:
        stats = await d.stats(PARTITIONED)
        now = time.monotonic() - started
        if stats is not None and not stats.redis.up and math.isnan(down_seen):
            down_seen = now
        if stats is not None and stats.l1_flushes > flushes and math.isnan(flushed_seen):
            flushed_seen = now
        await asyncio.sleep(0.2)
    healed = time.monotonic()
    for proxy in d.proxies:
        proxy.set_mode("pass")
    r.fault_s = healed - started
    others = [g for g in range(len(d.gateways)) if g != PARTITIONED]
    await finish(d, r, started, started, healed)
    assert r.during is not None
    end = healed + r.recover_s if not math.isnan(r.recover_s) else time.monotonic()
    theirs = d.load.window(started, end, others)
    mine = d.load.window(started, end, [PARTITIONED])
    r.check("gw0 and gw1 saw no failure", theirs.calls > 0 and not theirs.errors)
    r.check("gw2's Stats said Redis down", not math.isnan(down_seen))
    r.notes.append(
        f"{mode} {r.fault_s:.1f} s ({_proxies(len(d.proxies))}): gw2 Stats said Redis down "
        f"after {down_seen:.1f} s, "
        f"flushed L1 (subscription lost) after {flushed_seen:.1f} s; gw2 calls "
        f"{mine.calls} with errors {mine.errors_text()}; gw0+gw1 calls {theirs.calls} "
        f"with errors {theirs.errors_text()}"
    )
    return r


def _proxies(n: int) -> str:
    return f"{n} prox{'y' if n == 1 else 'ies'}"


async def partition(d: Deployment) -> list[Result]:
    return [
        await _partition(d, "blackhole", d.sizes.blackhole),
        await _partition(d, "reset", d.sizes.reset),
    ]


ROUTINES: dict[str, Callable[[Deployment], Awaitable[list[Result]]]] = {
    "node-eviction": node_eviction,
    "mass-invalidation": mass_invalidation,
    "partition": partition,
}


# -- the run -------------------------------------------------------------------------------


@contextlib.contextmanager
def gateways_for(
    topology: Topology, proxies: Mapping[tuple[str, int], TcpProxy], work: Path
) -> Iterator[list[ServerProcess]]:
    config = work / "chaos.toml"
    config.write_text(CONFIG)
    direct = ["--redis-url", topology.url]
    via = {target: proxy.port for target, proxy in proxies.items()}
    redis_flags = [direct, direct, topology.partitioned_flags(via) if via else direct]
    with contextlib.ExitStack() as stack:
        procs = []
        for i, flags in enumerate(redis_flags):
            address = f"127.0.0.1:{free_port()}"
            argv = [
                str(Path(sys.executable).parent / "cachegw"), "serve", "--listen", address,
                *flags, "--config", str(config), "--gateway-id", f"gw{i}",
                "--log-level", "WARNING",
            ]  # fmt: skip
            procs.append(
                stack.enter_context(ServerProcess(f"gw{i}", argv, address, work / f"gw{i}.log"))
            )
        yield procs


async def run(
    topology: Topology, sizes: Sizes, only: Sequence[str], work: Path, load_via: str
) -> list[Result]:
    with contextlib.ExitStack() as stack:
        proxies = {
            target: stack.enter_context(TcpProxy(*target))
            for target in topology.partition_targets()
        }
        procs = stack.enter_context(gateways_for(topology, proxies, work))
        gateways = [Gateway.connect(p.name, p.address) for p in procs]
        load = Load(gateways, deadline=DEADLINE)
        d = Deployment(topology, list(proxies.values()), gateways, load, sizes, load_via)
        if (await wait_recovered(gateways, RECOVER_WITHIN)).at is None:
            raise RuntimeError("the gateways did not serve before any fault")
        load.start()
        results: list[Result] = []
        try:
            for name, routine in ROUTINES.items():
                if not only or name in only:
                    print(f"-- {name}", flush=True)
                    results += await routine(d)
        finally:
            await load.stop()
            for gw in gateways:
                await gw.channel.close(None)
    return results


def _ms(w: Window | None) -> str:
    if w is None or math.isnan(w.get_p50_ms):
        return "-"
    return f"{w.get_p50_ms:.1f} / {w.get_p99_ms:.0f}"


def report(results: Sequence[Result]) -> str:
    headers = [
        "routine", "fault s", "recover s", "calls", "errors while broken",
        "stale>1s", "Get p50/p99 ms", "errors after", "stale after", "checks",
    ]  # fmt: skip
    rows = []
    for r in results:
        if r.skipped:
            rows.append(
                [r.routine, "-", "-", "-", "-", "-", "-", "-", "-", f"skipped: {r.skipped}"]
            )
            continue
        passed = sum(ok for _, ok in r.checks)
        rows.append(
            [
                r.routine,
                f"{r.fault_s:.2f}",
                f"{r.recover_s:.2f}",
                str(r.during.calls if r.during else 0),
                r.during.errors_text() if r.during else "-",
                str(r.stale_during),
                _ms(r.during),
                r.after.errors_text() if r.after else "-",
                str(r.stale_after),
                f"{passed}/{len(r.checks)}" + ("" if r.passed else " FAILED"),
            ]
        )
    lines = [render_table(headers, rows, right="lrrrlrrlrl"), ""]
    for r in results:
        for note in r.notes:
            lines.append(f"- {r.routine}: {note}")
    failed = [(r.routine, what) for r in results for what, ok in r.checks if not ok]
    lines.append("")
    if failed:
        lines += [f"FAILED: {routine}: {what}" for routine, what in failed]
    else:
        lines.append("all checks passed")
    return "\n".join(lines)


def _redis_version() -> str:
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except OSError:
        return "?"
    return next((w[2:] for w in out.split() if w.startswith("v=")), "?")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50k keys, short faults")
    parser.add_argument("--topology", choices=sorted(TOPOLOGIES), default="standalone")
    parser.add_argument("--only", action="append", choices=sorted(ROUTINES), default=[])
    parser.add_argument(
        "--load",
        choices=["raw", "rpc"],
        default="raw",
        help="load mass-invalidation keys with pipelined Set scripts (fast) or SetMany RPCs",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    topology = TOPOLOGIES[args.topology]()
    print(
        f"chaos: {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}, redis-server {_redis_version()}, "
        f"topology {topology.name}, 3 gateways (gw2 through proxies), "
        f"{sizes.keys:,} keys per mass invalidation{' (--quick)' if args.quick else ''}",
        flush=True,
    )
    started = time.monotonic()
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="cachegw-chaos-") as tmp:
        topology.start()
        try:
            results = asyncio.run(run(topology, sizes, args.only, Path(tmp), args.load))
        finally:
            topology.stop()
    print()
    print(report(results))
    print(f"\n({time.monotonic() - started:.0f} s in all)")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
