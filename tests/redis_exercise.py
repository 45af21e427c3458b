"""Every RPC that touches Redis, once each, through one gateway: what a restricted Redis
ACL user must allow (tests/test_redis_acl.py) and what must leak no secret
(tests/test_redis_secrets.py)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc

TIMEOUT = 5.0


async def every_rpc(stub: cache_pb2_grpc.CacheServiceAsyncStub, prefix: str = "acl") -> None:
    """Calls each RPC with arguments that make it reach Redis; raises on any failure."""
    k = f"{prefix}:k"
    subscription: Any = stub.Subscribe(pb.SubscribeRequest(), timeout=30)
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        await asyncio.wait_for(subscription.initial_metadata(), TIMEOUT)
    await stub.Set(pb.SetRequest(key=k, value=b"v", tags=["t1"]), timeout=TIMEOUT)
    reply = await stub.Get(pb.GetRequest(key=f"{prefix}:other"), timeout=TIMEOUT)
    await stub.GetMany(pb.GetManyRequest(keys=[k, f"{prefix}:m"]), timeout=TIMEOUT)
    leased = await stub.Get(pb.GetRequest(key=f"{prefix}:leased", lease=True), timeout=TIMEOUT)
    if leased.lease_token:
        await stub.Set(
            pb.SetRequest(key=f"{prefix}:leased", value=b"x", lease_token=leased.lease_token),
            timeout=TIMEOUT,
        )
    other = await stub.Get(pb.GetRequest(key=f"{prefix}:leased2", lease=True), timeout=TIMEOUT)
    if other.lease_token:
        await stub.ReleaseLease(
            pb.ReleaseLeaseRequest(key=f"{prefix}:leased2", lease_token=other.lease_token),
            timeout=TIMEOUT,
        )
    await stub.SetMany(
        pb.SetManyRequest(entries=[pb.SetRequest(key=f"{prefix}:m", value=b"m")]), timeout=TIMEOUT
    )
    await stub.Set(pb.SetRequest(key=k, value=b"v2", if_version=1), timeout=TIMEOUT)
    await stub.Incr(pb.IncrRequest(key=f"{prefix}:n", delta=2, ttl_ms=60_000), timeout=TIMEOUT)
    await stub.Allow(
        pb.AllowRequest(key=f"{prefix}:rl", limit=pb.RateLimit(rate=10, period_ms=1000), cost=1),
        timeout=TIMEOUT,
    )
    await stub.Touch(pb.TouchRequest(key=k, ttl_ms=60_000), timeout=TIMEOUT)
    await stub.Ttl(pb.TtlRequest(key=k), timeout=TIMEOUT)
    await stub.Warmup(
        pb.WarmupRequest(
            keys=[k], entries=[pb.WarmupEntry(key=f"{prefix}:w", value=b"w")], hot_keys=True
        ),
        timeout=TIMEOUT,
    )
    await stub.Stats(pb.StatsRequest(), timeout=TIMEOUT)
    await stub.Invalidate(pb.InvalidateRequest(keys=[k]), timeout=TIMEOUT)
    await stub.Invalidate(pb.InvalidateRequest(tags=["t1"]), timeout=TIMEOUT)
    await stub.Invalidate(pb.InvalidateRequest(prefixes=[f"{prefix}:"]), timeout=TIMEOUT)
    await stub.Invalidate(pb.InvalidateRequest(classes=["default"]), timeout=TIMEOUT)
    await stub.Delete(pb.DeleteRequest(keys=[f"{prefix}:m"]), timeout=TIMEOUT)
    await stub.DeleteMany(pb.DeleteManyRequest(keys=[f"{prefix}:n"]), timeout=TIMEOUT)
    # Resume from the start of the audit stream: XRANGE/XREAD on the events key.
    resumed: Any = stub.Subscribe(pb.SubscribeRequest(since="0-0"), timeout=TIMEOUT)
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
        async with asyncio.timeout(2.0):
            async for _ in resumed:
                break
    resumed.cancel()
    subscription.cancel()
    assert reply is not None
