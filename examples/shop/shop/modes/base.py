"""What every mode answers, and the no-cache mode itself: each read is a query."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shop.db import Database


@dataclass(frozen=True)
class ListingQuery:
    category: int | None
    q: str | None
    sort: str
    page: int
    page_size: int

    def params(self) -> dict[str, object]:
        return {
            "category": self.category,
            "q": self.q,
            "sort": self.sort,
            "page": self.page,
            "page_size": self.page_size,
        }


@dataclass(frozen=True)
class QuoteInput:
    items: tuple[tuple[str, int], ...]
    region: str

    def params(self) -> dict[str, object]:
        return {"items": [list(i) for i in sorted(self.items)], "region": self.region}


Row = dict[str, Any]


class Catalog:
    """No cache: reads go to PostgreSQL; writes need no follow-up."""

    mode = "none"
    # Exceptions that mean the cache is unreachable and that this mode lets fail a request
    # (answered 503, not logged per request).
    cache_errors: tuple[type[Exception], ...] = ()

    def __init__(self, db: Database) -> None:
        self.db = db

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def product(self, product_id: int) -> Row | None:
        return await self.db.product(product_id)

    async def listing(self, query: ListingQuery) -> Row:
        return await self.db.listing(
            query.category, query.q, query.sort, query.page, query.page_size
        )

    async def price(self, sku: str) -> Row | None:
        return (await self.db.prices([sku])).get(sku)

    async def inventory(self, sku: str) -> Row | None:
        return (await self.db.inventories([sku])).get(sku)

    async def quote(self, quote: QuoteInput) -> Row:
        return await self.db.quote(list(quote.items), quote.region)

    async def product_written(self, before: Row | None, after: Row | None) -> None:
        """After a product's create (before None), update or delete (after None) committed."""

    async def inventory_written(self, row: Row) -> None:
        """After a stock change committed: the row as written, with its new version."""

    def stats(self) -> dict[str, Any]:
        return {}
