"""The HTTP API (Starlette): the catalog, stock, prices and quotes, whatever the mode."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shop.db import SORTS
from shop.modes import Catalog, ListingQuery, QuoteInput

log = logging.getLogger("shop.app")

MAX_PAGE_SIZE = 100
MAX_QUOTE_ITEMS = 50
MAX_TEXT = 2000


class BadRequest(Exception):
    pass


def json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def error(status: int, message: str) -> Response:
    return json({"error": message}, status)


def _int(value: str | None, name: str, default: int | None, low: int, high: int) -> int | None:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer (got {value!r})") from None
    if not low <= number <= high:
        raise BadRequest(f"{name} must be in [{low}, {high}] (got {number})")
    return number


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _product_fields(body: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    rules: dict[str, type] = {
        "name": str,
        "description": str,
        "category_id": int,
        "price_cents": int,
        "quantity": int,
    }
    unknown = set(body) - set(rules)
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    for name, kind in rules.items():
        if name in body:
            value = body[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise BadRequest(f"{name} must be {'a string' if kind is str else 'an integer'}")
            if isinstance(value, str) and not 0 < len(value) <= MAX_TEXT:
                raise BadRequest(f"{name} must be 1 to {MAX_TEXT} characters")
            if isinstance(value, int) and not 0 <= value < 2**31:
                raise BadRequest(f"{name} must be in [0, 2^31)")
    if creating:
        missing = {"name", "category_id", "price_cents"} - set(body)
        if missing:
            raise BadRequest(f"missing fields: {', '.join(sorted(missing))}")
    elif "quantity" in body:
        raise BadRequest("stock is changed with PUT /inventory/{sku}")
    return body


def create_app(
    catalog: Catalog, on_close: Callable[[], Awaitable[None]] | None = None
) -> Starlette:
    db = catalog.db

    async def product(request: Request) -> Response:
        product_id = int(request.path_params["product_id"])
        db.counters.reads["product"] += 1
        row = await catalog.product(product_id)
        return error(404, f"no product {product_id}") if row is None else json(row)

    async def products(request: Request) -> Response:
        p = request.query_params
        sort = p.get("sort") or "id"
        if sort not in SORTS:
            raise BadRequest(f"sort must be one of {', '.join(SORTS)} (got {sort!r})")
        q = p.get("q") or None
        if q is not None and len(q) > 100:
            raise BadRequest("q must be at most 100 characters")
        query = ListingQuery(
            category=_int(p.get("category"), "category", None, 1, 2**31 - 1),
            q=q,
            sort=sort,
            page=_int(p.get("page"), "page", 1, 1, 1000) or 1,
            page_size=_int(p.get("page_size"), "page_size", 20, 1, MAX_PAGE_SIZE) or 20,
        )
        db.counters.reads["listing"] += 1
        return json(await catalog.listing(query))

    async def create(request: Request) -> Response:
        fields = _product_fields(await _body(request), creating=True)
        wanted = request.path_params.get("product_id")
        try:
            row = await db.create_product(fields, None if wanted is None else int(wanted))
        except asyncpg.ForeignKeyViolationError:
            raise BadRequest(f"no category {fields['category_id']}") from None
        if row is None:
            return error(409, f"product {wanted} exists")
        await catalog.product_written(None, row)
        return json(row, 201)

    async def update(request: Request) -> Response:
        product_id = int(request.path_params["product_id"])
        fields = _product_fields(await _body(request), creating=False)
        try:
            changed = await db.update_product(product_id, fields)
        except asyncpg.ForeignKeyViolationError:
            raise BadRequest(f"no category {fields['category_id']}") from None
        if changed is None:
            return error(404, f"no product {product_id}")
        before, after = changed
        await catalog.product_written(before, after)
        return json(after)

    async def delete(request: Request) -> Response:
        product_id = int(request.path_params["product_id"])
        before = await db.delete_product(product_id)
        if before is None:
            return error(404, f"no product {product_id}")
        await catalog.product_written(before, None)
        return Response(status_code=204)

    async def inventory(request: Request) -> Response:
        sku = request.path_params["sku"]
        db.counters.reads["inventory"] += 1
        row = await catalog.inventory(sku)
        return error(404, f"no stock record for {sku}") if row is None else json(row)

    async def set_inventory(request: Request) -> Response:
        sku = request.path_params["sku"]
        body = await _body(request)
        quantity = body.get("quantity")
        if set(body) != {"quantity"} or not isinstance(quantity, int) or isinstance(quantity, bool):
            raise BadRequest('the body must be {"quantity": <integer>}')
        if not 0 <= quantity < 2**31:
            raise BadRequest("quantity must be in [0, 2^31)")
        row = await db.set_inventory(sku, quantity)
        if row is None:
            return error(404, f"no stock record for {sku}")
        await catalog.inventory_written(row)
        return json(row)

    async def price(request: Request) -> Response:
        sku = request.path_params["sku"]
        db.counters.reads["price"] += 1
        row = await catalog.price(sku)
        return error(404, f"no price for {sku}") if row is None else json(row)

    async def quote(request: Request) -> Response:
        body = await _body(request)
        items = body.get("items")
        region = body.get("region", "eu")
        if not isinstance(items, list) or not 0 < len(items) <= MAX_QUOTE_ITEMS:
            raise BadRequest(f"items must be a list of 1 to {MAX_QUOTE_ITEMS} {{sku, qty}}")
        if not isinstance(region, str) or not 0 < len(region) <= 20:
            raise BadRequest("region must be a short string")
        basket: dict[str, int] = {}
        for item in items:
            sku, qty = (item.get("sku"), item.get("qty")) if isinstance(item, dict) else (0, 0)
            if not isinstance(sku, str) or not isinstance(qty, int) or not 0 < qty <= 1000:
                raise BadRequest("each item must be {sku: string, qty: 1..1000}")
            basket[sku] = basket.get(sku, 0) + qty
        db.counters.reads["quote"] += 1
        return json(await catalog.quote(QuoteInput(tuple(sorted(basket.items())), region)))

    async def stats(request: Request) -> Response:
        ids = [int(i) for i in request.query_params.get("ids", "").split(",") if i.isdigit()]
        return json({"mode": catalog.mode, **db.counters.snapshot(ids), **catalog.stats()})

    async def health(request: Request) -> Response:
        return json({"mode": catalog.mode})

    async def bad_request(request: Request, exc: Exception) -> Response:
        return error(400, str(exc))

    async def cache_unavailable(request: Request, exc: Exception) -> Response:
        return error(503, f"the cache is unavailable: {type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await catalog.start()
        try:
            yield
        finally:
            await catalog.close()
            if on_close is not None:
                await on_close()

    return Starlette(
        routes=[
            Route("/products/{product_id:int}", product, methods=["GET"]),
            Route("/products/{product_id:int}", create, methods=["POST"]),
            Route("/products/{product_id:int}", update, methods=["PUT"]),
            Route("/products/{product_id:int}", delete, methods=["DELETE"]),
            Route("/products", products, methods=["GET"]),
            Route("/products", create, methods=["POST"]),
            Route("/inventory/{sku}", inventory, methods=["GET"]),
            Route("/inventory/{sku}", set_inventory, methods=["PUT"]),
            Route("/price/{sku}", price, methods=["GET"]),
            Route("/quote", quote, methods=["POST"]),
            Route("/_stats", stats, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={
            BadRequest: bad_request,
            **dict.fromkeys(catalog.cache_errors, cache_unavailable),
        },
        lifespan=lifespan,
    )
