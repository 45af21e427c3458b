"""A misbehaving origin for the fault tests, run as its own process:

    python tests/origin/bad_origin.py --listen 127.0.0.1:PORT

It speaks cachegw.v1.Origin with raw handlers (no base class, which would refuse to send
such answers). Load behaves by the key's first segment, Store by the value:

    Load  ok:*          FOUND b"v:<key>", version 7        Store  b"refuse"    REFUSED
          gone:*        NOT_FOUND                                 b"conflict"  VERSION_CONFLICT 3
          slowok:*      FOUND after 0.6 s                         b"unavailable" UNAVAILABLE
          garbage:*     bytes that are no LoadResponse            b"slow"      sleeps 30 s
          unspecified:* a result without a status                 b"garbage"   not a response
          count:*       no results at all                         anything else STORED, version
          wrongkey:*    the result of another key                              1000 + n
          big:*         a 4 KiB value
          ttl:*         ttl_ms -5
          version:*     version 2^60
          tags:*        an empty tag
          slow:*        sleeps 30 s
          crash:*       the process exits at once (os._exit)
          unavailable:* UNAVAILABLE
          internal:*    INTERNAL

    Remove, by the key's first segment (any key of the call decides for all of it):
          unavailable:* UNAVAILABLE       slow:* sleeps 30 s      garbage:* not a response
          anything else removed, version 5000 + n

List is not implemented (the gateway gets UNIMPLEMENTED, as from any origin without it).

Every call is logged as the base class does (``origin Load: N keys: a, b``), flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import grpc

from cachegw.v1 import origin_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]
_stored = 0


def _log(method: str, keys: list[str]) -> None:
    print(f"origin {method}: {len(keys)} keys: {', '.join(keys)}", flush=True)


def _load_one(key: str) -> pb.LoadResult:
    kind = key.split(":", 1)[0]
    if kind == "gone":
        return pb.LoadResult(key=key, status=pb.LOAD_STATUS_NOT_FOUND)
    if kind == "unspecified":
        return pb.LoadResult(key=key, value=b"x")
    if kind == "wrongkey":
        return pb.LoadResult(key="someone-else", status=pb.LOAD_STATUS_FOUND, value=b"x")
    found = pb.LoadResult(key=key, status=pb.LOAD_STATUS_FOUND, value=b"v:" + key.encode())
    found.version = 7
    if kind == "big":
        found.value = b"b" * 4096
    elif kind == "ttl":
        found.ttl_ms = -5
    elif kind == "version":
        found.version = 2**60
    elif kind == "tags":
        found.tags.extend(["fine", ""])
    return found


async def load(raw: bytes, context: Context) -> bytes:
    keys = list(pb.LoadRequest.FromString(raw).keys)
    _log("Load", keys)
    kinds = {k.split(":", 1)[0] for k in keys}
    if "crash" in kinds:
        os._exit(3)
    if "slow" in kinds:
        await asyncio.sleep(30)
    if "slowok" in kinds:
        await asyncio.sleep(0.6)
    if "unavailable" in kinds:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the database is down")
    if "internal" in kinds:
        await context.abort(grpc.StatusCode.INTERNAL, "a bug in the origin")
    if "garbage" in kinds:
        return b"\xff\xfe\x00 not a LoadResponse"
    if "count" in kinds:
        return pb.LoadResponse().SerializeToString()
    return pb.LoadResponse(results=[_load_one(k) for k in keys]).SerializeToString()


async def store(raw: bytes, context: Context) -> bytes:
    global _stored
    entries = list(pb.StoreRequest.FromString(raw).entries)
    _log("Store", [e.key for e in entries])
    results = []
    for e in entries:
        if e.value == b"slow":
            await asyncio.sleep(30)
        if e.value == b"unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the database is down")
        if e.value == b"garbage":
            return b"\xff\xfe\x00 not a StoreResponse"
        if e.value == b"refuse":
            results.append(
                pb.StoreResult(key=e.key, outcome=pb.STORE_OUTCOME_REFUSED, message="not allowed")
            )
        elif e.value == b"conflict":
            results.append(
                pb.StoreResult(key=e.key, outcome=pb.STORE_OUTCOME_VERSION_CONFLICT, version=3)
            )
        else:
            _stored += 1
            results.append(
                pb.StoreResult(key=e.key, outcome=pb.STORE_OUTCOME_STORED, version=1000 + _stored)
            )
    return pb.StoreResponse(results=results).SerializeToString()


async def remove(raw: bytes, context: Context) -> bytes:
    global _stored
    keys = list(pb.RemoveRequest.FromString(raw).keys)
    _log("Remove", keys)
    kinds = {k.split(":", 1)[0] for k in keys}
    if "slow" in kinds:
        await asyncio.sleep(30)
    if "unavailable" in kinds:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the database is down")
    if "garbage" in kinds:
        return b"\xff\xfe\x00 not a RemoveResponse"
    results = []
    for key in keys:
        _stored += 1
        results.append(pb.RemoveResult(key=key, removed=True, version=5000 + _stored))
    return pb.RemoveResponse(results=results).SerializeToString()


async def main(listen: str) -> None:
    server = grpc.aio.server()
    handlers = {
        "Load": grpc.unary_unary_rpc_method_handler(load),
        "Store": grpc.unary_unary_rpc_method_handler(store),
        "Remove": grpc.unary_unary_rpc_method_handler(remove),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("cachegw.v1.Origin", handlers),)
    )
    if server.add_insecure_port(listen) == 0:
        sys.exit(f"cannot listen on {listen}")
    await server.start()
    print(f"bad origin serving on {listen}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    asyncio.run(main(parser.parse_args().listen))
