"""A Redis restarted under a gateway: the connections idle in its pool died with the old
process. The first call to fail on one drops every idle one, so the calls after it
connect afresh instead of failing one by one on dead connections (a write that fails
is never sent again, so each such failure would reach a caller)."""

from __future__ import annotations

import asyncio

from cachegw.v1 import cache_pb2 as pb
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import RunningGateway

WRITERS = 16


async def _sets(gw: RunningGateway, tag: str) -> list[int]:
    replies = await asyncio.gather(
        *(
            gw.stub.Set(pb.SetRequest(key=f"{tag}:{i}", value=b"v"), timeout=5)
            for i in range(WRITERS)
        ),
        return_exceptions=True,
    )
    return [i for i, r in enumerate(replies) if isinstance(r, BaseException)]


async def test_writes_after_a_redis_restart_do_not_fail_on_dead_idle_connections(
    gateway: RunningGateway, redis_server: ManagedRedis
) -> None:
    assert await _sets(gateway, "before") == []  # the pool now holds many connections
    await asyncio.to_thread(redis_server.restart)
    # One read: it fails on a dead connection, is sent once more (reads are), and its
    # failure drops the other idle connections.
    got = await gateway.stub.Get(pb.GetRequest(key="before:0"), timeout=5)
    assert got.status == pb.STATUS_MISS  # the restarted Redis is empty
    assert await _sets(gateway, "after") == []
