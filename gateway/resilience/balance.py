"""Which target takes the next attempt of a request (pure: no I/O, no clock; the randomness
and the round robin's state are passed in).

A route's targets of equal priority form a pool; a lower priority is the overflow. The relay
describes every target the request may still use as it stands now (a `Member`: in or out,
whether its recent first token fits the time left, how busy it is) and asks `choose`:

    the first pool that still has members decides. Its *candidates* are the members that are
    in (not ejected, not cooling) and fit the time left, the least tried first, and not the
    member of the attempt just made while another is left (a retry or a hedge goes elsewhere).
    No candidate: its first member is named, and the relay's own checks pass it over (and log
    why) or panic-route to it (`passed_over`), as for a route without pools.
    All candidates full: a later pool with a candidate that has room takes the request
    (`overflow`), else it queues in this pool: in the lines of all the candidates at once,
    for the first slot to free (`Pick.line`), or, where that cannot be, in the shortest.
    Otherwise the route's `balance` picks among the candidates with room:
      least_load   power of two choices: two drawn at random in proportion to weight; the one
                   expected to answer sooner wins (`cost`: its recent TTFT over how much room
                   it has left, relative to max_connections x weight); a tie goes to the first
                   drawn, so an idle pool shares by weight
      round_robin  smooth weighted round robin (nginx's), over the candidates with room
      affinity     rendezvous hashing of the request's key over the candidates, so a key stays
                   on one member while it is in, and when one leaves only its keys move (to
                   their next choice); least_load when the key's member is full

A route that does not balance (it sets no `balance`, and no target sets or shares a priority)
keeps its targets in order, each a fallback for the one before: `choose` names the first left.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.config import Affinity, Balance, Target

Reason = Literal["least_load", "round_robin", "affinity", "overflow"]

TTFT_FLOOR_S = 0.1  # first tokens sooner than this are all alike to a client
TTFT_SLACK = 1.5  # within this ratio of the pool's fastest, a member counts as fast


@dataclass(frozen=True, slots=True)
class Member:
    """One target as the balancer sees it when choosing."""

    target: Target
    rank: int  # its pool's place in priority order: 0 for the route's first pool
    tries: int = 0  # attempts this request made on it
    out: bool = False  # ejected or cooling
    fits: bool = True  # its recent time to first token fits what the request has left
    busy: int = 0  # requests holding one of its slots (gateway-wide when the cap is shared)
    queued: int = 0  # requests waiting for one
    capacity: int = 1  # max_connections
    ttft: float | None = None  # its recent typical time to first token (None: not known)

    @property
    def room(self) -> bool:
        return self.busy < self.capacity and self.queued == 0


@dataclass(frozen=True, slots=True)
class Pick:
    target: Target
    reason: Reason | None  # None: named in order, nothing balanced
    # Every candidate is full: the request may wait for the first of them to free a slot.
    line: tuple[Target, ...] = ()


class Rotation:
    """A route's smooth weighted round robin: each target's running score."""

    def __init__(self) -> None:
        self.current: dict[Target, float] = {}


def ranked(targets: Sequence[Target], priority: Mapping[Target, int]) -> list[tuple[Target, int]]:
    """`targets` in priority order (route order within a priority), each with its pool's rank."""
    levels = {level: rank for rank, level in enumerate(sorted({priority[t] for t in targets}))}
    return [(t, levels[priority[t]]) for t in sorted(targets, key=priority.__getitem__)]


def choose(
    members: Sequence[Member],
    *,
    balance: Balance | None,
    previous: Target | None,
    key: bytes | None,
    rng: random.Random,
    rotation: Rotation,
) -> Pick | None:
    """The next target for the request among `members` (the targets it may still use, in
    priority order, then route order); None when there are none."""
    if not members:
        return None
    first = [m for m in members if m.rank == members[0].rank]
    if balance is None:
        return Pick(first[0].target, None)
    candidates = _candidates(first, previous)
    if not candidates:
        return Pick(first[0].target, None)  # the relay passes it over, or panic-routes
    roomy = [m for m in candidates if m.room]
    if not roomy:
        for later in _pools(members[len(first) :]):
            spare = [m for m in _candidates(later, previous) if m.room]
            if spare:
                return Pick(least_load(spare, rng).target, "overflow")
        shortest = _shortest_line(candidates, rng).target
        return Pick(shortest, _reason(first, balance), tuple(m.target for m in candidates))
    if first[0].rank > 0:
        return Pick(least_load(roomy, rng).target, "overflow")
    if balance == "round_robin":
        return Pick(round_robin(roomy, rotation).target, "round_robin")
    if balance == "affinity" and key is not None:
        home = rendezvous(candidates, key)
        if home.room:
            return Pick(home.target, "affinity")
    return Pick(least_load(roomy, rng).target, "least_load")


