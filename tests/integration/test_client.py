"""The Python client (clients/python, torch-free) against a real running service: API process, worker, Redis."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from residual_client import APIError, AsyncClient, Client, JobFailed

from residual import DEFAULT_TEMPLATES
from residual.tiny import tasks
from tests.pictures import world_archive
from tests.processes import api_server, worker_process
from tests.redis_server import start_private

TASK = tasks.TASKS["colour"]
ADMIN = "client-admin-key-0123456789"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    redis = start_private()
    artifacts = tmp_path_factory.mktemp("client-artifacts")
    worker = worker_process(redis.url, artifacts)
    try:
        # a small queue, so that concurrent requests meet 429 and the client's retries are exercised for real
        with api_server(redis.url, artifacts, admin_api_key=ADMIN, max_queue="8") as (client, _):
            yield str(client.base_url)
    finally:
        worker.kill()
        worker.wait(timeout=30)
        redis.stop()


def test_the_client_does_not_import_torch() -> None:
    code = "import sys, residual_client; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_classify_with_every_image_kind(service: str, tmp_path: Path) -> None:
    images, labels, _ = tasks.task_images("colour", "test", n=4)
    path = tmp_path / "one.png"
    Image.fromarray(images[1]).save(path)
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, "PNG")
    with Client(service, api_key=ADMIN) as rs:
        out = rs.classify([buf.getvalue(), path, Image.fromarray(images[2]), images[3]], classes=list(TASK.classes),
                          templates=list(TASK.templates), top_k=2, explain=3)
        assert out.model == "residual-tiny" and out.coefficients is None and len(out.results) == 4
        predicted = [r.top[0].label for r in out.results]
        assert sum(p == TASK.classes[lab] for p, lab in zip(predicted, labels, strict=True)) >= 3
        first = out.results[0].top[0]
        assert 0 < first.score <= 1 and first.logit is not None and len(first.contributions or []) == 3
        assert first.contributions[0].unit.startswith(("L", "emb"))
        cos = rs.classify([images[0]], classes=list(TASK.classes), scores="cosine")
        assert -1 <= cos.results[0].top[0].score <= 1 and cos.results[0].top[0].contributions is None


def test_errors_carry_the_service_error(service: str) -> None:
    with Client(service, api_key=ADMIN) as rs:
        with pytest.raises(APIError) as info:
            rs.classify([b"not an image"], classes=["a", "b"])
        assert info.value.status == 415 and info.value.type == "unsupported_media" and "images[0]" in info.value.message
        with pytest.raises(APIError) as info:
            rs.label_set("ls-" + "0" * 20)
        assert info.value.status == 404 and info.value.type == "not_found"
    with Client(service, api_key="wrong-key-0123456789") as rs, pytest.raises(APIError) as info:
        rs.create_label_set(["a", "b"])
    assert info.value.status == 401


def test_label_sets_embeddings_and_heads(service: str) -> None:
    with Client(service, api_key=ADMIN) as rs:
        ident = rs.create_label_set(list(TASK.classes), list(TASK.templates))
        assert rs.label_set(ident)["classes"] == list(TASK.classes)
        image = tasks.task_images("colour", "test", n=1)[0][0]
        by_id = rs.classify([image], label_set_id=ident)
        assert by_id.label_set_id == ident
        texts = rs.embeddings(["a red circle", "a blue square"])
        assert len(texts) == 2 and abs(sum(x * x for x in texts[0]) - 1) < 1e-4
        pics = rs.embeddings([image], modality="image")
        assert len(pics[0]) == len(texts[0])
        assert rs.models()[0] == "residual-tiny"
        units = rs.heads()["units"]
        assert any(u["type"] == "head" for u in units)
        assert "description" in rs.head(2, 1, atoms=3)


def test_bases_build_list_and_use(service: str) -> None:
    with Client(service, api_key=ADMIN) as rs:
        done = rs.build_basis("client-shape", "world:shape", max_images=150).wait(timeout=300, poll_s=0.2)
        made = done["basis"]
        assert made["name"] == "client-shape" and made["n_images"] == 150 and done["kind"] == "basis"
        listing = rs.bases()
        assert made["basis_id"] in [b["basis_id"] for b in listing["bases"]]
        assert listing["default"]["rule"] == "the basis shipped with the weights"  # tiny keeps its own
        assert rs.basis("client-shape")["basis_id"] == made["basis_id"]
        assert rs.heads(basis=made["basis_id"])["basis"]["name"] == "client-shape"
        assert rs.head(2, 1, basis="client-shape", atoms=2)["basis"]["basis_id"] == made["basis_id"]
        fitted = rs.fit("client-basis-fit", "world:colour", variant="fine", basis=made["basis_id"],
                        world_sizes={"train": 100, "val": 30, "test": 20}, hyperparameters={"epochs": 1}
                        ).wait(timeout=300, poll_s=0.2)
        assert fitted["basis"]["basis_id"] == made["basis_id"]
        with pytest.raises(APIError) as info:
            rs.basis("no-such-basis")
        assert info.value.status == 404

    async def run() -> None:
        async with AsyncClient(service, api_key=ADMIN) as rs:
            assert made["basis_id"] in [b["basis_id"] for b in (await rs.bases())["bases"]]
            assert (await rs.basis(made["basis_id"]))["name"] == "client-shape"
            assert (await rs.heads(basis="client-shape"))["basis"]["basis_id"] == made["basis_id"]
            job = await rs.build_basis("client-shape-2", "world:shape", max_images=60)
            assert (await job.wait(timeout=300, poll_s=0.2))["basis"]["n_images"] == 60

    asyncio.run(run())


def test_fit_wait_activate_and_roll_back(service: str) -> None:
    sizes = {"train": 150, "val": 40, "test": 20}
    with Client(service, api_key=ADMIN) as rs:
        first = rs.fit("client-fit", "world:colour", variant="fine", world_sizes=sizes,
                       hyperparameters={"epochs": 2}).wait(timeout=300, poll_s=0.2, progress=True)
        second = rs.fit("client-fit", "world:colour", variant="full", world_sizes=sizes,
                        hyperparameters={"epochs": 2}).wait(timeout=300, poll_s=0.2)
        v1, v2 = (r["coefficients"].split("@")[1] for r in (first, second))
        assert rs.coefficient_versions("client-fit")["active"] == v2
        assert any(s["name"] == "client-fit" for s in rs.coefficient_sets())
        assert rs.rollback("client-fit")["active"] == v1
        image = tasks.task_images("colour", "test", n=1)[0][0]
        assert rs.classify([image], coefficients="client-fit").coefficients == f"client-fit@{v1}"
        assert rs.activate("client-fit", v2)["active"] == v2
        long = rs.fit("client-cancel", "world:colour", world_sizes={"train": 3000, "val": 500, "test": 100},
                      hyperparameters={"epochs": 200, "patience": 200})
        long.cancel()
        with pytest.raises(JobFailed) as info:
            long.wait(timeout=300, poll_s=0.2)
        assert info.value.info["status"] == "cancelled"


def test_async_client(service: str) -> None:
    """The async client does what the blocking one does, upload and fit included: a fit on an uploaded dataset
    without a label set takes the dataset's class folders and the default templates (issue 23.6)."""

    async def run() -> tuple[int, int, dict]:
        async with AsyncClient(service, api_key=ADMIN) as rs:
            image = tasks.task_images("colour", "test", n=1)[0][0]
            out = await rs.classify([image], classes=list(TASK.classes))
            texts = await rs.embeddings("a green star")  # one string: one vector
            dataset = await rs.upload_dataset(world_archive("colour", 42))
            job = await rs.fit("from-folders", dataset=dataset["dataset_id"], variant="coarse",
                               hyperparameters={"epochs": 1})
            done = await job.wait(timeout=300, poll_s=0.2)
            versions = await rs.coefficient_versions("from-folders")
            return len(out.results), len(texts[0]), {"dataset": dataset, "done": done, "versions": versions}

    n, dim, fitted = asyncio.run(run())
    assert (n, dim) == (1, 128)
    version = fitted["done"]["coefficients"].split("@")[1]
    label_set = {v["version"]: v for v in fitted["versions"]["versions"]}[version]["label_set"]
    assert label_set == {"classes": sorted(fitted["dataset"]["classes"]), "templates": list(DEFAULT_TEMPLATES)}
    assert sorted(label_set["classes"]) == sorted(TASK.classes)


def test_retries_on_429_honour_retry_after(service: str) -> None:
    """16 concurrent requests of 4 images against a queue of 8 images: the service answers 429 with Retry-After;
    the client retries and every request succeeds; the service's rejection counter shows the 429s happened."""
    images = tasks.task_images("colour", "test", n=4)[0]

    def rejected() -> float:
        for line in httpx.get(f"{service}/metrics").text.splitlines():
            if line.startswith('residual_requests_rejected_total{reason="queue_full"}'):
                return float(line.split()[-1])
        return 0.0

    before = rejected()
    with Client(service, api_key=ADMIN, max_retries=20, retry_budget_s=120) as rs:

        def one(_: int) -> int:
            return len(rs.classify(list(images), classes=list(TASK.classes)).results)

        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(one, range(32))) == [4] * 32
    assert rejected() > before
    with Client(service, api_key=ADMIN, max_retries=0) as rs, ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda _: _status(rs, images), range(32)))
    assert 429 in outcomes  # without retries the 429s reach the caller as APIError


def _status(rs: Client, images) -> int:
    try:
        rs.classify(list(images), classes=list(TASK.classes))
        return 200
    except APIError as exc:
        return exc.status
