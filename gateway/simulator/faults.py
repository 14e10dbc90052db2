"""The fault knobs: parsed from `x-sim-*` headers and the model-name suffix of one request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

HANG_LIMIT_MS = 600_000
MAX_TOKENS = 100_000
KNOBS = frozenset(
    {"latency-ms", "ttft-ms", "gap-ms", "tokens", "tool-calls", "hang", "keepalive-ms", "status"}
    | {"retry-after", "malformed", "reset", "close", "flaky", "error-after"}
    | {"include-usage", "extra-keys", "context-limit", "error-body"}
)

Knobs = Mapping[str, str]


class FaultError(ValueError):
    """A simulator knob that is unknown or has a bad value; `knob` names it."""

    def __init__(self, knob: str, message: str) -> None:
        super().__init__(message)
        self.knob = knob


@dataclass(frozen=True, kw_only=True)
class Faults:
    """What to do to one request (see the package docstring); `None` means off."""

    latency_ms: int = 0
    ttft_ms: int = 0
    gap_ms: int = 0
    tokens: int = 8
    tool_calls: int = 0
    hang_before_headers: bool = False
    hang_after_tokens: int | None = None  # hang=body is 0
    keepalive_ms: int | None = None
    status: int | None = None
    retry_after: str | None = None
    malformed: str | None = None  # "json" or "sse"
    reset_after_tokens: int | None = None  # reset=after-headers is 0
    close: bool = False
    flaky: int | None = None
    error_after_tokens: int | None = None
    ignore_include_usage: bool = False  # include-usage=ignore: streams never carry usage
    extra_keys: bool = False
    context_limit: int | None = None  # prompt tokens beyond which a request is refused
    error_body: str | None = None  # "text" or "flat": how an error status's body is shaped


def parse_faults(headers: Mapping[str, str], model: str) -> Faults:
    """The faults asked for by `x-sim-*` headers and the model-name suffix; headers win."""
    knobs = _suffix_knobs(model)
    for name, value in headers.items():
        if name.lower().startswith("x-sim-"):
            knobs[name.lower().removeprefix("x-sim-")] = value.strip()
    unknown = sorted(knobs.keys() - KNOBS)
    if unknown:
        known = ", ".join(sorted(KNOBS))
        raise FaultError(unknown[0], f"unknown simulator knob {unknown[0]!r}; known: {known}")
    if knobs.get("malformed") not in (None, "json", "sse"):
        raise _invalid(knobs, "malformed", "json or sse")
    if knobs.get("close") not in (None, "true", "false"):
        raise _invalid(knobs, "close", "true or false")
    if knobs.get("include-usage") not in (None, "ignore"):
        raise _invalid(knobs, "include-usage", "ignore")
    if knobs.get("extra-keys") not in (None, "true", "false"):
        raise _invalid(knobs, "extra-keys", "true or false")
    if knobs.get("error-body") not in (None, "text", "flat"):
        raise _invalid(knobs, "error-body", "text or flat")
    if knobs.get("retry-after") == "":
        raise _invalid(knobs, "retry-after", "a value")
    hang = knobs.get("hang")
    return Faults(
        latency_ms=_int(knobs, "latency-ms", 0),
        ttft_ms=_int(knobs, "ttft-ms", 0),
        gap_ms=_int(knobs, "gap-ms", 0),
        tokens=_int(knobs, "tokens", 8, high=MAX_TOKENS),
        tool_calls=_int(knobs, "tool-calls", 0, high=16),
        hang_before_headers=hang == "headers",
        hang_after_tokens=None if hang == "headers" else _after(knobs, "hang", alias="body"),
        keepalive_ms=_optional_int(knobs, "keepalive-ms", low=1),
        status=_optional_int(knobs, "status", low=400, high=599),
        retry_after=knobs.get("retry-after"),
        malformed=knobs.get("malformed"),
        reset_after_tokens=_after(knobs, "reset", alias="after-headers"),
        close=knobs.get("close") == "true",
        flaky=_optional_int(knobs, "flaky", high=MAX_TOKENS),
        error_after_tokens=_optional_int(knobs, "error-after", high=MAX_TOKENS),
        ignore_include_usage=knobs.get("include-usage") == "ignore",
        extra_keys=knobs.get("extra-keys") == "true",
        context_limit=_optional_int(knobs, "context-limit", high=MAX_TOKENS),
        error_body=knobs.get("error-body"),
    )


def _suffix_knobs(model: str) -> dict[str, str]:
    _, at, suffix = model.rpartition("@")
    if not at or "=" not in suffix:
        return {}
    knobs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in suffix.split(","))):
        name, equals, value = item.partition("=")
        if not equals:
            raise FaultError(name, f"simulator knob {name!r} in the model suffix has no value")
        knobs[name.strip().lower()] = value.strip()
    return knobs


def _invalid(knobs: Knobs, knob: str, expected: str) -> FaultError:
    return FaultError(knob, f"invalid simulator knob {knob}={knobs[knob]!r}: expected {expected}")


def _optional_int(
    knobs: Knobs, knob: str, *, low: int = 0, high: int = HANG_LIMIT_MS
) -> int | None:
    value = knobs.get(knob)
    if value is None:
        return None
    if value.isascii() and value.isdigit() and low <= int(value) <= high:
        return int(value)
    raise _invalid(knobs, knob, f"an integer from {low} to {high}")


def _int(knobs: Knobs, knob: str, default: int, *, high: int = HANG_LIMIT_MS) -> int:
    value = _optional_int(knobs, knob, high=high)
    return default if value is None else value


def _after(knobs: Knobs, knob: str, *, alias: str) -> int | None:
    """Tokens to send before the fault: `alias` is 0, `after-N` is N, absent is None."""
    value = knobs.get(knob)
    if value is None or value == alias:
        return None if value is None else 0
    count = value.removeprefix("after-")
    if value.startswith("after-") and count.isascii() and count.isdigit():
        return int(count)
    expected = "headers, body or after-N" if knob == "hang" else f"{alias} or after-N"
    raise _invalid(knobs, knob, expected)
