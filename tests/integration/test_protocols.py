"""The ecosystem's protocols against real processes: one API process (an API key, images by URL allowed from a
loopback image server, traces to the console exporter, JSON logs), one worker (traces, metrics port), a private
Redis, and loopback HTTP servers this test starts.

- Open Inference Protocol with Triton's own client (``tritonclient.http``): health, metadata, ``infer`` with binary
  data and with JSON tensors; the probabilities equal ``/classify`` with ``top_k`` = C; errors carry
  ``{"error": "..."}`` (404 unknown model, 401 without the key, 422 a bad input).
- Images by URL: a URL gives the same scores as the bytes (``/classify``, ``/v1/embeddings``, v2); a redirect from
  an allowlisted host to a refused address, the metadata address, a name resolving to loopback, an oversized
  body (announced and not), a server that trickles bytes, endless redirects: each refused with a 4xx naming the
  problem, while a request sent at the same time answers 200.
- Traces: a ``/classify`` sent with a ``traceparent`` is exported with that trace id (the HTTP span, decode, the
  batcher's wait and forward, the coefficient application), and its access log line carries the trace id; a fit
  enqueued with a ``traceparent`` is continued by the worker (``job fit-alignment``, ``extract features``, ``fit``).
- Monitoring: every metric the Grafana dashboard and the alert rules of ``deploy/monitoring`` name exists in the
  ``/metrics`` of the API or of the worker.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import yaml
from PIL import Image
from tritonclient.utils import InferenceServerException

from residual.tiny import tasks
from tests.processes import ROOT, api_server, worker_process
from tests.redis_server import RedisServer, free_port, start_private
from tests.waiting import wait_for

TASK = tasks.TASKS["colour"]
KEY = "k" * 32
AUTH = {"Authorization": f"Bearer {KEY}"}  # tritonclient writes into the headers it is given: pass a copy
MAX_BYTES = 1024 * 1024  # the API's request body limit, and so the cap of one download
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
MONITORING = ROOT / "deploy" / "monitoring"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


# ---- a loopback image server ------------------------------------------------------------------------------------


class ImageServer:
    """Serves ``/img/<i>.png``, redirects (``/redirect?to=``, ``/loop`` to itself), oversized bodies (``/big``,
    ``/big-chunked``) and a trickle (``/trickle``: one byte every 0.2 s); records every path it was asked for."""

    def __init__(self, images: list[bytes]) -> None:
        self.images = images
        self.paths: list[str] = []
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.paths.append(self.path)
                url = urlsplit(self.path)
                if url.path.startswith("/img/"):
                    body = server.images[int(url.path.split("/")[-1].split(".")[0])]
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif url.path == "/loop":  # redirects to itself, forever
                    self.send_response(301)
                    self.send_header("Location", "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif url.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(url.query)["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif url.path == "/big":
                    self.send_response(200)
                    self.send_header("Content-Length", str(MAX_BYTES + 1))
                    self.end_headers()
                elif url.path == "/big-chunked":  # no length announced: the cap applies while it streams
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk = server.images[0] + b"\0" * 65536
                    try:
                        for _ in range(MAX_BYTES // len(chunk) + 2):
                            self.wfile.write(chunk)
                    except OSError:
                        pass
                elif url.path == "/trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.images[0])))
                    self.end_headers()
                    try:
                        for b in server.images[0]:
                            if server.stop.wait(0.2):
                                return
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                    except OSError:
                        pass
                else:
                    self.send_error(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- the deployment -----------------------------------------------------------------------------------------------


class Deployment:
    def __init__(self, client: httpx.Client, out: Path, worker_out: Path, worker_metrics: str, images: ImageServer,
                 other: ImageServer, blobs: list[bytes]) -> None:
        self.client, self.out, self.worker_out, self.worker_metrics = client, out, worker_out, worker_metrics
        self.images, self.other, self.blobs = images, other, blobs

    @property
    def base(self) -> str:
        return str(self.client.base_url).rstrip("/")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("protocols")
    redis: RedisServer = start_private()
    blobs = [_png(a) for a in tasks.task_images("colour", "test", n=4)[0]]
    images, other = ImageServer(blobs), ImageServer(blobs)  # other: a loopback port the allowlist does not name
    traced = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    metrics_port = free_port()
    worker = worker_process(redis.url, tmp / "artifacts", output=tmp / "worker", env_extra=traced,
                            worker_metrics_port=str(metrics_port))
    try:
        with api_server(redis.url, tmp / "artifacts", output=tmp / "api", env_extra=traced, log_level="info",
                        api_key=KEY, admin_api_key=KEY[:-1] + "a", max_request_bytes=str(MAX_BYTES),
                        image_url_allowlist=f"127.0.0.1:{images.port},localhost,0.0.0.0/0",
                        image_url_timeout_s="2") as (client, _):
            client.headers.update(AUTH)
            yield Deployment(client, tmp / "api", tmp / "worker", f"http://127.0.0.1:{metrics_port}/metrics", images,
                             other, blobs)
    finally:
        worker.terminate()  # its SIGTERM behaviour is tests/integration/test_worker_lifecycle.py's subject
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:  # seen once in CI, not reproduced: never leave a worker behind
            worker.kill()
            worker.wait(timeout=30)
        images.close()
        other.close()
        redis.stop()


def _classify(d: Deployment, images: list[str], **headers: str) -> dict[str, Any]:
    r = d.client.post("/classify", json={"images": images, "label_set": {"classes": list(TASK.classes)},
                                         "top_k": len(TASK.classes)}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _matrix(answer: dict[str, Any]) -> np.ndarray:
    """(n, C) in the order of the task's classes."""
    return np.array([[{p["label"]: p["score"] for p in res["top"]}[c] for c in TASK.classes]
                     for res in answer["results"]])


