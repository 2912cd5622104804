from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.main import create_app
from tests.service.conftest import make_settings, wait_ready

API, ADMIN = "api-key-123", "admin-key-456"


@pytest.fixture(scope="module")
def secured(artifacts: Path, redis_server) -> Iterator[TestClient]:
    settings = make_settings(artifacts, redis_server.url, api_key=API, admin_api_key=ADMIN)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def _protected_operations(client: TestClient) -> list[tuple[str, str]]:
    ops = []
    for path, item in client.get("/openapi.json").json()["paths"].items():
        for method in item:
            if path not in ("/livez", "/readyz", "/metrics"):
                ops.append((method.upper(), path.replace("{", "").replace("}", "")))
    return ops


def test_every_protected_route_answers_401_without_a_key(secured: TestClient) -> None:
    ops = _protected_operations(secured)
    assert len(ops) >= 10
    for method, path in ops:
        r = secured.request(method, path, json={})
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.json()["error"]["type"] == "unauthorized"
        r = secured.request(method, path, json={}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, (method, path)


def test_classification_key_is_refused_on_admin_routes(secured: TestClient) -> None:
    auth = {"Authorization": f"Bearer {API}"}
    r = secured.post("/label-sets", json={"classes": ["a", "b"]}, headers=auth)
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "forbidden"
    assert secured.post("/fit-alignment", json={}, headers=auth).status_code == 403
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert secured.post("/label-sets", json={"classes": ["a", "b"]}, headers=admin).status_code == 201
    r = secured.post("/classify", json={"images": [], "label_set": {"classes": ["a"]}}, headers=auth)
    assert r.status_code == 422  # authenticated, then validated


def test_health_is_open_and_reports_auth(secured: TestClient) -> None:
    assert secured.get("/livez").status_code == 200
    assert secured.get("/readyz").json()["auth"] == "enabled"
    assert secured.get("/metrics").status_code == 200


def test_settings_repr_hides_keys(secured: TestClient) -> None:
    settings = secured.app.state.runtime.settings
    assert API not in repr(settings) and ADMIN not in repr(settings)
