"""The proxy endpoint (pure ASGI): admit a request, fix its deadline, relay it, watch the client.

auth → deadline hints → body (bounded size, bounded time) → JSON → route (may the key use
it?) → budget → the key's quotas (gateway.tenants; settled when the request ends), then,
with a watcher on `receive()` that cancels everything if the client goes away,
the relay (`gateway.relay`) does the upstream exchange and answers every failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from starlette.types import Receive, Scope, Send

from gateway import jsonbody
from gateway.config import ApiKey, Config, Route, Target
from gateway.deadline import ClientHints, budget_ceiling, clock, parse_hints, resolve_budget
from gateway.errors import (
    AuthenticationFailed,
    BadRequest,
    BudgetExceeded,
    GatewayError,
    InternalError,
    ModelNotAllowed,
    RateLimited,
    RequestTooLarge,
)
from gateway.inflight import Exchange, Inflight, new_request_id
from gateway.observability import logs, metrics
from gateway.observability.metrics import enabled as metrics_enabled
from gateway.protocols.api import Api, unsupported
from gateway.relay import Relay
from gateway.responses import ClientGone, ResponseWriter
from gateway.routing import Router
from gateway.tenants.buckets import charge, estimate
from gateway.tenants.quotas import Grant, Quotas
from gateway.upstream import Upstream

if TYPE_CHECKING:  # imported only when traces are configured
    from gateway.observability.tracing import Tracing


@dataclass(frozen=True, slots=True)
class Gateway:
    """Everything a request needs, built once by `create_app(config)`."""

    config: Config
    router: Router
    upstreams: Mapping[str, Upstream]
    inflight: Inflight
    quotas: Quotas = field(default_factory=Quotas)
    tracing: Tracing | None = None  # `telemetry.traces` configured

    def authenticate(
        self, headers: Mapping[str, str], key_header: str | None = None
    ) -> ApiKey | None:
        """`Authorization: Bearer <key>`, or the endpoint's own key header (`x-api-key` on
        /v1/messages, where the `anthropic` SDK sends it): the key (its tenant), or None when
        auth is off."""
        auth = self.config.auth
        if auth is None:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        if not given and key_header is not None:
            given = headers.get(key_header, "").strip()
        # Compare with every key, so the time taken says nothing about which one was close.
        matches = [hmac.compare_digest(given.encode(), key.key.encode()) for key in auth.keys]
        if not given or not any(matches):
            how = "'Authorization: Bearer <key>'"
            how += f" or '{key_header}: <key>'" if key_header else ""
            raise AuthenticationFailed(
                f"Missing or invalid API key: send {how}.", code="invalid_api_key"
            )
        return auth.keys[matches.index(True)]


class ProxyEndpoint:
    def __init__(self, gateway: Gateway, api: Api) -> None:
        self.gateway = gateway
        self.api = api
        self.path = api.path  # after /v1/, e.g. "chat/completions"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrival = clock()
        # Read a dozen times per request: one dict, not a scan of the list per lookup. ASGI
        # servers give the names lower-cased; of a repeated header, the last one counts.
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        request_id = _request_id(headers)
        writer = ResponseWriter(send, self.api.errors)
        try:
            await self._serve(arrival, headers, request_id, receive, writer)
        except Exception:  # a bug: still one envelope, one access line, one traceback
            logging.getLogger("gateway").exception("request_id=%s unexpected error", request_id)
            _finish(request_id, self.path, 500, "internal_error", arrival)
            if not writer.started:
                error = InternalError("Internal gateway error.", code="internal_error")
                with contextlib.suppress(ClientGone):
                    await writer.error(error, {"x-request-id": request_id})

    async def _serve(
        self,
        arrival: float,
        headers: Mapping[str, str],
        request_id: str,
        receive: Receive,
        writer: ResponseWriter,
    ) -> None:
        reply_headers = {"x-request-id": request_id}
        key: ApiKey | None = None
        grant: Grant | None = None
        try:
            key = self.gateway.authenticate(headers, self.api.key_header)
            exchange, route, targets, body, payload = await self._admit(
                arrival, headers, receive, request_id, key
            )
            if key is not None and key.limits is not None:  # all a key without limits costs
                completes = self.api.stream is not None  # embeddings generate nothing
                grant = await self.gateway.quotas.admit(
                    key, estimate(payload, len(body), completes=completes)
                )
                reply_headers.update(grant.headers)
        except GatewayError as error:
            limited = error.limit if isinstance(error, RateLimited) else None
            name = key.name if key else None
            _finish(
                request_id, self.path, error.status, error.code, arrival, key=name, limited=limited
            )
            if self.gateway.tracing is not None:
                self.gateway.tracing.refused(
                    trace_context(headers),
                    path=self.path,
                    status=error.status,
                    code=error.code,
                    arrival=arrival,
                )
            timing = f"total;dur={(clock() - arrival) * 1000:.1f}"
            await writer.error(error, {**reply_headers, "server-timing": timing})
            return
        except ClientGone:
            _finish(
                request_id,
                self.path,
                499,
                "client_disconnect",
                arrival,
                key=key.name if key else None,
            )
            return
        trace = trace_context(headers)
        exchange.trace_id = trace_id(trace)
        tracing = self.gateway.tracing
        if tracing is not None and (traced := tracing.sample(trace)) is not None:
            exchange.trace, exchange.trace_id = traced, traced.trace_id
        relay = Relay(
            exchange=exchange,
            route=route,
            api=self.api,
            targets=targets,
            body=body,
            payload=payload,
            upstreams=self.gateway.upstreams,
            state=self.gateway.router.state(route),
            writer=writer,
            headers=reply_headers,
            trace_headers=trace,
            client_headers=headers,
        )
        failure: GatewayError | None = None
        with self.gateway.inflight.track(exchange):
            # A plain task, not a task group: this runs once per request, on the hot path.
            watcher = asyncio.ensure_future(_watch_disconnect(receive, exchange))
            try:
                failure = await relay.run()
            except ClientGone:
                exchange.disconnected = True
            finally:
                watcher.cancel()  # the response is done: stop watching
                if grant is not None:  # charged what it used, whatever happened
                    self._settle(grant, exchange)
        if exchange.disconnected:
            outcome, status = "client_disconnect", 499
        elif failure is not None:  # after the commit the client already has its 200
            outcome, status = failure.code, 200 if exchange.committed else failure.status
        else:
            outcome, status = "ok", 200
        _finish(request_id, self.path, status, outcome, arrival, exchange, exchange.trace_id)
        if tracing is not None and exchange.trace is not None:
            tracing.record(
                exchange,
                path=self.path,
                status=status,
                outcome=outcome,
                upstreams=self.gateway.upstreams,
                payload=payload,
            )

    def _settle(self, grant: Grant, exchange: Exchange) -> None:
        exchange.charge = charge(
            exchange.usage, grant.estimate, answered=exchange.committed, chunks=exchange.chunks
        )
        self.gateway.quotas.settle(grant, exchange.charge.total)

    async def _admit(
        self,
        arrival: float,
        headers: Mapping[str, str],
        receive: Receive,
        request_id: str,
        key: ApiKey | None,
    ) -> tuple[Exchange, Route, list[Target], bytes, dict[str, Any]]:
        config = self.gateway.config
        limits = config.server.deadline
        hints = parse_hints(headers) if limits.client_headers else ClientHints()
        ceiling = budget_ceiling(arrival=arrival, limits=limits, hints=hints)
        body = b""
        with anyio.CancelScope(deadline=ceiling) as upload:
            body = await _read_body(receive, headers, config.server.max_body_bytes)
        if upload.cancelled_caught:  # a slow upload counts against the deadline
            raise BudgetExceeded("total", "The request body did not arrive within the deadline.")
        payload, model, stream = parse_payload(body)
        stream = stream and self.api.stream is not None  # embeddings never stream
        route = self.gateway.router.route_for(model)
        if key is not None and key.models is not None and route.model not in key.models:
            raise ModelNotAllowed(
                f"The key {key.name!r} may not use the model {route.model!r}.",
                code="model_not_allowed",
                param="model",
            )
        targets = self._targets(route, model, payload)
        budget = resolve_budget(
            arrival=arrival, budget=route.budget, limits=limits, hints=hints, stream=stream
        )
        if budget.deadline.remaining() <= 0:
            raise BudgetExceeded("total", "The request's deadline passed before it could start.")
        exchange = Exchange(
            request_id=request_id, route=model, stream=stream, arrival=arrival, budget=budget
        )
        if key is not None:
            exchange.key, exchange.priority = key.name, key.priority
        return exchange, route, targets, body, payload

    def _targets(self, route: Route, model: str, payload: dict[str, Any]) -> list[Target]:
        """The route's targets that can serve this endpoint; 400 if none can, or if the
        request cannot be translated for one of them."""
        upstreams = self.gateway.upstreams
        targets = [
            target
            for target in route.targets
            if upstreams[target.upstream].config.kind in self.api.served_by
        ]
        if not targets:
            raise unsupported(self.api, model)
        for target in targets:
            self.api.translation(upstreams[target.upstream].config).check(payload)
        return targets


def parse_payload(body: bytes) -> tuple[dict[str, Any], str, bool]:
    """The JSON object, its `model` and whether it asks for a stream; 400 on anything else."""
    try:
        payload = jsonbody.loads(body)
    except ValueError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_request")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(
            "The request must name a model: 'model' must be a non-empty string.",
            code="invalid_request",
            param="model",
        )
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", code="invalid_request", param="stream")
    return payload, model, stream


async def _read_body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes:
    """The whole body, refused as soon as it is known to exceed `limit`."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body exceeds the limit of {limit} bytes.", code="request_too_large"
    )


