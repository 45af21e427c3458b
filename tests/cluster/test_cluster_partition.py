"""A partition between one gateway and a Redis Cluster: that gateway degrades and
recovers, the others do not notice.

A cluster client goes wherever the cluster says its nodes are (CLUSTER SLOTS, MOVED,
ASK), so one proxy in front of a seed cuts nothing. gw2 is given `redis.address_map`
instead: every node's address -> a TcpProxy of its own in front of that node (the same
URL as the others: its seeds go through the map too). gw0 and gw1 reach the nodes
directly. Three `cachegw serve` processes on a real 3-primary, 3-replica cluster:

- cut off from every node (a blackhole until gw2 notices, then connections reset):
  gw2 answers every call by its deadline with UNAVAILABLE / DEADLINE_EXCEEDED or from
  L1, never crashes; gw0 and gw1 serve a steady load without one failure; healed, gw2
  writes again, its subscription is back, and what gw0 changed meanwhile is what it
  reads (its L1 was flushed when the subscription dropped);
- cut off from one primary (not the one its subscription listens on): keys in the
  other primaries' slots are read and written through gw2 as before; keys on the cut
  node fail by their deadline or are answered from L1;
- redirections follow the map: a slot being moved (ASK) and moved (MOVED) reaches its
  new node through that node's proxy, not at the address the cluster announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.crc import key_slot

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis
from tests.cluster_topology import ClusterTopology
from tests.conftest import GatewayProcess
from tests.tcpproxy import TcpProxy

# Minutes of real topology under load: CI runs them after `make test` (`make test-slow`).
pytestmark = pytest.mark.slow

# Short Redis timeouts so that a silent partition shows within a second or two; the
# pub/sub connection's own timeout (5 s) and its ping (bus.DEAD_AFTER = 6 s) are fixed.
CONFIG = """
[redis]
socket_timeout = 0.5
connect_timeout = 0.5

[default_class]
l1_ttl_seconds = 60.0
"""
DEADLINE = 1.0  # each call to the partitioned gateway
SLACK = 1.0  # generous: the machine is small and shared
HEALTHY_DEADLINE = 2.0  # calls to healthy nodes while one node is cut off (see test)
DEGRADED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
HOT = [f"hot:{i}" for i in range(12)]  # held in every gateway's L1 before the partition
CHANGED = HOT[:4]  # rewritten by gw0 during the partition
DELETED = HOT[4:6]  # deleted by gw0 during the partition
UNTOUCHED = HOT[6:]


@dataclass
class Gw:
    name: str
    proc: GatewayProcess
    channel: grpc.aio.Channel
    stub: cache_pb2_grpc.CacheServiceAsyncStub


@dataclass
class Load:
    """A steady Set/Get load on the gateways that keep their Redis."""

    calls: int = 0
    failures: list[str] = field(default_factory=list)


@pytest.fixture
def proxies(cluster: ClusterTopology) -> Iterator[dict[int, TcpProxy]]:
    """A proxy in front of every node (primaries and replicas), by the node's port."""
    with contextlib.ExitStack() as stack:
        yield {
            node.port: stack.enter_context(TcpProxy("127.0.0.1", node.port))
            for node in cluster.nodes
        }


@pytest.fixture
async def gateways(
    tmp_path: Path,
    cluster: ClusterTopology,
    proxies: dict[int, TcpProxy],
    gateway_process: Callable[..., GatewayProcess],
    prefix: str,
) -> AsyncIterator[list[Gw]]:
    """gw0 and gw1 on the cluster directly, gw2 through the proxies (its address map)."""
    direct = tmp_path / "direct.toml"
    direct.write_text(CONFIG)
    mapped = tmp_path / "mapped.toml"
    entries = "".join(f'"127.0.0.1:{port}" = "127.0.0.1:{p.port}"\n' for port, p in proxies.items())
    mapped.write_text(f"{CONFIG}\n[redis.address_map]\n{entries}")
    gws = []
    for i, config in enumerate([direct, direct, mapped]):
        # The same URL for all three: gw2's seeds go through its map as well.
        flags = ["--config", str(config), "--redis-url", cluster.url, "--redis-prefix", prefix]
        proc = gateway_process(*flags, "--gateway-id", f"gw{i}", "--log-level", "WARNING")
        channel = grpc.aio.insecure_channel(proc.address)
        gws.append(Gw(f"gw{i}", proc, channel, cache_pb2_grpc.CacheServiceStub(channel)))
    yield gws
    for gw in gws:
        await gw.channel.close(None)


# -- helpers -----------------------------------------------------------------------------


