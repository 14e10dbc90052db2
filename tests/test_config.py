"""gateway.config: loading, validation (every error, with its key path) and describe_config."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    ApiKey,
    AuthConfig,
    Budget,
    Config,
    ConfigError,
    DeadlineConfig,
    Hedge,
    RetryBudget,
    RetryPolicy,
    Route,
    ServerConfig,
    Target,
    UpstreamConfig,
    describe_config,
    load_config,
    parse_config,
)

CONFIGS = Path(__file__).parent / "configs"
OPENAI_KEY = "sk-very-secret-openai"
TEAM_A_KEY = "team-a-very-secret"
FULL_ENV = {"OPENAI_API_KEY": OPENAI_KEY, "TEAM_A_KEY": TEAM_A_KEY}
DROP = object()  # for config_with: remove the key

MINIMAL: dict[object, Any] = {
    "upstreams": [{"name": "openai", "base_url": "https://api.openai.com/v1"}],
    "routes": [{"model": "gpt-4o", "targets": [{"upstream": "openai"}]}],
}


TWO_TARGETS = [{"upstream": "openai", "model": "a"}, {"upstream": "openai", "model": "b"}]


def config_with(
    *,
    top: dict[object, Any] | None = None,
    server: dict[object, Any] | None = None,
    upstream: dict[object, Any] | None = None,
    route: dict[object, Any] | None = None,
    target: dict[object, Any] | None = None,
    budget: dict[object, Any] | None = None,
    retry: dict[object, Any] | None = None,
) -> dict[object, Any]:
    """MINIMAL with keys set in (or, given DROP, removed from) one part of it."""
    doc: dict[object, Any] = copy.deepcopy(MINIMAL)
    route0 = doc["routes"][0]
    parts = [
        (doc, top),
        (doc.setdefault("server", {}), server),
        (doc["upstreams"][0], upstream),
        (route0, route),
        (route0["targets"][0], target),
        (route0.setdefault("budget", {}), budget),
        (route0.setdefault("retry", {}), retry),
    ]
    for part, changes in parts:
        for key, value in (changes or {}).items():
            if value is DROP:
                del part[key]
            else:
                part[key] = value
    return doc


def errors_of(doc: object, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, env or {})
    return info.value.errors


def test_full_example_from_design_loads() -> None:
    config = load_config(CONFIGS / "full.yaml", env=FULL_ENV)

    assert config == Config(
        server=ServerConfig(
            max_body_bytes=8388608,
            deadline=DeadlineConfig(max_s=600, margin_s=0.05, client_headers=True),
        ),
        auth=AuthConfig(keys=(ApiKey(name="team-a", key=TEAM_A_KEY),)),
        upstreams=(
            UpstreamConfig(
                name="openai",
                base_url="https://api.openai.com/v1",
                api_key=OPENAI_KEY,
                max_connections=64,
                max_pending=256,
                connect_s=2,
                keepalive_expiry_s=30,
            ),
            UpstreamConfig(name="vllm", base_url="http://vllm:8000/v1"),
        ),
        routes=(
            Route(
                model="gpt-4o",
                targets=(
                    Target(upstream="openai", model="gpt-4o-2024-08-06"),
                    Target(upstream="vllm", model="meta-llama/Llama-3.1-8B-Instruct"),
                ),
                budget=Budget(total_s=20, ttft_s=8, idle_s=5, attempt_s=12),
                retry=RetryPolicy(
                    attempts=3,
                    backoff_s=0.2,
                    retry_on=frozenset({"connect", "ttft", "idle", 429, 500, 502, 503, 504}),
                    min_attempt_s=0.1,
                ),
                retry_budget=RetryBudget(ratio=0.2, min_per_s=3),
                hedge=Hedge(after_s=0.5),
                upstream_stream=True,
                outlier_mode="fail_fast",
            ),
        ),
    )


def test_load_config_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FULL_ENV.items():
        monkeypatch.setenv(name, value)

    assert load_config(str(CONFIGS / "full.yaml")).upstreams[0].api_key == OPENAI_KEY


def test_defaults() -> None:
    config = parse_config(MINIMAL, {})

    assert config == Config(
        server=ServerConfig(),
        auth=None,
        upstreams=(UpstreamConfig(name="openai", base_url="https://api.openai.com/v1"),),
        routes=(Route(model="gpt-4o", targets=(Target(upstream="openai", model="gpt-4o"),)),),
    )
    assert config.server.max_body_bytes == 8 * 1024 * 1024
    assert config.routes[0].budget == Budget(total_s=120, ttft_s=30, idle_s=30, attempt_s=120)
    assert config.routes[0].retry.retry_on == frozenset({"connect", 429, 502, 503, 504})


@pytest.mark.parametrize(
    ("server", "budget", "expected"),
    [
        ({}, {"total_s": 10}, Budget(total_s=10, ttft_s=10, idle_s=10, attempt_s=10)),
        ({}, {"attempt_s": 5}, Budget(total_s=120, ttft_s=5, idle_s=30, attempt_s=5)),
        ({}, {"ttft_s": 60}, Budget(total_s=120, ttft_s=60, idle_s=30, attempt_s=120)),
        ({"deadline": {"max_s": 60}}, {}, Budget(total_s=60, ttft_s=30, idle_s=30, attempt_s=60)),
    ],
)
def test_budget_defaults_fit_inside_what_is_set(
    server: dict[object, Any], budget: dict[object, Any], expected: Budget
) -> None:
    config = parse_config(config_with(server=server, budget=budget), {})

    assert config.routes[0].budget == expected


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://vllm:8000/v1/", "http://vllm:8000/v1"),
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
        ("http://localhost:8000/", "http://localhost:8000"),
    ],
)
def test_base_url_loses_its_trailing_slash(base_url: str, expected: str) -> None:
    config = parse_config(config_with(upstream={"base_url": base_url}), {})

    assert config.upstreams[0].base_url == expected


def test_target_model_defaults_to_route_model() -> None:
    doc = config_with(
        route={"targets": [{"upstream": "openai"}, {"upstream": "openai", "model": "x"}]}
    )

    targets = parse_config(doc, {}).routes[0].targets

    assert [t.model for t in targets] == ["gpt-4o", "x"]


def test_env_substitution_whole_and_embedded_strings_only() -> None:
    doc = config_with(
        upstream={"base_url": "http://${HOST}:8000/v1", "api_key": "Bearer-${KEY}"},
        route={"model": "${MODEL}"},
    )
    env = {"HOST": "vllm", "KEY": "abc", "MODEL": "llama"}

    config = parse_config(doc, env)

    assert config.upstreams[0].base_url == "http://vllm:8000/v1"
    assert config.upstreams[0].api_key == "Bearer-abc"
    assert config.routes[0].model == "llama"
    assert config.routes[0].targets[0].model == "llama"


def test_substitution_does_not_apply_to_keys() -> None:
    doc = config_with(upstream={"${KEY}": 1})

    assert errors_of(doc, {"KEY": "max_connections"}) == ("upstreams[0].${KEY}: unknown key",)


@pytest.mark.parametrize(
    ("changes", "field", "value"),
    [
        ({"upstream": {"max_pending": 0}}, "max_pending", 0),
        ({"server": {"deadline": {"margin_s": 0}}}, "margin_s", 0),
        ({"retry": {"backoff_s": 0}}, "backoff_s", 0),
        ({"retry": {"retry_on": []}}, "retry_on", frozenset()),
        ({"retry": {"retry_on": ["503", 429, "protocol"]}}, "retry_on", {503, 429, "protocol"}),
    ],
)
def test_edge_values_that_are_valid(changes: dict[str, Any], field: str, value: object) -> None:
    config = parse_config(config_with(**changes), {})

    found = {
        "max_pending": config.upstreams[0].max_pending,
        "margin_s": config.server.deadline.margin_s,
        "backoff_s": config.routes[0].retry.backoff_s,
        "retry_on": config.routes[0].retry.retry_on,
    }[field]
    assert found == value


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        # unknown keys, at every level
        ({"top": {"listen": 80}}, "listen: unknown key"),
        ({"server": {"port": 80}}, "server.port: unknown key"),
        (
            {"server": {"deadline": {"max": 5}}},
            "server.deadline.max: unknown key (did you mean max_s?)",
        ),
        (
            {"top": {"auth": {"keys": [{"name": "a", "key": "k", "role": "x"}]}}},
            "auth.keys[0].role: unknown key",
        ),
        (
            {"top": {"auth": {"keys": [{"name": "a", "key": "k"}], "mode": "x"}}},
            "auth.mode: unknown key",
        ),
        (
            {"upstream": {"max_conns": 4}},
            "upstreams[0].max_conns: unknown key (did you mean max_connections?)",
        ),
        ({"route": {"timeout": 4}}, "routes[0].timeout: unknown key"),
        ({"target": {"share": 4}}, "routes[0].targets[0].share: unknown key"),
        ({"budget": {"total": 4}}, "routes[0].budget.total: unknown key (did you mean total_s?)"),
        ({"retry": {"tries": 4}}, "routes[0].retry.tries: unknown key"),
        ({"route": {3: 4}}, "routes[0].3: unknown key"),
        # wrong types and ranges
        (
            {"server": {"max_body_bytes": "8MB"}},
            'server.max_body_bytes: must be a positive integer (got "8MB")',
        ),
        (
            {"server": {"max_body_bytes": 0}},
            "server.max_body_bytes: must be a positive integer (got 0)",
        ),
        (
            {"upstream": {"max_connections": 1.5}},
            "upstreams[0].max_connections: must be a positive integer (got 1.5)",
        ),
        (
            {"upstream": {"max_connections": True}},
            "upstreams[0].max_connections: must be a positive integer (got true)",
        ),
        (
            {"upstream": {"max_pending": -1}},
            "upstreams[0].max_pending: must be an integer >= 0 (got -1)",
        ),
        (
            {"retry": {"attempts": 0}},
            "routes[0].retry.attempts: must be a positive integer (got 0)",
        ),
        (
            {"budget": {"total_s": True}},
            "routes[0].budget.total_s: must be a number of seconds > 0 (got true)",
        ),
        (
            {"upstream": {"connect_s": 0}},
            "upstreams[0].connect_s: must be a number of seconds > 0 (got 0)",
        ),
        (
            {"budget": {"ttft_s": -1}},
            "routes[0].budget.ttft_s: must be a number of seconds > 0 (got -1)",
        ),
        (
            {"budget": {"idle_s": float("nan")}},
            "routes[0].budget.idle_s: must be a number of seconds > 0 (got nan)",
        ),
        (
            {"upstream": {"keepalive_expiry_s": float("inf")}},
            "upstreams[0].keepalive_expiry_s: must be a number of seconds > 0 (got inf)",
        ),
        (
            {"budget": {"attempt_s": "12s"}},
            'routes[0].budget.attempt_s: must be a number of seconds > 0 (got "12s")',
        ),
        (
            {"upstream": {"headers": {"Authorization": "x"}}},
            "upstreams[0].headers.Authorization: is not a header the gateway lets you set",
        ),
        (
            {"upstream": {"forward_headers": ["Host"]}},
            "upstreams[0].forward_headers[0]: Host is not a header a client may choose",
        ),
        (
            {"server": {"log_format": "xml"}},
            "server.log_format: must be text or json (got 'xml')",
        ),
        (
            {"server": {"stall_warn_s": 0}},
            "server.stall_warn_s: must be a number of seconds > 0 (got 0)",
        ),
        (
            {"retry": {"min_attempt_s": -1}},
            "routes[0].retry.min_attempt_s: must be a number of seconds >= 0 (got -1)",
        ),
        (
            {"route": {"retry_budget": {"ratio": 1.5}}},
            "routes[0].retry_budget.ratio: must be a number from 0 to 1 (got 1.5)",
        ),
        (
            {"route": {"retry_budget": {"min_per_s": "3"}}},
            'routes[0].retry_budget.min_per_s: must be a number from 0 to 1e+06 (got "3")',
        ),
        (
            {"route": {"targets": TWO_TARGETS, "hedge": {}}},
            "routes[0].hedge.after_s: set exactly one of after_s and after_percentile",
        ),
        (
            {"route": {"targets": TWO_TARGETS, "hedge": {"after_percentile": 100}}},
            "routes[0].hedge.after_percentile: must be a number from 1 to 99.9 (got 100)",
        ),
        (
            {"route": {"targets": TWO_TARGETS, "hedge": {"after_s": 0.5, "when": 1}}},
            "routes[0].hedge.when: unknown key",
        ),
        (
            {"route": {"upstream_stream": "yes"}},
            'routes[0].upstream_stream: must be true or false (got "yes")',
        ),
        (
            {"route": {"outlier_mode": "open"}},
            "routes[0].outlier_mode: must be panic or fail_fast (got 'open')",
        ),
        (
            {"upstream": {"outlier": {"consecutive_failures": 0}}},
            "upstreams[0].outlier.consecutive_failures: must be a positive integer (got 0)",
        ),
        (
            {"upstream": {"outlier": {"base_ejection_s": 20, "max_ejection_s": 10}}},
            "upstreams[0].outlier.max_ejection_s: must be at least base_ejection_s (20)",
        ),
        (
            {"retry": {"backoff_s": -0.1}},
            "routes[0].retry.backoff_s: must be a number of seconds >= 0 (got -0.1)",
        ),
        (
            {"server": {"deadline": {"margin_s": 600}}},
            "server.deadline.margin_s: must be less than max_s (600)",
        ),
        (
            {"server": {"deadline": {"client_headers": "yes"}}},
            'server.deadline.client_headers: must be true or false (got "yes")',
        ),
        ({"server": {"deadline": []}}, "server.deadline: must be a mapping (got an empty list)"),
        ({"top": {"server": None}}, "server: must be a mapping (got null)"),
        ({"top": {"auth": None}}, "auth: must be a mapping (got null)"),
        ({"top": {"auth": {}}}, "auth.keys: required (a non-empty list)"),
        (
            {"top": {"auth": {"keys": []}}},
            "auth.keys: must be a non-empty list (got an empty list)",
        ),
        (
            {"top": {"upstreams": {"name": "x"}}},
            "upstreams: must be a non-empty list (got a mapping)",
        ),
        ({"top": {"upstreams": ["openai"]}}, 'upstreams[0]: must be a mapping (got "openai")'),
        ({"top": {"routes": DROP}}, "routes: required (a non-empty list)"),
        ({"upstream": {"name": DROP}}, "upstreams[0].name: required"),
        ({"upstream": {"name": ""}}, 'upstreams[0].name: must be a non-empty string (got "")'),
        ({"upstream": {"base_url": DROP}}, "upstreams[0].base_url: required"),
        ({"route": {"model": 42}}, "routes[0].model: must be a non-empty string (got 42)"),
        (
            {"route": {"targets": []}},
            "routes[0].targets: must be a non-empty list (got an empty list)",
        ),
        ({"target": {"upstream": DROP}}, "routes[0].targets[0].upstream: required"),
        (
            {"retry": {"retry_on": "connect"}},
            'routes[0].retry.retry_on: must be a list (got "connect")',
        ),
        # URLs
        *[
            (
                {"upstream": {"base_url": url}},
                "upstreams[0].base_url: must be an http:// or https:// URL with a host",
            )
            for url in ["ftp://host/v1", "https://", "api.openai.com/v1", "http://h:port/v1"]
        ],
        (
            {"upstream": {"base_url": "https://h/v1?x=1"}},
            "upstreams[0].base_url: must not have a query or fragment",
        ),
        # references and duplicates
        (
            {"target": {"upstream": "vlm"}},
            'routes[0].targets[0].upstream: unknown upstream "vlm" (defined: openai)',
        ),
        (
            {
                "top": {
                    "upstreams": [
                        MINIMAL["upstreams"][0],
                        {"name": "openai", "base_url": "http://x"},
                    ]
                }
            },
            'upstreams[1].name: duplicate upstream name "openai" (first at upstreams[0].name)',
        ),
        (
            {"top": {"routes": MINIMAL["routes"] * 2}},
            'routes[1].model: duplicate route model "gpt-4o" (first at routes[0].model)',
        ),
        (
            {"top": {"auth": {"keys": [{"name": "a", "key": "k1"}, {"name": "a", "key": "k2"}]}}},
            'auth.keys[1].name: duplicate key name "a" (first at auth.keys[0].name)',
        ),
        # budgets
        (
            {"budget": {"total_s": 20, "ttft_s": 25}},
            "routes[0].budget.ttft_s: must not exceed total_s (20)",
        ),
        (
            {"budget": {"total_s": 20, "attempt_s": 10, "ttft_s": 12}},
            "routes[0].budget.ttft_s: must not exceed attempt_s (10)",
        ),
        (
            {"budget": {"total_s": 20, "attempt_s": 25}},
            "routes[0].budget.attempt_s: must not exceed total_s (20)",
        ),
        (
            {"budget": {"total_s": 20, "idle_s": 20.5}},
            "routes[0].budget.idle_s: must not exceed total_s (20)",
        ),
        (
            {"budget": {"attempt_s": 121}},
            "routes[0].budget.attempt_s: must not exceed total_s (120)",
        ),
        (
            {"budget": {"total_s": 700}},
            "routes[0].budget.total_s: must not exceed server.deadline.max_s (600)",
        ),
        (
            {"server": {"deadline": {"max_s": 60}}, "budget": {"total_s": 61}},
            "routes[0].budget.total_s: must not exceed server.deadline.max_s (60)",
        ),
        # retry conditions
        *[
            (
                {"retry": {"retry_on": ["connect", item]}},
                "routes[0].retry.retry_on[1]: must be one of connect, idle, protocol, ttft"
                f" or an HTTP status 400..599 (got {shown})",
            )
            for item, shown in [
                ("tmeout", '"tmeout"'),
                (200, "200"),
                (600, "600"),
                ("5xx", '"5xx"'),
                (True, "true"),
                (429.0, "429.0"),
                (None, "null"),
            ]
        ],
        (
            {"retry": yaml.safe_load("on: [connect]")},
            "routes[0].retry.True: unknown key"
            " (did you mean retry_on? YAML reads a bare 'on' as true)",
        ),
    ],
)
def test_error_names_the_key_path(changes: dict[str, Any], error: str) -> None:
    assert errors_of(config_with(**changes)) == (error,)


@pytest.mark.parametrize(
    ("upstream", "env", "error"),
    [
        (
            {"api_key": "${OPENAI_API_KEY}"},
            {},
            "upstreams[0].api_key: environment variable OPENAI_API_KEY is not set",
        ),
        (
            {"base_url": "http://${HOST}:8000/v1"},
            {},
            "upstreams[0].base_url: environment variable HOST is not set",
        ),
        (
            {"api_key": "${OPENAI_API_KEY"},
            {"OPENAI_API_KEY": OPENAI_KEY},
            "upstreams[0].api_key: malformed variable reference (expected ${NAME})",
        ),
        (
            {"api_key": "${OPENAI_API_KEY}"},
            {"OPENAI_API_KEY": ""},
            "upstreams[0].api_key: is empty after ${VAR} substitution",
        ),
        ({"api_key": 12345}, {}, "upstreams[0].api_key: must be a non-empty string"),
        (
            {"base_url": "ftp://user:hunter2@host", "api_key": OPENAI_KEY, "max_pending": -1},
            {},
            "upstreams[0].base_url: must be an http:// or https:// URL with a host",
        ),
    ],
)
def test_env_and_secret_errors_never_show_a_secret(
    upstream: dict[object, Any], env: dict[str, str], error: str
) -> None:
    errors = errors_of(config_with(upstream=upstream), env)

    assert errors[0] == error
    for secret in (OPENAI_KEY, "12345", "hunter2"):
        assert all(secret not in e for e in errors)


def test_duplicate_auth_key_is_reported_without_the_key() -> None:
    keys = [{"name": "a", "key": "${A}"}, {"name": "b", "key": "${B}"}]
    doc = config_with(top={"auth": {"keys": keys}})

    errors = errors_of(doc, {"A": TEAM_A_KEY, "B": TEAM_A_KEY})

    assert errors == ("auth.keys[1].key: duplicate key (first at auth.keys[0].key)",)


def test_all_errors_are_reported_at_once() -> None:
    doc = config_with(
        top={"listen": 80},
        upstream={"max_conns": 4, "api_key": "${MISSING}"},
        target={"upstream": "vlm"},
        budget={"total_s": 20, "ttft_s": 25},
        retry={"retry_on": ["tmeout"]},
    )

    errors = errors_of(doc)

    assert [e.split(":")[0] for e in errors] == [
        "upstreams[0].api_key",
        "upstreams[0].max_conns",
        "routes[0].targets[0].upstream",
        "routes[0].budget.ttft_s",
        "routes[0].retry.retry_on[0]",
        "listen",
    ]


def test_config_error_str_lists_every_error() -> None:
    error = ConfigError(["a: one", "b: two"])

    assert error.errors == ("a: one", "b: two")
    assert str(error) == "a: one\nb: two"
    assert ConfigError("c: three").errors == ("c: three",)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (None, "config: is empty; expected a mapping with upstreams and routes"),
        (
            ["upstreams"],
            "config: must be a mapping with keys server, auth, upstreams, routes (got a list)",
        ),
        (
            "upstreams",
            'config: must be a mapping with keys server, auth, upstreams, routes (got "upstreams")',
        ),
    ],
)
def test_top_level_must_be_a_mapping(data: object, error: str) -> None:
    assert errors_of(data) == (error,)


def load_errors(path: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    return info.value.errors


@pytest.mark.parametrize("text", ["", "\n", "# nothing here\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)

    assert load_errors(path) == ("config: is empty; expected a mapping with upstreams and routes",)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    assert load_errors(path) == (f"{path}: file not found",)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    (error,) = load_errors(tmp_path)

    assert error.startswith(f"{tmp_path}: cannot read config file: ")


def test_yaml_syntax_error_gives_line_and_column_but_not_the_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("upstreams:\n  - name: openai\n    api_key: sk-secret: oops\n")

    (error,) = load_errors(path)

    assert error == (
        f"{path}: invalid YAML at line 3, column 23: mapping values are not allowed here"
    )
    assert "sk-secret" not in error


def test_yaml_duplicate_keys_are_errors(tmp_path: Path) -> None:
    text = (CONFIGS / "full.yaml").read_text().replace("      idle_s: 5", "      total_s: 30")
    path = tmp_path / "gateway.yaml"
    path.write_text(text)

    errors = load_errors(path)

    assert errors == (
        "routes[0].budget.total_s: duplicate key (line 30); YAML would keep only the last",
        # the parse still runs (env is empty), and reports alongside
        "auth.keys[0].key: environment variable TEAM_A_KEY is not set",
        "upstreams[0].api_key: environment variable OPENAI_API_KEY is not set",
    )


def test_yaml_anchors_and_aliases_load(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "upstreams: [{name: u, base_url: 'http://u'}]\n"
        "routes:\n"
        "  - {model: a, targets: [{upstream: u}], budget: &fast {total_s: 5}}\n"
        "  - {model: b, targets: [{upstream: u}], budget: *fast}\n"
    )

    config = load_config(path, env={})

    assert [r.budget.total_s for r in config.routes] == [5, 5]


def test_describe_config_masks_secrets_and_lists_routes() -> None:
    config = load_config(CONFIGS / "full.yaml", env=FULL_ENV)

    text = describe_config(config)

    assert OPENAI_KEY not in text
    assert TEAM_A_KEY not in text
    assert text == "\n".join(
        [
            "server: max_body_bytes=8388608 deadline.max_s=600 margin_s=0.05 client_headers=true"
            " stall_warn_s=10 log_format=text metrics=true shutdown_grace_s=30"
            " header_timeout_s=10 keepalive_s=5",
            "auth: 1 key (team-a)",
            "upstream openai  https://api.openai.com/v1  api_key=***  max_connections=64"
            " max_pending=256 connect_s=2 keepalive_expiry_s=30 max_response_bytes=33554432"
            "  outlier consecutive_failures=5 base_ejection_s=10 max_ejection_s=300",
            "upstream vllm  http://vllm:8000/v1  api_key=none  max_connections=64"
            " max_pending=256 connect_s=2 keepalive_expiry_s=30 max_response_bytes=33554432"
            "  outlier consecutive_failures=5 base_ejection_s=10 max_ejection_s=300",
            "route gpt-4o  budget total_s=20 ttft_s=8 idle_s=5 attempt_s=12"
            "  retry attempts=3 backoff_s=0.2 on=[connect, idle, ttft, 429, 500, 502, 503, 504]"
            " min_attempt_s=0.1  retry_budget ratio=0.2 min_per_s=3  hedge=after_s=0.5"
            "  upstream_stream=true  outlier_mode=fail_fast",
            "  1. openai -> gpt-4o-2024-08-06",
            "  2. vllm -> meta-llama/Llama-3.1-8B-Instruct (fallback)",
        ]
    )


def test_describe_config_shows_header_names_not_values() -> None:
    doc = config_with(upstream={"headers": {"OpenAI-Organization": "org-secret-123"}})

    text = describe_config(parse_config(doc, {}))

    assert "headers=[openai-organization]" in text
    assert "org-secret-123" not in text


def test_describe_config_open_access_and_url_credentials() -> None:
    doc = config_with(upstream={"base_url": "https://user:hunter2@h.example/v1"})

    text = describe_config(parse_config(doc, {}))

    assert "auth: none (open access)" in text
    assert "upstream openai  https://***@h.example/v1  api_key=none" in text
    assert "hunter2" not in text


def test_config_objects_do_not_show_secrets_in_repr() -> None:
    config = load_config(CONFIGS / "full.yaml", env=FULL_ENV)

    assert OPENAI_KEY not in repr(config)
    assert TEAM_A_KEY not in repr(config)


def test_an_anthropic_upstream_speaks_the_messages_api() -> None:
    upstream: dict[object, Any] = {"kind": "anthropic", "base_url": "https://api.anthropic.com/v1"}
    config = parse_config(config_with(upstream=upstream), {})
    parsed = config.upstreams[0]
    assert (parsed.kind, parsed.anthropic_version, parsed.default_max_tokens) == (
        "anthropic",
        "2023-06-01",
        4096,
    )
    assert "kind=anthropic anthropic_version=2023-06-01" in describe_config(config)
    unquoted = yaml.safe_load("anthropic_version: 2024-01-01")  # YAML reads a date
    custom = {**upstream, **unquoted, "default_max_tokens": 512}
    parsed = parse_config(config_with(upstream=custom), {}).upstreams[0]
    assert (parsed.anthropic_version, parsed.default_max_tokens) == ("2024-01-01", 512)
    assert parse_config(config_with(), {}).upstreams[0].kind == "openai"


@pytest.mark.parametrize(
    ("upstream", "error"),
    [
        ({"kind": "gemini"}, "upstreams[0].kind: must be openai or anthropic (got 'gemini')"),
        (
            {"kind": "anthropic", "base_url": "https://api.anthropic.com"},
            "upstreams[0].base_url: an anthropic upstream's base_url ends in /v1"
            " (https://api.anthropic.com/v1)",
        ),
        (
            {
                "kind": "anthropic",
                "base_url": "https://api.anthropic.com/v1",
                "default_max_tokens": 0,
            },
            "upstreams[0].default_max_tokens: must be a positive integer (got 0)",
        ),
        (
            {"anthropic_version": "2023-06-01"},
            "upstreams[0].anthropic_version: is only for upstreams of kind anthropic",
        ),
    ],
)
def test_upstream_kind_errors(upstream: dict[object, Any], error: str) -> None:
    assert errors_of(config_with(upstream=upstream)) == (error,)
