"""What a failed Redis call means for the caller, and what can be done about it.

Every Redis call goes through `RedisStore` (l2.py), which turns any failure into one of
the exceptions below with `classify`, counts it (`GatewayStats.redis_errors`, and
`error_replies` by kind for error replies) and marks Redis down where that is the truth.
The servicer maps them to status codes; docs/errors.md has the table.

    L2Unavailable          UNAVAILABLE         Redis cannot serve the call now; retry later
      L2ErrorReply         UNAVAILABLE         Redis answered with an error reply (READONLY,
                                               LOADING, BUSY, MASTERDOWN, ...): `kind`
        L2OutOfMemory      RESOURCE_EXHAUSTED  OOM: Redis is full and refuses writes
      L2OutcomeUnknown     UNAVAILABLE         a write's reply never came: the write may
                                               or may not have been applied

Each carries `kind` (the reply's code, or "connection" / "timeout" / "protocol" /
"client" when no reply came), `mark_down` (Redis cannot serve the gateway now: the
`redis_up` gauge goes false) and `writes_refused` (every write is refused until Redis
changes, although PING answers: the health probe then tries a write; see l2.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterCrossSlotError,
    ClusterDownError,
    ExecAbortError,
    InvalidResponse,
    MasterDownError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Errors that mean "Redis cannot answer now" (no reply came).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
)
# Everything a Redis call can raise that is about Redis (not a bug of the caller's). A
# cluster client's own failures (no node could give the slot map, a slot no node serves)
# are not RedisErrors in redis-py.
FAILURES: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    *UNAVAILABLE_ERRORS,
)

# Kinds of failure without a reply.
CONNECTION = "connection"  # refused, reset, closed: nothing or part of a reply came
TIMEOUT = "timeout"  # no reply within redis.socket_timeout
PROTOCOL = "protocol"  # a reply that is not RESP: the connection cannot be trusted
CLIENT = "client"  # redis-py refused the call before sending it

_MESSAGE_LIMIT = 300  # characters of Redis's own text quoted in a message


@dataclass(frozen=True, slots=True)
class ReplyRule:
    """What an error reply means: the advice a caller gets, and what it says of Redis."""

    advice: str
    mark_down: bool = False  # Redis cannot serve the gateway now
    writes_refused: bool = False  # every write is refused until Redis changes


_CLUSTER = ReplyRule(
    "the configured Redis is a Redis Cluster node, and the gateway supports standalone "
    "Redis only; point --redis-url at a standalone Redis"
)

# Error codes the gateway knows; any other reply counts as OTHER (kinds stay few, as
# they label a metric) and its message quotes what Redis said.
REPLIES: dict[str, ReplyRule] = {
    "READONLY": ReplyRule(
        "the configured Redis is a replica or was demoted by a failover; point "
        "--redis-url at the primary (retrying later may succeed after failover)",
        mark_down=True,
        writes_refused=True,
    ),
    "MASTERDOWN": ReplyRule(
        "the configured Redis is a replica that lost its primary and does not serve "
        "stale data (replica-serve-stale-data no); point --redis-url at the primary, or "
        "retry once the replica is in sync again",
        mark_down=True,
        writes_refused=True,
    ),
    "LOADING": ReplyRule(
        "Redis is loading its dataset into memory (after a restart or a full resync); "
        "retry in a few seconds",
        mark_down=True,
    ),
    "BUSY": ReplyRule(
        "a Lua script or function has run in Redis past busy-reply-threshold and blocks "
        "every other command; retry later, or end it with SCRIPT KILL or FUNCTION KILL",
        mark_down=True,
    ),
    "MISCONF": ReplyRule(
        "Redis cannot persist to disk and refuses writes (stop-writes-on-bgsave-error); "
        "fix its disk or persistence settings, then retry",
        mark_down=True,
        writes_refused=True,
    ),
    "NOREPLICAS": ReplyRule(
        "Redis has fewer good replicas than min-replicas-to-write and refuses writes; "
        "retry once they are back",
        mark_down=True,
        writes_refused=True,
    ),
    "OOM": ReplyRule(
        "Redis reached maxmemory and its maxmemory-policy refuses writes (noeviction, or "
        "volatile-* with nothing to evict); raise maxmemory or choose an evicting policy "
        "such as allkeys-lru (reads still work)",
    ),
    "NOSCRIPT": ReplyRule(
        "the gateway's Lua script was gone again right after it was loaded (is something "
        "running SCRIPT FLUSH?); retry"
    ),
    "CLUSTERDOWN": ReplyRule(
        "the Redis Cluster cannot serve this key's slot now; retry later", mark_down=True
    ),
    "TRYAGAIN": ReplyRule("the key's slot is moving between Redis Cluster nodes; retry"),
    "MOVED": _CLUSTER,
    "ASK": _CLUSTER,
    "CROSSSLOT": _CLUSTER,
    "NOAUTH": ReplyRule(
        "Redis requires a password and the gateway gave none; give it in the URL "
        "(redis://user:password@host:port/db), $CACHEGW_REDIS_PASSWORD or "
        "redis.password_file",
        mark_down=True,
    ),
    "WRONGPASS": ReplyRule(
        "Redis refused the gateway's user or password (from the URL, "
        "$CACHEGW_REDIS_USERNAME/$CACHEGW_REDIS_PASSWORD or redis.password_file: the start "
        "log line says which); correct them",
        mark_down=True,
    ),
    "NOPERM": ReplyRule(
        "the gateway's Redis user lacks a permission the gateway needs (its keys and "
        "channels, EVALSHA, SCRIPT LOAD, XADD, PUBLISH, ...); grant the ACL rules in "
        "docs/config.md (TLS and an ACL user for Redis) with ACL SETUSER; ACL LOG on Redis "
        "names what was denied"
    ),
    "WRONGTYPE": ReplyRule(
        "a key under the gateway's --redis-prefix holds another type of value; is another "
        "application writing under that prefix?"
    ),
    "ERR": ReplyRule("Redis refused the call; retry, and report it if it persists"),
    "OTHER": ReplyRule("Redis answered an error the gateway does not expect; retry later"),
}

# Codes of replies redis-py has a class for, when an instance carries no status_code
# (built by hand, or by a redis-py that does not record it). Subclasses first.
_CLASS_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (BusyLoadingError, "LOADING"),
    (ReadOnlyError, "READONLY"),
    (OutOfMemoryError, "OOM"),
    (NoScriptError, "NOSCRIPT"),
    (MasterDownError, "MASTERDOWN"),
    (ClusterDownError, "CLUSTERDOWN"),
    (TryAgainError, "TRYAGAIN"),
    (MovedError, "MOVED"),
    (AskError, "ASK"),
    (ClusterCrossSlotError, "CROSSSLOT"),
    (NoPermissionError, "NOPERM"),
    (AuthorizationError, "NOPERM"),
    (AuthenticationError, "WRONGPASS"),
    (ExecAbortError, "EXECABORT"),
)
_LEADING_CODE = re.compile(r"([A-Z]{2,32})(?: |$)")
# What Redis answers (as ERR) when a command inside a Lua script is denied by the ACL.
_SCRIPT_DENIED = "The user executing the script can't"


class L2Unavailable(Exception):
    """Redis cannot serve this call now; retrying later may succeed (UNAVAILABLE)."""

    def __init__(
        self,
        message: str,
        *,
        kind: str = CONNECTION,
        mark_down: bool = True,
        writes_refused: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.mark_down = mark_down
        self.writes_refused = writes_refused

    @property
    def is_reply(self) -> bool:
        """Redis answered (with an error reply); counted in `error_replies`."""
        return False


class L2ErrorReply(L2Unavailable):
    """Redis answered the call with an error reply; `kind` is its code."""

    def __init__(self, code: str, text: str) -> None:
        kind = code if code in REPLIES else "OTHER"
        if code == "ERR" and text.startswith(_SCRIPT_DENIED):
            kind = "NOPERM"  # an ACL denial inside a Lua script: the same fix
        rule = REPLIES[kind]
        said = f"{code} {text}".strip()
        if len(said) > _MESSAGE_LIMIT:
            said = said[: _MESSAGE_LIMIT - 3] + "..."
        super().__init__(
            f"redis answered {code}: {rule.advice} (redis said: {said})",
            kind=kind,
            mark_down=rule.mark_down,
            writes_refused=rule.writes_refused,
        )
        self.code = code
        self.reply = text

    @property
    def is_reply(self) -> bool:
        return True


class L2OutOfMemory(L2ErrorReply):
    """OOM: Redis is at maxmemory and refuses writes; reads still work (RESOURCE_EXHAUSTED)."""


class L2OutcomeUnknown(L2Unavailable):
    """A write was sent (or may have been) and no reply came: Redis may or may not have
    applied it. Never retried by the gateway: running it again could apply it twice."""


def reply_code(exc: BaseException) -> tuple[str, str]:
    """(code, text) of an error reply: ("READONLY", "You can't write against ...")."""
    text = str(exc.args[0]) if exc.args else ""
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        if text.startswith(code + " "):
            text = text[len(code) + 1 :]
        return code, text
    for cls, known in _CLASS_CODES:
        if isinstance(exc, cls):
            return known, text
    # redis-py keeps the code in the text of replies it has no class for ("BUSY ...").
    match = _LEADING_CODE.match(text)
    if match:
        return match.group(1), text[match.end() :]
    return "ERR", text


def _is_reply(exc: BaseException) -> bool:
    # LOADING and the authentication errors are ConnectionErrors in redis-py, but Redis
    # did answer them.
    return isinstance(
        exc, (ResponseError, BusyLoadingError, AuthenticationError, AuthorizationError)
    )


def classify(exc: BaseException, *, write: bool = False) -> L2Unavailable:
    """The gateway's exception for `exc`, raised by a Redis call (a write if `write`)."""
    if isinstance(exc, L2Unavailable):
        return exc
    if _is_reply(exc):
        code, text = reply_code(exc)
        if code == "OOM":
            return L2OutOfMemory(code, text)
        return L2ErrorReply(code, text)
    if isinstance(exc, RedisClusterException):
        return _cluster_failure(exc)
    if isinstance(exc, InvalidResponse):
        kind = PROTOCOL
    elif isinstance(exc, (RedisTimeoutError, TimeoutError)):
        kind = TIMEOUT
    elif isinstance(exc, (RedisConnectionError, OSError)):
        kind = CONNECTION
    else:
        return L2Unavailable(
            f"redis (L2) call failed in the gateway's client, retry later: {exc}",
            kind=CLIENT,
            mark_down=False,
        )
    if write:
        return L2OutcomeUnknown(
            f"redis (L2) is unavailable: it did not answer a write ({kind}: {exc}), so the "
            "write may or may not have been applied; read the key before repeating a "
            "compare-and-set or a lease fill",
            kind=kind,
        )
    return L2Unavailable(
        f"redis (L2) is unavailable, retry later: redis did not answer ({kind}): {exc}",
        kind=kind,
    )


