"""The shop's cache keys and tags, built with the client library's key builder (the same
keys in the redis-py and the cachegw modes). The origin reads ids back from the detail
keys it is asked to load, so those are checked against one pattern each."""

from __future__ import annotations

import re

from cachegw.keys import KeyBuilder

FORMAT = 1  # bump when what a cached value looks like changes

product_key = KeyBuilder("product", version=FORMAT)
listing_key = KeyBuilder("catalog", version=FORMAT)
price_key = KeyBuilder("price", version=FORMAT)
inventory_key = KeyBuilder("inventory", version=FORMAT)
quote_key = KeyBuilder("quote", version=FORMAT, hashed=True)

PRODUCT = re.compile(rf"product:v{FORMAT}:p\.id=i(\d+)")
PRICE = re.compile(rf"price:v{FORMAT}:p\.sku=s([A-Za-z0-9_.~-]+)")
INVENTORY = re.compile(rf"inventory:v{FORMAT}:p\.sku=s([A-Za-z0-9_.~-]+)")


def product_tag(product_id: int) -> str:
    return f"prod-{product_id}"


def category_tag(category_id: int | None) -> str:
    """Listings of one category; listings of every category carry "cat-all"."""
    return "cat-all" if category_id is None else f"cat-{category_id}"