def primary_ports(cluster: ClusterTopology) -> dict[int, list[tuple[int, int]]]:
    """Port of each primary -> the slot ranges it serves."""
    return {node.port: cluster.slots_of(node) for node in cluster.primaries()}


def port_of(ranges: dict[int, list[tuple[int, int]]], key: str) -> int:
    """The primary serving cache key `key` (its Redis keys share the slot of {key})."""
    slot = key_slot(key.encode())
    return next(p for p, rs in ranges.items() if any(a <= slot <= b for a, b in rs))


def meta_port(cluster: ClusterTopology, prefix: str) -> int:
    """The primary of the audit stream's slot: where every gateway's bus listens."""
    return cluster.node_of_key(f"{prefix}:{{meta}}:events").port


async def steady_load(gws: list[Gw], load: Load, stop: asyncio.Event) -> None:
    """Set then Get a key on each gateway in turn until `stop` (at most 10,000 rounds)."""
    for n in range(10_000):
        if stop.is_set():
            return
        gw = gws[n % len(gws)]
        key, value = f"steady:{n % 50}", str(n).encode()
        try:
            await gw.stub.Set(pb.SetRequest(key=key, value=value), timeout=2.0)
            got = await gw.stub.Get(pb.GetRequest(key=key), timeout=2.0)
            if got.value != value:
                load.failures.append(f"{gw.name} read {got.value!r} after writing {value!r}")
        except grpc.aio.AioRpcError as exc:
            load.failures.append(f"{gw.name}: {exc.code().name} {exc.details()}")
        load.calls += 2
        await asyncio.sleep(0.005)


async def degraded(call: Awaitable[object]) -> tuple[grpc.StatusCode, float, str]:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code(), time.monotonic() - started, err.value.details() or ""


async def stats(gw: Gw) -> pb.StatsResponse:
    reply: pb.StatsResponse = await gw.stub.Stats(pb.StatsRequest(), timeout=DEADLINE)
    return reply


async def poll(check: Callable[[], Awaitable[bool]], within: float) -> None:
    """eventually() for an async check (bounded, 50 ms apart)."""
    deadline = time.monotonic() + within
    while True:
        try:
            if await check():
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {within}s")
        await asyncio.sleep(0.05)


async def in_l1(gw: Gw, key: str) -> bool:
    got = await gw.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
    return bool(got.status == pb.STATUS_HIT and got.tier == pb.TIER_L1)


def set_mode(proxies: dict[int, TcpProxy], mode: str, ports: list[int] | None = None) -> None:
    for port, proxy in proxies.items():
        if ports is None or port in ports:
            proxy.set_mode(mode)  # type: ignore[arg-type]


# -- cut off from every node ---------------------------------------------------------------