def _cluster_failure(exc: RedisClusterException) -> L2Unavailable:
    """A Redis Cluster client's failure before it sent the call (so even a write was not
    applied): no node answered for the slot map (every one refused or timed out, as when
    this gateway is cut off from the cluster), or no node serves the key's slot now."""
    cause = exc.__cause__
    if isinstance(exc, SlotNotCoveredError) or isinstance(cause, UNAVAILABLE_ERRORS):
        kind = TIMEOUT if isinstance(cause, (RedisTimeoutError, TimeoutError)) else CONNECTION
        return L2Unavailable(
            f"redis (L2) is unavailable, retry later: the Redis Cluster could not be "
            f"reached ({kind}; nothing was sent): {exc}",
            kind=kind,
        )
    return L2Unavailable(
        f"redis (L2) call failed in the gateway's client, retry later: {exc}",
        kind=CLIENT,
        mark_down=False,
    )


def retryable(exc: BaseException) -> bool:
    """Whether a read that failed with `exc` is worth sending once more right away: the
    connection dropped or timed out (not an answer such as LOADING or a refused login)."""
    return isinstance(exc, UNAVAILABLE_ERRORS) and not _is_reply(exc)


def first_error(replies: Sequence[Any]) -> Exception | None:
    """The first error among a pipeline's results (execute(raise_on_error=False)): an
    error reply, or on a Cluster pipeline the connection error of one node's share."""
    for reply in replies:
        if isinstance(reply, Exception):
            return reply
    return None


def raise_first(replies: list[Any]) -> list[Any]:
    """`replies`, unless one of them is an error reply: then that error is raised."""
    error = first_error(replies)
    if error is not None:
        raise error
    return replies


def no_such_key(exc: BaseException) -> bool:
    """The error Redis answers XINFO STREAM (and the like) for a key that does not exist."""
    return isinstance(exc, ResponseError) and reply_code(exc) == ("ERR", "no such key")
