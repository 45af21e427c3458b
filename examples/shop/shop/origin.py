"""The shop as a cachegw origin: the gateway's read-through classes (product details,
prices, stock) load their misses here, in batches, straight from PostgreSQL; and the
gateway's warm rebuild (Warmup by prefix) lists the keys here, a page per query."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import asyncpg

from cachegw.origin import Found, Origin, OriginUnavailable
from cachegw.serializers import JsonCodec
from shop import keys
from shop.db import Database

# The keys the origin can list: each family's fixed head, and what follows it.
PRODUCT_HEAD = keys.product_key(id=0).removesuffix("0")
PRICE_HEAD = keys.price_key(sku="x").removesuffix("x")
INVENTORY_HEAD = keys.inventory_key(sku="x").removesuffix("x")
FAMILIES = (PRODUCT_HEAD, PRICE_HEAD, INVENTORY_HEAD)


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
                    found[products[pid]] = Found(self.codec.dumps(row), version=row["version"])
            if prices:
                for sku, row in (await self.db.prices(list(prices))).items():
                    found[prices[sku]] = Found(self.codec.dumps(row), version=row["version"])
            if stock:
                for sku, row in (await self.db.inventories(list(stock))).items():
                    found[stock[sku]] = Found(self.codec.dumps(row), version=row["version"])
        except (asyncpg.exceptions.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise OriginUnavailable(f"PostgreSQL: {exc}") from exc
        return found

    async def list_keys(self, prefix: str, limit: int, page_token: str) -> tuple[list[str], str]:
        """A page of the product, price and stock keys starting with `prefix`, family by
        family, each in its table's order. The token is "<family>:<the last id or sku>"."""
        limit = limit or 1000
        family, after = 0, ""
        if page_token:
            head, _, after = page_token.partition(":")
            if not head.isdigit() or int(head) >= len(FAMILIES):
                raise ValueError(f"page token {page_token!r} is not one this origin gave")
            family = int(head)
        try:
            for f in range(family, len(FAMILIES)):
                rest = _rest(FAMILIES[f], prefix)
                if rest is None:
                    continue
                start = after if f == family else ""
                page = await self._page(f, rest, start, limit)
                if len(page) == limit:
                    return page, f"{f}:{_last(page[-1])}"
                if page:  # this family is done: the next page starts with the next one
                    return page, f"{f + 1}:" if f + 1 < len(FAMILIES) else ""
        except (asyncpg.exceptions.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise OriginUnavailable(f"PostgreSQL: {exc}") from exc
        return [], ""

    async def _page(self, family: int, rest: str, after: str, limit: int) -> list[str]:
        if FAMILIES[family] == PRODUCT_HEAD:
            if rest and not rest.isdigit():
                return []
            ids = await self.db.product_ids(rest, int(after or 0), limit)
            return [keys.product_key(id=i) for i in ids]
        price = FAMILIES[family] == PRICE_HEAD
        table, key = ("prices", keys.price_key) if price else ("inventory", keys.inventory_key)
        return [key(sku=sku) for sku in await self.db.skus(table, rest, after, limit)]


def _rest(head: str, prefix: str) -> str | None:
    """What a key of this family must start with after its head to start with `prefix`
    ("" = every key), or None when none of them can."""
    if head.startswith(prefix):
        return ""
    if prefix.startswith(head):
        return prefix[len(head) :]
    return None


def _last(key: str) -> str:
    """The id or sku a key ends with (the next page starts after it)."""
    return key.rsplit("=", 1)[1][1:]
