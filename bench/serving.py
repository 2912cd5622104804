"""End-to-end /classify throughput and latency against the in-process forward, on CPU or CUDA.

For each batching mode the API (``residual-serve``) runs as a subprocess on a free loopback port; ``--load-procs``
load-generator processes drive it with ``--clients`` concurrent clients (threads) in all, each request carrying
``--images`` images of ``--size`` px in ``--format`` (world images, rendered at that size) sent as ``--transport``
(base64 JSON or multipart files). Every run lasts ``--duration`` seconds after a warm-up. After the API has
stopped, the in-process forward (``extract`` with the service's precision: bf16 autocast on CUDA) is measured in
the same run, on the same device, at the largest batch the server can form (min(max batch, clients x images)), and
every row reports ``vs_in_process``, its images/s over that.

    python bench/serving.py --clients 8 --transport json,multipart --json bench/out/serving.json      # this CPU
    python bench/serving.py --device cuda --model ViT-B-16 --weights random --format jpeg --size 224 \\
        --clients 32,128 --transport multipart,json --load-procs 6 --json $OUT/serving-gpu.json           # a GPU
    python bench/serving.py --smoke
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from _server import start_api  # type: ignore[import-not-found]
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TASK = "shape"


def _images(n: int, size: int, fmt: str) -> list[bytes]:
    from residual.tiny import tasks

    arrays, _, _ = tasks.task_images(TASK, "test", n=n, side=size)
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG" if fmt == "jpeg" else "PNG", **({"quality": 90} if fmt == "jpeg" else {}))
        out.append(buf.getvalue())
    return out


def _request(blobs: list[bytes], transport: str, fmt: str) -> dict[str, Any]:
    """httpx keyword arguments of one /classify request."""
    from residual.tiny import tasks

    t = tasks.TASKS[TASK]
    label_set = {"classes": list(t.classes), "templates": list(t.templates)}
    if transport == "json":
        return {"json": {"images": [base64.b64encode(b).decode() for b in blobs], "label_set": label_set, "top_k": 3}}
    mime = "image/jpeg" if fmt == "jpeg" else "image/png"
    return {"files": [("images", (f"{i}.{fmt}", b, mime)) for i, b in enumerate(blobs)],
            "data": {"label_set": json.dumps(label_set), "top_k": "3"}}


def load(url: str, clients: int, n_images: int, size: int, fmt: str, transport: str, duration: float,
         start_at: float) -> dict[str, Any]:
    """Run in a load-generator process: ``clients`` threads from ``start_at`` (epoch s) for ``duration`` s."""
    blobs = _images(max(n_images, 16), size, fmt)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    ends: list[float] = []

    def client(k: int) -> None:
        mine = [blobs[(k + j) % len(blobs)] for j in range(n_images)]
        body = _request(mine, transport, fmt)
        with httpx.Client(base_url=url, timeout=120) as c:
            c.post("/classify", **body)  # warm the connection and the label-set cache
            time.sleep(max(0.0, start_at - time.time()))  # every process starts at the same wall-clock time
            stop = time.perf_counter() + duration
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = c.post("/classify", **body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors[0] += 1
        with lock:
            ends.append(time.time())

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors[0], "end": max(ends) if ends else start_at}


def _quantile(lat: list[float], p: float) -> float:
    lat = sorted(lat)
    return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else float("nan")


def drive(url: str, clients: int, args: argparse.Namespace, transport: str) -> dict[str, Any]:
    procs = max(1, min(args.load_procs, clients))
    start_at = time.time() + 5 + clients * 0.05  # room for every process to warm up
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    gens = [subprocess.Popen([sys.executable, __file__, "--load-only", url, "--clients", str(k), "--images",
                              str(args.images), "--size", str(args.size), "--format", args.format, "--transport",
                              transport, "--duration", str(args.duration), "--start-at", str(start_at)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT) for k in shares]
    parts = []
    for g in gens:
        out, _ = g.communicate(timeout=args.duration + 300)
        parts.append(json.loads(out.strip().splitlines()[-1]))
    lat = [x for p in parts for x in p["latencies"]]
    wall = max(p["end"] for p in parts) - start_at
    return {"requests": len(lat), "errors": sum(p["errors"] for p in parts), "wall_s": round(wall, 2),
            "images_per_s": round(len(lat) * args.images / wall, 1), "p50_ms": _quantile(lat, 0.5),
            "p95_ms": _quantile(lat, 0.95), "p99_ms": _quantile(lat, 0.99)}


def _batches(url: str) -> tuple[float, float]:
    """(backbone batches, images in them) so far, from the API's metrics."""
    values = {"count": 0.0, "sum": 0.0}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        for k in values:
            if line.startswith(f"residual_backbone_batch_size_{k} "):
                values[k] = float(line.split()[-1])
    return values["count"], values["sum"]


def in_process(args: argparse.Namespace, weights: str | None, batch: int) -> float:
    """Images per second of the service's forward (extract; bf16 autocast on CUDA) at ``batch`` images."""
    import torch

    from residual import extract, load_backbone
    from residual.tiny import tasks

    bb = load_backbone(args.model, weights, device=args.device)
    arrays, _, _ = tasks.task_images(TASK, "test", n=min(batch, 64), side=args.size)
    pixels = bb.pixels_from_arrays(arrays)
    pixels = pixels.repeat((batch + len(pixels) - 1) // len(pixels), 1, 1, 1)[:batch].to(bb.device)

    def run() -> None:
        if bb.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                extract(bb, pixels)
        else:
            extract(bb, pixels)

    run()
    repeats = 3 if args.smoke else max(5, int(2000 / batch))
    if bb.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    if bb.device.type == "cuda":
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - t0)