async def _watch_disconnect(receive: Receive, exchange: Exchange) -> None:
    """Cancel the exchange when the client goes away, in any phase, streaming or not."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # uvicorn reports a disconnect at once after the last message: that one is normal.
            if not exchange.finishing:
                exchange.abandon()
            return


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_MAX_TRACESTATE = 512  # W3C: at most 32 members; a bound on what we pass on


def trace_context(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's W3C `traceparent` (and `tracestate`), if well formed, to forward upstream."""
    parent = headers.get("traceparent", "").strip()
    if not _TRACEPARENT.fullmatch(parent):
        return {}
    context = {"traceparent": parent}
    state = headers.get("tracestate", "")
    if state and len(state) <= _MAX_TRACESTATE and state.isascii() and state.isprintable():
        context["tracestate"] = state
    return context


def trace_id(context: Mapping[str, str]) -> str | None:
    parent = context.get("traceparent")
    return parent.split("-")[1] if parent else None


def _request_id(headers: Mapping[str, str]) -> str:
    given = headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return new_request_id()


def _finish(
    request_id: str,
    path: str,
    status: int,
    outcome: str,
    arrival: float,
    exchange: Exchange | None = None,
    trace: str | None = None,
    *,
    key: str | None = None,
    limited: str | None = None,
) -> None:
    """The one place a request's end is recorded: its access line and its metrics. `key` is
    the key's name when the request was refused before it had an Exchange; `limited`, the
    quota that refused it."""
    now = clock()
    route = exchange.route if exchange is not None else "-"
    key = exchange.key if exchange is not None else key
    if metrics_enabled():
        metrics.record_request(exchange, route=route, status=status, outcome=outcome, now=now)
        if key is not None:
            metrics.record_key(key, exchange, status=status, limited=limited)
    if not logs.ACCESS.isEnabledFor(logging.INFO):
        return  # nothing is built for a line that is not written
    fields: dict[str, object] = {
        "request_id": request_id,
        "trace_id": trace,
        "key": key,
        "path": f"/v1/{path}",
        "route": route,
        "status": status,
        "outcome": outcome,
        "upstream": exchange.upstream if exchange else None,
        "attempts": exchange.attempts if exchange else 0,
        "ms": logs.ms(now - arrival),
    }
    if exchange is not None:
        budget = exchange.budget
        usage = exchange.usage or {}
        fields |= {
            "queue_ms": logs.ms(exchange.queue_s),
            "upstream_ms": None if exchange.upstream_s is None else logs.ms(exchange.upstream_s),
            "ttft_ms": None if exchange.ttft_s is None else logs.ms(exchange.ttft_s),
            "budget_s": logs.seconds(budget.deadline.at - arrival + budget.margin_s),
            "budget_source": budget.deadline.source,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "hedge": exchange.hedge,
        }
    logs.access(fields)
