"""What `redis.url` names: parsed and checked once, at config time, into a `RedisTarget`.

    redis://[user:pass@]host[:port][/db]        standalone (rediss:// with TLS)
    unix://[user:pass@]/path/to/socket[?db=N]    standalone over a Unix socket
    redis+sentinel://[user:pass@]host:port[,host:port...]/SERVICE[?db=N]
                                                 the primary of SERVICE, as the listed
                                                 Sentinels name it (port 26379 if none)
    redis+cluster://[user:pass@]host:port[,host:port...]
                                                 a Redis Cluster, from its seed nodes
                                                 (cluster_url.py)

An extra ``s`` turns TLS on, as ``rediss://`` does for one node: ``rediss+sentinel://``
speaks TLS to the Sentinels and to the primary they name, ``rediss+cluster://`` to every
node of the Cluster (redis_tls.py says with which CA and client certificate).

Standalone URLs are handed to redis-py without their credentials (`without_credentials`:
they go through a credential provider, redis_auth.py). A Sentinel URL is parsed here,
because redis-py has no URL form for it: credentials are those of the Redis nodes (the
Sentinels' own are ``redis.sentinel_username``/``sentinel_password``), and `db` is the
database on the primary. Credentials never appear in a message: `redact` is the one
helper every log line, error and figure that shows a Redis URL goes through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, unquote

from cachegw_gateway import cluster_url

STANDALONE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_TLS_SCHEME = "rediss+sentinel"
SENTINEL_PORT = 26379
_SERVICE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_SENTINEL_QUERY = ("db",)

CLUSTER_SCHEME = "redis+cluster"
CLUSTER_TLS_SCHEME = "rediss+cluster"
TLS_SCHEMES = ("rediss", SENTINEL_TLS_SCHEME, CLUSTER_TLS_SCHEME)
# Query parameters whose value is a secret (redis-py reads a password from the query too).
_SECRET_PARAMS = frozenset({"password", "sentinel_password", "ssl_password"})

Kind = Literal["standalone", "sentinel", "cluster"]


class RedisUrlError(ValueError):
    """`redis.url` cannot be used; the message says why (without credentials)."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """The Redis a gateway talks to. `hosts` are the Sentinels for kind "sentinel"."""

    kind: Kind
    url: str = field(repr=False)  # as given (with its credentials)
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @property
    def redacted(self) -> str:
        return redact(self.url)


def redact(url: str) -> str:
    """`url` with its password (if any) replaced by ``***``: in the user info and in a
    ``password=`` query parameter. Everything up to the last '@' before the query counts
    as credentials, so that even a password holding an unescaped '/' or '@' is hidden
    whole. Every URL of a Redis that reaches a log line, an error or a figure goes
    through here."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    body, q, query = rest.partition("?")
    if query:
        query = "&".join(_redact_param(item) for item in query.split("&"))
    userinfo, at, after = body.rpartition("@")
    if not at or ":" not in userinfo:
        return f"{scheme}://{body}{q}{query}"
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{after}{q}{query}"


def _redact_param(item: str) -> str:
    name, eq, value = item.partition("=")
    if eq and unquote(name).lower() in _SECRET_PARAMS and value:
        return f"{name}=***"
    return item


def without_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(`url` without user info and without username/password query parameters, the
    username, the password), for a standalone URL: redis-py then takes the credentials
    from a provider (redis_auth.py) and never holds them in its connection arguments."""
    scheme, sep, rest = url.partition("://")
    body, q, query = rest.partition("?")
    userinfo, at, after = body.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        body = after
    kept = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        key = unquote(name).lower()
        if key == "password":
            password = password if password is not None else unquote(value)
        elif key == "username":
            username = username if username is not None else (unquote(value) or None)
        else:
            kept.append(item)
    rest_query = "&".join(kept)
    return f"{scheme}{sep}{body}{q if rest_query else ''}{rest_query}", username, password


def parse(url: str) -> RedisTarget:
    """The target `url` names; RedisUrlError (quoting `url` redacted) when it names none."""
    scheme, sep, _ = url.partition("://")
    tls = scheme in TLS_SCHEMES
    if sep and scheme in STANDALONE_SCHEMES:
        _, username, password = without_credentials(url)
        return RedisTarget("standalone", url, username=username, password=password, tls=tls)
    if sep and scheme in (SENTINEL_SCHEME, SENTINEL_TLS_SCHEME):
        return _parse_sentinel(url)
    if sep and scheme in (CLUSTER_SCHEME, CLUSTER_TLS_SCHEME):
        try:
            seeds, username, password = cluster_url.parse_seeds(url)
        except ValueError as exc:
            raise RedisUrlError(
                f"is not a valid Cluster URL: {exc} (got {redact(url)!r})"
            ) from None
        return RedisTarget(
            "cluster", url, hosts=tuple(seeds), username=username, password=password, tls=tls
        )
    schemes = (
        *STANDALONE_SCHEMES,
        SENTINEL_SCHEME,
        SENTINEL_TLS_SCHEME,
        CLUSTER_SCHEME,
        CLUSTER_TLS_SCHEME,
    )
    raise RedisUrlError(
        f"must start with {', '.join(s + '://' for s in schemes)} or be empty (got {redact(url)!r})"
    )


def _fail(url: str, why: str) -> RedisUrlError:
    return RedisUrlError(
        f"is not a valid Sentinel URL: {why}; expected "
        f"redis[s]+sentinel://[user:pass@]host:port[,host:port...]/SERVICE[?db=N] "
        f"(got {redact(url)!r})"
    )


def _host_port(url: str, item: str) -> tuple[str, int]:
    if not item:
        raise _fail(url, "an empty entry in the Sentinel list")
    if item.startswith("["):  # [IPv6]:port
        host, close, rest = item[1:].partition("]")
        if not close or not host or (rest and not rest.startswith(":")):
            raise _fail(url, f"bad IPv6 address {item!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = item.partition(":")
        if not host or ":" in port_text:
            raise _fail(url, f"bad Sentinel address {item!r} (IPv6 goes in brackets)")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _fail(url, f"port of {item!r} must be 1..65535")
    return host, int(port_text)


def _parse_sentinel(url: str) -> RedisTarget:
    rest = url.partition("://")[2]
    rest, _, fragment = rest.partition("#")
    if fragment:
        raise _fail(url, "a #fragment means nothing here")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hosts_text = authority.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if username is None and password is None:
            raise _fail(url, "an empty user:password before '@'")
    hosts = tuple(_host_port(url, item) for item in hosts_text.split(","))
    if len(set(hosts)) != len(hosts):
        raise _fail(url, "a Sentinel is listed twice")
    service = unquote(path)
    if not slash or not service:
        raise _fail(url, "no SERVICE (the name the Sentinels monitor) after the hosts")
    if not _SERVICE.fullmatch(service):
        raise _fail(url, f"SERVICE {service!r} must be 1-128 of A-Z a-z 0-9 . _ -")
    db = 0
    if query:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(params) - set(_SENTINEL_QUERY))
        if unknown:
            raise _fail(url, f"unknown parameter {unknown[0]!r} (known: db)")
        values = params.get("db", [])
        if len(values) > 1:
            raise _fail(url, "db given twice")
        if values:
            if not values[0].isdigit():
                raise _fail(url, f"db must be a non-negative integer (got {values[0]!r})")
            db = int(values[0])
    return RedisTarget(
        "sentinel",
        url,
        hosts=hosts,
        service=service,
        db=db,
        username=username,
        password=password,
        tls=url.startswith(SENTINEL_TLS_SCHEME + "://"),
    )
