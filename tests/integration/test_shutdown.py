"""Bounded shutdown: SIGTERM while a reference basis is being built for a checkpoint without one.

Before: the API had not exited 20 s after SIGTERM (the basis build ran to its end on a non-daemon thread, and
uvicorn waited for the request). Now: no new work is admitted, in-flight work gets ``shutdown_timeout_s``, what is
left answers 503, and the process exits.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from residual.tiny import tasks
from tests.processes import api_server, variant_checkpoint
from tests.redis_server import start_private
from tests.service.conftest import png_b64
from tests.waiting import wait_for

GRACE_S = 3


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_sigterm_during_a_basis_build_fails_it_and_exits_in_time(tmp_path: Path) -> None:
    redis_server = start_private()
    try:
        _run(redis_server.url, tmp_path)
    finally:
        redis_server.stop()


def _run(redis_url: str, tmp_path: Path) -> None:
    weights = variant_checkpoint(tmp_path / "variant.safetensors")
    labels = {"classes": list(tasks.TASKS["colour"].classes)}
    image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    with api_server(redis_url, tmp_path / "artifacts", model_weights=str(weights),
                    shutdown_timeout_s=str(GRACE_S), reference_basis="world") as (client, proc):
        assert client.post("/classify", json={"images": [image], "label_set": labels}).status_code == 200
        answers: dict[str, httpx.Response | Exception] = {}

        def heads() -> None:  # 10,000 world images: minutes on these cores, far beyond the grace period
            try:
                answers["heads"] = client.get("/heads")
            except httpx.HTTPError as exc:
                answers["heads"] = exc

        thread = threading.Thread(target=heads)
        thread.start()
        wait_for(lambda: _metric(client, "residual_reference_basis_images_total") > 0, 60,
                 "the reference basis build to start")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=GRACE_S + 30)
        exited = time.monotonic() - sent
        thread.join(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    assert exited < GRACE_S + 10, f"exited {exited:.1f}s after SIGTERM"
    answer = answers["heads"]
    assert isinstance(answer, httpx.Response), answer  # an answer, not a cut connection
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["type"] in ("backend_unavailable", "shutting_down")
