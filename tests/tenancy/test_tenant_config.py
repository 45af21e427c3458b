"""[tenants] and [[tenant]]: what a config may say, and the message when it may not."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachegw_gateway.config import ConfigError, load_config


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "cachegw.toml"
    path.write_text(text)
    return load_config(path, env={})


def test_quotas_default_and_per_tenant(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[tenants]\nrequests_per_second = 100\nmax_subscribers = 3\n"
        '[[tenant]]\nname = "acme"\nrequests_per_second = 5.5\nburst = 10\n'
        '[[tenant]]\nname = "beta_2"\n'
    )
    config = load_config(path, env={})
    assert config.tenants.requests_per_second == 100 and config.tenants.max_subscribers == 3
    acme, beta = config.tenant
    assert (acme.name, acme.requests_per_second, acme.burst) == ("acme", 5.5, 10)
    assert acme.max_subscribers is None  # left out: the [tenants] value
    assert beta.requests_per_second is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[tenant]]\nname = "Acme"\n', "tenant[0].name must be 1-32 of a-z"),
        ('[[tenant]]\nname = "a"\n[[tenant]]\nname = "a"\n', "tenant 'a' is named twice"),
        ("[[tenant]]\nrate = 5\n", "unknown key tenant[0].rate"),
        ("[[tenant]]\nburst = 5\n", "tenant[0].name is required"),
        ('[[tenant]]\nname = "a"\nrequests_per_second = -1\n', "requests_per_second must be"),
        ("[tenants]\nrequests_per_second = 2000000\n", "must be in [0, 1000000]"),
        ('[[tenant]]\nname = "a"\nburst = "x"\n', "tenant[0].burst"),
        ("[tenants]\nmax_per_gateway = 0\n", "tenants.max_per_gateway must be > 0"),
        ("[tenants]\nmax_subscribers = -2\n", "max_subscribers must be >= 0"),
        ('[tenant]\nname = "a"\n', "tenant must be an array of tables"),
        (
            '[tenants]\nmax_per_gateway = 1\n[[tenant]]\nname = "a"\n[[tenant]]\nname = "b"\n',
            "2 [[tenant]] entries, but tenants.max_per_gateway is 1",
        ),
    ],
)
def test_bad_tenant_config_is_refused_with_what_to_fix(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(tmp_path, text)
