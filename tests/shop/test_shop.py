"""The shop example against a real PostgreSQL, in each mode: every endpoint answers the
same; in the cachegw mode listing pages follow product changes (rebuilding only those
whose ids moved), writes put the committed rows in the cache, missing
products are remembered, stock changes reach another gateway's readers, a value that no
longer decodes is a miss, an unreachable gateway leaves the API answering from the
database, and a warm start rebuilds the catalog in the gateway through the origin's
listing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cachegw import AsyncClient
from cachegw_gateway.managed_redis import free_port
from shop import keys
from shop.db import sku_of
from shop.modes.gateway import GatewayCatalog
from shop.origin import ShopOrigin
from tests.shop.conftest import PRODUCTS, Shop, ShopFactory

MODES = ["none", "redis", "cachegw"]


async def get(shop: Shop, path: str, status: int = 200, **params: Any) -> Any:
    r = await shop.http.get(path, params=params)
    assert r.status_code == status, r.text
    return r.json()


async def send(shop: Shop, method: str, path: str, body: Any, status: int = 200) -> Any:
    r = await shop.http.request(method, path, json=body)
    assert r.status_code == status, r.text
    return r.json() if r.content else None


@pytest.mark.parametrize("mode", MODES)
async def test_every_endpoint(make_shop: ShopFactory, mode: str) -> None:
    shop = await make_shop(mode)
    first = await get(shop, "/products/7")
    assert first["id"] == 7 and first["sku"] == "SKU-00000007" and first["price_cents"] > 0
    assert await get(shop, "/products/7") == first
    await get(shop, "/products/999999", 404)
    await get(shop, "/products/999999", 404)

    page = await get(shop, "/products", category=first["category_id"], sort="price", page_size=5)
    prices = [item["price_cents"] for item in page["items"]]
    assert prices == sorted(prices) and 0 < len(prices) <= 5
    assert all(item["category_id"] == first["category_id"] for item in page["items"])
    assert (
        await get(shop, "/products", category=first["category_id"], sort="price", page_size=5)
        == page
    )
    word = first["name"].split()[1]
    found = await get(shop, "/products", q=word, page_size=100)
    assert 7 in [item["id"] for item in found["items"]]
    assert all(word in item["name"] for item in found["items"])
    assert (await get(shop, "/products", page=2, page_size=10))["items"][0]["id"] == 11

    price = await get(shop, "/price/SKU-00000007")
    assert price["amount_cents"] == first["price_cents"]
    await get(shop, "/price/SKU-99999999", 404)
    stock = await get(shop, "/inventory/SKU-00000007")
    changed = await send(
        shop, "PUT", "/inventory/SKU-00000007", {"quantity": stock["quantity"] + 1}
    )
    assert changed["version"] > stock["version"]
    assert (await get(shop, "/inventory/SKU-00000007"))["quantity"] == stock["quantity"] + 1

    updated = await send(
        shop, "PUT", "/products/7", {"name": "renamed kettle", "price_cents": 1234}
    )
    assert updated["version"] > first["version"]
    assert (await get(shop, "/products/7"))["name"] == "renamed kettle"
    assert (await get(shop, "/price/SKU-00000007"))["amount_cents"] == 1234

    created = await send(
        shop, "POST", "/products", {"name": "new lamp", "category_id": 2, "price_cents": 500}, 201
    )
    assert (await get(shop, f"/products/{created['id']}"))["name"] == "new lamp"
    assert created["sku"] == sku_of(created["id"]) and created["price_cents"] == 500
    assert (await get(shop, f"/inventory/{created['sku']}"))["quantity"] == 0
    await send(shop, "PUT", f"/products/{created['id']}", {"category_id": 999}, 400)
    assert await get(shop, f"/products/{created['id']}") == created  # nothing half-applied
    await send(shop, "DELETE", f"/products/{created['id']}", None, 204)
    await get(shop, f"/products/{created['id']}", 404)
    await get(shop, f"/price/{created['sku']}", 404)
    await get(shop, f"/inventory/{created['sku']}", 404)
    big = await send(
        shop, "POST", "/products/123456789", {"name": "x", "category_id": 1, "price_cents": 1}, 201
    )
    assert big["sku"] == sku_of(123456789) == "SKU-123456789"
    await send(shop, "DELETE", "/products/123456789", None, 204)
    await send(shop, "DELETE", f"/products/{created['id']}", None, 404)

    body = {"items": [{"sku": "SKU-00000007", "qty": 2}, {"sku": "SKU-00000009", "qty": 1}]}
    quote = await send(shop, "POST", "/quote", body)
    assert (
        quote["subtotal_cents"]
        == 2 * 1234 + (await get(shop, "/price/SKU-00000009"))["amount_cents"]
    )
    assert await send(shop, "POST", "/quote", body) == quote


@pytest.mark.parametrize("mode", MODES)
async def test_bad_requests_are_400s(make_shop: ShopFactory, mode: str) -> None:
    shop = await make_shop(mode, seed=False)
    assert (await get(shop, "/products", 400, sort="random"))["error"].startswith("sort must be")
    await get(shop, "/products", 400, page_size=0)
    await get(shop, "/products", 400, category="x")
    await send(shop, "PUT", "/products/7", {"colour": "red"}, 400)
    await send(shop, "PUT", "/products/7", {"quantity": 3}, 400)
    await send(shop, "POST", "/products", {"name": "x", "category_id": 999, "price_cents": 1}, 400)
    await send(shop, "PUT", "/inventory/SKU-00000007", {"quantity": -1}, 400)
    await send(shop, "POST", "/quote", {"items": []}, 400)
    r = await shop.http.post("/quote", content=b"{not json")
    assert r.status_code == 400


async def test_listing_pages_follow_product_changes_and_only_rebuild_what_moved(
    make_shop: ShopFactory,
) -> None:
    shop = await make_shop("cachegw")
    product = await get(shop, "/products/7")
    category = product["category_id"]
    other = next(c for c in range(1, 21) if c != category)
    by_price = {"category": category, "sort": "price", "page_size": 100}
    pages = [by_price, {"category": category}, {}, {"category": other}]
    before = [await get(shop, "/products", **p) for p in pages]
    loads = shop.loads.loads["listing"]
    assert [await get(shop, "/products", **p) for p in pages] == before  # all cached
    assert shop.loads.loads["listing"] == loads

    # A description changes: the pages keep their ids (no page is built again), and
    # every page that shows product 7 shows its new version at once.
    await send(shop, "PUT", "/products/7", {"description": "now in blue"})
    after = [await get(shop, "/products", **p) for p in pages]
    assert shop.loads.loads["listing"] == loads
    assert after[3] == before[3]
    for page in after[:3]:
        (row,) = [i for i in page["items"] if i["id"] == 7]
        assert row["version"] > product["version"]

    # A price change moves it in the price-sorted pages, which are built again; the
    # pages sorted by id keep their ids and show the new price.
    await send(shop, "PUT", "/products/7", {"price_cents": 1})
    cheapest = await get(shop, "/products", **by_price)
    assert cheapest["items"][0] == {
        "id": 7,
        "sku": sku_of(7),
        "name": product["name"],
        "category_id": category,
        "price_cents": 1,
        "version": cheapest["items"][0]["version"],
    }
    assert shop.loads.loads["listing"] == loads + 1
    (row,) = [i for i in (await get(shop, "/products", category=category))["items"] if i["id"] == 7]
    assert row["price_cents"] == 1
    assert shop.loads.loads["listing"] == loads + 1

    # A new product shows up in its category's listings at once, and goes with its delete.
    created = await send(
        shop, "POST", "/products", {"name": "new", "category_id": other, "price_cents": 2}, 201
    )
    assert created["id"] in [
        i["id"] for i in (await get(shop, "/products", category=other))["items"]
    ]
    assert (
        created["id"]
        == (await get(shop, "/products", category=other, sort="price"))["items"][0]["id"]
    )
    await send(shop, "DELETE", f"/products/{created['id']}", None, 204)
    for params in ({"category": other}, {"category": other, "sort": "price"}, {}):
        shown = [i["id"] for i in (await get(shop, "/products", **params))["items"]]
        assert created["id"] not in shown


async def test_a_page_read_before_a_change_and_stored_after_its_invalidation_goes(
    make_shop: ShopFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race tags alone lose: a page built from rows read before a create commits,
    stored after the create's invalidation ran (so the page was not in the tag's index
    yet). The listing epoch catches it: the next read shows the new product."""
    shop = await make_shop("cachegw")
    read, resume = asyncio.Event(), asyncio.Event()
    real = shop.db.listing_window

    async def slow(*args: Any) -> Any:
        rows = await real(*args)
        read.set()
        await resume.wait()  # the page is stored only after the create below is done
        return rows

    monkeypatch.setattr(shop.db, "listing_window", slow)
    early = asyncio.create_task(get(shop, "/products", category=3))
    await asyncio.wait_for(read.wait(), 10)
    monkeypatch.setattr(shop.db, "listing_window", real)
    body = {"name": "racer", "category_id": 3, "price_cents": 5}
    created = await send(shop, "POST", "/products", body, 201)
    resume.set()
    assert created["id"] not in [i["id"] for i in (await early)["items"]]  # read before
    shown = [i["id"] for i in (await get(shop, "/products", category=3))["items"]]
    assert created["id"] in shown


