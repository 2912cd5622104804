"""Bounds a client cannot push past (issue 24): prompts per label set, the size of an answer, pixels per request,
strings from archives and clients, integer ranges, chunked bodies, refused fits that would leave data behind, and
a full disk (507 and no leftovers, by fault injection at the writer: the real-disk version with a tmpfs is in
tests/integration/test_hostile_clients.py)."""

from __future__ import annotations

import errno
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from residual.tiny import tasks
from service.api.app import create_app
from service.jobs.queue import cancel_key
from tests.service.conftest import make_settings, png_b64, wait_ready

TASK = tasks.TASKS["colour"]


def _message(r) -> str:
    return r.json()["error"]["message"]


def _png(side: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, redis_server) -> Iterator[tuple[TestClient, Path]]:
    """A replica with small budgets, so each bound is reached with small requests."""
    artifacts = tmp_path_factory.mktemp("limits")
    settings = make_settings(artifacts, redis_server.url, max_prompts=50, max_response_items=40,
                             max_request_pixels=3_000_000, max_image_pixels=2_000_000, job_result_ttl_s=777_777)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c, artifacts


def test_a_label_set_over_the_prompt_budget_is_413(small: tuple[TestClient, Path]) -> None:
    c, _ = small
    image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    classes = [f"class {i}" for i in range(26)]
    r = c.post("/classify", json={"images": [image], "label_set": {"classes": classes, "templates": ["{}", "a {}"]}})
    assert r.status_code == 413
    assert _message(r) == ("the label set has 26 classes x 2 templates = 52 prompts; the limit per label set is 50 "
                           "(RESIDUAL_MAX_PROMPTS)")
    r = c.post("/label-sets", json={"classes": classes, "templates": ["{}", "a {}"]})
    assert r.status_code == 413
    ok = c.post("/classify", json={"images": [image],
                                   "label_set": {"classes": classes[:25], "templates": ["{}", "a {}"]}})
    assert ok.status_code == 200


def test_an_answer_over_the_response_budget_is_413(small: tuple[TestClient, Path]) -> None:
    c, _ = small
    images = [png_b64(a) for a in tasks.task_images("colour", "test", n=4)[0]]
    body = {"images": images, "label_set": {"classes": list(TASK.classes)}, "top_k": 5, "explain": 1}
    r = c.post("/classify", json=body)  # 4 images x 5 labels x (1 + 1) = 40: the limit
    assert r.status_code == 200
    r = c.post("/classify", json={**body, "explain": 2})  # 4 x 5 x 3 = 60
    assert r.status_code == 413
    assert _message(r) == ("the answer would hold 60 items (images x top_k x (explain + 1)); the limit is 40: ask for "
                           "fewer images, a smaller top_k or explain")
    r = c.post("/classify", json={**body, "explain": 100_000, "top_k": 1, "images": images[:1]})  # 1 x 1 x (31 + 1)
    assert r.status_code == 200  # explain is counted up to the number of units


def test_pixels_per_request_are_budgeted_before_decoding(small: tuple[TestClient, Path]) -> None:
    c, _ = small
    big = _png(1400)  # 1.96 Mpx, under the per-image ceiling (2 Mpx)
    files = [("images", (f"{i}.png", big, "image/png")) for i in range(2)]
    r = c.post("/classify", files=files, data={"label_set": json.dumps({"classes": ["red", "blue"]})})
    assert r.status_code == 413
    assert _message(r) == ("the request's 2 images hold 3920000 pixels in all; the limit per request is 3000000 (send "
                           "fewer or smaller images)")
    r = c.post("/classify", files=files[:1], data={"label_set": json.dumps({"classes": ["red", "blue"]})})
    assert r.status_code == 200
    assert r.json()["results"][0]["top"][0]["label"] == "red"


