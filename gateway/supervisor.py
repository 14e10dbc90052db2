"""`serve --workers N`: uvicorn's worker supervisor, except that SIGHUP reloads each worker's
configuration in place (gateway.reload) instead of replacing the workers, which would lose
their pools, their connections and their upstreams' ejection state."""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from uvicorn.supervisors.multiprocess import Multiprocess

log = logging.getLogger("gateway.reload")


class Workers(Multiprocess):
    def handle_hup(self) -> None:
        pids = [p.pid for p in self.processes if p.pid is not None and p.process.is_alive()]
        log.info("SIGHUP: each of %d worker(s) reloads its config in place", len(pids))
        for pid in pids:
            # One that just died is replaced by the supervisor, and its successor reads the file.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