async def test_one_gateway_cut_off_from_every_node(
    cluster: ClusterTopology, proxies: dict[int, TcpProxy], gateways: list[Gw], prefix: str
) -> None:
    gw0, gw1, gw2 = gateways
    ranges = primary_ports(cluster)
    assert len({port_of(ranges, k) for k in HOT}) == 3  # the hot keys span every primary
    # gw2 reaches every primary through its proxy (its health probe pings them all).
    primaries = list(ranges)

    async def through_proxies() -> bool:
        return all(proxies[port].accepted > 0 for port in primaries)

    await poll(through_proxies, within=10)
    for key in HOT:
        await gw0.stub.Set(pb.SetRequest(key=key, value=b"before"), timeout=DEADLINE)
    for gw in gateways:
        for key in HOT:
            # The first Get fills L1 once the gateway's subscription is live.
            await poll(partial(in_l1, gw, key), within=10)
    before = await stats(gw2)

    load, stop = Load(), asyncio.Event()
    steady = asyncio.create_task(steady_load([gw0, gw1], load, stop))
    try:
        set_mode(proxies, "blackhole")
        blackholed = time.monotonic()

        # Every call that needs Redis ends by its deadline with a documented status.
        calls: dict[str, Awaitable[object]] = {
            "Get": gw2.stub.Get(pb.GetRequest(key="absent"), timeout=DEADLINE),
            "GetMany": gw2.stub.GetMany(pb.GetManyRequest(keys=["a", "b"]), timeout=DEADLINE),
            "Set": gw2.stub.Set(pb.SetRequest(key="new", value=b"v"), timeout=DEADLINE),
            "Delete": gw2.stub.Delete(pb.DeleteRequest(keys=["new"]), timeout=DEADLINE),
            # By key: a broad one would also drop the copies set aside for the outage.
            "Invalidate": gw2.stub.Invalidate(pb.InvalidateRequest(keys=["p:1"]), timeout=DEADLINE),
        }
        for name, call in calls.items():
            code, took, details = await degraded(call)
            assert code in DEGRADED, f"{name} answered {code} {details}"
            assert took < DEADLINE + SLACK, f"{name} took {took:.2f}s"

        # Meanwhile gw0 changes keys gw2 holds; gw2 misses those events.
        for key in CHANGED:
            await gw0.stub.Set(pb.SetRequest(key=key, value=b"after"), timeout=DEADLINE)
        await gw0.stub.Delete(pb.DeleteRequest(keys=DELETED), timeout=DEADLINE)

        # gw2 learns that Redis is down, and that its subscription dropped (within
        # bus.DEAD_AFTER of silence): it flushes L1 then, keeping the copies aside.
        async def noticed() -> bool:
            s = await stats(gw2)
            return not s.redis.up and s.l1_flushes > before.l1_flushes

        await poll(noticed, within=15)
        noticed_after = time.monotonic() - blackholed
        health = await health_pb2_grpc.HealthStub(gw2.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=DEADLINE
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        # Then the connections drop (reset, and new ones refused): calls fail at once.
        set_mode(proxies, "reset")
        calls = {
            "Get": gw2.stub.Get(pb.GetRequest(key="absent"), timeout=DEADLINE),
            "Set": gw2.stub.Set(pb.SetRequest(key="new", value=b"v"), timeout=DEADLINE),
            "GetMany": gw2.stub.GetMany(pb.GetManyRequest(keys=["a", "b"]), timeout=DEADLINE),
        }
        for name, call in calls.items():
            code, took, details = await degraded(call)
            assert code == grpc.StatusCode.UNAVAILABLE, f"{name} answered {code} {details}"
            assert took < DEADLINE, f"{name} took {took:.2f}s"

        # The L1-hot keys it held are still served, from the copies set aside.
        for key in UNTOUCHED:
            got = await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE + 2)
            assert (got.status, got.tier, got.value) == (pb.STATUS_HIT, pb.TIER_L1, b"before")
        many = await gw2.stub.GetMany(pb.GetManyRequest(keys=UNTOUCHED), timeout=DEADLINE + 2)
        assert [r.tier for r in many.results] == [pb.TIER_L1] * len(UNTOUCHED)
        assert load.calls > 0 and not load.failures, load.failures[:5]
        # Its subscription did not come back meanwhile: the bus goes through the map too.
        s = await stats(gw2)
        assert not s.redis.up and s.redis.reconnects == before.redis.reconnects

        set_mode(proxies, "pass")
        healed = time.monotonic()

        # gw2 recovers: writes go through and its subscription is live again.
        async def recovered() -> bool:
            await gw2.stub.Set(pb.SetRequest(key="healed", value=b"v"), timeout=DEADLINE)
            s = await stats(gw2)
            return s.redis.up and s.redis.reconnects > before.redis.reconnects

        await poll(recovered, within=20)
        recovered_after = time.monotonic() - healed

        # No read older than the bound: what gw0 changed during the partition is seen.
        for key in CHANGED:
            got = await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
            assert got.value == b"after", key
        for key in DELETED:
            got = await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
            assert got.status == pb.STATUS_MISS, key
        for key in UNTOUCHED:
            got = await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
            assert got.value == b"before", key

        # Events reach gw2 again: a copy it holds is evicted when gw1 rewrites the key.
        key = CHANGED[0]
        await poll(partial(in_l1, gw2, key), within=5)
        await gw1.stub.Set(pb.SetRequest(key=key, value=b"again"), timeout=DEADLINE)

        async def fresh() -> bool:
            got = await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
            return got.value == b"again"

        await poll(fresh, within=2)
    finally:
        stop.set()
        await asyncio.wait_for(steady, timeout=10)
    # gw0 and gw1 never noticed; gw2 never crashed.
    assert load.calls > 0 and not load.failures, load.failures[:5]
    for gw in (gw0, gw1):
        s = await stats(gw)
        assert s.redis.up and s.redis.reconnects == 0
    assert all(gw.proc.proc.poll() is None for gw in gateways)
    print(
        f"\ncut off from every node: gw2 noticed (Redis down, L1 flushed) "
        f"{noticed_after:.1f}s into the blackhole; recovered {recovered_after:.2f}s after "
        f"the heal; gw0+gw1 {load.calls} calls, no failure"
    )


# -- cut off from one primary ------------------------------------------------------------


