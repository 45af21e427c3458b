"""A circuit breaker per primary on a Redis Cluster, and a write whose reply was lost.

The gateway's store reaches one primary through a TCP proxy (redis-py's address_remap:
the slot map names the node, the client connects to the proxy), so that node can be cut
off from this client alone while the cluster itself stays healthy: no failover, the
other nodes unaffected. The breaker of the cut node opens; its keys are refused at once
(nothing sent); every other node's keys are read and written as before; the probe
closes it once the node answers again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cachegw_gateway import envelope, events
from cachegw_gateway.breaker import CLOSED, OPEN, BreakerOpen
from cachegw_gateway.config import BreakerConfig
from cachegw_gateway.l2 import L2Unavailable, SetCall, SetResult
from cachegw_gateway.l2_cluster import ClusterStore
from cachegw_gateway.managed_redis import ManagedRedis
from cachegw_gateway.stats import GatewayStats
from tests.cluster_topology import ClusterTopology
from tests.faults import ReplyDropper
from tests.tcpproxy import TcpProxy

BREAKER = BreakerConfig(failures=2, failure_rate=0.0, cooldown_seconds=0.3)
KEYS = [f"k{i}" for i in range(40)]


def _remap(port: int, to: int) -> Callable[[tuple[str, int]], tuple[str, int]]:
    def remap(address: tuple[str, int]) -> tuple[str, int]:
        return ("127.0.0.1", to) if address[1] == port else address

    return remap


@asynccontextmanager
async def _store(
    cluster: ClusterTopology,
    prefix: str,
    remap: Callable[[tuple[str, int]], tuple[str, int]],
    *,
    socket_timeout: float = 0.3,
) -> AsyncIterator[ClusterStore]:
    client = RedisCluster(
        startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in cluster.primaries()],
        retry=Retry(NoBackoff(), 0),
        require_full_coverage=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        address_remap=remap,
    )
    store = ClusterStore(client, prefix, GatewayStats(), breaker=BREAKER)
    try:
        await store.load_scripts()
        yield store
    finally:
        await store.close()


def _split(
    cluster: ClusterTopology, prefix: str, node: ManagedRedis
) -> tuple[list[str], list[str]]:
    """KEYS on `node`, and the others."""
    on = [k for k in KEYS if cluster.node_of_key(f"{prefix}:{{{k}}}") is node]
    return on, [k for k in KEYS if k not in on]


def _set(key: str, value: bytes, event: bytes = b"") -> SetCall:
    tail = envelope.encode_tail(value, created_ms=time.time_ns() // 1_000_000)
    return SetCall(key=key, tail=tail, px_ms=60_000, key_class="c", event=event)


async def test_a_cut_primary_fails_fast_and_the_other_nodes_serve(
    cluster: ClusterTopology, prefix: str
) -> None:
    meta = cluster.node_of_key(f"{prefix}:{{meta}}:gens")
    cut = next(n for n in cluster.primaries() if n is not meta)
    on_cut, elsewhere = _split(cluster, prefix, cut)
    assert on_cut and elsewhere
    with TcpProxy("127.0.0.1", cut.port) as proxy:
        async with _store(cluster, prefix, _remap(cut.port, proxy.port)) as store:
            stats = store.stats
            node = f"127.0.0.1:{proxy.port}"  # redis-py names a node by where it connects
            for result in await store.set_many([_set(k, b"v") for k in KEYS]):
                assert isinstance(result, SetResult) and result.stored
            assert stats.breaker_state == CLOSED and not stats.breaker_nodes

            proxy.set_mode("blackhole")
            for _ in range(BREAKER.failures):  # each waits for its socket timeout
                try:
                    await store.read([on_cut[0]], ["c"])
                except BreakerOpen:
                    raise AssertionError("refused before the failures were counted") from None
                except L2Unavailable:
                    pass
                else:
                    raise AssertionError("a read through the blackhole was answered")
            assert stats.breaker_nodes == {node: OPEN}
            assert stats.breaker_state == OPEN
            trips = stats.breaker_trips

            # The cut node's keys are refused at once, alone or in a batch: nothing sent
            # (BreakerOpen is raised before a call goes out; the proxy still sees the
            # store's background re-reads of the slot map, so its bytes prove nothing).
            for keys in ([on_cut[0]], on_cut, KEYS):
                try:
                    await store.read(keys, ["c"])
                except BreakerOpen as exc:
                    assert node in str(exc)
                else:
                    raise AssertionError(f"{keys} read with the node's breaker open")
            # Every other node's keys: read and written as if nothing happened.
            found, _ = await store.read(elsewhere, ["c"])
            assert all(e is not None for e in found)
            results = await store.set_many([_set(k, b"w") for k in KEYS])
            for key, result in zip(KEYS, results, strict=True):
                if key in on_cut:
                    assert isinstance(result, BreakerOpen), (key, result)
                else:
                    assert isinstance(result, SetResult) and result.stored, (key, result)
            assert (await store.set(_set(elsewhere[0], b"x"))).stored
            assert stats.breaker_trips == trips  # refusals are not failures

            # The node answers again: past the cool-down, the health probe closes it.
            proxy.set_mode("pass")
            await asyncio.sleep(BREAKER.cooldown_seconds)
            assert await store.ping()
            assert stats.breaker_state == CLOSED and not stats.breaker_nodes
            found, _ = await store.read(on_cut, ["c"])
            assert all(e is not None for e in found)


async def test_a_cluster_set_whose_reply_was_lost_still_publishes_its_event(
    cluster: ClusterTopology, prefix: str
) -> None:
    """The value script ran, its reply never came: the write may have been applied, so
    its event goes out all the same (on one Redis the script publishes it itself)."""
    meta = cluster.node_of_key(f"{prefix}:{{meta}}:events")
    node = next(n for n in cluster.primaries() if n is not meta)
    key = _split(cluster, prefix, node)[0][0]
    async with (
        ReplyDropper("127.0.0.1", node.port) as dropper,
        _store(cluster, prefix, _remap(node.port, dropper.port), socket_timeout=2.0) as store,
    ):
        assert (await store.set(_set(key, b"old"))).stored
        event = events.make(origin="gw", keys=[key]).SerializeToString()
        dropper.drop_reply_to(b"new-value")
        try:
            await store.set(_set(key, b"new-value", event))
        except L2Unavailable as exc:
            assert "may or may not" in str(exc) or exc.kind in ("connection", "timeout")
        else:
            raise AssertionError("the Set was answered although its reply was dropped")
        assert dropper.dropped == 1
    direct = redis.Redis(port=meta.port)
    try:
        stream = direct.xrange(f"{prefix}:{{meta}}:events") or []
        assert len(stream) == 1, stream
        assert (stream[0][1] or {})[b"e"] == event
    finally:
        direct.close()
    spread = cluster.cluster_client()
    try:
        assert spread.get(f"{prefix}:{{{key}}}") is not None  # applied: the value is there
    finally:
        spread.close()
