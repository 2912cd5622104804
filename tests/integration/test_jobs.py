"""Alignment jobs end to end: the API in process, the worker as a real subprocess, a private real Redis."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from rq import Queue
from rq.serializers import JSONSerializer

from residual.tiny import tasks
from service.api.app import create_app
from service.jobs.queue import QUEUE_NAME
from tests.processes import api_process, worker_process
from tests.redis_server import RedisServer, free_port, start_private
from tests.service.conftest import make_settings, png_b64, wait_ready
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def redis_jobs() -> Iterator[RedisServer]:
    server = start_private()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("job-artifacts")


METRICS_PORT = free_port()


def start_worker(redis_url: str, artifacts: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, RESIDUAL_REDIS_URL=redis_url, RESIDUAL_ARTIFACT_DIR=str(artifacts), RESIDUAL_DEVICE="cpu",
               HF_HUB_OFFLINE="1", RESIDUAL_WORKER_METRICS_PORT=str(METRICS_PORT))
    return subprocess.Popen([sys.executable, "-m", "service.jobs.worker", "--log-level", "warning"], cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def worker(redis_jobs: RedisServer, artifacts: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_worker(redis_jobs.url, artifacts)
    yield proc
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def api(redis_jobs: RedisServer, artifacts: Path, worker) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(artifacts, redis_jobs.url))) as c:
        wait_ready(c)
        yield c


def wait_status(client: TestClient, job_id: str, statuses: set[str], timeout: float = 300.0,
                phase: str | None = None) -> dict:
    def reached() -> dict | None:
        body = client.get(f"/fit-alignment/{job_id}").json()
        ok = body["status"] in statuses and (phase is None or body["progress"].get("phase") == phase)
        return body if ok else None

    return wait_for(reached, timeout, f"job {job_id} to reach {statuses} (phase {phase})", interval=0.2)


def _accuracy(client: TestClient, task: str, coefficients: str | None, n: int = 200) -> float:
    images, labels, _ = tasks.task_images(task, "test", n=n)
    t = tasks.TASKS[task]
    correct = 0
    for i in range(0, n, 50):
        body = {"images": [png_b64(a) for a in images[i : i + 50]], "top_k": 1}
        if coefficients:
            body["coefficients"] = coefficients
        else:
            body["label_set"] = {"classes": list(t.classes), "templates": list(t.templates)}
        r = client.post("/classify", json=body)
        assert r.status_code == 200, r.text
        for res, lab in zip(r.json()["results"], labels[i : i + 50], strict=True):
            correct += res["top"][0]["label"] == t.classes[lab]
    return correct / n


def _worker_metric(name: str) -> float:
    """One sample of the worker's metrics (0 when absent), once its endpoint answers (the worker may be starting)."""

    def scrape() -> str | None:
        try:
            return httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics").text
        except httpx.TransportError:
            return None

    for line in wait_for(scrape, 120, "the worker's metrics endpoint").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_world_fit_then_classify_beats_zero_shot(api: TestClient) -> None:
    fits_before = _worker_metric('residual_fit_duration_seconds_count{variant="full"}')
    r = api.post("/fit-alignment", json={"name": "position", "dataset": "world:position", "variant": "full"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status_url"] == f"/fit-alignment/{job['job_id']}"
    done = wait_status(api, job["job_id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    report = done["report"]
    assert report["test_accuracy"] > report["zero_shot_test_accuracy"]
    assert done["coefficients"].startswith("position@v-") and done["kind"] == "fit-alignment"
    zero_shot = _accuracy(api, "position", None)
    fitted = _accuracy(api, "position", "position")
    assert fitted >= zero_shot + 0.1, (zero_shot, fitted)
    listing = api.get("/coefficients/position").json()
    assert listing["active"] == done["coefficients"].split("@")[1]
    assert api.get("/fit-alignment").json()["total"] >= 1
    scraped = api.get("/metrics").text
    assert 'residual_queue_jobs{status="succeeded"}' in scraped and "residual_queue_length" in scraped
    assert _worker_metric('residual_fit_duration_seconds_count{variant="full"}') == fits_before + 1  # this fit
    assert _worker_metric('residual_feature_cache_lookups_total{result="miss"}') >= 1


def test_refit_with_new_templates_is_a_new_version_with_its_label_set(api: TestClient) -> None:
    """Issue 23.1: with a learning rate too small to move a float32 lambda, no epoch beats the initial coefficients,
    so every fit keeps all-ones lambdas; a refit with other templates must still be a new version holding them."""
    t = tasks.TASKS["colour"]
    body = {"name": "refit", "dataset": "world:colour", "variant": "full",
            "world_sizes": {"train": 60, "val": 30, "test": 20}, "hyperparameters": {"epochs": 1, "lr": 1e-9}}
    old_templates, new_templates = ["a photo of a {} object."], ["something coloured {}.", "a {} thing."]
    jobs = {}
    for key, templates in (("old", old_templates), ("new", new_templates), ("again", new_templates)):
        r = api.post("/fit-alignment", json={**body, "label_set": {"classes": list(t.classes), "templates": templates}})
        assert r.status_code == 202, r.text
        jobs[key] = wait_status(api, r.json()["job_id"], {"succeeded", "failed"})
        assert jobs[key]["status"] == "succeeded", jobs[key]
        assert jobs[key]["report"]["best_epoch"] == 0  # the initial (all-ones) lambdas were kept
    old_v, new_v = (jobs[k]["coefficients"].split("@")[1] for k in ("old", "new"))
    assert old_v != new_v
    assert jobs["old"]["written"] and jobs["new"]["written"] and jobs["new"]["activated"]
    versions = {v["version"]: v for v in api.get("/coefficients/refit").json()["versions"]}
    assert versions[new_v]["label_set"]["templates"] == new_templates
    assert versions[old_v]["label_set"]["templates"] == old_templates
    assert versions[new_v]["report"]["job_id"] == jobs["new"]["job_id"]
    again = jobs["again"]
    assert again["coefficients"] == f"refit@{new_v}" and again["written"] is False
    assert again["identical_to"] == new_v and f"identical to refit@{new_v}" in again["message"]
    # the stored version keeps the report of the job that wrote it, not the identical rerun's
    listing = api.get("/coefficients/refit").json()
    assert listing["active"] == new_v
    assert {v["version"]: v for v in listing["versions"]}[new_v]["report"]["job_id"] == jobs["new"]["job_id"]


def _archive(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _png(a) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def test_archive_upload_and_fit(api: TestClient) -> None:
    t = tasks.TASKS["colour"]
    images, labels, _ = tasks.task_images("colour", "train", n=140)
    archive = _archive({f"{t.classes[lab]}/{i}.png": _png(a) for i, (a, lab) in enumerate(zip(images, labels,
                                                                                             strict=True))})
    r = api.post("/datasets", content=archive, headers={"content-type": "application/x-tar"})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert sum(ds["counts"].values()) == 140 and set(ds["classes"]) == set(t.classes)
    r = api.post("/fit-alignment", json={"name": "colour-upload", "dataset": ds["dataset_id"], "variant": "coarse",
                                         "label_set": {"classes": list(t.classes), "templates": list(t.templates)},
                                         "hyperparameters": {"epochs": 3}})
    assert r.status_code == 202, r.text
    done = wait_status(api, r.json()["job_id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["report"]["n_train"] + done["report"]["n_val"] == 140


def test_fit_on_train_basis_is_served(api: TestClient, artifacts: Path) -> None:
    assert api.app.state.runtime.ready.coefficients.any_basis() is not None  # the replica has scanned its bases already
    r = api.post("/fit-alignment", json={"name": "own-basis", "dataset": "world:texture", "variant": "fine",
                                         "basis": "fit-on-train", "world_sizes": {"train": 300, "val": 100, "test": 50},
                                         "hyperparameters": {"epochs": 2}})
    done = wait_status(api, r.json()["job_id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert len(list((artifacts / "bases").glob("*.safetensors"))) >= 1
    image = png_b64(tasks.task_images("texture", "test", n=1)[0][0])
    r = api.post("/classify", json={"images": [image], "coefficients": "own-basis"})
    assert r.status_code == 200, r.text
    assert r.json()["coefficients"] == done["coefficients"]


@pytest.mark.parametrize(("entries", "fragment"), [
    ({"red/../../evil.png": b"x"}, "'..'"),
    ({"/abs/red.png": b"x"}, "absolute"),
    ({"red/a.png": b"not an image", "blue/b.png": b"x"}, "'red/a.png': images[0] is not a decodable"),
    ({"flat.png": b"x"}, "ImageFolder"),
])
def test_bad_archives_answer_422(api: TestClient, entries: dict[str, bytes], fragment: str) -> None:
    r = api.post("/datasets", content=_archive(entries), headers={"content-type": "application/x-tar"})
    assert r.status_code in (415, 422), r.text
    assert fragment in r.json()["error"]["message"]


def test_archive_with_a_link_is_refused(api: TestClient) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("red/link.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    r = api.post("/datasets", content=buf.getvalue(), headers={"content-type": "application/x-tar"})
    assert r.status_code == 422 and "link" in r.json()["error"]["message"]


def test_submission_problems_answer_at_once(api: TestClient) -> None:
    one = png_b64(tasks.task_images("colour", "train", n=1)[0][0])
    cases = [
        ({"name": "x", "dataset": "ds-" + "0" * 20, "label_set": {"classes": ["a", "b"]}}, 404, "unknown dataset"),
        ({"name": "x", "dataset": "world:nope"}, 422, "unknown world task"),
        ({"name": "../x", "dataset": "world:shape"}, 422, "must match"),
        ({"name": "x", "dataset": {"images": [one, one], "labels": ["a", "b"]},
          "label_set": {"classes": ["a", "c"]}}, 422, "not in the label set"),
        ({"name": "x", "dataset": {"images": [one, one], "labels": ["a", "a"]},
          "label_set": {"classes": ["a", "b"]}}, 422, "single class"),
        ({"name": "x", "dataset": {"images": [one, one], "labels": ["a", "b"]},
          "label_set": {"classes": ["a", "b", "c"]}}, 422, "without images"),
        ({"name": "x", "dataset": {"images": [one, "!!!"], "labels": ["a", "b"]},
          "label_set": {"classes": ["a", "b"]}}, 422, "base64"),
    ]
    for body, status, fragment in cases:
        r = api.post("/fit-alignment", json=body)
        assert r.status_code == status, (body, r.text)
        assert fragment in r.json()["error"]["message"], r.text
    assert api.get("/fit-alignment/" + "f" * 36).status_code == 404


def test_cancel_queued_and_running(api: TestClient) -> None:
    big = {"name": "cancel-me", "dataset": "world:shape", "world_sizes": {"train": 3000, "val": 500, "test": 500},
           "hyperparameters": {"epochs": 200, "patience": 200}}
    running = api.post("/fit-alignment", json=big).json()["job_id"]
    queued = api.post("/fit-alignment", json={**big, "name": "cancel-queued"}).json()["job_id"]
    wait_status(api, running, {"running"})
    r = api.delete(f"/fit-alignment/{queued}")
    assert r.json()["status"] == "cancelled"
    wait_status(api, running, {"running"}, phase="fitting")
    api.delete(f"/fit-alignment/{running}")
    done = wait_status(api, running, {"cancelled", "failed", "succeeded"})
    assert done["status"] == "cancelled", done


def test_activation_and_rollback_seen_by_another_replica(api: TestClient, redis_jobs: RedisServer,
                                                         artifacts: Path) -> None:
    ids = []
    for seed in (1, 2):
        r = api.post("/fit-alignment", json={"name": "roll", "dataset": "world:texture", "variant": "full",
                                             "world_sizes": {"train": 300, "val": 100, "test": 50},
                                             "hyperparameters": {"epochs": 3, "seed": seed, "patience": 3}})
        ids.append(wait_status(api, r.json()["job_id"], {"succeeded", "failed"})["coefficients"])
    v1, v2 = (i.split("@")[1] for i in ids)
    assert v1 != v2
    image = png_b64(tasks.task_images("texture", "test", n=1)[0][0])
    with api_process(redis_jobs.url, artifacts) as other:
        assert other.post("/classify", json={"images": [image], "coefficients": "roll"}).json()[
            "coefficients"] == f"roll@{v2}"
        assert api.post("/coefficients/roll/activate", json={"version": v1}).json()["active"] == v1
        assert other.post("/classify", json={"images": [image], "coefficients": "roll"}).json()[
            "coefficients"] == f"roll@{v1}"
        assert other.post("/classify", json={"images": [image], "coefficients": f"roll@{v2}"}).json()[
            "coefficients"] == f"roll@{v2}"
    assert api.post("/coefficients/roll/activate", json={"version": "v-nope"}).status_code == 404


class _Planted:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def test_pickled_job_payload_is_refused(api: TestClient, redis_jobs: RedisServer, artifacts: Path,
                                        tmp_path: Path) -> None:
    """A job whose payload is a pickle (planted straight into Redis) fails to deserialize; no code runs."""
    import pickle
    import zlib

    conn = redis.Redis.from_url(redis_jobs.url)
    queue = Queue(QUEUE_NAME, connection=conn, serializer=JSONSerializer)
    sentinel = tmp_path / "pwned"
    job = queue.enqueue("service.jobs.fit.run", {"planted": True}, job_timeout=60)
    conn.hset(job.key, "data", zlib.compress(pickle.dumps((_Planted(sentinel), None, (), {}))))
    done = wait_status(api, job.id, {"failed", "succeeded", "cancelled"}, timeout=60)
    assert done["status"] == "failed"
    assert not sentinel.exists()
    # the worker survived and still takes jobs
    r = api.post("/fit-alignment", json={"name": "after-pickle", "dataset": "world:colour", "variant": "coarse",
                                         "world_sizes": {"train": 100, "val": 20, "test": 20},
                                         "hyperparameters": {"epochs": 1}})
    assert wait_status(api, r.json()["job_id"], {"succeeded", "failed"})["status"] == "succeeded"


def test_large_head_alignment_becomes_a_job(redis_jobs: RedisServer, artifacts: Path, worker) -> None:
    settings = make_settings(artifacts, redis_jobs.url, heads_sync_max_images=50)
    with TestClient(create_app(settings)) as small:
        wait_ready(small)
        body = {"dataset": "world:colour", "world_sizes": {"score": 40, "eval": 60}, "seeds": 2}
        r = small.post("/heads/alignment", json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status_url"] == f"/heads/alignment/{job['job_id']}" and job["images"] == 100
        assert small.get(f"{job['status_url']}.png").status_code in (409, 200)

        def finished() -> dict | None:
            info = small.get(job["status_url"]).json()
            return info if info["status"] in ("succeeded", "failed") else None

        done = wait_for(finished, 300, "the head-alignment job to finish", interval=0.2)
        assert done["status"] == "succeeded", done
        assert len(done["heads"]) == 24 and done["n_score"] == 40 and done["n_eval"] == 60
        assert done["kind"] == "head-alignment"
        png = small.get(f"{job['status_url']}.png?picture=ablation")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    # the worker's numbers are the API's numbers: the same request answered directly by a replica with a larger limit
    with TestClient(create_app(make_settings(artifacts, redis_jobs.url, heads_sync_max_images=1000))) as direct:
        wait_ready(direct)
        same = direct.post("/heads/alignment", json=body)
        assert same.status_code == 200, same.text
        for a, b in zip(done["heads"], same.json()["heads"], strict=True):
            assert abs(a["text_correlation"] - b["text_correlation"]) < 1e-4


def test_killed_worker_leaves_no_job_running_forever(tmp_path: Path) -> None:
    """On a Redis and a worker of its own, so killing that worker leaves the module's worker to the other tests."""
    own = start_private()
    victim = worker_process(own.url, tmp_path)
    replacement = None
    try:
        with TestClient(create_app(make_settings(tmp_path, own.url))) as api:
            wait_ready(api)
            r = api.post("/fit-alignment", json={"name": "killed", "dataset": "world:digit",
                                                 "world_sizes": {"train": 3000, "val": 500, "test": 500},
                                                 "hyperparameters": {"epochs": 200, "patience": 200}})
            job_id = r.json()["job_id"]
            wait_status(api, job_id, {"running"}, phase="fitting")
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            replacement = worker_process(own.url, tmp_path)
            done = wait_status(api, job_id, {"failed", "succeeded", "cancelled"}, timeout=180)
            assert done["status"] == "failed"
            assert done["error"]
    finally:
        for proc in (victim, replacement):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        own.stop()
