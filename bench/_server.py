"""The API as a subprocess on a free loopback port, for benchmarks that drive it over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api(env: dict[str, str], timeout_s: float = 120.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``residual-serve`` with ``env`` added to this environment; return (process, base URL) once ready."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "service.api.server", "--port", str(port), "--log-level",
                               "warning"], env={**os.environ, **env}, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the API process exited during start-up")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"the API did not become ready within {timeout_s:g} s")
