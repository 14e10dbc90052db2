"""The balancer's choice, without sockets: P2C never picks a full member while one has room,
weights are respected, rendezvous hashing moves only a removed member's keys, members out or
too slow for the time left are passed by, the overflow serves only when the pool cannot."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import Affinity, Balance, Target
from gateway.resilience.balance import (
    Member,
    Pick,
    Rotation,
    affinity_key,
    choose,
    cost,
    least_load,
    ranked,
    rendezvous,
    round_robin,
)

A, B, C = (Target(upstream=name, model="llama", priority=0) for name in "abc")
OVERFLOW = Target(upstream="openai", model="gpt-4o-mini", priority=1)


def member(target: Target, **fields: object) -> Member:
    fields.setdefault("capacity", 4)
    return replace(Member(target=target, rank=target.priority or 0), **fields)  # type: ignore[arg-type]


def pick(
    members: Sequence[Member],
    balance: Balance | None = "least_load",
    *,
    previous: Target | None = None,
    key: bytes | None = None,
    seed: int = 0,
    rotation: Rotation | None = None,
) -> Pick | None:
    return choose(
        members,
        balance=balance,
        previous=previous,
        key=key,
        rng=random.Random(seed),
        rotation=rotation or Rotation(),
    )


def shares(members: Sequence[Member], picks: int, balance: Balance = "least_load") -> Counter[str]:
    rotation = Rotation()
    rng = random.Random(7)
    counted: Counter[str] = Counter()
    for _ in range(picks):
        chosen = choose(
            members, balance=balance, previous=None, key=None, rng=rng, rotation=rotation
        )
        assert chosen is not None
        counted[chosen.target.upstream] += 1
    return counted


@given(
    loads=st.lists(
        st.tuples(st.integers(0, 8), st.integers(1, 8), st.integers(1, 4)), min_size=1, max_size=6
    ),
    seed=st.integers(0, 2**32),
)
def test_p2c_never_picks_a_full_member_while_one_has_room(
    loads: list[tuple[int, int, int]], seed: int
) -> None:
    members = [
        member(
            Target(upstream=f"u{i}", model="m", priority=0, weight=weight),
            busy=min(busy, cap),
            capacity=cap,
        )
        for i, (busy, cap, weight) in enumerate(loads)
    ]
    chosen = pick(members, seed=seed)
    assert chosen is not None
    picked = next(m for m in members if m.target == chosen.target)
    if any(m.room for m in members):
        assert picked.room
        assert chosen.reason == "least_load"


@given(busy=st.lists(st.integers(0, 3), min_size=3, max_size=3), seed=st.integers(0, 2**32))
def test_the_overflow_serves_only_when_every_pool_member_is_full_out_or_too_slow(
    busy: list[int], seed: int
) -> None:
    rng = random.Random(seed)
    pool = [
        member(t, busy=b, out=rng.random() < 0.3, fits=rng.random() < 0.8)
        for t, b in zip((A, B, C), busy, strict=True)
    ]
    chosen = pick([*pool, member(OVERFLOW, rank=1)], seed=seed)
    assert chosen is not None
    pool_can = any(m.room and not m.out and m.fits for m in pool)
    assert (chosen.target == OVERFLOW) == (not pool_can and any(not m.out and m.fits for m in pool))


def test_a_full_pool_with_a_full_overflow_queues_in_the_pool() -> None:
    pool = [member(A, busy=4, queued=3), member(B, busy=4, queued=0), member(C, busy=4, queued=5)]
    picks = {pick([*pool, member(OVERFLOW, rank=1, busy=4, capacity=4)], seed=s) for s in range(20)}
    assert {p.target for p in picks if p is not None} <= {A, B}  # never the longest line
    assert Pick(B, "least_load", line=(A, B, C)) in picks  # or the first of them to free


def test_a_pool_wholly_out_names_its_first_member_for_the_relay_to_pass_over() -> None:
    pool = [member(A, out=True), member(B, out=True), member(OVERFLOW, rank=1)]
    assert pick(pool) == Pick(A, None)  # the relay logs why, and panic-routes if it must
    assert pick(pool[2:]) == Pick(OVERFLOW, "overflow")


def test_a_member_whose_first_token_does_not_fit_is_passed_over_while_another_fits() -> None:
    slow = member(A, ttft=3.0, fits=False)
    fast = member(B, ttft=0.2, busy=3)  # nearly full, and still the one that can answer in time
    assert {pick([slow, fast], seed=s) for s in range(20)} == {Pick(B, "least_load")}


def test_a_retry_goes_to_another_member_when_there_is_one() -> None:
    tried = member(A, tries=1)
    others = {pick([tried, member(B), member(C)], previous=A, seed=s) for s in range(30)}
    assert others == {Pick(B, "least_load"), Pick(C, "least_load")}
    # every member tried once: a second try, not on the one that just failed
    again = [member(A, tries=1), member(B, tries=1)]
    assert {pick(again, previous=A, seed=s) for s in range(10)} == {Pick(B, "least_load")}
    assert pick([member(A, tries=1)], previous=A) == Pick(A, "least_load")  # the only one


def test_a_route_without_balance_names_its_targets_in_order() -> None:
    first, second = Target(upstream="x", model="m"), Target(upstream="y", model="m")
    members = [member(first, busy=4, out=True), member(second, rank=1)]
    assert pick(members, balance=None) == Pick(first, None)


def test_weights_are_respected_by_an_idle_pool() -> None:
    heavy = replace(C, weight=2)
    counted = shares([member(A), member(B), member(heavy)], 4000)
    assert abs(counted["c"] / 4000 - 0.5) < 0.03
    assert abs(counted["a"] / 4000 - 0.25) < 0.03


def test_weights_are_respected_under_load() -> None:
    """Costs are equal when in-flight per weight is: the heavy member may hold twice as many."""
    heavy = replace(C, weight=2)
    members = [
        member(A, busy=1, capacity=8),
        member(B, busy=1, capacity=8),
        member(heavy, busy=2, capacity=8),
    ]
    assert len({cost(m, None) for m in members}) == 1
    counted = shares(members, 4000)
    assert abs(counted["c"] / 4000 - 0.5) < 0.03


def test_a_member_slow_to_first_token_gets_clearly_fewer() -> None:
    members = [member(A, ttft=0.2), member(B, ttft=0.22), member(C, ttft=1.0)]
    counted = shares(members, 3000)
    assert counted["c"] < 0.05 * 3000  # it wins no draw against a fast one
    assert abs(counted["a"] - counted["b"]) < 0.1 * 3000  # 0.2 s and 0.22 s are alike
    # once the fast members are busy enough, the slow one's idle slots are worth its TTFT
    busy = [member(A, ttft=0.2, busy=3), member(B, ttft=0.2, busy=3), member(C, ttft=0.6)]
    assert shares(busy, 300)["c"] > 100


def test_fast_first_tokens_are_alike_however_they_differ() -> None:
    assert cost(member(A, ttft=0.002), 0.002) == cost(member(B, ttft=0.05), 0.002) == 1.0
    assert cost(member(C, ttft=3.0), 0.2) == pytest.approx(10.0)  # 3 s past 1.5 x 0.2 s


def test_round_robin_follows_the_weights_smoothly() -> None:
    heavy = replace(C, weight=2)
    members = [member(A), member(B), member(heavy)]
    rotation = Rotation()
    order = [round_robin(members, rotation).target.upstream for _ in range(8)]
    assert order == ["c", "a", "b", "c", "c", "a", "b", "c"]
    assert shares(members, 400, "round_robin") == Counter({"c": 200, "a": 100, "b": 100})
    # a full member is left out of the turn
    full = [member(A, busy=4), member(B), member(heavy)]
    assert shares(full, 30, "round_robin")["a"] == 0


def test_affinity_keeps_a_key_on_its_member_and_falls_back_when_it_is_full() -> None:
    members = [member(A), member(B), member(C)]
    keys = [f"conversation-{i}".encode() for i in range(50)]
    homes = {key: pick(members, "affinity", key=key, seed=i) for i, key in enumerate(keys)}
    assert {p.reason for p in homes.values() if p is not None} == {"affinity"}
    assert len({p.target for p in homes.values() if p is not None}) == 3  # spread over all
    for i, key in enumerate(keys):  # the same member whatever the draw
        assert pick(members, "affinity", key=key, seed=i + 1000) == homes[key]
    home = homes[keys[0]]
    assert home is not None
    full = [member(m.target, busy=4 if m.target == home.target else 0) for m in members]
    fallback = pick(full, "affinity", key=keys[0])
    assert fallback is not None
    assert fallback.reason == "least_load"
    assert fallback.target != home.target


@given(
    names=st.lists(
        st.text("abcdefgh", min_size=1, max_size=4), min_size=2, max_size=8, unique=True
    ),
    removed=st.integers(0, 7),
)
def test_rendezvous_moves_only_the_removed_members_keys(names: list[str], removed: int) -> None:
    members = [member(Target(upstream=name, model="m", priority=0)) for name in names]
    gone = members[removed % len(members)]
    rest = [m for m in members if m is not gone]
    for i in range(200):
        key = f"k{i}".encode()
        before = rendezvous(members, key)
        after = rendezvous(rest, key)
        if before is not gone:
            assert after is before


def test_weighted_rendezvous_gives_keys_in_proportion() -> None:
    heavy = replace(C, weight=2)
    members = [member(A), member(B), member(heavy)]
    counted = Counter(rendezvous(members, f"k{i}".encode()).target.upstream for i in range(4000))
    assert abs(counted["c"] / 4000 - 0.5) < 0.03


def test_the_affinity_key_is_the_prefix_or_the_user() -> None:
    prefix = Affinity(key="prefix", prefix_messages=2)
    turn1 = {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    }
    turn2 = {
        "messages": [
            *turn1["messages"],
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "?"},
        ]
    }
    other = {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}]
    }
    assert affinity_key(turn1, prefix) == affinity_key(turn2, prefix)
    assert affinity_key(turn1, prefix) != affinity_key(other, prefix)
    assert affinity_key({"input": "hello"}, prefix) is not None  # Responses API
    assert affinity_key({"messages": []}, prefix) is None
    messages_api = {"system": "a", "messages": [{"role": "user", "content": "hi"}]}
    assert affinity_key(messages_api, prefix) != affinity_key(
        {**messages_api, "system": "b"}, prefix
    )
    user = Affinity(key="user")
    assert affinity_key({"user": "alice", **turn1}, user) == affinity_key({"user": "alice"}, user)
    assert affinity_key({"metadata": {"user_id": "alice"}}, user) == affinity_key(
        {"user": "alice"}, user
    )
    assert affinity_key(turn1, user) is None  # no user: least_load decides


def test_ranked_orders_pools_by_priority_then_route_order() -> None:
    x, y, z = (Target(upstream=n, model="m") for n in "xyz")
    assert ranked([x, y, z], {x: 5, y: 0, z: 5}) == [(y, 0), (x, 1), (z, 1)]


def test_least_load_alone_is_the_one_member() -> None:
    only = member(A, busy=4)
    assert least_load([only], random.Random(0)) is only
