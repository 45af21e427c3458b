"""Configuration: layering (defaults < file < env < overrides), validation messages that
name the source, the key and the rule, and the shipped example and docs."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachegw_gateway import main
from cachegw_gateway.address_map import AddressMap
from cachegw_gateway.config import (
    ENV_VARS,
    MAX_VALUE_BYTES,
    BreakerConfig,
    ConfigError,
    GatewayConfig,
    InvalidationConfig,
    KeyClassConfig,
    L1Config,
    RedisConfig,
    ServerConfig,
    TelemetryConfig,
    check_redis_choice,
    config_warnings,
    load_config,
)
from cachegw_gateway.policy import PolicyTable, RateLimit
from tests.redis_certs import make_pki

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "cachegw.example.toml"
DOCS = ROOT / "docs" / "config.md"

ONE_CLASS = """
[[classes]]
name = "catalog"
patterns = ["catalog:*"]
"""


def write(tmp_path: Path, text: str, name: str = "cachegw.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides: dict[str, object] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, overrides=overrides)
    return str(info.value)


# -- defaults and layering ---------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    config = load_config(env={})
    assert config.server == dataclasses.replace(ServerConfig(), gateway_id=config.server.gateway_id)
    assert (config.redis, config.l1, config.classes) == (RedisConfig(), L1Config(), ())
    assert config.default_class == KeyClassConfig("default")
    assert config.server.gateway_id == f"{socket.gethostname()}-{os.getpid()}"


def test_file_values_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
listen = "[::1]:6000"
max_ttl_seconds = 7200
gateway_id = "gw-1"
[redis]
url = "redis://127.0.0.1:7000/2"
socket_timeout = 0.25
[l1]
admission = "tinylfu"
max_bytes = 1024
[[classes]]
name = "quote"
patterns = ["quote:v?:*", "q:*"]
ttl_seconds = 600
jitter = 0
l1 = false
[default_class]
ttl_seconds = 60
l1_ttl_seconds = 0.5
""",
    )
    config = load_config(path, env={})
    assert config.server.listen == "[::1]:6000"
    assert config.server.max_ttl_seconds == 7200.0
    assert isinstance(config.server.max_ttl_seconds, float)  # TOML int into a float key
    assert config.server.gateway_id == "gw-1"
    assert config.redis == RedisConfig(url="redis://127.0.0.1:7000/2", socket_timeout=0.25)
    assert config.l1 == L1Config(max_bytes=1024, admission="tinylfu")
    assert config.classes == (KeyClassConfig("quote", ("quote:v?:*", "q:*"), 600.0, 0.0, l1=False),)
    assert config.default_class == KeyClassConfig("default", ttl_seconds=60, l1_ttl_seconds=0.5)


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\nlisten = "127.0.0.1:1001"\n[redis]\nurl = "redis://file:1/0"\nprefix = "f"\n',
    )
    env = {
        "CACHEGW_LISTEN": "127.0.0.1:1002",
        "CACHEGW_REDIS_URL": "redis://env:1/0",
        "CACHEGW_GATEWAY_ID": "from-env",
    }
    overrides = {"server.listen": "127.0.0.1:1003"}

    config = load_config(path, env=env, overrides=overrides)
    assert config.server.listen == "127.0.0.1:1003"  # flag beats env and file
    assert config.redis.url == "redis://env:1/0"  # env beats file
    assert config.redis.prefix == "f"  # file beats default
    assert config.server.gateway_id == "from-env"
    assert load_config(path, env=env).server.listen == "127.0.0.1:1002"
    assert load_config(path, env={}).server.listen == "127.0.0.1:1001"


