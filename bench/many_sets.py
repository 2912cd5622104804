"""A thousand coefficient sets on one backbone: throughput of /classify with requests spread over K sets.

K coefficient sets (random lambdas around 1, the paper's init: fine for throughput) of one label set are written
into a fresh artifact store; one API process serves them. For each K of ``--sets``, ``--clients`` threads send
/classify requests of ``--images`` images for ``--seconds``, each naming a set drawn uniformly from the first K
(``"coefficients": "s0042"``). Every set is requested once before the timed runs (their first load is not what
is measured), and the runs of the different K alternate for ``--rounds`` rounds in one process, so the ratios
are side by side on the same machine state. Each row: images/s (median over rounds), p95 latency, the ratio to
K = 1, and the bytes of coefficient sets resident in the API process (``residual_coefficient_cache_bytes``).

    python bench/many_sets.py --sets 1,1000 --json bench/out/many_sets.json
    python bench/many_sets.py --smoke
    # a GPU with ViT-B-16 (seeded random weights with the real geometry, a basis fitted on world images first):
    python bench/many_sets.py --model ViT-B-16 --device cuda --sets 1,1000 --images 16 --clients 16 \\
        --json bench/out/many_sets_gpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from _server import start_api  # type: ignore[import-not-found]

from residual import Basis, init_coefficients, load_backbone
from residual.basis import fit_basis
from residual.tiny import tasks
from residual.tiny.reference import reference_images, shipped_basis_path

TASK = tasks.TASKS["colour"]


def _model(model: str, device: str, artifacts: Path) -> tuple[Basis, str | None]:
    """(basis, weights file): residual-tiny's shipped basis and weights, or an architecture with random weights
    (seeded, saved to a file the API loads) and a basis fitted here on 256 world images."""
    if model == "residual-tiny":
        return Basis.load(shipped_basis_path()), None
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cpu = load_backbone(model, "random", device="cpu")
    weights = artifacts / f"{model}-random.safetensors"
    save_file({k: v.contiguous() for k, v in cpu.model.state_dict().items()}, str(weights))
    bb = load_backbone(model, str(weights), device=device)
    basis = fit_basis(bb, [bb.pixels_from_arrays(reference_images(256))])
    basis.save(artifacts / "bases" / "bench.safetensors")
    del bb, cpu
    return basis, str(weights)


def write_sets(artifacts: Path, basis: Basis, k: int) -> list[str]:
    """``k`` coefficient sets ``s0000``... (version v1, active), all of the colour task's label set."""
    gen = torch.Generator().manual_seed(0)
    names = []
    for i in range(k):
        name = f"s{i:04d}"
        cs = init_coefficients("full", basis, list(TASK.classes), list(TASK.templates), init="randn", generator=gen)
        folder = artifacts / "coefficients" / name
        cs.save(folder / "v1.safetensors")
        (folder / "ACTIVE").write_text("v1")
        names.append(name)
    return names


def _images(n: int) -> list[str]:
    import base64
    import io

    from PIL import Image

    out = []
    for a in tasks.task_images("colour", "test", n=n)[0]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def run(url: str, names: list[str], clients: int, images: list[str], seconds: float, seed: int) -> dict[str, Any]:
    """``clients`` threads for ``seconds``, each request naming a set drawn uniformly from ``names``."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = time.perf_counter()
    stop = start + seconds

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.perf_counter() < stop:
                body = {"images": images, "coefficients": rng.choice(names), "top_k": 1}
                t0 = time.perf_counter()
                r = http.post("/classify", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"images_per_s": len(latencies) * len(images) / wall, "latencies": latencies, "errors": errors[0]}


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.split()[-1])
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="1,1000", help="comma-separated K")
    p.add_argument("--model", default="residual-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--images", type=int, default=4, help="images per request")
    p.add_argument("--seconds", type=float, default=20.0, help="per K and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="K = 1, 20; short runs (CI)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.sets, args.seconds, args.rounds, args.clients = "1,20", 2.0, 1, 4
    ks = sorted({int(k) for k in args.sets.split(",")})
    artifacts = Path(tempfile.mkdtemp(prefix="bench-sets-"))
    t0 = time.perf_counter()
    basis, weights = _model(args.model, args.device, artifacts)
    names = write_sets(artifacts, basis, max(ks))
    print(f"wrote {len(names)} coefficient sets in {time.perf_counter() - t0:.1f} s")  # noqa: T201
    env = {"RESIDUAL_ARTIFACT_DIR": str(artifacts), "RESIDUAL_DEVICE": args.device, "RESIDUAL_MODEL_NAME": args.model,
           "HF_HUB_OFFLINE": "1", **({"RESIDUAL_MODEL_WEIGHTS": weights} if weights else {})}
    server, url = start_api(env, timeout_s=600)
    try:
        images = _images(args.images)
        scores = set()
        with httpx.Client(base_url=url, timeout=120) as http:  # every set once: loads are not what is measured
            for name in names:
                r = http.post("/classify", json={"images": images[:1], "coefficients": name, "top_k": 1})
                r.raise_for_status()
                if r.json()["coefficients"] != f"{name}@v1":
                    raise RuntimeError(f"asked for {name}, answered with {r.json()['coefficients']}")
                scores.add(round(r.json()["results"][0]["top"][0]["score"], 6))  # each set changes the answer
        runs: dict[int, list[dict[str, Any]]] = {k: [] for k in ks}
        for rnd in range(args.rounds):
            for k in ks:
                runs[k].append(run(url, names[:k], args.clients, images, args.seconds, seed=rnd))
        resident = _metric(url, "residual_coefficient_cache_bytes")
        sets_held = _metric(url, "residual_coefficient_cache_sets")
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    base = statistics.median(r["images_per_s"] for r in runs[ks[0]])
    rows = []
    for k in ks:
        lat = sorted(x for r in runs[k] for x in r["latencies"])
        ips = statistics.median(r["images_per_s"] for r in runs[k])
        rows.append({"sets": k, "images_per_s": round(ips, 1),
                     "p95_ms": round(lat[int(0.95 * (len(lat) - 1))] * 1000, 1) if lat else None,
                     "vs_one_set": round(ips / base, 3), "errors": sum(r["errors"] for r in runs[k]),
                     "resident_bytes": int(resident), "resident_sets": int(sets_held)})
    result = {"model": args.model, "device": args.device, "clients": args.clients, "images_per_request": args.images,
              "seconds": args.seconds, "rounds": args.rounds, "distinct_answers": len(scores), "rows": rows}
    print("| sets | images/s | p95 ms | vs K=1 | errors |")  # noqa: T201
    print("|---|---|---|---|---|")  # noqa: T201
    for r in rows:
        print(f"| {r['sets']} | {r['images_per_s']} | {r['p95_ms']} | {r['vs_one_set']} | {r['errors']} |")  # noqa: T201
    print(f"resident: {int(sets_held)} sets, {resident / 2**20:.0f} MiB")  # noqa: T201
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
