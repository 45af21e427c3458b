"""The verified client certificate's identities, as the tokens file's [[identities]]
name them; tls.py's `peer_identities(context)` reads them from a call (mTLS).

gRPC puts what it verified in the call's auth context: the common name, and the subject
alternative names by kind where it knows them (peer_uri, peer_dns, ...), else all SANs
in one list (x509_subject_alternative_name).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

_TYPED_SANS = (
    ("peer_uri", "URI:"),
    ("peer_dns", "DNS:"),
    ("peer_ip", "IP:"),
    ("peer_email", "email:"),
)


def identities_of(auth_context: Mapping[str, Iterable[bytes]]) -> tuple[str, ...]:
    """("URI:spiffe://...", "DNS:host", ..., "CN=name"): SANs first (the more specific),
    then the common name. Empty for a call without a verified client certificate."""
    out: list[str] = []
    typed = False
    for key, kind in _TYPED_SANS:
        for value in auth_context.get(key, ()):
            typed = True
            out.append(kind + _text(value))
    if not typed:
        for value in auth_context.get("x509_subject_alternative_name", ()):
            out.append(_guess_kind(_text(value)))
    out.extend("CN=" + _text(value) for value in auth_context.get("x509_common_name", ()))
    return tuple(dict.fromkeys(out))


def _text(value: bytes | str) -> str:
    # backslashreplace: two different byte strings never become one name.
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def _guess_kind(san: str) -> str:
    if "://" in san or san.startswith("spiffe:"):
        return "URI:" + san
    try:
        ipaddress.ip_address(san)
        return "IP:" + san
    except ValueError:
        pass
    return ("email:" if "@" in san else "DNS:") + san
