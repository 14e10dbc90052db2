"""Quota arithmetic, pure: no clock of its own, no I/O.

A limit of N per minute is a bucket of N that refills at N/60 per second, continuously (not
a fixed window). A request takes 1 from the requests bucket and reserves its estimated tokens
from the tokens bucket; when it ends, the difference between what it reserved and what it
used goes back (or is taken: a bucket may go below zero, a debt that the refill pays off).
A request refused is charged nothing. The Redis store (gateway.shared.quota_store) runs the
same arithmetic in Lua, on Redis's clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway.config import KeyLimits

Limit = Literal["requests", "tokens", "concurrent"]

# What a request reserves when it sets no max_tokens / max_completion_tokens /
# max_output_tokens (documented in the README's "Tenants").
DEFAULT_COMPLETION_TOKENS = 1024
PROMPT_BYTES_PER_TOKEN = 4  # the prompt's estimate: its request body's size / 4


@dataclass(slots=True)
class Bucket:
    """`level` tokens at time `at` (seconds), out of `capacity`, refilled at capacity / 60."""

    capacity: int
    level: float
    at: float

    @classmethod
    def full(cls, capacity: int, now: float) -> Bucket:
        return cls(capacity, float(capacity), now)

    def available(self, now: float) -> float:
        return min(float(self.capacity), self.level + max(0.0, now - self.at) * self.rate)

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def wait_for(self, cost: float, now: float) -> float:
        """Seconds until `cost` is available (0: now)."""
        return max(0.0, (cost - self.available(now)) / self.rate)

    def take(self, cost: float, now: float) -> None:
        self.level, self.at = self.available(now) - cost, now

    def give(self, amount: float, now: float) -> None:
        """Give back (or, negative, take more): settle a reservation."""
        self.level, self.at = min(float(self.capacity), self.available(now) + amount), now

    def reset_s(self, now: float) -> float:
        """Seconds until full again."""
        return (self.capacity - self.available(now)) / self.rate


@dataclass(frozen=True, slots=True)
class Standing:
    """One limit as a client sees it: `x-ratelimit-{limit,remaining,reset}-<kind>`."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a request may start, and if not which limit refused it and when to try again;
    the standing of the key's buckets either way (after the request's reservation if
    admitted)."""

    admitted: bool
    refused_by: Limit | None = None
    retry_after_s: float = 0.0
    requests: Standing | None = None
    tokens: Standing | None = None


@dataclass(slots=True)
class TenantState:
    """One key's buckets and requests in flight, as the in-process store keeps them."""

    requests: Bucket | None
    tokens: Bucket | None
    in_flight: int = 0

    @classmethod
    def new(cls, limits: KeyLimits, now: float) -> TenantState:
        rpm, tpm = limits.requests_per_min, limits.tokens_per_min
        return cls(
            requests=Bucket.full(rpm, now) if rpm else None,
            tokens=Bucket.full(tpm, now) if tpm else None,
        )


def admit(state: TenantState, limits: KeyLimits, tokens: int, now: float) -> Verdict:
    """Every limit of the key at once: all pass and all are taken, or nothing is."""
    cost = reserved_cost(limits, tokens)
    waits: list[tuple[float, Limit]] = []
    if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
        waits.append((1.0, "concurrent"))  # unknown: when one of its requests ends
    if state.requests is not None and (wait := state.requests.wait_for(1, now)) > 0:
        waits.append((wait, "requests"))
    if state.tokens is not None and (wait := state.tokens.wait_for(cost, now)) > 0:
        waits.append((wait, "tokens"))
    if not waits:
        if state.requests is not None:
            state.requests.take(1, now)
        if state.tokens is not None:
            state.tokens.take(cost, now)
        state.in_flight += 1
    wait, limit = max(waits, default=(0.0, None))
    return Verdict(
        admitted=not waits,
        refused_by=limit,
        retry_after_s=wait,
        requests=_standing(state.requests, now),
        tokens=_standing(state.tokens, now),
    )


def settle(state: TenantState, reserved: int, used: int, now: float) -> None:
    """The request ended having used `used` tokens of the `reserved` taken at admission."""
    state.in_flight = max(0, state.in_flight - 1)
    if state.tokens is not None:
        state.tokens.give(reserved - used, now)


def reserved_cost(limits: KeyLimits, tokens: int) -> int:
    """What a request reserves from the tokens bucket: its estimate, at most the whole
    bucket (a request larger than a minute's tokens waits for a full bucket, not forever)."""
    if limits.tokens_per_min is None:
        return 0
    return min(tokens, limits.tokens_per_min)


def _standing(bucket: Bucket | None, now: float) -> Standing | None:
    if bucket is None:
        return None
    remaining = max(0, math.floor(bucket.available(now)))
    return Standing(bucket.capacity, remaining, bucket.reset_s(now))


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a request is expected to use: its prompt (from its size) and its completion (its
    max_tokens, or DEFAULT_COMPLETION_TOKENS)."""

    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def estimate(payload: Mapping[str, Any], body_size: int, *, completes: bool) -> Estimate:
    """`completes` is False for embeddings, which generate nothing."""
    prompt = math.ceil(body_size / PROMPT_BYTES_PER_TOKEN)
    if not completes:
        return Estimate(prompt, 0)
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(name)
        if type(value) is int and value > 0:
            return Estimate(prompt, value)
    return Estimate(prompt, DEFAULT_COMPLETION_TOKENS)


@dataclass(frozen=True, slots=True)
class Charge:
    """What a request is charged when it ends: the usage the upstream reported, or, when it
    reported none (a stream cut short, an upstream that sends no usage), its prompt estimate
    and the chunks relayed; nothing if it got no answer at all."""

    prompt: int
    completion: int
    reported: bool

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def charge(
    usage: Mapping[str, Any] | None, reserved: Estimate, *, answered: bool, chunks: int
) -> Charge:
    if usage is not None:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is int and type(completion) is int:
            return Charge(max(0, prompt), max(0, completion), reported=True)
    if not answered:
        return Charge(0, 0, reported=False)
    return Charge(reserved.prompt, min(chunks, reserved.completion), reported=False)


def ratelimit_headers(verdict: Verdict) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the key's limits (none for a limit not set), and
    `Retry-After` (whole seconds) with `retry-after-ms` when refused; the `openai` SDK waits
    for those before its retry."""
    headers: dict[str, str] = {}
    for kind, standing in (("requests", verdict.requests), ("tokens", verdict.tokens)):
        if standing is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(standing.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(standing.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = duration(standing.reset_s)
    if not verdict.admitted:
        headers["retry-after"] = str(max(1, math.ceil(verdict.retry_after_s)))
        headers["retry-after-ms"] = str(max(1, math.ceil(verdict.retry_after_s * 1000)))
    return headers


def duration(seconds: float) -> str:
    """A duration as OpenAI writes them (Go's format): `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text
