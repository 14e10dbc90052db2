"""The built-in demo: routes onto the in-process simulator, one healthy and one per fault."""

from __future__ import annotations

from typing import Any

from gateway.config import Config, parse_config

# model -> (simulator behaviour, budget): each shows one thing the gateway does.
_DEMO_ROUTES: dict[str, tuple[str, dict[str, float]]] = {
    "demo": ("tokens=12,gap-ms=40", {}),
    "demo-slow-first-token": ("ttft-ms=5000", {"ttft_s": 2}),
    "demo-stall": ("hang=after-3,keepalive-ms=200", {"idle_s": 2}),
    "demo-hang": ("hang=headers", {"total_s": 3}),
    "demo-overloaded": ("status=503,retry-after=2", {}),
    "demo-garbage": ("malformed=sse", {}),
}


def demo_config(base_url: str) -> Config:
    """The demo config, its simulator upstream at `base_url` (e.g. http://127.0.0.1:8080/sim-upstream/v1).

    Ejection is kept per upstream entry, so each faulty model has an entry of its own
    (`simulator-stall`, ...): walking the table ejects only the faulty ones, never `demo`'s.
    """
    routes: list[dict[str, Any]] = [
        {
            "model": model,
            "targets": [{"upstream": _upstream_of(model), "model": f"sim@{behaviour}"}],
            "budget": {"total_s": 30, **budget},
        }
        for model, (behaviour, budget) in _DEMO_ROUTES.items()
    ]
    routes.append(
        {
            "model": "demo-fallback",
            "targets": [
                {"upstream": "simulator-fallback", "model": "sim@status=502"},
                {"upstream": "simulator", "model": "sim@tokens=5"},
            ],
            "budget": {"total_s": 30},
        }
    )
    # The simulator speaks the Messages API too: chat calls to `demo-claude` are translated,
    # and the `anthropic` SDK can call /v1/messages with it.
    routes.append(
        {
            "model": "demo-claude",
            "targets": [{"upstream": "simulator-anthropic", "model": "claude@tokens=12,gap-ms=40"}],
            "budget": {"total_s": 30},
        }
    )
    names = [*map(_upstream_of, _DEMO_ROUTES), "simulator-fallback"]
    upstreams: list[dict[str, Any]] = [
        {"name": name, "base_url": base_url, "max_connections": 32} for name in names
    ]
    upstreams.append(
        {
            "name": "simulator-anthropic",
            "base_url": base_url,
            "kind": "anthropic",
            "max_connections": 32,
        }
    )
    return parse_config({"upstreams": upstreams, "routes": routes}, env={})


def _upstream_of(model: str) -> str:
    """`demo` -> `simulator`, `demo-stall` -> `simulator-stall`."""
    return "simulator" + model.removeprefix("demo")


def demo_models() -> list[str]:
    return [*_DEMO_ROUTES, "demo-fallback", "demo-claude"]
