"""The catalog in PostgreSQL (asyncpg): schema, a fast seed (COPY) and every query the API
makes. `Counters` counts what the database was asked for cacheable reads, so each mode's
hit rate is measured the same way: one minus database loads over reads."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS shop_versions START 2;
CREATE SEQUENCE IF NOT EXISTS product_ids START 10000000;
CREATE TABLE IF NOT EXISTS categories (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE IF NOT EXISTS products (
    id bigint PRIMARY KEY,
    sku text NOT NULL UNIQUE,
    name text NOT NULL,
    description text NOT NULL,
    category_id int NOT NULL REFERENCES categories (id),
    version bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS products_category ON products (category_id, id);
CREATE TABLE IF NOT EXISTS prices (
    sku text PRIMARY KEY,
    amount_cents int NOT NULL CHECK (amount_cents >= 0),
    currency text NOT NULL DEFAULT 'EUR',
    version bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS inventory (
    sku text PRIMARY KEY,
    quantity int NOT NULL CHECK (quantity >= 0),
    version bigint NOT NULL
);
"""

ADJECTIVES = [
    "red",
    "blue",
    "green",
    "small",
    "large",
    "smart",
    "quiet",
    "fast",
    "light",
    "heavy",
    "steel",
    "wooden",
    "classic",
    "compact",
    "premium",
    "vintage",
    "modern",
    "portable",
    "folding",
    "eco",
]
NOUNS = [
    "kettle",
    "lamp",
    "chair",
    "desk",
    "mug",
    "backpack",
    "jacket",
    "headphones",
    "speaker",
    "blender",
    "drill",
    "tent",
    "bottle",
    "notebook",
    "pan",
    "knife",
    "watch",
    "sofa",
    "rug",
    "bicycle",
]
CATEGORY_NAMES = [
    "kitchen",
    "lighting",
    "furniture",
    "office",
    "outdoor",
    "audio",
    "tools",
    "garden",
    "sports",
    "travel",
    "books",
    "toys",
    "beauty",
    "health",
    "pets",
    "baby",
    "auto",
    "music",
    "games",
    "fashion",
]

SORTS = {
    "id": "p.id",
    "price": "pr.amount_cents, p.id",
    "-price": "pr.amount_cents DESC, p.id",
    # Byte order, whatever the database's locale: listing_tags buckets names by code point.
    "name": 'p.name COLLATE "C", p.id',
}

PRODUCT_SQL = """
SELECT p.id, p.sku, p.name, p.description, p.category_id, c.name AS category,
       pr.amount_cents AS price_cents, pr.currency, p.version
FROM products p JOIN categories c ON c.id = p.category_id
LEFT JOIN prices pr ON pr.sku = p.sku
WHERE p.id = ANY($1::bigint[])
"""

PRODUCT_FIELDS = (
    "id",
    "sku",
    "name",
    "description",
    "category_id",
    "category",
    "price_cents",
    "currency",
    "version",
)
# The row as it was, locked: a concurrent write of it waits, and this one sees its result.
_LOCKED = PRODUCT_SQL.replace("= ANY($1::bigint[])", "= $1") + " FOR UPDATE OF p"
SKU_SQL = "'SKU-' || CASE WHEN n.id < 10000000 THEN lpad(n.id::text, 8, '0') ELSE n.id::text END"
CREATE_SQL = f"""
WITH n AS (SELECT coalesce($1::bigint, nextval('product_ids')) AS id),
product AS (
  INSERT INTO products (id, sku, name, description, category_id, version)
  SELECT n.id, {SKU_SQL}, $2, $3, $4, nextval('shop_versions') FROM n
  ON CONFLICT DO NOTHING
  RETURNING id, sku, name, description, category_id, version
),
price AS (
  INSERT INTO prices (sku, amount_cents, version)
  SELECT sku, $5, nextval('shop_versions') FROM product
  RETURNING sku, amount_cents, currency
),
stock AS (
  INSERT INTO inventory (sku, quantity, version)
  SELECT sku, $6, nextval('shop_versions') FROM product
)
SELECT p.id, p.sku, p.name, p.description, p.category_id, c.name AS category,
       pr.amount_cents AS price_cents, pr.currency, p.version
FROM product p JOIN categories c ON c.id = p.category_id JOIN price pr ON pr.sku = p.sku
"""
UPDATE_SQL = f"""
WITH b AS ({_LOCKED}),
product AS (
  UPDATE products p SET name = coalesce($2, b.name),
    description = coalesce($3, b.description),
    category_id = coalesce($4, b.category_id), version = nextval('shop_versions')
  FROM b WHERE p.id = b.id
  RETURNING p.id, p.sku, p.name, p.description, p.category_id, p.version
),
price AS (
  UPDATE prices pr SET amount_cents = $5, version = nextval('shop_versions')
  FROM b WHERE pr.sku = b.sku AND $5::int IS NOT NULL
  RETURNING pr.amount_cents, pr.currency
)
SELECT {", ".join(f"b.{f} AS b_{f}" for f in PRODUCT_FIELDS)},
       a.id AS a_id, a.sku AS a_sku, a.name AS a_name, a.description AS a_description,
       a.category_id AS a_category_id, c.name AS a_category,
       coalesce((SELECT amount_cents FROM price), b.price_cents) AS a_price_cents,
       coalesce((SELECT currency FROM price), b.currency) AS a_currency, a.version AS a_version
FROM b JOIN product a ON a.id = b.id JOIN categories c ON c.id = a.category_id
"""
DELETE_SQL = f"""
WITH b AS ({_LOCKED}),
gone AS (DELETE FROM products p USING b WHERE p.id = b.id RETURNING p.sku),
price AS (DELETE FROM prices pr USING gone g WHERE pr.sku = g.sku),
stock AS (DELETE FROM inventory i USING gone g WHERE i.sku = g.sku)
SELECT * FROM b
"""


