"""Codecs for cached values (JSON via orjson, msgpack), where a value that no longer
decodes is a miss: removed from the cache and counted, never an exception in a request.

    pip install 'cachegw[serializers]'

    from cachegw.serializers import JsonCodec, TypedCache

    products = TypedCache(client, JsonCodec(schema=3))   # client: an AsyncClient
    await products.set("product:v3:p.id=i42", {"id": 42, "name": "kettle"}, tags=["p42"])
    await products.get("product:v3:p.id=i42")           # {'id': 42, 'name': 'kettle'}
    await products.get_or_load(key, load_row)           # load_row() -> a dict, on a miss

Every encoded value starts with a 4-byte header: ``cg``, the codec (``j`` or ``m``) and the
schema number (0-255, yours: bump it when the shape of what you store changes). A value
with another header, bytes the codec rejects, or a value `validate` refuses raise
`DecodeError` from `Codec.loads`; `TypedCache` turns that into a miss, deletes the key
(so the next reader loads a good value) and adds one to `decode_failures`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from cachegw.errors import CacheError

if TYPE_CHECKING:
    from cachegw.aio import AsyncClient

__all__ = ["Codec", "DecodeError", "JsonCodec", "MsgpackCodec", "TypedCache"]

log = logging.getLogger("cachegw.serializers")

_MAGIC = b"cg"
_INSTALL = "pip install 'cachegw[serializers]'"


class DecodeError(ValueError):
    """The bytes are not a value this codec (and schema) wrote."""


class Codec:
    """A serializer with a header; subclasses implement `_encode` and `_decode`."""

    tag: bytes = b"?"

    def __init__(self, schema: int = 1, validate: Callable[[Any], bool] | None = None) -> None:
        if not 0 <= schema <= 255:
            raise ValueError(f"schema must be 0..255 (got {schema})")
        self.schema = schema
        self.validate = validate
        self._header = _MAGIC + self.tag + bytes([schema])

    def dumps(self, obj: Any) -> bytes:
        return self._header + self._encode(obj)

    def loads(self, data: bytes) -> Any:
        if not data.startswith(self._header):
            raise DecodeError(
                f"header {bytes(data[:4])!r}, expected {self._header!r} "
                "(another codec or schema wrote it)"
            )
        try:
            obj = self._decode(memoryview(data)[4:])
        except Exception as exc:  # every codec has its own error types
            raise DecodeError(f"{type(exc).__name__}: {exc}") from exc
        if self.validate is not None and not self.validate(obj):
            raise DecodeError("the decoded value failed validation")
        return obj

    def _encode(self, obj: Any) -> bytes:
        raise NotImplementedError

    def _decode(self, data: memoryview) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schema={self.schema})"


class JsonCodec(Codec):
    """JSON through orjson (dataclasses, datetimes and UUIDs encode natively)."""

    tag = b"j"

    def __init__(self, schema: int = 1, validate: Callable[[Any], bool] | None = None) -> None:
        try:
            import orjson
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(f"JsonCodec needs orjson: {_INSTALL}") from exc
        self._orjson = orjson
        super().__init__(schema, validate)

    def _encode(self, obj: Any) -> bytes:
        data: bytes = self._orjson.dumps(obj)
        return data

    def _decode(self, data: memoryview) -> Any:
        return self._orjson.loads(data)


class MsgpackCodec(Codec):
    """MessagePack: smaller than JSON, and bytes stay bytes."""

    tag = b"m"

    def __init__(self, schema: int = 1, validate: Callable[[Any], bool] | None = None) -> None:
        try:
            import msgpack
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(f"MsgpackCodec needs msgpack: {_INSTALL}") from exc
        self._msgpack = msgpack
        super().__init__(schema, validate)

    def _encode(self, obj: Any) -> bytes:
        data: bytes = self._msgpack.packb(obj, use_bin_type=True)
        return data

    def _decode(self, data: memoryview) -> Any:
        return self._msgpack.unpackb(data, raw=False, strict_map_key=False)


class TypedCache:
    """An `AsyncClient` that stores objects through a `Codec`; undecodable values are
    misses (deleted, counted in `decode_failures`, logged at WARNING)."""

    def __init__(self, client: AsyncClient, codec: Codec) -> None:
        self.client = client
        self.codec = codec
        self.decode_failures = 0

    async def _drop(self, key: str, error: DecodeError) -> None:
        self.decode_failures += 1
        log.warning("cachegw: %r no longer decodes (%s): removed, treated as a miss", key, error)
        try:
            await self.client.delete(key)
        except CacheError as exc:  # the next reader drops it again; never fail the request
            log.warning("cachegw: could not remove %r: %s", key, exc)

    async def decode(self, key: str, raw: bytes | None) -> Any | None:
        """`raw` decoded, or None when absent or undecodable (then removed and counted)."""
        if raw is None:
            return None
        try:
            return self.codec.loads(raw)
        except DecodeError as exc:
            await self._drop(key, exc)
            return None

    async def get(self, key: str) -> Any | None:
        return await self.decode(key, await self.client.get(key))

    async def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        raws = await self.client.get_many(keys)
        return [await self.decode(k, raw) for k, raw in zip(keys, raws, strict=True)]

    async def set(
        self, key: str, obj: Any, *, ttl: float | None = None, tags: Iterable[str] = ()
    ) -> None:
        await self.client.set(key, self.codec.dumps(obj), ttl=ttl, tags=tags)

    async def get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[Any]],
        *,
        ttl: float | None = None,
        tags: Iterable[str] = (),
    ) -> Any:
        """`AsyncClient.get_or_load` with objects: `loader` returns the object to cache.

        A cached value that does not decode is removed and loaded once more through the
        cache; should that fail to decode too, the loader's own answer is returned."""
        tag_list = list(tags)
        loaded: list[Any] = []

        async def encoded() -> bytes:
            obj = await loader()
            loaded.append(obj)
            return self.codec.dumps(obj)

        for _ in range(2):
            raw = await self.client.get_or_load(key, encoded, ttl=ttl, tags=tag_list)
            if loaded:  # this caller loaded it: no need to decode what it just encoded
                return loaded[-1]
            try:
                return self.codec.loads(raw)
            except DecodeError as exc:
                await self._drop(key, exc)
        return await loader()