def test_every_env_var_sets_its_key(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    values = {
        "CACHEGW_REDIS_URL": "rediss://cache.internal:6380/0",
        "CACHEGW_LISTEN": "0.0.0.0:9000",
        "CACHEGW_REDIS_PREFIX": "shop",
        "CACHEGW_GATEWAY_ID": "gw-7",
        "CACHEGW_TRACE_EXPORTER": "otlp",
        "CACHEGW_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "CACHEGW_METRICS_LISTEN": "127.0.0.1:9464",
        "CACHEGW_LOG_FORMAT": "json",
        "CACHEGW_EMBEDDED_REDIS": "yes",
        "CACHEGW_REDIS_ADDRESS_MAP": "10.0.0.5:6379=127.0.0.1:7001",
        "CACHEGW_WORKERS": "4",
        "CACHEGW_REDIS_USERNAME": "gw",
        "CACHEGW_REDIS_PASSWORD": "from-env",
        "CACHEGW_REDIS_PASSWORD_FILE": str(secret),
        "CACHEGW_REDIS_SENTINEL_USERNAME": "sentinel-user",
        "CACHEGW_REDIS_SENTINEL_PASSWORD": "sentinel-secret",
        "CACHEGW_REDIS_SENTINEL_PASSWORD_FILE": str(secret),
        "CACHEGW_REDIS_TLS_CA": str(pki.ca),
        "CACHEGW_REDIS_TLS_CERT": str(pki.client_cert),
        "CACHEGW_REDIS_TLS_KEY": str(pki.client_key),
        "CACHEGW_REDIS_TLS_CHECK_HOSTNAME": "no",
        "CACHEGW_AUTH": "true",
        "CACHEGW_TOKENS_FILE": "/etc/cachegw/tokens.toml",
        "CACHEGW_JWT_KEY_FILE": "/etc/cachegw/issuer.pem",
        "CACHEGW_SERVER_TLS_CERT": "/etc/cachegw/tls.crt",
        "CACHEGW_SERVER_TLS_KEY": "/etc/cachegw/tls.key",
        "CACHEGW_SERVER_TLS_CLIENT_CA": "/etc/cachegw/clients-ca.crt",
    }
    assert set(values) == set(ENV_VARS)
    config = load_config(env=values)
    parsed = {
        "CACHEGW_EMBEDDED_REDIS": True,
        "CACHEGW_REDIS_ADDRESS_MAP": {"10.0.0.5:6379": "127.0.0.1:7001"},
        "CACHEGW_WORKERS": 4,
        "CACHEGW_REDIS_TLS_CHECK_HOSTNAME": False,
        "CACHEGW_AUTH": True,
    }
    for var, dotted in ENV_VARS.items():
        table, key = dotted.split(".")
        assert getattr(getattr(config, table), key) == parsed.get(var, values[var])


def test_embedded_redis_is_asked_for_explicitly(tmp_path: Path) -> None:
    # `cachegw serve` refuses a config with neither a URL nor `embedded` (main.py).
    assert load_config(env={}).redis == RedisConfig(url="", embedded=False)
    with pytest.raises(ConfigError, match="no Redis configured: give the shared Redis"):
        check_redis_choice(load_config(env={}))
    path = write(tmp_path, "[redis]\nembedded = true\n")
    assert load_config(path, env={}).redis.embedded is True
    assert load_config(env={"CACHEGW_EMBEDDED_REDIS": "1"}).redis.embedded is True
    assert load_config(env={}, overrides={"redis.embedded": True}).redis.embedded is True
    off = load_config(path, env={"CACHEGW_EMBEDDED_REDIS": "false"})
    assert off.redis.embedded is False  # env beats file, as for every key
    for config in (
        load_config(path, env={}),
        load_config(env={"CACHEGW_REDIS_URL": "redis://10.0.0.5:6379/0"}),
    ):
        check_redis_choice(config)  # either is enough
    with pytest.raises(ConfigError, match=r"environment CACHEGW_EMBEDDED_REDIS: redis\.embedded"):
        load_config(env={"CACHEGW_EMBEDDED_REDIS": "maybe"})
    with pytest.raises(ConfigError, match=r"redis\.embedded must be true or false"):
        load_config(write(tmp_path, '[redis]\nembedded = "yes"\n', "typed.toml"), env={})


def test_empty_env_vars_count_as_unset(tmp_path: Path) -> None:
    path = write(tmp_path, '[redis]\nurl = "redis://file:1/0"\n')
    config = load_config(path, env={"CACHEGW_REDIS_URL": "", "CACHEGW_LISTEN": ""})
    assert config.redis.url == "redis://file:1/0"
    assert config.server.listen == ServerConfig().listen


def test_config_path_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[redis]\nprefix = "viaenv"\n')
    assert load_config(env={"CACHEGW_CONFIG": str(path)}).redis.prefix == "viaenv"
    # An explicit path wins over $CACHEGW_CONFIG.
    other = write(tmp_path, '[redis]\nprefix = "explicit"\n', "other.toml")
    assert load_config(other, env={"CACHEGW_CONFIG": str(path)}).redis.prefix == "explicit"


def test_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEGW_REDIS_PREFIX", "osenv")
    assert load_config().redis.prefix == "osenv"
    assert load_config(env={}).redis.prefix == "cg"


def test_overrides_parse_text_like_flags(tmp_path: Path) -> None:
    config = load_config(
        env={},
        overrides={
            "server.max_key_bytes": "2048",
            "server.grace_seconds": "2.5",
            "redis.max_connections": 8,
            "l1.max_entries": "1_000",
            "default_class.l1": "false",
            "default_class.jitter": 0,
        },
    )
    assert config.server.max_key_bytes == 2048
    assert config.server.grace_seconds == 2.5
    assert config.redis.max_connections == 8
    assert config.l1.max_entries == 1000
    assert config.default_class.l1 is False
    assert config.default_class.jitter == 0.0


def test_config_is_frozen() -> None:
    config = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.listen = "x"  # type: ignore[misc]
    assert isinstance(config, GatewayConfig)


# -- validation: every rule names its key ---------------------------------------------------

BAD_FILES = [
    ("[server]\nlisten = '127.0.0.1'\n", "server.listen must be host:port"),
    ("[server]\nlisten = ':50051'\n", "server.listen must be host:port"),
    ("[server]\nlisten = 'localhost:65536'\n", "server.listen must be host:port"),
    ("[server]\nlisten = 'localhost:5x'\n", "server.listen must be host:port"),
    ("[server]\nlisten = '::1:50051'\n", "server.listen: an IPv6 host must be"),
    ("[server]\nlisten = '[nope]:50051'\n", "server.listen: an IPv6 host must be"),
    ("[server]\nlisten = 'my host:1'\n", "server.listen: the host must not contain spaces"),
    ("[server]\ngrace_seconds = -1\n", "server.grace_seconds must be >= 0 (got -1)"),
    ("[server]\nmax_key_bytes = 0\n", "server.max_key_bytes must be > 0 (got 0)"),
    ("[server]\nmax_ttl_seconds = -2.5\n", "server.max_ttl_seconds must be > 0 (got -2.5)"),
    ("[server]\nmax_batch_keys = 0\n", "server.max_batch_keys must be > 0"),
    ("[server]\ngateway_id = 'gw 1'\n", "server.gateway_id must not contain spaces"),
    ("[redis]\nurl = 'http://x:1'\n", "redis.url must start with redis://, rediss://"),
    ("[redis]\nurl = 'localhost:6379'\n", "redis.url must start with"),
    ("[redis]\nprefix = ''\n", "redis.prefix must be non-empty"),
    ("[redis]\nprefix = 'a{b}'\n", "redis.prefix must be non-empty, without spaces or braces"),
    ("[redis]\nsocket_timeout = 0\n", "redis.socket_timeout must be > 0 (got 0)"),
    ("[redis]\nconnect_timeout = -1\n", "redis.connect_timeout must be > 0 (got -1)"),
    ("[redis]\nmax_connections = 0\n", "redis.max_connections must be > 0"),
    ("[redis]\nmanaged_port = 70000\n", "redis.managed_port must be 0..65535"),
    ("[l1]\nmax_entries = 0\n", "l1.max_entries must be > 0"),
    ("[l1]\nmax_bytes = -1\n", "l1.max_bytes must be > 0"),
    ("[l1]\nadmission = 'lfu'\n", "l1.admission must be 'lru' or 'tinylfu' (got 'lfu')"),
    ("[default_class]\nttl_seconds = 0\n", "default_class.ttl_seconds must be > 0"),
    ("[default_class]\njitter = 1.0\n", "default_class.jitter must be in [0, 1) (got 1)"),
    ("[default_class]\nl1_ttl_seconds = 0\n", "default_class.l1_ttl_seconds must be > 0"),
    ("[default_class]\nmax_value_bytes = 0\n", "default_class.max_value_bytes must be > 0"),
    ("[default_class]\npatterns = ['a*']\n", "default_class.patterns is not allowed"),
    ("[default_class]\nname = 'x'\n", "default_class.name is not allowed"),
    (ONE_CLASS + "ttl_seconds = -5\n", "classes[0].ttl_seconds must be > 0 (got -5)"),
    (ONE_CLASS + "jitter = -0.1\n", "classes[0].jitter must be in [0, 1) (got -0.1)"),
    (ONE_CLASS + "jitter = 1\n", "classes[0].jitter must be in [0, 1) (got 1)"),
    (ONE_CLASS + "l1_ttl_seconds = 0\n", "classes[0].l1_ttl_seconds must be > 0"),
    (ONE_CLASS + "max_value_bytes = 0\n", "classes[0].max_value_bytes must be > 0"),
    (
        ONE_CLASS + "max_value_bytes = 66060289\n",
        "classes[0].max_value_bytes must be <= 66060288 (63 MiB): a value travels in one gRPC "
        "message of at most 67108864 bytes (64 MiB) with its key and tags (got 66060289)",
    ),
    (
        "[default_class]\nmax_value_bytes = 1_000_000_000\n",
        "default_class.max_value_bytes must be <= 66060288 (63 MiB)",
    ),
    (
        ONE_CLASS + "ttl_seconds = 2592001\n",
        "classes[0].ttl_seconds must be <= server.max_ttl_seconds (2592000) (got 2592001)",
    ),
    ("[[classes]]\npatterns = ['a*']\n", "classes[0].name is required"),
    ("[[classes]]\nname = ''\npatterns = ['a*']\n", "classes[0].name must be non-empty"),
    ("[[classes]]\nname = 'a b'\npatterns = ['a*']\n", "classes[0].name must be non-empty"),
    ("[[classes]]\nname = 'a'\n", "classes[0].patterns must list at least one key glob"),
    ("[[classes]]\nname = 'a'\npatterns = []\n", "classes[0].patterns must list at least one"),
    ("[[classes]]\nname = 'a'\npatterns = ['a*', '']\n", "classes[0].patterns[1] must not be"),
    ("[[classes]]\nname = 'a'\npatterns = 'a*'\n", "classes[0].patterns must be a list of str"),
    ("[[classes]]\nname = 'a'\npatterns = [1]\n", "classes[0].patterns must be a list of str"),
    ("[[classes]]\nname = 'default'\npatterns = ['a*']\n", "classes[0].name 'default' is reserv"),
    (
        ONE_CLASS + ONE_CLASS.replace("catalog:*", "c:*"),
        "classes[1].name 'catalog' is already used by classes[0]",
    ),
    ("[[classes]]\nname = 7\npatterns = ['a*']\n", "classes[0].name must be a string (got 7)"),
    ("[server]\nmax_key_bytes = '512'\n", "server.max_key_bytes must be an integer (got '512')"),
    ("[server]\nmax_key_bytes = 1.5\n", "server.max_key_bytes must be an integer (got 1.5)"),
    ("[server]\nmax_key_bytes = true\n", "server.max_key_bytes must be an integer (got true)"),
    ("[server]\ngrace_seconds = 'soon'\n", "server.grace_seconds must be a number"),
    ("[server]\ngrace_seconds = nan\n", "server.grace_seconds must be a finite number"),
    ("[server]\nmax_ttl_seconds = inf\n", "server.max_ttl_seconds must be a finite number"),
    (ONE_CLASS + "l1 = 'no'\n", "classes[0].l1 must be true or false (got 'no')"),
    ("[server]\nlisten = 50051\n", "server.listen must be a string (got 50051)"),
    ("server = 5\n", "server must be a table ([server])"),
    ("[classes]\nname = 'a'\n", "classes must be an array of tables: write [[classes]]"),
    ("classes = ['a']\n", "classes[0] must be a table"),
    ("[server\n", "not valid TOML"),
]


def test_max_value_bytes_may_reach_its_upper_bound(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_CLASS + f"max_value_bytes = {MAX_VALUE_BYTES}\n")
    assert load_config(path, env={}).classes[0].max_value_bytes == MAX_VALUE_BYTES == 63 << 20


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_validation_errors_name_file_key_and_rule(tmp_path: Path, text: str, message: str) -> None:
    error = error_of(tmp_path, text)
    assert error.startswith(f"{tmp_path / 'cachegw.toml'}: "), error
    assert message in error


def test_the_documented_example_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    two = ONE_CLASS + '[[classes]]\nname = "session"\npatterns = ["session:*"]\nttl_seconds = -5\n'
    write(tmp_path, two)
    with pytest.raises(ConfigError) as info:
        load_config("cachegw.toml", env={})
    assert str(info.value) == "cachegw.toml: classes[1].ttl_seconds must be > 0 (got -5)"


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:0", "0.0.0.0:65535", "localhost:50051", "[::1]:50051", "[::]:1"]
)
def test_valid_listen_addresses(listen: str) -> None:
    assert load_config(env={}, overrides={"server.listen": listen}).server.listen == listen


