"""Configuration reloaded by a real `llm-gateway serve` process (SIGHUP, --watch-config,
--workers 2): in-flight requests keep their config, a broken file changes nothing, removed
upstreams drain, nothing is dropped or leaked under load."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

from gateway.config import parse_config
from gateway.reload import keep_restart_only
from tests.conftest import CHAT, Simulator, SocketCounter
from tests.test_cli import serving


def write(path: Path, data: dict[str, Any]) -> None:
    """Replace the file at once (a rename), as editors and `kubectl` do."""
    fresh = path.with_suffix(".new")
    fresh.write_text(yaml.safe_dump(data))
    os.replace(fresh, path)


def config(
    upstreams: dict[str, str], routes: dict[str, tuple[str, str]], **budget: float
) -> dict[str, Any]:
    """upstreams: name -> base URL; routes: model -> (upstream, target model)."""
    return {
        "upstreams": [{"name": name, "base_url": url} for name, url in upstreams.items()],
        "routes": [
            {
                "model": model,
                "targets": [{"upstream": upstream, "model": target}],
                **({"budget": budget} if budget else {}),
            }
            for model, (upstream, target) in routes.items()
        ],
    }


def stream_lines(url: str, model: str, into: dict[str, Any], key: str) -> None:
    lines: list[str] = []
    try:
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={"model": model, "messages": CHAT, "stream": True},
            timeout=20,
        ) as response:
            into[f"{key}_upstream"] = response.headers.get("x-gateway-upstream")
            lines.extend(line for line in response.iter_lines() if line.startswith("data: "))
    finally:
        into[key] = lines


SLOW = "sim@tokens=6,gap-ms=600"  # six tokens, 0.6 s apart: 3 s of stream


def test_stream_keeps_its_idle_s_while_a_new_one_gets_the_reloaded_one(
    tmp_path: Path, simulator: Simulator
) -> None:
    path = tmp_path / "gateway.yaml"
    sims = {"sim": simulator.base_url}
    write(path, config(sims, {"m": ("sim", SLOW)}, total_s=30, idle_s=2))
    results: dict[str, Any] = {}
    with serving(["--config", str(path)], cwd=tmp_path) as served:
        assert served.debug_config()["generation"] == 1
        before = threading.Thread(target=stream_lines, args=(served.url, "m", results, "old"))
        before.start()
        simulator.wait_for(lambda s: s["open"] == 1)
        write(path, config(sims, {"m": ("sim", SLOW)}, total_s=30, idle_s=0.3))
        served.process.send_signal(signal.SIGHUP)
        state = served.wait_generation(2)
        assert "idle_s=0.3" in " ".join(state["config"])
        stream_lines(served.url, "m", results, "new")  # under the new idle_s: cut
        before.join(timeout=15)
        assert served.process.poll() is None  # SIGHUP did not end it
    assert results["old"][-1] == "data: [DONE]"  # the old budget: all six tokens, 0.6 s gaps
    assert len(results["old"]) >= 7
    assert "upstream_idle_timeout" in results["new"][-1]
    assert "event=config_reloaded trigger=sighup generation=2" in served.output


def test_a_broken_file_leaves_the_old_config_serving(tmp_path: Path, simulator: Simulator) -> None:
    path = tmp_path / "gateway.yaml"
    good = config({"sim": simulator.base_url}, {"m": ("sim", "sim")})
    write(path, good)
    with serving(["--config", str(path)], cwd=tmp_path) as served:
        broken = {**good, "routes": [{"model": "m", "targets": [{"upstream": "nope"}]}]}
        broken["server"] = {"stall_warn_s": -1}
        write(path, broken)
        served.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (state := served.debug_config())["last_error"] is None:
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        assert state["generation"] == 1
        errors = state["last_error"]["errors"]
        assert len(errors) == 2, errors  # the negative number, the unknown upstream
        answer = httpx.post(
            f"{served.url}/v1/chat/completions", json={"model": "m", "messages": CHAT}, timeout=10
        )
        assert answer.status_code == 200
        scrape = httpx.get(f"{served.url}/metrics", timeout=5).text
        assert 'llm_gateway_config_reloads_total{outcome="error"} 1.0' in scrape
        write(path, good)  # fixed: the next reload clears the error
        served.process.send_signal(signal.SIGHUP)
        assert served.wait_generation(2)["last_error"] is None
    failures = [line for line in served.output.splitlines() if "config_reload_failed" in line]
    assert len(failures) == 1  # one line names every problem
    assert " ERROR " in failures[0]
    for error in errors:
        assert error in failures[0]


def test_watched_file_removing_an_upstream_lets_its_stream_finish(
    tmp_path: Path, simulator: Simulator
) -> None:
    path = tmp_path / "gateway.yaml"
    url = simulator.base_url
    write(path, config({"a": url, "b": url}, {"m": ("a", SLOW)}))
    results: dict[str, Any] = {}
    with serving(["--config", str(path), "--watch-config"], cwd=tmp_path) as served:
        before = threading.Thread(target=stream_lines, args=(served.url, "m", results, "old"))
        before.start()
        simulator.wait_for(lambda s: s["open"] == 1)
        write(path, config({"b": url}, {"m": ("b", "sim")}))  # a removed, m moved to b
        served.wait_generation(2, within_s=5)  # polled once a second
        stream_lines(served.url, "m", results, "new")
        before.join(timeout=15)
        assert served.debug_config()["config"][-1].strip() == "1. b -> sim"
    assert results["old_upstream"] == "a"
    assert results["old"][-1] == "data: [DONE]"
    assert len(results["old"]) >= 7  # every token of the removed upstream's stream
    assert results["new_upstream"] == "b"
    assert results["new"][-1] == "data: [DONE]"
    line = next(line for line in served.output.splitlines() if "config_reloaded" in line)
    assert "trigger=file_changed" in line
    assert "upstreams_removed=a" in line
    assert "upstreams_kept=b" in line


def test_watch_follows_a_configmap_symlink_swap(tmp_path: Path, simulator: Simulator) -> None:
    """Kubernetes mounts a ConfigMap as name -> ..data/name, ..data -> ..<timestamp>/, and an
    update swaps ..data: the file's own path never changes."""
    mount = tmp_path / "mount"
    first, second = mount / "..2026_01_01", mount / "..2026_01_02"
    first.mkdir(parents=True)
    second.mkdir()
    sims = {"sim": simulator.base_url}
    (first / "gateway.yaml").write_text(yaml.safe_dump(config(sims, {"m": ("sim", "sim")})))
    (second / "gateway.yaml").write_text(yaml.safe_dump(config(sims, {"n": ("sim", "sim")})))
    (mount / "..data").symlink_to(first.name)
    (mount / "gateway.yaml").symlink_to("..data/gateway.yaml")
    with serving(["--config", str(mount / "gateway.yaml"), "--watch-config"], cwd=tmp_path) as s:
        swap = mount / "..data_tmp"
        swap.symlink_to(second.name)
        os.replace(swap, mount / "..data")  # what the kubelet does, atomically
        s.wait_generation(2, within_s=5)
        models = httpx.get(f"{s.url}/v1/models", timeout=5).json()["data"]
        assert [model["id"] for model in models] == ["n"]


