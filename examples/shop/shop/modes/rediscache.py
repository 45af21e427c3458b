"""redis-py cache-aside exactly as the spec plans it: GET; on a miss query the database and
SET with a 5-minute TTL; on create/update/delete DELETE the product's keys. No lease (every
concurrent miss queries), no negative caching, no handling of Redis errors (they fail the
request), listings left to their TTL. The keys and the JSON codec are the client
library's, so the comparison is about the caching, not about key or value formats."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as redis

from cachegw.serializers import DecodeError, JsonCodec
from shop import keys
from shop.db import Database, sku_of
from shop.modes.base import Catalog, ListingQuery, QuoteInput, Row

log = logging.getLogger("shop.redis")

TTL = 300


class RedisCatalog(Catalog):
    mode = "redis"
    cache_errors = (redis.RedisError,)

    def __init__(self, db: Database, redis_url: str) -> None:
        super().__init__(db)
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.codec = JsonCodec(schema=keys.FORMAT)

    async def close(self) -> None:
        await self.redis.aclose()

    async def _cached(self, key: str, load: Callable[[], Awaitable[Any]]) -> Any:
        raw = await self.redis.get(key)
        if isinstance(raw, bytes):  # redis-py answers bytes (no decode_responses)
            try:
                return self.codec.loads(raw)
            except DecodeError as exc:
                self.db.counters.decode_failures += 1
                log.warning("%r no longer decodes (%s): removed, a miss", key, exc)
                await self.redis.delete(key)
        value = await load()
        if value is not None:
            await self.redis.set(key, self.codec.dumps(value), ex=TTL)
        return value

    async def product(self, product_id: int) -> Row | None:
        row: Row | None = await self._cached(
            keys.product_key(id=product_id), lambda: super(RedisCatalog, self).product(product_id)
        )
        return row

    async def listing(self, query: ListingQuery) -> Row:
        result: Row = await self._cached(
            keys.listing_key.key(query.params()), lambda: super(RedisCatalog, self).listing(query)
        )
        return result

    async def price(self, sku: str) -> Row | None:
        row: Row | None = await self._cached(
            keys.price_key(sku=sku), lambda: super(RedisCatalog, self).price(sku)
        )
        return row

    async def inventory(self, sku: str) -> Row | None:
        row: Row | None = await self._cached(
            keys.inventory_key(sku=sku), lambda: super(RedisCatalog, self).inventory(sku)
        )
        return row

    async def quote(self, quote: QuoteInput) -> Row:
        result: Row = await self._cached(
            keys.quote_key.key(quote.params()), lambda: super(RedisCatalog, self).quote(quote)
        )
        return result

    async def product_written(self, before: Row | None, after: Row | None) -> None:
        row = after or before
        assert row is not None
        await self.redis.delete(
            keys.product_key(id=row["id"]),
            keys.price_key(sku=row["sku"]),
            keys.inventory_key(sku=sku_of(row["id"])),
        )

    async def inventory_written(self, row: Row) -> None:
        await self.redis.delete(keys.inventory_key(sku=row["sku"]))
