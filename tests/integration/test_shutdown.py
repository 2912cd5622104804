"""Bounded shutdown: SIGTERM while a reference basis is being built for a checkpoint without one, on a CPU that
other processes saturate.

Before: the API had not exited 20 s after SIGTERM (the basis build ran to its end on a non-daemon thread, and
uvicorn waited for the request); later, under load, uvicorn's own graceful deadline cancelled the request before
the service's drain deadline answered it (a 500). Now: no new work is admitted, in-flight work gets
``shutdown_timeout_s``, then every request still waiting is answered 503 at once (the running chunk is not waited
for), and the process exits. Ten rounds in CI (two at a time), each a fresh process, with every core busy; every
one must pass. ``RESIDUAL_SHUTDOWN_ROUNDS`` sets the count (20 and more for the long form).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from residual.tiny import tasks
from tests.processes import api_server, variant_checkpoint
from tests.prom import sample_sum
from tests.redis_server import start_private
from tests.service.conftest import png_b64
from tests.waiting import wait_for

GRACE_S = 2
ROUNDS = int(os.environ.get("RESIDUAL_SHUTDOWN_ROUNDS", "10"))


def _metric(client: httpx.Client, name: str) -> float:
    return sample_sum(client.get("/metrics").text, name)


@pytest.fixture(scope="module")
def burners() -> Iterator[None]:
    """One busy process per core for the whole test: the drain must not depend on an idle machine."""
    cores = len(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_sigterm_during_a_basis_build_answers_503_and_exits_in_time(tmp_path: Path, burners: None) -> None:
    redis_server = start_private()
    weights = variant_checkpoint(tmp_path / "variant.safetensors")
    try:
        # two rounds at a time, each its own API process: the CPU stays saturated (burners and the other round's
        # start-up), and 20 rounds fit in CI (a process start is most of a round)
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(lambda i: _round(redis_server.url, tmp_path / f"artifacts-{i}", weights),
                                     range(ROUNDS)))
    finally:
        redis_server.stop()
    print("shutdown rounds:", outcomes)  # noqa: T201 - with -s: the exit times behind the closing figures
    assert all(o["status"] == 503 for o in outcomes), outcomes
    assert all(o["type"] in ("backend_unavailable", "shutting_down") for o in outcomes), outcomes
    assert max(o["exited_s"] for o in outcomes) < GRACE_S + 10, outcomes


def _round(redis_url: str, artifacts: Path, weights: Path) -> dict[str, object]:
    labels = {"classes": list(tasks.TASKS["colour"].classes)}
    image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    with api_server(redis_url, artifacts, model_weights=str(weights), shutdown_timeout_s=str(GRACE_S),
                    reference_basis="world") as (client, proc):
        assert client.post("/classify", json={"images": [image], "label_set": labels}).status_code == 200
        answers: dict[str, httpx.Response | Exception] = {}

        def heads() -> None:  # 10,000 world images: minutes on these cores, far beyond the grace period
            try:
                answers["heads"] = client.get("/heads")
            except httpx.HTTPError as exc:
                answers["heads"] = exc

        thread = threading.Thread(target=heads)
        thread.start()
        wait_for(lambda: _metric(client, "residual_reference_basis_images_total") > 0, 120,
                 "the reference basis build to start")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=GRACE_S + 60)
        exited = time.monotonic() - sent
        thread.join(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    answer = answers["heads"]
    assert isinstance(answer, httpx.Response), answer  # an answer, not a cut connection
    return {"status": answer.status_code, "type": answer.json().get("error", {}).get("type"),
            "exited_s": round(exited, 2)}
