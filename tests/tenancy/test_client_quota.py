"""What a client sees over a tenant's quota: ResourceExhausted naming the tenant, with the
gateway's retry delay as `retry_after_ms` (sync and asyncio clients), and a call that
succeeds once it has waited that long."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cachegw import AsyncClient, Client, ResourceExhausted
from tests.conftest import GatewayFactory
from tests.tenancy.test_isolation import TOKENS, auth_toml, tokens_file

QUOTA = '[[tenant]]\nname = "alpha"\nrequests_per_second = 2\nburst = 2\n'


async def test_async_client_gets_the_retry_delay(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    gw = await gateway_factory(auth_toml(tokens_file(tmp_path), QUOTA))
    async with AsyncClient(gw.address, token=TOKENS["alpha"], batch_gets=False) as client:
        await client.set("k", b"v")
        await client.get("k")
        with pytest.raises(ResourceExhausted) as err:
            await client.get("k")
        assert "tenant alpha" in str(err.value)
        wait = err.value.retry_after_ms
        assert wait is not None and 0 < wait <= 1000
        await asyncio.sleep(wait / 1000 + 0.05)
        assert await client.get("k") == b"v"


async def test_sync_client_gets_the_retry_delay(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    gw = await gateway_factory(auth_toml(tokens_file(tmp_path), QUOTA))

    def calls() -> None:
        with Client(gw.address, token=TOKENS["alpha"]) as client:
            client.set("k", b"v")
            client.get("k")
            with pytest.raises(ResourceExhausted) as err:
                client.get("k")
            wait = err.value.retry_after_ms
            assert wait is not None and 0 < wait <= 1000
            time.sleep(wait / 1000 + 0.05)
            assert client.get("k") == b"v"

    await asyncio.to_thread(calls)
