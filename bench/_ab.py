"""Side-by-side throughput of two API configurations on one machine (``bench/drift.py``, ``bench/tracing.py``).

Two API processes serve the same model, one per configuration; the load alternates between them (``rounds`` rounds
of ``seconds`` each, ``clients`` threads sending requests of ``per_request`` world images), so both see the same
machine state; then a second pair, started in the other order: an A/A run showed the first-started process of a
pair a few percent slower whatever its settings, a bias the swap cancels. The ratio of two configurations is the
ratio of their median images/s over both pairs.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _server import start_api  # type: ignore[import-not-found]
from PIL import Image

from residual.tiny import world

Servers = dict[str, tuple[subprocess.Popen[bytes], str]]


def images(n: int) -> list[str]:
    """``n`` world images drawn like the training mixture (in distribution), base64 PNG."""
    rng = np.random.default_rng(12345)
    out = []
    for a in world.render_batch([world.sample_scene(rng) for _ in range(n)], seed=12345):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def run(url: str, clients: int, pool: list[str], per_request: int, seconds: float) -> float:
    """images/s of ``clients`` threads for ``seconds``, each request ``per_request`` images of ``pool`` in turn."""
    done = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(c: int) -> None:
        offset = c * per_request
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.perf_counter() < stop:
                batch = [pool[(offset + j) % len(pool)] for j in range(per_request)]
                offset += per_request
                body = {"images": batch, "label_set": {"classes": ["a thing", "another thing"]}, "top_k": 1}
                if http.post("/classify", json=body).status_code == 200:
                    with lock:
                        done[0] += per_request

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.perf_counter() - start)


def compare(configs: dict[str, dict[str, str]], pool: list[str], clients: int, per_request: int, seconds: float,
            rounds: int, after_pair: Callable[[Servers], None] | None = None) -> dict[str, list[float]]:
    """images/s of each configuration (two named environments), every round of both pairs; ``after_pair`` sees the
    running processes of each pair before they stop."""
    a, b = configs
    rates: dict[str, list[float]] = {a: [], b: []}
    for order in ((a, b), (b, a)):
        servers: Servers = {}
        try:
            for mode in order:
                servers[mode] = start_api({"RESIDUAL_ARTIFACT_DIR": tempfile.mkdtemp(prefix=f"bench-{mode}-"),
                                           "RESIDUAL_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", **configs[mode]})
            for _, url in servers.values():  # warm: connections, the label set's text embeddings
                run(url, 1, pool, per_request, 0.5)
            for rnd in range(rounds):
                for mode in (order if rnd % 2 == 0 else order[::-1]):  # alternate who goes first
                    rates[mode].append(run(servers[mode][1], clients, pool, per_request, seconds))
            if after_pair is not None:
                after_pair(servers)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return rates


def arguments(doc: str | None, what: str) -> argparse.ArgumentParser:
    """The options of an on/off comparison (``what``: the feature compared, for ``--control``'s help)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--control", action="store_true", help=f"an A/A run: both processes with {what} off (the noise "
                                                          "of the comparison itself)")
    p.add_argument("--smoke", action="store_true", help="2 s, one round, 4 clients")
    p.add_argument("--json", type=Path)
    return p


def summary(args: argparse.Namespace, rates: dict[str, list[float]], **extra: Any) -> dict[str, Any]:
    """The result of an on/off comparison (``rates`` keyed "on" and "off"), printed, and written to ``--json``."""
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    result = {"control": args.control, "clients": args.clients, "images_per_request": args.images,
              "seconds": args.seconds, "rounds": args.rounds,
              "images_per_s": {"on": round(on, 1), "off": round(off, 1)},
              "rounds_images_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
              "on_vs_off": round(on / off, 3), **extra}
    print(json.dumps(result, indent=2))  # noqa: T201
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result