async def test_one_gateway_cut_off_from_one_primary(
    cluster: ClusterTopology, proxies: dict[int, TcpProxy], gateways: list[Gw], prefix: str
) -> None:
    """The other primaries' keys are still read and written through gw2. Their calls
    get HEALTHY_DEADLINE rather than DEADLINE: after each timeout on the cut node,
    redis-py re-reads the slot map under a lock every call waits on, from a node picked
    at random, which may be the cut one (docs/consistency.md, "A frozen primary"); the
    test prints what they took."""
    gw0, gw1, gw2 = gateways
    ranges = primary_ports(cluster)
    cut = next(p for p in ranges if p != meta_port(cluster, prefix))  # not the bus's node
    keys = [f"k:{i}" for i in range(60)]
    on_cut = [k for k in keys if port_of(ranges, k) == cut]
    elsewhere = [k for k in keys if port_of(ranges, k) != cut]
    hot_cut, cold_cut = on_cut[:3], on_cut[3:]
    assert cold_cut and len({port_of(ranges, k) for k in elsewhere}) == 2
    for key in keys:
        await gw0.stub.Set(pb.SetRequest(key=key, value=b"v0"), timeout=DEADLINE)
    for key in hot_cut:
        await poll(partial(in_l1, gw2, key), within=10)
    before = await stats(gw2)

    load, stop = Load(), asyncio.Event()
    steady = asyncio.create_task(steady_load([gw0, gw1], load, stop))
    healthy: list[tuple[str, float]] = []  # (outcome, seconds) of gw2's calls elsewhere
    on_cut_codes: list[str] = []

    async def elsewhere_calls(until: float) -> None:
        for n in range(10_000):
            if time.monotonic() > until:
                return
            key, value = elsewhere[n % len(elsewhere)], f"w{n}".encode()
            for op in ("set", "get"):
                started = time.monotonic()
                try:
                    if op == "set":
                        await gw2.stub.Set(
                            pb.SetRequest(key=key, value=value), timeout=HEALTHY_DEADLINE
                        )
                        outcome = "OK"
                    else:
                        got = await gw2.stub.Get(pb.GetRequest(key=key), timeout=HEALTHY_DEADLINE)
                        outcome = "OK" if got.value == value else f"read {got.value!r}"
                except grpc.aio.AioRpcError as exc:
                    outcome = f"{op} {key}: {exc.code().name} {exc.details()}"
                healthy.append((outcome, time.monotonic() - started))
            await asyncio.sleep(0.005)

    async def cut_calls(until: float) -> None:
        for n in range(1_000):
            if time.monotonic() > until:
                return
            key = cold_cut[n % len(cold_cut)]
            for call in (
                gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE),
                gw2.stub.Set(pb.SetRequest(key=key, value=b"x"), timeout=DEADLINE),
            ):
                code, took, details = await degraded(call)
                assert code in DEGRADED, f"{key}: {code} {details}"
                assert took < DEADLINE + SLACK, f"{key}: took {took:.2f}s"
                on_cut_codes.append(code.name)
            for key in hot_cut:  # held in L1 (gw2's subscription is on another node)
                got = await gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
                assert (got.tier, got.value) == (pb.TIER_L1, b"v0"), key

    try:
        set_mode(proxies, "blackhole", [cut])
        until = time.monotonic() + 3.0  # a measurement window, not a wait for something
        await asyncio.gather(elsewhere_calls(until), cut_calls(until))
        set_mode(proxies, "pass", [cut])

        # Healed: the cut node's keys are written through gw2 again.
        async def writes_again() -> bool:
            await gw2.stub.Set(pb.SetRequest(key=cold_cut[0], value=b"v1"), timeout=DEADLINE)
            return True

        await poll(writes_again, within=10)
        got = await gw0.stub.Get(pb.GetRequest(key=cold_cut[0]), timeout=DEADLINE)
        assert got.value == b"v1"
    finally:
        stop.set()
        await asyncio.wait_for(steady, timeout=10)

    failed = [outcome for outcome, _ in healthy if outcome != "OK"]
    assert healthy and not failed, failed[:5]
    assert on_cut_codes
    assert load.calls > 0 and not load.failures, load.failures[:5]
    after = await stats(gw2)
    # Its subscription, on another primary, never dropped: L1 was not flushed.
    assert after.l1_flushes == before.l1_flushes
    assert all(gw.proc.proc.poll() is None for gw in gateways)
    took = sorted(t for _, t in healthy)
    print(
        f"\ncut off from one primary: gw2's {len(took)} calls to the other primaries took "
        f"p50 {statistics.median(took) * 1000:.1f} ms, "
        f"p99 {took[int(len(took) * 0.99)] * 1000:.0f} ms, max {took[-1] * 1000:.0f} ms; "
        f"{len(on_cut_codes)} calls on the cut node: "
        f"{ {c: on_cut_codes.count(c) for c in set(on_cut_codes)} }"
    )