def test_reload_under_load_drops_nothing_and_leaks_no_connection(
    tmp_path: Path, simulator: Simulator
) -> None:
    """Requests run without pause while the config flips ten times: `kept` is defined the same
    each time (its pool stays), `flipped` changes (a new pool each time, the old one drained)."""
    with SocketCounter(simulator.port) as kept, SocketCounter(simulator.port) as flipped:
        path = tmp_path / "gateway.yaml"

        def version(cap: int) -> dict[str, Any]:
            data = config(
                {
                    "kept": f"http://127.0.0.1:{kept.port}/v1",
                    "flipped": f"http://127.0.0.1:{flipped.port}/v1",
                },
                {"k": ("kept", "sim@tokens=20,gap-ms=5"), "f": ("flipped", "sim@tokens=20")},
            )
            data["upstreams"][0]["max_connections"] = 4
            data["upstreams"][1]["max_connections"] = cap
            return data

        write(path, version(4))
        statuses: list[int | str] = []
        stop = threading.Event()
        with serving(["--config", str(path), "--log-level", "warning"], cwd=tmp_path) as served:

            def client(model: str, stream: bool) -> None:
                with httpx.Client(timeout=10) as http:
                    for _ in range(400):  # bounded, whatever happens
                        if stop.is_set():
                            return
                        body = {"model": model, "messages": CHAT, "stream": stream}
                        try:
                            answer = http.post(f"{served.url}/v1/chat/completions", json=body)
                            done = not stream or answer.text.rstrip().endswith("[DONE]")
                            statuses.append(answer.status_code if done else "cut")
                        except httpx.HTTPError as error:
                            statuses.append(type(error).__name__)

            threads = [
                threading.Thread(target=client, args=(model, stream))
                for model in ("k", "f")
                for stream in (True, False)
            ]
            for thread in threads:
                thread.start()
            for generation in range(2, 12):
                write(path, version(3 + generation % 2))
                served.process.send_signal(signal.SIGHUP)
                served.wait_generation(generation)
                time.sleep(0.1)
            stop.set()
            for thread in threads:
                thread.join(timeout=20)
            simulator.wait_for(lambda s: s["open"] == 0)
            time.sleep(0.5)  # the last drained pool closes
            assert kept.peak <= 4  # one pool all along, never over its cap
            assert flipped.total > 4  # pools were replaced...
            assert flipped.open <= 4  # ...and only the last one's sockets are left open
    assert len(statuses) > 40
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