async def test_writes_put_the_committed_rows_in_the_cache(make_shop: ShopFactory) -> None:
    """Stock and product changes are stored with their database versions: the next reads
    are hits, not loads, and show the change."""
    shop = await make_shop("cachegw")
    sku = sku_of(11)
    old = await get(shop, f"/inventory/{sku}")
    product = await get(shop, "/products/11")
    loads = dict(shop.loads.loads)
    written = await send(shop, "PUT", f"/inventory/{sku}", {"quantity": old["quantity"] + 3})
    assert await get(shop, f"/inventory/{sku}") == written
    assert written["version"] > old["version"]
    edited = await send(shop, "PUT", "/products/11", {"name": "renamed"})
    assert await get(shop, "/products/11") == edited
    assert edited["version"] > product["version"]
    assert dict(shop.loads.loads) == loads


async def test_missing_products_are_remembered_until_created(make_shop: ShopFactory) -> None:
    shop = await make_shop("cachegw")
    for _ in range(3):
        await get(shop, "/products/5000", 404)
    assert shop.loads.product_loads[5000] == 1  # negative caching
    await send(
        shop,
        "POST",
        "/products/5000",
        {"name": "late arrival", "category_id": 1, "price_cents": 9},
        201,
    )
    assert (await get(shop, "/products/5000"))["name"] == "late arrival"
    await send(
        shop, "POST", "/products/5000", {"name": "again", "category_id": 1, "price_cents": 9}, 409
    )


