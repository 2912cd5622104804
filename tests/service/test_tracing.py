"""Traces with the OpenTelemetry SDK's in-memory exporter: the span tree of one /classify (two requests sharing a
batch link to each other), of one fit and of one basis build (each job, run here by RQ's own worker loop, continues
the trace of the request that enqueued it). Tracing off: the tracing SDK is not even imported.

The app runs in process against the real model and a private Redis (its queue is this test's alone).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from residual.tiny import tasks
from service import tracing
from service.api.app import create_app
from service.jobs.queue import QUEUE_NAME
from tests.processes import ROOT
from tests.redis_server import RedisServer, start_private
from tests.service.conftest import make_settings, png_b64, wait_ready
from tests.waiting import wait_for

TASK = tasks.TASKS["colour"]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    server = start_private()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, private_redis: RedisServer
           ) -> Iterator[tuple[TestClient, InMemorySpanExporter, Path]]:
    exporter = InMemorySpanExporter()
    assert tracing.configure("residual-test", exporter=exporter)
    artifacts = tmp_path_factory.mktemp("traced")
    try:
        # batches wait up to 300 ms to fill: two requests sent together share one forward
        app = create_app(make_settings(artifacts, private_redis.url, max_wait_ms=300.0))
        with TestClient(app) as client:
            wait_ready(client)
            yield client, exporter, artifacts
    finally:
        tracing.shutdown()


def _tree(spans: list[ReadableSpan], trace_id: int) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans if s.context.trace_id == trace_id}


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_span_tree_of_one_classify(traced: tuple[TestClient, InMemorySpanExporter, Path]) -> None:
    client, exporter, _ = traced
    exporter.clear()
    images = tasks.task_images("colour", "test", n=3)[0]
    answers: dict[int, Any] = {}
    start = threading.Barrier(2)

    def send(i: int, trace_id: str) -> None:
        start.wait()
        answers[i] = client.post("/classify", headers={"traceparent": f"00-{trace_id}-{'1' * 15}{i}-01"},
                                 json={"images": [png_b64(a) for a in images[i:i + 2]],
                                       "label_set": {"classes": list(TASK.classes)}})

    other = "f" * 32
    threads = [threading.Thread(target=send, args=(0, TRACE_ID)), threading.Thread(target=send, args=(1, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers[0].status_code == 200 and answers[1].status_code == 200
    names = {"POST /classify", "decode", "text embeddings", "batcher wait", "backbone forward", "apply coefficients"}
    spans = wait_for(lambda: (lambda t: t if names <= set(t) else None)(
        _tree(list(exporter.get_finished_spans()), int(TRACE_ID, 16))), 30, "the classify spans")
    root = spans["POST /classify"]
    assert root.kind.name == "SERVER" and _parent(root) == int("1" * 15 + "0", 16)  # the caller's span
    assert root.attributes["http.route"] == "/classify" and root.attributes["http.response.status_code"] == 200
    for name in names - {"POST /classify"}:
        assert _parent(spans[name]) == root.context.span_id, name
        assert root.start_time <= spans[name].start_time <= spans[name].end_time <= root.end_time, name
    wait, forward = spans["batcher wait"], spans["backbone forward"]
    assert wait.end_time == forward.start_time  # the wait ends when the forward begins
    assert spans["decode"].end_time <= wait.start_time
    assert forward.end_time <= spans["apply coefficients"].start_time
    # one forward for both requests: its size, and a link to the other request's trace
    assert forward.attributes["residual.batch_size"] == 4 and forward.attributes["residual.batch_requests"] == 2
    assert [link.context.trace_id for link in forward.links] == [int(other, 16)]
    twin = _tree(list(exporter.get_finished_spans()), int(other, 16))["backbone forward"]
    assert (twin.start_time, twin.end_time) == (forward.start_time, forward.end_time)
    assert [link.context.trace_id for link in twin.links] == [int(TRACE_ID, 16)]


def test_span_tree_of_one_fit_and_one_basis_build(traced: tuple[TestClient, InMemorySpanExporter, Path],
                                                  private_redis: RedisServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    client, exporter, artifacts = traced
    exporter.clear()
    trace_id = "1" * 32
    r = client.post("/fit-alignment", headers={"traceparent": f"00-{trace_id}-{'2' * 16}-01"},
                    json={"name": "traced-fit", "dataset": "world:colour", "variant": "auto",
                          "world_sizes": {"train": 60, "val": 30, "test": 30}, "hyperparameters": {"epochs": 2}})
    assert r.status_code == 202, r.text
    # the worker: RQ's own loop, in this process (its settings from the environment, as residual-worker's)
    monkeypatch.setenv("RESIDUAL_ARTIFACT_DIR", str(artifacts))
    monkeypatch.setenv("RESIDUAL_REDIS_URL", private_redis.url)
    monkeypatch.setenv("RESIDUAL_DEVICE", "cpu")
    conn = redis.Redis.from_url(private_redis.url)
    worker = SimpleWorker([Queue(QUEUE_NAME, connection=conn, serializer=JSONSerializer)], connection=conn,
                          serializer=JSONSerializer)
    assert worker.work(burst=True, with_scheduler=False)
    assert client.get(r.json()["status_url"]).json()["status"] == "succeeded"
    spans = _tree(list(exporter.get_finished_spans()), int(trace_id, 16))
    request, job = spans["POST /fit-alignment"], spans["job fit-alignment"]
    assert _parent(request) == int("2" * 16, 16)
    assert _parent(job) == request.context.span_id and job.kind.name == "CONSUMER"  # carried in the job payload
    assert job.attributes["residual.job_id"] == r.json()["job_id"]
    assert _parent(spans["extract features"]) == job.context.span_id
    fits = [s for s in exporter.get_finished_spans() if s.name.startswith("fit ")]
    assert sorted(s.name for s in fits) == ["fit coarse", "fit fine", "fit full", "fit linear"]  # "auto": four
    for s in fits:
        assert _parent(s) == job.context.span_id
        assert spans["extract features"].end_time <= s.start_time
        assert s.attributes["residual.epochs"] >= 1

    # a basis build continues its request's trace the same way
    basis_trace = "3" * 32
    r = client.post("/bases", headers={"traceparent": f"00-{basis_trace}-{'4' * 16}-01"},
                    json={"name": "traced-basis", "dataset": "world:mixture", "max_images": 64})
    assert r.status_code == 202, r.text
    assert worker.work(burst=True, with_scheduler=False)
    assert client.get(r.json()["status_url"]).json()["status"] == "succeeded"
    spans = _tree(list(exporter.get_finished_spans()), int(basis_trace, 16))
    assert _parent(spans["job basis"]) == spans["POST /bases"].context.span_id
    assert _parent(spans["build basis"]) == spans["job basis"].context.span_id
    assert spans["build basis"].attributes["residual.images"] == 64


def test_tracing_off_imports_nothing() -> None:
    """The default (OTEL_TRACES_EXPORTER unset): the API and the worker never load the tracing SDK (redis-py loads
    OpenTelemetry's metrics API for its own use; that is not ours), and the app has no tracing middleware."""
    code = ("import sys; from service import tracing; from service.api.app import create_app; "
            "from service.api.middleware import Tracing; import service.jobs.worker; "
            "assert not tracing.configure('x'); app = create_app(); "
            "assert not any(m.cls is Tracing for m in app.user_middleware), 'middleware'; "
            "assert 'opentelemetry.sdk.trace' not in sys.modules, 'imported'")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "service.api.server"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "OTEL_TRACES_EXPORTER": "jaeger"}, timeout=300)
    assert bad.returncode == 2
    assert "OTEL_TRACES_EXPORTER=jaeger: 'jaeger' is not one of otlp, console, none" in bad.stderr
