"""Gateway configuration: immutable, validated objects loaded from YAML.

Every duration is in seconds (`*_s`). `${VAR}` strings are read from the environment at load
time; nothing reads the environment after that. Every error names the key path it is about.

    load_config(path, env)   YAML file -> Config, or ConfigError listing *every* problem
    parse_config(data, env)  the same for an already-parsed YAML document
    describe_config(config)  the resolved config as text for `check-config`, secrets masked

The generic machinery (typed reads that collect errors, `${VAR}` expansion, YAML file reading)
is in `gateway.config_loader`; this module holds the schema.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

from gateway.config_loader import ConfigError, Reader, got, read_yaml

__all__ = [
    "RETRY_CONDITIONS",
    "Affinity",
    "ApiKey",
    "AuthConfig",
    "Budget",
    "Config",
    "ConfigError",
    "DeadlineConfig",
    "Hedge",
    "KeyLimits",
    "OutlierPolicy",
    "RetryBudget",
    "RetryPolicy",
    "Route",
    "ServerConfig",
    "SharedConfig",
    "Target",
    "TelemetryConfig",
    "TracesConfig",
    "UpstreamConfig",
    "describe_config",
    "load_config",
    "parse_config",
]

# Conditions a route may retry on: transport-level ones by name, HTTP statuses by number.
RETRY_CONDITIONS = frozenset({"connect", "ttft", "idle", "protocol"})
LOG_FORMATS = ("text", "json")
OUTLIER_MODES = ("panic", "fail_fast")
Balance = Literal["least_load", "round_robin", "affinity"]
_BALANCES: dict[str, Balance] = {
    "least_load": "least_load", "round_robin": "round_robin", "affinity": "affinity"
}  # fmt: skip
ON_FAILURE = ("closed", "open", "local_share")
PRIORITIES = ("high", "normal", "low")  # a key's class in every upstream's queue, first first


@dataclass(frozen=True, kw_only=True)
class DeadlineConfig:
    """`server.deadline`: the ceiling on any request's deadline and how client hints apply."""

    max_s: float = 600.0
    margin_s: float = 0.05
    client_headers: bool = True


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """`server`: limits for the HTTP front end."""

    max_body_bytes: int = 8 * 1024 * 1024
    deadline: DeadlineConfig = field(default_factory=DeadlineConfig)
    stall_warn_s: float = 10.0  # in flight this long without a token: a stalled request
    log_format: str = "text"  # or "json"
    metrics: bool = True  # record metrics and serve /metrics
    shutdown_grace_s: float = 30.0  # on SIGTERM: time for the work in flight to finish
    header_timeout_s: float = 10.0  # a client's request line and headers must arrive in this
    keepalive_s: float = 5.0  # an idle client connection is closed after this


@dataclass(frozen=True, kw_only=True)
class KeyLimits:
    """`auth.keys[].limits`: a tenant's quotas (None: not limited). The per-minute ones are
    token buckets refilled continuously; `max_concurrent` counts requests in flight."""

    requests_per_min: int | None = None
    tokens_per_min: int | None = None  # prompt + completion
    max_concurrent: int | None = None


@dataclass(frozen=True, kw_only=True)
class ApiKey:
    """One client credential, a tenant; `name` is what logs and metrics show, never `key`."""

    name: str
    key: str = field(repr=False)
    priority: Literal["high", "normal", "low"] = "normal"
    limits: KeyLimits | None = None  # None: no quota at all (the hot path checks only this)
    models: frozenset[str] | None = None  # routes the key may use; None: all


@dataclass(frozen=True, kw_only=True)
class AuthConfig:
    """`auth`: accepted client keys. `Config.auth is None` means open access."""

    keys: tuple[ApiKey, ...]


@dataclass(frozen=True, kw_only=True)
class OutlierPolicy:
    """`upstreams[].outlier`: eject an upstream after this many failures in a row that are its
    fault, for `base_ejection_s` x times ejected (at most `max_ejection_s`), then probe it."""

    consecutive_failures: int = 5
    base_ejection_s: float = 10.0
    max_ejection_s: float = 300.0


@dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    """One upstream: where it is, its credential, and its bulkhead (`max_pending` 0 means no
    queue: shed as soon as all `max_connections` are busy)."""

    name: str
    base_url: str  # normalised: no trailing slash
    kind: Literal["openai", "anthropic"] = "openai"  # the API it speaks
    api_key: str | None = field(default=None, repr=False)
    max_connections: int = 64
    max_pending: int = 256
    connect_s: float = 2.0
    keepalive_expiry_s: float = 30.0
    max_response_bytes: int = 32 * 1024 * 1024  # a whole (or assembled) answer, decompressed
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # sent on every call
    forward_headers: tuple[str, ...] = ()  # client headers passed on (lower-cased names)
    outlier: OutlierPolicy = field(default_factory=OutlierPolicy)
    anthropic_version: str = "2023-06-01"  # kind anthropic: unless a /v1/messages client sets it
    default_max_tokens: int = 4096  # kind anthropic: for chat requests that set no max_tokens


@dataclass(frozen=True, kw_only=True)
class Target:
    """One place a route can send a request: an upstream and the model name it expects.
    Targets of equal `priority` (None: the target's position) form a pool the route balances
    over, in proportion to `weight`; a lower priority (a larger number) is the overflow."""

    upstream: str
    model: str
    priority: int | None = None
    weight: int = 1


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A route's time budget: whole request, first content event, gap between content
    events, one attempt. The loader guarantees ttft_s <= attempt_s <= total_s, idle_s <= total_s."""

    total_s: float = 120.0
    ttft_s: float = 30.0
    idle_s: float = 30.0
    attempt_s: float = 120.0


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Tries per target (the first included) and what may be retried: names from
    RETRY_CONDITIONS or HTTP statuses."""

    attempts: int = 1
    backoff_s: float = 0.2
    retry_on: frozenset[str | int] = frozenset({"connect", 429, 502, 503, 504})
    min_attempt_s: float = 0.1  # no attempt starts with less than this left


@dataclass(frozen=True, kw_only=True)
class RetryBudget:
    """`retry_budget`: retries and hedges at most `ratio` of the route's recent requests,
    but always `min_per_s` per second (Envoy's retry budget)."""

    ratio: float = 0.2
    min_per_s: float = 3.0


@dataclass(frozen=True, kw_only=True)
class Hedge:
    """`hedge`: start a second attempt on the next target when the first has no token after
    `after_s`, or after the first target's recent `after_percentile` time to first token."""

    after_s: float | None = None
    after_percentile: float | None = None


@dataclass(frozen=True, kw_only=True)
class Affinity:
    """`affinity`: what makes requests alike, so they go to the same member of a pool: a hash
    of the first `prefix_messages` messages (`prefix`), or the request's `user` field."""

    key: Literal["prefix", "user"] = "prefix"
    prefix_messages: int = 2


@dataclass(frozen=True, kw_only=True)
class Route:
    """A model name clients send, with targets tried in order (later ones are fallbacks)."""

    model: str
    targets: tuple[Target, ...]
    budget: Budget = field(default_factory=Budget)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    retry_budget: RetryBudget = field(default_factory=RetryBudget)
    hedge: Hedge | None = None
    upstream_stream: bool = True  # ask for a stream even when the client did not
    # When every target is ejected: send to the one back soonest, or answer `circuit_open`.
    outlier_mode: str = "panic"  # or "fail_fast"
    # How a pool of targets is balanced (gateway.resilience.balance): None for a route that
    # does not balance (every target its own priority, none set): its targets in order, each
    # a fallback for the one before, as routes always were.
    balance: Balance | None = None
    affinity: Affinity = field(default_factory=Affinity)


@dataclass(frozen=True, kw_only=True)
class SharedConfig:
    """`shared`: one cap for every worker and replica, through a Redis (gateway.shared).
    `on_failure` says what a process does while Redis does not answer within `timeout_s`:
    `closed` refuses (503), `open` admits without the shared cap, `local_share` enforces
    ceil(limit / (expected_replicas x workers)) on its own."""

    redis_url: str = field(repr=False)  # redis:// or rediss://; may hold a password
    key_prefix: str = "llmgw:"
    timeout_s: float = 0.05  # per Redis call; past it the call counts as failed
    lease_ttl_s: float = 10.0  # a slot held by a process that died frees after this
    on_failure: Literal["closed", "open", "local_share"] = "local_share"
    expected_replicas: int = 3


@dataclass(frozen=True, kw_only=True)
class TracesConfig:
    """`telemetry.traces`: OpenTelemetry spans exported over OTLP/HTTP (gateway.observability
    .tracing). `endpoint` None: the standard OTEL_EXPORTER_OTLP_* variables say where."""

    endpoint: str | None = None  # the collector's base URL; /v1/traces is added
    sample_ratio: float = 1.0  # of traces the gateway starts; a caller's choice is followed
    capture_content: bool = False  # record the request's messages on the span