def _weights(args: argparse.Namespace) -> str | None:
    """None (the model's own: the embedded weights), a path, or random weights saved to a temporary file."""
    if args.weights != "random":
        return args.weights
    import torch
    from safetensors.torch import save_file

    from residual import load_backbone

    torch.manual_seed(0)
    bb = load_backbone(args.model, "random", device="cpu")
    path = Path(tempfile.mkdtemp(prefix="bench-weights-")) / f"{args.model}-random.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="residual-tiny")
    p.add_argument("--weights", default=None, help="checkpoint path, or 'random' (random init saved to a file)")
    p.add_argument("--format", default="png", choices=["png", "jpeg"])
    p.add_argument("--size", type=int, default=None, help="image side in px (default: the model's input size)")
    p.add_argument("--transport", default="json,multipart", help="json, multipart, or both")
    p.add_argument("--clients", default="8", help="concurrent clients, one run per value")
    p.add_argument("--images", type=int, default=8, help="images per request")
    p.add_argument("--batching", default="on", help="on, off, or on,off")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per row")
    p.add_argument("--load-procs", type=int, default=2, help="load-generator processes")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, default=None, help="RESIDUAL_MAX_BATCH_SIZE (default: per device)")
    p.add_argument("--server-env", action="append", default=[], help="extra KEY=VALUE for the API")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--load-only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.load_only:
        print(json.dumps(load(args.load_only, int(args.clients), args.images, args.size, args.format,
                              args.transport, args.duration, args.start_at)))
        return 0
    if args.smoke:
        args.clients, args.duration, args.images, args.load_procs, args.batching = "2", 2.0, 4, 1, "on,off"
    sys.path.insert(0, str(ROOT))
    from residual import load_backbone
    from tests.redis_server import shared_or_private

    weights = _weights(args)
    geometry = load_backbone(args.model, weights, device="cpu").geometry
    args.size = args.size or geometry.image_size
    max_batch = args.max_batch or (256 if args.device == "cuda" else 64)
    clients = [int(c) for c in str(args.clients).split(",")]
    transports = str(args.transport).split(",")
    rows: list[dict[str, Any]] = []
    redis_server = shared_or_private()
    try:
        for batching in str(args.batching).split(","):
            env = {"RESIDUAL_BATCHING": str(batching == "on").lower(), "RESIDUAL_REDIS_URL": redis_server.url,
                   "RESIDUAL_ARTIFACT_DIR": tempfile.mkdtemp(prefix="bench-art-"), "RESIDUAL_DEVICE": args.device,
                   "RESIDUAL_MODEL_NAME": args.model, "RESIDUAL_MAX_WAIT_MS": str(args.max_wait_ms),
                   "RESIDUAL_MAX_BATCH_SIZE": str(max_batch), "HF_HUB_OFFLINE": "1",
                   **({"RESIDUAL_MODEL_WEIGHTS": weights} if weights else {}),
                   **dict(kv.split("=", 1) for kv in args.server_env)}
            server, url = start_api(env, timeout_s=600)
            try:
                for n in clients:
                    for transport in transports:
                        before = _batches(url)
                        r = drive(url, n, args, transport)
                        after = _batches(url)
                        count = after[0] - before[0]
                        rows.append({"clients": n, "transport": transport, "format": args.format,
                                     "batching": batching == "on", **r,
                                     "mean_batch": round((after[1] - before[1]) / count, 1) if count else None})
            finally:
                server.terminate()
                server.wait(timeout=60)
    finally:
        redis_server.stop()
    # the in-process forward, measured after the API has stopped, on the same device
    ceilings = {b: in_process(args, weights, b) for b in sorted({min(max_batch, n * args.images) for n in clients})}
    for row in rows:
        batch = min(max_batch, row["clients"] * args.images) if row["batching"] else args.images
        ceiling = ceilings.get(batch) or in_process(args, weights, batch)
        ceilings[batch] = ceiling
        row["in_process_batch"] = batch
        row["vs_in_process"] = round(row["images_per_s"] / ceiling, 3)
    result = {"device": args.device, "model": args.model, "weights": args.weights or "default",
              "size": args.size, "images_per_request": args.images, "duration_s": args.duration,
              "load_procs": args.load_procs, "max_batch": max_batch, "cores": os.cpu_count(),
              "in_process_images_per_s": {str(b): round(v, 1) for b, v in sorted(ceilings.items())}, "rows": rows}
    print(f"{'clients':>8}{'transport':>11}{'batching':>9}{'img/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
          f"{'batch':>7}{'vs in-process':>15}")
    for r in rows:
        print(f"{r['clients']:>8}{r['transport']:>11}{'on' if r['batching'] else 'off':>9}{r['images_per_s']:>9.1f}"
              f"{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['mean_batch'] or 0:>7.1f}"
              f"{r['vs_in_process']:>15.3f}")
    print("in-process forward: " + ", ".join(f"batch {b}: {v:.1f} images/s" for b, v in sorted(ceilings.items())))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
