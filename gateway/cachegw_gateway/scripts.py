"""Lua scripts run by their SHA1, reloaded when Redis lost them.

Redis forgets every loaded script on a restart, a failover to a replica that never saw
them, or SCRIPT FLUSH; EVALSHA then answers NOSCRIPT, which means the script did not
run. So a `Script` loads it (SCRIPT LOAD) and runs it once more: safe for any script,
writes included, because nothing ran. (A call that failed any other way, a timeout or
a dropped connection, may have run; it is never repeated here.)

::

    set_script = Script(client, SOURCE)
    reply = await set_script(keys=[...], args=[...])

Every write the gateway sends is one script called alone (see l2.py), never a script in
a pipeline: redis-py's `register_script` would cost a `SCRIPT EXISTS` round trip before
each such pipeline, and re-running a pipeline after NOSCRIPT would repeat what did run.
`load_all` loads a client's scripts up front (at start), so that the first call of each
is one round trip too.
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

# Every script created in this process, by SHA1 (a script's text decides its SHA1, so
# one table serves every client and every Redis).
_SOURCES: dict[str, str] = {}
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

    __slots__ = ("client", "sha", "source")

    def __init__(self, client: aioredis.Redis, source: str) -> None:
        self.client = client
        self.source = source
        # Redis names a script by the SHA1 of its bytes; redis-py sends str as UTF-8.
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        _SOURCES[self.sha] = source

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
            raise TypeError("scripts run alone, never in a pipeline (see the module's docstring)")
        try:
            return await target.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await target.script_load(self.source)
            _note_reload([self.sha])
            return await target.evalsha(self.sha, len(keys), *keys, *args)


async def load_all(client: aioredis.Redis) -> None:
    """SCRIPT LOAD every script created in this process into `client`'s Redis."""
    for source in _SOURCES.values():
        await client.script_load(source)
