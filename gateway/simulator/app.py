"""The simulator's Starlette app: one endpoint per API, sharing counters and the fault driver."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from gateway.simulator.answer import Api, BadRequest
from gateway.simulator.asgi import read_body, run_until_disconnect, send_json, with_headers
from gateway.simulator.driver import produce
from gateway.simulator.messages import CountTokensApi, MessagesApi
from gateway.simulator.openai_api import CompletionsApi, EmbeddingsApi
from gateway.simulator.responses import ResponsesApi
from gateway.simulator.stats import Outcome, SimulatorStats


class _Endpoint:
    """A POST /v1 endpoint as a pure ASGI app, so that it sees `http.disconnect` while it works."""

    def __init__(self, api: Api, stats: SimulatorStats) -> None:
        self._api = api
        self._stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {
            key.decode("latin-1").lower(): val.decode("latin-1") for key, val in scope["headers"]
        }
        self._stats.started(headers, tuple(scope.get("client") or ()))
        outcome: Outcome = "cancelled"
        open_ = True

        async def counted(message: Message) -> None:
            # A request stops being open when its last byte leaves, not when this handler
            # returns a moment later: a gateway may already have sent the next one in its slot.
            nonlocal open_
            if open_ and message["type"] == "http.response.body" and not message.get("more_body"):
                open_ = False
                self._stats.closed()
            await send(message)

        try:
            if (raw := await read_body(receive)) is not None:
                send_counted = partial(with_headers, counted, self._api.headers())
                respond = partial(self._respond, headers, raw)
                outcome = await run_until_disconnect(respond, receive, send_counted)
        finally:
            if open_:
                self._stats.closed()
            self._stats.finished(outcome)
        # On "reset" we return with the response unfinished: the server drops the connection.

    async def _respond(self, headers: dict[str, str], raw: bytes, send: Send) -> None:
        try:
            self._stats.last_body = body = _parse_json(raw)
            answer = self._api.parse(headers, body)
        except BadRequest as exc:
            await send_json(send, 400, self._api.error(400, exc.message, exc.code, exc.param))
            return
        faults = answer.faults
        if faults.flaky is not None and not self._stats.flaky_failure(answer.model, faults.flaky):
            faults = replace(faults, status=None)  # recovered
        if faults.close:
            send = partial(with_headers, send, [(b"connection", b"close")])
        await produce(send, self._api, answer, faults)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", "invalid_json") from exc


async def _models(request: Request) -> JSONResponse:
    model = {"id": "sim", "object": "model", "created": 0, "owned_by": "simulator"}
    return JSONResponse({"object": "list", "data": [model]})


def create_simulator_app() -> Starlette:
    """A new simulator with its own counters, in `app.state.stats`."""
    stats = SimulatorStats()

    async def read_stats(request: Request) -> JSONResponse:
        return JSONResponse(stats.report())

    async def reset_stats(request: Request) -> JSONResponse:
        stats.clear()
        return JSONResponse(stats.report())

    def endpoint(path: str, api: Api) -> Route:
        return Route(path, _Endpoint(api, stats), methods=["POST"])

    app = Starlette(
        routes=[
            endpoint("/v1/chat/completions", CompletionsApi(chat=True)),
            endpoint("/v1/completions", CompletionsApi(chat=False)),
            endpoint("/v1/embeddings", EmbeddingsApi()),
            endpoint("/v1/messages", MessagesApi()),
            endpoint("/v1/messages/count_tokens", CountTokensApi()),
            endpoint("/v1/responses", ResponsesApi()),
            Route("/v1/models", _models, methods=["GET"]),
            Route("/sim/stats", read_stats, methods=["GET"]),
            Route("/sim/reset", reset_stats, methods=["POST"]),
        ]
    )
    app.state.stats = stats
    return app
