"""Credentials without a gateway: the tokens file's rules, certificate identities from a
gRPC auth context, JWT key files, `cachegw token`, and the principal reaching a handler
through a real gRPC server (auth.current_principal)."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from cachegw_gateway import auth, token_main
from cachegw_gateway.auth import Authenticator, current_principal
from cachegw_gateway.config import JWT_ALGORITHMS, AuthConfig, ConfigError, load_config
from cachegw_gateway.jwt_tokens import ALGORITHMS, JwtRefused, JwtRules, load_keys, verify
from cachegw_gateway.peer_identity import identities_of
from cachegw_gateway.principal import CredentialError, Permission, Principal
from cachegw_gateway.stats import GatewayStats
from cachegw_gateway.tokens import parse_tokens_bytes, token_hash
from tests.gateway.authkit import (
    SECRET,
    bearer,
    ec_key,
    ed_key,
    entry,
    new_token,
    private_pem,
    public_pem,
    rsa_key,
    sign,
)


def test_principal_permissions_and_prefixes() -> None:
    p = Principal("svc", "shop", Permission.READ | Permission.SUBSCRIBE, ("catalog:", "price:"))
    assert p.may(Permission.READ) and p.may(Permission.READ | Permission.SUBSCRIBE)
    assert not p.may(Permission.READ | Permission.WRITE) and not p.may(Permission.ADMIN)
    assert p.covers("catalog:1") and p.covers("price:") and not p.covers("cart:1")
    everything = Principal("svc", "shop", Permission.ALL)
    assert everything.covers("anything") and everything.may(Permission.ADMIN)
    assert not everything.expired(time.time())
    assert Principal("x", "shop", Permission.READ, (), 1.0).expired(time.time())


BAD_FILES = {
    "[[tokens]]\nname = 'a'\nhash = 'sha256:abc'\n": 'tokens[0].hash must be "sha256:"',
    "[[tokens]]\nname = 'a b'\n": "tokens[0].name must be 1-128 characters",
    "[tokens]\nname = 'a'\n": "tokens must be an array of tables",
    "[[tokenz]]\n": "unknown table 'tokenz'",
    "[[tokens]]\nname = 'a'\nhash = 'sha256:" + "0" * 64 + "'\ntenant = 'Shop'\n"
    "permissions = ['read']\n": ("tokens[0].tenant must be 1-32 characters"),
    "[[tokens]]\nname = 'a'\nhash = 'sha256:" + "0" * 64 + "'\ntenant = 'shop'\n": (
        "tokens[0].permissions is required"
    ),
    "[[tokens]]\nname = 'a'\nhash = 'sha256:" + "0" * 64 + "'\ntenant = 'shop'\n"
    "permissions = ['read', 'sudo']\n": "unknown permission 'sudo'",
    "[[tokens]]\nname = 'a'\nhash = 'sha256:" + "0" * 64 + "'\ntenant = 'shop'\n"
    "permissions = ['read']\nexpires = 2027-01-01T00:00:00\n": "must carry a time zone",
    "[[tokens]]\nname = 'a'\nhash = 'sha256:" + "0" * 64 + "'\ntenant = 'shop'\n"
    "permissions = ['read']\nprefixes = ['']\n": "must not hold an empty prefix",
    "[[tokens]]\nname = 'a'\nhash = 'sha256:" + "0" * 64 + "'\ntenant = 'shop'\n"
    "permissions = ['read']\nscope = 1\n": "unknown key scope",
    "[[identities]]\nsubject = 'orders'\n": 'subject must name a certificate identity: "CN=',
    "[[tokens\n": "not valid TOML",
}


@pytest.mark.parametrize("text", BAD_FILES)
def test_a_broken_tokens_file_says_what_to_fix(text: str) -> None:
    with pytest.raises(CredentialError, match=BAD_FILES[text].replace("[", r"\[")):
        parse_tokens_bytes(text.encode(), "tokens.toml")


def test_duplicates_are_refused_and_entries_parse() -> None:
    token = new_token()
    twice = entry(token, "a", ["read"]) + "\n" + entry(token, "b", ["read"])
    with pytest.raises(CredentialError, match="is the same as that of 'a'"):
        parse_tokens_bytes(twice.encode(), "t")
    same_name = entry(token, "a", ["read"]) + "\n" + entry(new_token(), "a", ["read"])
    with pytest.raises(CredentialError, match="name 'a' is already used by tokens\\[0\\]"):
        parse_tokens_bytes(same_name.encode(), "t")
    text = entry(token, "a", ["read", "subscribe"], prefixes=["cat:"]) + (
        '\n[[identities]]\nsubject = "CN=orders svc"\ntenant = "shop"\npermissions = "write"\n'
        "expires = 2030-01-01T00:00:00Z\n"
    )
    table = parse_tokens_bytes(text.encode(), "t")
    p = table.lookup(token)
    assert p == Principal("a", "shop", Permission.READ | Permission.SUBSCRIBE, ("cat:",))
    assert table.lookup(new_token()) is None
    cert = table.for_identities(("URI:x", "CN=orders svc"))
    assert (
        cert is not None and cert.name == "CN=orders_svc" and cert.permissions is Permission.WRITE
    )
    assert cert.expires_at == 1893456000.0
    assert token_hash(token).startswith("sha256:") and token not in text


def test_identities_from_a_grpc_auth_context() -> None:
    typed = {
        "x509_common_name": [b"orders"],
        "peer_uri": [b"spiffe://shop/orders"],
        "peer_dns": [b"orders.shop.svc"],
        "x509_subject_alternative_name": [b"spiffe://shop/orders", b"orders.shop.svc"],
        "transport_security_type": [b"ssl"],
    }
    assert identities_of(typed) == ("URI:spiffe://shop/orders", "DNS:orders.shop.svc", "CN=orders")
    untyped = {
        "x509_common_name": [b"orders"],
        "x509_subject_alternative_name": [b"spiffe://a/b", b"10.0.0.1", b"a@b.c", b"h.svc"],
    }
    assert identities_of(untyped) == (
        "URI:spiffe://a/b",
        "IP:10.0.0.1",
        "email:a@b.c",
        "DNS:h.svc",
        "CN=orders",
    )
    assert identities_of({"transport_security_type": [b"insecure"]}) == ()


@pytest.mark.parametrize(
    ("algorithm", "make"), [("RS256", rsa_key), ("ES256", ec_key), ("EdDSA", ed_key)]
)
def test_public_key_algorithms(tmp_path: Path, algorithm: str, make: Any) -> None:
    private = make()
    path = tmp_path / "key.pem"
    path.write_bytes(public_pem(private))
    keys = load_keys(path, algorithm)
    token = sign(private, algorithm=algorithm, permissions=["read"], prefixes=["a:"], sub="me")
    p = verify(token, keys, JwtRules(algorithm))
    assert (p.name, p.tenant, p.permissions, p.prefixes) == ("me", "shop", Permission.READ, ("a:",))
    # A token signed with the HMAC of the public key (the classic confusion) is refused.
    forged = jwt.api_jws.PyJWS().encode(b'{"exp": 9999999999}', b"x" * 64, algorithm="HS256")
    with pytest.raises(JwtRefused, match=f"not signed with {algorithm}"):
        verify(forged, keys, JwtRules(algorithm))


def test_key_files_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "key"
    cases: list[tuple[str | bytes, str, str]] = [
        ("short\n", "HS256", "secret 1 is 5 bytes; HS256 needs at least 32"),
        (private_pem(ec_key()), "ES256", "is a private key"),
        (public_pem(ec_key()), "RS256", "which auth.jwt_algorithm RS256 does not take"),
        (public_pem(ec_key()), "HS256", "holds a PEM key"),
        ("not a key", "ES256", "no PEM public key found"),
        ("", "HS256", "no key in the JWT key file"),
    ]
    for text, algorithm, why in cases:
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        with pytest.raises(CredentialError, match=why):
            load_keys(path, algorithm)
    assert set(ALGORITHMS) == set(JWT_ALGORITHMS)


def test_auth_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"neither auth\.tokens_file nor auth\.jwt_key_file"):
        load_config(env={}, overrides={"auth.enabled": "true"})
    with pytest.raises(ConfigError, match=r"auth\.jwt_algorithm must be one of"):
        load_config(env={}, overrides={"auth.jwt_algorithm": "none"})
    broken = tmp_path / "tokens.toml"
    broken.write_text("[[tokens]]\nname = 1\n")
    config = load_config(env={}, overrides={"auth.enabled": True, "auth.tokens_file": str(broken)})
    with pytest.raises(ConfigError, match=r"tokens\[0\]\.name must be"):
        auth.check_config(config.auth)
    with pytest.raises(ConfigError, match=r"tokens\[0\]\.name must be"):
        Authenticator(config.auth, GatewayStats())


def run_cli(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, stdin: str = ""
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = token_main.main(argv)
    return status, out.getvalue(), err.getvalue()


def test_token_hash_prints_an_entry_that_accepts_the_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    argv = ["hash", "--name", "cat", "--tenant", "shop", "--permissions", "read,subscribe"]
    status, out, err = run_cli([*argv, "--prefix", "catalog:", "--days", "1"], monkeypatch)
    assert status == 0
    token = err.split()[0]
    assert token.startswith("cgw_") and token not in out
    principal = parse_tokens_bytes(out.encode(), "t").lookup(token)
    assert principal is not None and principal.prefixes == ("catalog:",)
    assert principal.expires_at is not None and principal.expires_at > time.time() + 3600
    # --token-out: a new file, for its owner only; --stdin: an existing token.
    target = tmp_path / "token"
    status, out, err = run_cli([*argv, "--token-out", str(target)], monkeypatch)
    assert status == 0 and err == "" and target.stat().st_mode & 0o777 == 0o600
    assert parse_tokens_bytes(out.encode(), "t").lookup(target.read_text().strip()) is not None
    status, out, _ = run_cli([*argv, "--stdin"], monkeypatch, stdin="cgw_mine\n")
    assert parse_tokens_bytes(out.encode(), "t").lookup("cgw_mine") is not None
    status, _, err = run_cli([*argv[:-1], "read,root"], monkeypatch)
    assert status == 2 and "unknown permission 'root'" in err


def test_token_sign_makes_a_token_the_gateway_verifies(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    private = ed_key()
    key = tmp_path / "issuer.pem"
    key.write_bytes(private_pem(private))
    public = tmp_path / "issuer.pub"
    public.write_bytes(public_pem(private))
    status, out, _ = run_cli(
        [
            *("sign", "--key", str(key), "--algorithm", "EdDSA", "--tenant", "shop"),
            *("--permissions", "read", "--ttl", "60", "--sub", "dev-1", "--audience", "cachegw"),
        ],
        monkeypatch,
    )
    assert status == 0
    p = verify(out.strip(), load_keys(public, "EdDSA"), JwtRules("EdDSA", audience="cachegw"))
    assert (p.name, p.tenant, p.permissions) == ("dev-1", "shop", Permission.READ)
    secret = tmp_path / "hs.key"
    secret.write_text(SECRET)
    status, out, _ = run_cli(
        ["sign", "--key", str(secret), "--tenant", "shop", "--permissions", "all"], monkeypatch
    )
    assert verify(out.strip(), (SECRET.encode(),), JwtRules("HS256")).permissions is Permission.ALL


async def test_the_principal_reaches_the_handler(tmp_path: Path) -> None:
    token = new_token()
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(entry(token, "svc", ["admin"], tenant="team-a", prefixes=["x:"]))
    authn = Authenticator(AuthConfig(enabled=True, tokens_file=str(tokens)), GatewayStats())

    async def stats(request: bytes, context: Any) -> bytes:
        p = current_principal()
        assert p is not None
        return f"{p.name} {p.tenant} {p.prefixes}".encode()

    plain = grpc.unary_unary_rpc_method_handler(stats)
    handler = grpc.method_handlers_generic_handler(
        "cachegw.v1.CacheService", {"Stats": authn.wrap("Stats", plain)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/cachegw.v1.CacheService/Stats", None, None)
            assert await call(b"", metadata=bearer(token), timeout=5) == b"svc team-a ('x:',)"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"", timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(0)
    assert current_principal() is None
    with pytest.raises(KeyError):
        authn.wrap("NewMethod", plain)  # a method without a permission is a bug


def test_a_file_rewritten_in_place_is_seen_even_with_the_same_size_and_mtime(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text("a" * 10)
    watched = auth._Watched(str(path))
    assert watched.first() == b"a" * 10
    stat = path.stat()
    path.write_text("b" * 10)  # same size; the timestamps put back as they were
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert watched.changed() == b"b" * 10
    assert watched.changed() is None  # read once per change
