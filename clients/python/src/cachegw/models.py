"""What the client returns: read results (`Entry`) and write results (`SetResult`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "AllowResult",
    "Entry",
    "Event",
    "EventKind",
    "InvalidateResult",
    "RebuildProgress",
    "SetOutcome",
    "SetResult",
    "Status",
    "Tier",
]


class Status(enum.Enum):
    """What a read found."""

    HIT = "HIT"
    """The value is fresh."""
    MISS = "MISS"
    """Nothing is cached (and no lease was asked for, or none could be granted in time)."""
    LEASED = "LEASED"
    """Nothing is cached; this caller holds `Entry.lease_token` and should load and set."""
    STALE = "STALE"
    """The value is past its soft expiry, inside the class's stale window; or Redis
    cannot be reached and this is the gateway's last copy, within the class's
    stale_if_error_seconds past its freshness."""
    NOT_FOUND = "NOT_FOUND"
    """A read-through class only: the key's origin says the key does not exist (just now,
    or within the class's negative_ttl_seconds). `value` is None, as for a miss."""


class Tier(enum.Enum):
    """Which tier answered a read."""

    L1 = "L1"
    """The gateway's in-process cache."""
    L2 = "L2"
    """Redis."""
    ORIGIN = "ORIGIN"
    """Nobody had it: the caller (or a lease holder) loads it from the source of truth."""
    NONE = "NONE"
    """The gateway did not say."""


class SetOutcome(enum.Enum):
    """Why a set did or did not store."""

    STORED = "STORED"
    LEASE_INVALID = "LEASE_INVALID"
    """The lease token is unknown, expired, or the key was invalidated since it was granted."""
    VERSION_CONFLICT = "VERSION_CONFLICT"
    """`if_version` did not match the stored version."""
    CONDITION_FAILED = "CONDITION_FAILED"
    """`if_absent` found a value, or `if_present` found none."""


@dataclass(frozen=True, slots=True)
class Entry:
    """The result of a read of one key."""

    status: Status
    value: bytes | None
    """The value on HIT and STALE, else None."""
    tier: Tier
    lease_token: bytes = b""
    """Set on LEASED, and on HIT when `refresh` is true: pass it back to `set`."""
    refresh: bool = False
    """This caller was picked to refresh the key early (it holds `lease_token`)."""
    ttl_remaining: float = 0.0
    """Seconds until the entry expires in Redis, as seen by the gateway; 0 on a miss."""
    version: int = 0
    """Version of the stored entry (monotonic per key write); 0 on a miss."""
    key_class: str = ""
    """The key class whose policy applied."""
    tags: tuple[str, ...] = ()
    """The tags the value was stored with (HIT and STALE)."""

    @property
    def hit(self) -> bool:
        """True when `value` holds a value (HIT or STALE)."""
        return self.status is Status.HIT or self.status is Status.STALE


@dataclass(frozen=True, slots=True)
class SetResult:
    """The result of a set."""

    outcome: SetOutcome
    version: int
    """The version now stored (on STORED) or found (on VERSION_CONFLICT)."""
    ttl: float
    """The TTL applied after jitter, in seconds."""
    key_class: str

    @property
    def stored(self) -> bool:
        return self.outcome is SetOutcome.STORED


@dataclass(frozen=True, slots=True)
class AllowResult:
    """The answer of `allow`: may this request go ahead under the key's rate limit?"""

    allowed: bool
    remaining: int
    """Requests of cost 1 still allowed right now."""
    retry_after: float
    """When refused: seconds to wait before the same request can be allowed; 0 when allowed."""
    reset_after: float
    """Seconds until the limit is back to full."""
    key_class: str = ""
    """The key class (whose named limit applied when the call gave none)."""

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True, slots=True)
class InvalidateResult:
    """The result of an invalidate."""

    removed: int
    """Stored keys removed (a class-wide invalidation counts 0: it is O(1))."""
    event_id: str
    """The published event's id; `subscribe(since=...)` resumes after it."""


@dataclass(frozen=True, slots=True)
class RebuildProgress:
    """What one `rebuild` call (Warmup from the origins) went through."""

    done: bool
    """Everything asked was gone through; else call again with `resume`."""
    resume: str
    """Where to carry on (pass it back with the same request) when not done."""
    loaded: int
    """Keys Redis already held fresh (copied into L1, not loaded again)."""
    origin_loaded: int
    """Keys loaded from their origin and stored."""
    not_found: int
    """Keys their origin does not have."""
    listed: int
    """Keys the origins listed for the prefixes."""
    skipped: int
    """Keys another caller was loading at the time (left to it)."""
    missing: int
    """Keys of classes without an origin that Redis does not hold."""
    failed: int
    """Keys that failed (`error` says why)."""
    error: str
    retry_after_ms: int
    """When the rate stopped the call: how long until its tokens come."""


class EventKind(enum.Enum):
    """What an invalidation event names; `RESET` means drop everything cached."""

    KEYS = "KEYS"
    PREFIXES = "PREFIXES"
    TAGS = "TAGS"
    CLASSES = "CLASSES"
    RESET = "RESET"


@dataclass(frozen=True, slots=True)
class Event:
    """One invalidation, as a `subscribe` stream delivers it. Apply every field present."""

    id: str
    """Its id in the deployment's event stream ("<ms>-<seq>"); empty on a gateway's RESET."""
    kind: EventKind
    keys: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    timestamp: float = 0.0
    """When it was published, seconds since the Unix epoch."""
    origin: str = ""
    """The gateway that published it."""