async def test_stock_changes_reach_every_gateways_readers(make_shop: ShopFactory) -> None:
    writer = await make_shop("cachegw")
    reader = await make_shop("cachegw", seed=False)  # another gateway, the same Redis
    sku = "/inventory/SKU-00000003"
    old = await get(reader, sku)
    assert await get(reader, sku) == old  # now in the reader's gateway L1
    await send(writer, "PUT", sku, {"quantity": old["quantity"] + 5})
    deadline = time.monotonic() + 1.5  # under the class's 2 s L1 TTL: the event must do it
    while (await get(reader, sku))["quantity"] != old["quantity"] + 5:
        assert time.monotonic() < deadline, "the stock change did not reach the other gateway"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("mode", ["redis", "cachegw"])
async def test_a_value_that_no_longer_decodes_is_a_miss(make_shop: ShopFactory, mode: str) -> None:
    shop = await make_shop(mode)
    listing_key = keys.listing_key(category=3, q=None, sort="id", page=1, page_size=20)
    product_key = keys.product_key(id=4)
    if mode == "redis":
        import redis.asyncio as aioredis

        from shop.modes.rediscache import RedisCatalog

        assert isinstance(shop.catalog, RedisCatalog)
        r: aioredis.Redis = shop.catalog.redis
        await r.set(listing_key, b"\x00 written by an older release")
        await r.set(product_key, b'{"id": 4}')
    else:
        async with AsyncClient(shop.gateway) as cache:
            await cache.set(listing_key, b"\x00 written by an older release")
            await cache.set(product_key, b'{"id": 4}')
    page = await get(shop, "/products", category=3)
    assert all(item["category_id"] == 3 for item in page["items"]) and page["items"]
    assert (await get(shop, "/products/4"))["sku"] == "SKU-00000004"
    assert shop.loads.decode_failures == 2
    assert await get(shop, "/products", category=3) == page  # cached again, and good
    assert shop.loads.decode_failures == 2


