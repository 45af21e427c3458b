"""Codecs (cachegw.serializers) and TypedCache against a real gateway: a value that no
longer decodes is a miss, removed and counted, never an exception."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachegw import AsyncClient
from cachegw.serializers import Codec, DecodeError, JsonCodec, MsgpackCodec, TypedCache
from tests.conftest import RunningGateway

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_round_trip(value: Any) -> None:
    for codec in (JsonCodec(), MsgpackCodec(schema=7)):
        assert codec.loads(codec.dumps(value)) == value


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "header"),
        (b'{"a": 1}', "header"),  # written before the header existed
        (MsgpackCodec().dumps({"a": 1}), "header"),  # another codec
        (JsonCodec(schema=2).dumps({"a": 1}), "header"),  # another schema
        (JsonCodec().dumps({"a": 1})[:-1], "JSONDecodeError"),  # cut short
        (JsonCodec().dumps([1]), "validation"),  # decodes, but is not what is expected
    ],
)
def test_what_does_not_decode(data: bytes, why: str) -> None:
    codec: Codec = JsonCodec(validate=lambda v: isinstance(v, dict))
    with pytest.raises(DecodeError, match=why):
        codec.loads(data)


def test_schema_range() -> None:
    with pytest.raises(ValueError, match="schema"):
        JsonCodec(schema=256)


async def test_undecodable_value_is_a_removed_counted_miss(gateway: RunningGateway) -> None:
    async with AsyncClient(gateway.address) as client:
        cache = TypedCache(client, JsonCodec(schema=2))
        await client.set("product:1", JsonCodec(schema=1).dumps({"id": 1}))  # an old format
        await client.set("product:2", b"\xff garbage")
        await cache.set("product:3", {"id": 3})
        assert await cache.get_many(["product:1", "product:2", "product:3"]) == [
            None,
            None,
            {"id": 3},
        ]
        assert cache.decode_failures == 2
        assert await client.get_many(["product:1", "product:2"]) == [None, None]  # removed

        await client.set("product:4", b"not json")
        loads = 0

        async def load() -> dict[str, int]:
            nonlocal loads
            loads += 1
            return {"id": 4}

        assert await cache.get_or_load("product:4", load) == {"id": 4}
        assert (loads, cache.decode_failures) == (1, 3)
        assert await cache.get("product:4") == {"id": 4}  # the reload was cached
        assert await cache.get_or_load("product:4", load) == {"id": 4}
        assert loads == 1