def _b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


# ---- Open Inference Protocol ----------------------------------------------------------------------------------------


def _bytes_input(name: str, values: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def test_open_inference_protocol_with_tritonclient(deployment: Deployment) -> None:
    d = deployment
    c = triton.InferenceServerClient(d.base.removeprefix("http://"))
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("residual-tiny", headers=dict(AUTH))
    meta = c.get_model_metadata("residual-tiny", headers=dict(AUTH))
    assert meta["name"] == "residual-tiny" and meta["versions"] == [d.client.get("/readyz").json()["weights_id"]]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["inputs"]} == {
        ("images", "BYTES", (-1,)), ("labels", "BYTES", (-1,))}
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["outputs"]} == {
        ("probabilities", "FP32", (-1, -1)), ("labels", "BYTES", (-1,))}
    expected = _matrix(_classify(d, [_b64(b) for b in d.blobs]))
    labels = [x.encode() for x in TASK.classes]

    # binary data both ways (tritonclient's default when no output is named)
    result = c.infer("residual-tiny", [_bytes_input("images", d.blobs, True), _bytes_input("labels", labels, True)],
                     headers=dict(AUTH))
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 4 * len(d.blobs) * len(labels)
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (len(d.blobs), len(labels))
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    assert list(result.as_numpy("labels")) == labels

    # JSON tensors both ways (images as base64 strings)
    result = c.infer("residual-tiny", [_bytes_input("images", [_b64(b).encode() for b in d.blobs], False),
                                       _bytes_input("labels", labels, False)],
                     outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)], headers=dict(AUTH))
    assert "parameters" not in result.get_response()["outputs"][0]  # JSON data, not binary
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5, rtol=0)

    # errors: the protocol's body and status codes, through the same authentication and validation
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as err:
        c.infer("nope", [_bytes_input("images", d.blobs, True)], headers=dict(AUTH))
    assert err.value.status() == "404"
    r = httpx.post(f"{d.base}/v2/models/residual-tiny/infer", json={"inputs": []})
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    r = d.client.post("/v2/models/residual-tiny/infer", json={"inputs": [
        {"name": "images", "shape": [2], "datatype": "BYTES", "data": [_b64(d.blobs[0])]}]})
    assert r.status_code == 422
    assert r.json() == {"error": "input 'images' has shape [2] (2 elements) but 1 elements"}
    r = d.client.post("/v2/models/residual-tiny/infer", json={"inputs": [
        {"name": "images", "shape": [1], "datatype": "FP32", "data": [1.0]}]})
    assert r.status_code == 422 and "must be BYTES" in r.json()["error"]