@dataclass(frozen=True, kw_only=True)
class TelemetryConfig:
    """`telemetry`: traces are off (`traces` None) unless configured."""

    traces: TracesConfig | None = None


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole gateway configuration, as `load_config` returns it."""

    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig | None = None
    upstreams: tuple[UpstreamConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    shared: SharedConfig | None = None  # None: each process keeps its own caps
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file; `env` (default: `os.environ`) fills `${VAR}`s.
    Raises ConfigError listing every problem, file and syntax errors included."""
    data, duplicates = read_yaml(Path(path))
    try:
        config = parse_config(data, os.environ if env is None else env)
    except ConfigError as exc:
        raise ConfigError([*duplicates, *exc.errors]) from None
    if duplicates:
        raise ConfigError(duplicates)
    return config


def parse_config(data: object, env: Mapping[str, str]) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem at once."""
    if data is None:
        raise ConfigError("config: is empty; expected a mapping with upstreams and routes")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config: must be a mapping with keys server, auth, upstreams, routes{got(data)}"
        )
    errors: list[str] = []
    top = Reader(data, "", env, errors)
    server = _read_server(top.section("server"))
    auth_section = top.section("auth")
    auth = _read_auth(auth_section) if top.has("auth") and top.ok("auth") else None
    upstreams: list[UpstreamConfig] = []
    seen: dict[str, str] = {}
    for r in top.sections("upstreams"):
        upstreams.append(_read_upstream(r))
        _unique(r, "name", upstreams[-1].name, seen, f'upstream name "{upstreams[-1].name}"')
    names = tuple(seen)
    routes: list[Route] = []
    seen = {}
    for r in top.sections("routes"):
        routes.append(_read_route(r, names, server.deadline.max_s))
        _unique(r, "model", routes[-1].model, seen, f'route model "{routes[-1].model}"')
    shared = _read_shared(top.section("shared")) if top.has("shared") and top.ok("shared") else None
    telemetry = _read_telemetry(top.section("telemetry"))
    if auth is not None:
        _check_key_models(auth_section, auth, {route.model for route in routes})
    top.unknown_keys()
    if errors:
        raise ConfigError(errors)
    return Config(
        server=server,
        auth=auth,
        upstreams=tuple(upstreams),
        routes=tuple(routes),
        shared=shared,
        telemetry=telemetry,
    )


def _read_server(r: Reader) -> ServerConfig:
    default = ServerConfig()
    max_body_bytes = r.integer("max_body_bytes", default.max_body_bytes)
    d = r.section("deadline")
    max_s = d.seconds("max_s", default.deadline.max_s)
    margin_s = d.seconds("margin_s", default.deadline.margin_s, allow_zero=True)
    if d.ok("max_s", "margin_s") and margin_s >= max_s:
        d.error("margin_s", f"must be less than max_s ({_num(max_s)})")
    client_headers = d.boolean("client_headers", default.deadline.client_headers)
    d.unknown_keys()
    stall_warn_s = r.seconds("stall_warn_s", default.stall_warn_s)
    log_format = r.optional_text("log_format") or default.log_format
    if log_format not in LOG_FORMATS:
        r.error("log_format", f"must be text or json (got {log_format!r})")
    metrics = r.boolean("metrics", default.metrics)
    shutdown_grace_s = r.seconds("shutdown_grace_s", default.shutdown_grace_s, allow_zero=True)
    header_timeout_s = r.seconds("header_timeout_s", default.header_timeout_s)
    keepalive_s = r.seconds("keepalive_s", default.keepalive_s)
    r.unknown_keys()
    deadline = DeadlineConfig(max_s=max_s, margin_s=margin_s, client_headers=client_headers)
    return ServerConfig(
        max_body_bytes=max_body_bytes,
        deadline=deadline,
        stall_warn_s=stall_warn_s,
        log_format=log_format,
        metrics=metrics,
        shutdown_grace_s=shutdown_grace_s,
        header_timeout_s=header_timeout_s,
        keepalive_s=keepalive_s,
    )


def _read_auth(r: Reader) -> AuthConfig:
    keys: list[ApiKey] = []
    names: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for k in r.sections("keys"):
        keys.append(_read_key(k))
        _unique(k, "name", keys[-1].name, names, f'key name "{keys[-1].name}"')
        _unique(k, "key", keys[-1].key, secrets, "key")  # never quote the secret
        k.unknown_keys()
    r.unknown_keys()
    return AuthConfig(keys=tuple(keys))


def _read_key(k: Reader) -> ApiKey:
    priority = k.optional_text("priority") or "normal"
    if priority not in PRIORITIES:
        k.error("priority", f"must be high, normal or low (got {priority!r})")
        priority = "normal"
    limits = _read_limits(k.section("limits")) if k.has("limits") and k.ok("limits") else None
    models = None
    if k.has("models"):
        names = []
        for key, item in k.items("models"):
            if isinstance(item, str) and item:
                names.append(item)
            else:
                k.error(key, f"must be a route's model name{got(item)}")
        models = frozenset(names)
    return ApiKey(
        name=k.text("name"),
        key=k.text("key", secret=True),
        priority=priority,  # type: ignore[arg-type]  # one of PRIORITIES, checked above
        limits=limits,
        models=models,
    )


def _read_limits(r: Reader) -> KeyLimits | None:
    """Each limit is optional; `limits: {}` is no limit at all."""
    limits = KeyLimits(
        requests_per_min=r.integer("requests_per_min", 0) or None,
        tokens_per_min=r.integer("tokens_per_min", 0) or None,
        max_concurrent=r.integer("max_concurrent", 0) or None,
    )
    r.unknown_keys()
    return limits if limits != KeyLimits() else None


def _check_key_models(r: Reader, auth: AuthConfig, routes: set[str]) -> None:
    """A key's `models` names routes that exist (a typo would lock the key out silently)."""
    for index, key in enumerate(auth.keys):
        for model in sorted((key.models or frozenset()) - routes):
            defined = ", ".join(sorted(routes)) or "none"
            r.errors.append(
                f'{r.at("keys")}[{index}].models: unknown route "{model}" (defined: {defined})'
            )


