"""A real Redis for the tests: RESIDUAL_REDIS_URL when it answers, else a private redis-server on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass

import redis

from tests.waiting import wait_for


@dataclass
class RedisServer:
    url: str
    process: subprocess.Popen[bytes] | None = None
    workdir: str | None = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_private(port: int | None = None, *args: str, workdir: str | None = None) -> RedisServer:
    """Start a throw-away redis-server and wait until it answers.

    No persistence unless ``args`` (extra server options, e.g. ``--appendonly yes``) say otherwise; ``workdir``
    (default: a new temporary folder) is where it keeps its files, so a restart on the same folder and port
    recovers them.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the tests need a Redis: RESIDUAL_REDIS_URL does not answer and no redis-server binary "
                           "is on PATH (install it, e.g. `apt-get install redis-server`)")
    port = port or free_port()
    workdir = workdir or tempfile.mkdtemp(prefix="residual-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _answers(url) or proc.poll() is not None, 10, f"redis-server on port {port}")
    except AssertionError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise RuntimeError(f"redis-server exited at start on port {port}")
    return RedisServer(url, proc, workdir)


def shared_or_private() -> RedisServer:
    url = os.environ.get("RESIDUAL_REDIS_URL", "redis://127.0.0.1:6379/0")
    if _answers(url):
        return RedisServer(url)
    return start_private()