@given(port=st.integers(min_value=0, max_value=99_999))
def test_listen_port_range(port: int) -> None:
    overrides = {"server.listen": f"127.0.0.1:{port}"}
    if port <= 65535:
        assert load_config(env={}, overrides=overrides).server.listen.endswith(f":{port}")
    else:
        with pytest.raises(ConfigError, match=r"server\.listen must be host:port"):
            load_config(env={}, overrides=overrides)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "redis://127.0.0.1:6379/0",
        "rediss://cache:6380/1",
        "unix:///run/redis.sock",
        "redis+cluster://c1:7000,c2:7000",
        "redis+cluster://user:pw@[::1]:7000",
    ],
)
def test_valid_redis_urls(url: str) -> None:
    assert load_config(env={}, overrides={"redis.url": url}).redis.url == url


@pytest.mark.parametrize(
    "url", ["redis+cluster://c:7000/0", "redis+cluster://c", "redis+cluster://:pw@c:x"]
)
def test_bad_cluster_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError, match=r"redis\.url is not a valid Cluster URL") as info:
        load_config(env={}, overrides={"redis.url": url})
    assert "pw" not in str(info.value)


def test_sentinel_urls_are_accepted_and_checked() -> None:
    url = "redis+sentinel://s1:26379,s2:26380/mymaster?db=2"
    assert load_config(env={}, overrides={"redis.url": url}).redis.url == url
    with pytest.raises(ConfigError, match="no SERVICE") as info:
        load_config(env={}, overrides={"redis.url": "redis+sentinel://u:secret@s1:26379"})
    assert str(info.value).startswith("command line: redis.url is not a valid Sentinel URL")
    assert "secret" not in str(info.value)


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"CACHEGW_LISTEN": "nowhere"})
    assert str(info.value).startswith("environment CACHEGW_LISTEN: server.listen must be")
    with pytest.raises(ConfigError) as info:
        load_config(env={"CACHEGW_REDIS_URL": "http://x"})
    assert str(info.value).startswith("environment CACHEGW_REDIS_URL: redis.url must start")


