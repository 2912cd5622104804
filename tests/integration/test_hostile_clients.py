"""Hostile clients and exhausted resources against a real API process, worker and Redis (issue 24).

Each attack is bounded in count and time: unauthenticated floods (answered before their body is read, with no
event-loop step over 50 ms), huge images (memory bounded, and back near the baseline after), oversized headers and
slow or idle connections (431, closed by the timeouts), a label set that would hold the model (other clients keep
their answers: an ordering property), a full Redis (the worker lives, /readyz says degraded, a finished job never
reads failed) and a full disk (507, no leftovers, other operations go on).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from residual.tiny import tasks
from tests.attacks import (
    big_png,
    idle_until_closed,
    oversized_header,
    slowloris,
    stalled_body,
    unauthenticated_body,
)
from tests.processes import api_server, rss_mib, slow_callbacks, worker_process
from tests.prom import sample_sum
from tests.redis_server import RedisServer, free_port, start_private
from tests.service.conftest import png_b64
from tests.waiting import wait_for

API, ADMIN = "hostile-api-key-0123456789", "hostile-admin-key-0123456789"
TASK = tasks.TASKS["colour"]
LABELS = {"classes": list(TASK.classes), "templates": list(TASK.templates)}


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = start_private()
    yield server
    server.stop()


def _metric(client: httpx.Client, name: str) -> float:
    """On a connection of its own: the test's pooled one may have sat idle past the server's keep-alive timeout
    (2 s in some tests here), and a request racing the server's close of it gets no answer."""
    return sample_sum(httpx.get(str(client.base_url).rstrip("/") + "/metrics", timeout=30).text, name)


# ---- unauthenticated floods -------------------------------------------------------------------------------------


def test_unauthenticated_floods_never_hold_the_event_loop(redis_server: RedisServer, tmp_path: Path) -> None:
    """Wrong-key requests announcing 16 MiB JSON bodies to every typed-body route, from 6 threads, while a normal
    client classifies: each is refused with 401 before its body is read (and its connection closed), the normal
    client gets 200s, and asyncio's slow-callback detector (50 ms) reports nothing."""
    log = tmp_path / "slow.log"
    with api_server(redis_server.url, tmp_path, debug_log=log, api_key=API, admin_api_key=ADMIN) as (c, _):
        base = str(c.base_url).rstrip("/")
        c.headers["Authorization"] = f"Bearer {API}"
        image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
        assert c.post("/classify", json={"images": [image], "label_set": LABELS}).status_code == 200  # warm
        start = log.stat().st_size
        routes = ["/v1/embeddings", "/label-sets", "/fit-alignment", "/bases", "/heads/alignment",
                  "/coefficients/x/activate", "/classify"]
        stop = threading.Event()
        normal: list[int] = []

        def classify_loop() -> None:
            while not stop.is_set():
                normal.append(c.post("/classify", json={"images": [image], "label_set": LABELS}).status_code)

        worker = threading.Thread(target=classify_loop)
        worker.start()
        try:
            with ThreadPoolExecutor(6) as pool:
                flood = list(pool.map(lambda i: unauthenticated_body(base, routes[i % len(routes)]), range(42)))
        finally:
            stop.set()
            worker.join()
        slow = slow_callbacks(log, start)
    assert all(status == 401 for status, _, _ in flood), flood
    assert all(closed for _, closed, _ in flood), "a refused request's connection stayed open"
    assert normal and set(normal) == {200}, normal
    assert slow == [], [s["what"] for s in slow[:5]]


# ---- memory ------------------------------------------------------------------------------------------------------


