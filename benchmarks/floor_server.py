"""The floor: the cachegw.v1 CacheService as a bare grpc.aio server over a plain dict.

Get, GetMany and Set are served with ordinary generated messages (built per call, the
way any Python gRPC service would), nothing else is done per call. It is the fastest a
Python grpc.aio service can answer these calls, so the gateway's L1-hit path is measured
against it (benchmarks/bench_gateway.py). Standard gRPC health is served so harnesses
can wait for it like for the gateway.

Run: .venv/bin/python benchmarks/floor_server.py --listen 127.0.0.1:PORT
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # what grpc_health.v1.health.aio names

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

KEY_CLASS = "default"


class FloorServicer(cache_pb2_grpc.CacheServiceServicer):
    """Answers from a dict: key -> (value, version)."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, int]] = {}

    def _answer(self, key: str) -> pb.GetResponse:
        hit = self._data.get(key)
        if hit is None:
            return pb.GetResponse(status=pb.STATUS_MISS, tier=pb.TIER_ORIGIN, key_class=KEY_CLASS)
        value, version = hit
        return pb.GetResponse(
            status=pb.STATUS_HIT,
            value=value,
            tier=pb.TIER_L1,
            version=version,
            key_class=KEY_CLASS,
        )

    async def Get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        return self._answer(request.key)

    async def GetMany(self, request: pb.GetManyRequest, context: Context) -> pb.GetManyResponse:
        answer = self._answer
        return pb.GetManyResponse(results=[answer(k) for k in request.keys])

    async def Set(self, request: pb.SetRequest, context: Context) -> pb.SetResponse:
        old = self._data.get(request.key)
        version = 1 if old is None else old[1] + 1
        self._data[request.key] = (request.value, version)
        return pb.SetResponse(outcome=pb.SET_OUTCOME_STORED, version=version, key_class=KEY_CLASS)

    # The rest of the contract is not part of the floor.

    async def Delete(self, request: pb.DeleteRequest, context: Context) -> pb.DeleteResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served by the floor server")

    async def Invalidate(
        self, request: pb.InvalidateRequest, context: Context
    ) -> pb.InvalidateResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served by the floor server")

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: Context
    ) -> AsyncIterator[pb.InvalidationEvent]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served by the floor server")
        yield pb.InvalidationEvent()  # pragma: no cover - makes this an async generator

    async def Warmup(self, request: pb.WarmupRequest, context: Context) -> pb.WarmupResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served by the floor server")

    async def Stats(self, request: pb.StatsRequest, context: Context) -> pb.StatsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served by the floor server")


async def serve(listen: str) -> int:
    server = grpc.aio.server()
    cache_pb2_grpc.add_CacheServiceServicer_to_server(FloorServicer(), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0:
        print(f"floor_server: cannot listen on {listen}", file=sys.stderr)
        return 1
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    print(f"floor_server: serving on {listen}", flush=True)
    await stopping.wait()
    await server.stop(0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--listen", default="127.0.0.1:50061", help="host:port (loopback only)")
    args = p.parse_args(argv)
    return asyncio.run(serve(args.listen))


if __name__ == "__main__":
    sys.exit(main())
