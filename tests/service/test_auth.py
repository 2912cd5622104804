"""Auth scopes, parametrised over the OpenAPI schema: every operation is open (health), API-key (classify and
reads), or admin (everything that enqueues work or stores data, and reading jobs). A new route must be placed in
one of the tables below or this test fails."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.app import create_app
from service.settings import Settings
from tests.service.conftest import make_settings, wait_ready

API, ADMIN = "api-key-0123456789abcdef", "admin-key-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]

OPEN = {("GET", "/livez"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v2"), ("GET", "/v2/health/live"),
        ("GET", "/v2/health/ready")}
API_SCOPE = {  # classification and reads that neither enqueue work nor store data
    ("POST", "/classify"), ("GET", "/label-sets/{label_set_id}"), ("GET", "/coefficients"),
    ("GET", "/coefficients/{name}"), ("GET", "/heads"), ("GET", "/heads/spectrum.png"),
    ("GET", "/heads/{layer}/{head}"), ("GET", "/heads/{layer}/{head}/spectrum.png"), ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"), ("GET", "/bases"), ("GET", "/bases/{basis}"), ("GET", "/bases/{a}/compare/{b}"),
    ("GET", "/bases/{a}/compare/{b}.png"), ("GET", "/drift"), ("GET", "/drift.png"), ("GET", "/v2/models/{model}"),
    ("GET", "/v2/models/{model}/ready"), ("POST", "/v2/models/{model}/infer")}
ADMIN_SCOPE = {
    ("POST", "/label-sets"), ("POST", "/fit-alignment"), ("GET", "/fit-alignment"),
    ("GET", "/fit-alignment/{job_id}"), ("DELETE", "/fit-alignment/{job_id}"), ("POST", "/datasets"),
    ("GET", "/datasets/{dataset_id}"), ("POST", "/coefficients/{name}/activate"), ("POST", "/heads/alignment"),
    ("POST", "/heads/alignment.png"), ("GET", "/heads/alignment/{job_id}"), ("GET", "/heads/alignment/{job_id}.png"),
    ("POST", "/bases"), ("GET", "/bases/jobs/{job_id}"), ("DELETE", "/bases/jobs/{job_id}"),
    ("DELETE", "/heads/alignment/{job_id}"), ("POST", "/label-sets/diagnose")}
_PARAMS = {"label_set_id": "ls-" + "0" * 20, "name": "nope", "job_id": "0", "dataset_id": "ds-" + "0" * 20,
           "layer": "0", "head": "0", "basis": "b-" + "0" * 16, "a": "b-" + "0" * 16, "b": "b-" + "1" * 16,
           "model": "residual-tiny"}


def _schema_operations() -> list[tuple[str, str]]:
    schema = create_app(Settings(artifact_dir=Path("/nonexistent"))).openapi()  # no lifespan: nothing loads
    return sorted((m.upper(), p) for p, item in schema["paths"].items() for m in item)


OPERATIONS = _schema_operations()


def test_every_operation_has_a_declared_scope() -> None:
    assert set(OPERATIONS) == OPEN | API_SCOPE | ADMIN_SCOPE
    assert not (API_SCOPE & ADMIN_SCOPE)


@pytest.fixture(scope="module")
def secured(artifacts: Path, redis_server) -> Iterator[TestClient]:
    settings = make_settings(artifacts, redis_server.url, api_key=API, admin_api_key=ADMIN)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def _url(path: str) -> str:
    for k, v in _PARAMS.items():
        path = path.replace("{" + k + "}", v)
    return path


@pytest.mark.parametrize(("method", "path"), [op for op in OPERATIONS if op not in OPEN])
def test_scopes(secured: TestClient, method: str, path: str) -> None:
    url = _url(path)
    r = secured.request(method, url, json={})
    _refused(r, 401, "unauthorized", path)
    assert r.headers["www-authenticate"] == "Bearer"
    r = secured.request(method, url, json={}, headers={"Authorization": "Bearer wrong-key-0123456789"})
    assert r.status_code == 401
    r = secured.request(method, url, json={}, headers={"Authorization": f"Bearer {API}"})
    if (method, path) in ADMIN_SCOPE:
        _refused(r, 403, "forbidden", path)
    else:
        assert r.status_code not in (401, 403), r.text
    r = secured.request(method, url, json={}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code not in (401, 403), r.text


def _refused(r: Any, status: int, kind: str, path: str) -> None:
    """The refusal with its error body: ours, or under /v2 the Open Inference Protocol's ``{"error": "..."}``."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if path.startswith("/v2/"):
        assert isinstance(error, str) and "key" in error, r.text
    else:
        assert error["type"] == kind, r.text


