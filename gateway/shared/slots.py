"""This process's side of the shared cap: the slots it holds, the loops that keep their leases
alive and hear of slots freed elsewhere, and every store call timed, counted and judged.

    SharedSlots.run()     while the server runs: renew every held slot in one call per
                          lease_ttl_s / 3 (while the store is down: try it every second, and
                          the call that succeeds re-registers everything held), and listen for
                          "slot freed" to wake the queues that wait
    SlotGate              one upstream's door: take slots, hold one without the store (while it
                          is down), give one back (in the background: a release never waits;
                          the releases that pile up meanwhile go in the next call, together)

A store call that fails or takes longer than `timeout_s` marks the store down at once; the
WARNING is logged once, the INFO when it answers again.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from gateway.config import SharedConfig
from gateway.deadline import clock
from gateway.errors import Overloaded
from gateway.observability import metrics
from gateway.shared import policy
from gateway.shared.store import SlotStore, StoreUnavailable, Taken

log = logging.getLogger("gateway.shared")
T = TypeVar("T")


class SharedSlots:
    def __init__(self, store: SlotStore, config: SharedConfig, *, workers: int = 1) -> None:
        self.store = store
        self.config = config
        self.processes = config.expected_replicas * workers  # sharing one cap: local_share
        self.health = policy.Health()
        self.gates: dict[str, SlotGate] = {}
        # pool -> (slots held across the gateway, held here then, when): as the last take said
        self.counted: dict[str, tuple[int, int, float]] = {}
        self._released: dict[str, set[str]] = {}  # not yet given back to the store
        self._release_soon = anyio.Event()
        self._token = f"{os.getpid()}.{secrets.token_hex(3)}"  # unique among processes
        self._ids = itertools.count(1)
        self._group: TaskGroup | None = None

    def gate(self, pool: str, limit: int) -> SlotGate:
        self.gates[pool] = gate = SlotGate(self, pool, limit)
        return gate

    def new_slot(self) -> str:
        return f"{self._token}.{next(self._ids)}"

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The background work, until cancelled; the leases still held then expire on their own."""
        metrics.record_shared_up(self.health.up)
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(self._keep_leases)
                group.start_soon(self._hear_freed)
                group.start_soon(self._give_back)
                task_status.started()
        finally:
            self._group = None
            with anyio.CancelScope(shield=True):
                await self.store.aclose()

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Run `work` in the background; False once the server is stopping."""
        if self._group is None:
            return False
        self._group.start_soon(work)
        return True

    async def call(
        self, op: str, action: Callable[[], Awaitable[T]], judge: Callable[[T], str] | None = None
    ) -> T | None:
        """One store call, at most `timeout_s`: its result, or None when it failed (and the
        store is then down)."""
        started = time.perf_counter()  # the loop's clock may tick in milliseconds (uvloop)
        try:
            with anyio.fail_after(self.config.timeout_s):
                result = await action()
        except TimeoutError:
            outcome, reason = "timeout", f"no answer within timeout_s {self.config.timeout_s:g}"
        except StoreUnavailable as error:
            outcome, reason = "error", str(error)
        else:
            outcome = judge(result) if judge else "ok"
            metrics.record_shared_op(op, outcome, time.perf_counter() - started)
            self._observe(True, op, "")
            return result
        metrics.record_shared_op(op, outcome, time.perf_counter() - started)
        self._observe(False, op, reason)
        return None

    def _observe(self, ok: bool, op: str, reason: str) -> None:
        switch = self.health.observe(ok)
        if switch is None:
            return
        metrics.record_shared_up(ok)
        if switch == "lost":
            log.warning(
                "shared state lost (%s failed: %s); on_failure=%s: %s",
                op, reason, self.config.on_failure, self._fallback(),
            )  # fmt: skip
        else:
            held = sum(len(gate.held) for gate in self.gates.values())
            log.info(
                "shared state back: one cap across processes again; %d slot(s) held here "
                "re-registered", held,
            )  # fmt: skip
            self._release_soon.set()  # what was given back meanwhile
        for gate in self.gates.values():
            gate.wake()

    def _fallback(self) -> str:
        if self.config.on_failure == "closed":
            return "new requests are refused (503 shared_state_unavailable)"
        if self.config.on_failure == "open":
            return "requests are admitted without the shared cap"
        caps = ", ".join(
            f"{gate.pool} {gate.limit} -> {gate.local_limit(gate.limit)}"
            for gate in self.gates.values()
        )
        return f"this process caps each upstream at its share: {caps}"

    async def _keep_leases(self) -> None:
        ttl_s = self.config.lease_ttl_s
        while True:
            up = self.health.up
            await anyio.sleep(policy.renew_every_s(ttl_s) if up else policy.probe_every_s(ttl_s))
            held = {pool: set(gate.held) for pool, gate in self.gates.items() if gate.held}
            if held:  # the call that succeeds after an outage is the re-registration
                await self.call("renew", functools.partial(self.store.renew, held))
            elif not self.health.up:
                await self.call("renew", self.store.ping)  # nothing held: a probe

    async def _hear_freed(self) -> None:
        while True:
            with contextlib.suppress(StoreUnavailable):  # the queues poll meanwhile
                await self.store.watch_freed(self._freed)
            await anyio.sleep(policy.probe_every_s(self.config.lease_ttl_s))

    def _freed(self, pool: str) -> None:
        gate = self.gates.get(pool)
        if gate is not None:
            gate.wake()

    def release(self, pool: str, slot: str) -> None:
        self._released.setdefault(pool, set()).add(slot)
        self._release_soon.set()

    async def _give_back(self) -> None:
        """One call for every slot given back since the last one: under load, far fewer
        calls than requests."""
        while True:
            await self._release_soon.wait()
            self._release_soon = anyio.Event()
            if not self.health.up or not self._released:
                continue  # kept until the store is back (the leases expire anyway)
            batch, self._released = self._released, {}
            done = await self.call("release", functools.partial(_done, self.store.give_back, batch))
            if done is None:
                for pool, slots in batch.items():
                    self._released.setdefault(pool, set()).update(slots)
            for pool in batch:  # our own queues need not wait for the published word
                self.gates[pool].wake()


class SlotGate:
    """One upstream's share of the shared cap, as its bulkhead sees it."""

    def __init__(self, slots: SharedSlots, pool: str, limit: int) -> None:
        self.slots = slots
        self.pool = pool
        self.limit = limit
        self.held: set[str] = set()  # renewed together; re-registered after an outage
        self._wake: Callable[[], None] = lambda: None

    def bind(self, wake: Callable[[], None]) -> None:
        """`wake` is called when a slot frees anywhere or the store's health switches."""
        self._wake = wake

    def wake(self) -> None:
        self._wake()

    def admission(self) -> policy.Admission:
        return policy.admission(self.slots.config.on_failure, self.slots.health.up)

    def local_limit(self, limit: int) -> int:
        config = self.slots.config
        up = self.slots.health.up
        return policy.local_limit(
            limit, up=up, on_failure=config.on_failure, processes=self.slots.processes
        )

    def refusal(self) -> Overloaded:
        retry_after = max(1, round(policy.probe_every_s(self.slots.config.lease_ttl_s)))
        return Overloaded(
            "The gateway's shared state (Redis) is unavailable and shared.on_failure is closed.",
            code="shared_state_unavailable",
            retry_after_s=retry_after,
        )

    async def take(self, count: int) -> Taken | None:
        """Up to `count` slots in one store call; None when the call failed."""
        wanted = [self.slots.new_slot() for _ in range(count)]

        def judge(taken: Taken) -> str:
            return "ok" if taken.slots else "full"

        slots = self.slots
        others = [pool for pool in slots.gates if pool != self.pool]
        taken = await slots.call(
            "acquire", lambda: slots.store.take(self.pool, wanted, self.limit, others), judge
        )
        if taken is not None:
            self.held.update(taken.slots)
            now = clock()
            for pool, held in taken.held.items():
                if pool in slots.gates:
                    slots.counted[pool] = (held, len(slots.gates[pool].held), now)
        return taken

    def elsewhere(self, now: float) -> int:
        """Slots other processes hold in this pool, as the last take (of any pool here) said;
        0 when none said so within a lease's TTL. A balancer adds it to what this process
        holds: the gateway-wide load, without a call of its own."""
        counted = self.slots.counted.get(self.pool)
        if counted is None or now - counted[2] > self.slots.config.lease_ttl_s:
            return 0
        held, here, _ = counted
        return max(0, held - here)

    def hold_unshared(self) -> str:
        """A slot taken without the store (it is down): held, and registered when it is back."""
        slot = self.slots.new_slot()
        self.held.add(slot)
        return slot

    def give_back(self, slot: str) -> None:
        """Never waits: the store hears of it in the background (or, while it is down, once it
        is back; the lease would expire anyway)."""
        self.held.discard(slot)
        self.slots.release(self.pool, slot)

    def start(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if not self.slots.spawn(work):
            raise Overloaded("The gateway is shutting down.", code="shutting_down")


async def _done(call: Callable[[T], Awaitable[None]], argument: T) -> bool:
    """A call that returns nothing, as True when it succeeded (`call` says None if not)."""
    await call(argument)
    return True
