"""One API process and one worker serving three models (RESIDUAL_MODELS), against real processes and Redis.

- Each model answers /classify exactly as a single-model deployment of the same weights does.
- A basis and a fit on the second model, then /classify with that coefficient set; using the set (or its label
  set) with another model answers 409 naming the model it belongs to; /v1/models lists every model and set.
- The memory budget (RESIDUAL_MODEL_MEMORY_BYTES) holds two of the three models: asking for the third unloads the
  idle one, asking for that one again reloads it, and its answers (with the fitted set) are unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from residual_client import APIError, Client

from residual import load_backbone
from residual.tiny import tasks
from service.engine.model import model_bytes
from tests.processes import api_server, variant_checkpoint, worker_process
from tests.prom import sample_sum
from tests.redis_server import RedisServer, start_private
from tests.service.conftest import png_b64
from tests.waiting import wait_for

TASK = tasks.TASKS["colour"]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = start_private()  # its own queue: no other test's worker takes these jobs
    yield server
    server.stop()


def _wait_job(client: httpx.Client, url: str, timeout: float = 600) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(url).json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout, f"{url} to finish")


def _classify(client: httpx.Client, images: list[str], **fields: str) -> dict[str, Any]:
    body: dict[str, Any] = {"images": images, "top_k": len(TASK.classes), **fields}
    if "coefficients" not in fields:
        body["label_set"] = {"classes": list(TASK.classes)}
    r = client.post("/classify", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _scores(answer: dict[str, Any]) -> list[dict[str, float]]:
    return [{p["label"]: p["score"] for p in res["top"]} for res in answer["results"]]


def _close(a: list[dict[str, float]], b: list[dict[str, float]], tol: float = 1e-5) -> bool:
    return all(x.keys() == y.keys() and all(abs(x[k] - y[k]) <= tol for k in x) for x, y in zip(a, b, strict=True))


def _models(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in client.get("/readyz").json()["models"]}


def test_three_models_in_one_process(redis: RedisServer, tmp_path: Path) -> None:
    b_weights = variant_checkpoint(tmp_path / "b.safetensors", seed=7)
    c_weights = variant_checkpoint(tmp_path / "c.safetensors", seed=11)
    models = json.dumps([{"name": "tiny", "architecture": "residual-tiny"},
                         {"name": "tiny-b", "architecture": "residual-tiny", "weights": str(b_weights)},
                         {"name": "tiny-c", "architecture": "residual-tiny", "weights": str(c_weights)}])
    one = model_bytes(load_backbone("residual-tiny", device="cpu").model)
    budget = str(int(2.5 * one))  # the default and one other: a third model unloads the idle one
    artifacts = tmp_path / "artifacts"
    images = [png_b64(a) for a in tasks.task_images("colour", "test", n=4)[0]]
    worker = worker_process(redis.url, artifacts, models=models)
    try:
        with contextlib.ExitStack() as stack:
            multi, _ = stack.enter_context(api_server(redis.url, artifacts, ready_timeout=300, models=models,
                                                      model_memory_bytes=budget))
            single_a, _ = stack.enter_context(api_server(redis.url, tmp_path / "single-a", ready_timeout=300))
            single_b, _ = stack.enter_context(api_server(redis.url, tmp_path / "single-b", ready_timeout=300,
                                                         model_weights=str(b_weights)))
            wait_for(lambda: _models(multi)["tiny-b"]["state"] == "ready", 300, "tiny-b to load at start")
            state = _models(multi)
            assert state["tiny"]["resident"] and state["tiny-b"]["resident"]
            assert state["tiny-c"]["state"] == "not loaded"  # over the budget: it loads on first use

            # each model scores as a single-model deployment of the same weights
            a, b = _classify(multi, images), _classify(multi, images, model="tiny-b")
            assert a["model"] == "tiny" and b["model"] == "tiny-b"
            assert _close(_scores(a), _scores(_classify(single_a, images)))
            assert _close(_scores(b), _scores(_classify(single_b, images)))
            assert not _close(_scores(a), _scores(b))

            # a basis and a fit on the second model, then classify with its set
            r = multi.post("/bases", json={"name": "b-shape", "dataset": "world:shape", "max_images": 300,
                                           "model": "tiny-b"})
            assert r.status_code == 202 and r.json()["model"] == "tiny-b", r.text
            job = _wait_job(multi, r.json()["status_url"])
            assert job["status"] == "succeeded" and job["model"] == "tiny-b", job
            basis_id = job["basis"]["basis_id"]
            assert [x["basis_id"] for x in multi.get("/bases", params={"model": "tiny-b"}).json()["bases"]] == [
                basis_id]
            assert multi.get(f"/bases/{basis_id}").status_code == 409  # not the default model's
            r = multi.post("/fit-alignment", json={
                "name": "b-colour", "dataset": "world:colour", "model": "tiny-b",
                "world_sizes": {"train": 200, "val": 100, "test": 100}, "hyperparameters": {"epochs": 3}})
            assert r.status_code == 202, r.text
            job = _wait_job(multi, r.json()["status_url"])
            assert job["status"] == "succeeded", job
            assert job["basis"]["basis_id"] == basis_id  # the model's newest basis is its default
            fitted = _classify(multi, images, model="tiny-b", coefficients="b-colour")
            assert fitted["coefficients"] == job["coefficients"] and fitted["model"] == "tiny-b"

            # the set belongs to tiny-b: 409 elsewhere, naming it
            r = multi.post("/classify", json={"images": images, "coefficients": "b-colour"})
            assert r.status_code == 409
            assert r.json()["error"]["message"].startswith(f"coefficient set {job['coefficients']} belongs to model "
                                                           "'tiny-b', not 'tiny'")
            r = multi.get("/coefficients/b-colour")
            assert r.status_code == 409 and "belongs to model 'tiny-b'" in r.json()["error"]["message"]
            assert multi.get("/coefficients/b-colour", params={"model": "tiny-b"}).json()["model"] == "tiny-b"
            ids = [m["id"] for m in multi.get("/v1/models").json()["data"]]
            assert ids == ["tiny", "tiny-b", "tiny-c", "tiny-b:b-colour"]
            r = multi.post("/v1/embeddings", json={"input": images[:1], "modality": "image",
                                                   "model": "tiny-b:b-colour"})
            assert r.status_code == 200 and r.json()["model"] == f"tiny-b:{job['coefficients']}"

            # the budget: tiny-c in, the idle tiny-b out; tiny-b back, answers unchanged
            c = _classify(multi, images, model="tiny-c")
            assert c["model"] == "tiny-c"
            state = _models(multi)
            assert state["tiny-c"]["resident"] and state["tiny-b"]["state"] == "unloaded"
            assert state["tiny"]["resident"]  # the default always stays
            metrics = multi.get("/metrics").text
            assert sample_sum(metrics, "residual_model_unloads_total", 'model="tiny-b"') == 1
            assert sample_sum(metrics, "residual_model_resident", 'model="tiny-b"') == 0
            again = _classify(multi, images, model="tiny-b", coefficients="b-colour")
            assert _scores(again) == _scores(fitted) and again["coefficients"] == fitted["coefficients"]
            state = _models(multi)
            assert state["tiny-b"]["resident"] and state["tiny-c"]["state"] == "unloaded"
            assert sample_sum(multi.get("/metrics").text, "residual_model_loads_total", 'model="tiny-b"') == 2
            assert _scores(_classify(multi, images, model="tiny-b")) == _scores(b)

            # the Python client names the model on every method
            with Client(str(multi.base_url)) as client:
                raw = [base64.b64decode(i) for i in images]
                result = client.classify(raw, coefficients="b-colour", top_k=len(TASK.classes), model="tiny-b")
                assert result.model == "tiny-b" and result.coefficients == fitted["coefficients"]
                assert [{x.label: x.score for x in r.top} for r in result.results] == _scores(fitted)
                assert [s["name"] for s in client.coefficient_sets(model="tiny-b")] == ["b-colour"]
                assert client.coefficient_sets() == []
                assert client.bases(model="tiny-b")["bases"][0]["basis_id"] == basis_id
                with pytest.raises(APIError) as err:
                    client.coefficient_versions("b-colour", model="tiny-c")
                assert err.value.status == 409
    finally:
        worker.kill()
        worker.wait(timeout=30)