def _peak_rss_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM, the peak resident set (Linux >= 4.0)


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_huge_images_keep_memory_bounded_and_return_it(redis_server: RedisServer, tmp_path: Path) -> None:
    """64 PNGs of 40 megapixels (8.5 MB on the wire; 11 GB of RSS before) are refused from their headers (the
    request's pixel budget); two of them within the budget decode one at a time per thread, and the memory goes
    back near the baseline afterwards."""
    blob = big_png(6400, 6250)  # 40,000,000 pixels
    files = [("images", (f"{i}.png", blob, "image/png")) for i in range(64)]
    with api_server(redis_server.url, tmp_path) as (client, proc):
        image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
        assert client.post("/classify", json={"images": [image], "label_set": LABELS}).status_code == 200
        baseline = rss_mib(proc.pid)
        _peak_rss_reset(proc.pid)
        r = client.post("/classify", files=files, data={"label_set": json.dumps(LABELS)})
        assert r.status_code == 413
        assert r.json()["error"]["message"].startswith("the request's 64 images hold 2560000000 pixels in all")
        assert _peak_rss_mib(proc.pid) - baseline < 100  # headers only: nothing was decoded
        r = client.post("/classify", files=files[:2], data={"label_set": json.dumps(LABELS), "top_k": "1"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["top"][0]["label"] == "red"
        peak = _peak_rss_mib(proc.pid) - baseline
        assert peak < 1200, f"decoding two 40 Mpx images grew RSS by {peak:.0f} MiB"  # 2 x 120 MB of RGB + copies
        wait_for(lambda: rss_mib(proc.pid) - baseline < 150, 30, "RSS to return near the baseline")


# ---- connections -------------------------------------------------------------------------------------------------


def test_headers_and_slow_or_idle_connections_are_bounded(redis_server: RedisServer, tmp_path: Path) -> None:
    with api_server(redis_server.url, tmp_path, header_timeout_s="2", body_idle_timeout_s="2",
                    keep_alive_timeout_s="2", max_header_bytes="65536") as (client, _):
        base = str(client.base_url).rstrip("/")
        status, headers, body = oversized_header(base, 1024 * 1024)
        assert status == 431 and headers["connection"] == "close"
        assert json.loads(body)["error"] == {"type": "headers_too_large",
                                             "message": "the request line and headers exceed 65536 bytes"}
        assert oversized_header(base, 32 * 1024)[0] == 200  # under the limit
        closed = idle_until_closed(base, 30)
        assert closed is not None and closed < 10, closed  # a connection that never says anything
        status, closed = slowloris(base, 0.2, 30)
        assert status == 408 and closed is not None and closed < 10, (status, closed)
        closed = stalled_body(base, 30)
        assert closed is not None and closed < 10, closed
        held = [idle_until_closed_async(base) for _ in range(100)]  # 100 silent connections at once
        assert client.get("/livez").status_code == 200  # the server still answers meanwhile
        assert all(h.result(timeout=60) is not None for h in held)
        wait_for(lambda: _metric(client, "residual_http_request_duration_seconds_count") > 0, 10, "metrics")


_POOL = ThreadPoolExecutor(100)


def idle_until_closed_async(base: str):  # noqa: ANN201 - a Future
    return _POOL.submit(idle_until_closed, base, 30)


# ---- the model is shared fairly ----------------------------------------------------------------------------------


def test_a_huge_label_set_does_not_starve_other_clients(redis_server: RedisServer, tmp_path: Path) -> None:
    """A new label set of 1,000 classes x 10 templates (the prompt budget) takes the text encoder for seconds. It is
    encoded in chunks between which the model serves other batches: a normal classify sent once the encoding has
    started is answered while the big request is still running."""
    with api_server(redis_server.url, tmp_path) as (client, _):
        image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
        assert client.post("/classify", json={"images": [image], "label_set": LABELS}).status_code == 200
        run = uuid.uuid4().hex[:8]
        big = {"classes": [f"thing {i} {run}" for i in range(1000)],
               "templates": [f"a photo of a {{}} ({j})." for j in range(10)]}
        before = _metric(client, "residual_text_encoder_prompts_total")
        finished = threading.Event()
        answer: list[int] = []

        def big_request() -> None:
            with httpx.Client(base_url=client.base_url, timeout=600) as other:
                answer.append(other.post("/classify", json={"images": [image], "label_set": big}).status_code)
            finished.set()

        thread = threading.Thread(target=big_request)
        thread.start()
        try:
            wait_for(lambda: _metric(client, "residual_text_encoder_prompts_total") > before, 120,
                     "the big label set's encoding to start")
            r = client.post("/classify", json={"images": [image], "label_set": LABELS})
            assert r.status_code == 200
            assert not finished.is_set(), "the big request ended before the normal one: nothing was interleaved"
        finally:
            thread.join(timeout=600)
        assert answer == [200]


# ---- a full Redis ------------------------------------------------------------------------------------------------


def _fill(conn: redis.Redis, prefix: str, until_fraction: float | None = None) -> int:
    """Write values until its used memory passes ``until_fraction`` of maxmemory, or (None) until Redis refuses
    even a tiny write (64 KiB values, then 1 KiB, then 16 bytes: it is over its maxmemory)."""
    limit = int(conn.config_get("maxmemory")["maxmemory"])
    n = 0
    for size in (64 * 1024, 1024, 16):
        value = os.urandom(size)
        while True:
            if until_fraction is not None and int(conn.info("memory")["used_memory"]) >= until_fraction * limit:
                return n
            try:
                conn.set(f"{prefix}:{n}", value)
            except redis.exceptions.OutOfMemoryError:
                break
            n += 1
    return n


def test_a_full_redis_degrades_but_loses_nothing(tmp_path: Path) -> None:
    """One Redis for cache and queue (the default outside Kubernetes), 24 MiB and noeviction. Near full, the text
    cache stops writing and fits are still accepted. Full: /readyz says degraded, fits answer 503, the worker lives
    on, and a fit that finished meanwhile reads succeeded with its version active. Emptied: the worker takes jobs
    again."""
    own = start_private(None, "--maxmemory", "24mb", "--maxmemory-policy", "noeviction")
    conn = redis.Redis.from_url(own.url)
    metrics_port = free_port()
    worker = worker_process(own.url, tmp_path, worker_metrics_port=str(metrics_port))
    try:
        with api_server(own.url, tmp_path) as (client, _):
            image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
            # near full (85 % > the cache's 80 % high-water mark): a new label set is answered, not cached
            _fill(conn, "filler-a", until_fraction=0.85)
            run = uuid.uuid4().hex[:8]
            fresh = {"classes": [f"a {run}", f"b {run}"]}
            r = client.post("/classify", json={"images": [image], "label_set": fresh})
            assert r.status_code == 200
            assert not list(conn.scan_iter(f"residual:classes:*:{r.json()['label_set_id']}"))
            fit = {"name": "full-redis", "dataset": "world:colour", "variant": "full",
                   "world_sizes": {"train": 600, "val": 100, "test": 50},
                   "hyperparameters": {"epochs": 40, "patience": 40}}
            r = client.post("/fit-alignment", json=fit)
            assert r.status_code == 202, r.text
            job = r.json()["job_id"]
            wait_for(lambda: client.get(f"/fit-alignment/{job}").json()["progress"].get("phase") == "fitting", 300,
                     "the fit to start fitting")
            _fill(conn, "filler-b")  # now full: writes are refused
            ready = client.get("/readyz").json()
            assert ready["status"] == "degraded" and ready["queue"] == "refusing writes", ready
            refused = client.post("/fit-alignment", json=fit)
            assert refused.status_code == 503 and "out of memory" in refused.json()["error"]["message"]
            done = wait_for(lambda: (b := client.get(f"/fit-alignment/{job}").json())["status"] in
                            ("succeeded", "failed") and b, 600, "the fit to end while Redis is full")
            assert done["status"] == "succeeded", done
            version = done["coefficients"].split("@")[1]
            assert client.get("/coefficients/full-redis").json()["active"] == version
            assert worker.poll() is None, "the worker exited when Redis refused its writes"
            wait_for(lambda: _worker_metric(metrics_port, "residual_worker_redis_errors_total") >= 1, 120,
                     "the worker to report the refused writes")
            for key in conn.scan_iter("filler-*"):
                conn.delete(key)
            wait_for(lambda: client.get("/readyz").json()["status"] == "ready", 30, "readiness to recover")
            again = client.post("/fit-alignment", json={**fit, "name": "after-full",
                                                        "hyperparameters": {"epochs": 1}})
            assert again.status_code == 202
            after = wait_for(lambda: (b := client.get(f"/fit-alignment/{again.json()['job_id']}").json())["status"]
                             in ("succeeded", "failed") and b, 300, "the worker to take jobs again")
            assert after["status"] == "succeeded", after
            assert worker.poll() is None
    finally:
        worker.kill()
        worker.wait(timeout=30)
        own.stop()


def _worker_metric(port: int, name: str) -> float:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:
        return 0.0
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


# ---- a full disk ---------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (needs the right to mount: root in CI and here)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root; tests/service/test_limits.py::"
                    "test_a_full_disk_answers_507_and_leaves_nothing covers the same path by fault injection")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_answers_507_and_leaves_nothing(redis_server: RedisServer, small_disk: Path) -> None:
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(16):  # 16 noise PNGs of ~200 KB: 3.2 MB, more than the disk holds
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(png, "PNG")
            info = tarfile.TarInfo(f"{'red' if i % 2 else 'blue'}/{i}.png")
            info.size = len(png.getvalue())
            tf.addfile(info, io.BytesIO(png.getvalue()))
    with api_server(redis_server.url, small_disk) as (client, _):
        r = client.post("/datasets", content=buf.getvalue(), headers={"content-type": "application/x-tar"})
        assert r.status_code == 507, r.text
        assert r.json()["error"]["type"] == "insufficient_storage"
        assert list((small_disk / "datasets").glob(".ds-*")) == []  # the partial dataset is gone
        assert shutil.disk_usage(small_disk).used < 512 * 1024
        assert client.post("/label-sets", json={"classes": ["still", "works"]}).status_code == 201
        image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
        assert client.post("/classify", json={"images": [image], "label_set": LABELS}).status_code == 200
