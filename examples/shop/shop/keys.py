"""The shop's cache keys and tags, built with the client library's key builder (the same
keys in the redis-py and the cachegw modes). The origin reads ids back from the detail
keys it is asked to load, so those are checked against one pattern each."""

from __future__ import annotations

import re

from cachegw.keys import KeyBuilder

FORMAT = 1  # bump when what a cached value looks like changes
# Listing pages: 2 since the cachegw mode keeps the ids a page shows, not its rows.
LISTING_FORMAT = 2

product_key = KeyBuilder("product", version=FORMAT)
listing_key = KeyBuilder("catalog", version=LISTING_FORMAT)
price_key = KeyBuilder("price", version=FORMAT)
inventory_key = KeyBuilder("inventory", version=FORMAT)
quote_key = KeyBuilder("quote", version=FORMAT, hashed=True)

PRODUCT = re.compile(rf"product:v{FORMAT}:p\.id=i(\d+)")
PRICE = re.compile(rf"price:v{FORMAT}:p\.sku=s([A-Za-z0-9_.~-]+)")
INVENTORY = re.compile(rf"inventory:v{FORMAT}:p\.sku=s([A-Za-z0-9_.~-]+)")
