"""A finished fit activates its result only if the name's ACTIVE has not changed since the job started.

The rollback lands while a long fit runs (its progress says it is fitting, after it recorded the active version),
the window in which an unconditional activation would silently undo it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.processes import worker_process
from tests.redis_server import RedisServer, start_private
from tests.service.conftest import make_settings, wait_ready
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"dataset": "world:texture", "variant": "coarse", "world_sizes": {"train": 120, "val": 40, "test": 20},
         "hyperparameters": {"epochs": 2, "patience": 2}}


@pytest.fixture(scope="module")
def redis_jobs() -> Iterator[RedisServer]:
    server = start_private()
    yield server
    server.stop()


def run_worker_burst(redis_url: str, artifacts: Path) -> None:
    """A worker that takes every queued job and exits."""
    env = dict(os.environ, RESIDUAL_REDIS_URL=redis_url, RESIDUAL_ARTIFACT_DIR=str(artifacts), RESIDUAL_DEVICE="cpu",
               HF_HUB_OFFLINE="1", RESIDUAL_WORKER_METRICS_PORT="0")
    subprocess.run([sys.executable, "-m", "service.jobs.worker", "--burst", "--log-level", "warning"], cwd=ROOT,
                   env=env, check=True, timeout=600)


def _wait(api: TestClient, job_id: str, done: bool = True, phase: str | None = None) -> dict:
    def reached() -> dict | None:
        body = api.get(f"/fit-alignment/{job_id}").json()
        if done:
            return body if body["status"] in ("succeeded", "failed", "cancelled") else None
        return body if body["status"] == "running" and body["progress"].get("phase") == phase else None

    return wait_for(reached, 600, f"job {job_id}", interval=0.1)


def test_rollback_during_a_fit_is_kept(redis_jobs: RedisServer, tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, redis_jobs.url))) as api:
        wait_ready(api)
        first = [api.post("/fit-alignment", json={"name": "roll", **SMALL,
                                                  "hyperparameters": {"epochs": 2, "seed": seed}}).json()["job_id"]
                 for seed in (1, 2)]
        run_worker_burst(redis_jobs.url, tmp_path)  # queued together: each activates (ACTIVE unchanged during it)
        done = [api.get(f"/fit-alignment/{j}").json() for j in first]
        assert [d["activated"] for d in done] == [True, True], done
        v1, v2 = (d["coefficients"].split("@")[1] for d in done)
        assert v1 != v2 and api.get("/coefficients/roll").json()["active"] == v2

        worker = worker_process(redis_jobs.url, tmp_path)
        try:
            long = {"name": "roll", "dataset": "world:texture", "variant": "full",
                    "world_sizes": {"train": 500, "val": 100, "test": 20},  # few images, many epochs: seconds
                    "hyperparameters": {"epochs": 150, "patience": 150, "seed": 3}}  # of fitting to roll back in
            during = api.post("/fit-alignment", json=long).json()["job_id"]
            running = _wait(api, during, done=False, phase="fitting")
            assert running["progress"]["active_at_start"] == v2
            assert api.post("/coefficients/roll/activate", json={"version": v1}).json()["active"] == v1  # rollback
            finished = _wait(api, during)
            assert finished["status"] == "succeeded", finished
            assert finished["activated"] is False
            assert v2 in finished["activation"] and v1 in finished["activation"]
            listing = api.get("/coefficients/roll").json()
            assert listing["active"] == v1  # the rollback survived the fit
            new = finished["coefficients"].split("@")[1]
            assert new in [v["version"] for v in listing["versions"]]  # the result is stored, only not active

            manual = api.post("/fit-alignment", json={"name": "roll", **SMALL, "activate": False,
                                                      "hyperparameters": {"epochs": 2, "seed": 4}}).json()["job_id"]
            kept = _wait(api, manual)
            assert kept["status"] == "succeeded" and kept["activated"] is False
            assert "not requested" in kept["activation"]
            assert api.get("/coefficients/roll").json()["active"] == v1

            after = api.post("/fit-alignment", json={"name": "roll", **SMALL,
                                                     "hyperparameters": {"epochs": 2, "seed": 5}}).json()["job_id"]
            done_after = _wait(api, after)
            assert done_after["activated"] is True
            assert api.get("/coefficients/roll").json()["active"] == done_after["coefficients"].split("@")[1]
        finally:
            worker.kill()
            worker.wait(timeout=30)
