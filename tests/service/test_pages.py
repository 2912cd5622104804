"""The pages the API serves: the playground and its assets, and /docs and /redoc without any CDN.

The browser walk-through is ``tests/browser/test_playground.py``; these check what is served, byte for byte.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import fastapi_offline
from fastapi.testclient import TestClient

from residual.tiny import tasks
from service.api.routes.playground import STATIC_DIR

_REMOTE = re.compile(r"""(?:src|href)=["']?(?:https?:)?//""", re.I)


def test_the_playground_page_carries_its_config_and_a_strict_csp(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-eval" not in csp
    blob = re.search(r'<script id="config" type="application/json">(.*?)</script>', r.text, re.S)
    assert blob is not None
    config = json.loads(blob.group(1))
    ready = client.get("/readyz").json()
    assert config["model"] == ready["model"] and config["weights_id"] == ready["weights_id"]
    assert config["auth"] == "open" and set(config["world_tasks"]) == set(tasks.TASKS)
    assert config["world_tasks"]["colour"]["classes"] == list(tasks.TASKS["colour"].classes)
    assert not _REMOTE.search(r.text), "the page must load nothing from another origin"
    for asset, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
        a = client.get(f"/playground/{asset}")
        assert a.status_code == 200 and kind in a.headers["content-type"]
        assert a.content == (STATIC_DIR / asset).read_bytes()
    assert "/" not in client.get("/openapi.json").json()["paths"]  # a page, not an API operation


def test_docs_and_redoc_load_their_assets_from_this_server(client: TestClient) -> None:
    docs, redoc = client.get("/docs"), client.get("/redoc")
    assert docs.status_code == redoc.status_code == 200
    for page in (docs.text, redoc.text):
        assert "cdn." not in page and "fonts.googleapis" not in page, page
        for url in re.findall(r"""(?:src|href)=["']([^"']+)""", page):
            assert url.startswith("/"), url
            assert client.get(url).status_code == 200, url
    assert '"validatorUrl": null' in docs.text  # Swagger UI would otherwise call validator.swagger.io
    bundle = client.get("/docs-assets/redoc.standalone.js").content
    original = (Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js").read_bytes()
    assert b"cdn.redoc.ly" in original and b"cdn.redoc.ly" not in bundle  # the package's bundle, one URL emptied
    assert len(original) - len(bundle) == len(b"https://cdn.redoc.ly/redoc/logo-mini.svg")
