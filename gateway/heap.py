"""The cyclic garbage collector's settings for a server process.

A worker holding thousands of streams holds hundreds of thousands of objects that live for
seconds or minutes (each stream's tasks, coroutines, sockets, parsers: about 140). With
CPython's defaults, the objects of new streams reach the oldest generation within
milliseconds, and every 25% of growth there a full collection walks all of them while the
event loop stands still: 100 to 450 ms with 1,000 to 3,000 streams on the bench machine, long
enough to break the idle deadlines and the latency of every other request on the worker.

So: what the process built before serving (modules, configuration, the app: some 55,000
objects) is moved out of the collector's sight (`gc.freeze()`, as the docs advise for a
server's start-up), and the youngest generation is collected every 10,000 allocations instead
of 700, so that what a request allocates and drops is freed by reference counting before a
collection can promote it. The collector still runs, and still finds every cycle.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Once, when the app is built and before it serves."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
