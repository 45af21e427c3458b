"""Through cachegw, as the gateway is meant to be used:

- product details, prices and stock are read-through classes: the app just asks; on a
  miss the gateway loads from this app's origin (shop.origin), once across every caller
  and gateway, and caches "no such product" for an hour (a create replaces it);
- listing pages and quotes are cache-aside under the gateway's lease (one caller loads,
  the others wait for its value); a page is cached as the ids it shows (its rows come
  from the product cache) and tagged by where a change could move its ids
  (listing_tags), with a listing epoch closing the window a tag cannot see;
- every write commits in PostgreSQL first, then puts the committed row in the cache with
  its version (Set's origin_version: a slower writer or an older load cannot replace
  it) and invalidates what has no new row (keys and tags) on every gateway at once. A
  cache update the gateway could not take becomes an invalidation, kept and retried
  until it is;
- hot values are also kept in the client's near cache (in this process, no network), which
  the gateway's Subscribe stream keeps honest: every invalidation event evicts what it
  names, and a dropped stream empties it;
- when the gateway cannot be reached, each read is answered from PostgreSQL instead, so
  the API keeps working (more slowly) and says so in its counters;
- with `warm`, at start the whole catalog (products, prices, stock) is rebuilt from the
  origin by the gateway's Warmup (the origin lists the keys; the gateway loads what Redis
  lacks in batches, at its warm rate), resumed until done: no cold start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cachegw import AsyncClient, Entry, NearCache, Status
from cachegw.errors import CacheError, DeadlineExceeded, ResourceExhausted, Unavailable
from cachegw.serializers import JsonCodec, TypedCache
from shop import keys, listing_tags
from shop.db import Database
from shop.modes.base import Catalog, ListingQuery, QuoteInput, Row

log = logging.getLogger("shop.cachegw")

GATEWAY_DOWN = (Unavailable, DeadlineExceeded, ResourceExhausted)
# Stock and prices: a near copy lives no longer than the gateway's L1 copy of them (their
# classes' l1_ttl_seconds), the bound on serving one whose event was lost.
NEAR_CLASS_TTL = {"inventory": 2.0, "pricing": 2.0}
# Listing epochs: counters per scope, bumped by every change that alters its listings.
EPOCH_PREFIX = "epoch:listing:"
EPOCH_TTL = 86_400.0
# What a listing row shows of a product (db.Database.listing's columns).
LISTING_FIELDS = ("id", "sku", "name", "category_id", "price_cents", "version")
RETRY_INVALIDATIONS_EVERY = 0.2
# The keys a warm start rebuilds: every product, price and stock record.
WARM_PREFIXES = ("product:v1:", "price:v1:", "inventory:v1:")
WARM_CALL_SECONDS = 30.0  # one Warmup call's deadline (the gateway stops before it)
WARM_RETRY_SECONDS = 1.0  # after a failure (the gateway or the origin unreachable)


def _ids_only(page: Row) -> Row:
    """What the cache keeps of a listing page: the ids it shows, in order."""
    return {"ids": [item["id"] for item in page["items"]], "has_more": page["has_more"]}


@dataclass(frozen=True)
class _Build:
    """How a leased value is built and kept: `load(to_store)` reads it, `tags` and
    `stored` say what goes in the cache, and a stored value no longer `still_current`
    is removed again."""

    load: Callable[[bool], Awaitable[Row]]
    tags: Callable[[Row], list[str]]
    stored: Callable[[Row], Row]
    still_current: Callable[[Row], Awaitable[bool]]


class GatewayCatalog(Catalog):
    mode = "cachegw"

    def __init__(
        self,
        db: Database,
        target: str,
        *,
        timeout: float = 1.0,
        near_ttl: float = 60.0,
        warm: bool = False,
    ) -> None:
        super().__init__(db)
        self.target = target
        self.timeout = timeout
        self.near_ttl = near_ttl
        self.codec = JsonCodec(schema=keys.FORMAT)
        self._client: AsyncClient | None = None
        self._typed: TypedCache | None = None
        self._pending: list[tuple[list[str], list[str]]] = []  # invalidations to retry
        self._retrier: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.warm = warm
        self._warming: asyncio.Task[None] | None = None
        self.warm_state: dict[str, Any] = {"done": not warm}

    async def start(self) -> None:
        near = (
            NearCache(max_entries=50_000, ttl=self.near_ttl, class_ttl=NEAR_CLASS_TTL)
            if self.near_ttl > 0
            else None
        )
        self._client = AsyncClient(self.target, timeout=self.timeout, near_cache=near)
        self._typed = TypedCache(self._client, self.codec)
        self._retrier = asyncio.create_task(self._retry_invalidations())
        if self.warm:
            self._warming = asyncio.create_task(self.warm_catalog())

    async def warm_catalog(self) -> None:
        """Rebuild the catalog in the gateway from the origin, resuming until done (a
        failure is retried: loading is idempotent). Progress in `warm_state`."""
        started, resume = time.monotonic(), ""
        totals: dict[str, int] = {"origin_loaded": 0, "loaded": 0, "not_found": 0, "calls": 0}
        while True:
            try:
                got = await self.client.rebuild(
                    prefixes=WARM_PREFIXES, resume=resume, timeout=WARM_CALL_SECONDS
                )
            except CacheError as exc:
                self.warm_state = {"done": False, "error": str(exc), **totals}
                log.warning("warm start: %s (retrying)", exc)
                await asyncio.sleep(WARM_RETRY_SECONDS)
                continue
            totals["calls"] += 1
            for name in ("origin_loaded", "loaded", "not_found"):
                totals[name] += getattr(got, name)
            seconds = round(time.monotonic() - started, 1)
            self.warm_state = {"done": got.done, "seconds": seconds, "error": got.error, **totals}
            if got.done:
                log.info("warm start: done in %.1f s: %s", seconds, totals)
                return
            resume = got.resume
            if got.error:
                log.warning("warm start: %s (resuming)", got.error)
                await asyncio.sleep(WARM_RETRY_SECONDS)
            elif got.retry_after_ms:
                await asyncio.sleep(got.retry_after_ms / 1000)

    async def close(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warming
        if self._retrier is not None:
            self._retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrier
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        if self._client is not None:
            await self._client.close()

    @property
    def client(self) -> AsyncClient:
        assert self._client is not None, "start() first"
        return self._client

    @property
    def typed(self) -> TypedCache:
        assert self._typed is not None, "start() first"
        return self._typed

    def _fallback(self, what: str, exc: CacheError) -> None:
        self.db.counters.fallbacks += 1
        log.debug("gateway unreachable (%s): %s from PostgreSQL", exc, what)

    # -- read-through classes --------------------------------------------------------------

    async def _lookup(self, key: str, *, lease: bool = False) -> tuple[Entry | None, bytes | None]:
        """The near cache's copy (no entry), else the gateway's answer, which fills it."""
        near = self.client.near_cache
        if near is None:
            return await self.client.lookup(key, lease=lease), None
        value = near.get(key)
        if value is not None:
            return None, value
        ticket = near.ticket()
        entry = await self.client.lookup(key, lease=lease)
        if entry.value is not None and not entry.lease_token:
            near.fill(key, entry, ticket)
        return entry, entry.value

    async def _through(self, key: str, load: Callable[[], Awaitable[Row | None]]) -> Row | None:
        for _ in range(2):
            try:
                entry, value = await self._lookup(key)
            except GATEWAY_DOWN as exc:
                self._fallback(key, exc)
                return await load()
            if entry is not None and entry.status is Status.NOT_FOUND:
                return None
            if value is None:  # a MISS: the gateway could not load it in time
                return await load()
            row = await self.typed.decode(key, value)
            if row is not None:
                self.db.counters.decode_failures = self.typed.decode_failures
                return dict(row)
            self.db.counters.decode_failures = self.typed.decode_failures
        return await load()

    async def product(self, product_id: int) -> Row | None:
        return await self._through(
            keys.product_key(id=product_id), lambda: super(GatewayCatalog, self).product(product_id)
        )

    async def price(self, sku: str) -> Row | None:
        return await self._through(
            keys.price_key(sku=sku), lambda: super(GatewayCatalog, self).price(sku)
        )

    async def inventory(self, sku: str) -> Row | None:
        return await self._through(
            keys.inventory_key(sku=sku), lambda: super(GatewayCatalog, self).inventory(sku)
        )

    # -- cache-aside under the gateway's lease ----------------------------------------------

    async def listing(self, query: ListingQuery) -> Row:
        """A page, cached as the ids it shows and tagged by where the product after it
        sits (listing_tags); its rows come from the product cache, so a product's own
        change reaches every page that shows it without evicting one."""
        key = keys.listing_key.key(query.params())
        scope = listing_tags.scope(query.category)

        async def load(to_store: bool) -> Row:
            # A page to store reads its scope's epoch before the database (see below).
            epoch = await self._listing_epoch(scope) if to_store else None
            items, following = await self.db.listing_window(
                query.category, query.q, query.sort, query.page, query.page_size
            )
            return {
                **query.params(),
                "items": items,
                "has_more": following is not None,
                "_next": following,
                "_epoch": epoch,
            }

        def tags(page: Row) -> list[str]:
            return listing_tags.page_tags(query.category, query.q, query.sort, page["_next"])

        async def still_current(page: Row) -> bool:
            """No change of the scope's listings was made since the page was read (else
            its invalidation may have run before the page was stored, and missed it)."""
            return page["_epoch"] is not None and await self._listing_epoch(scope) == page["_epoch"]

        page: Row = await self._leased(key, _Build(load, tags, _ids_only, still_current))
        if "items" in page:  # built by this call from the database
            del page["_next"], page["_epoch"]
            return page
        ids = [int(i) for i in page["ids"]]
        rows = await self._products(ids)
        # A product deleted since the page was cached is left out (its delete evicted the
        # page everywhere; this copy was read just before).
        items = [{f: rows[i][f] for f in LISTING_FIELDS} for i in ids if i in rows]
        return {**query.params(), "items": items, "has_more": page["has_more"]}

    async def _products(self, ids: list[int]) -> dict[int, Row]:
        """Products by id: the near cache, then one GetMany (the gateway loads its misses
        from the origin in one batch); what neither answers, from PostgreSQL."""
        names = [keys.product_key(id=i) for i in ids]
        try:
            values = await self.client.get_many(names)
        except GATEWAY_DOWN as exc:
            self._fallback("listing rows", exc)
            return await self.db.products(ids)
        rows: dict[int, Row] = {}
        missing: list[int] = []
        for product_id, name, value in zip(ids, names, values, strict=True):
            row = None if value is None else await self.typed.decode(name, value)
            if row is None:
                missing.append(product_id)
            else:
                rows[product_id] = row
        self.db.counters.decode_failures = self.typed.decode_failures
        if missing:
            rows.update(await self.db.products(missing))
        return rows

    async def _leased(self, key: str, build: _Build) -> Row:
        """The lease protocol of get_or_load, with tags taken from the loaded value: the
        cached value (what `build.stored` keeps of a loaded one), or the loaded value."""
        load = build.load
        try:
            entry, value = await self._lookup(key, lease=True)
        except GATEWAY_DOWN as exc:
            self._fallback(key, exc)
            return await load(False)
        if value is not None:
            page = await self.typed.decode(key, value)
            self.db.counters.decode_failures = self.typed.decode_failures
            if page is not None:
                if entry is not None and entry.refresh and entry.lease_token:  # refresh early
                    task = asyncio.create_task(self._fill(key, build, entry.lease_token))
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
                return dict(page)
            return await load(False)
        assert entry is not None
        if entry.status is not Status.LEASED:  # waited for another loader in vain
            return await load(False)
        return await self._fill(key, build, entry.lease_token)

    async def _fill(self, key: str, build: _Build, token: bytes) -> Row:
        try:
            value = await build.load(True)
        except BaseException:
            with contextlib.suppress(CacheError):
                await self.client.release_lease(key, token)
            raise
        try:
            out = await self.client.set(
                key,
                self.codec.dumps(build.stored(value)),
                tags=build.tags(value),
                lease_token=token,
            )
            if not out.stored:  # invalidated meanwhile: the value may be old, keep it out
                await self.client.release_lease(key, token)
            elif not await build.still_current(value):
                await self._invalidate([key], [])
        except CacheError as exc:
            log.debug("could not store %r: %s", key, exc)
            await self._invalidate([key], [])  # stored or not, it must not stay
        return value

    async def quote(self, quote: QuoteInput) -> Row:
        key = keys.quote_key.key(quote.params())
        try:
            result: Row = await self.typed.get_or_load(
                key, lambda: super(GatewayCatalog, self).quote(quote)
            )
        except GATEWAY_DOWN as exc:
            self._fallback(key, exc)
            return await super().quote(quote)
        finally:
            self.db.counters.decode_failures = self.typed.decode_failures
        return result

    # -- writes: invalidate everywhere, retried until the gateway takes it --------------------

    async def product_written(self, before: Row | None, after: Row | None) -> None:
        """The committed row goes in the cache with its version (a slower writer or a load
        that read before the commit cannot replace it: Set's origin_version), so the next
        reads hit; a deletion, a new product's price and stock, and a changed price are
        invalidated; so are the listing pages the change can alter (listing_tags)."""
        row = after or before
        assert row is not None
        product_id, sku = row["id"], row["sku"]
        names: list[str] = []
        if before is None or after is None:  # created or deleted: its price and stock too
            names += [keys.price_key(sku=sku), keys.inventory_key(sku=sku)]
        elif before["price_cents"] != after["price_cents"]:
            names.append(keys.price_key(sku=sku))
        if after is None:
            names.append(keys.product_key(id=product_id))
        tags = listing_tags.change_tags(before, after)

        async def evict() -> None:
            scopes = sorted({tag.split(":")[1] for tag in tags})
            await asyncio.gather(*(self._bump_listing_epoch(scope) for scope in scopes))
            if names or tags:
                await self._invalidate(names, tags)

        # Independent: the new row, and what the change made stale (each one handles its
        # own failure), so they go at once.
        if after is None:
            await evict()
        else:
            await asyncio.gather(self._put(keys.product_key(id=product_id), after), evict())

    # A page built from rows read before a product change was committed, and stored after
    # the change's invalidation ran, would be missed by it (it was not in the tag's index
    # yet). So every change that alters listings first bumps its scopes' epochs (counters
    # in the gateway); a page build reads its scope's epoch before its query and again
    # once the page is stored, and removes the page if it moved.

    async def _listing_epoch(self, scope: str) -> int | None:
        """The scope's epoch; None when the gateway cannot say (the page is then not kept)."""
        try:
            return await self.client.incr(f"{EPOCH_PREFIX}{scope}", 0, ttl=EPOCH_TTL)
        except CacheError:
            return None

    async def _bump_listing_epoch(self, scope: str) -> None:
        try:
            await self.client.incr(f"{EPOCH_PREFIX}{scope}", 1, ttl=EPOCH_TTL)
        except CacheError as exc:
            # The gateway is unreachable: page builds cannot store either (and read None).
            log.debug("could not bump the listing epoch of %s: %s", scope, exc)

    async def inventory_written(self, row: Row) -> None:
        await self._put(keys.inventory_key(sku=row["sku"]), row)

    async def _put(self, key: str, row: Row) -> None:
        """Store a committed row with its database version. If the gateway cannot take it
        (or its answer is lost), the key is invalidated instead, retried until taken."""
        try:
            await self.client.set(key, self.codec.dumps(row), origin_version=int(row["version"]))
        except CacheError as exc:
            log.debug("could not store %r: %s; invalidating it instead", key, exc)
            await self._invalidate([key], [])

    async def _invalidate(self, names: list[str], tags: list[str]) -> None:
        try:
            await self.client.invalidate(names, tags=tags)
        except CacheError as exc:
            if not self._pending:  # once per outage, not once per write
                log.warning("invalidations kept for retry until the gateway takes them: %s", exc)
            self._pending.append((names, tags))

    async def _retry_invalidations(self) -> None:
        while True:
            await asyncio.sleep(RETRY_INVALIDATIONS_EVERY)
            while self._pending:
                names, tags = self._pending[0]
                try:
                    await self.client.invalidate(names, tags=tags)
                except CacheError:
                    break
                self._pending.pop(0)

    def stats(self) -> dict[str, Any]:
        return {"pending_invalidations": len(self._pending), "warm": self.warm_state}
