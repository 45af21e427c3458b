"""`cachegw token`: provision credentials for a gateway with [auth] enabled.

cachegw token hash --name NAME --tenant T --permissions read,write [--prefix P ...]
                   [--expires 2027-01-01T00:00:00Z | --days N]
                   [--token-out FILE | --stdin] >> tokens.toml
    makes a new random token and prints the [[tokens]] entry for the tokens file on
    standard output (only the hash: safe to append); the token itself goes to
    standard error, or to a new file readable by its owner alone (--token-out). The
    gateway picks the entry up within auth.reload_seconds. With --stdin, hashes the
    token read from standard input instead of making one.
cachegw token sign --key FILE [--algorithm ES256] --tenant T --permissions read
                   [--prefix P ...] [--ttl SECONDS] [--sub NAME] [--issuer I]
                   [--audience A]
    prints a signed token (JWT) made with the issuer's key: for tests and
    development; production tokens come from the deployment's own issuer.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cachegw_gateway.jwt_tokens import ALGORITHMS, HMAC_ALGORITHMS
from cachegw_gateway.principal import (
    CredentialError,
    check_name,
    check_prefixes,
    check_tenant,
    parse_permissions,
)
from cachegw_gateway.tokens import MAX_TOKEN_CHARS, entry_text, new_token


def _grant_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", required=True, help="the tenant whose keys the token reaches")
    p.add_argument(
        "--permissions",
        required=True,
        help="comma-separated: read, write, invalidate, subscribe, admin (or all)",
    )
    p.add_argument(
        "--prefix",
        action="append",
        default=[],
        dest="prefixes",
        help="a key prefix the token is limited to (repeat; default: every key of the tenant)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachegw token", description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    h = commands.add_parser("hash", help="a new token and its tokens-file entry")
    h.add_argument("--name", required=True, help="names the token in logs and errors")
    _grant_arguments(h)
    when = h.add_mutually_exclusive_group()
    when.add_argument("--expires", help="when it stops working, e.g. 2027-01-01T00:00:00Z")
    when.add_argument("--days", type=float, help="stops working this many days from now")
    source = h.add_mutually_exclusive_group()
    source.add_argument(
        "--stdin", action="store_true", help="hash the token on standard input, make none"
    )
    source.add_argument(
        "--token-out", metavar="FILE", help="write the new token to FILE (created, mode 0600)"
    )
    s = commands.add_parser("sign", help="a signed token (JWT), for tests and development")
    s.add_argument("--key", required=True, help="the private key (PEM) or HS shared secret file")
    s.add_argument("--algorithm", default="HS256", choices=ALGORITHMS)
    _grant_arguments(s)
    s.add_argument("--ttl", type=float, default=3600.0, help="seconds until exp (default 3600)")
    s.add_argument("--sub", default="dev", help="the caller's name in logs (sub claim)")
    s.add_argument("--issuer", default="", help="the iss claim")
    s.add_argument("--audience", default="", help="the aud claim")
    return p


def _expires(ns: argparse.Namespace) -> datetime.datetime | None:
    if ns.days is not None:
        if ns.days <= 0:
            raise CredentialError("--days must be > 0")
        return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=ns.days)
    if ns.expires is None:
        return None
    try:
        at = datetime.datetime.fromisoformat(ns.expires)
    except ValueError:
        raise CredentialError(
            f"--expires must be an ISO date-time, e.g. 2027-01-01T00:00:00Z (got {ns.expires!r})"
        ) from None
    if at.tzinfo is None:
        raise CredentialError("--expires needs a time zone, e.g. 2027-01-01T00:00:00Z")
    return at


def _hash(ns: argparse.Namespace) -> int:
    name = check_name(ns.name, "--name")
    tenant = check_tenant(ns.tenant, "--tenant")
    permissions = _permission_list(ns.permissions)
    prefixes = list(check_prefixes(ns.prefixes, "--prefix"))
    expires = _expires(ns)
    if ns.stdin:
        token = sys.stdin.readline().strip()
        if not token or len(token) > MAX_TOKEN_CHARS or any(c.isspace() for c in token):
            raise CredentialError(
                f"--stdin: give one token of 1-{MAX_TOKEN_CHARS} characters without spaces"
            )
    else:
        token = new_token()
        if ns.token_out:
            try:
                fd = os.open(ns.token_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise CredentialError(f"--token-out {ns.token_out}: {exc.strerror}") from None
            with os.fdopen(fd, "w") as out:
                out.write(token + "\n")
        else:
            print(
                f"{token}\n(the token of {name!r}, shown once: give it to the client; the "
                "entry on standard output holds only its hash)",
                file=sys.stderr,
            )
    print(
        entry_text(
            name=name,
            token=token,
            tenant=tenant,
            permissions=permissions,
            prefixes=prefixes,
            expires=expires,
        ),
        end="",
    )
    return 0


def _permission_list(text: str) -> list[str]:
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    parse_permissions(names, "--permissions")
    return names


def _sign(ns: argparse.Namespace) -> int:
    import jwt  # the gateway's dependency; only this subcommand needs it here

    claims: dict[str, Any] = {
        "sub": check_name(ns.sub, "--sub"),
        "tenant": check_tenant(ns.tenant, "--tenant"),
        "permissions": _permission_list(ns.permissions),
        "iat": int(time.time()),
        "exp": int(time.time() + ns.ttl),
    }
    prefixes = check_prefixes(ns.prefixes, "--prefix")
    if prefixes:
        claims["prefixes"] = list(prefixes)
    if ns.issuer:
        claims["iss"] = ns.issuer
    if ns.audience:
        claims["aud"] = ns.audience
    if ns.ttl <= 0:
        raise CredentialError("--ttl must be > 0")
    try:
        data = Path(ns.key).read_bytes()
    except OSError as exc:
        raise CredentialError(f"--key {ns.key}: {exc.strerror}") from None
    key: Any
    if ns.algorithm in HMAC_ALGORITHMS:
        lines = [line.strip() for line in data.splitlines() if line.strip()]
        if not lines:
            raise CredentialError(f"--key {ns.key}: no secret in the file")
        key = lines[0]
    else:
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise CredentialError(
                f"--key {ns.key}: not an unencrypted PEM private key: {exc}"
            ) from None
    try:
        print(jwt.encode(claims, key, algorithm=ns.algorithm))
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise CredentialError(f"cannot sign with {ns.algorithm} and this key: {exc}") from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return _hash(ns) if ns.command == "hash" else _sign(ns)
    except CredentialError as exc:
        print(f"cachegw token: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
