"""The tokens file: hashes of static bearer tokens, and client-certificate identities, each
with what it grants. Reloaded while the gateway runs (auth.py polls it).

    [[tokens]]
    name = "catalog-reader"            # shows in logs; never the token itself
    hash = "sha256:<64 hex digits>"    # `cachegw token hash` prints a token and this
    tenant = "shop"
    permissions = ["read", "subscribe"]
    prefixes = ["catalog:"]            # optional: every key of the tenant when left out
    expires = 2027-01-01T00:00:00Z     # optional

    [[identities]]                     # a verified client certificate (mTLS)
    subject = "URI:spiffe://shop/orders"   # or "CN=orders", "DNS:orders.shop.svc"
    tenant = "shop"
    permissions = ["read", "write"]

Only hashes are stored: whoever reads the file cannot call with its tokens. SHA-256 is
enough because tokens are 256 random bits (`new_token`): a slow password hash protects
guessable secrets, and nothing guesses these; the check stays one hash per new token.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachegw_gateway.principal import (
    CredentialError,
    Principal,
    check_name,
    check_prefixes,
    check_tenant,
    parse_permissions,
)

HASH_SCHEME = "sha256"
TOKEN_PREFIX = "cgw_"  # tells a cachegw token apart in a secret scanner or a config
_HASH = re.compile(r"sha256:([0-9a-f]{64})")
_SUBJECT = re.compile(r"(CN=|URI:|DNS:|IP:|email:)\S.*")
_ENTRY_KEYS = {"name", "hash", "tenant", "permissions", "prefixes", "expires"}
_IDENTITY_KEYS = {"subject", "name", "tenant", "permissions", "prefixes", "expires"}
# Longer is refused before hashing: no token of ours comes close.
MAX_TOKEN_CHARS = 4096


def new_token() -> str:
    """A fresh static token: 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """The hex SHA-256 of a token, as the tokens file keys it."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def token_hash(token: str) -> str:
    """The `hash` value of a token's entry: "sha256:<hex>"."""
    return f"{HASH_SCHEME}:{token_digest(token)}"


@dataclass(frozen=True)
class TokenTable:
    """One load of the tokens file: hex digest -> principal, identity -> principal."""

    by_digest: Mapping[str, Principal] = field(default_factory=dict)
    by_identity: Mapping[str, Principal] = field(default_factory=dict)

    def lookup(self, token: str) -> Principal | None:
        # Looked up by digest: what a lookup's timing could tell is about the digest,
        # which says nothing usable about any token.
        return self.by_digest.get(token_digest(token))

    def for_identities(self, identities: tuple[str, ...]) -> Principal | None:
        """The principal of the first identity the file names (CN=…, URI:…, DNS:…)."""
        for identity in identities:
            principal = self.by_identity.get(identity)
            if principal is not None:
                return principal
        return None

    @property
    def size(self) -> int:
        return len(self.by_digest) + len(self.by_identity)


