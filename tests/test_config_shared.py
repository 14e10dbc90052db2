"""The `shared` section: read, validated with key paths, its password never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main
from gateway.config import ConfigError, SharedConfig, describe_config, parse_config

PASSWORD = "redis-very-secret-pw"
BASE: dict[str, Any] = {
    "upstreams": [{"name": "u", "base_url": "http://127.0.0.1:9/v1"}],
    "routes": [{"model": "m", "targets": [{"upstream": "u"}]}],
}


def with_shared(shared: object, env: dict[str, str] | None = None) -> Any:
    return parse_config({**BASE, "shared": shared}, env or {})


def errors_of(shared: object, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        with_shared(shared, env)
    return caught.value.errors


def test_defaults_and_env_expansion() -> None:
    config = with_shared({"redis_url": "${REDIS_URL}"}, {"REDIS_URL": "redis://cache:6379/2"})
    assert config.shared == SharedConfig(redis_url="redis://cache:6379/2")
    assert config.shared.on_failure == "local_share"
    assert (config.shared.lease_ttl_s, config.shared.timeout_s) == (10, 0.05)
    assert parse_config(BASE, {}).shared is None  # no section: today's per-process caps


def test_every_key_read() -> None:
    shared = with_shared(
        {
            "redis_url": "rediss://:pw@cache.internal:6380",
            "key_prefix": "team-a:",
            "timeout_s": 0.2,
            "lease_ttl_s": 3,
            "on_failure": "closed",
            "expected_replicas": 5,
        }
    ).shared
    assert (shared.key_prefix, shared.timeout_s, shared.lease_ttl_s) == ("team-a:", 0.2, 3.0)
    assert (shared.on_failure, shared.expected_replicas) == ("closed", 5)


@pytest.mark.parametrize(
    ("shared", "expected"),
    [
        ({}, "shared.redis_url: required"),
        ({"redis_url": "http://cache:6379"}, "shared.redis_url: must be a redis:// or rediss://"),
        ({"redis_url": "redis://"}, "shared.redis_url: must be a redis:// or rediss://"),
        ({"redis_url": "redis://h:port"}, "shared.redis_url: must be a redis:// or rediss://"),
        ({"redis_url": "redis://h/zero"}, "shared.redis_url: the path must be a database number"),
        ({"redis_url": "redis://h?password=x"}, "shared.redis_url: must not have a query"),
        ({"redis_url": "${NOPE}"}, "shared.redis_url: environment variable NOPE is not set"),
        ({"redis_url": "redis://h", "on_failure": "ignore"}, "shared.on_failure: must be closed,"),
        ({"redis_url": "redis://h", "timeout_s": 0}, "shared.timeout_s: must be a number"),
        ({"redis_url": "redis://h", "lease_ttl_s": -1}, "shared.lease_ttl_s: must be a number"),
        ({"redis_url": "redis://h", "lease_ttl_s": 0.1}, "shared.lease_ttl_s: must be at least 3"),
        ({"redis_url": "redis://h", "expected_replicas": 0}, "shared.expected_replicas: must be"),
        ({"redis_url": "redis://h", "lease_ttl": 5}, "shared.lease_ttl: unknown key (did you"),
        ("redis://h", "shared: must be a mapping"),
    ],
)
def test_errors_quote_the_key_path(shared: object, expected: str) -> None:
    assert any(error.startswith(expected) for error in errors_of(shared)), errors_of(shared)


def test_a_password_is_never_shown() -> None:
    url = f"redis://:{PASSWORD}@cache:6379/0"
    bad = f"redis://:{PASSWORD}@cache:port"
    for errors in (errors_of({"redis_url": bad}), errors_of({"redis_url": url, "timeout_s": -1})):
        assert all(PASSWORD not in error for error in errors)
    config = with_shared({"redis_url": "${REDIS_URL}"}, {"REDIS_URL": url})
    assert PASSWORD not in repr(config)
    line = next(line for line in describe_config(config).splitlines() if line.startswith("shared"))
    assert line == (
        "shared: redis_url=redis://***@cache:6379/0 key_prefix='llmgw:' timeout_s=0.05 "
        "lease_ttl_s=10 on_failure=local_share expected_replicas=3"
    )


def test_check_config_masks_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({**BASE, "shared": {"redis_url": "${REDIS_URL}"}}))
    monkeypatch.setenv("REDIS_URL", f"rediss://user:{PASSWORD}@cache:6380/1")
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "redis_url=rediss://***@cache:6380/1" in out
    assert PASSWORD not in out