def test_workers_each_reload_in_place(tmp_path: Path, simulator: Simulator) -> None:
    path = tmp_path / "gateway.yaml"
    sims = {"sim": simulator.base_url}
    write(path, config(sims, {"m": ("sim", "sim")}))
    with serving(["--config", str(path), "--workers", "2"], cwd=tmp_path) as served:
        before = _generations(served.url, count=2)
        assert set(before.values()) == {1}
        write(path, config(sims, {"m": ("sim", "sim"), "n": ("sim", "sim")}))
        served.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while set((after := _generations(served.url, count=2)).values()) != {2}:
            assert time.monotonic() < deadline, after
            time.sleep(0.1)
        assert after.keys() == before.keys()  # the same two workers: reloaded, not replaced
        for _ in range(6):  # whichever worker answers knows the new route
            answer = httpx.post(
                f"{served.url}/v1/chat/completions",
                json={"model": "n", "messages": CHAT},
                timeout=10,
                headers={"connection": "close"},
            )
            assert answer.status_code == 200
    assert "replac" not in served.output.lower().replace("reloads its config in place", "")


def _generations(url: str, count: int) -> dict[str, float]:
    """pid -> config generation, once `count` workers report one (a worker still starting
    reports 0: it has loaded nothing yet)."""
    deadline = time.monotonic() + 10
    pattern = re.compile(r'llm_gateway_config_generation\{pid="(\d+)"\} (\S+)')
    while True:
        found = dict(pattern.findall(httpx.get(f"{url}/metrics", timeout=5).text))
        loaded = {pid: float(value) for pid, value in found.items() if float(value) > 0}
        if len(loaded) >= count:
            return loaded
        assert time.monotonic() < deadline, found
        time.sleep(0.1)


def test_settings_that_need_a_restart_are_kept_and_named() -> None:
    def parsed(keepalive_s: float, idle_s: float) -> Any:
        data = config({"a": "http://a"}, {"m": ("a", "x")}, idle_s=idle_s)
        data["server"] = {"keepalive_s": keepalive_s}
        return parse_config(data, env={})

    applied, named = keep_restart_only(parsed(5, 30), parsed(9, 3))
    assert named == ["server.keepalive_s"]
    assert applied.server.keepalive_s == 5  # kept
    assert applied.routes[0].budget.idle_s == 3  # applied


@pytest.mark.parametrize("signal_name", ["SIGHUP"])
def test_demo_survives_sighup(tmp_path: Path, signal_name: str) -> None:
    """Without a config file there is nothing to reload, and the signal does not end it."""
    with serving([], cwd=tmp_path) as served:
        served.process.send_signal(getattr(signal, signal_name))
        time.sleep(0.5)
        assert served.process.poll() is None
        assert httpx.get(f"{served.url}/readyz", timeout=5).status_code == 200
