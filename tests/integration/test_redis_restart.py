"""Redis restarted while a fit runs (reliability.md F1/E): nothing is lost and nothing needs a restart.

The queue Redis persists with AOF (as deploy/ configures it). While a worker (a real subprocess) is fitting,
Redis stops: the API answers job routes with 503 and keeps classifying; Redis comes back on the same port and
data folder; the job then finishes as ``succeeded`` with its coefficient set served, and new jobs are accepted,
without restarting the API or the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from residual.tiny import tasks
from service.api.app import create_app
from tests.integration.test_jobs import start_worker, wait_status
from tests.redis_server import RedisServer, start_private
from tests.service.conftest import make_settings, png_b64, wait_ready
from tests.waiting import wait_for

AOF = ("--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    server = start_private(None, *AOF)
    yield server
    server.stop()


def test_redis_restart_during_a_fit_loses_nothing(persistent_redis: RedisServer, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    worker = start_worker(persistent_redis.url, artifacts)
    try:
        with TestClient(create_app(make_settings(artifacts, persistent_redis.url, redis_retry_s=0.2))) as api:
            wait_ready(api)
            r = api.post("/fit-alignment", json={"name": "survivor", "dataset": "world:colour", "variant": "fine",
                                                 "world_sizes": {"train": 1000, "val": 200, "test": 200},
                                                 "hyperparameters": {"epochs": 200, "patience": 200}})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            wait_status(api, job_id, {"running"}, phase="fitting")

            assert persistent_redis.process is not None
            persistent_redis.process.terminate()  # SIGTERM: Redis flushes the AOF and exits
            persistent_redis.process.wait(timeout=30)
            down = api.get(f"/fit-alignment/{job_id}")
            assert down.status_code == 503 and down.json()["error"]["type"] == "backend_unavailable"
            image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
            labels = {"classes": list(tasks.TASKS["colour"].classes)}
            assert api.post("/classify", json={"images": [image], "label_set": labels}).status_code == 200

            port = int(persistent_redis.url.rsplit(":", 1)[1].split("/")[0])
            restarted = start_private(port, *AOF, workdir=persistent_redis.workdir)
            persistent_redis.process = restarted.process  # the fixture stops the new one
            wait_for(lambda: api.get(f"/fit-alignment/{job_id}").status_code == 200, 30,
                     "the API to reach the restarted Redis")
            done = wait_status(api, job_id, {"succeeded", "failed", "cancelled"}, timeout=300)
            assert done["status"] == "succeeded", done
            r = api.post("/classify", json={"images": [image], "coefficients": "survivor"})
            assert r.status_code == 200 and r.json()["coefficients"] == done["coefficients"]
            again = api.post("/fit-alignment", json={"name": "after", "dataset": "world:colour", "variant": "coarse",
                                                     "world_sizes": {"train": 100, "val": 20, "test": 20},
                                                     "hyperparameters": {"epochs": 1}})
            assert again.status_code == 202
            assert wait_status(api, again.json()["job_id"], {"succeeded", "failed"})["status"] == "succeeded"
    finally:
        worker.kill()
        worker.wait(timeout=30)
