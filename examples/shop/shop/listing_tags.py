"""Which cached listing pages a product change can alter, as tags.

The cachegw mode caches a listing page as the ids it shows (its rows come from the
product cache, so a product's own change reaches every page that shows it without
evicting any). What a change can alter is which ids a page holds: a product added to or
removed from a scope (one category, or all of them), or moved within a sort.

A page is its scope's products in sort order, from an offset, and whether more follow.
A product added or removed at sort position K changes a page only if K is at or before
the first product after the page (the one that decides whether more follow); with no
product after it (the last page, or an empty one) any change can. So each page is tagged
with a bucket of the sort position of the product after it, or `tail`; the bucket is a
monotone function of the position (K <= p gives bucket(K) <= bucket(p)), so a change at K
invalidates the buckets from bucket(K) up, and `tail`. The first pages of a catalog sorted
by id never hear of today's new products (theirs are the highest ids); a price change
only reaches the price-sorted pages up to its new and old places.

Text searches (`q`, a name filter) also change when a name does, which moves no product:
their pages carry a `q` tag that every name change invalidates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

BUCKETS = 16  # per scope and sort: a change invalidates at most this many tags, and tail
SORTS = ("id", "price", "-price", "name")


def _log_bucket(x: int, offset: int) -> int:
    """Half-octaves of `x` (monotone), shifted and clamped to the buckets."""
    if x < 1:
        return 0
    return min(BUCKETS - 1, max(0, math.floor(2 * math.log2(x)) - offset))


def bucket(sort: str, row: Mapping[str, Any]) -> int:
    """The bucket of a product's position in `sort`: never lower for a later position.
    Names are ordered by code point (the query sorts them COLLATE "C")."""
    if sort == "id":
        return _log_bucket(int(row["id"]), 20)  # ids up to about 1000 share bucket 0
    if sort == "price":
        return _log_bucket(int(row["price_cents"]), 18)  # 5 EUR to 1000 EUR and up
    if sort == "-price":  # descending: the dearest come first
        return BUCKETS - 1 - _log_bucket(int(row["price_cents"]), 18)
    if sort == "name":
        first = ord(str(row["name"])[0]) - ord("a")  # a..z spread over the buckets
        return min(BUCKETS - 1, max(0, first * BUCKETS // 26))
    raise ValueError(f"unknown sort {sort!r}")


def scope(category_id: int | None) -> str:
    return "all" if category_id is None else f"c{category_id}"


def _tag(scope_name: str, sort: str, part: str) -> str:
    return f"lst:{scope_name}:{sort}:{part}"


def page_tags(
    category_id: int | None, q: str | None, sort: str, following: Mapping[str, Any] | None
) -> list[str]:
    """The tags of a page of (`category_id`, `q`, `sort`) whose next product, the first
    one after it in that order, is `following` (None: the page is the last one)."""
    s = scope(category_id)
    tags = [_tag(s, sort, "tail" if following is None else str(bucket(sort, following)))]
    if q is not None:
        tags.append(f"lst:{s}:q")
    return tags


def change_tags(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[str]:
    """The tags to invalidate when a product goes from `before` to `after` (None: it did
    not exist, or no longer does)."""
    tags: set[str] = set()
    scopes_before = _scopes(before)
    scopes_after = _scopes(after)
    for s in scopes_before | scopes_after:
        was, now = s in scopes_before, s in scopes_after
        for sort in SORTS:
            if (
                before is not None
                and after is not None
                and was
                and now
                and _position(sort, before) == _position(sort, after)
            ):
                continue  # the same place in this list: no page changes
            moved = [r for r, there in ((before, was), (after, now)) if there and r is not None]
            lowest = min(bucket(sort, r) for r in moved)
            tags.update(_tag(s, sort, str(b)) for b in range(lowest, BUCKETS))
            tags.add(_tag(s, sort, "tail"))
        renamed = before is None or after is None or before["name"] != after["name"] or was != now
        if renamed:
            tags.add(f"lst:{s}:q")
    return sorted(tags)


def _scopes(row: Mapping[str, Any] | None) -> set[str]:
    return set() if row is None else {scope(None), scope(int(row["category_id"]))}


def _position(sort: str, row: Mapping[str, Any]) -> Any:
    """What orders `row` in `sort` (db.SORTS), ties broken by id."""
    if sort == "id":
        return (row["id"],)
    if sort in ("price", "-price"):
        return (row["price_cents"], row["id"])
    return (str(row["name"]).encode(), row["id"])
