"""Demo traffic for the compose stack: a few threads per route of deploy/gateway.yaml, forever.

Standard library only, so it runs in the gateway image (`python /loadgen.py`). Each worker sends
one chat completion after another for its model, streaming or not, some with a client deadline
(`X-Request-Timeout-Ms`), and logs a summary of the answers every 30 s. GATEWAY_URL (default
http://gateway:8080) says where the gateway is.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

URL = os.environ.get("GATEWAY_URL", "http://gateway:8080").rstrip("/")

# model -> (workers, pause between its requests in seconds)
PLAN: dict[str, tuple[int, float]] = {
    "demo": (3, 0.2),
    "demo-slow-first-token": (1, 1.0),
    "demo-stall": (1, 1.0),
    "demo-hang": (1, 2.0),
    "demo-hedge": (1, 0.5),
    "demo-fallback": (1, 1.0),
    "demo-overloaded": (1, 2.0),
    "demo-busy": (7, 1.0),  # more than the 2 connections + 4 queued of its upstream: shed
    "demo-down": (1, 1.0),
    "no-such-model": (1, 10.0),  # 404 model_not_found
}

log = logging.getLogger("loadgen")
answers: Counter[str] = Counter()
answers_lock = threading.Lock()


def one_request(model: str) -> str:
    stream = random.random() < 0.5
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"content-type": "application/json"}
    if random.random() < 0.3:
        headers["X-Request-Timeout-Ms"] = "10000"  # the client's own, tighter budget
    request = urllib.request.Request(
        f"{URL}/v1/chat/completions", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return str(response.status)
    except urllib.error.HTTPError as error:
        error.read()
        return str(error.code)
    except (OSError, TimeoutError) as error:  # gateway not up yet, or restarting
        time.sleep(1)
        return type(error).__name__


def worker(model: str, pause: float) -> None:
    time.sleep(random.random() * 2)  # spread the start
    while True:
        outcome = one_request(model)
        with answers_lock:
            answers[f"{model} {outcome}"] += 1
        time.sleep(pause * random.uniform(0.5, 1.5))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s loadgen %(message)s")
    log.info("sending demo traffic to %s", URL)
    for model, (workers, pause) in PLAN.items():
        for _ in range(workers):
            threading.Thread(target=worker, args=(model, pause), daemon=True).start()
    while True:
        time.sleep(30)
        with answers_lock:
            summary = ", ".join(f"{key}: {count}" for key, count in sorted(answers.items()))
            answers.clear()
        log.info("last 30 s: %s", summary or "nothing answered")


if __name__ == "__main__":
    main()
