"""A bounded mixed load for a running API, as its own process (so its threads never compete with the server's
event loop for the GIL): ``python -m tests.loadgen URL SECONDS KIND`` prints the status codes as JSON.

KIND: ``classify`` (JSON and multipart /classify, with and without a coefficient set named ``lru-0``), ``admin``
(metrics, coefficient listings, readiness, label sets, fit submissions, head details), or ``warmup`` (each kind of
request once, including the first /heads, whose spectra are computed then).
"""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time

import httpx
from PIL import Image

from residual.tiny import tasks

LABELS = {"classes": list(tasks.TASKS["colour"].classes), "templates": list(tasks.TASKS["colour"].templates)}


def _pngs() -> list[bytes]:
    out = []
    for a in tasks.task_images("colour", "test", n=64)[0]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def classify(c: httpx.Client, deadline: float, i: int, blobs: list[bytes]) -> list[int]:
    codes = []
    k = 0
    while time.monotonic() < deadline:
        k += 1
        if (i + k) % 2:
            body: dict[str, object] = {"images": [base64.b64encode(b).decode() for b in blobs[i : i + 8]],
                                       "label_set": LABELS}
            if k % 3 == 0:
                body["coefficients"] = "lru-0"
            codes.append(c.post("/classify", json=body).status_code)
        else:
            files = [("images", (f"{j}.png", blobs[(i + j) % 64], "image/png")) for j in range(8)]
            codes.append(c.post("/classify", files=files,
                                data={"label_set": '{"classes": ["red", "green", "blue"]}'}).status_code)
    return codes


def admin(c: httpx.Client, deadline: float, i: int, blobs: list[bytes]) -> list[int]:
    codes = []
    k = 0
    while time.monotonic() < deadline:
        k += 1
        codes += [c.get("/metrics").status_code, c.get("/coefficients").status_code, c.get("/readyz").status_code,
                  c.post("/label-sets", json={"classes": [f"a{i}-{k}", f"b{i}-{k}"]}).status_code,
                  c.post("/fit-alignment", json={"name": "loop-check", "dataset": "world:colour",
                                                 "variant": "coarse"}).status_code,
                c.get("/heads").status_code, c.get("/heads/2/1?atoms=3").status_code]
    return codes


def warmup(c: httpx.Client, deadline: float, i: int, blobs: list[bytes]) -> list[int]:
    """Every request kind once (first-use costs: lazy imports, the head spectra and dictionary)."""
    codes = [c.get("/heads").status_code, c.get("/heads/2/1?atoms=3").status_code]
    codes += classify(c, time.monotonic() + 0.5, 0, blobs) + classify(c, time.monotonic() + 0.5, 1, blobs)
    return codes + admin(c, time.monotonic() + 0.5, i, blobs)


def main() -> int:
    url, seconds, kind = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    blobs = _pngs()
    work = {"classify": classify, "admin": admin, "warmup": warmup}[kind]
    threads = 6 if kind == "classify" else 1
    deadline = time.monotonic() + seconds
    codes: list[int] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            got = work(c, deadline, i * 8, blobs)
        with lock:
            codes.extend(got)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(json.dumps(codes))  # noqa: T201 - the result for the parent process
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
