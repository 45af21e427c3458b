"""Canonical cache keys from a name and parameters.

    from cachegw.keys import KeyBuilder

    listing = KeyBuilder("catalog", version=2)
    listing(category=3, sort="price", page=1, q=None)
    # 'catalog:v2:p.category=i3&page=i1&q=n&sort=sprice'

The same parameters always give the same key, whatever their order; different ones never
give the same key. How:

- A key is ``<name>:v<version>:<body>``. The name is fixed text (letters, digits, ``_ . -``,
  segments joined by ``:``) and the version is the format of what you cache: bump it when
  the value's shape changes and old entries are simply never read again.
- The body is ``p.`` and the parameters sorted by name, each value written with its type
  (``i`` integer, ``f`` float, ``s`` string, ``b`` bool, ``n`` None, ``x`` bytes, ``l(...)``
  sequence, ``d(...)`` mapping, ``S(...)`` set) and percent-encoded, so no value can
  forge a separator and ``"1"``, ``1`` and ``True`` stay apart.
- Past `max_length` characters (or always, with ``hashed=True``) the body is ``h.`` and
  the SHA-256 of the readable form, so keys stay within the gateway's key limit.
- Normalisation, so that values Python calls equal share a key: strings are NFC
  (composed and decomposed accents are one string), an integral float is its integer
  (``2.0`` is ``2``, ``-0.0`` is ``0``), a tuple is a list, a frozenset is a set. NaN
  has no equal and is refused, as is any type not listed above (TypeError).
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

__all__ = ["DEFAULT_MAX_LENGTH", "KeyBuilder", "build_key", "canonical"]

DEFAULT_MAX_LENGTH = 200
"""Characters; well under the gateway's default max_key_bytes (512)."""

_NAME = re.compile(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)*")


def _text(s: str) -> str:
    # quote() leaves only A-Z a-z 0-9 _ . - ~ as they are: no separator survives.
    return quote(unicodedata.normalize("NFC", s), safe="")


def _value(v: object) -> str:
    if v is None:
        return "n"
    if isinstance(v, bool):  # before int: True is an int to Python
        return "b1" if v else "b0"
    if isinstance(v, int):
        return f"i{v}"
    if isinstance(v, float):
        if math.isnan(v):
            raise ValueError("NaN cannot be part of a cache key (it equals nothing)")
        if math.isfinite(v) and v.is_integer():
            return f"i{int(v)}"
        return f"f{v!r}"
    if isinstance(v, str):
        return "s" + _text(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return "x" + bytes(v).hex()
    if isinstance(v, list | tuple):
        return "l(" + ",".join(_value(item) for item in v) + ")"
    if isinstance(v, set | frozenset):
        return "S(" + ",".join(sorted(_value(item) for item in v)) + ")"
    if isinstance(v, Mapping):
        return "d(" + _pairs(v, ",") + ")"
    raise TypeError(
        f"a cache key parameter must be None, bool, int, float, str, bytes, a sequence, "
        f"a set or a mapping of these (got {type(v).__name__})"
    )


def _pairs(params: Mapping[Any, object], sep: str) -> str:
    items = []
    for name, value in params.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be strings (got {name!r})")
        items.append((_text(name), _value(value)))
    items.sort()
    return sep.join(f"{n}={v}" for n, v in items)


def canonical(params: Mapping[str, object]) -> str:
    """The readable, canonical form of `params` (the body of an unhashed key, without
    its ``p.``)."""
    return _pairs(params, "&")


def build_key(
    name: str,
    params: Mapping[str, object] | None = None,
    *,
    version: int = 1,
    max_length: int = DEFAULT_MAX_LENGTH,
    hashed: bool = False,
) -> str:
    """``<name>:v<version>:p.<canonical params>``, or ``...:h.<sha256>`` past `max_length`
    characters or with `hashed`."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"key name {name!r}: use letters, digits and _ . - in segments joined by ':'"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative int (got {version!r})")
    head = f"{name}:v{version}:"
    body = canonical(params or {})
    if not hashed and len(head) + 2 + len(body) <= max_length:
        return f"{head}p.{body}"
    return f"{head}h.{hashlib.sha256(body.encode()).hexdigest()}"


class KeyBuilder:
    """Keys of one name and format version: ``KeyBuilder("product")(id=42)``."""

    __slots__ = ("hashed", "max_length", "name", "version")

    def __init__(
        self,
        name: str,
        *,
        version: int = 1,
        max_length: int = DEFAULT_MAX_LENGTH,
        hashed: bool = False,
    ) -> None:
        build_key(name, version=version)  # checks name and version once, here
        if max_length < len(name) + 80:
            raise ValueError(f"max_length {max_length} leaves no room for a hashed body")
        self.name = name
        self.version = version
        self.max_length = max_length
        self.hashed = hashed

    def __call__(self, **params: object) -> str:
        return self.key(params)

    def key(self, params: Mapping[str, object]) -> str:
        return build_key(
            self.name,
            params,
            version=self.version,
            max_length=self.max_length,
            hashed=self.hashed,
        )

    @property
    def prefix(self) -> str:
        """What every key of this builder starts with (for prefix invalidation)."""
        return f"{self.name}:v{self.version}:"

    def __repr__(self) -> str:
        return f"KeyBuilder({self.name!r}, version={self.version})"
