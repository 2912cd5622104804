from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from residual import DEFAULT_TEMPLATES, apply_fused, class_embeddings, extract, init_coefficients, zero_shot_logits
from residual.basis import Basis
from residual.tiny import tasks
from residual.tiny.reference import shipped_basis_path
from service.api.app import create_app
from tests.redis_server import start_private
from tests.service.conftest import make_settings, metric, png_b64, wait_ready

TASK = tasks.TASKS["colour"]


def _images(n: int = 4, task: str = "colour") -> tuple[np.ndarray, np.ndarray]:
    images, labels, _ = tasks.task_images(task, "test", n=n)
    return images, labels


def _library_probs(client: TestClient, images: np.ndarray, classes: list[str], templates: list[str],
                   coefficients: str | None = None) -> torch.Tensor:
    ready = client.app.state.runtime.ready
    bb = ready.model.backbone
    pixels = torch.stack([bb.preprocess(Image.open(io.BytesIO(base64.b64decode(png_b64(a))))) for a in images])
    raw, emb = extract(bb, pixels)
    if coefficients is not None:
        loaded = ready.coefficients.resolve(coefficients)
        emb = apply_fused(raw, loaded.fused, ready.model.ln)
    cls = class_embeddings(bb.encode_text, bb.tokenizer, classes, templates)
    return zero_shot_logits(emb, cls, bb.logit_scale).softmax(-1)


def _scores(result: dict, classes: list[str]) -> torch.Tensor:
    by_label = {p["label"]: p["score"] for p in result["top"]}
    return torch.tensor([by_label[c] for c in classes])


def test_readyz_reports_model_and_redis(client: TestClient) -> None:
    body = client.get("/readyz").json()
    assert body["status"] == "ready" and body["redis"] == "up" and body["model"] == "residual-tiny"
    assert body["weights_id"].startswith("sha256:") and body["auth"] == "open"
    assert client.get("/livez").json() == {"status": "alive"}