def test_v2_parameters_coefficients_free_templates_and_label_set_id(deployment: Deployment) -> None:
    """``templates`` and ``label_set_id`` change the answer exactly as in /classify."""
    d = deployment
    templates = ["a {} thing.", "something {}."]
    r = d.client.post("/classify", json={"images": [_b64(b) for b in d.blobs], "top_k": len(TASK.classes),
                                         "label_set": {"classes": list(TASK.classes), "templates": templates}})
    expected = _matrix(r.json())
    body = {"inputs": [{"name": "images", "shape": [len(d.blobs)], "datatype": "BYTES",
                        "data": [_b64(b) for b in d.blobs]},
                       {"name": "labels", "shape": [len(TASK.classes)], "datatype": "BYTES",
                        "data": list(TASK.classes)}],
            "parameters": {"templates": json.dumps(templates)}}
    r = d.client.post("/v2/models/residual-tiny/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    got = np.array(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    ls = d.client.post("/label-sets", json={"classes": list(TASK.classes), "templates": templates},
                       headers={"Authorization": f"Bearer {KEY[:-1]}a"})
    assert ls.status_code in (200, 201), ls.text
    r = d.client.post("/v2/models/residual-tiny/infer", json={
        "inputs": body["inputs"][:1], "parameters": {"label_set_id": ls.json()["label_set_id"]}})
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["labels"]["data"] == list(TASK.classes)
    np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(expected.shape), expected, atol=1e-5)


# ---- images by URL ------------------------------------------------------------------------------------------------


def test_a_url_gives_the_same_scores_as_its_bytes(deployment: Deployment) -> None:
    d = deployment
    urls = [d.images.url(f"/img/{i}.png") for i in range(len(d.blobs))]
    by_bytes = _matrix(_classify(d, [_b64(b) for b in d.blobs]))
    np.testing.assert_allclose(_matrix(_classify(d, urls)), by_bytes, atol=1e-6, rtol=0)
    mixed = [urls[0], _b64(d.blobs[1]), urls[2], _b64(d.blobs[3])]
    np.testing.assert_allclose(_matrix(_classify(d, mixed)), by_bytes, atol=1e-6, rtol=0)
    # /v1/embeddings and the v2 images input (a URL string as a binary element)
    e_url = d.client.post("/v1/embeddings", json={"input": urls[:2], "modality": "image"}).json()["data"]
    e_b64 = d.client.post("/v1/embeddings", json={"input": [_b64(b) for b in d.blobs[:2]],
                                                  "modality": "image"}).json()["data"]
    np.testing.assert_allclose([e["embedding"] for e in e_url], [e["embedding"] for e in e_b64], atol=1e-6)
    c = triton.InferenceServerClient(d.base.removeprefix("http://"))
    result = c.infer("residual-tiny", [_bytes_input("images", [u.encode() for u in urls], True),
                                       _bytes_input("labels", [x.encode() for x in TASK.classes], True)],
                     headers=dict(AUTH))
    np.testing.assert_allclose(result.as_numpy("probabilities"), by_bytes, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("path", "status", "message"), [
    # an allowlisted host redirecting to a loopback port that no entry names
    ("redirect-loopback", 422, r"redirect http://localhost:\d+/img/0.png: 'localhost' resolves to "
                               r"(127\.0\.0\.1|::1), a loopback address"),
    # the cloud metadata address: refused before any connection, though 0.0.0.0/0 is on the allowlist
    ("metadata", 422, r"169\.254\.169\.254, a link-local address"),
    ("redirect-metadata", 422, r"169\.254\.169\.254, a link-local address"),
    # a name that resolves to loopback (localhost is allowlisted by name; the address is not named for this port)
    ("localhost", 422, r"'localhost' resolves to (127\.0\.0\.1|::1), a loopback address"),
    ("not-allowlisted", 422, r"the host example\.invalid:80 is not on RESIDUAL_IMAGE_URL_ALLOWLIST"),
    ("big", 413, rf"the image is {MAX_BYTES + 1} bytes; the limit is {MAX_BYTES}"),
    ("big-chunked", 413, rf"the image is more than {MAX_BYTES} bytes"),
    ("trickle", 422, r"the download did not finish within 2 s"),
    ("scheme", 422, r"only http:// and https:// URLs are fetched"),
    ("loop", 422, r"/loop\)( -> redirect http://127\.0\.0\.1:\d+/loop){3}: more than 3 redirects$"),
])
def test_refused_urls_fail_their_own_request(deployment: Deployment, path: str, status: int, message: str) -> None:
    d = deployment
    local = d.other.url("/img/0.png", host="localhost")
    url = {"redirect-loopback": d.images.url(f"/redirect?to={local}"),
           "metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
           "redirect-metadata": d.images.url("/redirect?to=http://169.254.169.254/latest/meta-data/"),
           "localhost": local, "not-allowlisted": "http://example.invalid/cat.png",
           "big": d.images.url("/big"), "big-chunked": d.images.url("/big-chunked"),
           "trickle": d.images.url("/trickle"), "scheme": "ftp://127.0.0.1/cat.png",
           "loop": d.images.url("/loop")}[path]
    seen = len(d.other.paths)
    results: dict[str, httpx.Response] = {}
    together = threading.Barrier(2)  # both requests leave at the same moment

    def bystander() -> None:  # sent while the bad URL is being refused: its batch is its own
        together.wait(10)
        results["other"] = d.client.post("/classify", json={"images": [_b64(d.blobs[0])],
                                                            "label_set": {"classes": list(TASK.classes)}})

    thread = threading.Thread(target=bystander)
    thread.start()
    together.wait(10)
    r = d.client.post("/classify", json={"images": [_b64(d.blobs[1]), url],
                                         "label_set": {"classes": list(TASK.classes)}})
    thread.join()
    assert r.status_code == status, r.text
    error = r.json()["error"]["message"]
    assert error.startswith("images[1] ("), error
    assert re.search(message, error), error
    assert results["other"].status_code == 200, results["other"].text
    assert len(d.other.paths) == seen  # the refused address was never contacted


