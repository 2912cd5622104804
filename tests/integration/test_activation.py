"""A finished fit activates its result only if the name's ACTIVE has not changed since the job was submitted.

Deterministic: the worker runs in burst mode after the rollback, so the rollback lands while the fit is pending,
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

from service.main import create_app
from tests.redis_server import RedisServer, start_private
from tests.service.conftest import make_settings, wait_ready

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
    subprocess.run([sys.executable, "-m", "service.worker", "--burst", "--log-level", "warning"], cwd=ROOT, env=env,
                   check=True, timeout=600)


def test_rollback_during_a_fit_is_kept(redis_jobs: RedisServer, tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, redis_jobs.url))) as api:
        wait_ready(api)
        first = [api.post("/fit-alignment", json={"name": "roll", **SMALL,
                                                  "hyperparameters": {"epochs": 2, "seed": seed}}).json()["job_id"]
                 for seed in (1, 2)]
        run_worker_burst(redis_jobs.url, tmp_path)
        v1, v2 = (api.get(f"/fit-alignment/{j}").json()["coefficients"].split("@")[1] for j in first)
        assert v1 != v2 and api.get("/coefficients/roll").json()["active"] == v2

        during = api.post("/fit-alignment", json={"name": "roll", **SMALL,
                                                  "hyperparameters": {"epochs": 2, "seed": 3}}).json()["job_id"]
        manual = api.post("/fit-alignment", json={"name": "roll", **SMALL, "activate": False,
                                                  "hyperparameters": {"epochs": 2, "seed": 4}}).json()["job_id"]
        assert api.post("/coefficients/roll/activate", json={"version": v1}).json()["active"] == v1  # rollback
        run_worker_burst(redis_jobs.url, tmp_path)

        done = api.get(f"/fit-alignment/{during}").json()
        assert done["status"] == "succeeded", done
        assert done["activated"] is False and v2 in done["activation"] and v1 in done["activation"]
        kept = api.get(f"/fit-alignment/{manual}").json()
        assert kept["status"] == "succeeded" and kept["activated"] is False
        assert "not requested" in kept["activation"]
        listing = api.get("/coefficients/roll").json()
        assert listing["active"] == v1  # the rollback survived both fits
        new = done["coefficients"].split("@")[1]
        assert new in [v["version"] for v in listing["versions"]]  # the result is stored, only not active

        after = api.post("/fit-alignment", json={"name": "roll", **SMALL,
                                                 "hyperparameters": {"epochs": 2, "seed": 5}}).json()["job_id"]
        run_worker_burst(redis_jobs.url, tmp_path)
        done = api.get(f"/fit-alignment/{after}").json()
        assert done["activated"] is True
        assert api.get("/coefficients/roll").json()["active"] == done["coefficients"].split("@")[1]
