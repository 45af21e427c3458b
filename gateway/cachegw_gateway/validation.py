"""Checks every request passes before anything reaches Redis.

Each check raises `InvalidRequest` with a message a person can act on: the field, the
rule and the offending size. The servicer maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError, Message


class InvalidRequest(ValueError):
    """The request breaks a rule of the contract."""


M = TypeVar("M", bound=Message)


class BadMessage:
    """What a lenient deserializer returns for bytes that are not the expected message.

    gRPC turns a deserializer exception into INTERNAL; carrying the problem to the
    handler lets it answer INVALID_ARGUMENT instead.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def lenient_parser(cls: type[M]) -> object:
    """A request deserializer that never raises.

    Unknown fields are skipped, as proto3 wants: a newer client may send fields this
    gateway does not know yet (a rolling upgrade), and they have no effect here. Bytes
    that do not decode as `cls` at all come back as a `BadMessage`."""
    name = cls.DESCRIPTOR.full_name

    def parse(raw: bytes) -> M | BadMessage:
        try:
            return cls.FromString(raw)
        except DecodeError as exc:  # e.g. a string field that is not UTF-8, a truncation
            return BadMessage(f"request is not a valid {name}: {exc}")

    return parse


def check_key(key: str, max_key_bytes: int, field: str = "key") -> None:
    if not key:
        raise InvalidRequest(f"{field} must not be empty")
    # A code point is at most 4 bytes of UTF-8: skip the encode for ordinary keys.
    if len(key) * 4 > max_key_bytes:
        size = len(key.encode())
        if size > max_key_bytes:
            raise InvalidRequest(f"{field} must be at most {max_key_bytes} bytes (got {size})")


def check_keys(keys: Sequence[str], max_key_bytes: int, max_batch: int) -> None:
    if len(keys) > max_batch:
        raise InvalidRequest(
            f"keys has {len(keys)} entries; at most {max_batch} per call (split the batch)"
        )
    # The common case in C-level loops (a GetMany of 100 keys pays this per call): no key
    # empty, none long enough that its UTF-8 could pass the limit.
    if all(keys) and (not keys or max(map(len, keys)) * 4 <= max_key_bytes):
        return
    for i, key in enumerate(keys):
        check_key(key, max_key_bytes, f"keys[{i}]")


def check_ttl_ms(ttl_ms: int, max_ttl_ms: int, field: str = "ttl_ms") -> None:
    if ttl_ms <= 0:
        raise InvalidRequest(f"{field} must be positive (got {ttl_ms}); omit it for the class TTL")
    if ttl_ms > max_ttl_ms:
        raise InvalidRequest(f"{field} must be at most {max_ttl_ms} (got {ttl_ms})")


def check_value(value: bytes, limit: int, key_class: str) -> None:
    if len(value) > limit:
        raise InvalidRequest(
            f"value is {len(value)} bytes; key class {key_class!r} allows at most {limit}"
        )


MAX_TAGS = 32


def check_tags(tags: Sequence[str], max_tag_bytes: int, where: str = "") -> None:
    """`where` names the request part holding them (e.g. "entries[3].")."""
    if len(tags) > MAX_TAGS:
        raise InvalidRequest(f"{where}tags has {len(tags)} entries; at most {MAX_TAGS} per value")
    for i, tag in enumerate(tags):
        check_key(tag, max_tag_bytes, f"{where}tags[{i}]")


def check_prefixes(prefixes: Sequence[str], max_key_bytes: int, max_batch: int) -> None:
    if len(prefixes) > max_batch:
        raise InvalidRequest(f"prefixes has {len(prefixes)} entries; at most {max_batch} per call")
    for i, prefix in enumerate(prefixes):
        check_key(prefix, max_key_bytes, f"prefixes[{i}]")


def check_classes(classes: Sequence[str], known: Sequence[str]) -> None:
    for i, name in enumerate(classes):
        if name not in known:
            raise InvalidRequest(
                f"classes[{i}] {name!r} is not a key class of this gateway "
                f"(known: {', '.join(known)})"
            )
