"""Worker lifecycle (reliability.md E2-E4), each with a real worker subprocess and a private Redis:

- SIGTERM during a fit (a rolling deploy): the worker finishes the job, then exits (RQ warm shutdown);
- a fit longer than ``job_timeout_s`` fails with a timeout reason and the worker takes the next job;
- the same fit submitted twice runs twice but produces one coefficient-set version (content hash).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.integration.test_jobs import start_worker, wait_status
from tests.redis_server import RedisServer, start_private
from tests.service.conftest import make_settings, wait_ready

LONG = {"dataset": "world:colour", "variant": "fine", "world_sizes": {"train": 1000, "val": 200, "test": 200},
        "hyperparameters": {"epochs": 200, "patience": 200}}
SMALL = {"dataset": "world:colour", "variant": "coarse", "world_sizes": {"train": 100, "val": 20, "test": 20},
         "hyperparameters": {"epochs": 2}}


@pytest.fixture
def redis_private() -> Iterator[RedisServer]:
    server = start_private()
    yield server
    server.stop()


def test_sigterm_lets_the_running_fit_finish(redis_private: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_private.url, tmp_path)
    try:
        with TestClient(create_app(make_settings(tmp_path, redis_private.url))) as api:
            wait_ready(api)
            job = api.post("/fit-alignment", json={"name": "drain", **LONG}).json()["job_id"]
            wait_status(api, job, {"running"}, phase="fitting")
            worker.send_signal(signal.SIGTERM)
            done = wait_status(api, job, {"succeeded", "failed", "cancelled"}, timeout=300)
            assert done["status"] == "succeeded", done
            assert worker.wait(timeout=60) == 0  # and then it left
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)


def test_a_fit_over_the_job_timeout_fails_and_the_next_job_runs(redis_private: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_private.url, tmp_path)
    try:
        with TestClient(create_app(make_settings(tmp_path, redis_private.url, job_timeout_s=3))) as api:
            wait_ready(api)
            slow = api.post("/fit-alignment", json={"name": "too-slow", **LONG}).json()["job_id"]
            done = wait_status(api, slow, {"succeeded", "failed", "cancelled"}, timeout=300)
            assert done["status"] == "failed", done
            assert "timeout" in done["error"].lower(), done["error"]
            quick = api.post("/fit-alignment", json={"name": "after-timeout", **SMALL,
                                                     "world_sizes": {"train": 40, "val": 14, "test": 14}})
            assert wait_status(api, quick.json()["job_id"], {"succeeded", "failed"})["status"] == "succeeded"
    finally:
        worker.kill()
        worker.wait(timeout=30)


def test_the_same_fit_twice_gives_one_version(redis_private: RedisServer, tmp_path: Path) -> None:
    worker = start_worker(redis_private.url, tmp_path)
    try:
        with TestClient(create_app(make_settings(tmp_path, redis_private.url))) as api:
            wait_ready(api)
            refs = []
            for _ in range(2):
                job = api.post("/fit-alignment", json={"name": "twice", **SMALL}).json()["job_id"]
                done = wait_status(api, job, {"succeeded", "failed"})
                assert done["status"] == "succeeded", done
                refs.append(done["coefficients"])
            assert refs[0] == refs[1]
            versions = api.get("/coefficients/twice").json()["versions"]
            assert [v["version"] for v in versions] == [refs[0].split("@")[1]]
    finally:
        worker.kill()
        worker.wait(timeout=30)
