"""The [telemetry] table: defaults, and an error that names the key for each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachegw_gateway.config import ConfigError, TelemetryConfig, config_warnings, load_config


def test_defaults_are_off() -> None:
    t = load_config(env={}).telemetry
    assert t == TelemetryConfig()
    assert (t.exporter, t.metrics_listen, t.log_format) == ("none", "", "text")


def test_file_env_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[telemetry]\nexporter = "otlp"\notlp_endpoint = "https://otel.internal:4317"\n'
        'sample_ratio = 0.01\nmetrics_listen = "[::1]:9464"\nlog_format = "json"\n'
    )
    t = load_config(path, env={}).telemetry
    assert (t.exporter, t.otlp_endpoint, t.sample_ratio) == (
        "otlp",
        "https://otel.internal:4317",
        0.01,
    )
    assert (t.metrics_listen, t.log_format) == ("[::1]:9464", "json")
    t = load_config(
        path,
        env={"CACHEGW_LOG_FORMAT": "text"},
        overrides={"telemetry.sample_ratio": "0.5", "telemetry.exporter": "console"},
    ).telemetry
    assert (t.log_format, t.sample_ratio, t.exporter) == ("text", 0.5, "console")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('exporter = "jaeger"', "telemetry.exporter must be 'none', 'console' or 'otlp'"),
        (
            'exporter = "otlp"\notlp_endpoint = "collector:4317"',
            "telemetry.otlp_endpoint must be the collector's OTLP/gRPC address",
        ),
        ("sample_ratio = 1.5", "telemetry.sample_ratio must be in [0, 1] (got 1.5)"),
        ("sample_ratio = -0.1", "telemetry.sample_ratio must be in [0, 1]"),
        ('sample_ratio = "0.1"', "telemetry.sample_ratio must be a number"),
        ('metrics_listen = "9464"', "telemetry.metrics_listen must be host:port"),
        ('metrics_listen = "127.0.0.1:50051"', "must differ from server.listen"),
        ('log_format = "logfmt"', "telemetry.log_format must be 'text' or 'json'"),
        ('service_name = "my cache"', "telemetry.service_name must be non-empty"),
        ("metrics_port = 9464", "unknown key telemetry.metrics_port"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(f"[telemetry]\n{toml}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert message in str(err.value)
    assert str(err.value).startswith(str(path))


def test_warnings_for_settings_without_effect() -> None:
    config = load_config(env={}, overrides={"telemetry.sample_ratio": "0.1"})
    assert config_warnings(config) == [
        "telemetry.sample_ratio has no effect: telemetry.exporter is 'none'"
    ]
    assert config_warnings(load_config(env={})) == []


def test_otlp_exporter_is_built_without_a_collector() -> None:
    from cachegw_gateway.telemetry import tracing

    config = load_config(
        env={},
        overrides={"telemetry.exporter": "otlp", "telemetry.otlp_endpoint": "http://127.0.0.1:1"},
    )
    provider = tracing.build_provider(config.telemetry, "gw-1")
    assert provider is not None  # nothing is sent until a span ends
    assert provider.resource.attributes["service.instance.id"] == "gw-1"
    provider.shutdown()
    assert tracing.build_provider(load_config(env={}).telemetry, "gw-1") is None
