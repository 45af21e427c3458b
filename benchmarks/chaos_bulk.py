"""Loading a million keys fast, for the mass-invalidation routine.

Two ways, both writing exactly what a gateway's Set writes:

- `load_raw`: the gateway's own Set script (EVALSHA, with the keys and arguments
  `RedisStore` builds for a `SetCall`), pipelined over plain connections, commands packed
  and replies parsed by hiredis. redis-py's pipeline spends most of its time packing
  commands in Python (measured: 5-10k keys/s against 20-25k here on 2 cores).
- `load_rpc`: SetMany RPCs of `BATCH` entries through the gateways, several in flight:
  what a client can do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
import hiredis

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway import envelope
from cachegw_gateway.config import RedisConfig
from cachegw_gateway.l2 import RedisStore, SetCall, SetResult

BATCH = 1000  # SetMany entries per call (the default server.max_batch_keys)
RPCS = 6  # SetMany calls in flight
PIPELINE = 5000  # Set scripts per pipelined write
CONNECTIONS = 2  # raw connections loading at once
TTL_MS = 900_000
VALUE = b"bulk-value"


async def load_raw(
    host: str, port: int, url: str, prefix: str, keys: Sequence[str], key_class: str,
    tags: Sequence[str],
) -> int:  # fmt: skip
    """Write `keys` (of `key_class`, with `tags`) as new values; the failures."""
    store = RedisStore.from_config(RedisConfig(prefix=prefix, socket_timeout=60), url)
    try:
        await store.load_scripts()
        sha = store._set_script.sha  # the script a gateway runs for a Set
        gen = int(await store._client.get(store.gen_key(key_class)) or 0)
    finally:
        await store.close()
    batches = [keys[i : i + PIPELINE] for i in range(0, len(keys), PIPELINE)]
    todo = iter(batches)

    async def connection() -> int:
        failures = 0
        reader, writer = await asyncio.open_connection(host, port)
        parser = hiredis.Reader()
        try:
            for batch in todo:
                now_ms = time.time_ns() // 1_000_000
                tail = envelope.encode_tail(
                    VALUE, created_ms=now_ms, soft_expiry_ms=now_ms + TTL_MS, generation=gen,
                    tags=tags,
                )  # fmt: skip
                packed = []
                for key in batch:
                    call = SetCall(
                        key, tail, TTL_MS, key_class=key_class, lease_generation=gen,
                        tags=tags, expires_at_ms=now_ms + TTL_MS,
                    )  # fmt: skip
                    rkeys, args = store._set_keys_args(call, now_ms)
                    packed.append(hiredis.pack_command(("EVALSHA", sha, len(rkeys), *rkeys, *args)))
                writer.write(b"".join(packed))
                await writer.drain()
                answered = 0
                while answered < len(batch):
                    data = await reader.read(1 << 20)
                    if not data:
                        raise ConnectionError("redis closed the loading connection")
                    parser.feed(data)
                    while (reply := parser.gets()) is not False:
                        answered += 1
                        if isinstance(reply, hiredis.ReplyError) or not _stored(reply):
                            failures += 1
        finally:
            writer.close()
        return failures

    return sum(await asyncio.gather(*(connection() for _ in range(CONNECTIONS))))


def _stored(reply: object) -> bool:
    try:
        return SetResult.from_reply(reply).stored
    except (TypeError, ValueError, IndexError):
        return False


async def load_rpc(
    stubs: Sequence[cache_pb2_grpc.CacheServiceAsyncStub], keys: Sequence[str],
    tags: Sequence[str],
) -> int:  # fmt: skip
    """SetMany in batches of BATCH, RPCS in flight over `stubs`; the failures."""
    todo = iter(enumerate(range(0, len(keys), BATCH)))
    failures = 0

    async def loader() -> None:
        nonlocal failures
        for n, start in todo:
            batch = keys[start : start + BATCH]
            request = pb.SetManyRequest(
                entries=[pb.SetRequest(key=k, value=VALUE, tags=tags) for k in batch]
            )
            try:
                reply = await stubs[n % len(stubs)].SetMany(request, timeout=60)
                failures += sum(1 for x in reply.results if x.code != 0)
            except grpc.aio.AioRpcError:
                failures += len(batch)

    await asyncio.gather(*(loader() for _ in range(RPCS)))
    return failures
