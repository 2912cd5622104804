"""Soak: N concurrent clients for M seconds mixing valid and hostile requests against a real API process.

Loopback only, bounded in time (``--seconds``) and count (``--max-requests``). The API runs as its own process
(``residual-serve``) with a Redis (``RESIDUAL_REDIS_URL``, default 127.0.0.1:6379); each client thread cycles
through a fixed mix:

- valid: ``/classify`` (JSON, 1-4 world images), ``/classify`` (multipart), ``GET /heads``, ``/readyz``;
- hostile: bad base64, a PNG bomb header, truncated JPEG, 2000 classes, an unknown coefficient set, an
  injected label-set id, random bytes as JSON, a lying Content-Length.

It reports, per kind, the status codes seen; the pass criteria are zero 5xx on valid requests (429 under
overload is allowed and counted), no 5xx at all, and the server's resident memory at start (after warm-up) and
end. Exit status 1 when a criterion fails.

    python bench/soak.py --clients 8 --seconds 60 --json bench/out/soak.json
    python bench/soak.py --smoke
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from _server import start_api  # type: ignore[import-not-found]
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _png(a: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _bomb_header(side: int = 30_000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    idat = zlib.compress(b"\x00" * 1000)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) +
            chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def requests_mix() -> list[tuple[str, bool, Callable[[httpx.Client], httpx.Response]]]:
    """(name, valid, send) triples."""
    from residual.tiny import tasks

    images, _, _ = tasks.task_images("colour", "test", n=4)
    pngs = [_png(a) for a in images]
    b64 = [base64.b64encode(p).decode() for p in pngs]
    t = tasks.TASKS["colour"]
    labels = {"classes": list(t.classes), "templates": list(t.templates)}
    jpeg = io.BytesIO()
    Image.fromarray(images[0]).save(jpeg, "JPEG")
    truncated = base64.b64encode(jpeg.getvalue()[:200]).decode()
    rng = random.Random(0)
    return [
        ("classify_json", True, lambda c: c.post("/classify", json={"images": b64[: rng.randint(1, 4)],
                                                                    "label_set": labels})),
        ("classify_multipart", True, lambda c: c.post("/classify", files=[("images", ("a.png", pngs[0],
                                                                                      "image/png"))],
                                                      data={"label_set": json.dumps(labels)})),
        ("heads", True, lambda c: c.get("/heads")),
        ("readyz", True, lambda c: c.get("/readyz")),
        ("bad_base64", False, lambda c: c.post("/classify", json={"images": ["!!notbase64"], "label_set": labels})),
        ("bomb", False, lambda c: c.post("/classify", json={"images": [base64.b64encode(_bomb_header()).decode()],
                                                            "label_set": labels})),
        ("truncated_jpeg", False, lambda c: c.post("/classify", json={"images": [truncated], "label_set": labels})),
        ("too_many_classes", False, lambda c: c.post("/classify", json={
            "images": b64[:1], "label_set": {"classes": [f"c{i}" for i in range(2000)]}})),
        ("unknown_coefficients", False, lambda c: c.post("/classify", json={"images": b64[:1],
                                                                            "coefficients": "nope"})),
        ("injected_id", False, lambda c: c.post("/classify", json={"images": b64[:1],
                                                                   "label_set_id": "../../etc/passwd"})),
        ("random_json", False, lambda c: c.post("/classify", content=bytes(rng.getrandbits(8) for _ in range(512)),
                                                headers={"content-type": "application/json"})),
        ("lying_length", False, _lying_content_length),
    ]


class _RawResponse:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


def _lying_content_length(c: httpx.Client) -> Any:
    """A body far longer than its declared Content-Length, on a raw socket (HTTP clients refuse to send it)."""
    import socket

    host, port = str(c.base_url.host), int(c.base_url.port or 80)
    body = b'{"images": [' + b'"AAAA", ' * 2000 + b'"AAAA"]}'
    head = (f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 10\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head + body)
        status_line = sock.makefile("rb").readline().decode()
    return _RawResponse(int(status_line.split()[1]))


def drive(url: str, clients: int, seconds: float, max_requests: int) -> dict[str, Any]:
    mix = requests_mix()
    counts: dict[str, Counter[int]] = {name: Counter() for name, _, _ in mix}
    transport_errors: Counter[str] = Counter()
    lock = threading.Lock()
    sent = [0]
    stop_at = time.monotonic() + seconds

    def client(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            i = offset
            while time.monotonic() < stop_at:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                name, _, send = mix[i % len(mix)]
                i += 1
                try:
                    status = send(c).status_code
                except Exception as exc:  # noqa: BLE001 - a transport failure is a finding, not a crash
                    with lock:
                        transport_errors[f"{name}: {type(exc).__name__}"] += 1
                    continue
                with lock:
                    counts[name][status] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    valid = {name for name, ok, _ in mix if ok}
    five_valid = sum(n for name, c in counts.items() if name in valid for s, n in c.items() if s >= 500)
    five_all = sum(n for c in counts.values() for s, n in c.items() if s >= 500)
    return {"requests": sent[0], "statuses": {k: dict(v) for k, v in counts.items()},
            "valid_5xx": five_valid, "all_5xx": five_all, "transport_errors": dict(transport_errors),
            "valid_ok": sum(c[200] for name, c in counts.items() if name in valid)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=20_000)
    p.add_argument("--smoke", action="store_true", help="2 clients, 8 seconds")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.seconds = 2, 8.0
    env = {"RESIDUAL_ARTIFACT_DIR": tempfile.mkdtemp(prefix="soak-art-"), "RESIDUAL_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "RESIDUAL_HEADS_SAMPLE_IMAGES": "200"}
    server, url = start_api(env)
    try:
        warm = drive(url, 1, 3.0, 24)  # every kind once or twice: caches and lazy state exist before measuring
        rss_start = _rss_mib(server.pid)
        result = drive(url, args.clients, args.seconds, args.max_requests)
        rss_end = _rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result |= {"clients": args.clients, "seconds": args.seconds, "warm_up_5xx": warm["all_5xx"],
               "rss_mib_start": round(rss_start, 1), "rss_mib_end": round(rss_end, 1)}
    for name, st in result["statuses"].items():
        print(f"{name:<22} {st}")
    print(f"{result['requests']} requests from {args.clients} clients in {args.seconds:g} s: "
          f"{result['valid_ok']} valid answered 200, 5xx on valid {result['valid_5xx']}, 5xx overall "
          f"{result['all_5xx']}, transport errors {sum(result['transport_errors'].values())}; server RSS "
          f"{rss_start:.0f} -> {rss_end:.0f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["all_5xx"] == 0 and result["warm_up_5xx"] == 0 and not result["transport_errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
