"""Configuration reloaded without a restart: on SIGHUP, and with `serve --watch-config` when
the file changes on disk (an edit, a rename over it, or Kubernetes' swap of a ConfigMap's
symlink), polled once a second by its resolved path, inode, mtime and size, then its hash.

    trigger ─► read + validate the whole file (as check-config)
            ├─ invalid: nothing changes; one ERROR line names every problem
            └─ valid:   settings that need a restart are kept (and named, WARNING);
                        the next generation is built (gateway.runtime), its new pools opened,
                        swapped in whole; one INFO line says what changed

With `--workers N` every worker reloads itself: the supervisor forwards SIGHUP to each
(gateway.supervisor), and each worker polls the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import logging
import math
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import anyio

from gateway.config import Config, ConfigError, describe_config, load_config
from gateway.lifecycle import Lifecycle
from gateway.observability import logs, metrics
from gateway.runtime import Runtime
from gateway.shared.policy import per_worker

LOG = logging.getLogger("gateway.reload")
POLL_S = 1.0

# Settings a running server cannot change: the HTTP front end's, logging's, and the
# process-wide clients (the shared store, the trace exporter).
RESTART_ONLY = (
    "server.keepalive_s",
    "server.header_timeout_s",
    "server.log_format",
    "server.metrics",
    "shared",
    "telemetry",
)

FileSignature = tuple[str, int, int, int]  # resolved path, inode, mtime (ns), size


def signature(path: Path) -> FileSignature | None:
    """What changes when the file does (a ConfigMap update swaps the symlink it resolves
    through); None when it cannot be read now."""
    try:
        resolved = os.path.realpath(path)
        stat = os.stat(resolved)
    except OSError:
        return None
    return (resolved, stat.st_ino, stat.st_mtime_ns, stat.st_size)


def file_hash(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the settings of `RESTART_ONLY` taken from `old`, and the ones that differed."""
    changed = [name for name in RESTART_ONLY if _get(old, name) != _get(new, name)]
    server = dataclasses.replace(
        new.server,
        keepalive_s=old.server.keepalive_s,
        header_timeout_s=old.server.header_timeout_s,
        log_format=old.server.log_format,
        metrics=old.server.metrics,
    )
    kept = dataclasses.replace(new, server=server, shared=old.shared, telemetry=old.telemetry)
    return kept, changed


def _get(config: Config, name: str) -> object:
    value: Any = config
    for part in name.split("."):
        value = getattr(value, part)
    return value


