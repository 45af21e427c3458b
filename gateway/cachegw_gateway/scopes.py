"""Key-prefix scopes: which keys a token may name, RPC by RPC.

A token limited to prefixes (``prefixes = ["cart:", "session:"]``) may name keys starting
with one of them, and prefixes inside one of them. Tags and classes name no keys: a tag
or class invalidation, or a Warmup of the hot set, may reach keys outside the scopes,
so they need a token for all of the tenant's keys. Subscribe is narrowed instead of
refused: a stream asking for everything gets the events of its scopes.

Everything here is pure; tenancy.py calls it before a request reaches the tenant's space.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from cachegw.v1 import cache_pb2 as pb


class OutOfScope(Exception):
    """The request names something the token's scopes do not cover (PERMISSION_DENIED)."""


def _shown(prefixes: Sequence[str]) -> str:
    return ", ".join(repr(p) for p in prefixes)


def _check_keys(keys: Iterable[str], scopes: tuple[str, ...], field: str, token: str) -> None:
    for i, key in enumerate(keys):
        if not key.startswith(scopes):
            raise OutOfScope(
                f"{field}[{i}] {key!r} is outside the scopes of token {token!r} (keys "
                f"starting with {_shown(scopes)}): nothing was done"
            )


def _whole_tenant(what: str, scopes: tuple[str, ...], token: str) -> OutOfScope:
    return OutOfScope(
        f"{what} may reach keys outside the scopes of token {token!r} (keys starting with "
        f"{_shown(scopes)}): it needs a token for all of the tenant's keys; nothing was done"
    )


def check(method: str, request: Any, scopes: tuple[str, ...], token: str) -> None:
    """Raise OutOfScope when `request` (a parsed request of `method`) names a key or
    prefix outside `scopes` (non-empty), or asks for something only a whole-tenant token
    may. Subscribe is not checked here: see `narrow_subscribe`."""
    if method in ("Get", "Set", "Ttl", "Touch", "Incr", "Allow", "ReleaseLease"):
        _check_keys([request.key], scopes, "key", token)
    elif method in ("GetMany", "Delete", "DeleteMany"):
        _check_keys(request.keys, scopes, "keys", token)
    elif method == "SetMany":
        _check_keys((e.key for e in request.entries), scopes, "entries.key", token)
    elif method == "Invalidate":
        r: pb.InvalidateRequest = request
        _check_keys(r.keys, scopes, "keys", token)
        _check_keys(r.prefixes, scopes, "prefixes", token)
        if r.tags:
            raise _whole_tenant("A tag invalidation", scopes, token)
        if r.classes:
            raise _whole_tenant("A class invalidation", scopes, token)
    elif method == "Warmup":
        w: pb.WarmupRequest = request
        _check_keys(w.keys, scopes, "keys", token)
        _check_keys((e.key for e in w.entries), scopes, "entries.key", token)
        _check_keys(w.prefixes, scopes, "prefixes", token)
        if w.hot_keys:
            raise _whole_tenant("A Warmup of the hot keys", scopes, token)
    elif method == "Stats" and request.top_keys:
        raise _whole_tenant("The hot-key list (top_keys)", scopes, token)


def narrow_subscribe(
    request: pb.SubscribeRequest, scopes: tuple[str, ...], token: str
) -> pb.SubscribeRequest:
    """The Subscribe request a scoped token may make: its prefixes intersected with the
    scopes (a prefix covering a scope becomes that scope; none asked = the scopes).
    OutOfScope when a prefix asked for shares no key with any scope."""
    if not request.prefixes:
        wanted = list(scopes)
    else:
        wanted = []
        for i, p in enumerate(request.prefixes):
            if p.startswith(scopes):
                wanted.append(p)
                continue
            inside = [s for s in scopes if s.startswith(p)]
            if not inside:
                raise OutOfScope(
                    f"prefixes[{i}] {p!r} shares no key with the scopes of token {token!r} "
                    f"(keys starting with {_shown(scopes)}): nothing was subscribed"
                )
            wanted.extend(inside)
    narrowed = pb.SubscribeRequest()
    narrowed.CopyFrom(request)
    del narrowed.prefixes[:]
    narrowed.prefixes.extend(dict.fromkeys(wanted))
    return narrowed
