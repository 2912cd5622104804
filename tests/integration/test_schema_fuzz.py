"""The published contract, fuzzed: schemathesis against the OpenAPI schema of a real API process, a worker and a
private Redis, with every check (server errors, status codes, content types, response schemas and headers, negative
and positive data, auth, methods and Allow, use after free, response time) and every phase (examples, coverage,
fuzzing, stateful). Once with the admin key, once with the classification key: no failure. The deployment serves two
models (the embedded one and a perturbed copy without a basis), so ``model`` takes both values of its enum.

``tests/schemathesis_hooks.py`` works around one generator defect of schemathesis (positive multipart cases that break
the form's schema). ``tests/schemathesis.toml`` lists the few answers to schema-valid requests that depend on content
no JSON schema can describe (an image must decode, a label must be a class of the label set), each with its reason.

CI gives each key ``RESIDUAL_FUZZ_SECONDS`` (60 s: both runs, with the set-up, within 3 minutes). A longer run, e.g.
15 minutes:

    RESIDUAL_FUZZ_SECONDS=450 .venv/bin/python -m pytest tests/integration/test_schema_fuzz.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from residual.tiny import tasks
from tests.processes import ROOT, api_server, variant_checkpoint, worker_process
from tests.redis_server import start_private
from tests.service.conftest import png_b64

SECONDS = int(os.environ.get("RESIDUAL_FUZZ_SECONDS", "60"))
ADMIN, API = "fuzz-admin-key-0123456789abcdef", "fuzz-api-key-0123456789abcdef"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
LIMITS = {"heads_sync_max_images": "64", "max_inline_images": "64", "job_timeout_s": "20"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    redis = start_private()
    artifacts = tmp_path_factory.mktemp("fuzz-artifacts")
    variant = variant_checkpoint(tmp_path_factory.mktemp("fuzz-weights") / "variant.safetensors")
    models = json.dumps([{"name": "residual-tiny", "architecture": "residual-tiny"},
                         {"name": "tiny-variant", "architecture": "residual-tiny", "weights": str(variant)}])
    worker = worker_process(redis.url, artifacts, job_timeout_s="20", models=models)  # fuzzed fits end fast
    try:
        with api_server(redis.url, artifacts, admin_api_key=ADMIN, api_key=API, models=models,
                        **LIMITS) as (client, _):
            auth = {"Authorization": f"Bearer {ADMIN}"}
            # what a process computes once (spectra, the text dictionary) is done before the clock runs
            image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
            assert client.post("/classify", headers=auth, json={"images": [image], "label_set": {
                "classes": ["red", "blue"]}}).status_code == 200
            for path in ("/heads", "/heads/0/0"):
                assert client.get(path, headers=auth, timeout=600).status_code == 200
            yield str(client.base_url).rstrip("/")
    finally:
        worker.kill()
        worker.wait(timeout=30)
        redis.stop()


@pytest.mark.parametrize("key", [ADMIN, API], ids=["admin-key", "classification-key"])
def test_every_check_and_phase_finds_nothing(service: str, key: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(ROOT / "tests/schemathesis.toml"),
         "run", f"{service}/openapi.json", "--phases", "examples,coverage,fuzzing,stateful",
         "--max-time", str(SECONDS), "--workers", "1", "--seed", "7", "--max-failures", "50",
         "-H", f"Authorization: Bearer {key}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=SECONDS + 300,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(ROOT / "tests/schemathesis_hooks.py")})
    report = done.stdout[done.stdout.find("=== FAILURES ==="):]  # the failures and the summary
    report = "\n".join(line if len(line) < 400 else line[:400] + " ..." for line in report.splitlines())
    assert done.returncode == 0, report[-12000:]
    paths = httpx.get(f"{service}/openapi.json").json()["paths"]
    operations = sum(method in HTTP_METHODS for methods in paths.values() for method in methods)
    assert f"Tested: {operations}" in done.stdout, report  # every operation of the schema was reached
    assert httpx.get(f"{service}/livez").status_code == 200
