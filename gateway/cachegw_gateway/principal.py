"""Who a call acts for: a `Principal` (tenant, permissions, key-prefix scopes, expiry),
and the permission each CacheService method needs.

A principal comes from a static token (tokens.py), a signed token (jwt_tokens.py) or a
client certificate's identity (tokens.py's [[identities]]); auth.py checks it on every
call and hands it to the handler (`auth.current_principal()`).
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass, field

# A tenant names a space of keys (and later a Redis namespace): a conservative charset,
# so that it can be put into keys, metric labels and log lines without escaping.
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# A credential's name shows in logs and errors (never the secret itself).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/=+-]{0,127}")
MAX_PREFIXES = 256
MAX_PREFIX_BYTES = 512


class Permission(enum.Flag):
    """What a principal may do. `ADMIN` covers Stats and Warmup."""

    NONE = 0
    READ = enum.auto()
    WRITE = enum.auto()
    INVALIDATE = enum.auto()
    SUBSCRIBE = enum.auto()
    ADMIN = enum.auto()
    ALL = READ | WRITE | INVALIDATE | SUBSCRIBE | ADMIN


# Names as written in the tokens file, in signed tokens and on the command line.
PERMISSION_NAMES: dict[str, Permission] = {
    "read": Permission.READ,
    "write": Permission.WRITE,
    "invalidate": Permission.INVALIDATE,
    "subscribe": Permission.SUBSCRIBE,
    "admin": Permission.ADMIN,
    "all": Permission.ALL,
}

# The permission each CacheService method needs. Reads are what change nothing a
# caller can observe; ReleaseLease gives back a lease its caller was handed by a read,
# so a read-only token may do it. Allow, Incr and Touch change stored state: writes.
# A Get or GetMany that asks for a lease also needs WRITE (auth.py): a lease is a
# promise to fill, and a holder that cannot fill makes every other caller wait.
METHOD_PERMISSIONS: dict[str, Permission] = {
    "Get": Permission.READ,
    "GetMany": Permission.READ,
    "Ttl": Permission.READ,
    "ReleaseLease": Permission.READ,
    "Set": Permission.WRITE,
    "SetMany": Permission.WRITE,
    "Delete": Permission.WRITE,
    "DeleteMany": Permission.WRITE,
    "Incr": Permission.WRITE,
    "Touch": Permission.WRITE,
    "Allow": Permission.WRITE,
    "Invalidate": Permission.INVALIDATE,
    "Subscribe": Permission.SUBSCRIBE,
    "Stats": Permission.ADMIN,
    "Warmup": Permission.ADMIN,
}


class CredentialError(ValueError):
    """A credential's fields break a rule; the message names the field and the rule."""


@functools.cache
def permission_names(permissions: Permission) -> str:
    """ "read, write" for messages and logs."""
    names = [name for name, p in PERMISSION_NAMES.items() if p is not Permission.ALL]
    return ", ".join(n for n in names if PERMISSION_NAMES[n] & permissions) or "none"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller a credential stands for.

    `name` identifies the credential in logs (a token's name, a JWT's subject, a
    certificate's identity), never the secret. `prefixes` = () covers every key of the
    tenant. `expires_at` is Unix time in seconds, None for never.
    """

    name: str
    tenant: str
    permissions: Permission
    prefixes: tuple[str, ...] = ()
    expires_at: float | None = None
    # `permissions` as a plain int: the per-call check is one `&` of ints (Flag
    # arithmetic builds enum members and costs a microsecond).
    mask: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", self.permissions.value)

    def may(self, permission: Permission) -> bool:
        """Whether every permission in `permission` is granted."""
        return permission & self.permissions == permission

    def covers(self, key: str) -> bool:
        """Whether `key` is inside the principal's prefixes (every key when there are none)."""
        return not self.prefixes or key.startswith(self.prefixes)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def parse_permissions(values: object, where: str) -> Permission:
    """A list of permission names ("read", "write", ...) -> Permission. A JWT may also
    carry them space-separated in one string, as OAuth scopes are."""
    if isinstance(values, str):
        values = values.split()
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise CredentialError(
            f'{where} must be a list of permission names, e.g. ["read", "write"] '
            f"(known: {', '.join(PERMISSION_NAMES)})"
        )
    granted = Permission.NONE
    for value in values:
        permission = PERMISSION_NAMES.get(value.lower())
        if permission is None:
            raise CredentialError(
                f"{where}: unknown permission {value!r} (known: {', '.join(PERMISSION_NAMES)})"
            )
        granted |= permission
    if not granted:
        raise CredentialError(f"{where} must grant at least one permission")
    return granted


def check_tenant(tenant: object, where: str) -> str:
    if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
        raise CredentialError(
            f"{where} must be 1-32 characters: lowercase letters, digits, '_' or '-', "
            f"starting with a letter or digit (got {tenant!r})"
        )
    return tenant


def check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise CredentialError(
            f"{where} must be 1-128 characters: letters, digits and _.:@/=+- "
            f"(it names the credential in logs) (got {name!r})"
        )
    return name


def check_prefixes(values: object, where: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise CredentialError(f'{where} must be a list of key prefixes, e.g. ["catalog:"]')
    if len(values) > MAX_PREFIXES:
        raise CredentialError(f"{where} must list at most {MAX_PREFIXES} prefixes")
    for value in values:
        if not value:
            raise CredentialError(
                f"{where} must not hold an empty prefix (leave prefixes out for every key)"
            )
        if len(value.encode()) > MAX_PREFIX_BYTES:
            raise CredentialError(f"{where}: a prefix must be at most {MAX_PREFIX_BYTES} bytes")
    return tuple(dict.fromkeys(values))
