"""Wiring: the Starlette application for a config. No logic lives here."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send

from gateway.config import Config, ConfigError, TracesConfig
from gateway.deadline import clock
from gateway.errors import BadRequest, GatewayError, InternalError, Overloaded, envelope
from gateway.inflight import Inflight
from gateway.lifecycle import Lifecycle
from gateway.observability import metrics
from gateway.reload import Reloader, listen_for_sighup
from gateway.runtime import Runtime
from gateway.shared import SharedSlots
from gateway.shared.policy import per_worker
from gateway.shared.quota_store import RedisQuotaStore
from gateway.shared.redis_store import RedisSlotStore
from gateway.simulator import create_simulator_app
from gateway.tenants.quotas import Quotas

if TYPE_CHECKING:
    from gateway.observability.tracing import Tracing

log = logging.getLogger("gateway")

SIMULATOR_PREFIX = "/sim-upstream"


def create_app(
    config: Config,
    *,
    with_simulator: bool = False,
    workers: int = 1,
    config_path: Path | None = None,
    watch_config: bool = False,
) -> GatewayApp:
    """The gateway for `config`; `with_simulator` also serves the simulator (the demo).
    `workers`: the processes `serve` runs, which share each cap (DESIGN §4, gateway.shared).
    `config_path`: the file `config` came from, reloaded on SIGHUP (and, with
    `watch_config`, when it changes: gateway.reload)."""
    config = per_worker(config, workers)  # without `shared`, each worker takes its share
    shared = None
    quotas = Quotas()
    if config.shared is not None:
        store = RedisSlotStore(config.shared)
        shared = SharedSlots(store, config.shared, workers=workers)
        quotas = Quotas(shared, RedisQuotaStore(store.client, config.shared))
    metrics.enable(config.server.metrics)
    inflight_registry = Inflight()
    lifecycle = Lifecycle(inflight_registry, config.server.shutdown_grace_s)
    tracing = _tracing(config.telemetry.traces)
    runtime = Runtime(
        config, inflight=inflight_registry, shared=shared, quotas=quotas, tracing=tracing
    )
    reloader = None
    if config_path is not None:
        reloader = Reloader(runtime, lifecycle, config_path, workers=workers, watch=watch_config)
    created = int(time.time())
    created_at = datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat()

    async def models(request: Request) -> Response:
        """The routes, in a list both the `openai` and the `anthropic` SDK read (each ignores
        the other's fields), so the key is taken as either sends it too."""
        gateway = runtime.current.gateway
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
        _sample(runtime)
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    async def inflight(request: Request) -> Response:
        gateway = runtime.current.gateway
        gateway.authenticate(request.headers)  # it lists request ids and routes
        pools = {name: upstream.pool_state() for name, upstream in gateway.upstreams.items()}
        return JSONResponse({"inflight": gateway.inflight.snapshot(), "pools": pools})

    async def debug_config(request: Request) -> Response:
        current = runtime.current
        current.gateway.authenticate(request.headers)  # it names upstreams, routes and keys
        if reloader is not None:
            return JSONResponse(reloader.status())
        return JSONResponse({"generation": current.number, "file": None, "last_error": None})

    # The proxied paths are served by GatewayApp from the current generation; these routes
    # only answer a wrong method (405) for them.
    routes: list[BaseRoute] = [
        Route(path, endpoint, methods=["POST"])
        for path, endpoint in runtime.current.endpoints.items()
    ]
    routes += [
        Route("/v1/models", models, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/debug/inflight", inflight, methods=["GET"]),
        Route("/debug/config", debug_config, methods=["GET"]),
        Route("/metrics", scrape, methods=["GET"]),
    ]
    if with_simulator:
        routes.append(Mount(SIMULATOR_PREFIX, app=create_simulator_app()))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if config.auth is None:
            log.warning("No auth.keys configured: the gateway is open to anyone who can reach it.")
        for upstream in runtime.current.upstreams.values():
            await upstream.open()
        lifecycle.started()
        restore_sighup = listen_for_sighup(reloader)
        app.state.ready = True
        try:
            async with anyio.create_task_group() as group:
                runtime.group = group  # removed upstreams close here once drained
                if shared is not None:  # leases renewed, freed slots heard of
                    await group.start(shared.run)
                if config.server.metrics:  # gauges rise while a request hangs, not after it
                    group.start_soon(_sample_every_second, runtime)
                if reloader is not None:
                    group.start_soon(reloader.run)
                yield
                group.cancel_scope.cancel()
        finally:
            app.state.ready = False
            restore_sighup()
            for upstream in runtime.all_upstreams():
                await upstream.aclose()
            if tracing is not None:  # the last spans go out (bounded: 5 s)
                await anyio.to_thread.run_sync(tracing.shutdown)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    app.state.runtime = runtime
    return GatewayApp(app, runtime, lifecycle, reloader)


def _tracing(config: TracesConfig | None) -> Tracing | None:
    """OpenTelemetry is imported here, only when traces are configured."""
    if config is None:
        return None
    try:
        from gateway.observability.tracing import Tracing
    except ImportError as error:
        raise ConfigError(
            f"telemetry.traces: OpenTelemetry is not installed ({error.name}): "
            "pip install 'llm-gateway[otel]'"
        ) from None
    return Tracing(config)


class GatewayApp:
    """The ASGI app: proxied calls go straight to their endpoint in the current generation
    (gateway.runtime), which the request keeps to its end, so the hot path skips Starlette's
    middleware and routing; everything else (lifespan, other paths, a proxied path with the
    wrong method) goes to the Starlette app."""

    def __init__(
        self,
        app: Starlette,
        runtime: Runtime,
        lifecycle: Lifecycle,
        reloader: Reloader | None = None,
    ) -> None:
        self.starlette = app
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.reloader = reloader

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _ambiguous_framing(scope["headers"]):
            await _refuse_framing(send)
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            generation = self.runtime.current
            endpoint = generation.endpoints.get(scope["path"])
            if endpoint is not None and self.lifecycle.cut:  # stopping: no new work
                error = Overloaded("The gateway is shutting down.", code="shutting_down")
                await _send_error(send, error, endpoint.api.errors.body(error))
                return
            if endpoint is not None:
                generation.enter()
                try:
                    await endpoint(scope, receive, send)
                finally:
                    generation.leave()
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


def _sample(runtime: Runtime) -> None:
    current = runtime.current
    metrics.sample(
        runtime.inflight.exchanges(),
        current.upstreams,
        now=clock(),
        stall_s=current.config.server.stall_warn_s,
    )


async def _sample_every_second(runtime: Runtime) -> None:
    while True:
        _sample(runtime)
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