async def test_an_unreachable_gateway_leaves_the_database(make_shop: ShopFactory) -> None:
    shop = await make_shop("cachegw", gateway=f"127.0.0.1:{free_port()}")
    assert (await get(shop, "/products/7"))["id"] == 7
    await get(shop, "/products/999999", 404)
    assert (await get(shop, "/products", category=2))["items"]
    assert (await get(shop, "/price/SKU-00000007"))["sku"] == "SKU-00000007"
    await send(shop, "PUT", "/inventory/SKU-00000007", {"quantity": 3})
    assert (await get(shop, "/inventory/SKU-00000007"))["quantity"] == 3
    assert await send(shop, "POST", "/quote", {"items": [{"sku": "SKU-00000001", "qty": 1}]})
    assert shop.loads.fallbacks == 5  # the quote's get_or_load falls back in the client
    assert isinstance(shop.catalog, GatewayCatalog)
    assert shop.catalog.stats()["pending_invalidations"] == 1  # kept, to retry


async def test_the_origin_lists_every_product_price_and_stock_key(make_shop: ShopFactory) -> None:
    shop = await make_shop("none")
    origin = ShopOrigin(shop.db)
    listed: list[str] = []
    token = ""
    for _ in range(50):  # 600 keys in pages of 70: 9 pages and the family changes
        page, token = await origin.list_keys("", 70, token)
        assert len(page) <= 70
        listed += page
        if not token:
            break
    assert not token
    ids = range(1, PRODUCTS + 1)
    assert listed == [keys.product_key(id=i) for i in ids] + [
        keys.price_key(sku=sku_of(i)) for i in ids
    ] + [keys.inventory_key(sku=sku_of(i)) for i in ids]
    # A prefix narrows it to one family, or to the keys of some ids within it.
    assert (await origin.list_keys("price:", 0, ""))[0] == listed[PRODUCTS : 2 * PRODUCTS]
    assert (await origin.list_keys(keys.product_key(id=1), 0, ""))[0] == [
        keys.product_key(id=i) for i in [1, *range(10, 20), *range(100, 200)]
    ]
    assert await origin.list_keys(keys.product_key(id=1) + "x", 0, "") == ([], "")
    assert await origin.list_keys("quote:", 0, "") == ([], "")
    with pytest.raises(ValueError, match="page token"):
        await origin.list_keys("", 0, "9:x")


async def test_a_warm_start_rebuilds_the_catalog_in_the_gateway(make_shop: ShopFactory) -> None:
    shop = await make_shop("cachegw")
    catalog = shop.catalog
    assert isinstance(catalog, GatewayCatalog)
    await asyncio.wait_for(catalog.warm_catalog(), 30)
    state = catalog.warm_state
    assert state["done"] and state["origin_loaded"] == 3 * PRODUCTS, state
    loads = dict(shop.loads.loads)
    for i in (1, 77, PRODUCTS):
        await get(shop, f"/products/{i}")
        await get(shop, f"/price/{sku_of(i)}")
        await get(shop, f"/inventory/{sku_of(i)}")
    assert dict(shop.loads.loads) == loads  # every read a hit: nothing loaded
    # Again: Redis holds it all, so nothing is loaded from the origin.
    await asyncio.wait_for(catalog.warm_catalog(), 30)
    assert catalog.warm_state["origin_loaded"] == 0
    assert catalog.warm_state["loaded"] == 3 * PRODUCTS