def sku_of(product_id: int) -> str:
    return f"SKU-{product_id:08d}"


@dataclass
class Counters:
    """Reads served and database queries made for them, by kind (a batch of keys is one
    query); loads of each product id."""

    reads: Counter[str] = field(default_factory=Counter)
    loads: Counter[str] = field(default_factory=Counter)
    product_loads: Counter[int] = field(default_factory=Counter)
    fallbacks: int = 0  # cachegw mode: gateway unreachable, answered from the database
    decode_failures: int = 0

    def snapshot(self, product_ids: list[int]) -> dict[str, Any]:
        return {
            "reads": dict(self.reads),
            "loads": dict(self.loads),
            "product_loads": {str(i): self.product_loads.get(i, 0) for i in product_ids},
            "fallbacks": self.fallbacks,
            "decode_failures": self.decode_failures,
        }


class Database:
    """Every statement of the shop; reads used by caches count their loads."""

    def __init__(self, pool: asyncpg.Pool, counters: Counters) -> None:
        self.pool = pool
        self.counters = counters

    # -- reads (cacheable) -------------------------------------------------------------

    async def products(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        self.counters.loads["product"] += 1
        self.counters.product_loads.update(ids)
        rows = await self.pool.fetch(PRODUCT_SQL, ids)
        return {r["id"]: dict(r) for r in rows}

    async def product(self, product_id: int) -> dict[str, Any] | None:
        return (await self.products([product_id])).get(product_id)

    async def listing(
        self, category: int | None, q: str | None, sort: str, page: int, page_size: int
    ) -> dict[str, Any]:
        items, following = await self.listing_window(category, q, sort, page, page_size)
        return {
            "category": category,
            "q": q,
            "sort": sort,
            "page": page,
            "page_size": page_size,
            "items": items,
            "has_more": following is not None,
        }

    async def listing_window(
        self, category: int | None, q: str | None, sort: str, page: int, page_size: int
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """A listing page's rows, and the row after them (None on the last page)."""
        self.counters.loads["listing"] += 1
        order = SORTS[sort]
        rows = await self.pool.fetch(
            "SELECT p.id, p.sku, p.name, p.category_id, pr.amount_cents AS price_cents, "
            "p.version FROM products p JOIN prices pr ON pr.sku = p.sku "
            "WHERE ($1::int IS NULL OR p.category_id = $1) "
            "AND ($2::text IS NULL OR p.name ILIKE $2) "
            f"ORDER BY {order} LIMIT $3 OFFSET $4",
            category,
            None if q is None else "%" + q.replace("%", r"\%").replace("_", r"\_") + "%",
            page_size + 1,
            (page - 1) * page_size,
        )
        items = [dict(r) for r in rows[:page_size]]
        return items, dict(rows[page_size]) if len(rows) > page_size else None

    async def prices(self, skus: list[str]) -> dict[str, dict[str, Any]]:
        self.counters.loads["price"] += 1
        rows = await self.pool.fetch(
            "SELECT sku, amount_cents, currency, version FROM prices WHERE sku = ANY($1::text[])",
            skus,
        )
        return {r["sku"]: dict(r) for r in rows}

    async def inventories(self, skus: list[str]) -> dict[str, dict[str, Any]]:
        self.counters.loads["inventory"] += 1
        rows = await self.pool.fetch(
            "SELECT sku, quantity, version FROM inventory WHERE sku = ANY($1::text[])", skus
        )
        return {r["sku"]: dict(r) for r in rows}

    async def quote(self, items: list[tuple[str, int]], region: str) -> dict[str, Any]:
        """The expensive one: prices of the basket and the average price of every
        category it touches (a scan of thousands of rows), then discounts and shipping."""
        self.counters.loads["quote"] += 1
        row = await self.pool.fetchrow(
            "WITH items AS (SELECT * FROM unnest($1::text[], $2::int[]) AS t(sku, qty)), "
            "cats AS (SELECT DISTINCT p.category_id FROM products p JOIN items i "
            "ON i.sku = p.sku) "
            "SELECT (SELECT sum(pr.amount_cents::bigint * i.qty) FROM items i "
            "        JOIN prices pr ON pr.sku = i.sku) AS subtotal, "
            "       (SELECT count(*) FROM items i JOIN prices pr ON pr.sku = i.sku) AS lines, "
            "       (SELECT avg(pr.amount_cents) FROM products p "
            "        JOIN prices pr ON pr.sku = p.sku "
            "        WHERE p.category_id IN (SELECT category_id FROM cats)) AS category_avg",
            [s for s, _ in items],
            [q for _, q in items],
        )
        subtotal = int(row["subtotal"] or 0)
        average = float(row["category_avg"] or 0)
        discount = round(subtotal * 0.05) if subtotal > 4 * average * len(items) else 0
        shipping = {"eu": 499, "us": 899, "asia": 1299}.get(region, 1999)
        shipping = 0 if subtotal - discount > 10000 else shipping
        return {
            "items": [{"sku": s, "qty": q} for s, q in items],
            "region": region,
            "lines": int(row["lines"]),
            "subtotal_cents": subtotal,
            "discount_cents": discount,
            "shipping_cents": shipping,
            "total_cents": subtotal - discount + shipping,
        }

    # -- listing keys (the origin's List, for the gateway's warm rebuild) -----------------

    async def product_ids(self, digits: str, after: int, limit: int) -> list[int]:
        """Up to `limit` product ids above `after` whose decimal form starts with
        `digits`, in order."""
        rows = await self.pool.fetch(
            "SELECT id FROM products WHERE id > $1 AND ($2 = '' OR id::text LIKE $2 || '%') "
            "ORDER BY id LIMIT $3",
            after,
            digits,
            limit,
        )
        return [r["id"] for r in rows]

    async def skus(self, table: str, start: str, after: str, limit: int) -> list[str]:
        """Up to `limit` skus of `table` (prices or inventory) above `after` starting
        with `start`, in order."""
        assert table in ("prices", "inventory")
        pattern = start.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_") + "%"
        rows = await self.pool.fetch(
            f"SELECT sku FROM {table} WHERE sku > $1 AND sku LIKE $2 ORDER BY sku LIMIT $3",
            after,
            pattern,
            limit,
        )
        return [r["sku"] for r in rows]

    # -- writes ------------------------------------------------------------------------

    # Each write is one statement (data-modifying CTEs): one round trip, and the row
    # locked for no longer than that.

    async def create_product(
        self, data: dict[str, Any], product_id: int | None = None
    ) -> dict[str, Any] | None:
        """The new product (with its price and stock); None when `product_id` is taken."""
        row = await self.pool.fetchrow(
            CREATE_SQL,
            product_id,
            data["name"],
            data.get("description", ""),
            data["category_id"],
            data["price_cents"],
            data.get("quantity", 0),
        )
        return None if row is None else dict(row)

    async def update_product(
        self, product_id: int, data: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(before, after), or None when there is no such product."""
        row = await self.pool.fetchrow(
            UPDATE_SQL,
            product_id,
            data.get("name"),
            data.get("description"),
            data.get("category_id"),
            data.get("price_cents"),
        )
        if row is None:
            return None
        return (
            {f: row[f"b_{f}"] for f in PRODUCT_FIELDS},
            {f: row[f"a_{f}"] for f in PRODUCT_FIELDS},
        )

    async def delete_product(self, product_id: int) -> dict[str, Any] | None:
        """The product as it was, or None when there was none."""
        row = await self.pool.fetchrow(DELETE_SQL, product_id)
        return None if row is None else dict(row)

    async def set_inventory(self, sku: str, quantity: int) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            "UPDATE inventory SET quantity = $2, version = nextval('shop_versions') "
            "WHERE sku = $1 RETURNING sku, quantity, version",
            sku,
            quantity,
        )
        return None if row is None else dict(row)


async def create_schema(conn: asyncpg.Connection) -> None:
    await conn.execute(SCHEMA)


async def seed(
    conn: asyncpg.Connection, products: int, categories: int = 20, seed: int = 1
) -> None:
    """Categories, `products` products with prices and stock, loaded with COPY (100k
    products take a few seconds). Replaces what the tables held."""
    rng = random.Random(seed)
    await conn.execute("TRUNCATE products, prices, inventory, categories")
    await conn.copy_records_to_table(
        "categories",
        records=[
            (i, CATEGORY_NAMES[(i - 1) % len(CATEGORY_NAMES)] + f"-{i}")
            for i in range(1, categories + 1)
        ],
        columns=["id", "name"],
    )
    rows = []
    for i in range(1, products + 1):
        name = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {i}"
        rows.append(
            (
                i,
                sku_of(i),
                name,
                f"The {name}: " + "well made. " * 12,
                rng.randint(1, categories),
                1,
            )
        )
    await conn.copy_records_to_table(
        "products",
        records=rows,
        columns=["id", "sku", "name", "description", "category_id", "version"],
    )
    await conn.copy_records_to_table(
        "prices",
        records=[(sku_of(i), rng.randint(199, 99999), "EUR", 1) for i in range(1, products + 1)],
        columns=["sku", "amount_cents", "currency", "version"],
    )
    await conn.copy_records_to_table(
        "inventory",
        records=[(sku_of(i), rng.randint(0, 500), 1) for i in range(1, products + 1)],
        columns=["sku", "quantity", "version"],
    )
    await conn.execute("ANALYZE")
