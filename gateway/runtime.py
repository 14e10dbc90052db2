"""The configuration requests run under, swapped whole when it is reloaded (gateway.reload).

    Generation   one loaded config and what is built from it: the `Gateway` (auth, router,
                 upstreams) and the proxy endpoints. A request is dispatched to the current
                 generation's endpoint and keeps that generation to its end: its budgets,
                 targets and retries never change under it.
    Runtime      the current generation. `next_generation(config)` builds the one after it,
                 keeping each `Upstream` whose definition did not change (its pool, its
                 connections, its ejection state, its shared-cap slots) and each route's state
                 (retry budget, latency windows); `swap` makes it current. An upstream no live
                 generation holds any more is closed once the last request of the generation
                 that held it has ended: in-flight requests finish, then the pool closes.

Pure bookkeeping apart from `Upstream.open()` / `aclose()`; the lifespan (gateway.app) gives
the task group closes run in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from gateway.config import Config
from gateway.inflight import Inflight
from gateway.protocols.api import APIS
from gateway.proxy import Gateway, ProxyEndpoint
from gateway.routing import Router
from gateway.tenants.quotas import Quotas
from gateway.upstream import Upstream

if TYPE_CHECKING:
    from gateway.observability.tracing import Tracing
    from gateway.shared import SharedSlots


@dataclass(eq=False, kw_only=True)
class Generation:
    number: int  # 1 for the config loaded at start-up
    config: Config
    gateway: Gateway
    endpoints: Mapping[str, ProxyEndpoint]  # by path: /v1/chat/completions ...
    loaded_at: float = field(default_factory=time.time)  # wall clock, for /debug/config
    file_hash: str | None = None  # sha256 of the file it was loaded from
    active: int = 0  # requests dispatched to it that have not ended
    retired: bool = False
    on_drained: Callable[[Generation], None] | None = None

    @property
    def upstreams(self) -> Mapping[str, Upstream]:
        return self.gateway.upstreams

    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self.retired and self.on_drained is not None:
            self.on_drained(self)


class Runtime:
    def __init__(
        self,
        config: Config,
        *,
        inflight: Inflight,
        shared: SharedSlots | None = None,
        quotas: Quotas | None = None,
        tracing: Tracing | None = None,
        file_hash: str | None = None,
    ) -> None:
        self.inflight = inflight  # one registry for every generation: a drain sees them all
        # The shared store, the keys' quotas and the tracer live as long as the process: a
        # reload changes a key's limits, not what it has used.
        self.shared = shared
        self.quotas = quotas if quotas is not None else Quotas()
        self.tracing = tracing
        self.current = self._build(1, config, {}, None, file_hash)
        self._retiring: list[Generation] = []  # replaced, with requests still in flight
        self.group: TaskGroup | None = None  # the lifespan's: where removed pools close

    def next_generation(self, config: Config, file_hash: str | None = None) -> Generation:
        """The generation for `config`, reusing what did not change; not current yet (the
        caller opens its new upstreams, then `swap`s)."""
        current = self.current
        kept = {
            spec.name: current.upstreams[spec.name]
            for spec in config.upstreams
            if spec.name in current.upstreams and current.upstreams[spec.name].config == spec
        }
        return self._build(current.number + 1, config, kept, current.gateway.router, file_hash)

    def new_upstreams(self, generation: Generation) -> list[Upstream]:
        """The upstreams of `generation` that start empty (to be opened before the swap)."""
        held = set(map(id, self.current.upstreams.values()))
        return [u for u in generation.upstreams.values() if id(u) not in held]

    def swap(self, generation: Generation) -> None:
        """Make `generation` current: new requests use it, those in flight keep theirs."""
        old, self.current = self.current, generation
        old.retired = True
        old.on_drained = self._drained
        self._retiring.append(old)
        if old.active == 0:
            self._drained(old)

    def all_upstreams(self) -> list[Upstream]:
        """Every upstream a live generation holds, each once."""
        seen: dict[int, Upstream] = {}
        for generation in (*self._retiring, self.current):
            for upstream in generation.upstreams.values():
                seen.setdefault(id(upstream), upstream)
        return list(seen.values())

    def _drained(self, generation: Generation) -> None:
        self._retiring.remove(generation)
        live = set(map(id, self.all_upstreams()))
        for upstream in generation.upstreams.values():
            if id(upstream) not in live:
                self._close(upstream)

    def _close(self, upstream: Upstream) -> None:
        if self.shared is not None:
            gate = self.shared.gates.get(upstream.name)
            bulkhead_gate = getattr(upstream.bulkhead, "gate", None)
            if gate is not None and gate is bulkhead_gate:
                del self.shared.gates[upstream.name]  # its slots are all given back
        if self.group is not None:
            self.group.start_soon(_close_quietly, upstream)

    def _build(
        self,
        number: int,
        config: Config,
        kept: Mapping[str, Upstream],
        router: Router | None,
        file_hash: str | None,
    ) -> Generation:
        shared = self.shared
        upstreams = {
            spec.name: kept.get(spec.name)
            or Upstream(spec, shared.gate(spec.name, spec.max_connections) if shared else None)
            for spec in config.upstreams
        }
        gateway = Gateway(
            config=config,
            router=Router(config, previous=router),
            upstreams=upstreams,
            inflight=self.inflight,
            quotas=self.quotas,
            tracing=self.tracing,
        )
        endpoints = {f"/v1/{path}": ProxyEndpoint(gateway, api) for path, api in APIS.items()}
        return Generation(
            number=number, config=config, gateway=gateway, endpoints=endpoints, file_hash=file_hash
        )


async def _close_quietly(upstream: Upstream) -> None:
    with anyio.CancelScope(shield=True):
        await upstream.aclose()
