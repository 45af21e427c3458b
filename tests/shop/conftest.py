"""The shop example's fixtures: one throwaway PostgreSQL per module (reseeded with a small
catalog for each test), and the API in any mode, called in-process through httpx's ASGI
transport; in the cachegw mode a real gateway (in this event loop) whose read-through
classes load from the shop's origin, served on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from cachegw_gateway.managed_redis import ManagedRedis
from shop import services
from shop.app import create_app
from shop.db import Counters, Database
from shop.modes import Catalog
from shop.modes.gateway import GatewayCatalog
from shop.modes.rediscache import RedisCatalog
from shop.origin import ShopOrigin
from tests.conftest import GatewayFactory

PRODUCTS = 200  # 20 categories of about 10


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    with services.managed_postgres() as pg:
        yield pg.dsn


@dataclass
class Shop:
    http: httpx.AsyncClient
    catalog: Catalog
    db: Database
    gateway: str = ""  # cachegw mode: the gateway's address

    @property
    def loads(self) -> Counters:
        return self.db.counters


ShopFactory = Callable[..., Coroutine[Any, Any, Shop]]


@pytest.fixture
async def make_shop(
    pg_dsn: str, redis_server: ManagedRedis, gateway_factory: GatewayFactory
) -> AsyncIterator[ShopFactory]:
    """make_shop(mode, gateway=None, seed=True) -> Shop. In the cachegw mode `gateway`
    names one to use (e.g. an unreachable address); by default a fresh one is started."""
    closers: list[Callable[[], Coroutine[Any, Any, None]]] = []

    async def make(mode: str, gateway: str | None = None, seed: bool = True) -> Shop:
        await services.prepare(pg_dsn, PRODUCTS, reseed=seed)
        pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=5)
        closers.append(pool.close)
        db = Database(pool, Counters())
        catalog: Catalog
        if mode == "none":
            catalog = Catalog(db)
        elif mode == "redis":
            catalog = RedisCatalog(db, redis_server.url)
        else:
            if gateway is None:
                origin = ShopOrigin(db)
                port = await origin.start("127.0.0.1:0")
                closers.append(lambda: origin.stop(0))
                gw = await gateway_factory(toml=services.gateway_config(f"127.0.0.1:{port}"))
                gateway = str(gw.address)
            catalog = GatewayCatalog(db, gateway)
        await catalog.start()
        closers.append(catalog.close)
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(catalog)), base_url="http://shop"
        )
        closers.append(http.aclose)
        return Shop(http, catalog, db, gateway or "")

    yield make
    for close in reversed(closers):
        await close()
