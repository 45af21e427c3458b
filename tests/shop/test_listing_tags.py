"""listing_tags against a model of the listing query: whatever a product change does, every
cached page whose ids it changes carries a tag the change invalidates."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shop import listing_tags

Row = dict[str, Any]
CATEGORIES = (1, 2, 3)
NAMES = ("apple", "Blue", "blue lamp", "eco mug", "new kettle", "zebra", "~tilde", "élan")
QUERIES = (None, "blue", "e")


def order(sort: str, row: Row) -> tuple[Any, ...]:
    """db.SORTS, as PostgreSQL orders them (names COLLATE "C": by their UTF-8 bytes)."""
    if sort == "id":
        return (row["id"],)
    if sort == "price":
        return (row["price_cents"], row["id"])
    if sort == "-price":
        return (-row["price_cents"], row["id"])
    return (row["name"].encode(), row["id"])


def page(
    rows: dict[int, Row], category: int | None, q: str | None, sort: str, number: int, size: int
) -> tuple[list[Row], Row | None]:
    """The page's rows, and the row after them (None: none follows)."""
    shown = [
        r
        for r in rows.values()
        if (category is None or r["category_id"] == category)
        and (q is None or q.lower() in r["name"].lower())
    ]
    shown.sort(key=lambda r: order(sort, r))
    start = (number - 1) * size
    following = shown[start + size] if len(shown) > start + size else None
    return shown[start : start + size], following


products = st.builds(
    lambda i, price, name, cat: {"id": i, "price_cents": price, "name": name, "category_id": cat},
    st.integers(1, 3000),
    st.one_of(st.integers(0, 3000), st.integers(0, 2**31 - 1)),
    st.sampled_from(NAMES),
    st.sampled_from(CATEGORIES),
)


@st.composite
def catalogs_and_changes(draw: st.DrawFn) -> tuple[dict[int, Row], Row | None, Row | None]:
    rows = {r["id"]: r for r in draw(st.lists(products, max_size=40))}
    kind = draw(st.sampled_from(["create", "update", "delete"]))
    if kind == "create" or not rows:
        new = draw(products.filter(lambda r: r["id"] not in rows))
        return rows, None, new
    before = rows[draw(st.sampled_from(sorted(rows)))]
    if kind == "delete":
        return rows, before, None
    changes = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "price_cents": st.integers(0, 2**31 - 1),
                "name": st.sampled_from(NAMES),
                "category_id": st.sampled_from(CATEGORIES),
            },
        )
    )
    return rows, before, {**before, **changes}


@settings(max_examples=300, deadline=None)
@given(catalogs_and_changes(), st.sampled_from([1, 2, 3, 5]))
def test_every_page_a_change_alters_is_invalidated(
    case: tuple[dict[int, Row], Row | None, Row | None], size: int
) -> None:
    rows, before, after = case
    changed = dict(rows)
    if before is not None:
        del changed[before["id"]]
    if after is not None:
        changed[after["id"]] = after
    invalidated = set(listing_tags.change_tags(before, after))
    for category in (None, *CATEGORIES):
        for q in QUERIES:
            for sort in listing_tags.SORTS:
                for number in range(1, 12):
                    items, following = page(rows, category, q, sort, number, size)
                    new_items, new_following = page(changed, category, q, sort, number, size)
                    if [r["id"] for r in items] == [r["id"] for r in new_items] and (
                        following is None
                    ) == (new_following is None):
                        continue
                    tags = listing_tags.page_tags(category, q, sort, following)
                    assert invalidated & set(tags), (category, q, sort, number, items, new_items)


def test_a_description_change_invalidates_no_page() -> None:
    row = {"id": 5, "price_cents": 900, "name": "blue mug", "category_id": 2}
    assert listing_tags.change_tags(row, {**row, "description": "new words"}) == []


def test_a_new_product_leaves_the_first_pages_by_id_alone() -> None:
    """Today's product has the highest id: pages ending at low ids keep theirs."""
    after_first_page = {"id": 21, "price_cents": 100, "name": "a", "category_id": 1}
    tags = listing_tags.page_tags(1, None, "id", after_first_page)
    new = {"id": 10_000_001, "price_cents": 500, "name": "new kettle", "category_id": 1}
    assert not set(tags) & set(listing_tags.change_tags(None, new))
