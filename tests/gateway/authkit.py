"""Helpers for the auth tests: tokens files written the way an operator should (atomic
replace), keys made with `cryptography`, signed tokens made with PyJWT."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from cachegw_gateway.tokens import entry_text, new_token

SECRET = "s" * 64  # a shared secret long enough for HS512 too (64 bytes)
OTHER_SECRET = "o" * 64


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def entry(
    token: str,
    name: str,
    permissions: list[str],
    *,
    tenant: str = "shop",
    prefixes: list[str] | None = None,
    expires: str = "",
) -> str:
    text = entry_text(
        name=name,
        token=token,
        tenant=tenant,
        permissions=permissions,
        prefixes=prefixes or [],
        expires=None,
    )
    return text + (f"expires = {expires}\n" if expires else "")


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a new file and rename it over the old one, as the docs ask operators to."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


def sign(
    key: Any,
    *,
    algorithm: str = "HS256",
    ttl: float = 60.0,
    permissions: list[str] | str = "read write",
    tenant: str = "shop",
    **claims: Any,
) -> str:
    body: dict[str, Any] = {
        "sub": "svc",
        "tenant": tenant,
        "permissions": permissions,
        "exp": int(time.time() + ttl),
        **claims,
    }
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


def public_pem(private: Any) -> bytes:
    pem: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def private_pem(private: Any) -> bytes:
    pem: bytes = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


__all__ = ["new_token"]
