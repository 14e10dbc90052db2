"""This process's side of the key quotas: admit a request before its relay starts, settle it
when it ends.

Without `shared`, the buckets live here (LocalQuotaStore), each worker of `serve --workers N`
with its share of every limit (gateway.shared.policy.per_worker). With `shared`, one Lua call
per admission decides for the whole gateway; while Redis does not answer, `shared.on_failure`
says what happens, as for the upstream caps: `closed` refuses (503), `open` admits without
quotas, `local_share` enforces this process's share of each limit here. A settlement never
holds the request up: with Redis it runs in the background.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from gateway.config import ApiKey, KeyLimits
from gateway.errors import Overloaded, RateLimited
from gateway.shared import SharedSlots, SlotGate, policy
from gateway.shared.quota_store import LocalQuotaStore, QuotaStore, lease_pool
from gateway.tenants.buckets import Estimate, Verdict, ratelimit_headers

_SETTING = {
    "requests": "requests_per_min",
    "tokens": "tokens_per_min",
    "concurrent": "max_concurrent",
}
_WHAT = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "concurrent": "requests in flight at once",
}


@dataclasses.dataclass(slots=True)
class Grant:
    """What an admitted request holds until it is settled."""

    key: ApiKey
    estimate: Estimate
    reserved: int  # tokens taken from the bucket (0 when the key has no tokens_per_min)
    headers: dict[str, str]  # x-ratelimit-*, for the answer
    store: QuotaStore | None  # where it was admitted (None: admitted without quotas)
    limits: KeyLimits
    slot: str = ""  # its concurrency lease in the shared store


class Quotas:
    def __init__(self, shared: SharedSlots | None = None, store: QuotaStore | None = None) -> None:
        self._local = LocalQuotaStore()  # the only one without `shared`; the fallback with it
        self._shared = shared
        self._store = store  # the shared store (Redis), with `shared`
        self._gates: dict[str, SlotGate] = {}  # a key's leases, renewed with the upstreams'

    async def admit(self, key: ApiKey, estimate: Estimate) -> Grant:
        """Admit a request of `key` (which has limits) or raise RateLimited (429), or
        Overloaded when Redis is down and `on_failure: closed`."""
        limits = key.limits
        assert limits is not None  # the caller checks: keys without limits cost nothing here
        tokens = estimate.total if limits.tokens_per_min else 0
        shared, store = self._shared, self._store
        if shared is None or store is None:
            verdict = self._local.admit_now(key.name, limits, tokens)
            return self._decide(key, estimate, limits, self._local, "", tokens, verdict)
        admission = policy.admission(shared.config.on_failure, shared.health.up)
        if admission == "shared":
            slot = shared.new_slot() if limits.max_concurrent else ""
            shared_verdict = await shared.call(
                "admit",
                functools.partial(store.admit, key.name, limits, tokens, slot),
                lambda v: "ok" if v.admitted else "full",
            )
            if shared_verdict is not None:
                if shared_verdict.admitted and slot:
                    self._gate(key, limits).held.add(slot)
                return self._decide(key, estimate, limits, store, slot, tokens, shared_verdict)
            admission = policy.admission(shared.config.on_failure, False)  # it just failed
        if admission == "closed":
            raise Overloaded(
                "The gateway's shared state (Redis) is unavailable and shared.on_failure is "
                "closed.",
                code="shared_state_unavailable",
                retry_after_s=1,
            )
        if admission == "open":
            return Grant(key, estimate, 0, {}, None, limits)
        share = policy.share_limits(limits, shared.processes)
        verdict = self._local.admit_now(key.name, share, tokens)
        return self._decide(key, estimate, share, self._local, "", tokens, verdict)

    def settle(self, grant: Grant, used: int) -> None:
        """The request ended having used `used` tokens. Never waits."""
        store = grant.store
        if store is None:
            return
        name, limits = grant.key.name, grant.limits
        reserved = min(grant.reserved, limits.tokens_per_min or 0)
        if store is self._local:
            self._local.settle_now(name, limits, reserved=reserved, used=used)
            return
        shared = self._shared
        assert shared is not None
        if grant.slot:
            self._gates[name].held.discard(grant.slot)  # no longer renewed
        settle = functools.partial(
            store.settle, name, limits, reserved=reserved, used=used, slot=grant.slot
        )

        async def in_background() -> None:
            await shared.call("settle", settle)  # failed: the lease expires on its own

        shared.spawn(in_background)

    def _gate(self, key: ApiKey, limits: KeyLimits) -> SlotGate:
        gate = self._gates.get(key.name)
        if gate is None:
            assert self._shared is not None
            assert limits.max_concurrent is not None
            gate = self._gates[key.name] = self._shared.gate(
                lease_pool(key.name), limits.max_concurrent
            )
        return gate

    def _decide(
        self,
        key: ApiKey,
        estimate: Estimate,
        limits: KeyLimits,
        store: QuotaStore,
        slot: str,
        tokens: int,
        verdict: Verdict,
    ) -> Grant:
        headers = ratelimit_headers(verdict)
        if not verdict.admitted:
            limit = verdict.refused_by or "requests"
            value = getattr(limits, _SETTING[limit])
            wanted = f" (this request reserves {tokens})" if limit == "tokens" else ""
            raise RateLimited(
                f"Rate limit reached for key {key.name!r}: {value} {_WHAT[limit]}{wanted}. "
                f"Try again in {max(1, math.ceil(verdict.retry_after_s))}s.",
                limit=limit,
                headers=headers,
            )
        return Grant(key, estimate, tokens, headers, store, limits, slot)