def _read_upstream(r: Reader) -> UpstreamConfig:
    default = UpstreamConfig(name="", base_url="")
    kind = r.optional_text("kind") or default.kind
    if kind not in ("openai", "anthropic"):
        r.error("kind", f"must be openai or anthropic (got {kind!r})")
        kind = default.kind
    base_url = _read_base_url(r)
    if kind == "anthropic" and r.ok("base_url") and not base_url.endswith("/v1"):
        r.error(
            "base_url",
            "an anthropic upstream's base_url ends in /v1 (https://api.anthropic.com/v1)",
        )
    upstream = UpstreamConfig(
        name=r.text("name"),
        base_url=base_url,
        kind="anthropic" if kind == "anthropic" else "openai",
        api_key=r.optional_text("api_key", secret=True),
        max_connections=r.integer("max_connections", default.max_connections),
        max_pending=r.integer("max_pending", default.max_pending, minimum=0),
        connect_s=r.seconds("connect_s", default.connect_s),
        keepalive_expiry_s=r.seconds("keepalive_expiry_s", default.keepalive_expiry_s),
        max_response_bytes=r.integer("max_response_bytes", default.max_response_bytes),
        headers=_read_headers(r),
        forward_headers=_read_forward_headers(r),
        outlier=_read_outlier(r.section("outlier")),
        anthropic_version=_read_anthropic_version(r) or default.anthropic_version,
        default_max_tokens=r.integer("default_max_tokens", default.default_max_tokens),
    )
    for key in ("anthropic_version", "default_max_tokens"):
        if kind != "anthropic" and r.has(key):
            r.error(key, "is only for upstreams of kind anthropic")
    r.unknown_keys()
    return upstream


def _read_anthropic_version(r: Reader) -> str | None:
    """A version is a date, which YAML reads as one when it is not quoted: take it as written."""
    value = r.get("anthropic_version")
    if isinstance(value, datetime.date):
        return value.isoformat()
    return r.optional_text("anthropic_version")


# Never set from config or passed from a client: framing, auth and routing are the gateway's.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "authorization", "x-api-key"}
    | {"content-type", "accept", "x-request-id", "x-request-timeout-ms", "cookie", "upgrade"}
)
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def _read_headers(r: Reader) -> tuple[tuple[str, str], ...]:
    """`headers`: static headers for this upstream (e.g. OpenAI-Organization), `${VAR}` allowed;
    values are treated as secrets."""
    section = r.section("headers")
    headers = []
    for name in list(section.data):
        key = str(name)
        value = section.text(key, secret=True)
        if not _HEADER_NAME.fullmatch(key) or key.lower() in _RESERVED_HEADERS:
            section.error(key, "is not a header the gateway lets you set")
        elif value and ("\r" in value or "\n" in value):
            section.error(key, "must be one line")
        elif value:
            headers.append((key.lower(), value))
    return tuple(headers)


