"""Pure decisions about the shared cap: no I/O, no clock of its own.

Health            is the store up? Flipped by the outcome of any one call
admission(...)    what a process does for its queue's head: ask the store, admit on its
                  own (open, or local_share under a smaller cap), or refuse (closed)
renew_every_s     a lease is renewed three times per TTL, so one late renewal loses none
probe_every_s     while the store is down, how often it is tried again
poll_s            how long a queue head waits for word of a freed slot before asking again
per_worker        `serve --workers N` without `shared`: each worker's share of every cap
                  and of every key's limits (share_limits)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from gateway.config import Config, KeyLimits

Admission = Literal["shared", "open", "local", "closed"]
Transition = Literal["lost", "recovered"]

_POLL_CAP_S = 0.5  # a missed "freed" message costs at most this
_PROBE_CAP_S = 1.0  # Redis back: seen within this


class Health:
    """Whether the store answers, as the last call said; `observe` tells of a switch."""

    def __init__(self) -> None:
        self.up = True

    def observe(self, ok: bool) -> Transition | None:
        if ok == self.up:
            return None
        self.up = ok
        return "recovered" if ok else "lost"


def admission(on_failure: str, up: bool) -> Admission:
    """How a queue head is admitted: through the store while it answers; without it, as
    `shared.on_failure` says (`local_share` admits under `local_limit`)."""
    if up:
        return "shared"
    if on_failure == "closed":
        return "closed"
    return "open" if on_failure == "open" else "local"


def local_limit(limit: int, *, up: bool, on_failure: str, processes: int) -> int:
    """The cap this process enforces on its own: the upstream's own while the store answers
    (it is its socket pool's size), its share of it under `local_share` while it does not."""
    if up or on_failure != "local_share":
        return limit
    return math.ceil(limit / processes)


def renew_every_s(ttl_s: float) -> float:
    return ttl_s / 3


def probe_every_s(ttl_s: float) -> float:
    return min(ttl_s / 3, _PROBE_CAP_S)


def poll_s(retry_in_s: float) -> float:
    """Until the earliest lease expires (a dead holder's slot frees then, unannounced), at
    most `_POLL_CAP_S`, at least a millisecond."""
    return min(max(retry_in_s, 0.001), _POLL_CAP_S)


def per_worker(config: Config, workers: int) -> Config:
    """Each of `workers` processes without a shared store enforces ceil(cap / workers), so
    together they never exceed the cap."""
    if workers < 2 or config.shared is not None:
        return config
    upstreams = tuple(
        dataclasses.replace(
            upstream,
            max_connections=math.ceil(upstream.max_connections / workers),
            max_pending=math.ceil(upstream.max_pending / workers),
        )
        for upstream in config.upstreams
    )
    auth = config.auth
    if auth is not None and any(key.limits is not None for key in auth.keys):
        keys = tuple(
            key
            if key.limits is None
            else dataclasses.replace(key, limits=share_limits(key.limits, workers))
            for key in auth.keys
        )
        auth = dataclasses.replace(auth, keys=keys)
    return dataclasses.replace(config, upstreams=upstreams, auth=auth)


def share_limits(limits: KeyLimits, processes: int) -> KeyLimits:
    """One process's share of a key's limits: ceil(limit / processes) each."""
    return KeyLimits(
        **{
            name: None if value is None else math.ceil(value / processes)
            for name, value in dataclasses.asdict(limits).items()
        }
    )


def per_worker_line(config: Config, workers: int) -> str | None:
    """The start-up line that says how the caps divide (None when they do not)."""
    if workers < 2 or config.shared is not None or not config.upstreams:
        return None
    divided = ", ".join(
        f"upstream {u.name} {u.max_connections} -> {math.ceil(u.max_connections / workers)}"
        for u in config.upstreams
    )
    return (
        f"caps are per worker: {divided} per worker (max_pending too); "
        "set shared.redis_url for one cap across workers"
    )