def _expires(value: object, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise CredentialError(
                f"{where} must carry a time zone, e.g. 2027-01-01T00:00:00Z (got {value})"
            )
        return value.timestamp()
    raise CredentialError(
        f"{where} must be a TOML date-time with a time zone, e.g. 2027-01-01T00:00:00Z "
        f"(got {value!r})"
    )


def _grant(entry: Mapping[str, Any], where: str, name: str) -> Principal:
    if "tenant" not in entry:
        raise CredentialError(f"{where}.tenant is required")
    if "permissions" not in entry:
        raise CredentialError(f'{where}.permissions is required, e.g. ["read"]')
    return Principal(
        name=name,
        tenant=check_tenant(entry["tenant"], f"{where}.tenant"),
        permissions=parse_permissions(entry["permissions"], f"{where}.permissions"),
        prefixes=check_prefixes(entry.get("prefixes"), f"{where}.prefixes"),
        expires_at=_expires(entry.get("expires"), f"{where}.expires"),
    )


def _entries(doc: Mapping[str, Any], table: str, src: str) -> list[Mapping[str, Any]]:
    entries = doc.get(table, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CredentialError(f"{src}: {table} must be an array of tables: write [[{table}]]")
    return entries


def parse_tokens(doc: Mapping[str, Any], src: str) -> TokenTable:
    """The tokens file's TOML -> TokenTable; CredentialError names the entry and rule."""
    for top in doc:
        if top not in ("tokens", "identities"):
            raise CredentialError(
                f"{src}: unknown table {top!r}: the file holds [[tokens]] and [[identities]]"
            )
    by_digest: dict[str, Principal] = {}
    by_identity: dict[str, Principal] = {}
    names: dict[str, str] = {}

    def unique_name(name: str, at: str) -> None:
        if name in names:
            raise CredentialError(f"{src}: {at}.name {name!r} is already used by {names[name]}")
        names[name] = at

    for i, entry in enumerate(_entries(doc, "tokens", src)):
        at = f"tokens[{i}]"
        where = f"{src}: {at}"
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise CredentialError(
                f"{where}: unknown key {sorted(unknown)[0]} "
                f"(known: {', '.join(sorted(_ENTRY_KEYS))})"
            )
        name = check_name(entry.get("name"), f"{where}.name")
        unique_name(name, at)
        hashed = entry.get("hash")
        match = _HASH.fullmatch(hashed) if isinstance(hashed, str) else None
        if match is None:
            raise CredentialError(
                f'{where}.hash must be "sha256:" and 64 lowercase hex digits, as `cachegw '
                f"token hash` prints it (the file never holds a token itself)"
            )
        digest = match.group(1)
        if digest in by_digest:
            raise CredentialError(
                f"{where}.hash is the same as that of {by_digest[digest].name!r}: one token, "
                "one entry"
            )
        by_digest[digest] = _grant(entry, where, name)

    for i, entry in enumerate(_entries(doc, "identities", src)):
        at = f"identities[{i}]"
        where = f"{src}: {at}"
        unknown = set(entry) - _IDENTITY_KEYS
        if unknown:
            raise CredentialError(
                f"{where}: unknown key {sorted(unknown)[0]} "
                f"(known: {', '.join(sorted(_IDENTITY_KEYS))})"
            )
        subject = entry.get("subject")
        if not isinstance(subject, str) or not _SUBJECT.fullmatch(subject):
            raise CredentialError(
                f'{where}.subject must name a certificate identity: "CN=<common name>", '
                f'"URI:<uri SAN>", "DNS:<dns SAN>", "IP:<ip SAN>" or "email:<email SAN>" '
                f"(got {subject!r})"
            )
        if subject in by_identity:
            raise CredentialError(f"{where}.subject {subject!r} is listed twice")
        name = check_name(entry.get("name", _default_name(subject)), f"{where}.name")
        unique_name(name, at)
        by_identity[subject] = _grant(entry, where, name)
    return TokenTable(by_digest, by_identity)


def _default_name(subject: str) -> str:
    """A certificate identity as a credential name: spaces and odd characters as '_'."""
    return re.sub(r"[^A-Za-z0-9_.:@/=+-]", "_", subject)[:128]


def load_tokens(path: str | os.PathLike[str]) -> TokenTable:
    """Read and check the tokens file. Raises CredentialError with a fixable message."""
    src = os.fspath(path)
    try:
        data = Path(src).read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{src}: tokens file not found") from None
    except OSError as exc:
        raise CredentialError(f"{src}: cannot read the tokens file: {exc.strerror}") from None
    return parse_tokens_bytes(data, src)


def parse_tokens_bytes(data: bytes, src: str) -> TokenTable:
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CredentialError(f"{src}: not valid TOML: the file is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise CredentialError(f"{src}: not valid TOML: {exc}") from None
    return parse_tokens(doc, src)


def entry_text(
    *,
    name: str,
    token: str,
    tenant: str,
    permissions: list[str],
    prefixes: list[str],
    expires: datetime.datetime | None,
) -> str:
    """The [[tokens]] entry for `token`, to paste into the tokens file."""
    lines = [
        "[[tokens]]",
        f'name = "{name}"',
        f'hash = "{token_hash(token)}"',
        f'tenant = "{tenant}"',
        "permissions = [" + ", ".join(f'"{p}"' for p in permissions) + "]",
    ]
    if prefixes:
        lines.append("prefixes = [" + ", ".join(_toml_string(p) for p in prefixes) + "]")
    if expires is not None:
        stamp = expires.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines.append(f"expires = {stamp}")
    return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in escaped)
    return f'"{escaped}"'
