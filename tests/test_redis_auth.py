"""Where the gateway's Redis credentials come from (redis_auth.py): the precedence, the
password file, and config rules that keep a password out of config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachegw_gateway.config import ConfigError, RedisConfig, config_warnings, load_config
from cachegw_gateway.redis_auth import describe, node_credentials, sentinel_credentials
from cachegw_gateway.redis_url import parse

URL = "redis://127.0.0.1:6379/0"


def test_the_url_comes_first_then_the_environment_then_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    config = RedisConfig(username="cfg-user", password="from-env", password_file=str(secret))
    url_creds = node_credentials(config, parse("redis://u:from-url@h:1/0"))
    assert url_creds is not None and url_creds.get_credentials() == ("u", "from-url")
    env_creds = node_credentials(config, parse(URL))
    assert env_creds is not None and env_creds.get_credentials() == ("cfg-user", "from-env")
    file_config = RedisConfig(username="cfg-user", password_file=str(secret))
    file_creds = node_credentials(file_config, parse(URL))
    assert file_creds is not None and file_creds.get_credentials() == ("cfg-user", "from-file")
    secret.write_text("rotated")  # read again for the next connection
    assert file_creds.get_credentials() == ("cfg-user", "rotated")
    assert node_credentials(RedisConfig(), parse(URL)) is None
    password_only = node_credentials(RedisConfig(password="p"), parse(URL))
    assert password_only is not None and password_only.get_credentials() == ("p",)


def test_descriptions_name_sources_never_secrets(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2")
    config = RedisConfig(
        password="env-secret", sentinel_username="s", sentinel_password_file=str(secret)
    )
    text = describe(config, parse("redis+sentinel://gw@127.0.0.1:1/svc"))
    assert text == (
        "user 'gw' (from the URL), password from $CACHEGW_REDIS_PASSWORD; Sentinels: "
        f"user 's' (redis.sentinel_username), password from redis.sentinel_password_file "
        f"({secret})"
    )
    creds = sentinel_credentials(config)
    assert "hunter2" not in repr(creds) and "env-secret" not in repr(config)
    assert "env-secret" not in repr(node_credentials(config, parse(URL)))


def test_a_password_file_is_checked_at_start(tmp_path: Path) -> None:
    for content, why in (("", "empty"), ("a\nb\n", "more than one line")):
        path = tmp_path / "pw"
        path.write_text(content)
        with pytest.raises(ConfigError, match=rf"redis.password_file names .*{why}"):
            load_config(env={}, overrides={"redis.url": URL, "redis.password_file": str(path)})
    with pytest.raises(ConfigError, match="which does not exist"):
        load_config(
            env={}, overrides={"redis.url": URL, "redis.password_file": str(tmp_path / "no")}
        )


def test_a_config_file_cannot_hold_a_password(tmp_path: Path) -> None:
    path = tmp_path / "cachegw.toml"
    path.write_text('[redis]\npassword = "hunter2"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "redis.password is not read from a config file" in str(info.value)
    assert "hunter2" not in str(info.value)
    env = load_config(env={"CACHEGW_REDIS_PASSWORD": "hunter2"})
    assert env.redis.password == "hunter2" and "hunter2" not in repr(env)


def test_shadowed_and_unused_settings_are_warned_about(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    config = load_config(
        env={"CACHEGW_REDIS_PASSWORD": "p"},
        overrides={
            "redis.url": "redis://u:p@h:1/0",
            "redis.password_file": str(secret),
            "redis.sentinel_username": "s",
        },
    )
    warnings = config_warnings(config)
    assert any("redis.url carries a password" in w for w in warnings)
    assert any("redis.sentinel_username is not used" in w for w in warnings)
