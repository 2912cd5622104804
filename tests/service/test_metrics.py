"""The metrics contract: the README's table and what the API and the worker export are the same set of names; no
``*_created`` series; every series of request durations carries a bounded route label (static files: their mount)."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest

ROOT = Path(__file__).resolve().parents[2]


def _readme_metrics() -> dict[str, str]:
    """metric name -> process (API or worker), from the README's metrics table."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Metrics") : text.index("## Python client")]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(residual_[a-z_0-9]+)` \| (API|worker) \|", section,
                                                         re.M)}


def _families(exposition: str) -> set[str]:
    return {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE residual_")}


def test_readme_lists_exactly_the_exported_metrics(client: TestClient) -> None:
    import service.jobs.metrics  # noqa: F401 - registers the worker's metrics in the default registry

    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
    assert client.post("/classify", json={"images": [png], "label_set": {"classes": ["a", "b"]}}).status_code == 200
    api = client.get("/metrics").text
    worker = generate_latest(REGISTRY).decode()
    documented = _readme_metrics()
    assert {n for n, p in documented.items() if p == "API"} == _families(api)
    assert {n for n, p in documented.items() if p == "worker"} == _families(worker)
    assert "_created" not in api and "_created" not in worker


def test_static_files_are_labelled_by_their_mount(client: TestClient) -> None:
    assert client.get("/playground/playground.js").status_code == 200
    assert client.get("/playground/no-such-file.js").status_code == 404
    routes = set(re.findall(r'residual_http_request_duration_seconds_count\{route="([^"]+)"', client.get(
        "/metrics").text))
    assert "/playground" in routes
    assert not any(r.startswith("/playground/") for r in routes)
    assert routes <= {getattr(r, "path", "") for r in client.app.state.routes} | {"unmatched"}
