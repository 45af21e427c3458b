"""The shop as a cachegw origin: the gateway's read-through classes (product details,
prices, stock) load their misses here, in batches, straight from PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import asyncpg

from cachegw.origin import Found, Origin, OriginUnavailable
from cachegw.serializers import JsonCodec
from shop import keys
from shop.db import Database


class ShopOrigin(Origin):
    def __init__(self, db: Database) -> None:
        super().__init__()
        self.db = db
        self.codec = JsonCodec(schema=keys.FORMAT)

    async def load(self, names: Sequence[str]) -> Mapping[str, Found | None]:
        products: dict[int, str] = {}
        prices: dict[str, str] = {}
        stock: dict[str, str] = {}
        for name in names:
            if m := keys.PRODUCT.fullmatch(name):
                products[int(m.group(1))] = name
            elif m := keys.PRICE.fullmatch(name):
                prices[m.group(1)] = name
            elif m := keys.INVENTORY.fullmatch(name):
                stock[m.group(1)] = name
        found: dict[str, Found | None] = {}
        try:
            if products:
                for pid, row in (await self.db.products(list(products))).items():
                    found[products[pid]] = Found(
                        self.codec.dumps(row), version=row["version"], tags=[keys.product_tag(pid)]
                    )
            if prices:
                for sku, row in (await self.db.prices(list(prices))).items():
                    found[prices[sku]] = Found(self.codec.dumps(row), version=row["version"])
            if stock:
                for sku, row in (await self.db.inventories(list(stock))).items():
                    found[stock[sku]] = Found(self.codec.dumps(row), version=row["version"])
        except (asyncpg.exceptions.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise OriginUnavailable(f"PostgreSQL: {exc}") from exc
        return found
