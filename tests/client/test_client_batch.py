"""set_many, delete_many and conditional set from both clients, against a real gateway."""

from __future__ import annotations

import asyncio

import pytest

from cachegw import AsyncClient, Client, SetOutcome
from cachegw.errors import InvalidArgument
from tests.conftest import GatewayFactory


async def test_async_client_batch_writes_and_conditions(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()
    async with AsyncClient(gw.address) as client:
        first = await client.set("k", b"1", if_absent=True)
        again = await client.set("k", b"2", if_absent=True)
        assert (first.outcome, again.outcome) == (SetOutcome.STORED, SetOutcome.CONDITION_FAILED)
        assert (await client.set("nope", b"x", if_present=True)).outcome is (
            SetOutcome.CONDITION_FAILED
        )
        results = await client.set_many([("a", b"1"), ("b", "2", 30.0), ("k", b"3")], tags=["t"])
        assert [r.outcome for r in results] == [SetOutcome.STORED] * 3  # type: ignore[union-attr]
        assert 0 < results[1].ttl <= 30  # type: ignore[union-attr]
        assert await client.get_many(["a", "b", "k"]) == [b"1", b"2", b"3"]
        only_new = await client.set_many([("a", b"9"), ("c", b"9")], if_absent=True)
        assert [r.outcome for r in only_new] == [  # type: ignore[union-attr]
            SetOutcome.CONDITION_FAILED,
            SetOutcome.STORED,
        ]
        assert await client.delete_many(["a", "zz", "c"]) == [True, False, True]
        with pytest.raises(InvalidArgument):
            await client.set("k", b"v", if_absent=True, if_present=True)


async def test_sync_client_batch_writes(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory()

    def run() -> tuple[list[object], list[bool]]:
        with Client(gw.address) as client:
            results = client.set_many([("s:1", b"1"), ("s:2", b"2")])
            return list(results), client.delete_many(["s:1", "s:3"])

    results, deleted = await asyncio.to_thread(run)
    assert [getattr(r, "outcome", None) for r in results] == [SetOutcome.STORED] * 2
    assert deleted == [True, False]