def test_override_errors_say_command_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"server.grace_seconds": "-1"})
    assert str(info.value) == "command line: server.grace_seconds must be >= 0 (got -1)"
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"server.max_key_bytes": "lots"})
    assert str(info.value) == "command line: server.max_key_bytes must be an integer (got 'lots')"


def test_cross_key_rule_blames_the_class_and_names_the_limit(tmp_path: Path) -> None:
    # The class is fine against the default limit; a flag lowers the limit under it.
    error = error_of(
        tmp_path, ONE_CLASS + "ttl_seconds = 3600\n", overrides={"server.max_ttl_seconds": "60"}
    )
    assert "classes[0].ttl_seconds must be <= server.max_ttl_seconds (60) (got 3600)" in error


# -- unknown keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sever]\n", "unknown key sever; did you mean server?"),
        ("[server]\nlistn = 'x'\n", "unknown key server.listn; did you mean server.listen?"),
        ("[redis]\nurll = 'x'\n", "unknown key redis.urll; did you mean redis.url?"),
        ("[l1]\nadmision = 'lru'\n", "unknown key l1.admision; did you mean l1.admission?"),
        (
            ONE_CLASS + "tll_seconds = 5\n",
            "unknown key classes[0].tll_seconds; did you mean classes[0].ttl_seconds?",
        ),
        (
            "[default_class]\njiter = 0.1\n",
            "unknown key default_class.jiter; did you mean default_class.jitter?",
        ),
    ],
)
def test_unknown_keys_suggest_the_closest(tmp_path: Path, text: str, message: str) -> None:
    error = error_of(tmp_path, text)
    assert error.startswith(str(tmp_path / "cachegw.toml"))
    assert message in error


