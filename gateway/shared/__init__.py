"""Shared state: one connection cap for every worker and replica of a gateway.

A cap shared across processes is policy over a store (STYLE.md, "Growing the house"):

    store      SlotStore, the interface: take up to n slots of a pool under its limit, renew
               every slot a process holds in one call, give one back, hear of slots freed
               anywhere. LocalSlotStore keeps them in this process (tests, one replica);
    redis_store  RedisSlotStore keeps them in Redis: a sorted set of slot ids per upstream
               scored by the lease's expiry on Redis's own clock (TIME), each operation one
               atomic Lua script, a pub/sub channel that says when a slot frees
    policy     pure decisions: is the store up, what a process admits while it is not
               (`shared.on_failure`), how often to renew and poll, how caps divide by workers
    slots      SharedSlots, this process's side: the slots it holds, the renewal and
               "slot freed" loops, the store calls timed and counted; and SlotGate, what one
               upstream's bulkhead (gateway.upstream) asks for a slot

The earliest-deadline-first queue stays in the process (gateway.upstream.Bulkhead): its head
asks the store when it could start. The relay never sees any of this.
"""

from gateway.shared.slots import SharedSlots, SlotGate
from gateway.shared.store import LocalSlotStore, SlotStore, StoreUnavailable, Taken

__all__ = ["LocalSlotStore", "SharedSlots", "SlotGate", "SlotStore", "StoreUnavailable", "Taken"]
