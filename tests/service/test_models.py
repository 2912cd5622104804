"""Several models in one API process (RESIDUAL_MODELS): `model` on every route, one engine per model, failure
isolation, answers that name their model, and a bad entry that stops the start with its name."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from residual.tiny import tasks
from service.api.app import create_app
from tests.processes import ROOT, variant_checkpoint
from tests.redis_server import RedisServer
from tests.service.conftest import make_settings, metric, png_b64, wait_ready
from tests.waiting import wait_for

TASK = tasks.TASKS["colour"]


def _models(variant: Path) -> list[dict[str, str]]:
    return [{"name": "tiny", "architecture": "residual-tiny", "device": "cpu"},
            {"name": "tiny-b", "architecture": "residual-tiny", "weights": str(variant), "device": "cpu"}]


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return variant_checkpoint(tmp_path_factory.mktemp("weights") / "variant.safetensors")


@pytest.fixture(scope="module")
def two(artifacts: Path, redis_server: RedisServer, variant: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(artifacts, redis_server.url, models=_models(variant)))
    with TestClient(app) as c:
        wait_ready(c)
        wait_for(lambda: all(m["state"] == "ready" for m in c.get("/readyz").json()["models"]), 120,
                 "both models to load")
        yield c


def _images(n: int = 3) -> list[str]:
    return [png_b64(a) for a in tasks.task_images("colour", "test", n=n)[0]]


def _classify(c: TestClient, model: str | None, images: list[str]) -> dict:
    body: dict = {"images": images, "label_set": {"classes": list(TASK.classes)}, "top_k": len(TASK.classes)}
    if model is not None:
        body["model"] = model
    r = c.post("/classify", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _scores(answer: dict) -> list[dict[str, float]]:
    return [{p["label"]: p["score"] for p in res["top"]} for res in answer["results"]]


def test_each_model_answers_and_names_itself(two: TestClient) -> None:
    images = _images()
    default, other = _classify(two, None, images), _classify(two, "tiny-b", images)
    assert default["model"] == "tiny" and other["model"] == "tiny-b"
    assert default["weights_id"] != other["weights_id"]  # two weights, two answers
    assert _scores(default) != _scores(other)
    assert _scores(_classify(two, "tiny", images)) == _scores(default)  # naming the default = the default
    ready = two.get("/readyz").json()
    assert [(m["name"], m["default"], m["resident"]) for m in ready["models"]] == [("tiny", True, True),
                                                                                  ("tiny-b", False, True)]
    assert ready["model"] == "tiny"
    assert metric(two, "residual_images_classified_total", 'model="tiny-b"') >= len(images)
    assert metric(two, "residual_model_resident", 'model="tiny-b"') == 1


def test_multipart_takes_a_model_field(two: TestClient) -> None:
    images = tasks.task_images("colour", "test", n=2)[0]
    files = [("images", (f"{i}.png", base64.b64decode(png_b64(a)), "image/png"))
             for i, a in enumerate(images)]
    r = two.post("/classify", files=files, data={"label_set": json.dumps({"classes": list(TASK.classes)}),
                                                 "model": "tiny-b", "top_k": str(len(TASK.classes))})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-b"
    assert _scores(r.json()) == _scores(_classify(two, "tiny-b", [png_b64(a) for a in images]))


def test_an_unknown_model_is_404_listing_the_served_names(two: TestClient) -> None:
    expected = "unknown model 'nope'; this deployment serves tiny, tiny-b (GET /v1/models)"
    answers = [
        two.post("/classify", json={"images": _images(1), "label_set": {"classes": ["a", "b"]}, "model": "nope"}),
        two.post("/label-sets", json={"classes": ["a", "b"], "model": "nope"}),
        two.get("/coefficients", params={"model": "nope"}),
        two.get("/bases", params={"model": "nope"}),
        two.get("/heads", params={"model": "nope"}),
        two.post("/fit-alignment", json={"name": "x", "dataset": "world:colour", "model": "nope"}),
    ]
    for r in answers:
        assert r.status_code == 404, r.text
        assert r.json()["error"]["message"] == expected
    r = two.post("/v1/embeddings", json={"input": "a red circle", "model": "nope:set"})
    assert r.status_code == 404
    assert r.json()["error"]["message"].startswith("model 'nope:set' is not served here; the models are tiny, tiny-b")


def test_label_sets_belong_to_their_model(two: TestClient) -> None:
    r = two.post("/label-sets", json={"classes": ["cat", "dog"], "model": "tiny-b"})
    assert r.status_code == 201 and r.json()["model"] == "tiny-b"
    ident = r.json()["label_set_id"]
    assert two.get(f"/label-sets/{ident}", params={"model": "tiny-b"}).json()["classes"] == ["cat", "dog"]
    r = two.get(f"/label-sets/{ident}")  # the default model
    assert r.status_code == 409
    assert r.json()["error"]["message"].startswith(f"label set {ident} belongs to model 'tiny-b', not 'tiny': send "
                                                   "model='tiny-b'")
    r = two.post("/classify", json={"images": _images(1), "label_set_id": ident})
    assert r.status_code == 409 and "belongs to model 'tiny-b'" in r.json()["error"]["message"]
    assert two.post("/classify", json={"images": _images(1), "label_set_id": ident,
                                       "model": "tiny-b"}).status_code == 200


def test_reads_name_their_model(two: TestClient) -> None:
    bases = two.get("/bases", params={"model": "tiny-b"}).json()
    assert bases["model"] == "tiny-b" and bases["bases"] == []  # the variant has no basis yet
    assert two.get("/bases").json()["model"] == "tiny"
    assert two.get("/coefficients", params={"model": "tiny-b"}).json() == {"model": "tiny-b", "coefficient_sets": []}
    r = two.get("/heads", params={"model": "tiny-b"})
    assert r.status_code == 409 and "POST /bases" in r.json()["error"]["message"]
    ids = [m["id"] for m in two.get("/v1/models").json()["data"]]
    assert ids[:2] == ["tiny", "tiny-b"]
    r = two.post("/v1/embeddings", json={"input": ["a red circle"], "model": "tiny-b"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-b"
    text_b = r.json()["data"][0]["embedding"]
    text_a = two.post("/v1/embeddings", json={"input": ["a red circle"]}).json()["data"][0]["embedding"]
    assert text_a == two.post("/v1/embeddings", json={"input": ["a red circle"],
                                                      "model": "tiny"}).json()["data"][0]["embedding"]
    assert len(text_a) == len(text_b)


def test_a_failing_model_never_fails_another(two: TestClient) -> None:
    """Model tiny-b's backbone fails every batch: its requests answer 503, and tiny keeps answering 200 with the
    same scores, its batches never touched by tiny-b's failures."""
    images = _images()
    before = _scores(_classify(two, "tiny", images))
    engine = two.app.state.runtime.models.slots["tiny-b"].engine
    real = engine.batcher.forward

    def broken(pixels: torch.Tensor):  # noqa: ANN202 - the batcher's forward
        raise RuntimeError("CUDA error: device-side assert triggered (injected)")

    engine.batcher.forward = broken
    errors_a = metric(two, "residual_backbone_errors_total", 'model="tiny"')
    try:
        for _ in range(3):
            r = two.post("/classify", json={"images": images, "label_set": {"classes": list(TASK.classes)},
                                            "model": "tiny-b"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "backend_unavailable"
            assert _scores(_classify(two, "tiny", images)) == before
        assert metric(two, "residual_backbone_errors_total", 'model="tiny-b"') >= 3
        assert metric(two, "residual_backbone_errors_total", 'model="tiny"') == errors_a
        assert two.get("/readyz").status_code == 200
    finally:
        engine.batcher.forward = real
    assert _classify(two, "tiny-b", images)["model"] == "tiny-b"


def test_a_bad_models_entry_stops_the_start_with_its_name(tmp_path: Path, variant: Path) -> None:
    models = [*_models(variant), {"name": "large", "architecture": "ViT-Huge-99"}]
    env = dict(os.environ, RESIDUAL_MODELS=json.dumps(models), RESIDUAL_ARTIFACT_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-m", "service.api.server", "--port", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "residual-serve: RESIDUAL_MODELS[2] ('large'): unknown model 'ViT-Huge-99'; use an open_clip architecture "
        "or one of ['residual-tiny']")
    env["RESIDUAL_MODELS"] = json.dumps([*_models(variant), {"name": "tiny", "architecture": "residual-tiny"}])
    run = subprocess.run([sys.executable, "-m", "service.api.server", "--port", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "RESIDUAL_MODELS names 'tiny' twice" in run.stderr


def test_a_model_with_a_request_in_flight_is_never_unloaded(artifacts: Path, redis_server: RedisServer,
                                                            variant: Path, tmp_path: Path) -> None:
    """Budget for the default and one other: while tiny-b holds a request (a lease), tiny-c cannot make room and
    answers 503 naming tiny-b; once the request ends, tiny-c loads and the idle tiny-b is unloaded."""
    from residual import load_backbone
    from service.engine.model import model_bytes

    one = model_bytes(load_backbone("residual-tiny", device="cpu").model)
    models = [*_models(variant), {"name": "tiny-c", "architecture": "residual-tiny", "device": "cpu",
                                  "weights": str(variant_checkpoint(tmp_path / "c.safetensors", seed=11))}]
    settings = make_settings(artifacts, redis_server.url, models=models, model_memory_bytes=int(2.5 * one))
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        wait_for(lambda: c.get("/readyz").json()["models"][1]["state"] == "ready", 120, "tiny-b to load")
        registry = c.app.state.runtime.models
        assert c.portal is not None
        engine = c.portal.call(registry.acquire, "tiny-b")  # a request of tiny-b in flight
        r = c.post("/classify", json={"images": _images(1), "label_set": {"classes": ["a", "b"]}, "model": "tiny-c"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["message"] == ("model tiny-c needs memory that models with requests in flight hold "
                                                "(tiny-b; RESIDUAL_MODEL_MEMORY_BYTES); retry")
        assert registry.slots["tiny-b"].state == "ready"
        registry.release(engine)
        assert _classify(c, "tiny-c", _images(1))["model"] == "tiny-c"
        states = {m["name"]: m["state"] for m in c.get("/readyz").json()["models"]}
        assert states == {"tiny": "ready", "tiny-b": "unloaded", "tiny-c": "ready"}


def test_loading_a_model_never_blocks_another(artifacts: Path, redis_server: RedisServer, variant: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny-c loads on first use (over the budget) and its load is held open: meanwhile the default model answers,
    /readyz is 200 and reports tiny-c loading; once the load completes, tiny-c's waiting request is answered."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from residual import load_backbone
    from service.engine import serving
    from service.engine.model import model_bytes

    release = threading.Event()
    real_load = serving.load

    def held(spec, *args):  # noqa: ANN001, ANN202 - serving.load's signature
        if spec.name == "tiny-c":
            assert release.wait(120), "the test never released the load"
        return real_load(spec, *args)

    monkeypatch.setattr(serving, "load", held)
    one = model_bytes(load_backbone("residual-tiny", device="cpu").model)
    models = [_models(variant)[0], {"name": "tiny-c", "architecture": "residual-tiny", "device": "cpu",
                                    "weights": str(variant_checkpoint(tmp_path / "c.safetensors", seed=11))}]
    settings = make_settings(artifacts, redis_server.url, models=models, model_memory_bytes=int(1.5 * one))
    with TestClient(create_app(settings)) as c, ThreadPoolExecutor(1) as pool:
        wait_ready(c)
        assert c.get("/readyz").json()["models"][1]["state"] == "not loaded"  # over the budget: on first use
        assert c.get("/v2/models/tiny-c/ready").json() == {"name": "tiny-c", "ready": True}  # it would load on use
        waiting = pool.submit(_classify, c, "tiny-c", _images(1))
        wait_for(lambda: c.get("/readyz").json()["models"][1]["state"] == "loading", 60, "tiny-c to start loading")
        for _ in range(3):
            assert _classify(c, "tiny", _images(2))["model"] == "tiny"  # the default answers meanwhile
        assert c.get("/readyz").status_code == 200 and c.get("/v2/health/ready").json() == {"ready": True}
        # the Open Inference Protocol's model readiness: a 4xx with the reason while it loads (the protocol's false)
        r = c.get("/v2/models/tiny-c/ready")
        assert r.status_code == 400 and r.json() == {"error": "the model tiny-c is still loading"}
        release.set()
        assert waiting.result(timeout=120)["model"] == "tiny-c"
        assert c.get("/v2/models/tiny-c/ready").status_code == 200