def _read_forward_headers(r: Reader) -> tuple[str, ...]:
    """`forward_headers`: names of client headers this upstream may receive."""
    names = []
    for key, item in r.items("forward_headers", required=False, allow_empty=True):
        if not isinstance(item, str) or not _HEADER_NAME.fullmatch(item):
            r.error(key, f"must be a header name{got(item)}")
        elif item.lower() in _RESERVED_HEADERS:
            r.error(key, f"{item} is not a header a client may choose")
        else:
            names.append(item.lower())
    return tuple(names)


def _read_outlier(r: Reader) -> OutlierPolicy:
    default = OutlierPolicy()
    policy = OutlierPolicy(
        consecutive_failures=r.integer("consecutive_failures", default.consecutive_failures),
        base_ejection_s=r.seconds("base_ejection_s", default.base_ejection_s),
        max_ejection_s=r.seconds("max_ejection_s", default.max_ejection_s),
    )
    if r.ok("base_ejection_s", "max_ejection_s") and policy.max_ejection_s < policy.base_ejection_s:
        r.error(
            "max_ejection_s", f"must be at least base_ejection_s ({_num(policy.base_ejection_s)})"
        )
    r.unknown_keys()
    return policy


def _url_parts(url: str, schemes: tuple[str, ...]) -> SplitResult | None:
    """The URL's parts if it has one of `schemes`, a host and a valid port; else None."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in schemes and bool(parts.hostname) and parts.port != 0
    except ValueError:  # e.g. a non-numeric port
        return None
    return parts if valid else None


def _read_base_url(r: Reader) -> str:
    url = r.text("base_url")
    if not url:
        return ""
    parts = _url_parts(url, ("http", "https"))
    if parts is None:  # the URL is not quoted: it may carry credentials
        r.error("base_url", "must be an http:// or https:// URL with a host")
    elif parts.query or parts.fragment:
        r.error("base_url", "must not have a query or fragment")
    return url.rstrip("/")


def _read_shared(r: Reader) -> SharedConfig:
    default = SharedConfig(redis_url="")
    on_failure = r.optional_text("on_failure") or default.on_failure
    if on_failure not in ON_FAILURE:
        r.error("on_failure", f"must be closed, open or local_share (got {on_failure!r})")
        on_failure = default.on_failure
    shared = SharedConfig(
        redis_url=_read_redis_url(r),
        key_prefix=r.optional_text("key_prefix") or default.key_prefix,
        timeout_s=r.seconds("timeout_s", default.timeout_s),
        lease_ttl_s=r.seconds("lease_ttl_s", default.lease_ttl_s),
        on_failure=on_failure,  # type: ignore[arg-type]  # one of ON_FAILURE, checked above
        expected_replicas=r.integer("expected_replicas", default.expected_replicas),
    )
    if r.ok("timeout_s", "lease_ttl_s") and shared.lease_ttl_s < 3 * shared.timeout_s:
        # renewal runs every lease_ttl_s / 3 and must fit a call that may take timeout_s
        r.error("lease_ttl_s", f"must be at least 3 x timeout_s ({_num(3 * shared.timeout_s)})")
    r.unknown_keys()
    return shared


def _read_redis_url(r: Reader) -> str:
    """redis://[:password@]host[:port][/db] or rediss://; the URL is never quoted back (it may
    hold a password)."""
    url = r.text("redis_url", secret=True)
    if not url:
        return ""
    parts = _url_parts(url, ("redis", "rediss"))
    db = parts.path.lstrip("/") if parts is not None else ""
    if parts is None:
        r.error("redis_url", "must be a redis:// or rediss:// URL with a host")
    elif db and not db.isdigit():
        r.error("redis_url", "the path must be a database number (redis://host:6379/0)")
    elif parts.query or parts.fragment:
        r.error("redis_url", "must not have a query or fragment (a password goes before the @)")
    return url


def _read_telemetry(r: Reader) -> TelemetryConfig:
    traces = None
    if r.has("traces") and r.ok("traces"):
        t = r.section("traces")
        default = TracesConfig()
        endpoint = t.optional_text("endpoint")
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                t.error("endpoint", "must be an http:// or https:// URL (OTLP/HTTP, port 4318)")
        traces = TracesConfig(
            endpoint=endpoint.rstrip("/") if endpoint else None,
            sample_ratio=t.number("sample_ratio", default.sample_ratio, minimum=0, maximum=1),
            capture_content=t.boolean("capture_content", default.capture_content),
        )
        t.unknown_keys()
    r.unknown_keys()
    return TelemetryConfig(traces=traces)


def _read_route(r: Reader, upstreams: tuple[str, ...], max_s: float) -> Route:
    model = r.text("model")
    targets: list[Target] = []
    for t in r.sections("targets"):
        upstream = t.text("upstream")
        if upstream and upstreams and upstream not in upstreams:
            defined = ", ".join(upstreams)
            t.error("upstream", f'unknown upstream "{upstream}" (defined: {defined})')
        targets.append(
            Target(
                upstream=upstream,
                model=t.optional_text("model") or model,
                priority=t.integer("priority", 0, minimum=0) if t.has("priority") else None,
                weight=_read_weight(t),
            )
        )
        t.unknown_keys()
    balance, affinity = _read_balance(r, targets)
    budget = _read_budget(r.section("budget"), max_s)
    retry = _read_retry(r.section("retry"))
    retry_budget = _read_retry_budget(r.section("retry_budget"))
    hedge = _read_hedge(r.section("hedge"), len(targets)) if r.has("hedge") else None
    upstream_stream = r.boolean("upstream_stream", True)
    outlier_mode = r.optional_text("outlier_mode") or "panic"
    if outlier_mode not in OUTLIER_MODES:
        r.error("outlier_mode", f"must be panic or fail_fast (got {outlier_mode!r})")
    r.unknown_keys()
    return Route(
        model=model,
        targets=tuple(targets),
        budget=budget,
        retry=retry,
        retry_budget=retry_budget,
        hedge=hedge,
        upstream_stream=upstream_stream,
        outlier_mode=outlier_mode,
        balance=balance,
        affinity=affinity,
    )


def _read_weight(t: Reader) -> int:
    weight = t.integer("weight", 1)
    if weight > MAX_WEIGHT:
        t.error("weight", f"must be at most {MAX_WEIGHT} (got {weight})")
    return weight


MAX_WEIGHT = 1000


def _read_balance(r: Reader, targets: list[Target]) -> tuple[Balance | None, Affinity]:
    """`balance` and `affinity`. A route balances when it sets `balance`, or any target sets
    `priority`, or two targets share one: by least_load unless it says otherwise."""
    priorities = [t.priority if t.priority is not None else i for i, t in enumerate(targets)]
    pooled = len(set(priorities)) < len(priorities) or any(t.priority is not None for t in targets)
    name = r.optional_text("balance")
    balance: Balance | None = "least_load" if pooled else None
    if name is not None and name in _BALANCES:
        balance = _BALANCES[name]
    elif name is not None:
        r.error("balance", f"must be least_load, round_robin or affinity (got {name!r})")
    affinity = Affinity()
    if r.has("affinity"):
        a = r.section("affinity")
        key = a.optional_text("key") or affinity.key
        if key not in ("prefix", "user"):
            a.error("key", f"must be prefix or user (got {key!r})")
        affinity = Affinity(
            key="user" if key == "user" else "prefix",
            prefix_messages=a.integer("prefix_messages", affinity.prefix_messages),
        )
        a.unknown_keys()
        if balance != "affinity" and r.ok("balance"):
            r.error("affinity", "is only for balance: affinity")
    return balance, affinity


def _read_retry_budget(r: Reader) -> RetryBudget:
    default = RetryBudget()
    budget = RetryBudget(
        ratio=r.number("ratio", default.ratio, minimum=0, maximum=1),
        min_per_s=r.number("min_per_s", default.min_per_s, minimum=0, maximum=1e6),
    )
    r.unknown_keys()
    return budget


def _read_hedge(r: Reader, targets: int) -> Hedge | None:
    after_s = r.seconds("after_s", 0.0) if r.has("after_s") else None
    percentile = (
        r.number("after_percentile", 0.0, minimum=1, maximum=99.9)
        if r.has("after_percentile")
        else None
    )
    if (after_s is None) == (percentile is None) and r.ok("after_s", "after_percentile"):
        r.error("after_s", "set exactly one of after_s and after_percentile")
    if targets < 2:
        r.errors.append(f"{r.path}: hedging needs a second target to hedge on")
    r.unknown_keys()
    return Hedge(after_s=after_s, after_percentile=percentile)


def _read_budget(r: Reader, max_s: float) -> Budget:
    """Unset values default within the set ones, so `total_s: 10` alone is valid; set values
    must nest: ttft_s <= attempt_s <= total_s <= server.deadline.max_s, idle_s <= total_s."""
    default = Budget()
    total_s = r.seconds("total_s", min(default.total_s, max_s))
    attempt_s = r.seconds("attempt_s", total_s)
    ttft_s = r.seconds("ttft_s", min(default.ttft_s, attempt_s))
    idle_s = r.seconds("idle_s", min(default.idle_s, total_s))
    if r.ok("total_s") and total_s > max_s:
        r.error("total_s", f"must not exceed server.deadline.max_s ({_num(max_s)})")
    bounds = {"attempt_s": attempt_s, "total_s": total_s}
    ttft_bound = "attempt_s" if r.has("attempt_s") else "total_s"  # name the key the user set
    for key, value, bound_key in [
        ("ttft_s", ttft_s, ttft_bound),
        ("attempt_s", attempt_s, "total_s"),
        ("idle_s", idle_s, "total_s"),
    ]:
        if r.has(key) and r.ok(key, bound_key) and value > bounds[bound_key]:
            r.error(key, f"must not exceed {bound_key} ({_num(bounds[bound_key])})")
    r.unknown_keys()
    return Budget(total_s=total_s, ttft_s=ttft_s, idle_s=idle_s, attempt_s=attempt_s)


def _read_retry(r: Reader) -> RetryPolicy:
    default = RetryPolicy()
    attempts = r.integer("attempts", default.attempts)
    backoff_s = r.seconds("backoff_s", default.backoff_s, allow_zero=True)
    conditions = (
        _retry_condition(r, key, item)
        for key, item in r.items("retry_on", required=False, allow_empty=True)
    )
    retry_on = frozenset(c for c in conditions if c is not None)
    policy = RetryPolicy(
        attempts=attempts,
        backoff_s=backoff_s,
        retry_on=retry_on if r.has("retry_on") else default.retry_on,
        min_attempt_s=r.seconds("min_attempt_s", default.min_attempt_s, allow_zero=True),
    )
    r.unknown_keys()
    return policy


def _retry_condition(r: Reader, key: str, item: object) -> str | int | None:
    value = r.expand(key, item) if isinstance(item, str) else item
    if isinstance(value, str) and re.fullmatch("[0-9]+", value):
        value = int(value)  # "503": a quoted YAML scalar or a ${VAR}
    if isinstance(value, str) and value in RETRY_CONDITIONS:
        return value
    if type(value) is int and 400 <= value <= 599:
        return value
    if r.ok(key):  # not already reported as a missing ${VAR}
        allowed = ", ".join(sorted(RETRY_CONDITIONS))
        r.error(key, f"must be one of {allowed} or an HTTP status 400..599{got(item)}")
    return None


def _unique(r: Reader, key: str, value: str, seen: dict[str, str], what: str) -> None:
    """Report `key` if `value` was seen before; `what` describes it (without a secret)."""
    if value in seen:
        r.error(key, f"duplicate {what} (first at {seen[value]})")
    elif value:
        seen[value] = r.at(key)


def describe_config(config: Config) -> str:
    """The resolved config, one line per server/auth/upstream/route, targets in order.
    Secrets (API keys, credentials in URLs) are masked."""
    deadline = config.server.deadline
    lines = [
        f"server: max_body_bytes={config.server.max_body_bytes} "
        f"deadline.max_s={_num(deadline.max_s)} margin_s={_num(deadline.margin_s)} "
        f"client_headers={str(deadline.client_headers).lower()} "
        f"stall_warn_s={_num(config.server.stall_warn_s)} log_format={config.server.log_format} "
        f"metrics={str(config.server.metrics).lower()} "
        f"shutdown_grace_s={_num(config.server.shutdown_grace_s)} "
        f"header_timeout_s={_num(config.server.header_timeout_s)} "
        f"keepalive_s={_num(config.server.keepalive_s)}"
    ]
    if config.auth is None:
        lines.append("auth: none (open access)")
    else:
        names = ", ".join(key.name for key in config.auth.keys)
        count = len(config.auth.keys)
        lines.append(f"auth: {count} key{'s' * (count != 1)} ({names})")
        lines += [_describe_key(key) for key in config.auth.keys if _is_tenant(key)]
    if config.shared is not None:
        shared = config.shared
        lines.append(
            f"shared: redis_url={_mask_url(shared.redis_url)} key_prefix={shared.key_prefix!r} "
            f"timeout_s={_num(shared.timeout_s)} lease_ttl_s={_num(shared.lease_ttl_s)} "
            f"on_failure={shared.on_failure} expected_replicas={shared.expected_replicas}"
        )
    traces = config.telemetry.traces
    if traces is not None:
        lines.append(
            f"telemetry: traces endpoint={_mask_url(traces.endpoint or 'OTEL_EXPORTER_OTLP_*')} "
            f"sample_ratio={_num(traces.sample_ratio)} "
            f"capture_content={str(traces.capture_content).lower()}"
        )
    for u in config.upstreams:
        lines.append(
            f"upstream {u.name}  {_mask_url(u.base_url)}{_anthropic(u)}  "
            f"api_key={'***' if u.api_key else 'none'}  max_connections={u.max_connections} "
            f"max_pending={u.max_pending} connect_s={_num(u.connect_s)} "
            f"keepalive_expiry_s={_num(u.keepalive_expiry_s)} "
            f"max_response_bytes={u.max_response_bytes}"
            f"{_header_names(u)}  outlier "
            f"consecutive_failures={u.outlier.consecutive_failures} "
            f"base_ejection_s={_num(u.outlier.base_ejection_s)} "
            f"max_ejection_s={_num(u.outlier.max_ejection_s)}"
        )
    for route in config.routes:
        b, retry = route.budget, route.retry
        conditions = sorted(retry.retry_on, key=lambda c: (isinstance(c, int), str(c)))
        lines.append(
            f"route {route.model}  budget total_s={_num(b.total_s)} ttft_s={_num(b.ttft_s)} "
            f"idle_s={_num(b.idle_s)} attempt_s={_num(b.attempt_s)}  retry "
            f"attempts={retry.attempts} backoff_s={_num(retry.backoff_s)} "
            f"on=[{', '.join(map(str, conditions))}] min_attempt_s={_num(retry.min_attempt_s)}"
            f"  retry_budget ratio={_num(route.retry_budget.ratio)} "
            f"min_per_s={_num(route.retry_budget.min_per_s)}  hedge={_hedge(route.hedge)}"
            f"  upstream_stream={str(route.upstream_stream).lower()}"
            f"  outlier_mode={route.outlier_mode}{_balance(route)}"
        )
        for i, target in enumerate(route.targets, 1):
            if route.balance is None:
                place = " (fallback)" if i > 1 else ""
            else:
                priority = i - 1 if target.priority is None else target.priority
                place = f"  priority={priority} weight={target.weight}"
            lines.append(f"  {i}. {target.upstream} -> {target.model}{place}")
    return "\n".join(lines)


def _balance(route: Route) -> str:
    if route.balance is None:
        return ""
    if route.balance != "affinity":
        return f"  balance={route.balance}"
    affinity = route.affinity
    return f"  balance=affinity key={affinity.key} prefix_messages={affinity.prefix_messages}"


def _is_tenant(key: ApiKey) -> bool:
    return key.priority != "normal" or key.limits is not None or key.models is not None


def _describe_key(key: ApiKey) -> str:
    """A key's tenant settings (never the key itself)."""
    text = f"  key {key.name}  priority={key.priority}"
    if key.limits is not None:
        for name in ("requests_per_min", "tokens_per_min", "max_concurrent"):
            value = getattr(key.limits, name)
            if value is not None:
                text += f" {name}={value}"
    if key.models is not None:
        text += f" models=[{', '.join(sorted(key.models))}]"
    return text


def _anthropic(upstream: UpstreamConfig) -> str:
    if upstream.kind != "anthropic":
        return ""
    return (
        f"  kind=anthropic anthropic_version={upstream.anthropic_version}"
        f" default_max_tokens={upstream.default_max_tokens}"
    )


def _header_names(upstream: UpstreamConfig) -> str:
    """Header names only: their values may be credentials."""
    text = ""
    if upstream.headers:
        text += f" headers=[{', '.join(name for name, _ in upstream.headers)}]"
    if upstream.forward_headers:
        text += f" forward_headers=[{', '.join(upstream.forward_headers)}]"
    return text


def _hedge(hedge: Hedge | None) -> str:
    if hedge is None:
        return "off"
    if hedge.after_s is not None:
        return f"after_s={_num(hedge.after_s)}"
    return f"after_percentile={_num(hedge.after_percentile or 0)}"


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _num(value: float) -> str:
    """A number as written: 600, 0.05 (no trailing .0)."""
    return str(int(value)) if float(value).is_integer() else repr(value)
