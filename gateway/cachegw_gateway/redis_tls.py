"""TLS to Redis: the redis-py arguments for ``redis.tls_*``, and their check at start.

A TLS URL (``rediss://``, ``rediss+sentinel://``, ``rediss+cluster://``) turns TLS on;
these settings say with what:

    tls_ca               PEM file of the CA(s) that signed Redis's certificate, trusted
                         in addition to the system's ("" = the system's only)
    tls_cert, tls_key    this gateway's client certificate and key (PEM), for a Redis
                         with ``tls-auth-clients yes``; both or neither
    tls_check_hostname   the certificate must name the host connected to (default on;
                         off only for certificates naming neither the host nor its IP:
                         the chain is still verified)

Redis's certificate is always verified. Every connection uses them: the command pool,
the pub/sub connections, a Cluster's per-node connections, the Sentinels and the primary
they name. The files are read for each new connection (redis-py builds its SSL context
per connection), so renewed certificates are picked up as connections are replaced.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cachegw_gateway.config import RedisConfig


class TlsConfigError(ValueError):
    """A ``redis.tls_*`` setting cannot be used; `key` names it, the message says why."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def kwargs(config: RedisConfig) -> dict[str, Any]:
    """redis-py's SSL arguments (for a client or a connection pool of a TLS URL)."""
    return {
        "ssl_ca_certs": config.tls_ca or None,
        "ssl_certfile": config.tls_cert or None,
        "ssl_keyfile": config.tls_key or None,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": config.tls_check_hostname,
    }


def _readable(key: str, path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise TlsConfigError(key, f"names {path!r}, which does not exist")
    if not p.is_file():
        raise TlsConfigError(key, f"names {path!r}, which is not a file")
    try:
        with p.open("rb"):
            pass
    except OSError as exc:
        raise TlsConfigError(key, f"names {path!r}, which cannot be read: {exc.strerror}") from None


def check(config: RedisConfig) -> None:
    """The TLS files exist, are PEM of the right kind, and the key is the certificate's
    (loaded into a throwaway SSL context: the same loading redis-py does at connect).
    Messages never quote the files' content."""
    if bool(config.tls_cert) != bool(config.tls_key):
        key = "tls_key" if config.tls_cert else "tls_cert"
        raise TlsConfigError(
            key, "must be given with its pair: a client certificate needs its key (tls_cert "
            "and tls_key, both PEM)"
        )  # fmt: skip
    for key in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(config, key)
        if path:
            _readable(key, path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if config.tls_ca:
        try:
            context.load_verify_locations(cafile=config.tls_ca)
        except (ssl.SSLError, ValueError):
            raise TlsConfigError(
                "tls_ca", f"names {config.tls_ca!r}, which holds no PEM CA certificate"
            ) from None
    if config.tls_cert:
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        except ssl.SSLError as exc:
            raise TlsConfigError(
                "tls_cert",
                f"{config.tls_cert!r} and tls_key {config.tls_key!r} are not a PEM "
                f"certificate and its private key (unencrypted): {exc.reason or exc}",
            ) from None