# -- redirections ------------------------------------------------------------------------


def _errorstat(node: ManagedRedis, code: str) -> int:
    """How many `code` errors (ASK, MOVED) `node` has replied."""
    with redis.Redis(host="127.0.0.1", port=node.port) as c:
        info = c.info("errorstats")
    return int(dict(info.get(f"errorstat_{code}", {})).get("count", 0))


def _node_id(node: ManagedRedis) -> str:
    with redis.Redis(host="127.0.0.1", port=node.port, decode_responses=True) as c:
        return str(c.execute_command("CLUSTER", "MYID"))


def _empty_slot_key(cluster: ClusterTopology, node: ManagedRedis, stem: str) -> str:
    """A key in a slot `node` serves and that holds no key yet."""
    ranges = cluster.slots_of(node)
    with cluster.client(node) as c:
        for key in (f"{stem}:{i}" for i in range(10_000)):
            slot = key_slot(key.encode())
            mine = any(a <= slot <= b for a, b in ranges)
            if mine and c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0:
                return key
    raise AssertionError(f"no empty slot on {node}")


def _move_empty_slot(
    cluster: ClusterTopology, slot: int, source: ManagedRedis, target: ManagedRedis
) -> None:
    """Give an empty slot to `target`, telling every primary at once."""
    with cluster.client(target) as c:
        c.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", _node_id(source))
    with cluster.client(source) as c:
        c.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", _node_id(target))
    for node in cluster.primaries():
        with cluster.client(node) as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", _node_id(target))


async def test_redirections_follow_the_address_map(
    cluster: ClusterTopology, proxies: dict[int, TcpProxy], gateways: list[Gw], prefix: str
) -> None:
    """Slots moved from one primary to another, by hand. Once a slot moved, its old
    owner answers MOVED; while it moves, ASK for a key it does not hold. gw2 must follow
    both to the new owner's proxy, not to the address the cluster announced (redis-py
    alone went there for MOVED, and failed ASK with an AttributeError): proven by
    resetting that proxy, which must then fail gw2's call with UNAVAILABLE.

    An ASK followed with the proxy up is not asserted to succeed: redis-py 8.1's async
    cluster sends ASKING and the command on two pooled connections, so with more than
    one connection to the target it ping-pongs (ASK, MOVED) until "TTL exhausted",
    address map or not."""
    gw0, _, gw2 = gateways
    meta = meta_port(cluster, prefix)
    source, target = [n for n in cluster.primaries() if n.port != meta][:2]
    target_proxy = proxies[target.port]

    # Moved, while gw2's slot map (loaded at its start, never refreshed since: nothing
    # failed) still names the source, which answers MOVED.
    key = _empty_slot_key(cluster, source, "moved")
    _move_empty_slot(cluster, key_slot(key.encode()), source, target)
    moved = _errorstat(source, "MOVED")
    await gw2.stub.Set(pb.SetRequest(key=key, value=b"moved"), timeout=DEADLINE)
    assert _errorstat(source, "MOVED") > moved  # it was redirected, and followed
    got = await gw0.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
    assert got.value == b"moved"
    target_proxy.set_mode("reset")
    try:
        code, _, details = await degraded(
            gw2.stub.Set(pb.SetRequest(key=key, value=b"again"), timeout=DEADLINE)
        )
    finally:
        target_proxy.set_mode("pass")
    assert code == grpc.StatusCode.UNAVAILABLE, f"the MOVED went around the proxy: {details}"

    async def writes_again() -> bool:
        await gw2.stub.Set(pb.SetRequest(key=key, value=b"back"), timeout=DEADLINE)
        return True

    await poll(writes_again, within=10)

    # Migrating: the source answers ASK for keys it does not hold.
    key = _empty_slot_key(cluster, source, "asked")
    slot = key_slot(key.encode())
    with cluster.client(target) as c:
        c.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", _node_id(source))
    with cluster.client(source) as c:
        c.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", _node_id(target))
    try:
        asks = _errorstat(source, "ASK")
        target_proxy.set_mode("reset")
        try:
            code, _, details = await degraded(
                gw2.stub.Get(pb.GetRequest(key=key), timeout=DEADLINE)
            )
        finally:
            target_proxy.set_mode("pass")
        assert _errorstat(source, "ASK") > asks  # it was redirected
        assert code == grpc.StatusCode.UNAVAILABLE, f"the ASK was not followed: {details}"
    finally:
        for node in cluster.primaries():  # the slot is empty: done moving
            with cluster.client(node) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", _node_id(target))
    await asyncio.to_thread(cluster.wait_healthy)
