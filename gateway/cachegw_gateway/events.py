"""Invalidation events: building them, reading their ids, and filtering them per subscriber.

An event is a `cachegw.v1.InvalidationEvent`. Its id is the id Redis gave it in the
deployment's audit stream (``<ms>-<seq>``), so ids order events exactly as they were
published and `Subscribe(since=id)` can resume from the stream.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence

from cachegw.v1 import cache_pb2 as pb

StreamId = tuple[int, int]

_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_MAX_PART = 2**64 - 1


def parse_id(event_id: str) -> StreamId:
    """("<ms>-<seq>") -> (ms, seq); ValueError for anything else."""
    m = _STREAM_ID.fullmatch(event_id)
    if m is None:
        raise ValueError(
            f"{event_id!r} is not an event id (expected <ms>-<seq>, e.g. 1700000000000-0)"
        )
    ms, seq = int(m.group(1)), int(m.group(2))
    # Redis stream ids are two unsigned 64-bit integers: a larger part would reach Redis
    # and come back as an error reply (UNAVAILABLE), not as the caller's mistake.
    if ms > _MAX_PART or seq > _MAX_PART:
        raise ValueError(f"{event_id!r} is not an event id (each part is at most {_MAX_PART})")
    return ms, seq


def format_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


def make(
    *,
    origin: str,
    keys: Sequence[str] = (),
    prefixes: Sequence[str] = (),
    tags: Sequence[str] = (),
    classes: Sequence[str] = (),
) -> pb.InvalidationEvent:
    """An event without id (Redis assigns it when the event is published)."""
    if classes:
        kind = pb.EVENT_KIND_CLASSES
    elif tags:
        kind = pb.EVENT_KIND_TAGS
    elif prefixes:
        kind = pb.EVENT_KIND_PREFIXES
    else:
        kind = pb.EVENT_KIND_KEYS
    return pb.InvalidationEvent(
        kind=kind,
        keys=keys,
        prefixes=prefixes,
        tags=tags,
        classes=classes,
        timestamp_ms=time.time_ns() // 1_000_000,
        origin=origin,
    )


def reset(origin: str) -> pb.InvalidationEvent:
    """Drop everything cached: the sender may have missed events."""
    return pb.InvalidationEvent(
        kind=pb.EVENT_KIND_RESET, timestamp_ms=time.time_ns() // 1_000_000, origin=origin
    )


def is_reset(event: pb.InvalidationEvent) -> bool:
    return event.kind == pb.EVENT_KIND_RESET


class EventFilter:
    """What one Subscribe stream asked for: events touching these prefixes and classes.

    Keys are checked exactly (prefix and class of each key). A prefix event passes when it
    overlaps a wanted prefix. Tags name no keys, so tag events always pass (a subscriber
    applies them to what it holds). A class event passes when the class is wanted, or
    when only prefixes were asked for (the class may have keys under them). RESET always
    passes. An event with nothing left after filtering is not sent.
    """

    def __init__(
        self, prefixes: Sequence[str], classes: Sequence[str], classify: Callable[[str], str]
    ) -> None:
        self.prefixes = tuple(prefixes)
        self.classes = frozenset(classes)
        self._classify = classify

    @property
    def everything(self) -> bool:
        return not self.prefixes and not self.classes

    def _key_wanted(self, key: str) -> bool:
        if self.prefixes and not key.startswith(self.prefixes):
            return False
        return not self.classes or self._classify(key) in self.classes

    def select(self, event: pb.InvalidationEvent) -> pb.InvalidationEvent | None:
        if self.everything or event.kind == pb.EVENT_KIND_RESET:
            return event
        keys = [k for k in event.keys if self._key_wanted(k)]
        prefixes = [
            p
            for p in event.prefixes
            if not self.prefixes or any(p.startswith(w) or w.startswith(p) for w in self.prefixes)
        ]
        classes = [c for c in event.classes if not self.classes or c in self.classes]
        tags = list(event.tags)
        if not (keys or prefixes or classes or tags):
            return None
        if (
            len(keys) == len(event.keys)
            and len(prefixes) == len(event.prefixes)
            and len(classes) == len(event.classes)
        ):
            return event
        return pb.InvalidationEvent(
            id=event.id,
            kind=event.kind,
            keys=keys,
            prefixes=prefixes,
            tags=tags,
            classes=classes,
            timestamp_ms=event.timestamp_ms,
            origin=event.origin,
            relayed_from=event.relayed_from,
            relayed_id=event.relayed_id,
        )
