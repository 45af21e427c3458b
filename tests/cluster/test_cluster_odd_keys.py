"""Keys, tags and prefixes with hash-tag braces, glob characters and control characters on
a real Redis Cluster: every RPC on one key still runs in one slot (no CROSSSLOT), and a
prefix invalidation touches only cache keys, never the deployment's {meta} keys."""

from __future__ import annotations

from cachegw.v1 import cache_pb2 as pb
from tests.cluster.conftest import ClusterGateways
from tests.cluster_topology import ClusterTopology

ODD = ["{", "}", "{}", "}{", "{a}", "a{b}c", "{{}}", "}}", "\\", "\\}", "\x00{", "*{?}", "meta"]
CLASSES = """
[[classes]]
name = "product"
patterns = ["p*"]
"""


async def test_keys_with_braces_are_served_by_every_rpc(cluster_gateway: ClusterGateways) -> None:
    gw = await cluster_gateway()
    s = gw.stub
    for key in ODD:
        stored = await s.Set(pb.SetRequest(key=key, value=key.encode(), tags=[key]))
        assert stored.outcome == pb.SET_OUTCOME_STORED, key
        assert (await s.Incr(pb.IncrRequest(key=key, delta=2))).value == 2, key
        limit = pb.RateLimit(rate=5, period_ms=1000)
        assert (await s.Allow(pb.AllowRequest(key=key, limit=limit))).allowed, key
        assert (await s.Touch(pb.TouchRequest(key=key, ttl_ms=60_000))).touched, key
        assert (await s.Ttl(pb.TtlRequest(key=key))).exists, key
    gw.server.l1.clear()  # from Redis, not L1
    got = await s.GetMany(pb.GetManyRequest(keys=ODD))
    assert [r.value for r in got.results] == [k.encode() for k in ODD]
    # A lease on a missing key, released: the lease lives in the key's slot too.
    await s.Delete(pb.DeleteRequest(keys=["{lease}"]))
    leased = await s.Get(pb.GetRequest(key="{lease}", lease=True))
    assert leased.status == pb.STATUS_LEASED
    released = await s.ReleaseLease(
        pb.ReleaseLeaseRequest(key="{lease}", lease_token=leased.lease_token)
    )
    assert released.released
    # Tags with braces: each names its own values only.
    out = await s.Invalidate(pb.InvalidateRequest(tags=["{a}"]))
    assert out.removed == 1
    deleted = await s.DeleteMany(pb.DeleteManyRequest(keys=ODD))
    assert list(deleted.deleted) == [k != "{a}" for k in ODD]


async def test_prefix_invalidation_spares_the_meta_keys(
    cluster: ClusterTopology, cluster_gateway: ClusterGateways, prefix: str
) -> None:
    # <p>:{meta}:events and <p>:{meta}:gens start as a key "meta..." would: a SCAN for
    # prefix "m" used to delete them (the event history, the class generations).
    gw = await cluster_gateway(CLASSES)
    await gw.stub.Set(pb.SetRequest(key="p1", value=b"v"))
    await gw.stub.Invalidate(pb.InvalidateRequest(classes=["product"]))
    await gw.stub.Set(pb.SetRequest(key="meta:x", value=b"v"))
    await gw.stub.Set(pb.SetRequest(key="{mine}", value=b"v"))
    meta = [f"{prefix}:{{meta}}:events", f"{prefix}:{{meta}}:gens"]
    with cluster.cluster_client() as rc:
        assert all(rc.exists(k) for k in meta)
        gens_before = rc.hgetall(meta[1])
        for p in ("m", "me", "meta", "meta}", "{", "{m"):
            await gw.stub.Invalidate(pb.InvalidateRequest(prefixes=[p]))
        assert [bool(rc.exists(k)) for k in meta] == [True, True]
        assert rc.hgetall(meta[1]) == gens_before
    got = await gw.stub.GetMany(pb.GetManyRequest(keys=["meta:x", "{mine}"]))
    assert [r.status for r in got.results] == [pb.STATUS_MISS, pb.STATUS_MISS]
