"""Lua scripts run by their SHA1, reloaded when Redis lost them.

Redis forgets every loaded script on a restart, a failover to a replica that never saw
them, or SCRIPT FLUSH; EVALSHA then answers NOSCRIPT, which means the script did not
run. So a `Script` loads it (SCRIPT LOAD) and runs it once more: safe for any script,
writes included, because nothing ran. (A call that failed any other way, a timeout or
a dropped connection, may have run; it is never repeated here.)

Called alone::

    set_script = Script(client, SOURCE)
    reply = await set_script(keys=[...], args=[...])

In a non-transactional pipeline, without redis-py's `SCRIPT EXISTS` round trip before
every execution (what `register_script` costs in a pipeline)::

    async with client.pipeline(transaction=False) as pipe:
        pipe.get(...)
        set_script.queue(pipe, keys=[...], args=[...])
        replies = await scripts.execute(pipe)  # errors stay in the list, as replies

When a NOSCRIPT comes back, `execute` loads the pipeline's scripts and runs the whole
pipeline once more, which repeats what did run the first time: only when every such
command is a read or a script created with ``idempotent=True``. Otherwise the replies
are returned as they came (the NOSCRIPT among them) after loading the scripts, so the
caller's next call finds them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, KeyT

log = logging.getLogger(__name__)

# Every script created in this process, by SHA1: what `execute` reloads. A script's text
# decides its SHA1, so one table serves every client and every Redis.
_SOURCES: dict[str, str] = {}
_IDEMPOTENT: set[str] = set()
# Commands that may run twice with no effect: repeated when a pipeline is run again.
_READS = frozenset(
    {"GET", "MGET", "PTTL", "TTL", "EXISTS", "ZRANGE", "ZREVRANGE", "ZSCORE", "ZCARD"}
    | {"XRANGE", "XINFO STREAM", "PING", "SCRIPT EXISTS"}
)
_RELOAD_LOG_EVERY = 60.0  # seconds between two "reloaded" log lines at most
_last_reload_log = -_RELOAD_LOG_EVERY


def _note_reload(shas: Sequence[str]) -> None:
    global _last_reload_log
    now = time.monotonic()
    if now - _last_reload_log >= _RELOAD_LOG_EVERY:
        _last_reload_log = now
        log.info(
            "redis had lost %d of the gateway's Lua scripts (restart, failover or SCRIPT "
            "FLUSH): loaded them again",
            len(shas),
        )


class Script:
    """One Lua script, bound to a client; see the module's docstring."""

    __slots__ = ("client", "idempotent", "sha", "source")

    def __init__(self, client: aioredis.Redis, source: str, *, idempotent: bool = False) -> None:
        self.client = client
        self.source = source
        # Redis names a script by the SHA1 of its bytes; redis-py sends str as UTF-8.
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.idempotent = idempotent
        _SOURCES[self.sha] = source
        if idempotent:
            _IDEMPOTENT.add(self.sha)

    def __repr__(self) -> str:
        return f"<Script {self.sha[:12]}>"

    async def __call__(
        self,
        keys: Sequence[KeyT] = (),
        args: Sequence[EncodableT] = (),
        client: aioredis.Redis | None = None,
    ) -> Any:
        """EVALSHA; after NOSCRIPT (the script did not run), SCRIPT LOAD and once more."""
        target = self.client if client is None else client
        if isinstance(target, Pipeline):
            raise TypeError("a script joins a pipeline with queue(), then scripts.execute()")
        try:
            return await target.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await target.script_load(self.source)
            _note_reload([self.sha])
            return await target.evalsha(self.sha, len(keys), *keys, *args)

    def queue(
        self, pipe: Pipeline, keys: Sequence[KeyT] = (), args: Sequence[EncodableT] = ()
    ) -> None:
        """Add EVALSHA to `pipe` (no SCRIPT EXISTS first); run it with `execute(pipe)`."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)


def _command(entry: tuple[Any, ...]) -> str:
    args = entry[0]
    name = str(args[0]).upper()
    if name in ("XINFO", "SCRIPT") and len(args) > 1:
        name = f"{name} {str(args[1]).upper()}"
    return name


def _sha(entry: tuple[Any, ...]) -> str | None:
    args = entry[0]
    if str(args[0]).upper() == "EVALSHA" and len(args) > 1:
        sha = args[1]
        return sha.decode() if isinstance(sha, bytes) else str(sha)
    return None


def _repeatable(entry: tuple[Any, ...]) -> bool:
    sha = _sha(entry)
    return sha in _IDEMPOTENT if sha is not None else _command(entry) in _READS


async def execute(pipe: Pipeline) -> list[Any]:
    """Run a non-transactional pipeline whose scripts were queued with `Script.queue`.

    Returns the replies with errors in place (``raise_on_error=False``). On NOSCRIPT:
    loads the pipeline's scripts, then runs it once more when that repeats nothing
    unsafe (see the module's docstring)."""
    if pipe.is_transaction:
        raise TypeError("scripts.execute() runs non-transactional pipelines only")
    stack = list(pipe.command_stack)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
    if not missing:
        return replies
    shas = list(dict.fromkeys(s for s in map(_sha, stack) if s is not None))
    if any(sha not in _SOURCES for sha in shas):
        return replies  # not ours to load: the caller sees NOSCRIPT
    for sha in shas:
        pipe.script_load(_SOURCES[sha])
    loaded = await pipe.execute(raise_on_error=False)
    if any(isinstance(r, Exception) for r in loaded):
        return replies
    _note_reload(shas)
    ran = (e for e, r in zip(stack, replies, strict=True) if not isinstance(r, NoScriptError))
    if not all(_repeatable(entry) for entry in ran):
        return replies
    pipe.command_stack.extend(stack)
    again: list[Any] = await pipe.execute(raise_on_error=False)
    return again