def _tar(entries: dict[bytes, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for raw_name, data in entries.items():
            info = tarfile.TarInfo(raw_name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(("folder", "message"), [
    (b"caf\xe9", "is not valid UTF-8 (it holds a lone surrogate)"),
    (b"red\x07", "contains control characters (U+0007)"),
    ("evil\u202eyxc".encode(), "contains a bidirectional control character (U+202E)"),
    (b"x" * 5000, "has 5000 characters; the limit is 300"),
])
def test_archive_class_names_are_checked_like_label_set_classes(small: tuple[TestClient, Path], folder: bytes,
                                                                message: str) -> None:
    c, artifacts = small
    png = _png(8)
    archive = _tar({folder + b"/a.png": png, b"blue/b.png": png})
    r = c.post("/datasets", content=archive, headers={"content-type": "application/x-tar"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "invalid_request" and message in _message(r)
    assert not list((artifacts / "datasets").glob("*")) or all(p.name.startswith("ds-")
                                                             for p in (artifacts / "datasets").iterdir())


def test_a_lone_surrogate_is_422_wherever_it_comes_from(small: tuple[TestClient, Path]) -> None:
    """It was a 500 (the error body could not be encoded). In a JSON body pydantic's parser refuses the escape; in a
    multipart label_set (parsed by json.loads, which accepts it) our text check does."""
    c, _ = small
    image = png_b64(tasks.task_images("colour", "test", n=1)[0][0])
    raw = ('{"name": "x", "dataset": {"images": ["IMG", "IMG"], "labels": ["red", "\\ud800"]}, '
           '"label_set": {"classes": ["red", "blue"]}}').replace("IMG", image).encode()
    r = c.post("/fit-alignment", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and _message(r).startswith("body is not valid JSON: unexpected end of hex escape")
    files = [("images", ("a.png", _png(8), "image/png"))]
    r = c.post("/classify", files=files, data={"label_set": '{"classes": ["red", "\\ud800"]}'})
    assert r.status_code == 422 and _message(r) == "class 1 is not valid UTF-8 (it holds a lone surrogate)"


@pytest.mark.parametrize(("hyper", "field"), [({"seed": 2**64}, "hyperparameters.seed"),
                                              ({"seed": -1}, "hyperparameters.seed"),
                                              ({"epochs": 10**9}, "hyperparameters.epochs")])
def test_integers_are_range_checked(small: tuple[TestClient, Path], hyper: dict, field: str) -> None:
    c, _ = small
    r = c.post("/fit-alignment", json={"name": "x", "dataset": "world:colour", "hyperparameters": hyper})
    assert r.status_code == 422 and _message(r).startswith(field + ": Input should be")


def test_a_chunked_body_over_the_limit_is_413(redis_server, tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, redis_server.url, max_request_bytes=1000))) as c:
        wait_ready(c)

        def chunks() -> Iterator[bytes]:
            yield b'{"classes": ["' + b"a" * 600
            yield b"b" * 600 + b'"]}'

        for path in ("/label-sets", "/fit-alignment", "/v1/embeddings", "/bases"):
            r = c.post(path, content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413, (path, r.text)
            assert _message(r) == "request body exceeds 1000 bytes"


def test_a_refused_fit_leaves_nothing_on_disk(small: tuple[TestClient, Path]) -> None:
    """An inline dataset is stored only once nothing else can refuse the request (here: an unknown basis)."""
    c, artifacts = small
    images = [png_b64(a) for a in tasks.task_images("colour", "test", n=4)[0]]
    before = sorted(p.name for p in (artifacts / "datasets").glob("*")) if (artifacts / "datasets").exists() else []
    body = {"name": "refused", "dataset": {"images": images, "labels": ["red", "blue", "red", "blue"]},
            "label_set": {"classes": ["red", "blue"]}, "basis": "no-such-basis"}
    r = c.post("/fit-alignment", json=body)
    assert r.status_code == 404 and _message(r) == "unknown basis 'no-such-basis' (GET /bases lists them)"
    after = sorted(p.name for p in (artifacts / "datasets").glob("*")) if (artifacts / "datasets").exists() else []
    assert after == before


def test_a_cancel_flag_lives_as_long_as_the_job(small: tuple[TestClient, Path], redis_server) -> None:
    """The flag's TTL is the job record's (job_result_ttl_s), not the job timeout: a cancelled job never later
    reads 'failed'."""
    c, _ = small
    r = c.post("/fit-alignment", json={"name": "to-cancel", "dataset": "world:colour"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert c.delete(f"/fit-alignment/{job_id}").json()["status"] == "cancelled"
    ttl = redis.Redis.from_url(redis_server.url).ttl(cancel_key(job_id))
    assert 777_000 < ttl <= 777_777


def test_a_full_disk_answers_507_and_leaves_nothing(small: tuple[TestClient, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer fails with ENOSPC half way through a dataset: 507 with the JSON body, the temporary folder is
    gone, and the next write (a label set) works."""
    import service.stores.datasets as datasets

    c, artifacts = small
    real = datasets._write_synced
    written = {"n": 0}

    def full_after_two(path: Path, data: bytes) -> None:
        written["n"] += 1
        if written["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(datasets, "_write_synced", full_after_two)
    archive = _tar({f"{'red' if i % 2 else 'blue'}/{i}.png".encode(): _png(8, (i, 0, 0)) for i in range(6)})
    r = c.post("/datasets", content=archive, headers={"content-type": "application/x-tar"})
    assert r.status_code == 507, r.text
    assert r.json()["error"]["type"] == "insufficient_storage"
    assert _message(r).startswith("the artifact volume is full (No space left on device); nothing was stored")
    assert r.headers["retry-after"] == "60"
    assert list((artifacts / "datasets").glob(".ds-*")) == []
    monkeypatch.setattr(datasets, "_write_synced", real)
    assert c.post("/label-sets", json={"classes": ["after", "full"]}).status_code == 201