def test_zero_shot_matches_library(client: TestClient) -> None:
    images, _ = _images()
    classes, templates = list(TASK.classes), list(TASK.templates)
    r = client.post("/classify", json={"images": [png_b64(a) for a in images],
                                       "label_set": {"classes": classes, "templates": templates},
                                       "top_k": len(classes)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["coefficients"] is None and len(body["results"]) == len(images)
    expected = _library_probs(client, images, classes, templates)
    for i, res in enumerate(body["results"]):
        torch.testing.assert_close(_scores(res, classes), expected[i], atol=1e-4, rtol=0)
        assert abs(sum(p["score"] for p in res["top"]) - 1) < 1e-4


def test_multipart_upload_matches_json(client: TestClient) -> None:
    images, _ = _images(2)
    classes, templates = list(TASK.classes), list(TASK.templates)
    label_set = {"classes": classes, "templates": templates}
    files = [("images", (f"{i}.png", base64.b64decode(png_b64(a)), "image/png")) for i, a in enumerate(images)]
    r = client.post("/classify", files=files, data={"label_set": json.dumps(label_set), "top_k": str(len(classes))})
    assert r.status_code == 200, r.text
    j = client.post("/classify", json={"images": [png_b64(a) for a in images], "label_set": label_set,
                                       "top_k": len(classes)})
    for a, b in zip(r.json()["results"], j.json()["results"], strict=True):
        torch.testing.assert_close(_scores(a, classes), _scores(b, classes), atol=1e-6, rtol=0)
    r = client.post("/classify", files=files, data={"label_set": "{not json"})
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith("the label_set form field must be JSON")
    r = client.post("/classify", files=files, data={"labels": "a,b"})
    assert r.status_code == 422
    assert r.json()["error"]["message"] == ("unexpected form field 'labels'; the fields are images, label_set, "
                                            "label_set_id, coefficients, top_k, scores, explain, model (images as file "
                                            "parts, or URL text parts)")


def _publish(artifacts: Path, name: str, version: str, seed: int, variant: str = "full") -> None:
    basis = Basis.load(shipped_basis_path())
    gen = torch.Generator().manual_seed(seed)
    cs = init_coefficients(variant, basis, list(TASK.classes), list(TASK.templates), init="randn", generator=gen)
    folder = artifacts / "coefficients" / name
    cs.save(folder / f"{version}.safetensors")
    (folder / "ACTIVE").write_text(version)


def test_coefficient_set_matches_library_fused_path(client: TestClient, artifacts: Path) -> None:
    _publish(artifacts, "colour-test", "v1", seed=1)
    images, _ = _images()
    r = client.post("/classify", json={"images": [png_b64(a) for a in images], "coefficients": "colour-test",
                                       "top_k": len(TASK.classes)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["coefficients"] == "colour-test@v1"
    assert metric(client, "residual_coefficient_sets_loaded_total") >= 1
    expected = _library_probs(client, images, list(TASK.classes), list(TASK.templates), "colour-test@v1")
    zero_shot = _library_probs(client, images, list(TASK.classes), list(TASK.templates))
    assert not torch.allclose(expected, zero_shot, atol=1e-3)  # the coefficient set really changes the scores
    for i, res in enumerate(body["results"]):
        torch.testing.assert_close(_scores(res, list(TASK.classes)), expected[i], atol=1e-4, rtol=0)


def test_repeated_label_set_costs_no_text_forward_even_after_restart(artifacts: Path, redis_server) -> None:
    classes = [f"thing-{uuid.uuid4().hex[:8]}" for _ in range(3)]  # never seen by this Redis
    payload = {"images": [png_b64(_images(1)[0][0])], "label_set": {"classes": classes}}
    with TestClient(create_app(make_settings(artifacts, redis_server.url))) as c:
        wait_ready(c)
        assert c.post("/classify", json=payload).status_code == 200
        first = metric(c, "residual_text_encoder_prompts_total")
        assert first > 0
        assert c.post("/classify", json=payload).status_code == 200
        assert metric(c, "residual_text_encoder_prompts_total") == first
        assert metric(c, "residual_text_cache_lookups_total", 'tier="memory"') >= 1
    with TestClient(create_app(make_settings(artifacts, redis_server.url))) as c:  # a restarted replica
        wait_ready(c)
        assert c.post("/classify", json=payload).status_code == 200
        assert metric(c, "residual_text_encoder_prompts_total") == 0
        assert metric(c, "residual_text_cache_lookups_total", 'tier="redis"') == 1


def test_concurrent_requests_share_a_backbone_batch_and_mixed_sets_match_alone(artifacts: Path,
                                                                              redis_server) -> None:
    _publish(artifacts, "mix-a", "v1", seed=11)
    _publish(artifacts, "mix-b", "v1", seed=12, variant="fine")
    images, _ = _images(3)
    refs = ["mix-a", "mix-b", None, "mix-a@v1"]
    # the batch fires when it holds exactly the four requests (4 x 3 images): no time window to win or lose
    settings = make_settings(artifacts, redis_server.url, max_wait_ms=60_000.0, max_batch_size=4 * 3)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        alone = []
        for ref in refs:
            body = {"images": [png_b64(a) for a in images], "top_k": len(TASK.classes),
                    "label_set": {"classes": list(TASK.classes), "templates": list(TASK.templates)}}
            if ref:
                body["coefficients"] = ref
            alone.append(body)
        expected = [_library_probs(c, images, list(TASK.classes), list(TASK.templates), ref) for ref in refs]
        before = metric(c, "residual_backbone_batch_size_count")
        images_before = metric(c, "residual_backbone_batch_size_sum")
        results: dict[int, dict] = {}
        barrier = threading.Barrier(len(refs))

        def call(i: int) -> None:
            barrier.wait()
            results[i] = c.post("/classify", json=alone[i]).json()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(refs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = metric(c, "residual_backbone_batch_size_count") - before
        images_run = metric(c, "residual_backbone_batch_size_sum") - images_before
        assert batches == 1, "the four concurrent requests were not merged into one backbone batch"
        assert images_run == len(refs) * len(images)
        for i, ref in enumerate(refs):
            assert results[i]["coefficients"] == (None if ref is None else ref.split("@")[0] + "@v1")
            for j, res in enumerate(results[i]["results"]):
                torch.testing.assert_close(_scores(res, list(TASK.classes)), expected[i][j], atol=1e-4, rtol=0)


def test_requests_queued_behind_a_running_batch_all_succeed(artifacts: Path, redis_server) -> None:
    """Batches smaller than the burst: six concurrent requests of 3 images at max batch 3 run as six batches, one
    after another, so five of them waited in the queue behind a running batch, and all succeed."""
    images, _ = _images(3)
    body = {"images": [png_b64(a) for a in images], "label_set": {"classes": ["a", "b"]}}
    with TestClient(create_app(make_settings(artifacts, redis_server.url, max_batch_size=3))) as c:
        wait_ready(c)
        before = metric(c, "residual_backbone_batch_size_count")
        images_before = metric(c, "residual_backbone_batch_size_sum")
        statuses: list[int] = []
        barrier = threading.Barrier(6)

        def call() -> None:
            barrier.wait()
            statuses.append(c.post("/classify", json=body).status_code)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [200] * 6
        assert metric(c, "residual_backbone_batch_size_count") - before == 6  # never merged past max_batch_size
        assert metric(c, "residual_backbone_batch_size_sum") - images_before == 18
        assert metric(c, "residual_backbone_queue_depth") == 0  # the queue drained


def test_label_set_registry(client: TestClient) -> None:
    r = client.post("/label-sets", json={"classes": ["cat", "dog"], "templates": ["a {}."]})
    assert r.status_code == 201
    ident = r.json()["label_set_id"]
    assert client.post("/label-sets", json={"classes": ["cat", "dog"], "templates": ["a {}."]}).json()[
        "label_set_id"] == ident  # content hash: idempotent
    assert client.get(f"/label-sets/{ident}").json() == {"model": "residual-tiny", "label_set_id": ident,
                                                        "classes": ["cat", "dog"], "templates": ["a {}."]}
    r = client.post("/classify", json={"images": [png_b64(_images(1)[0][0])], "label_set_id": ident})
    assert r.status_code == 200 and r.json()["label_set_id"] == ident


@pytest.mark.parametrize(("payload", "fragment"), [
    ({"images": [], "label_set": {"classes": ["a"]}}, "images is empty"),
    ({"images": ["x"], "label_set": {"classes": []}}, "classes is empty"),
    ({"images": ["x"], "label_set": {"classes": ["a", "a"]}}, "duplicate classes"),
    ({"images": ["x"], "label_set": {"classes": ["a"], "templates": ["no slot"]}}, "must contain '{}'"),
    ({"images": ["x"], "label_set": {"classes": ["a" * 5000]}}, "the limit is"),
    ({"images": ["x"], "label_set": {"classes": ["a\x00b"]}}, "control characters"),
    ({"images": ["x"], "label_set": {"classes": [f"c{i}" for i in range(1001)]}}, "the limit is 1000"),
    ({"images": ["%%%"], "label_set": {"classes": ["a"]}}, "not valid base64"),
    ({"images": ["x"]}, "give label_set"),
    ({"images": ["x"], "label_set": {"classes": ["a"]}, "coefficients": "../../etc/passwd"}, "NAME@VERSION"),
    ({"images": ["x"], "label_set_id": "../x"}, "not a label-set id"),
    ({"images": ["x"], "label_set": {"classes": ["a"]}, "extra": 1}, "extra"),
])
def test_invalid_requests_answer_422(client: TestClient, payload: dict, fragment: str) -> None:
    if payload.get("images") == ["x"]:
        payload = {**payload, "images": [png_b64(_images(1)[0][0])]}
    r = client.post("/classify", json=payload)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request"
    assert fragment in r.json()["error"]["message"]


def test_too_many_images_422(client: TestClient) -> None:
    one = png_b64(_images(1)[0][0])
    r = client.post("/classify", json={"images": [one] * 65, "label_set": {"classes": ["a"]}})
    assert r.status_code == 422 and "limit per request is 64" in r.json()["error"]["message"]


def test_unknown_ids_answer_404(client: TestClient) -> None:
    one = png_b64(_images(1)[0][0])
    r = client.post("/classify", json={"images": [one], "label_set_id": "ls-" + "0" * 20})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = client.post("/classify", json={"images": [one], "coefficients": "nope"})
    assert r.status_code == 404 and "unknown coefficient set" in r.json()["error"]["message"]
    assert client.get("/label-sets/ls-" + "1" * 20).status_code == 404


def test_bad_images_answer_415_and_do_not_disturb_others(client: TestClient) -> None:
    good = png_b64(_images(1)[0][0])
    buf = io.BytesIO()
    Image.fromarray(_images(1)[0][0]).save(buf, "TIFF")
    jpeg = io.BytesIO()
    Image.fromarray(_images(1)[0][0]).save(jpeg, "JPEG")
    truncated = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    for blob in (b"garbage bytes", buf.getvalue(), truncated):
        r = client.post("/classify", json={"images": [good, base64.b64encode(blob).decode()],
                                           "label_set": {"classes": ["a", "b"]}})
        assert r.status_code == 415, r.text
        assert r.json()["error"]["type"] == "unsupported_media" and "images[1]" in r.json()["error"]["message"]
    assert client.post("/classify", json={"images": [good], "label_set": {"classes": ["a", "b"]}}).status_code == 200


def test_oversized_inputs_answer_413(artifacts: Path, redis_server) -> None:
    settings = make_settings(artifacts, redis_server.url, max_request_bytes=200_000, max_image_pixels=10_000)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        big = Image.new("RGB", (200, 200), (10, 20, 30))  # 40k pixels, a few hundred bytes as PNG
        buf = io.BytesIO()
        big.save(buf, "PNG")
        r = c.post("/classify", json={"images": [base64.b64encode(buf.getvalue()).decode()],
                                      "label_set": {"classes": ["a"]}})
        assert r.status_code == 413 and "pixels" in r.json()["error"]["message"]
        r = c.post("/classify", content=b"{" + b" " * 300_000 + b"}", headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"

        def chunks():  # no Content-Length: counted while streaming
            for _ in range(40):
                yield b" " * 10_000

        r = c.post("/classify", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        small = png_b64(_images(1)[0][0])
        assert c.post("/classify", json={"images": [small], "label_set": {"classes": ["a"]}}).status_code == 200


def test_queue_full_answers_429_with_retry_after(artifacts: Path, redis_server) -> None:
    """A request that finds the queue full gets 429 + Retry-After (it may fit later); one larger than the whole
    queue gets 413 (retrying can never help)."""
    import asyncio

    from service.errors import Overloaded

    with TestClient(create_app(make_settings(artifacts, redis_server.url, max_queue=2))) as c:
        wait_ready(c)
        img = png_b64(_images(1)[0][0])
        r = c.post("/classify", json={"images": [img] * 3, "label_set": {"classes": ["a"]}})
        assert r.status_code == 413 and "exceed the backbone queue" in r.json()["error"]["message"]
        batcher = c.app.state.runtime.ready.batcher

        async def two_at_once() -> list[object]:  # the second finds the first's 2 images queued
            px = torch.zeros(2, 3, 48, 48)
            return await asyncio.gather(batcher.submit(px), batcher.submit(px), return_exceptions=True)

        first, second = c.portal.call(two_at_once)
        assert isinstance(first, tuple) and isinstance(second, Overloaded)
        assert second.status == 429 and second.headers == {"Retry-After": "1"}
        assert metric(c, "residual_requests_rejected_total", 'reason="queue_full"') >= 1
        assert c.post("/classify", json={"images": [img], "label_set": {"classes": ["a"]}}).status_code == 200


def test_request_timeout_answers_504(artifacts: Path, redis_server) -> None:
    with TestClient(create_app(make_settings(artifacts, redis_server.url, request_timeout_s=1e-4))) as c:
        wait_ready(c)
        r = c.post("/classify", json={"images": [png_b64(_images(1)[0][0])], "label_set": {"classes": ["a"]}})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


def test_not_ready_answers_503(artifacts: Path, redis_server) -> None:
    settings = make_settings(artifacts, redis_server.url, model_weights=str(artifacts / "missing.safetensors"))
    with TestClient(create_app(settings)) as c:
        r = c.post("/classify", json={"images": ["eA=="], "label_set": {"classes": ["a"]}})
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"
        assert c.get("/readyz").status_code == 503
        assert c.get("/livez").status_code == 200


def test_backbone_failure_fails_only_that_batch(client: TestClient) -> None:
    batcher = client.app.state.runtime.ready.batcher
    real = batcher.forward
    calls = {"n": 0}

    def flaky(px):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(px)

    batcher.forward = flaky
    try:
        img = png_b64(_images(1)[0][0])
        r = client.post("/classify", json={"images": [img], "label_set": {"classes": ["a", "b"]}})
        assert r.status_code == 503 and r.json()["error"]["type"] == "backend_unavailable"
        assert client.post("/classify", json={"images": [img], "label_set": {"classes": ["a", "b"]}}).status_code == 200
    finally:
        batcher.forward = real


def test_redis_outage_keeps_classify_answering(artifacts: Path) -> None:
    server = start_private()
    try:
        settings = make_settings(artifacts, server.url, redis_retry_s=0.2)
        with TestClient(create_app(settings)) as c:
            wait_ready(c)
            img = png_b64(_images(1)[0][0])
            assert c.post("/classify", json={"images": [img], "label_set": {"classes": ["p", "q"]}}).status_code == 200
            server.stop()
            r = c.post("/classify", json={"images": [img], "label_set": {"classes": ["r", "s"]}})
            assert r.status_code == 200
            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["redis"] == "down" and ready.json()["status"] == "degraded"
            assert metric(c, "residual_redis_errors_total") >= 1
            port = int(server.url.rsplit(":", 1)[1].split("/")[0])
            server = start_private(port)  # Redis comes back on the same address: no restart of the service
            ready = c.get("/readyz").json()
            assert ready["redis"] == "up" and ready["status"] == "ready"
            r = c.post("/classify", json={"images": [img], "label_set": {"classes": ["t", "u"]}})
            assert r.status_code == 200
            assert metric(c, "residual_redis_up") == 1
    finally:
        server.stop()


def test_openapi_documents_every_route(client: TestClient) -> None:
    """Every route of every router is in the schema with its methods and a summary; every JSON body has a schema
    with examples; every error answer documents the one error body; 405 documents Allow."""
    from service.api.routes import (
        bases,
        classify,
        coefficients,
        datasets,
        drift,
        embeddings,
        fits,
        heads,
        health,
        inference,
        label_sets,
    )

    spec = client.get("/openapi.json").json()
    routes = [r for m in (bases, classify, coefficients, datasets, drift, embeddings, fits, heads, health, inference,
                          label_sets) for r in m.router.routes]
    assert len(routes) >= 40
    schemas = spec["components"]["schemas"]
    for route in routes:
        for method in route.methods:
            op = spec["paths"][route.path_format][method.lower()]
            assert op.get("summary"), (method, route.path)
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                name = body["schema"]["$ref"].rsplit("/", 1)[-1]
                assert schemas[name].get("examples") or name in ("Activate", "LabelSet"), name
            error = "/V2Error" if route.path_format.startswith("/v2") else "/ErrorBody"  # the protocol's body
            for code, answer in op["responses"].items():
                if code[0] in "45":
                    assert answer["content"]["application/json"]["schema"]["$ref"].endswith(error), (
                        method, route.path, code)
            assert "Allow" in op["responses"]["405"]["headers"]
            if route.path_format not in ("/livez", "/readyz", "/metrics", "/v2", "/v2/health/live",
                                         "/v2/health/ready"):
                assert {"401", "503"} <= set(op["responses"]), (method, route.path)
    assert "HTTPValidationError" not in schemas
    assert not _pydantic_keywords(spec), _pydantic_keywords(spec)  # bounds published as minimum/maximum


def _pydantic_keywords(node: object, at: str = "") -> list[str]:
    """Where the schema holds pydantic's names of bounds ("ge", "max_length", ...), which JSON Schema ignores."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("properties", "examples", "example"):  # property names and example values are free
                items = value.items() if isinstance(value, dict) else []
                found += [hit for k, v in items for hit in _pydantic_keywords(v, f"{at}/{key}/{k}")]
                continue
            if key in ("ge", "gt", "le", "lt", "min_length", "max_length", "multiple_of"):
                found.append(f"{at}/{key}")
            found += _pydantic_keywords(value, f"{at}/{key}")
    elif isinstance(node, list):
        found += [hit for i, v in enumerate(node) for hit in _pydantic_keywords(v, f"{at}/{i}")]
    return found


@pytest.mark.parametrize("variant", [None, "full", "fine", "linear"])
def test_explain_gives_exact_unit_contributions(client: TestClient, artifacts: Path, variant: str | None) -> None:
    """With k >= the number of units the contributions sum to the logit (1e-4), with and without a coefficient
    set; with a small k they are the largest by |contribution|; the logit is exp(logit_scale) * cos."""
    images, _ = _images(3)
    body: dict = {"images": [png_b64(a) for a in images], "top_k": 3,
                  "label_set": {"classes": list(TASK.classes), "templates": list(TASK.templates)}}
    if variant is not None:
        _publish(artifacts, f"explain-{variant}", "v1", seed=5, variant=variant)
        body["coefficients"] = f"explain-{variant}@v1"
    rt = client.app.state.runtime
    g = rt.ready.model.backbone.geometry
    n_units = g.n_units
    full = client.post("/classify", json={**body, "explain": n_units}).json()
    plain = client.post("/classify", json=body).json()
    scale = float(rt.ready.model.backbone.logit_scale.exp())
    names = {"emb"} | {f"L{l}.MLP" for l in range(g.layers)} | {f"L{l}.H{h}" for l in range(g.layers)
                                                                for h in range(g.heads)}
    for res, ref in zip(full["results"], plain["results"], strict=True):
        assert [p["label"] for p in res["top"]] == [p["label"] for p in ref["top"]]
        assert "logit" not in ref["top"][0] and "contributions" not in ref["top"][0]  # only when asked
        logits = torch.tensor([p["logit"] for p in res["top"]])
        probs_of_top = torch.tensor([p["score"] for p in res["top"]])
        for p in res["top"]:
            units = p["contributions"]
            assert len(units) == n_units and {u["unit"] for u in units} == names
            assert abs(sum(u["logit"] for u in units) - p["logit"]) <= 1e-4
            mags = [abs(u["logit"]) for u in units]
            assert mags == sorted(mags, reverse=True)
        assert float(logits.max()) <= scale + 1e-4  # a scaled cosine
        assert torch.all(probs_of_top[:-1] >= probs_of_top[1:])
    few = client.post("/classify", json={**body, "explain": 3}).json()
    top = few["results"][0]["top"][0]
    assert [u["unit"] for u in top["contributions"]] == [u["unit"] for u in full["results"][0]["top"][0][
        "contributions"][:3]]


def test_cosine_scores_are_the_raw_cosine(client: TestClient) -> None:
    images, _ = _images(2)
    classes, templates = list(TASK.classes), list(TASK.templates)
    body = {"images": [png_b64(a) for a in images], "top_k": len(classes),
            "label_set": {"classes": classes, "templates": templates}}
    soft = client.post("/classify", json=body).json()
    cos = client.post("/classify", json={**body, "scores": "cosine", "explain": 1}).json()
    scale = float(client.app.state.runtime.ready.model.backbone.logit_scale.exp())
    for s_res, c_res in zip(soft["results"], cos["results"], strict=True):
        assert abs(sum(p["score"] for p in s_res["top"]) - 1) < 1e-4
        assert abs(sum(p["score"] for p in c_res["top"]) - 1) > 1e-2  # independent per label
        for p in c_res["top"]:
            assert -1 <= p["score"] <= 1 and abs(p["score"] * scale - p["logit"]) <= 1e-4
        assert [p["label"] for p in s_res["top"]] == [p["label"] for p in c_res["top"]]  # same order
    r = client.post("/classify", files=[("images", ("a.png", base64.b64decode(png_b64(images[0])), "image/png"))],
                    data={"label_set": json.dumps({"classes": classes}), "scores": "cosine", "explain": "2"})
    assert r.status_code == 200 and len(r.json()["results"][0]["top"][0]["contributions"]) == 2
    assert client.post("/classify", json={**body, "scores": "logits"}).status_code == 422
    assert client.post("/classify", json={**body, "explain": 0}).status_code == 422


def test_the_cli_and_the_service_give_the_same_scores(client: TestClient, tmp_path: Path) -> None:
    """`residual classify` and POST /classify: same images, classes and (default) templates, same scores (1e-5)."""
    from residual.cli import main

    images, _ = _images(4)
    classes = list(TASK.classes)
    paths = []
    for i, a in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = client.post("/classify", files=files, data={"label_set": json.dumps({"classes": classes}),
                                                    "top_k": str(len(classes))})
    assert r.status_code == 200, r.text
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["classify", "--device", "cpu", *map(str, paths), "--classes", ",".join(classes), "--json",
                     "--top-k", str(len(classes))]) == 0
    cli = json.loads(out.getvalue())
    assert cli["label_set"]["templates"] == list(DEFAULT_TEMPLATES)
    for served, local in zip(r.json()["results"], cli["results"], strict=True):
        torch.testing.assert_close(_scores(served, classes), _scores(local, classes), atol=1e-5, rtol=0)


def test_images_by_url_are_refused_by_default(client: TestClient) -> None:
    """Without RESIDUAL_IMAGE_URL_ALLOWLIST a URL is refused everywhere an image is taken, with how to enable it,
    and the published schema does not admit URLs (the downloads: tests/integration/test_protocols.py)."""
    enable = "images by URL are off on this deployment: send the image as base64, or have the operator list the " \
             "hosts to fetch from in RESIDUAL_IMAGE_URL_ALLOWLIST"
    png = png_b64(np.zeros((8, 8, 3), np.uint8))
    r = client.post("/classify", json={"images": [png, "http://127.0.0.1:9/cat.png"],
                                       "label_set": {"classes": ["a", "b"]}})
    assert r.status_code == 422 and r.json()["error"]["message"] == f"images[1] is a URL, and {enable}"
    r = client.post("/classify", data={"images": "https://example.com/cat.png", "label_set": '{"classes": ["a", "b"]}'},
                    files=[("images", ("a.png", base64.b64decode(png), "image/png"))])
    assert r.status_code == 422 and enable in r.json()["error"]["message"]
    r = client.post("/v1/embeddings", json={"input": ["http://example.com/x.png"], "modality": "image"})
    assert r.status_code == 422 and r.json()["error"]["message"] == f"input[0] is a URL, and {enable}"
    r = client.post("/v2/models/residual-tiny/infer", json={"inputs": [
        {"name": "images", "shape": [1], "datatype": "BYTES", "data": ["http://example.com/x.png"]},
        {"name": "labels", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]})
    assert r.status_code == 422 and r.json() == {"error": f"images[0] is a URL, and {enable}"}
    pattern = client.get("/openapi.json").json()["components"]["schemas"]["ClassifyRequest"]["properties"][
        "images"]["items"]["pattern"]
    assert "http" not in pattern


def test_v2_infer_example_and_errors(client: TestClient) -> None:
    """The published example answers 200 (probabilities summing to 1); a bad element is named by its index."""
    example = client.get("/openapi.json").json()["components"]["schemas"]["V2InferRequest"]["examples"][0]
    r = client.post("/v2/models/residual-tiny/infer", json=example)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == example["id"] and out["probabilities"]["shape"] == [1, 3]
    assert out["labels"]["data"] == ["red", "green", "blue"] and abs(sum(out["probabilities"]["data"]) - 1) < 1e-5
    png = png_b64(np.zeros((8, 8, 3), np.uint8))
    r = client.post("/v2/models/residual-tiny/infer", json={"inputs": [
        {"name": "images", "shape": [3], "datatype": "BYTES", "data": [png, png, "not base64 at all!"]},
        {"name": "labels", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]})
    assert r.status_code == 422 and r.json() == {"error": "images[2] is not valid base64 or a base64 data URI"}
    r = client.post("/v2/models/residual-tiny/infer", json={"inputs": [
        {"name": "images", "shape": [1], "datatype": "BYTES", "data": [png]}], "parameters": {"colour": "red"}})
    assert r.status_code == 422 and r.json()["error"].startswith("unknown parameter 'colour'; the parameters are")
    r = client.post("/v2/models/residual-tiny/infer", json={"inputs": [
        {"name": "images", "shape": [1], "datatype": "BYTES", "data": [png]}]})
    assert r.status_code == 422 and r.json()["error"].startswith("give the input 'labels' (BYTES [C]), or the "
                                                                 "parameter 'label_set_id' or 'coefficients'")
    r = client.post("/v2/models/residual-tiny/infer", content=b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "Inference-Header-Content-Length" in r.json()["error"]
