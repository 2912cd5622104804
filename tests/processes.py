"""Service processes for tests: an API replica as its own uvicorn process on a free loopback port."""

from __future__ import annotations

import contextlib
import json
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
def api_server(redis_url: str, artifacts: Path, ready_timeout: float = 120, debug_log: Path | None = None,
               output: Path | None = None, env_extra: dict[str, str] | None = None, log_level: str = "warning",
               **settings: str) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes]]]:
    """An API replica as its own uvicorn process on a free loopback port: (client, process), once ready.

    With ``debug_log``, the process is tests/debug_server.py (asyncio in debug mode, every event-loop step over 50 ms
    reported) and its stderr goes to that file; ``slow_callbacks`` reads the reports. With ``output``, its stdout
    goes to ``output.with_suffix('.out')`` and its stderr (the JSON log lines) to ``output.with_suffix('.err')``;
    ``env_extra``: other variables (``OTEL_*``)."""
    port = free_port()
    env = dict(os.environ, RESIDUAL_REDIS_URL=redis_url, RESIDUAL_ARTIFACT_DIR=str(artifacts), RESIDUAL_DEVICE="cpu",
               HF_HUB_OFFLINE="1", **{f"RESIDUAL_{k.upper()}": v for k, v in settings.items()}, **(env_extra or {}))
    if debug_log is None:
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(output.with_suffix(".out"), "wb")) if output is not None else None
            err = files.enter_context(open(output.with_suffix(".err"), "wb")) if output is not None else None
            proc = subprocess.Popen([sys.executable, "-m", "service.api.server", "--port", str(port), "--log-level",
                                     log_level], cwd=ROOT, env=env, stdout=out, stderr=err)
    else:
        with open(debug_log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "tests.debug_server", str(port)], cwd=ROOT, env=env,
                                    stderr=err)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"the API process exited with {proc.returncode} before it was ready")
                try:
                    return client.get("/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(ready, ready_timeout, "the API process to be ready")
            yield client, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def slow_callbacks(debug_log: Path, start: int) -> list[dict[str, object]]:
    """The slow-callback reports a debug server wrote to its log after byte ``start`` (``debug_log.stat().st_size``
    taken when the measurement began)."""
    with open(debug_log) as fh:
        fh.seek(start)
        return [json.loads(line) for line in fh if line.startswith('{"slow"')]


@contextlib.contextmanager
def api_process(redis_url: str, artifacts: Path, **settings: str) -> Iterator[httpx.Client]:
    """A second API replica as its own uvicorn process on a free loopback port."""
    with api_server(redis_url, artifacts, **settings) as (client, _):
        yield client


def worker_process(redis_url: str, artifacts: Path, output: Path | None = None,
                   env_extra: dict[str, str] | None = None, **settings: str) -> subprocess.Popen[bytes]:
    """An alignment worker as its own process (no metrics port unless a setting gives one); ``output`` and
    ``env_extra`` as for :func:`api_server`."""
    env = dict(os.environ, RESIDUAL_REDIS_URL=redis_url, RESIDUAL_ARTIFACT_DIR=str(artifacts), RESIDUAL_DEVICE="cpu",
               HF_HUB_OFFLINE="1", RESIDUAL_WORKER_METRICS_PORT="0")
    env.update({f"RESIDUAL_{k.upper()}": v for k, v in settings.items()})
    env.update(env_extra or {})
    with contextlib.ExitStack() as files:
        out = files.enter_context(open(output.with_suffix(".out"), "wb")) if output is not None else None
        err = files.enter_context(open(output.with_suffix(".err"), "wb")) if output is not None else None
        return subprocess.Popen([sys.executable, "-m", "service.jobs.worker", "--log-level", "warning"], cwd=ROOT,
                                env=env, stdout=out, stderr=err)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def variant_checkpoint(path: Path, seed: int = 7) -> Path:
    """residual-tiny's architecture with its shipped weights slightly perturbed: a checkpoint without a shipped
    basis (its own weights id), the way a user's fine-tuned checkpoint arrives."""
    import torch
    from safetensors.torch import save_file

    from residual import load_backbone

    bb = load_backbone("residual-tiny", device="cpu")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in bb.model.state_dict().items():
        t = t.detach().float().clone()
        if t.is_floating_point() and t.dim() >= 2 and name.startswith("visual."):
            t += 0.02 * t.std() * torch.randn(t.shape, generator=gen)
        state[name] = t.contiguous()
    save_file(state, str(path))
    return path
