"""Write-behind on a real Redis Cluster: every journal script touches one slot (the shard's
hash tag), the shards of a class spread over the primaries, and the writes reach the
example origin over PostgreSQL as on one Redis."""

from __future__ import annotations

from functools import partial

import asyncpg

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.l2_cluster import ClusterStore
from tests.cluster.conftest import ClusterGateways
from tests.origin.conftest import OriginProcess, db, pg, pg_origin  # noqa: F401
from tests.origin.test_write_behind import figures, until, wb_toml, written

SHARDS = 2  # as wb_toml


async def test_write_behind_on_a_cluster_reaches_the_origin(
    cluster_gateway: ClusterGateways,
    pg_origin: OriginProcess,  # noqa: F811
    db: asyncpg.Connection,  # noqa: F811
) -> None:
    gw = await cluster_gateway(
        wb_toml(pg_origin.address).replace("shards = 2", "shards = 8"), server__gateway_id="c"
    )
    store = gw.server.store
    assert isinstance(store, ClusterStore)
    journals = [s.journal for s in gw.server.journal.shards_of("items")]
    nodes = {store._node_of(j) for j in journals}
    assert len(nodes) >= 2  # the shards spread over the primaries
    keys = [f"wb:c:{i}" for i in range(60)]
    last: dict[str, int] = {}
    for round_ in range(2):
        for key in keys:
            out = await gw.stub.Set(pb.SetRequest(key=key, value=b"%d" % round_))
            assert out.outcome == pb.SET_OUTCOME_STORED
            last[key] = out.version
    deleted = await gw.stub.Delete(pb.DeleteRequest(keys=keys[:5]))
    assert deleted.deleted == 5
    for key in keys[5:]:
        await until(partial(_is, db, key, (b"1", last[key])))
    for key in keys[:5]:
        await until(partial(_is, db, key, None))
        got = await gw.stub.Get(pb.GetRequest(key=key))
        assert got.status == pb.STATUS_NOT_FOUND

    async def drained() -> bool:
        s = await figures(gw)
        return s.wb_backlog == 0 and s.wb_flushed == 125

    await until(drained)
    assert sum([int(await store.client.xlen(j)) for j in journals]) == 0


async def _is(db: asyncpg.Connection, key: str, want: tuple[bytes, int] | None) -> bool:  # noqa: F811
    return await written(db, key) == want
