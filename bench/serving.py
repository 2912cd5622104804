"""End-to-end /classify throughput and latency, batching on and off, against in-process model throughput.

Starts the API (``residual-serve``) as a subprocess on a free loopback port for each configuration, then
drives it from a separate load-generator process: ``--clients`` concurrent clients, each sending
``--requests`` requests of ``--images`` world images (bounded in count and by ``--deadline`` seconds).

    python bench/serving.py --clients 1,8,64 --images 4 --requests 25 --json bench/out/service.json
    python bench/serving.py --smoke
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _server import start_api  # type: ignore[import-not-found]
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _payload(n_images: int) -> dict[str, object]:
    from residual.tiny import tasks

    images, _, _ = tasks.task_images("shape", "test", n=n_images)
    b64 = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        b64.append(base64.b64encode(buf.getvalue()).decode())
    t = tasks.TASKS["shape"]
    return {"images": b64, "label_set": {"classes": list(t.classes), "templates": list(t.templates)}, "top_k": 3}


def load(url: str, clients: int, requests: int, n_images: int, deadline_s: float) -> dict[str, float]:
    """Run in the load-generator process: latencies and throughput of concurrent clients."""
    payload = _payload(n_images)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s
    barrier = threading.Barrier(clients)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            c.post("/classify", json=payload)  # warm the connection and the label-set cache
            barrier.wait()
            for _ in range(requests):
                if time.monotonic() > stop_at:
                    break
                t0 = time.perf_counter()
                r = c.post("/classify", json=payload)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = sorted(latencies)

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {"requests": len(lat), "errors": errors[0], "wall_s": wall, "rps": len(lat) / wall,
            "images_per_s": len(lat) * n_images / wall, "p50_ms": q(0.5), "p95_ms": q(0.95), "p99_ms": q(0.99),
            "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan")}


def in_process(batch: int, repeats: int) -> float:
    """Images per second of the backbone's feature-capturing forward at ``batch`` images."""
    import torch

    from residual import extract, load_backbone
    from residual.tiny import tasks

    bb = load_backbone("residual-tiny", device="cpu")
    images, _, _ = tasks.task_images("shape", "test", n=batch)
    pixels = bb.pixels_from_arrays(images)
    extract(bb, pixels)
    t0 = time.perf_counter()
    for _ in range(repeats):
        with torch.no_grad():
            extract(bb, pixels)
    return batch * repeats / (time.perf_counter() - t0)


def run_config(batching: bool, args: argparse.Namespace, redis_url: str, clients: list[int]
               ) -> dict[int, dict[str, float]]:
    """One API process per configuration; the load generator runs once per client count against it."""
    env = {"RESIDUAL_BATCHING": str(batching).lower(), "RESIDUAL_REDIS_URL": redis_url,
           "RESIDUAL_ARTIFACT_DIR": tempfile.mkdtemp(prefix="bench-art-"), "RESIDUAL_DEVICE": "cpu",
           "RESIDUAL_MAX_WAIT_MS": str(args.max_wait_ms), "HF_HUB_OFFLINE": "1"}
    server, url = start_api(env)
    try:
        out = {}
        for n in clients:
            gen = subprocess.run([sys.executable, __file__, "--load-only", url, "--clients", str(n),
                                  "--requests", str(args.requests), "--images", str(args.images),
                                  "--deadline", str(args.deadline)], capture_output=True, text=True, check=True,
                                 cwd=ROOT)
            out[n] = json.loads(gen.stdout.strip().splitlines()[-1])
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,8,64", help="concurrent clients, one run per value")
    p.add_argument("--requests", type=int, default=25, help="requests per client")
    p.add_argument("--images", type=int, default=4, help="images per request")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds; the load stops by itself")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--load-only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.load_only:
        print(json.dumps(load(args.load_only, int(args.clients), args.requests, args.images, args.deadline)))
        return 0
    if args.smoke:
        args.clients, args.requests, args.deadline = "2", 3, 30.0
    clients = [int(c) for c in str(args.clients).split(",")]
    sys.path.insert(0, str(ROOT))
    from tests.redis_server import shared_or_private

    redis_server = shared_or_private()
    try:
        runs = {"batching_on": run_config(True, args, redis_server.url, clients),
                "batching_off": run_config(False, args, redis_server.url, clients)}
    finally:
        redis_server.stop()
    rows: dict[str, dict[str, float]] = {}
    model_ips: dict[int, float] = {}
    for n in clients:
        batch = min(64, n * args.images)  # the batcher never forms larger batches (max_batch_size)
        model_ips[n] = in_process(batch, 3 if args.smoke else 20)
        for config, by_clients in runs.items():
            r = by_clients[n]
            rows[f"{config}/{n}"] = {**r, "clients": n, "batching": config == "batching_on",
                                     "in_process_batch": batch, "vs_in_process": r["images_per_s"] / model_ips[n]}
    result = {"clients": clients, "images_per_request": args.images, "requests_per_client": args.requests,
              "in_process_images_per_s": model_ips, "rows": rows}
    print(f"{'config':<18}{'req/s':>8}{'img/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'vs model':>10}")
    for name, r in rows.items():
        print(f"{name:<18}{r['rps']:>8.1f}{r['images_per_s']:>8.1f}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}"
              f"{r['p99_ms']:>9.1f}{r['vs_in_process']:>10.2f}")
    print("in-process backbone forward: " + ", ".join(f"batch {min(64, n * args.images)}: {v:.1f} images/s"
                                                      for n, v in model_ips.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
