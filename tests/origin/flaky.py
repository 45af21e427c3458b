"""The flaky origin (flaky_origin.py) as a fixture: its process, its mode, its rows."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw.v1 import origin_pb2 as opb
from tests.origin.conftest import OriginProcess, start_origin

FLAKY_ORIGIN = str(Path(__file__).with_name("flaky_origin.py"))
_LOAD = re.compile(r"origin Load: (\d+) keys")


@dataclass
class Flaky:
    process: OriginProcess
    mode_file: Path

    @property
    def address(self) -> str:
        return self.process.address

    def mode(self, text: str) -> None:
        """The origin's behaviour from its next Load on ("ok", "down", "slow 1.5")."""
        tmp = self.mode_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.mode_file)  # whole: a Load never reads half a mode

    def loads(self, key: str | None = None) -> int:
        return self.process.loads(key)

    def keys_loaded(self) -> int:
        """Keys named by every Load so far (a Load's log line shows only 5 of them)."""
        return sum(int(m.group(1)) for m in _LOAD.finditer(self.process.output()))

    def overlaps(self) -> list[str]:
        return [ln for ln in self.process.output().splitlines() if "origin overlap: " in ln]

    async def store(self, key: str, value: bytes) -> int:
        """Write a row as the data's owner would (not through a gateway); its version."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            call = channel.unary_unary(
                "/cachegw.v1.Origin/Store",
                request_serializer=opb.StoreRequest.SerializeToString,
                response_deserializer=opb.StoreResponse.FromString,
            )
            answer = await call(
                opb.StoreRequest(entries=[opb.StoreEntry(key=key, value=value)]), timeout=5
            )
        assert answer.results[0].outcome == opb.STORE_OUTCOME_STORED
        return int(answer.results[0].version)


@pytest.fixture
def flaky(tmp_path: Path) -> Iterator[Flaky]:
    mode_file = tmp_path / "origin-mode"
    process = start_origin([FLAKY_ORIGIN, "--mode-file", str(mode_file)], tmp_path, "flaky")
    yield Flaky(process, mode_file)
    process.stop(signal.SIGKILL)


async def until(check: Callable[[], object], what: str, within: float = 15.0) -> None:
    """Bounded polling (checks may be sync or return an awaitable)."""
    deadline = time.monotonic() + within
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {within}s: {what}")
        await asyncio.sleep(0.02)


async def class_stats(
    stub: cache_pb2_grpc.CacheServiceStub | cache_pb2_grpc.CacheServiceAsyncStub, name: str
) -> pb.ClassStats:
    reply: pb.StatsResponse = await stub.Stats(pb.StatsRequest(classes=[name]))  # type: ignore[misc]
    return reply.classes[0]


def pttl(redis_client: redis.Redis, key: str) -> int:
    return int(redis_client.pttl(f"cg:{{{key}}}"))


async def past_fresh_life(redis_client: redis.Redis, key: str, keep_ms: int) -> None:
    """Until `key`'s Redis entry is past its fresh life (only kept for fail-safe)."""
    await until(lambda: 0 < pttl(redis_client, key) <= keep_ms, f"{key} past its fresh life")