def test_unknown_key_without_a_close_match_lists_the_known_ones(tmp_path: Path) -> None:
    error = error_of(tmp_path, "[server]\nzzzzzz = 1\n")
    assert "unknown key server.zzzzzz; known keys: server.listen, server.grace_seconds" in error


def test_unknown_override_keys_suggest_the_closest() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"redis.ulr": "redis://x:1/0"})
    assert str(info.value) == "command line: unknown key redis.ulr; did you mean redis.url?"
    with pytest.raises(
        ConfigError, match=r"unknown key sever\.listen; did you mean server\.listen"
    ):
        load_config(env={}, overrides={"sever.listen": "127.0.0.1:1"})
    with pytest.raises(ConfigError, match=r"command line: unknown key classes\.name"):
        load_config(env={}, overrides={"classes.name": "x"})


# -- files ----------------------------------------------------------------------------------


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: config file not found")):
        load_config(missing, env={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(env={"CACHEGW_CONFIG": str(missing)})


def test_directory_and_binary_files_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, env={})
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe[server]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(binary, env={})


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), env={})
    assert config.classes == () and config.l1 == L1Config()


# -- the shipped example and docs -----------------------------------------------------------


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE, env={})
    by_name = {c.name: c for c in config.classes}
    assert list(by_name) == [
        "catalog",
        "inventory",
        "pricing",
        "profile",
        "session",
        "quote",
        "ratelimit",
    ]
    assert by_name["catalog"].ttl_seconds == 3600
    assert by_name["inventory"].ttl_seconds == by_name["pricing"].ttl_seconds == 30
    assert by_name["inventory"].l1_ttl_seconds < 5 and by_name["pricing"].l1_ttl_seconds < 5
    assert by_name["profile"].ttl_seconds == 15 * 60
    assert by_name["session"].ttl_seconds == 24 * 3600
    assert by_name["quote"].ttl_seconds == 10 * 60
    assert by_name["ratelimit"].l1 is False
    # No Redis in the seed: `cachegw serve` wants --redis-url or --embedded-redis with it.
    assert (config.redis.url, config.redis.embedded) == ("", False)
    assert config.l1.admission == "tinylfu"


