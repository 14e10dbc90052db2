"""Targets' `priority` and `weight`, a route's `balance` and `affinity`: read, defaulted so
existing configs mean what they meant, validated with key paths."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import Affinity, ConfigError, Route, Target, describe_config, parse_config

UPSTREAMS = [{"name": n, "base_url": f"http://{n}:8000/v1"} for n in ("a", "b", "c", "openai")]


def route_of(route: dict[str, Any]) -> Route:
    config = parse_config({"upstreams": UPSTREAMS, "routes": [{"model": "m", **route}]}, {})
    return config.routes[0]


def errors_of(route: dict[str, Any]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        route_of(route)
    return caught.value.errors


def test_a_route_without_priorities_is_the_ordered_list_it_always_was() -> None:
    route = route_of({"targets": [{"upstream": "a"}, {"upstream": "b"}]})
    assert route.balance is None
    assert route.targets == (Target(upstream="a", model="m"), Target(upstream="b", model="m"))
    assert [(t.priority, t.weight) for t in route.targets] == [(None, 1), (None, 1)]


def test_targets_of_one_priority_form_a_pool_balanced_by_least_load() -> None:
    route = route_of(
        {
            "targets": [
                {"upstream": "a", "priority": 0},
                {"upstream": "b", "priority": 0},
                {"upstream": "c", "priority": 0, "weight": 2},
                {"upstream": "openai", "model": "gpt-4o-mini", "priority": 1},
            ]
        }
    )
    assert route.balance == "least_load"
    assert [(t.upstream, t.priority, t.weight) for t in route.targets] == [
        ("a", 0, 1),
        ("b", 0, 1),
        ("c", 0, 2),
        ("openai", 1, 1),
    ]


def test_an_unset_priority_is_the_targets_position() -> None:
    # b sets priority 0, which is a's position: a and b are one pool
    route = route_of({"targets": [{"upstream": "a"}, {"upstream": "b", "priority": 0}]})
    assert route.balance == "least_load"


def test_balance_and_affinity_are_read() -> None:
    route = route_of(
        {
            "balance": "affinity",
            "affinity": {"key": "user", "prefix_messages": 3},
            "targets": [{"upstream": "a"}, {"upstream": "b"}],
        }
    )
    assert route.balance == "affinity"
    assert route.affinity == Affinity(key="user", prefix_messages=3)
    assert route_of({"balance": "round_robin", "targets": [{"upstream": "a"}]}).balance == (
        "round_robin"
    )
    assert route_of({"balance": "affinity", "targets": [{"upstream": "a"}]}).affinity == Affinity(
        key="prefix", prefix_messages=2
    )


@pytest.mark.parametrize(
    ("route", "error"),
    [
        (
            {"targets": [{"upstream": "a", "priority": -1}]},
            "routes[0].targets[0].priority: must be an integer >= 0 (got -1)",
        ),
        (
            {"targets": [{"upstream": "a", "priority": "high"}]},
            'routes[0].targets[0].priority: must be an integer >= 0 (got "high")',
        ),
        (
            {"targets": [{"upstream": "a", "weight": 0}]},
            "routes[0].targets[0].weight: must be a positive integer (got 0)",
        ),
        (
            {"targets": [{"upstream": "a", "weight": 1.5}]},
            "routes[0].targets[0].weight: must be a positive integer (got 1.5)",
        ),
        (
            {"targets": [{"upstream": "a", "weight": 5000}]},
            "routes[0].targets[0].weight: must be at most 1000 (got 5000)",
        ),
        (
            {"balance": "random", "targets": [{"upstream": "a"}]},
            "routes[0].balance: must be least_load, round_robin or affinity (got 'random')",
        ),
        (
            {"balance": "affinity", "affinity": {"key": "ip"}, "targets": [{"upstream": "a"}]},
            "routes[0].affinity.key: must be prefix or user (got 'ip')",
        ),
        (
            {
                "balance": "affinity",
                "affinity": {"prefix_messages": 0},
                "targets": [{"upstream": "a"}],
            },
            "routes[0].affinity.prefix_messages: must be a positive integer (got 0)",
        ),
        (
            {"balance": "affinity", "affinity": {"messages": 2}, "targets": [{"upstream": "a"}]},
            "routes[0].affinity.messages: unknown key",
        ),
        (
            {"affinity": {"key": "user"}, "targets": [{"upstream": "a"}, {"upstream": "b"}]},
            "routes[0].affinity: is only for balance: affinity",
        ),
    ],
)
def test_bad_values_name_their_key(route: dict[str, Any], error: str) -> None:
    assert any(e.startswith(error) for e in errors_of(route)), errors_of(route)


def test_described_with_priority_and_weight_when_balanced() -> None:
    ordered = parse_config(
        {
            "upstreams": UPSTREAMS,
            "routes": [{"model": "m", "targets": [{"upstream": "a"}, {"upstream": "b"}]}],
        },
        {},
    )
    assert "  2. b -> m (fallback)" in describe_config(ordered)
    assert "balance=" not in describe_config(ordered)
    pooled = parse_config(
        {
            "upstreams": UPSTREAMS,
            "routes": [
                {
                    "model": "m",
                    "balance": "affinity",
                    "targets": [{"upstream": "a", "weight": 3}, {"upstream": "b", "priority": 0}],
                }
            ],
        },
        {},
    )
    text = describe_config(pooled)
    assert "balance=affinity key=prefix prefix_messages=2" in text
    assert "  1. a -> m  priority=0 weight=3" in text
    assert "  2. b -> m  priority=0 weight=1" in text
