"""Short-lived signed tokens (JWT, verified with PyJWT) and the key file they are checked with.

The gateway pins one algorithm (`auth.jwt_algorithm`): a token's own `alg` header never
chooses how it is checked, so a public key can never be used as an HMAC secret. The key
file holds one key or several (to overlap a rotation): HS* secrets one per line, at
least as long as the hash (32 bytes for HS256); RS*/PS*/ES*/EdDSA public keys (or
certificates) as PEM blocks. Claims:

    exp          required: the token ends then
    tenant       required
    permissions  required: ["read", "write", ...] or "read write"
    prefixes     optional: key prefixes, every key of the tenant when left out
    sub          optional: names the caller in logs ("jwt" when left out)
    iss, aud     checked when auth.jwt_issuer / auth.jwt_audience are set
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from cachegw_gateway.principal import (
    CredentialError,
    Principal,
    check_name,
    check_prefixes,
    check_tenant,
    parse_permissions,
)

# Algorithm -> the minimum HMAC secret bytes (RFC 7518 3.2), or the public key types.
HMAC_ALGORITHMS = {"HS256": 32, "HS384": 48, "HS512": 64}
ASYMMETRIC_ALGORITHMS: dict[str, tuple[type[Any], ...]] = {
    "RS256": (rsa.RSAPublicKey,),
    "RS384": (rsa.RSAPublicKey,),
    "RS512": (rsa.RSAPublicKey,),
    "PS256": (rsa.RSAPublicKey,),
    "ES256": (ec.EllipticCurvePublicKey,),
    "ES384": (ec.EllipticCurvePublicKey,),
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
ALGORITHMS = (*HMAC_ALGORITHMS, *ASYMMETRIC_ALGORITHMS)
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
MAX_KEYS = 16
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}


class JwtRefused(Exception):
    """A signed token that does not verify; the message says why, never the token."""


VerifyKey = Any  # bytes (HMAC) or a cryptography public key


def load_keys(path: str | os.PathLike[str], algorithm: str) -> tuple[VerifyKey, ...]:
    """The verification keys in `path` for `algorithm`. Raises CredentialError."""
    src = os.fspath(path)
    if algorithm not in ALGORITHMS:
        raise CredentialError(f"auth.jwt_algorithm must be one of {', '.join(ALGORITHMS)}")
    try:
        data = Path(src).read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{src}: JWT key file not found") from None
    except OSError as exc:
        raise CredentialError(f"{src}: cannot read the JWT key file: {exc.strerror}") from None
    keys = (
        _hmac_keys(data, src, algorithm)
        if algorithm in HMAC_ALGORITHMS
        else _public_keys(data, src, algorithm)
    )
    if not keys:
        raise CredentialError(f"{src}: no key in the JWT key file")
    if len(keys) > MAX_KEYS:
        raise CredentialError(f"{src}: at most {MAX_KEYS} keys (got {len(keys)})")
    return keys


def _hmac_keys(data: bytes, src: str, algorithm: str) -> tuple[bytes, ...]:
    if b"-----BEGIN" in data:
        raise CredentialError(
            f"{src}: holds a PEM key, but auth.jwt_algorithm {algorithm} takes a shared "
            "secret; for public keys set jwt_algorithm to one of "
            + ", ".join(ASYMMETRIC_ALGORITHMS)
        )
    need = HMAC_ALGORITHMS[algorithm]
    keys = tuple(line.strip() for line in data.splitlines() if line.strip())
    for n, key in enumerate(keys, 1):
        if len(key) < need:
            raise CredentialError(
                f"{src}: secret {n} is {len(key)} bytes; {algorithm} needs at least {need} "
                f"(e.g. `python -c 'import secrets; print(secrets.token_urlsafe({need}))'`)"
            )
    return keys


def _public_keys(data: bytes, src: str, algorithm: str) -> tuple[VerifyKey, ...]:
    keys: list[VerifyKey] = []
    for n, block in enumerate(_PEM_BLOCK.finditer(data), 1):
        kind = block.group(1).decode()
        if "PRIVATE" in kind:
            raise CredentialError(
                f"{src}: PEM block {n} is a private key; the gateway needs only the public "
                "key (`openssl pkey -in key.pem -pubout`): keep the private one with the issuer"
            )
        key: Any
        try:
            if kind == "CERTIFICATE":
                key = x509.load_pem_x509_certificate(block.group(0)).public_key()
            else:
                key = serialization.load_pem_public_key(block.group(0))
        except ValueError as exc:
            raise CredentialError(f"{src}: PEM block {n} is not a public key: {exc}") from None
        if not isinstance(key, ASYMMETRIC_ALGORITHMS[algorithm]):
            raise CredentialError(
                f"{src}: PEM block {n} is a {type(key).__name__.removeprefix('_')}, which "
                f"auth.jwt_algorithm {algorithm} does not take"
            )
        curve = _EC_CURVES.get(algorithm)
        if curve is not None and key.curve.name != curve:
            raise CredentialError(
                f"{src}: PEM block {n} is on curve {key.curve.name}; {algorithm} needs {curve}"
            )
        keys.append(key)
    if not keys and data.strip():
        raise CredentialError(
            f"{src}: no PEM public key found (-----BEGIN PUBLIC KEY-----); {algorithm} takes "
            "public keys, a shared secret goes with HS256"
        )
    return tuple(keys)


@dataclass(frozen=True)
class JwtRules:
    algorithm: str
    issuer: str = ""
    audience: str = ""
    leeway_seconds: float = 0.0


def verify(token: str, keys: tuple[VerifyKey, ...], rules: JwtRules) -> Principal:
    """The principal a signed token stands for. Raises JwtRefused."""
    claims: dict[str, Any] | None = None
    for key in keys:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[rules.algorithm],
                issuer=rules.issuer or None,
                audience=rules.audience or None,
                leeway=rules.leeway_seconds,
                options={"require": ["exp"]},
            )
            break
        except jwt.InvalidSignatureError:
            continue  # maybe the next key (a rotation in progress)
        except jwt.ExpiredSignatureError:
            raise JwtRefused("the signed token has expired (its exp is past)") from None
        except jwt.InvalidAudienceError:
            if rules.audience:
                why = f"its aud is not {rules.audience!r} (auth.jwt_audience)"
            else:
                why = "it has an aud claim, and auth.jwt_audience is not set to match it"
            raise JwtRefused(f"the signed token is not for this gateway: {why}") from None
        except jwt.InvalidIssuerError:
            raise JwtRefused(
                f"the signed token's iss is not {rules.issuer!r} (auth.jwt_issuer)"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise JwtRefused(f"the signed token has no {exc.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            raise JwtRefused(
                f"the signed token is not signed with {rules.algorithm} (auth.jwt_algorithm)"
            ) from None
        except jwt.ImmatureSignatureError:
            raise JwtRefused(
                "the signed token is not valid yet (nbf or iat in the future)"
            ) from None
        except jwt.DecodeError:
            raise JwtRefused("the bearer token is not a well-formed signed token (JWT)") from None
        except jwt.InvalidTokenError as exc:
            raise JwtRefused(f"the signed token was refused: {exc}") from None
    if claims is None:
        raise JwtRefused(
            "the signed token's signature does not verify with the gateway's key "
            "(auth.jwt_key_file): signed with another key, or the key was rotated"
        )
    try:
        return principal_of(claims, rules.leeway_seconds)
    except CredentialError as exc:
        raise JwtRefused(f"the signed token's claims are not usable: {exc}") from None


def principal_of(claims: Mapping[str, Any], leeway_seconds: float = 0.0) -> Principal:
    """The principal of verified claims; it expires at exp (+ the leeway it was checked with)."""
    if "tenant" not in claims:
        raise CredentialError("tenant is required")
    if "permissions" not in claims:
        raise CredentialError('permissions is required, e.g. ["read"]')
    exp = claims["exp"]
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise CredentialError("exp must be a number (Unix seconds)")
    return Principal(
        name=check_name(claims.get("sub", "jwt"), "sub"),
        tenant=check_tenant(claims["tenant"], "tenant"),
        permissions=parse_permissions(claims["permissions"], "permissions"),
        prefixes=check_prefixes(claims.get("prefixes"), "prefixes"),
        expires_at=float(exp) + leeway_seconds,
    )


def looks_like_jwt(token: str) -> bool:
    """Three base64url parts: a JWT (static tokens have no dots)."""
    return token.count(".") == 2 and token.startswith("eyJ")
