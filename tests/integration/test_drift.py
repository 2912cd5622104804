"""Per-unit drift of live traffic against two real API replicas sharing one Redis, and a worker.

- World traffic drawn like the training mixture stays within the documented noise band (score < 0.2 at 1,024
  images); traffic whose scenes all share one background raises the deployment score several times over.
- The most drifted heads are the ones whose text descriptions name backgrounds: checked against the dictionary's
  own entries, against the rate among all heads, not hand-picked heads.
- Two replicas report the sum of their traffic; Prometheus carries the score; a fitted set's training data is a
  reference of its own; RESIDUAL_DRIFT=off answers 503 and counts nothing.
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from residual.dictionary import load_dictionary
from residual.tiny import world
from tests.pictures import assert_picture
from tests.processes import api_server, worker_process
from tests.prom import sample_sum
from tests.redis_server import RedisServer, start_private
from tests.waiting import wait_for

BACKGROUND = next(iter(world.BACKGROUNDS))
SETTINGS = {"drift_flush_s": "1", "drift_window": "1024", "drift_sample": "1"}  # every image: exact counts


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = start_private()
    yield server
    server.stop()


def _images(seed: int, n: int, **fixed: str) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for a in world.render_batch([world.sample_scene(rng, **fixed) for _ in range(n)], seed=seed):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def _send(client: httpx.Client, seed: int, n: int, **fixed: str) -> None:
    for i in range(0, n, 64):
        r = client.post("/classify", json={"images": _images(seed + i, 64, **fixed),
                                           "label_set": {"classes": ["a thing", "another thing"]}})
        assert r.status_code == 200, r.text


def _names_backgrounds(texts: list[str] | None, entries: set[str]) -> bool:
    return any(t in entries for t in texts or [])


def test_drift_of_live_traffic_across_two_replicas(redis: RedisServer, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    worker = worker_process(redis.url, artifacts)
    try:
        with contextlib.ExitStack() as stack:
            a, _ = stack.enter_context(api_server(redis.url, artifacts, **SETTINGS))
            b, _ = stack.enter_context(api_server(redis.url, artifacts, **SETTINGS))
            _send(a, 1000, 512)
            _send(b, 2000, 512)
            # b writes its sums every second: until then a sees part of b's traffic
            calm = wait_for(lambda: (lambda d: d if d["n_images"] == 1024 else None)(
                a.get("/drift", params={"describe": 0}).json()), 30, "both replicas' traffic in the sums")
            assert calm["replicas"] == 2
            assert calm["against"] == "basis" and calm["basis"]["name"] == "residual-tiny-reference"
            assert calm["score"] < 0.2, calm["score"]  # the noise band of in-distribution traffic
            assert b.get("/drift", params={"describe": 0}).json()["n_images"] == 1024  # the same answer from b

            _send(a, 3000, 1024, background=BACKGROUND)
            shifted = a.get("/drift", params={"describe": 3}).json()  # a flushes its own sums before answering
            assert shifted["n_images"] == 1024 + 512  # a's recent window (all shifted) and b's (in-distribution)
            assert shifted["score"] > 3 * calm["score"] and shifted["score"] > 0.4, (calm["score"], shifted["score"])
            everything = a.get("/drift", params={"window": "all", "describe": 0}).json()
            assert everything["n_images"] == 2048

            # the most drifted heads name backgrounds more often than heads do in general
            entries = {t for t in load_dictionary() if "background" in t}
            heads = [u for u in shifted["units"] if ".H" in u["unit"]]
            top = heads[:3]
            named_top = sum(_names_backgrounds(u["description"], entries) for u in top)
            every: list[bool] = []
            for u in heads:
                layer, head = (int(x[1:]) for x in u["unit"].split("."))
                d = a.get(f"/heads/{layer}/{head}", params={"atoms": 3, "components": 0}).json()
                every.append(_names_backgrounds([t["text"] for t in d["description"]["texts"]], entries))
            assert named_top >= 2, top
            assert named_top / 3 > sum(every) / len(every), (top, sum(every))

            wait_for(lambda: sample_sum(a.get("/metrics").text, "residual_drift_score") > 0.4, 30,
                     "the drift score on /metrics")
            assert sample_sum(a.get("/metrics").text, "residual_unit_drift", f'unit="{top[0]["unit"]}"') > 0.4
            assert_picture(a.get("/drift.png").content)

            # a fitted set's own training data as the reference
            r = a.post("/fit-alignment", json={"name": "drift-colour", "dataset": "world:colour",
                                               "world_sizes": {"train": 200, "val": 100, "test": 100},
                                               "hyperparameters": {"epochs": 2}})
            assert r.status_code == 202, r.text
            job: dict[str, Any] = wait_for(lambda: (lambda j: j if j["status"] in ("succeeded", "failed") else None)(
                a.get(r.json()["status_url"]).json()), 600, "the fit")
            assert job["status"] == "succeeded", job
            name, version = job["coefficients"].split("@")
            assert (artifacts / "coefficients" / name / "drift" / f"{version}.safetensors").is_file()
            assert [v["version"] for v in a.get(f"/coefficients/{name}").json()["versions"]] == [version]
            own = a.get("/drift", params={"coefficients": "drift-colour", "describe": 0}).json()
            assert "against" in own, own
            assert own["against"] == "training data" and own["coefficients"] == job["coefficients"]
            before = own["n_images"]
            _send(a, 5000, 128)
            assert a.get("/drift", params={"coefficients": "drift-colour", "window": "all",
                                           "describe": 0}).json()["n_images"] == before + 128
    finally:
        worker.kill()
        worker.wait(timeout=30)


def test_drift_off_costs_nothing_and_says_so(redis: RedisServer, tmp_path: Path) -> None:
    with api_server(redis.url, tmp_path / "artifacts", drift="off") as (client, _):
        _send(client, 1, 64)
        r = client.get("/drift")
        assert r.status_code == 503 and "RESIDUAL_DRIFT=off" in r.json()["error"]["message"]
        assert "residual_drift_score{" not in client.get("/metrics").text
