"""The order of an upstream's waiters, pure: priority class first, then fair share among the
keys of a class, then earliest deadline.

Fair share is virtual time (start-time fair queuing over keys): each key of a class has a
count of turns, and the next turn goes to the waiting key with the fewest. A key that starts
waiting again is brought up to the class's current turn, so idle time earns no credit. Two
keys offering 10:1 load thus alternate while both wait (half the slots each), and a key alone
takes every slot. Within a key, the earliest deadline goes first. Gateways without keys have
one key: the queue is then plain earliest-deadline-first, as before tenants.

When the queue is full, a newcomer displaces the newest waiter of the lowest class below its
own; with none below, the newcomer itself is shed. A `high` request is never shed while a
`low` one waits.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

RANKS = {"high": 0, "normal": 1, "low": 2}


@dataclass(order=True, slots=True)
class Entry(Generic[T]):
    """One waiter: ordered within its key by deadline, then arrival."""

    deadline: float
    seq: int
    rank: int = field(compare=False)
    key: str = field(compare=False)
    item: T = field(compare=False)


@dataclass(slots=True)
class _Class(Generic[T]):
    keys: dict[str, list[Entry[T]]] = field(default_factory=dict)  # key -> its heap
    turns: dict[str, float] = field(default_factory=dict)  # key -> turns had (virtual time)
    now: float = 0.0  # the turn of the last key served


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._classes: list[_Class[T]] = [_Class() for _ in RANKS]
        self._order = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(
        self, item: T, *, deadline: float, key: str = "", priority: str = "normal"
    ) -> Entry[T]:
        rank = RANKS[priority]
        cls = self._classes[rank]
        entry: Entry[T] = Entry(deadline, next(self._order), rank, key, item)
        heap = cls.keys.get(key)
        if heap is None:  # starts waiting: caught up with the class, no credit for idling
            cls.keys[key] = heap = []
            cls.turns[key] = max(cls.turns.get(key, 0.0), cls.now)
        heapq.heappush(heap, entry)
        self._size += 1
        return entry

    def pop(self) -> T:
        """The next waiter to serve; the queue must not be empty."""
        for cls in self._classes:
            if cls.keys:
                key = min(cls.keys, key=lambda k: (cls.turns[k], cls.keys[k][0]))
                heap = cls.keys[key]
                entry = heapq.heappop(heap)
                if not heap:
                    del cls.keys[key]
                cls.now = cls.turns[key]
                cls.turns[key] += 1
                self._size -= 1
                return entry.item
        raise IndexError("pop from an empty FairQueue")

    def remove(self, entry: Entry[T]) -> None:
        """A waiter that left (cancelled, its deadline passed)."""
        cls = self._classes[entry.rank]
        heap = cls.keys.get(entry.key)
        if heap is None or entry not in heap:
            return
        heap.remove(entry)
        heapq.heapify(heap)
        if not heap:
            del cls.keys[entry.key]
        self._size -= 1

    def victim(self, priority: str) -> Entry[T] | None:
        """Whom to shed for a newcomer of `priority` when the queue is full: the newest waiter
        of the lowest class below it, or None (the newcomer is shed)."""
        for rank in range(len(self._classes) - 1, RANKS[priority], -1):
            heaps = self._classes[rank].keys.values()
            if heaps:
                newest = max((entry for heap in heaps for entry in heap), key=lambda e: e.seq)
                return newest
        return None

    def ahead(self, *, deadline: float, key: str = "", priority: str = "normal") -> int:
        """About how many waiters would go before a newcomer: every one of a higher class, its
        own key's with an earlier deadline, and as many of each other key of its class (they
        take turns)."""
        rank = RANKS[priority]
        count = sum(len(heap) for cls in self._classes[:rank] for heap in cls.keys.values())
        cls = self._classes[rank]
        own = sum(1 for entry in cls.keys.get(key, ()) if entry.deadline <= deadline)
        count += own
        for other, heap in cls.keys.items():
            if other != key:
                count += min(len(heap), own + 1)
        return count
