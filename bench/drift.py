"""What the drift statistics cost: /classify throughput with RESIDUAL_DRIFT=on against off, side by side.

Two API processes serve the same model on one machine, one with drift statistics on and one with them off; the
load alternates between them (``--rounds`` rounds of ``--seconds`` each, ``--clients`` threads sending requests of
``--images`` world images), so both see the same machine state; then a second pair, started in the other order
(the first-started process of a pair runs a few percent slower, whatever its settings: ``--control`` runs both
with drift off and shows it). The ratio is on / off of the median images/s over both pairs. The drift answer of
the last 'on' process shows what was counted (``n_images``) and ``skipped`` images (the drift thread fell behind
and sampled). Throughput ratios on a shared 2-core machine carry a few percent of noise per process, so the run
also reports the cost directly: ``drift_cpu_share``, the drift thread's CPU time over the whole process's CPU time
(``residual_drift_cpu_seconds_total`` against /proc), an upper bound of the throughput it can take.

    python bench/drift.py --json bench/out/drift.json
    python bench/drift.py --smoke
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _server import start_api  # type: ignore[import-not-found]
from PIL import Image

from residual.tiny import world


def _images(n: int) -> list[str]:
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
                images = [pool[(offset + j) % len(pool)] for j in range(per_request)]
                offset += per_request
                body = {"images": images, "label_set": {"classes": ["a thing", "another thing"]}, "top_k": 1}
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


def _metric(url: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(url + "/metrics").text.splitlines()
               if line.startswith(name + "{"))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--control", action="store_true", help="an A/A run: both processes with drift off (the noise "
                                                          "of the comparison itself)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds, args.clients = 2.0, 1, 4
    images = _images(257)  # the training mixture, drawn afresh (in distribution); odd: every image gets sampled
    rates: dict[str, list[float]] = {"on": [], "off": []}
    report: dict[str, Any] = {}
    skipped = drift_cpu = process_cpu = 0.0
    # two pairs of processes, started in opposite orders: an A/A run (--control) showed the first-started process
    # of a pair slower by a few percent, a bias the swap cancels
    for order in (("on", "off"), ("off", "on")):
        servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            for mode in order:
                servers[mode] = start_api({"RESIDUAL_ARTIFACT_DIR": tempfile.mkdtemp(prefix=f"bench-drift-{mode}-"),
                                           "RESIDUAL_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
                                           "RESIDUAL_DRIFT": "off" if args.control else mode})
            for _, url in servers.values():  # warm: connections, the label set's text embeddings
                run(url, 1, images, args.images, 0.5)
            for rnd in range(args.rounds):
                for mode in (order if rnd % 2 == 0 else order[::-1]):  # alternate who goes first
                    rates[mode].append(run(servers[mode][1], args.clients, images, args.images, args.seconds))
            answer = httpx.get(servers["on"][1] + "/drift", params={"describe": 0, "window": "all"}, timeout=60)
            if answer.status_code == 200:
                report = answer.json()
            skipped += _metric(servers["on"][1], "residual_drift_skipped_images_total")
            drift_cpu += _metric(servers["on"][1], "residual_drift_cpu_seconds_total")
            process_cpu += _cpu_s(servers["on"][0].pid)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    result = {"control": args.control, "clients": args.clients, "images_per_request": args.images,
              "seconds": args.seconds, "rounds": args.rounds,
              "images_per_s": {"on": round(on, 1), "off": round(off, 1)},
              "rounds_images_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
              "on_vs_off": round(on / off, 3), "drift_images_counted": report.get("n_images"),
              "drift_images_skipped": int(skipped), "drift_score": report.get("score"),
              "drift_cpu_share": round(drift_cpu / process_cpu, 4) if process_cpu else None}
    print(json.dumps(result, indent=2))  # noqa: T201
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