def test_lease_defaults_let_a_waiter_outwait_a_dead_holder(tmp_path: Path) -> None:
    # Sized against the clients' 5 s default deadline (tests/gateway/test_leases.py runs it).
    kc = KeyClassConfig("default")
    assert kc.lease_timeout_seconds < kc.max_wait_seconds < 5.0
    assert config_warnings(load_config(env={})) == []
    assert config_warnings(load_config(EXAMPLE, env={})) == []
    path = write(
        tmp_path,
        ONE_CLASS
        + "lease_timeout_seconds = 2\nmax_wait_seconds = 2\n"
        + "[default_class]\nlease_timeout_seconds = 5\nmax_wait_seconds = 0\n",
    )
    assert config_warnings(load_config(path, env={})) == [
        "classes[0] (catalog): max_wait_seconds (2) is not above lease_timeout_seconds (2): "
        "a caller waiting on a holder that died gives up before its lease ends, so none "
        "takes it over and each loads by itself"
    ]  # max_wait 0 (never wait) is a choice, not a mismatch


def _all_keys() -> list[str]:
    tables = {
        "server": ServerConfig,
        "redis": RedisConfig,
        "l1": L1Config,
        "invalidation": InvalidationConfig,
        "telemetry": TelemetryConfig,
    }
    keys = [f"{t}.{f.name}" for t, cls in tables.items() for f in dataclasses.fields(cls)]
    keys += [f"redis.breaker.{f.name}" for f in dataclasses.fields(BreakerConfig)]
    return keys + [f"classes.{f.name}" for f in dataclasses.fields(KeyClassConfig)]


@pytest.mark.parametrize("dotted", _all_keys())
def test_docs_describe_every_key(dotted: str) -> None:
    table, _, key = dotted.rpartition(".")
    text = DOCS.read_text()
    heading = {"classes": "## `[[classes]]`"}.get(table, f"## `[{table}]`")
    if "." in table:
        heading = "#" + heading  # a table inside a table: a ### section
    section = text.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    assert re.search(rf"^\| `{key}` \| ", section, re.MULTILINE), f"{dotted} not in docs"


def test_docs_list_every_env_var() -> None:
    text = DOCS.read_text()
    for var in [*ENV_VARS, "CACHEGW_CONFIG"]:
        assert f"`{var}`" in text