class Reloader:
    def __init__(
        self,
        runtime: Runtime,
        lifecycle: Lifecycle,
        path: Path,
        *,
        workers: int = 1,
        watch: bool = False,
        poll_s: float = POLL_S,
    ) -> None:
        self.runtime = runtime
        self.lifecycle = lifecycle
        self.path = path
        self.workers = workers
        self.watch = watch
        self.poll_s = poll_s
        self.last_error: dict[str, Any] | None = None
        self._seen = signature(path)
        self._failed_hash: str | None = None  # not tried again by the watcher until it changes
        self._pending = False  # a SIGHUP came before the loop ran
        self._wake: Callable[[], None] | None = None
        runtime.current.file_hash = file_hash(path.read_bytes())  # at start-up, before the loop
        metrics.record_config_generation(runtime.current.number)

    def request(self) -> None:
        """Ask for a reload (from a signal handler)."""
        self._pending = True
        if self._wake is not None:
            self._wake()

    async def run(self) -> None:
        """Until cancelled: reload when asked (SIGHUP) or, watching, when the file changed."""
        loop = asyncio.get_running_loop()  # the one the signal handler wakes
        while True:
            wake = anyio.Event()

            def wake_up(event: anyio.Event = wake) -> None:
                loop.call_soon_threadsafe(event.set)

            self._wake = wake_up
            if not self._pending:
                with anyio.move_on_after(self.poll_s if self.watch else math.inf):
                    await wake.wait()
            if self._pending:
                self._pending = False
                await self.reload("sighup")
            elif self.watch and self._changed():
                await self.reload("file_changed")

    def _changed(self) -> bool:
        seen = signature(self.path)
        if seen is None or seen == self._seen:
            return False
        self._seen = seen
        try:
            digest = file_hash(Path(seen[0]).read_bytes())
        except OSError:
            return False
        return digest not in (self.runtime.current.file_hash, self._failed_hash)

    async def reload(self, trigger: str) -> bool:
        """Validate the file and, if it is valid, swap it in; False (nothing changed) if not."""
        try:
            data, config = await anyio.to_thread.run_sync(self._load)
        except ConfigError as error:
            self._failed(trigger, error.errors)
            return False
        digest = file_hash(data)
        current = self.runtime.current
        config, needs_restart = keep_restart_only(current.config, per_worker(config, self.workers))
        generation = self.runtime.next_generation(config, digest)
        for upstream in self.runtime.new_upstreams(generation):
            await upstream.open()
        changes = _changes(current.upstreams, generation.upstreams, current.config, config)
        self.runtime.swap(generation)
        self.lifecycle.grace_s = config.server.shutdown_grace_s
        self.last_error = None
        self._failed_hash = None
        self._seen = signature(self.path)
        metrics.record_config_reload("ok", generation.number)
        for name in needs_restart:
            logs.event(
                LOG,
                logging.WARNING,
                {"event": "config_needs_restart", "setting": name, "kept": "the running value"},
            )
        logs.event(
            LOG,
            logging.INFO,
            {"event": "config_reloaded", "trigger": trigger, "generation": generation.number}
            | changes,
        )
        return True

    def _load(self) -> tuple[bytes, Config]:
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise ConfigError(f"{self.path}: cannot read config file: {error.strerror}") from None
        return data, load_config(self.path)

    def _failed(self, trigger: str, errors: tuple[str, ...]) -> None:
        signed = signature(self.path)
        self._seen = signed
        try:
            self._failed_hash = file_hash(Path(signed[0]).read_bytes()) if signed else None
        except OSError:
            self._failed_hash = None
        at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.last_error = {"at": at, "trigger": trigger, "errors": list(errors)}
        metrics.record_config_reload("error", None)
        logs.event(
            LOG,
            logging.ERROR,
            {
                "event": "config_reload_failed",
                "trigger": trigger,
                "file": str(self.path),
                "kept_generation": self.runtime.current.number,
                "errors": f"{len(errors)} error(s): " + "; ".join(errors),
            },
        )

    def status(self) -> dict[str, Any]:
        """What `GET /debug/config` shows (secrets masked by `describe_config`)."""
        current = self.runtime.current
        loaded = datetime.datetime.fromtimestamp(current.loaded_at, datetime.UTC)
        return {
            "generation": current.number,
            "loaded_at": loaded.isoformat(timespec="seconds"),
            "file": str(self.path),
            "file_hash": current.file_hash,
            "watch": self.watch,
            "pid": os.getpid(),
            "last_error": self.last_error,
            "config": describe_config(current.config).splitlines(),
        }


def listen_for_sighup(reloader: Reloader | None) -> Callable[[], None]:
    """SIGHUP asks `reloader` for a reload (without one, serving the demo, it is said and
    ignored, not fatal); main thread only (a server run in a test thread has none). Returns
    what puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_sighup(sig: int, frame: FrameType | None) -> None:
        if reloader is None:
            LOG.warning("SIGHUP: no config file to reload (serving the built-in demo)")
        else:
            reloader.request()

    previous = signal.signal(signal.SIGHUP, on_sighup)

    def restore() -> None:
        signal.signal(signal.SIGHUP, previous)

    return restore


def _changes(before: Any, after: Any, old: Config, new: Config) -> dict[str, str]:
    """Upstreams and routes kept, changed, added, removed: names only."""
    kept = [n for n in after if n in before and after[n] is before[n]]
    changed = [n for n in after if n in before and after[n] is not before[n]]
    old_routes = {r.model: r for r in old.routes}
    new_routes = {r.model: r for r in new.routes}
    return {
        "upstreams_kept": ",".join(kept) or "-",
        "upstreams_changed": ",".join(changed) or "-",
        "upstreams_added": ",".join(n for n in after if n not in before) or "-",
        "upstreams_removed": ",".join(n for n in before if n not in after) or "-",
        "routes_changed": ",".join(
            m for m in new_routes if m in old_routes and new_routes[m] != old_routes[m]
        )
        or "-",
        "routes_added": ",".join(m for m in new_routes if m not in old_routes) or "-",
        "routes_removed": ",".join(m for m in old_routes if m not in new_routes) or "-",
    }