def test_the_classification_key_can_neither_enqueue_nor_store(secured: TestClient, artifacts: Path) -> None:
    auth = {"Authorization": f"Bearer {API}"}
    before = sorted(p.relative_to(artifacts) for p in artifacts.rglob("*"))
    body = {"dataset": {"images": ["aGVsbG8="] * 3, "labels": ["a", "b", "a"]}, "label_set": {"classes": ["a", "b"]}}
    assert secured.post("/heads/alignment", json=body, headers=auth).status_code == 403
    assert secured.post("/label-sets", json={"classes": ["a", "b"]}, headers=auth).status_code == 403
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
    r = secured.post("/classify", json={"images": [png], "label_set": {"classes": ["fresh-a", "fresh-b"]}},
                     headers=auth)
    assert r.status_code == 200  # classify computes the label-set id but stores nothing
    assert sorted(p.relative_to(artifacts) for p in artifacts.rglob("*")) == before
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert secured.post("/label-sets", json={"classes": ["a", "b"]}, headers=admin).status_code == 201


def test_a_wrong_scheme_or_an_empty_key_is_named(secured: TestClient) -> None:
    r = secured.get("/coefficients", headers={"Authorization": f"Basic {API}"})
    assert r.status_code == 401
    assert r.json()["error"]["message"] == ("the Authorization header must use the Bearer scheme "
                                            "('Authorization: Bearer <key>'), not 'Basic'")
    r = secured.get("/coefficients", headers={"Authorization": "Bearer   "})
    assert r.status_code == 401 and r.json()["error"]["message"] == "the Authorization header has no key after 'Bearer'"
    r = secured.get("/coefficients")
    assert r.json()["error"]["message"] == "missing 'Authorization: Bearer <key>' header"


@pytest.mark.parametrize(("method", "path"), [op for op in sorted(ADMIN_SCOPE | API_SCOPE) if op[0] == "POST"])
def test_a_refused_request_is_answered_before_its_body_is_read(secured: TestClient, method: str, path: str) -> None:
    """A body that would be refused for its content (415/422) if it were read: the 401 comes first (on a real
    server the connection then closes: tests/integration/test_hostile_clients.py)."""
    r = secured.request(method, _url(path), content=b"\x00not json" * 100, headers={"content-type": "text/plain"})
    assert r.status_code == 401, r.text
    r = secured.request(method, _url(path), content=b"{}", headers={"content-type": "application/json",
                                                                     "Authorization": f"Bearer {API}x"})
    error = r.json()["error"]
    assert r.status_code == 401 and (error if path.startswith("/v2/") else error["message"]) == "invalid API key"


@pytest.mark.parametrize(("method", "path"), sorted(op for op in ADMIN_SCOPE | API_SCOPE if op[0] == "POST"))
def test_the_middleware_refuses_without_reading_the_body(method: str, path: str) -> None:
    """At the ASGI level, before any route runs: a request without a valid key is answered 401 without one call to
    receive() (the body is never read), and with `connection: close` since it announced a body."""
    import asyncio

    app = create_app(Settings(artifact_dir=Path("/nonexistent"), api_key=API, admin_api_key=ADMIN))
    sent: list[dict] = []

    async def receive() -> dict:
        raise AssertionError("the body was read")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": _url(path), "raw_path": _url(path).encode(),
             "query_string": b"", "root_path": "", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
             "http_version": "1.1", "asgi": {"version": "3.0"},
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"16777216")]}
    asyncio.run(app.build_middleware_stack()(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 401 and (b"connection", b"close") in start["headers"]


def test_health_is_open_and_reports_auth(secured: TestClient) -> None:
    assert secured.get("/livez").status_code == 200
    assert secured.get("/readyz").json()["auth"] == "enabled"
    assert secured.get("/metrics").status_code == 200


def test_settings_repr_hides_keys(secured: TestClient) -> None:
    settings = secured.app.state.runtime.settings
    assert API not in repr(settings) and ADMIN not in repr(settings)


@pytest.mark.parametrize("key", ["change-me-api", "change-me-admin-0123456789", "short-key",
                                 "my-secret-key-0123456789"])
def test_placeholder_or_short_keys_are_refused(key: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(api_key=key)
    assert key not in str(info.value)
    with pytest.raises(ValidationError):
        Settings(admin_api_key=key)


def test_the_server_refuses_to_start_with_a_placeholder_key(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "RESIDUAL_ADMIN_API_KEY": "change-me-admin",
           "RESIDUAL_ARTIFACT_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "service.api.server", "--port", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [  # one line that names the setting, never a traceback
        "residual-serve: invalid setting RESIDUAL_ADMIN_API_KEY: Value error, API keys must have at least 16 "
        "characters (this one has 15); generate one with `openssl rand -hex 32`"]
    assert "change-me-admin" not in done.stderr