def test_a_class_rate_limit(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[[classes]]
name = "ratelimit"
patterns = ["rate:*"]
rate_limit = { rate = 100, period_seconds = 60, burst = 20 }

[default_class.rate_limit]
rate = 5
period_seconds = 0.5
algorithm = "sliding_window"
""",
    )
    config = load_config(path, env={})
    policy = PolicyTable.from_config(config)
    assert policy.classify("rate:x").rate_limit == RateLimit(100, 60_000, 20, "gcra")
    assert policy.default.rate_limit == RateLimit(5, 500, 0, "sliding_window")


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ("{ rate = 0, period_seconds = 60 }", "rate_limit.rate must be in [1, 1000000000]"),
        ("{ rate = 10, period_seconds = 0 }", "rate_limit.period_seconds must be in [0.001"),
        ("{ rate = 10, period_seconds = 86401 }", "rate_limit.period_seconds must be in"),
        ("{ rate = 10 }", "rate_limit.period_seconds is required"),
        (
            "{ rate = 10, period_seconds = 1, brust = 2 }",
            "did you mean classes[0].rate_limit.burst",
        ),
        ("{ rate = 10, period_seconds = 1, algorithm = 'token' }", "must be 'gcra' or"),
        ("{ rate = 10, period_seconds = 1, burst = -1 }", "rate_limit.burst must be in [0,"),
        ("{ rate = 2000, period_seconds = 0.001 }", "one request per microsecond"),
        ("{ rate = 1, period_seconds = 86400, burst = 31 }", "within 30 days"),
        (
            "{ rate = 10, period_seconds = 1, burst = 5, algorithm = 'sliding_window' }",
            "burst is not used by algorithm 'sliding_window'",
        ),
        ("{ rate = '10', period_seconds = 1 }", "rate_limit.rate must be an integer"),
        ("5", "rate_limit must be a table"),
    ],
)
def test_bad_rate_limits_are_refused(tmp_path: Path, table: str, says: str) -> None:
    text = f'[[classes]]\nname = "r"\npatterns = ["r:*"]\nrate_limit = {table}\n'
    assert says in error_of(tmp_path, text)


# -- [redis.breaker] and stale-if-error ----------------------------------------------------


def test_the_breaker_table_inside_redis(tmp_path: Path) -> None:
    assert load_config(env={}).redis.breaker == BreakerConfig()
    path = write(
        tmp_path,
        """
[redis]
url = "redis://127.0.0.1:7000/0"
[redis.breaker]
failures = 0
failure_rate = 0.25
window_seconds = 30
min_calls = 50
cooldown_seconds = 0.5
""",
    )
    config = load_config(path, env={}, overrides={"redis.breaker.min_calls": "60"})
    assert config.redis.url == "redis://127.0.0.1:7000/0"
    assert config.redis.breaker == BreakerConfig(True, 0, 0.25, 30.0, 60, 0.5)
    inline = write(tmp_path, "[redis]\nbreaker = { enabled = false }\n", "inline.toml")
    assert load_config(inline, env={}).redis.breaker.enabled is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[redis.breaker]\nfailures = -1\n", "redis.breaker.failures must be >= 0"),
        ("[redis.breaker]\nfailure_rate = 1.5\n", "redis.breaker.failure_rate must be in [0, 1]"),
        (
            "[redis.breaker]\nfailures = 0\nfailure_rate = 0\n",
            "are both 0: nothing would open the breaker; set enabled = false",
        ),
        ("[redis.breaker]\nwindow_seconds = 0\n", "redis.breaker.window_seconds must be in (0"),
        ("[redis.breaker]\nmin_calls = 0\n", "redis.breaker.min_calls must be >= 1"),
        ("[redis.breaker]\ncooldown_seconds = -2\n", "cooldown_seconds must be in (0, 3600]"),
        ("[redis.breaker]\nfailures = 2.5\n", "redis.breaker.failures must be an integer"),
        (
            "[redis.breaker]\ncooldown = 5\n",
            "unknown key redis.breaker.cooldown; did you mean redis.breaker.cooldown_seconds?",
        ),
        ("[redis]\nbreaker = 5\n", "redis.breaker must be a table ([redis.breaker])"),
        (
            ONE_CLASS + "stale_if_error_seconds = -1\n",
            "classes[0].stale_if_error_seconds must be in [0, server.max_ttl_seconds]",
        ),
        ("[l1]\nstale_if_error_max_bytes = 0\n", "l1.stale_if_error_max_bytes must be > 0"),
    ],
)
def test_bad_breaker_and_stale_if_error_settings(tmp_path: Path, text: str, message: str) -> None:
    error = error_of(tmp_path, text)
    assert message in error
    assert error.startswith(str(tmp_path / "cachegw.toml"))


def test_breaker_overrides_name_the_command_line() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides={"redis.breaker.failure_rate": "2"})
    assert str(err.value).startswith("command line: redis.breaker.failure_rate must be in")
    with pytest.raises(ConfigError, match=r"unknown key redis\.breaker\.nope"):
        load_config(env={}, overrides={"redis.breaker.nope": "1"})


def test_stale_if_error_reaches_the_key_class(tmp_path: Path) -> None:
    path = write(tmp_path, ONE_CLASS + "stale_if_error_seconds = 2.5\n")
    table = PolicyTable.from_config(load_config(path, env={}))
    assert table.classify("catalog:1").stale_if_error_ms == 2500
    assert table.default.stale_if_error_ms == 0


# -- redis.address_map ---------------------------------------------------------------------

CLUSTER_URL = "redis+cluster://10.0.0.5:6379"


def test_an_address_map_from_the_file_the_environment_and_the_command_line(
    tmp_path: Path,
) -> None:
    assert load_config(env={}).redis.address_map == {}
    inline = write(
        tmp_path,
        '[redis]\naddress_map = { "10.0.0.5:6379" = "127.0.0.1:7001", '
        '"[fd00::6]:6379" = "[::1]:7002" }\n',
    )
    table = write(
        tmp_path,
        '[redis]\nurl = "redis+cluster://10.0.0.5:6379"\n[redis.address_map]\n'
        '"10.0.0.5:6379" = "127.0.0.1:7001"\n"[fd00::6]:6379" = "[::1]:7002"\n',
        "table.toml",
    )
    expected = {"10.0.0.5:6379": "127.0.0.1:7001", "[fd00::6]:6379": "[::1]:7002"}
    assert load_config(inline, env={}).redis.address_map == expected
    config = load_config(table, env={})
    assert config.redis.address_map == expected
    assert config_warnings(config) == []
    # Text (an env var, a flag): announced=target, comma-separated; it replaces the
    # file's map whole, as any later layer replaces a key.
    text = " 10.0.0.7:6379=127.0.0.1:7003 ,redis-0.redis:6379=localhost:7004"
    from_env = load_config(table, env={"CACHEGW_REDIS_ADDRESS_MAP": text}).redis.address_map
    assert from_env == {"10.0.0.7:6379": "127.0.0.1:7003", "redis-0.redis:6379": "localhost:7004"}
    args = main.build_parser().parse_args(["--redis-address-map", "10.0.0.8:1=127.0.0.1:2"])
    flagged = load_config(
        table, env={"CACHEGW_REDIS_ADDRESS_MAP": text}, overrides=main._overrides(args)
    )
    assert flagged.redis.address_map == {"10.0.0.8:1": "127.0.0.1:2"}
    given = load_config(env={}, overrides={"redis.address_map": {"10.0.0.9:1": "127.0.0.1:3"}})
    assert given.redis.address_map == {"10.0.0.9:1": "127.0.0.1:3"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[redis]\naddress_map = { "10.0.0.5" = "127.0.0.1:7001" }\n',
            "redis.address_map: the announced address '10.0.0.5' is not host:port",
        ),
        (
            '[redis]\naddress_map = { "10.0.0.5:6379" = "127.0.0.1" }\n',
            """redis.address_map["10.0.0.5:6379"] = '127.0.0.1' is not host:port""",
        ),
        (
            '[redis]\naddress_map = { "10.0.0.5:6379" = "127.0.0.1:0" }\n',
            "with a port 1..65535",
        ),
        (
            '[redis]\naddress_map = { "10.0.0.5:6379" = "::1:7001" }\n',
            "an IPv6 host goes in brackets, [::1]:7000",
        ),
        (
            '[redis]\naddress_map = { "10.0.0.5:6379" = "redis://127.0.0.1:7001" }\n',
            "is not host:port (an address, not a URL)",
        ),
        (
            '[redis]\naddress_map = { "10.0.0.5:6379" = 7001 }\n',
            """redis.address_map["10.0.0.5:6379"] must be a string "host:port" (got 7001)""",
        ),
        (
            '[redis]\naddress_map = "10.0.0.5:6379=127.0.0.1:7001"\n',
            "redis.address_map must be a table of announced = target addresses",
        ),
        (
            '[redis.address_map]\n"[::1]:7000" = "127.0.0.1:1"\n"[0::1]:7000" = "127.0.0.1:2"\n',
            "redis.address_map: '[::1]:7000' and '[0::1]:7000' are the same address",
        ),
        (
            '[redis.address_map]\n"10.0.0.5:1" = "10.0.0.6:1"\n"10.0.0.6:1" = "127.0.0.1:1"\n',
            """redis.address_map["10.0.0.5:1"] = "10.0.0.6:1" is itself mapped""",
        ),
    ],
)
def test_bad_address_maps_name_the_entry(tmp_path: Path, text: str, message: str) -> None:
    error = error_of(tmp_path, text)
    assert error.startswith(f"{tmp_path / 'cachegw.toml'}: redis.address_map"), error
    assert message in error


def test_address_map_text_errors_name_the_variable_or_the_flag() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env={"CACHEGW_REDIS_ADDRESS_MAP": "10.0.0.5:6379"})
    assert str(err.value) == (
        "environment CACHEGW_REDIS_ADDRESS_MAP: redis.address_map: entries are "
        "announced=target, comma-separated, e.g. 10.0.0.5:6379=127.0.0.1:7001 "
        "(got '10.0.0.5:6379')"
    )
    with pytest.raises(ConfigError, match=r"^command line: redis\.address_map maps 'a:1' twice"):
        load_config(env={}, overrides={"redis.address_map": "a:1=b:1,a:1=c:1"})
    with pytest.raises(ConfigError, match=r"^command line: redis\.address_map: the announced"):
        load_config(env={}, overrides={"redis.address_map": "a=b:1"})


def test_an_address_map_without_a_cluster_is_warned_about() -> None:
    for url in ("redis://10.0.0.5:6379/0", "redis+sentinel://10.0.0.5:26379/cache", ""):
        config = load_config(env={}, overrides={"redis.url": url, "redis.address_map": "a:1=b:2"})
        assert any("redis.address_map is not used" in w for w in config_warnings(config))
    clustered = load_config(
        env={}, overrides={"redis.url": CLUSTER_URL, "redis.address_map": "a:1=b:2"}
    )
    assert config_warnings(clustered) == []


def test_the_address_map_maps_announced_addresses_once() -> None:
    remap = AddressMap({"10.0.0.5:6379": "127.0.0.1:7001", "[fd00::6]:6379": "[::1]:7002"})
    assert remap(("10.0.0.5", 6379)) == ("127.0.0.1", 7001)
    assert remap(("10.0.0.5", "6379")) == ("127.0.0.1", 7001)  # a port as text
    assert remap(("fd00:0::6", 6379)) == ("::1", 7002)  # another spelling of the address
    assert remap(("10.0.0.5", 6380)) == ("10.0.0.5", 6380)  # not mapped: as announced
    assert remap(remap(("10.0.0.5", 6379))) == remap(("10.0.0.5", 6379))  # idempotent
    assert AddressMap({"Redis-0.NS:6379": "127.0.0.1:1"})(("redis-0.ns", 6379)) == ("127.0.0.1", 1)
    assert bool(remap) and not AddressMap({})
