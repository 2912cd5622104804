"""The runtime around the model: a supervised batcher, one readiness predicate, single-flight caches, a byte-bounded
coefficient cache, and an event loop that never blocks (asyncio's slow-callback detection under load)."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from residual import Basis, init_coefficients
from residual.tiny import tasks
from residual.tiny.reference import shipped_basis_path
from service.api.app import create_app
from service.engine.text_cache import TEXT_CHUNK
from service.errors import BackendUnavailable
from tests.processes import ROOT, api_server, slow_callbacks
from tests.service.conftest import make_settings, metric, png_b64, wait_ready
from tests.waiting import wait_for

LABELS = {"classes": list(tasks.TASKS["colour"].classes), "templates": list(tasks.TASKS["colour"].templates)}


@pytest.fixture(scope="module")
def app_client(artifacts: Path, redis_server) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(artifacts, redis_server.url, max_wait_ms=20.0))) as c:
        wait_ready(c)
        yield c


def _classify_ok(client: TestClient) -> None:
    good = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    r = client.post("/classify", json={"images": [good], "label_set": LABELS})
    assert r.status_code == 200, r.text


def test_a_failing_batch_fails_only_its_requests(app_client: TestClient) -> None:
    """Pixels that cannot be concatenated fail inside the batch (torch.cat); before, that killed the loop silently
    and every later request timed out while readiness stayed 200."""
    batcher = app_client.app.state.runtime.ready.batcher
    errors_before = metric(app_client, "residual_backbone_errors_total")

    async def one_bad_batch() -> list[object]:
        good, bad = torch.zeros(1, 3, 48, 48), torch.zeros(1, 3, 32, 32)
        return await asyncio.gather(batcher.submit(good), batcher.submit(bad), return_exceptions=True)

    results = app_client.portal.call(one_bad_batch)
    assert all(isinstance(r, BackendUnavailable) for r in results), results
    assert metric(app_client, "residual_backbone_errors_total") == errors_before + 1
    assert batcher.healthy and app_client.get("/readyz").status_code == 200
    _classify_ok(app_client)  # the next batch runs


def test_a_dead_batcher_loop_turns_readiness_503_and_restarts(app_client: TestClient) -> None:
    batcher = app_client.app.state.runtime.ready.batcher
    restarts = metric(app_client, "residual_batcher_restarts_total")

    async def kill_loop() -> None:
        assert batcher._task is not None
        batcher._task.cancel()
        await asyncio.sleep(0)

    app_client.portal.call(kill_loop)
    body = wait_for(lambda: (r := app_client.get("/readyz")).status_code == 503 and r.json(), 5,
                    "readiness to report the dead batcher")
    assert "batcher" in body["error"]["message"]
    good = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    r = app_client.post("/classify", json={"images": [good], "label_set": LABELS})
    assert r.status_code == 503 and r.json()["error"]["message"] == body["error"]["message"]  # the same predicate
    wait_for(lambda: app_client.get("/readyz").status_code == 200, 10, "the batcher to restart")
    assert metric(app_client, "residual_batcher_restarts_total") == restarts + 1
    _classify_ok(app_client)


def test_text_encoding_is_single_flight(app_client: TestClient) -> None:
    ready = app_client.app.state.runtime.ready
    model = ready.model
    run = uuid.uuid4().hex[:8]  # prompts never seen by this Redis (it may be shared and outlive the test)
    classes = [f"single-flight class {i} {run}" for i in range(40)]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    encodes = model.text_forwards
    shared = metric(app_client, "residual_text_encodes_shared_total")
    barrier = threading.Barrier(8)

    def call(_: int) -> torch.Tensor:
        barrier.wait()
        return ready.text.class_embeddings(f"ls-single-flight-{run}", classes, templates)

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(call, range(8)))
    # one encoding for eight concurrent first requests: 80 prompts in chunks of TEXT_CHUNK (64), two forwards
    assert model.text_forwards - encodes == math.ceil(len(classes) * len(templates) / TEXT_CHUNK) == 2
    assert metric(app_client, "residual_text_encodes_shared_total") - shared >= 1
    assert all(torch.equal(o, out[0]) for o in out)


def _write_sets(artifacts: Path, n: int) -> list[str]:
    basis = Basis.load(shipped_basis_path())
    refs = []
    for i in range(n):
        cs = init_coefficients("full", basis, LABELS["classes"], LABELS["templates"])
        cs.lambdas = cs.lambdas * (1 + 0.01 * i)  # distinct content per set
        folder = artifacts / "coefficients" / f"lru-{i}"
        cs.save(folder / "v-1.safetensors")
        (folder / "ACTIVE").write_text("v-1")
        refs.append(f"lru-{i}@v-1")
    return refs


def test_coefficient_cache_is_byte_bounded_and_single_flight(tmp_path: Path, redis_server) -> None:
    refs = _write_sets(tmp_path, 4)
    with TestClient(create_app(make_settings(tmp_path, redis_server.url))) as probe:
        wait_ready(probe)
        one = probe.app.state.runtime.ready.coefficients.resolve(refs[0]).nbytes
    limit = int(2.5 * one)  # room for two sets
    with TestClient(create_app(make_settings(tmp_path, redis_server.url, coefficient_cache_bytes=limit))) as c:
        wait_ready(c)
        store = c.app.state.runtime.ready.coefficients
        barrier = threading.Barrier(6)

        def load(_: int) -> str:
            barrier.wait()
            return store.resolve("lru-0").ref

        with ThreadPoolExecutor(6) as pool:
            assert set(pool.map(load, range(6))) == {refs[0]}
        assert metric(c, "residual_coefficient_sets_loaded_total") == 1  # six concurrent first requests, one load
        assert metric(c, "residual_coefficient_cache_lookups_total", 'result="miss"') == 1
        for ref in refs[1:]:
            store.resolve(ref)
        assert metric(c, "residual_coefficient_cache_sets") == 2
        assert metric(c, "residual_coefficient_cache_evictions_total") == 2
        assert 0 < metric(c, "residual_coefficient_cache_bytes") <= limit
        assert refs[0] not in store.cache and refs[3] in store.cache  # least recently used went
        good = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
        r = c.post("/classify", json={"images": [good], "coefficients": "lru-0"})  # evicted sets load again
        assert r.status_code == 200 and r.json()["coefficients"] == refs[0]
        assert metric(c, "residual_coefficient_sets_loaded_total") == 5


def test_no_callback_holds_the_event_loop_over_50_ms_under_load(tmp_path: Path, redis_server) -> None:
    """The API as its own process (tests/debug_server.py) on an asyncio loop in debug mode with
    slow_callback_duration = 50 ms, under 12 s of mixed load from two other processes: JSON and multipart classify,
    a coefficient set, label sets, metrics scrapes (Redis job counts), coefficient listings, head details, job
    submissions and readiness. asyncio reports every step over 50 ms; the steady state must have none. Start-up and
    each request kind's first use (the head spectra, the dictionary) come before the measurement."""
    _write_sets(tmp_path, 1)
    log = tmp_path / "slow.log"
    with api_server(redis_server.url, tmp_path, debug_log=log) as (c, _):
        base = str(c.base_url).rstrip("/")
        warm = subprocess.run([sys.executable, "-m", "tests.loadgen", base, "0", "warmup"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, check=True)
        assert set(json.loads(warm.stdout)) <= {200, 201, 202}, warm.stdout
        start = log.stat().st_size
        gens = [subprocess.Popen([sys.executable, "-m", "tests.loadgen", base, "12", kind], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True) for kind in ("classify", "admin")]
        codes = [code for g in gens for code in json.loads(g.communicate(timeout=300)[0])]
        slow = slow_callbacks(log, start)
    assert all(g.returncode == 0 for g in gens)
    assert len(codes) > 30 and set(codes) <= {200, 201, 202}, sorted(set(codes))
    assert slow == [], [s["what"] for s in slow[:5]]


def test_stopping_a_pool_with_a_cancelled_queued_call() -> None:
    """A request that gave up leaves a cancelled call in the queue; stopping the pool (shutdown) must fail the
    other queued calls and not raise on that one (it raised InvalidStateError in a test teardown)."""
    from concurrent.futures import CancelledError

    from service.engine.pools import Pool

    pool = Pool(1, "stop-test")
    gate = threading.Event()
    running = pool.submit(gate.wait)  # occupies the only thread
    wait_for(running.running, 5, "the first call to start")
    queued = pool.submit(lambda: 1)
    given_up = pool.submit(lambda: 2)
    assert given_up.cancel()
    pool.stop()
    gate.set()
    assert running.result(timeout=5) is True
    with pytest.raises(BackendUnavailable):
        queued.result(timeout=5)
    with pytest.raises(CancelledError):
        given_up.result(timeout=5)