# ---- traces and logs ----------------------------------------------------------------------------------------------


def _spans(path: Path) -> list[dict[str, Any]]:
    """The console exporter's spans (pretty-printed JSON objects, one after the other)."""
    text = path.read_text() if path.exists() else ""
    decoder, spans, i = json.JSONDecoder(), [], 0
    while (start := text.find("{", i)) >= 0:
        try:
            span, i = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            break  # the exporter is still writing this one
        spans.append(span)
    return spans


def _trace(path: Path, trace_id: str, names: set[str]) -> dict[str, dict[str, Any]]:
    def found() -> dict[str, dict[str, Any]] | None:
        spans = {s["name"]: s for s in _spans(path) if s["context"]["trace_id"] == f"0x{trace_id}"}
        return spans if names <= set(spans) else None

    return wait_for(found, 60, f"the spans {sorted(names)} of trace {trace_id} in {path}")


def test_a_classify_is_one_trace_and_its_log_lines_carry_it(deployment: Deployment) -> None:
    d = deployment
    parent = "00f067aa0ba902b7"
    _classify(d, [_b64(b) for b in d.blobs[:2]], traceparent=f"00-{TRACE_ID}-{parent}-01")
    spans = _trace(d.out.with_suffix(".out"), TRACE_ID, {"POST /classify", "decode", "batcher wait",
                                                         "backbone forward", "apply coefficients"})
    root = spans["POST /classify"]
    assert root["parent_id"] == f"0x{parent}" and root["kind"] == "SpanKind.SERVER"
    assert root["attributes"]["http.response.status_code"] == 200
    for name in ("decode", "batcher wait", "backbone forward", "apply coefficients"):
        assert spans[name]["parent_id"] == root["context"]["span_id"], name
    assert spans["backbone forward"]["attributes"]["residual.batch_size"] >= 2
    access = wait_for(lambda: [json.loads(line) for line in d.out.with_suffix(".err").read_text().splitlines()
                               if '"POST /classify' in line and TRACE_ID in line], 30, "the access log line")
    assert access[0]["trace_id"] == TRACE_ID and access[0]["span_id"] == root["context"]["span_id"][2:]
    assert access[0]["logger"] == "uvicorn.access" and access[0]["level"] == "info"


