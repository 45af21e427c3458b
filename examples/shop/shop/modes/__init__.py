"""The three ways to serve the catalog: `none` (every read is a query), `redis` (redis-py
cache-aside as the spec plans it) and `cachegw` (through the gateway)."""

from shop.modes.base import Catalog, ListingQuery, QuoteInput

__all__ = ["MODES", "Catalog", "ListingQuery", "QuoteInput"]

MODES = ("none", "redis", "cachegw")