def _reason(pool: Sequence[Member], balance: Balance) -> Reason:
    if pool[0].rank > 0:
        return "overflow"
    return "round_robin" if balance == "round_robin" else "least_load"


def _pools(members: Sequence[Member]) -> list[list[Member]]:
    pools: dict[int, list[Member]] = {}
    for member in members:
        pools.setdefault(member.rank, []).append(member)
    return list(pools.values())


def _candidates(pool: Sequence[Member], previous: Target | None) -> list[Member]:
    """The members that can take the request: in, fitting, tried least; not the one just
    tried while another is left."""
    able = [m for m in pool if not m.out and m.fits]
    if not able:
        return []
    fewest = min(m.tries for m in able)
    least_tried = [m for m in able if m.tries == fewest]
    elsewhere = [m for m in least_tried if m.target != previous]
    return elsewhere or least_tried


def cost(member: Member, fastest: float | None) -> float:
    """How long the member is expected to take to its first token, relatively: its recent
    TTFT beyond what counts as fast in its pool (1 when fast or not known), over the room it
    has left (in flight relative to max_connections x weight)."""
    slowness = 1.0
    if member.ttft is not None:
        fast = max(TTFT_SLACK * (fastest or 0.0), TTFT_FLOOR_S)
        slowness = max(1.0, member.ttft / fast)
    used = member.busy / (member.capacity * member.target.weight)
    return slowness / max(1.0 - used, 1e-9)


def least_load(members: Sequence[Member], rng: random.Random) -> Member:
    """Power of two choices, drawn in proportion to weight; the lower `cost` wins, a tie the
    first drawn."""
    if len(members) == 1:
        return members[0]
    first = _draw(members, rng)
    second = _draw([m for m in members if m is not first], rng)
    fastest = _fastest(members)
    return second if cost(second, fastest) < cost(first, fastest) else first


def _shortest_line(members: Sequence[Member], rng: random.Random) -> Member:
    """Every member is full: the request queues where the line is shortest for its weight."""
    first = _draw(members, rng)
    others = [m for m in members if m is not first]
    if not others:
        return first
    second = _draw(others, rng)

    def line(m: Member) -> float:
        return (m.queued + 1) / m.target.weight

    return second if line(second) < line(first) else first


def _fastest(members: Sequence[Member]) -> float | None:
    """The pool's fastest recent first token; None (as fast as can be) while one member's
    is not known yet: a member not yet timed is taken to be fast."""
    known = [m.ttft for m in members if m.ttft is not None]
    return min(known) if len(known) == len(members) else None


def _draw(members: Sequence[Member], rng: random.Random) -> Member:
    total = sum(m.target.weight for m in members)
    point = rng.random() * total
    for member in members:
        point -= member.target.weight
        if point < 0:
            return member
    return members[-1]


def round_robin(members: Sequence[Member], rotation: Rotation) -> Member:
    """Smooth weighted round robin: every candidate gains its weight, the highest is picked
    and gives back the total, so weights 1, 1, 2 go C A C B, not C C A B."""
    current = rotation.current
    total = 0
    best: Member | None = None
    for member in members:
        weight = member.target.weight
        total += weight
        current[member.target] = current.get(member.target, 0.0) + weight
        if best is None or current[member.target] > current[best.target]:
            best = member
    assert best is not None  # members is not empty
    current[best.target] -= total
    return best


def rendezvous(members: Sequence[Member], key: bytes) -> Member:
    """The member `key` belongs to (weighted rendezvous hashing): each member's score is its
    own hash of the key; removing a member moves only the keys it had."""

    def score(member: Member) -> float:
        target = member.target
        name = f"{target.upstream}\0{target.model}".encode()
        digest = hashlib.blake2b(key + b"\0" + name, digest_size=8).digest()
        unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
        return -target.weight / math.log(unit)

    return max(members, key=score)


def affinity_key(payload: Mapping[str, Any], affinity: Affinity) -> bytes | None:
    """What makes a request alike to others for `affinity`: its `user` (Anthropic's
    `metadata.user_id`), or its system prompt and first `prefix_messages` messages (the
    Responses API's `input`, a completion's `prompt`); None when the request has none."""
    if affinity.key == "user":
        user = payload.get("user")
        metadata = payload.get("metadata")
        if not isinstance(user, str) and isinstance(metadata, Mapping):
            user = metadata.get("user_id")
        return user.encode() if isinstance(user, str) and user else None
    for field in ("messages", "input", "prompt"):
        prompt = payload.get(field)
        if isinstance(prompt, list | str) and prompt:
            break
    else:
        return None
    prefix = prompt[: affinity.prefix_messages] if isinstance(prompt, list) else prompt
    text = json.dumps([payload.get("system"), prefix], sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()
