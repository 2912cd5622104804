"""Service processes for tests: an API replica as its own uvicorn process on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.redis_server import free_port
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def api_process(redis_url: str, artifacts: Path, **settings: str) -> Iterator[httpx.Client]:
    """A second API replica as its own uvicorn process on a free loopback port."""
    port = free_port()
    env = dict(os.environ, RESIDUAL_REDIS_URL=redis_url, RESIDUAL_ARTIFACT_DIR=str(artifacts), RESIDUAL_DEVICE="cpu",
               HF_HUB_OFFLINE="1", **{f"RESIDUAL_{k.upper()}": v for k, v in settings.items()})
    proc = subprocess.Popen([sys.executable, "-m", "service.main", "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, env=env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

            def ready() -> bool:
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(ready, 120, "the second API process to be ready")
            yield client
    finally:
        proc.terminate()
        proc.wait(timeout=30)
