"""Drift without Redis: the answer holds this replica's own figures and says so."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from residual.tiny import tasks
from service.api.app import create_app
from tests.redis_server import free_port
from tests.service.conftest import make_settings, png_b64, wait_ready


def test_with_redis_down_drift_answers_for_this_replica(tmp_path: Path) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = make_settings(tmp_path, down, drift_sample=1.0, drift_flush_s=0.5)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        images = [png_b64(a) for a in tasks.task_images("colour", "test", n=8)[0]]
        r = c.post("/classify", json={"images": images, "label_set": {"classes": ["red", "blue"]}})
        assert r.status_code == 200, r.text
        d = c.get("/drift", params={"describe": 0}).json()
        assert d["note"] == "Redis is unavailable: this replica's own traffic only"
        assert d["n_images"] == 8 and d["replicas"] == 1
        assert c.get("/readyz").json()["redis"] == "down"
