"""`cachegw top` against a real gateway: one frame rendered to text, and the command."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from rich.console import Console

from cachegw import top
from cachegw.v1 import cache_pb2 as pb
from cachegw.v1 import cache_pb2_grpc
from cachegw_gateway.managed_redis import ManagedRedis
from tests.conftest import BIN, GatewayFactory

CLASSES = '[[classes]]\nname = "catalog"\npatterns = ["catalog:*"]\n'


def _poll(targets: list[str]) -> list[top.Reading]:
    channels = [grpc.insecure_channel(t) for t in targets]
    try:
        stubs = {
            t: cache_pb2_grpc.CacheServiceStub(c) for t, c in zip(targets, channels, strict=True)
        }
        return top.poll(stubs, timeout=5, top_keys=3)
    finally:
        for channel in channels:
            channel.close()


async def test_one_frame_shows_the_gateway(
    gateway_factory: GatewayFactory, dead_address: str
) -> None:
    gw = await gateway_factory(CLASSES)
    down = dead_address
    for i in range(4):
        await gw.stub.Set(pb.SetRequest(key=f"catalog:{i}", value=b"v"))
    view = top.TopView([gw.address, down])
    view.update(await asyncio.to_thread(_poll, [gw.address, down]))
    for _ in range(3):  # 9 hits from L1, 1 miss, between the two polls
        for i in range(3):
            await gw.stub.Get(pb.GetRequest(key=f"catalog:{i}"))
    await gw.stub.Get(pb.GetRequest(key="catalog:none"))
    gw.server.hotkeys.add("catalog:1", 42)  # on top of the 3 reads the read path counted
    view.update(await asyncio.to_thread(_poll, [gw.address, down]))

    console = Console(record=True, width=220, color_system=None)
    console.print(view.render())
    text = console.export_text()
    gateway_id = gw.server.config.server.gateway_id
    row = next(line for line in text.splitlines() if gw.address in line)
    assert gateway_id in row
    assert "90.0" in row  # hit % over the window: 9 of 10 reads
    assert "up " in row and " ms" in row  # Redis answers, with its ping time
    assert "% of 256M" in row  # L1 bytes against its bound
    catalog = next(line for line in text.splitlines() if " catalog " in line)
    assert "90.0" in catalog  # the class's own hit rate, all from L1
    assert "catalog:1" in text and "45" in text  # hot keys
    down_row = next(line for line in text.splitlines() if down in line)
    assert "UNAVAILABLE" in down_row  # an unreachable gateway is a row, not a crash


async def test_the_top_command_prints_one_frame(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(CLASSES)
    await gw.stub.Set(pb.SetRequest(key="catalog:1", value=b"v"))
    await gw.stub.Get(pb.GetRequest(key="catalog:1"))
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "cachegw"), "top", gw.address, "--count", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"COLUMNS": "200", "PATH": str(BIN)},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "cachegw gateways" in text and "catalog" in text
    assert gw.server.config.server.gateway_id in text


def test_quantile_from_buckets() -> None:
    bounds = [1.0, 2.0, 4.0]
    assert top.quantile(bounds, [0, 10, 0, 0], 0.99) == 1.0 + 0.99
    assert top.quantile(bounds, [0, 0, 0, 5], 0.5) == 4.0  # the open bucket: its floor
    assert str(top.quantile(bounds, [0, 0, 0, 0], 0.5)) == "nan"


async def test_the_redis_cell_shows_an_open_breaker(
    gateway_factory: GatewayFactory, redis_server: ManagedRedis
) -> None:
    gw = await gateway_factory("[redis.breaker]\nfailures = 1\ncooldown_seconds = 600\n")
    await gw.stub.Set(pb.SetRequest(key="k", value=b"v"))
    view = top.TopView([gw.address])

    def row() -> str:
        console = Console(record=True, width=250, color_system=None)
        console.print(view.render())
        return next(line for line in console.export_text().splitlines() if gw.address in line)

    view.update(await asyncio.to_thread(_poll, [gw.address]))
    assert "breaker" not in row()
    redis_server.kill()
    with contextlib.suppress(grpc.aio.AioRpcError):  # a refused connection: it opens
        await gw.stub.Set(pb.SetRequest(key="k2", value=b"v"), timeout=5)
    view.update(await asyncio.to_thread(_poll, [gw.address]))
    assert "breaker OPEN" in row()
