"""Who the gateway is to Redis: the ACL user and password, and where each comes from.

Precedence, first found wins (each part on its own):

    username   the URL's user  >  redis.username ($CACHEGW_REDIS_USERNAME, --redis-username)
    password   the URL's password  >  $CACHEGW_REDIS_PASSWORD  >  redis.password_file

A password is never read from the config file itself (config.py refuses it). The file is
read again for every new connection, so a rotated password is picked up without a
restart (connections already open stay authenticated, as Redis keeps them). The
Sentinels' own credentials follow the same rule with ``redis.sentinel_username``,
$CACHEGW_REDIS_SENTINEL_PASSWORD and ``redis.sentinel_password_file``.

redis-py gets the credentials from a `RedisCredentials` provider, never as connection
arguments: they appear in no repr, no URL and no span. `describe` says where they came
from (for the start log line), without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from redis.credentials import CredentialProvider
from redis.exceptions import ConnectionError as RedisConnectionError

if TYPE_CHECKING:
    from cachegw_gateway.config import RedisConfig
    from cachegw_gateway.redis_url import RedisTarget

_MAX_FILE_BYTES = 64 * 1024  # a password file is a line, not a dataset


def read_password_file(path: str) -> str:
    """The password in `path`: its text without the trailing newline. ValueError (the
    message follows the key's name, and never quotes the file's content) otherwise."""
    try:
        raw = Path(path).expanduser().read_bytes()[: _MAX_FILE_BYTES + 1]
    except FileNotFoundError:
        raise ValueError(f"names {path!r}, which does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"names {path!r}, a directory, not a file holding the password") from None
    except OSError as exc:
        raise ValueError(f"names {path!r}, which cannot be read: {exc.strerror}") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise ValueError(f"names {path!r}, larger than {_MAX_FILE_BYTES} bytes: not a password")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"names {path!r}, which is not UTF-8 text") from None
    password = text.rstrip("\r\n")
    if not password:
        raise ValueError(f"names {path!r}, which is empty")
    if "\n" in password or "\r" in password:
        raise ValueError(f"names {path!r}, which holds more than one line")
    return password


@dataclass(frozen=True)
class RedisCredentials(CredentialProvider):
    """redis-py's credential provider: AUTH [user] password on each new connection."""

    username: str | None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    user_from: str = ""
    password_from: str = ""

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self.password
        if self.password_file is not None:
            try:
                password = read_password_file(self.password_file)
            except ValueError as exc:
                # A connection error: the pool drops this connection and the call fails
                # UNAVAILABLE with this message, as when Redis cannot be reached.
                raise RedisConnectionError(f"redis password file {exc}") from None
        if self.username:
            return (self.username, password or "")
        return (password or "",)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()

    def describe(self) -> str:
        """Where the credentials come from, e.g. ``user 'gw' (from the URL), password
        from redis.password_file (/run/secrets/redis)``: safe to log."""
        user = f"user {self.username!r} ({self.user_from})" if self.username else "default user"
        if self.password_file is not None:
            return f"{user}, password from {self.password_from} ({self.password_file})"
        if self.password is not None:
            return f"{user}, password from {self.password_from}"
        return f"{user}, no password"


def _resolve(
    url_user: str | None,
    url_password: str | None,
    username: str,
    password: str,
    password_file: str,
    names: tuple[str, str, str],
) -> RedisCredentials | None:
    user_key, env_var, file_key = names
    user, user_from = (url_user, "from the URL") if url_user else (username or None, user_key)
    if url_password is not None:
        return RedisCredentials(user, url_password, None, user_from, "the URL")
    if password:
        return RedisCredentials(user, password, None, user_from, env_var)
    if password_file:
        return RedisCredentials(user, None, password_file, user_from, file_key)
    if user:
        return RedisCredentials(user, None, None, user_from, "")
    return None


def node_credentials(config: RedisConfig, target: RedisTarget) -> RedisCredentials | None:
    """The Redis nodes' credentials (None: connect without AUTH)."""
    return _resolve(
        target.username,
        target.password,
        config.username,
        config.password,
        config.password_file,
        ("redis.username", "$CACHEGW_REDIS_PASSWORD", "redis.password_file"),
    )


def sentinel_credentials(config: RedisConfig) -> RedisCredentials | None:
    """The Sentinels' own credentials (None: ask them without AUTH)."""
    return _resolve(
        None,
        None,
        config.sentinel_username,
        config.sentinel_password,
        config.sentinel_password_file,
        (
            "redis.sentinel_username",
            "$CACHEGW_REDIS_SENTINEL_PASSWORD",
            "redis.sentinel_password_file",
        ),
    )


def describe(config: RedisConfig, target: RedisTarget) -> str:
    """The start log line's account of the credentials (never the password)."""
    nodes = node_credentials(config, target)
    text = nodes.describe() if nodes is not None else "no credentials"
    if target.kind == "sentinel":
        sentinels = sentinel_credentials(config)
        text += "; Sentinels: " + (sentinels.describe() if sentinels else "no credentials")
    return text
