"""`allow` on both clients and `cachegw allow`: argument checks and request building
(against the double), and end to end against real gateways and Redis."""

from __future__ import annotations

import pytest

from cachegw import AllowResult, AsyncClient, Client, InvalidArgument, _calls, cli
from cachegw.v1 import cache_pb2 as pb
from tests.client.conftest import Gateway
from tests.conftest import GatewayCluster, GatewayFactory

CLASSES = """
[[classes]]
name = "ratelimit"
patterns = ["rate:*"]
l1 = false
rate_limit = { rate = 2, period_seconds = 60 }
"""


async def test_allow_builds_the_request_and_decodes(
    any_client: AsyncClient, fake_gateway: Gateway
) -> None:
    result = await any_client.allow("k", rate=100, period=0.5, burst=20, cost=2, algorithm="gcra")
    assert result == AllowResult(True, 1, 0.0, 0.25, "default")
    assert result
    sent = fake_gateway.servicer.requests[-1]
    assert isinstance(sent, pb.AllowRequest)
    assert sent.limit == pb.RateLimit(
        rate=100, period_ms=500, burst=20, algorithm=pb.RATE_ALGORITHM_GCRA
    )
    assert sent.cost == 2
    refused = await any_client.allow("k", cost=4)
    assert not refused and refused.retry_after == 1.5
    sent = fake_gateway.servicer.requests[-1]
    assert isinstance(sent, pb.AllowRequest) and not sent.HasField("limit")
    await any_client.allow("k", rate=5, period=1, algorithm="sliding_window")
    sent = fake_gateway.servicer.requests[-1]
    assert isinstance(sent, pb.AllowRequest)
    assert sent.limit.algorithm == pb.RATE_ALGORITHM_SLIDING_WINDOW


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"rate": 5}, InvalidArgument, "rate and period go together"),
        ({"period": 1.0}, InvalidArgument, "rate and period go together"),
        ({"burst": 3}, InvalidArgument, "need rate and period"),
        ({"algorithm": "gcra"}, InvalidArgument, "need rate and period"),
        ({"rate": 0, "period": 1.0}, InvalidArgument, "rate must be a positive"),
        ({"rate": 5, "period": 0.0}, InvalidArgument, "period must be a positive"),
        ({"rate": 5, "period": 1.0, "algorithm": "leaky"}, InvalidArgument, "algorithm"),
        ({"cost": 0}, InvalidArgument, "cost must be a positive"),
        ({"cost": True}, TypeError, "cost must be an int"),
        ({"rate": 2.5, "period": 1.0}, TypeError, "rate must be an int"),
    ],
)
def test_allow_arguments_are_checked_locally(
    kwargs: dict[str, object], error: type[Exception], says: str
) -> None:
    args: dict[str, object] = {
        "rate": None,
        "period": None,
        "burst": None,
        "cost": 1,
        "algorithm": None,
    }
    args.update(kwargs)
    with pytest.raises(error, match=says):
        _calls.allow("k", **args)  # type: ignore[arg-type]


def test_sync_client_and_cli_against_a_gateway(
    gateway_cluster: GatewayCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    (gw,) = gateway_cluster(1, CLASSES)
    with Client(gw.address) as client:
        first = client.allow("k", rate=2, period=60)
        assert (first.allowed, first.remaining, first.key_class) == (True, 1, "default")
        assert client.allow("k", rate=2, period=60).allowed
        refused = client.allow("k", rate=2, period=60)
        assert not refused.allowed
        assert 29.0 < refused.retry_after <= 30.0  # one every 30 s
        # The class's named limit: 2 per minute, burst 2.
        assert [client.allow("rate:x").allowed for _ in range(3)] == [True, True, False]
        with pytest.raises(InvalidArgument, match="above the burst"):
            client.allow("k", rate=2, period=60, cost=3)
        with pytest.raises(InvalidArgument, match="no rate limit"):
            client.allow("k")  # the default class names no limit
    target = ["--target", gw.address]
    capsys.readouterr()
    assert cli.main([*target, "allow", "cli", "--rate", "1", "--period", "60"]) == 0
    assert capsys.readouterr().out.startswith("allowed remaining=0 ")
    assert cli.main([*target, "allow", "cli", "--rate", "1", "--period", "60"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("refused remaining=0 retry-after=") and "reset-after=" in out
    sliding = [*target, "allow", "win", "--rate", "1", "--period", "60", "--sliding"]
    assert cli.main(sliding) == 0
    assert cli.main(sliding) == 1
    assert cli.main([*target, "allow", "rate:cli"]) == 0  # the class's limit


async def test_async_client_against_a_gateway(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(CLASSES)
    async with AsyncClient(gw.address) as client:
        results = [await client.allow("rate:a") for _ in range(3)]
        assert [r.allowed for r in results] == [True, True, False]
        assert results[0].key_class == "ratelimit"
        assert 29.0 < results[2].retry_after <= 30.0
        ok = await client.allow("w", rate=3, period=60, cost=3, algorithm="sliding_window")
        assert ok.allowed and ok.remaining == 0
        assert not (await client.allow("w", rate=3, period=60, algorithm="sliding_window"))
