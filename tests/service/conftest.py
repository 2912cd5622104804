from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.settings import Settings
from tests.prom import sample_sum
from tests.redis_server import RedisServer, shared_or_private
from tests.waiting import wait_for


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = shared_or_private()
    yield server
    server.stop()


def wait_ready(client: TestClient, timeout: float = 120.0) -> dict:
    def ready() -> dict | None:
        r = client.get("/readyz")
        return r.json() if r.status_code == 200 else None

    return wait_for(ready, timeout, "/readyz to answer 200")


def make_settings(artifacts: Path, redis_url: str, **overrides: object) -> Settings:
    base: dict[str, object] = {"artifact_dir": artifacts, "redis_url": redis_url, "device": "cpu",
                               "max_wait_ms": 2.0}
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def client(artifacts: Path, redis_server: RedisServer) -> Iterator[TestClient]:
    app = create_app(make_settings(artifacts, redis_server.url))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def metric(client: TestClient, name: str, labels: str = "") -> float:
    """The sum of a metric's samples whose labels include ``labels`` (every model's); 0 when absent."""
    return sample_sum(client.get("/metrics").text, name, labels)
