"""Normal traffic under attack: the latency of a well-behaved client while each hostile client of issue 24 runs,
against a baseline measured in the same run, on one real API process (loopback only, bounded in time).

Attacks (each runs alone for ``--seconds`` while the normal client classifies one image with a cached label set):

- ``unauthenticated_flood``: 6 threads announcing 16 MiB JSON bodies with a wrong key (refused before the body);
- ``huge_images``: 64 PNGs of 40 megapixels per request (refused from their headers);
- ``oversized_headers``: 1 MiB headers (431);
- ``slow_connections``: 20 slowloris connections and 100 silent ones (closed by the timeouts);
- ``big_label_sets``: new label sets of 1,000 classes x 10 templates with the API key (encoded in chunks).

    python bench/attacks.py --seconds 15 --json bench/out/attacks.json
    python bench/attacks.py --smoke
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from _server import start_api  # type: ignore[import-not-found]
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.attacks import (  # noqa: E402 - after the path: the attack clients are shared with the tests
    big_png,
    idle_until_closed,
    oversized_header,
    slowloris,
    unauthenticated_body,
)

API_KEY, ADMIN_KEY = "bench-api-key-0123456789abcdef", "bench-admin-key-0123456789abcdef"


def _normal_request() -> tuple[dict[str, Any], dict[str, str]]:
    from residual.tiny import tasks

    task = tasks.TASKS["colour"]
    buf = io.BytesIO()
    Image.fromarray(tasks.task_images("colour", "test", n=1)[0][0]).save(buf, "PNG")
    body = {"images": [base64.b64encode(buf.getvalue()).decode()],
            "label_set": {"classes": list(task.classes), "templates": list(task.templates)}}
    return body, {"Authorization": f"Bearer {API_KEY}"}


def _measure(url: str, seconds: float) -> dict[str, Any]:
    """The normal client: sequential classify requests for ``seconds``; latencies in ms and status counts."""
    body, headers = _normal_request()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()  # status -> count, keyed by str as in the JSON file
    stop = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=120, headers=headers) as c:
        while time.monotonic() < stop:
            started = time.perf_counter()
            r = c.post("/classify", json=body)
            latencies.append(1000 * (time.perf_counter() - started))
            statuses[str(r.status_code)] += 1
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {"requests": len(latencies), "p50_ms": round(statistics.median(latencies), 1), "p95_ms": round(q[18], 1),
            "statuses": dict(statuses)}


def _until(stop: threading.Event, fn: Callable[[], object], outcomes: Counter[str], lock: threading.Lock) -> None:
    while not stop.is_set():
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - an attack's transport error is an outcome, not a crash
            out = type(exc).__name__
        with lock:
            outcomes[str(out)] += 1


def _attacks(url: str) -> dict[str, tuple[int, Callable[[], object]]]:
    """name -> (attacker threads, one attack)."""
    huge = big_png(6400, 6250)
    files = [("images", (f"{i}.png", huge, "image/png")) for i in range(64)]
    label = json.dumps({"classes": ["red", "blue"]})
    admin = {"Authorization": f"Bearer {API_KEY}"}

    def huge_images() -> object:
        r = httpx.post(f"{url}/classify", files=files, data={"label_set": label}, headers=admin, timeout=120)
        return r.status_code

    def big_label_set() -> object:
        run = uuid.uuid4().hex[:8]
        big = {"classes": [f"thing {i} {run}" for i in range(1000)],
               "templates": [f"a photo of a {{}} ({j})." for j in range(10)]}
        body, _ = _normal_request()
        r = httpx.post(f"{url}/classify", json={**body, "label_set": big}, headers=admin, timeout=600)
        return r.status_code

    return {
        "unauthenticated_flood": (6, lambda: unauthenticated_body(url, "/label-sets")[0]),
        "huge_images": (2, huge_images),
        "oversized_headers": (2, lambda: oversized_header(url, 1024 * 1024)[0]),
        "slow_connections": (20, lambda: slowloris(url, 0.5, 60)[0]),
        "idle_connections": (100, lambda: idle_until_closed(url, 60) is not None),
        "big_label_sets": (1, big_label_set),
    }


def run(seconds: float, only: list[str] | None = None) -> dict[str, Any]:
    env = {"RESIDUAL_ARTIFACT_DIR": tempfile.mkdtemp(prefix="attacks-art-"), "RESIDUAL_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "RESIDUAL_API_KEY": API_KEY, "RESIDUAL_ADMIN_API_KEY": ADMIN_KEY,
           "RESIDUAL_HEADER_TIMEOUT_S": "3", "RESIDUAL_BODY_IDLE_TIMEOUT_S": "3"}
    server, url = start_api(env)
    rows = []
    try:
        _measure(url, 1.0)  # warm: the label set's embedding is cached from here on
        baseline = _measure(url, seconds)
        rows.append({"attack": "none (baseline)", **baseline, "vs_baseline_p50": 1.0, "attack_outcomes": {}})
        for name, (threads, attack) in _attacks(url).items():
            if only and name not in only:
                continue
            stop, lock, outcomes = threading.Event(), threading.Lock(), Counter[str]()
            workers = [threading.Thread(target=_until, args=(stop, attack, outcomes, lock), daemon=True)
                       for _ in range(threads)]
            for w in workers:
                w.start()
            measured = _measure(url, seconds)
            stop.set()
            for w in workers:
                w.join(timeout=120)
            rows.append({"attack": name, **measured,
                         "vs_baseline_p50": round(measured["p50_ms"] / max(baseline["p50_ms"], 1e-9), 2),
                         "attack_outcomes": dict(outcomes)})
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {"seconds": seconds, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0, help="per attack, and for the baseline")
    p.add_argument("--only", nargs="*", default=None, help="attack names to run (default: all)")
    p.add_argument("--smoke", action="store_true", help="3 s per attack")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = run(3.0 if args.smoke else args.seconds, args.only)
    print(f"{'attack':<24}{'requests':>9}{'p50 ms':>9}{'p95 ms':>9}{'p50 x':>7}  normal statuses / attack outcomes")
    for row in result["rows"]:
        print(f"{row['attack']:<24}{row['requests']:>9}{row['p50_ms']:>9}{row['p95_ms']:>9}"
              f"{row['vs_baseline_p50']:>7}  {row['statuses']} / {row['attack_outcomes']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    ok = all(set(row["statuses"]) == {"200"} for row in result["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
