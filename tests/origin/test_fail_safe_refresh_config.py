"""The fail-safe and refresh-ahead settings: checked at start with clear messages, and
what they become at run time (how long Redis keeps a value, when a key is due)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachegw_gateway import envelope
from cachegw_gateway.config import ConfigError, GatewayConfig, config_warnings, load_config
from cachegw_gateway.freshness import DEAD, FRESH, STALE, judge, kept_for_fail_safe
from cachegw_gateway.l2 import L2Entry
from cachegw_gateway.policy import KeyClass

THROUGH = 'origin = "127.0.0.1:7000"\nread_policy = "read-through"'


def load(tmp_path: Path, body: str) -> GatewayConfig:
    path = tmp_path / "c.toml"
    path.write_text(f'[[classes]]\nname = "c"\npatterns = ["c:*"]\n{body}\n')
    return load_config(path, env={})


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("fail_safe_seconds = 60", "classes[0].fail_safe_seconds needs read_policy"),
        (f"{THROUGH}\nfail_safe_seconds = -1", "fail_safe_seconds must be in [0, 2592000]"),
        (f"{THROUGH}\nsoft_timeout_seconds = 0.2", "soft_timeout_seconds needs fail_safe_seconds"),
        (
            f"{THROUGH}\nfail_safe_seconds = 60\nsoft_timeout_seconds = 1",
            "soft_timeout_seconds must be below origin.timeout_seconds (1)",
        ),
        (
            f"{THROUGH}\nfail_safe_seconds = 60\nsoft_timeout_seconds = 0.5\n"
            "hard_timeout_seconds = 0.4",
            "soft_timeout_seconds must be below hard_timeout_seconds (0.4)",
        ),
        (
            f"{THROUGH}\nhard_timeout_seconds = 3",
            "hard_timeout_seconds must be below lease_timeout_seconds (3)",
        ),
        ("hard_timeout_seconds = 0.5", "hard_timeout_seconds needs read_policy"),
        ("refresh_ahead = true\nrefresh_ahead_rate = 5", "refresh_ahead needs read_policy"),
        (f"{THROUGH}\nrefresh_ahead = true", "refresh_ahead_rate is required with refresh_ahead"),
        (f"{THROUGH}\nrefresh_ahead_rate = -1", "refresh_ahead_rate must be in [0, 1000000]"),
        (f"{THROUGH}\nrefresh_ahead_fraction = 1", "refresh_ahead_fraction must be in (0, 1)"),
        (
            f"{THROUGH}\nttl_seconds = 60\nrefresh_ahead_before_seconds = 60",
            "refresh_ahead_before_seconds must be in [0, ttl_seconds) ([0, 60))",
        ),
        (f"{THROUGH}\nrefresh_ahead = 1", "refresh_ahead must be true or false (got 1)"),
        (f"{THROUGH}\nfail_safe = 60", "unknown key classes[0].fail_safe; did you mean"),
    ],
)
def test_fail_safe_and_refresh_ahead_settings_are_checked_with_a_clear_message(
    tmp_path: Path, body: str, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, body)
    assert says in str(err.value) and "c.toml" in str(err.value)


def test_what_the_settings_become(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f"{THROUGH}\nttl_seconds = 100\nstale_seconds = 5\nfail_safe_seconds = 60\n"
        "soft_timeout_seconds = 0.1\nhard_timeout_seconds = 0.8\nrefresh_ahead = true\n"
        "refresh_ahead_rate = 2.5",
    )
    kc = KeyClass.from_config(config.classes[0])
    assert (kc.keep_ms, kc.stale_ms, kc.fail_safe_ms) == (60_000, 5_000, 60_000)
    assert (kc.soft_timeout_ms, kc.hard_timeout_ms) == (100, 800)
    assert (kc.refresh_ahead_before_ms, kc.refresh_ahead_rate) == (20_000, 2.5)  # 0.2 of TTL
    seconds = load(tmp_path, f"{THROUGH}\nrefresh_ahead = true\nrefresh_ahead_rate = 1\n"
                   "refresh_ahead_before_seconds = 7")  # fmt: skip
    assert KeyClass.from_config(seconds.classes[0]).refresh_ahead_before_ms == 7_000
    off = KeyClass.from_config(load(tmp_path, f"{THROUGH}\nrefresh_ahead_rate = 9").classes[0])
    assert (off.refresh_ahead_before_ms, off.refresh_ahead_rate) == (0, 0.0)
    warned = "\n".join(config_warnings(load(tmp_path, f"{THROUGH}\nstale_seconds = 5")))
    assert "refresh_ahead reloads hot keys before" in warned


def _entry(pttl_ms: int, flags: int = 0) -> L2Entry:
    env = envelope.Envelope(3, 0, 0, 0, 0, (), b"v", flags)
    return L2Entry(env, pttl_ms)


def test_past_its_fresh_life_a_value_kept_for_fail_safe_is_dead_to_every_other_reader() -> None:
    kc = KeyClass("c", 10_000, 0, True, 1000, 1024, stale_ms=5_000, fail_safe_ms=60_000)
    assert judge(_entry(60_001), kc, 0) == (FRESH, 1)
    assert judge(_entry(57_000), kc, 0) == (STALE, 0)  # 3 s past: the stale window
    assert judge(_entry(50_000), kc, 0) == (DEAD, 0)  # 10 s past: fail-safe's alone
    assert kept_for_fail_safe(_entry(50_000), kc, 0)
    assert not kept_for_fail_safe(_entry(50_000), kc, 1)  # another class generation
    assert not kept_for_fail_safe(_entry(50_000, envelope.NOT_FOUND), kc, 0)  # a tombstone
    assert not kept_for_fail_safe(_entry(60_001), kc, 0)  # fresh: not a fallback
    without = KeyClass("c", 10_000, 0, True, 1000, 1024, stale_ms=5_000)
    assert judge(_entry(4_000), without, 0) == (STALE, 0)  # unchanged without fail-safe
    assert not kept_for_fail_safe(_entry(4_000), without, 0)


def test_a_class_hard_timeout_replaces_the_origin_timeout_in_the_lease_warning(
    tmp_path: Path,
) -> None:
    slow = f"[origin]\ntimeout_seconds = 5\n[[classes]]\nname = 'c'\npatterns = ['c:*']\n{THROUGH}"
    path = tmp_path / "w.toml"
    path.write_text(slow)
    assert any("outlive its lease" in w for w in config_warnings(load_config(path, env={})))
    path.write_text(f"{slow}\nhard_timeout_seconds = 2")
    assert not any("outlive its lease" in w for w in config_warnings(load_config(path, env={})))
