"""The order of an upstream's waiters: class, then fair share among keys, then deadline."""

from __future__ import annotations

from collections import Counter

from gateway.tenants.fair_queue import FairQueue


def drain(queue: FairQueue[str]) -> list[str]:
    return [queue.pop() for _ in range(len(queue))]


def test_priority_class_first() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("low", deadline=1.0, key="batch", priority="low")
    queue.push("normal", deadline=9.0, key="app")
    queue.push("high", deadline=99.0, key="chat", priority="high")
    assert drain(queue) == ["high", "normal", "low"]


def test_one_key_is_earliest_deadline_first() -> None:
    queue: FairQueue[str] = FairQueue()
    for deadline in (5.0, 1.0, 3.0, 1.0):
        queue.push(f"{deadline}", deadline=deadline)
    assert drain(queue) == ["1.0", "1.0", "3.0", "5.0"]


def test_two_keys_offering_ten_to_one_take_turns() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(100):
        queue.push("big", deadline=float(i), key="big")
    for i in range(10):
        queue.push("small", deadline=100.0 + i, key="small")  # later deadlines, still a turn
    first_twenty = Counter(drain(queue)[:20])
    assert first_twenty == Counter({"big": 10, "small": 10})


def test_idle_time_earns_no_credit() -> None:
    queue: FairQueue[str] = FairQueue()
    for _ in range(50):
        queue.push("big", deadline=0.0, key="big")
    for _ in range(40):
        queue.pop()  # big alone takes every slot meanwhile
    for _ in range(10):
        queue.push("late", deadline=0.0, key="late")
    assert Counter(drain(queue)[:10]) == Counter({"big": 5, "late": 5})  # not 10 of "late"


def test_full_queue_sheds_the_newest_of_the_lowest_class_below() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("low-old", deadline=1.0, key="batch", priority="low")
    queue.push("low-new", deadline=0.5, key="batch", priority="low")
    queue.push("normal", deadline=1.0, key="app")
    victim = queue.victim("high")
    assert victim is not None
    assert victim.item == "low-new"
    assert queue.victim("low") is None  # the newcomer of the lowest class is shed itself
    normal_victim = queue.victim("normal")
    assert normal_victim is not None
    assert normal_victim.item == "low-new"
    queue.remove(victim)
    assert drain(queue) == ["normal", "low-old"]


def test_remove_a_waiter_that_left() -> None:
    queue: FairQueue[str] = FairQueue()
    entry = queue.push("a", deadline=1.0, key="k")
    queue.push("b", deadline=2.0, key="k")
    queue.remove(entry)
    queue.remove(entry)  # twice is harmless
    assert len(queue) == 1
    assert drain(queue) == ["b"]


def test_ahead_counts_who_goes_first() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(3):
        queue.push("high", deadline=float(i), key="chat", priority="high")
    for i in range(5):
        queue.push("app", deadline=float(i), key="app")
    for i in range(2):
        queue.push("mine", deadline=float(i), key="mine")
    # 3 high, my own 2 with earlier deadlines, and 3 of "app" (its turns alongside mine)
    assert queue.ahead(deadline=10.0, key="mine") == 3 + 2 + 3
    assert queue.ahead(deadline=10.0, key="chat", priority="high") == 3
