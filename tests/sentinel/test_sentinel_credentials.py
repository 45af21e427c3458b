"""Credentials in a Sentinel URL reach the Redis nodes, and never a message or a log."""

from __future__ import annotations

import logging

import grpc
import pytest

from cachegw.v1 import cache_pb2 as pb
from tests.conftest import GatewayFactory
from tests.topology import SentinelTopology

PASSWORD = "s3cret/with@odd:chars"  # percent-encoded in the URL


async def test_the_password_reaches_the_nodes_and_stays_out_of_messages(
    gateway_factory: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with SentinelTopology(replicas=1, password=PASSWORD) as topo:
        assert "%2F" in topo.url and PASSWORD not in topo.url
        gw = await gateway_factory(redis_url=topo.url)
        await gw.stub.Set(pb.SetRequest(key="k", value=b"v"), timeout=5)
        assert (await gw.stub.Get(pb.GetRequest(key="k"), timeout=5)).value == b"v"
        with topo.node_client(topo.primary) as c:
            assert c.exists("cg:{k}") == 1

        wrong = topo.url.replace("s3cret", "WRONGsecret")
        bad = await gateway_factory(redis_url=wrong)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await bad.stub.Set(pb.SetRequest(key="k", value=b"x"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "WRONGPASS" in (info.value.details() or "")
        for text in (info.value.details() or "", caplog.text):
            assert "WRONGsecret" not in text and "s3cret" not in text