def test_a_fit_continues_the_trace_of_its_request(deployment: Deployment) -> None:
    d = deployment
    trace_id = "a" * 31 + "1"
    r = d.client.post("/fit-alignment", headers={"Authorization": f"Bearer {KEY[:-1]}a",
                                                 "traceparent": f"00-{trace_id}-{'b' * 16}-01"},
                      json={"name": "traced", "dataset": "world:colour", "variant": "coarse",
                            "world_sizes": {"train": 60, "val": 30, "test": 30}, "hyperparameters": {"epochs": 2}})
    assert r.status_code == 202, r.text
    api = _trace(d.out.with_suffix(".out"), trace_id, {"POST /fit-alignment"})
    worker = _trace(d.worker_out.with_suffix(".out"), trace_id, {"job fit-alignment", "extract features",
                                                                 "fit coarse"})
    job = worker["job fit-alignment"]
    assert job["parent_id"] == api["POST /fit-alignment"]["context"]["span_id"]  # across the queue
    assert job["kind"] == "SpanKind.CONSUMER" and job["attributes"]["residual.job_id"] == r.json()["job_id"]
    assert worker["extract features"]["parent_id"] == job["context"]["span_id"]
    assert worker["fit coarse"]["parent_id"] == job["context"]["span_id"]
    assert worker["fit coarse"]["attributes"]["residual.epochs"] >= 1


# ---- monitoring ---------------------------------------------------------------------------------------------------


_PROMQL_WORDS = {"sum", "rate", "irate", "increase", "histogram_quantile", "by", "without", "le", "max", "min",
                 "avg", "count", "absent", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                 "clamp_min", "clamp_max", "vector", "time", "bool", "offset", "topk", "bottomk", "label_replace",
                 "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "delta", "deriv", "abs", "up"}


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label names and values, functions and keywords removed)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr))
    return {n for n in names if n not in _PROMQL_WORDS and not re.fullmatch(r"\d+[smhdw]?|e|inf|Inf|NaN", n)}


def _exposed(text: str) -> set[str]:
    """Every sample name a /metrics page can have: each family's name, with its type's suffixes."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if kind == "counter":
            names |= {name.removesuffix("_total") + "_total"}
    return names


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    return exprs


def _rule_exprs() -> list[str]:
    rules = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rules["kind"] == "PrometheusRule"
    return [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]


def test_every_metric_of_the_dashboard_and_the_alerts_exists(deployment: Deployment) -> None:
    d = deployment
    api = d.client.get("/metrics").text
    worker = wait_for(lambda: _get(d.worker_metrics), 120, "the worker's metrics port")
    exposed = _exposed(api) | _exposed(worker)
    exprs = _dashboard_exprs() + _rule_exprs()
    named = set().union(*(_metric_names(e) for e in exprs))
    assert {"residual_http_request_duration_seconds_bucket", "residual_backbone_queue_depth"} <= named  # parsed
    assert named <= exposed, sorted(named - exposed)
    alerts = {r["alert"] for g in yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]["groups"]
              for r in g["rules"] if "alert" in r}
    assert {"ResidualHigh5xxRate", "ResidualQueueSaturated", "ResidualHighLatencyP95", "ResidualWorkerAbsent",
            "ResidualJobsFailing"} <= alerts


def _get(url: str) -> str | None:
    try:
        r = httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None
    return r.text if r.status_code == 200 else None


def test_the_python_client_passes_urls_in_order(deployment: Deployment) -> None:
    """``Client.classify`` with URLs and bytes mixed: the answers come back in the order given, equal to bytes."""
    from residual_client import Client

    d = deployment
    expected = _matrix(_classify(d, [_b64(b) for b in d.blobs]))
    with Client(d.base, api_key=KEY) as rs:
        out = rs.classify([d.images.url("/img/0.png"), d.blobs[1], d.images.url("/img/2.png"), d.blobs[3]],
                          classes=list(TASK.classes), top_k=len(TASK.classes))
        got = np.array([[{p.label: p.score for p in res.top}[c] for c in TASK.classes] for res in out.results])
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
        vectors = rs.embeddings([d.images.url("/img/0.png"), d.blobs[0]], modality="image")
        np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
