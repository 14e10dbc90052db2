"""Slot leases: the interface every store implements, and the one that lives in this process.

A pool (one upstream) has a limit; a slot is an id a process chose, held under a lease that
expires `ttl_s` after it was taken or last renewed, so the slots of a process that died free
themselves. Stores never decide what to do when they fail: they raise StoreUnavailable and
`gateway.shared.policy` decides.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple, Protocol

import anyio

from gateway.deadline import clock


class StoreUnavailable(Exception):
    """The store did not answer (down, refused, broke the protocol)."""


class Taken(NamedTuple):
    """What `take` got: the slot ids granted (a prefix of those asked for) and, when not all
    were, the seconds until the earliest lease of the pool expires (when to ask again at the
    latest, if no release is heard of before)."""

    slots: Sequence[str]
    retry_in_s: float
    # Slots held now, across every process, in the pool and in each pool asked to `count`:
    # what a balancer weighs, had in the same call.
    held: Mapping[str, int] = {}  # never mutated


class SlotStore(Protocol):
    async def take(
        self, pool: str, slots: Sequence[str], limit: int, count: Sequence[str] = ()
    ) -> Taken:
        """Take as many of `slots` as fit under `limit`, leases of expired holders dropped
        first, in one atomic step; say how many are held then in `pool` and in each of
        `count`."""

    async def renew(self, held: Mapping[str, Collection[str]]) -> None:
        """Extend every lease in `held` (pool -> slot ids) by the TTL, re-adding any that
        expired or were lost (a store that restarted learns what is held again)."""

    async def give_back(self, released: Mapping[str, Collection[str]]) -> None:
        """Drop the leases in `released` (pool -> slot ids), in one call, and tell every
        watcher which pools have a free slot."""

    async def watch_freed(self, on_freed: Callable[[str], None]) -> None:
        """Call `on_freed(pool)` for each slot given back anywhere, until cancelled; raise
        StoreUnavailable when the store goes away (the caller watches again later)."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""

    async def aclose(self) -> None: ...


class LocalSlotStore:
    """Slot leases in this process's memory, the monotonic clock as the lease clock: the
    shared cap's semantics without a server, for one process and for the policy's tests.
    `down = True` makes every call fail, as a store that went away."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.down = False
        self._leases: dict[str, dict[str, float]] = {}  # pool -> slot -> expiry
        self._watchers: list[Callable[[str], None]] = []

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("the local store is marked down")

    def held(self, pool: str) -> int:
        now = clock()
        return sum(1 for expiry in self._leases.get(pool, {}).values() if expiry > now)

    async def take(
        self, pool: str, slots: Sequence[str], limit: int, count: Sequence[str] = ()
    ) -> Taken:
        self._check()
        now = clock()
        leases = self._leases.setdefault(pool, {})
        for slot in [slot for slot, expiry in leases.items() if expiry <= now]:
            del leases[slot]
        granted = slots[: max(0, limit - len(leases))]
        for slot in granted:
            leases[slot] = now + self.ttl_s
        earliest = min(leases.values(), default=now)
        held = {name: self.held(name) for name in (pool, *count)}
        return Taken(granted, max(0.0, earliest - now), held)

    async def renew(self, held: Mapping[str, Collection[str]]) -> None:
        self._check()
        expiry = clock() + self.ttl_s
        for pool, slots in held.items():
            self._leases.setdefault(pool, {}).update(dict.fromkeys(slots, expiry))

    async def give_back(self, released: Mapping[str, Collection[str]]) -> None:
        self._check()
        for pool, slots in released.items():
            leases = self._leases.get(pool, {})
            if [slot for slot in slots if leases.pop(slot, None) is not None]:
                for watcher in self._watchers:
                    watcher(pool)

    async def watch_freed(self, on_freed: Callable[[str], None]) -> None:
        self._check()
        self._watchers.append(on_freed)
        try:
            await anyio.sleep_forever()
        finally:
            self._watchers.remove(on_freed)

    async def ping(self) -> None:
        self._check()

    async def aclose(self) -> None:
        pass
