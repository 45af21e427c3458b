"""The floor: the fastest a Python grpc.aio server can answer cachegw.v1 Get and GetMany.

The gateway answers an L1 hit with bytes encoded when the entry was cached (its raw-bytes
handlers skip protobuf objects on the way out). The floor does strictly less, with the
same grpc.aio server and the same kind of handlers:

- Get: a raw-bytes handler on both sides. The serialized GetRequest itself is the
  dictionary key (no parsing at all), the answer a GetResponse encoded once at Set time
  (status HIT, value, tier L1, version, key class). A request it has not seen (another
  encoding, more fields) is parsed once and answered from the per-key table.
- GetMany: the request is parsed by protobuf's C parser (the fastest way a Python server
  has to read 100 keys), and the answer is the per-key pre-encoded results joined:
  one dictionary lookup per key, one `bytes.join`, no response object.
- Set: stores a value and encodes its answers (built the ordinary way: not measured).

Every other method of the service answers UNIMPLEMENTED. Standard gRPC health is served
so harnesses wait for it like for the gateway.

Run: .venv/bin/python benchmarks/floor_server.py --listen 127.0.0.1:PORT
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # what grpc_health.v1.health.aio names

from cachegw.v1 import cache_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]

SERVICE = pb.DESCRIPTOR.services_by_name["CacheService"].full_name
KEY_CLASS = "default"
_RESULT_TAG = b"\x0a"  # GetManyResponse.results: field 1, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _result(answer: bytes) -> bytes:
    """One GetResponse as an element of GetManyResponse.results."""
    return _RESULT_TAG + _varint(len(answer)) + answer


MISS = pb.GetResponse(
    status=pb.STATUS_MISS, tier=pb.TIER_ORIGIN, key_class=KEY_CLASS
).SerializeToString()
MISS_RESULT = _result(MISS)


class Floor:
    """key -> pre-encoded answers; request bytes -> pre-encoded Get answer."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._answers: dict[str, bytes] = {}  # key -> encoded GetResponse
        self._results: dict[str, bytes] = {}  # key -> the same as a GetMany result
        self._by_request: dict[bytes, bytes] = {}  # serialized GetRequest -> answer

    async def get(self, request: bytes, context: Context) -> bytes:
        answer = self._by_request.get(request)
        if answer is not None:
            return answer
        try:
            key = pb.GetRequest.FromString(request).key
        except Exception:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a GetRequest")
        return self._answers.get(key, MISS)

    async def get_many(self, request: pb.GetManyRequest, context: Context) -> bytes:
        results = self._results
        return b"".join([results.get(k, MISS_RESULT) for k in request.keys])

    async def set(self, request: pb.SetRequest, context: Context) -> pb.SetResponse:
        key = request.key
        version = self._versions.get(key, 0) + 1
        self._versions[key] = version
        answer = pb.GetResponse(
            status=pb.STATUS_HIT,
            value=request.value,
            tier=pb.TIER_L1,
            version=version,
            key_class=KEY_CLASS,
        ).SerializeToString()
        self._answers[key] = answer
        self._results[key] = _result(answer)
        self._by_request[pb.GetRequest(key=key).SerializeToString()] = answer
        return pb.SetResponse(outcome=pb.SET_OUTCOME_STORED, version=version, key_class=KEY_CLASS)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            # No deserializer and no serializer: bytes in, bytes out.
            "Get": grpc.unary_unary_rpc_method_handler(self.get),
            "GetMany": grpc.unary_unary_rpc_method_handler(
                self.get_many,
                request_deserializer=pb.GetManyRequest.FromString,
            ),
            "Set": grpc.unary_unary_rpc_method_handler(
                self.set,
                request_deserializer=pb.SetRequest.FromString,
                response_serializer=pb.SetResponse.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def serve(listen: str) -> int:
    # The gateway's server options, so that only the handlers differ.
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    server.add_generic_rpc_handlers((Floor().handler(),))
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
