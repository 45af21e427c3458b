"""incr, touch and ttl of both clients and the CLI, against a real gateway and Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis

from cachegw import AsyncClient, Client, FailedPrecondition, InvalidArgument, OutOfRange, cli
from tests.conftest import GatewayFactory

CLASSES = """
[[classes]]
name = "hits"
patterns = ["hits:*"]
ttl_seconds = 60
jitter = 0.0
"""


async def test_async_client_incr_touch_ttl(
    gateway_factory: GatewayFactory, redis_client: redis.Redis
) -> None:
    gw = await gateway_factory(CLASSES)
    async with AsyncClient(gw.address) as cache:
        assert await cache.incr("hits:a") == 1
        assert await cache.incr("hits:a", 41) == 42
        assert await cache.incr("hits:a", -50) == -8
        assert await cache.incr("hits:a", 0) == -8
        assert await cache.incr("hits:none", 0) == 0
        assert await cache.incr("hits:b", 1, ttl=2.5) == 1
        assert 0 < redis_client.pttl("cg:{hits:b}:n") <= 2_500

        assert await cache.ttl("hits:v") is None
        assert not await cache.touch("hits:v", ttl=5)
        await cache.set("hits:v", b"x", ttl=3)
        left = await cache.ttl("hits:v")
        assert left is not None and 2.0 < left <= 3.0
        assert await cache.touch("hits:v", ttl=30)
        left = await cache.ttl("hits:v")
        assert left is not None and 29.0 < left <= 30.0
        assert await cache.touch("hits:v")  # the class TTL
        left = await cache.ttl("hits:v")
        assert left is not None and 59.0 < left <= 60.0
        assert await cache.get("hits:v") == b"x"

        await cache.incr("hits:max", 2**63 - 1)
        with pytest.raises(OutOfRange, match="overflow"):
            await cache.incr("hits:max")
        redis_client.set("cg:{hits:text}:n", b"abc")
        with pytest.raises(FailedPrecondition, match="not a 64-bit integer"):
            await cache.incr("hits:text")


async def test_sync_client_incr_touch_ttl(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(CLASSES)

    def run() -> None:
        with Client(gw.address) as cache:
            assert cache.incr("hits:s", 3) == 3
            assert cache.incr("hits:s", -1) == 2
            assert cache.touch("hits:s", ttl=10)  # the counter alone
            assert cache.ttl("hits:s") is None  # ...is no value
            with pytest.raises(OutOfRange):
                cache.incr("hits:s", 2**63 - 1)

    await asyncio.to_thread(run)


def test_local_checks_never_reach_the_gateway() -> None:
    with Client("127.0.0.1:1") as cache:  # nothing listens there
        with pytest.raises(InvalidArgument, match="signed 64-bit"):
            cache.incr("k", 2**63)
        with pytest.raises(InvalidArgument, match="signed 64-bit"):
            cache.incr("k", -(2**63) - 1)
        with pytest.raises(TypeError):
            cache.incr("k", True)
        with pytest.raises(TypeError):
            cache.incr("k", 1.5)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            cache.incr("k", 1, ttl=0)
        with pytest.raises(InvalidArgument):
            cache.touch("k", ttl=-1)
        with pytest.raises(InvalidArgument):
            cache.ttl("")


async def test_cli_incr_touch_ttl(
    gateway_factory: GatewayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = await gateway_factory(CLASSES)
    target = ["--target", gw.address]

    async def main(*argv: str) -> int:
        return await asyncio.to_thread(cli.main, [*target, *argv])

    assert await main("incr", "hits:c") == 0
    assert capsys.readouterr().out == "1\n"
    assert await main("incr", "hits:c", "-5", "--ttl", "30") == 0
    assert capsys.readouterr().out == "-4\n"
    assert await main("ttl", "hits:c") == 1
    assert capsys.readouterr() == ("", "missing\n")
    assert await main("set", "hits:c", "v", "--ttl", "20") == 0
    capsys.readouterr()
    assert await main("touch", "hits:c", "--ttl", "40") == 0
    assert capsys.readouterr().out == "touched\n"
    assert await main("ttl", "hits:c") == 0
    assert 39.0 < float(capsys.readouterr().out) <= 40.0
    assert await main("touch", "hits:gone") == 1
    assert capsys.readouterr() == ("", "missing\n")
    assert await main("incr", "hits:c", "-9223372036854775808") == 1  # -4 + INT64_MIN
    assert "OutOfRange" in capsys.readouterr().err
