"""Wiring: the Starlette application for a config. No logic lives here."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from gateway.config import Config
from gateway.deadline import clock
from gateway.errors import BadRequest, GatewayError, InternalError, Overloaded, envelope
from gateway.inflight import Inflight
from gateway.lifecycle import Lifecycle
from gateway.observability import metrics
from gateway.protocols.api import APIS
from gateway.proxy import Gateway, ProxyEndpoint
from gateway.routing import Router
from gateway.shared import SharedSlots
from gateway.shared.policy import per_worker
from gateway.shared.quota_store import RedisQuotaStore
from gateway.shared.redis_store import RedisSlotStore
from gateway.simulator import create_simulator_app
from gateway.tenants.quotas import Quotas
from gateway.upstream import Upstream

log = logging.getLogger("gateway")

SIMULATOR_PREFIX = "/sim-upstream"


def create_app(config: Config, *, with_simulator: bool = False, workers: int = 1) -> GatewayApp:
    """The gateway for `config`; `with_simulator` also serves the simulator (the demo).
    `workers`: the processes `serve` runs, which share each cap (DESIGN §4, gateway.shared)."""
    config = per_worker(config, workers)  # without `shared`, each worker takes its share
    shared = None
    quotas = Quotas()
    if config.shared is not None:
        store = RedisSlotStore(config.shared)
        shared = SharedSlots(store, config.shared, workers=workers)
        quotas = Quotas(shared, RedisQuotaStore(store.client, config.shared))
    upstreams = {
        spec.name: Upstream(spec, shared.gate(spec.name, spec.max_connections) if shared else None)
        for spec in config.upstreams
    }
    metrics.enable(config.server.metrics)
    inflight_registry = Inflight()
    lifecycle = Lifecycle(inflight_registry, config.server.shutdown_grace_s)
    gateway = Gateway(
        config=config,
        router=Router(config),
        upstreams=upstreams,
        inflight=inflight_registry,
        quotas=quotas,
    )
    created = int(time.time())
    created_at = datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat()

    async def models(request: Request) -> Response:
        """The routes, in a list both the `openai` and the `anthropic` SDK read (each ignores
        the other's fields), so the key is taken as either sends it too."""
        key = gateway.authenticate(request.headers, key_header="x-api-key")
        allowed = key.models if key is not None else None  # a key sees the routes it may use
        data = [
            {"id": model, "object": "model", "created": created, "owned_by": "llm-gateway"}
            | {"type": "model", "display_name": model, "created_at": created_at}
            for model in gateway.router.models
            if allowed is None or model in allowed
        ]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        pages = {"has_more": False, "first_id": first, "last_id": last}
        return JSONResponse({"object": "list", "data": data, **pages})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready = getattr(request.app.state, "ready", False) and not lifecycle.draining
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def scrape(request: Request) -> Response:
        if not config.server.metrics:
            raise HTTPException(404)
        metrics.sample(
            gateway.inflight.exchanges(),
            upstreams,
            now=clock(),
            stall_s=config.server.stall_warn_s,
        )
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    async def inflight(request: Request) -> Response:
        gateway.authenticate(request.headers)  # it lists request ids and routes
        pools = {name: upstream.pool_state() for name, upstream in upstreams.items()}
        return JSONResponse({"inflight": gateway.inflight.snapshot(), "pools": pools})

    proxied = {f"/v1/{path}": ProxyEndpoint(gateway, api) for path, api in APIS.items()}
    routes: list[BaseRoute] = [
        Route(path, endpoint, methods=["POST"]) for path, endpoint in proxied.items()
    ]
    routes += [
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/debug/inflight", inflight, methods=["GET"]),
        Route("/metrics", scrape, methods=["GET"]),
    ]
    if with_simulator:
        routes.append(Mount(SIMULATOR_PREFIX, app=create_simulator_app()))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if config.auth is None:
            log.warning("No auth.keys configured: the gateway is open to anyone who can reach it.")
        for upstream in upstreams.values():
            await upstream.open()
        lifecycle.started()
        app.state.ready = True
        try:
            async with anyio.create_task_group() as group:
                if shared is not None:  # leases renewed, freed slots heard of
                    await group.start(shared.run)
                if config.server.metrics:  # gauges rise while a request hangs, not after it
                    group.start_soon(_sample_every_second, gateway, config.server.stall_warn_s)
                yield
                group.cancel_scope.cancel()
        finally:
            app.state.ready = False
            for upstream in upstreams.values():
                await upstream.aclose()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    app.state.gateway = gateway
    return GatewayApp(app, proxied, lifecycle)


class GatewayApp:
    """The ASGI app: proxied calls go straight to their endpoint, so the hot path skips
    Starlette's middleware and routing; everything else (lifespan, other paths, a proxied
    path with the wrong method) goes to the Starlette app."""

    def __init__(
        self, app: Starlette, proxied: dict[str, ProxyEndpoint], lifecycle: Lifecycle
    ) -> None:
        self.starlette = app
        self._proxied = proxied
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _ambiguous_framing(scope["headers"]):
            await _refuse_framing(send)
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self._proxied.get(scope["path"])
            if endpoint is not None and self.lifecycle.cut:  # stopping: no new work
                error = Overloaded("The gateway is shutting down.", code="shutting_down")
                await _send_error(send, error, endpoint.api.errors.body(error))
                return
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.starlette(scope, receive, send)


def _ambiguous_framing(headers: list[tuple[bytes, bytes]]) -> bool:
    """Both Content-Length and Transfer-Encoding, or Content-Lengths that differ: a proxy in
    front may read the body differently and smuggle a request inside it (RFC 9112 §6.1)."""
    lengths = {value.strip() for name, value in headers if name.lower() == b"content-length"}
    chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
    return len(lengths) > 1 or (chunked and bool(lengths))


async def _refuse_framing(send: Send) -> None:
    error = BadRequest(
        "The request has both Content-Length and Transfer-Encoding (or conflicting lengths).",
        code="invalid_request",
    )
    await _send_error(send, error, error.body())


async def _send_error(send: Send, error: GatewayError, body: bytes) -> None:
    """An error answered before any app code runs; the connection is closed after it."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),  # what follows on this connection cannot be trusted
        *((k.encode(), v.encode()) for k, v in error.headers().items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _sample_every_second(gateway: Gateway, stall_s: float) -> None:
    while True:
        metrics.sample(
            gateway.inflight.exchanges(),
            gateway.upstreams,
            now=clock(),
            stall_s=stall_s,
        )
        await anyio.sleep(1)


def _error_response(error: GatewayError) -> Response:
    return Response(
        error.body(),
        status_code=error.status,
        headers=error.headers(),
        media_type="application/json",
    )


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = envelope(
        f"{request.method} {request.url.path}: {exc.detail}",
        type="invalid_request_error",
        code=code,
    )
    return Response(
        body,
        status_code=exc.status_code,
        headers={**(exc.headers or {}), "x-should-retry": "false"},
        media_type="application/json",
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error serving %s", request.url.path, exc_info=exc)
    return _error_response(InternalError("Internal gateway error.", code="internal_error"))
