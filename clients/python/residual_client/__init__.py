"""Python client of ResiDual Serve: ``Client`` (blocking) and ``AsyncClient`` with the same methods.

Depends on httpx only (Pillow and numpy only to send PIL images or arrays; tqdm only for progress bars).

    from residual_client import Client
    with Client("http://127.0.0.1:8000", api_key=None) as rs:
        out = rs.classify(["cat.png"], classes=["cat", "dog"], explain=3)
        print(out.results[0].top[0].label, out.results[0].top[0].score)
        job = rs.fit("pets", dataset="ds-...", classes=["cat", "dog"])
        job.wait(progress=True)

Errors: every non-2xx answer raises :class:`APIError` (``.status``, ``.type``, ``.message`` from the service's
error body). 429 and 503 are retried, honouring ``Retry-After``, within ``max_retries`` and ``retry_budget_s``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = ["APIError", "AsyncClient", "AsyncJob", "ClassifyResult", "Client", "Contribution", "ImageResult", "Job",
           "JobFailed", "Label"]

_RETRY_STATUSES = (429, 503)
_DONE = ("succeeded", "failed", "cancelled")


class APIError(Exception):
    """A non-2xx answer: HTTP ``status``, the service's error ``type`` and ``message``."""

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status, self.type, self.message = status, type, message

    @classmethod
    def from_response(cls, r: httpx.Response) -> APIError:
        try:
            err = r.json()["error"]
            return cls(r.status_code, str(err.get("type", "error")), str(err.get("message", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(r.status_code, "http_error", r.text[:500])


class JobFailed(APIError):
    """A job that ended failed or cancelled; ``info`` is its last status."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__(200, f"job_{info.get('status')}", str(info.get("error") or info.get("status")))
        self.info = info


# ---- typed results ---------------------------------------------------------------------------------------------


@dataclass
class Contribution:
    unit: str  # "emb", "L<l>.MLP", "L<l>.H<h>"
    logit: float


@dataclass
class Label:
    label: str
    score: float
    logit: float | None = None
    contributions: list[Contribution] | None = None


@dataclass
class ImageResult:
    top: list[Label]


@dataclass
class ClassifyResult:
    model: str
    weights_id: str
    coefficients: str | None
    label_set_id: str
    results: list[ImageResult] = field(default_factory=list)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> ClassifyResult:
        results = [ImageResult([Label(p["label"], p["score"], p.get("logit"),
                                      [Contribution(**c) for c in p["contributions"]] if "contributions" in p else None)
                                for p in r["top"]]) for r in body["results"]]
        return cls(body["model"], body["weights_id"], body.get("coefficients"), body["label_set_id"], results)


# ---- requests, built once for both clients ----------------------------------------------------------------------


@dataclass
class _Call:
    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    parse: Callable[[httpx.Response], Any] = lambda r: r.json()


def _image_bytes(image: Any) -> tuple[str, bytes]:
    """(file name, encoded bytes) of bytes, a path, a PIL image or an (h, w, 3) uint8 array."""
    if isinstance(image, bytes | bytearray):
        return "image", bytes(image)
    if isinstance(image, str | os.PathLike):
        p = Path(image)
        return p.name, p.read_bytes()
    if hasattr(image, "save"):  # PIL image
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return "image.png", buf.getvalue()
    if hasattr(image, "__array__"):
        from PIL import Image  # optional dependency: residual-client[images]

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        return "image.png", buf.getvalue()
    raise TypeError(f"images must be bytes, paths, PIL images or numpy arrays, not {type(image).__name__}")


def _classify(images: Sequence[Any], classes: Sequence[str] | None, templates: Sequence[str] | None,
              label_set_id: str | None, coefficients: str | None, top_k: int | None, explain: int | None,
              scores: str | None) -> _Call:
    data: dict[str, str] = {}
    if classes is not None:
        data["label_set"] = json.dumps({"classes": list(classes),
                                        **({"templates": list(templates)} if templates is not None else {})})
    for key, value in (("label_set_id", label_set_id), ("coefficients", coefficients), ("top_k", top_k),
                       ("explain", explain), ("scores", scores)):
        if value is not None:
            data[key] = str(value)
    files = [("images", (*_image_bytes(im), "application/octet-stream")) for im in images]
    return _Call("POST", "/classify", {"files": files, "data": data}, lambda r: ClassifyResult.parse(r.json()))


def _embeddings(inputs: str | Sequence[Any], model: str | None, modality: str, served: str | None) -> _Call:
    items = [inputs] if isinstance(inputs, str | bytes) else list(inputs)
    if modality == "image":
        import base64

        items = [base64.b64encode(_image_bytes(x)[1]).decode() for x in items]
    body = {"model": model or served or "residual-tiny", "input": items, "modality": modality}
    return _Call("POST", "/v1/embeddings", {"json": body},
                 lambda r: [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])])


def _fit(name: str, dataset: Any, classes: Sequence[str] | None, templates: Sequence[str] | None,
         label_set_id: str | None, variant: str, hyperparameters: dict[str, Any] | None, basis: str,
         activate: bool, world_sizes: dict[str, int] | None) -> _Call:
    body: dict[str, Any] = {"name": name, "dataset": dataset, "variant": variant, "basis": basis,
                            "activate": activate}
    if classes is not None:
        body["label_set"] = {"classes": list(classes), **({"templates": list(templates)} if templates else {})}
    if label_set_id is not None:
        body["label_set_id"] = label_set_id
    if hyperparameters:
        body["hyperparameters"] = hyperparameters
    if world_sizes:
        body["world_sizes"] = world_sizes
    return _Call("POST", "/fit-alignment", {"json": body})


def _build_basis(name: str, dataset: str, max_images: int | None) -> _Call:
    body: dict[str, Any] = {"name": name, "dataset": dataset}
    if max_images is not None:
        body["max_images"] = max_images
    return _Call("POST", "/bases", {"json": body})


def _bases(all_weights: bool) -> _Call:
    return _Call("GET", "/bases", {"params": {"all_weights": "true"} if all_weights else {}})


def _heads(basis: str | None) -> _Call:
    return _Call("GET", "/heads", {"params": {"basis": basis} if basis else {}})


def _retry_after(r: httpx.Response, attempt: int) -> float:
    try:
        return max(0.0, float(r.headers.get("retry-after", "")))
    except ValueError:
        return min(8.0, 0.5 * 2**attempt)


class _Base:
    def __init__(self, base_url: str, api_key: str | None, max_retries: int, retry_budget_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_retries = max_retries
        self.retry_budget_s = retry_budget_s
        self._model: str | None = None

    def _should_retry(self, r: httpx.Response, attempt: int, started: float) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if r.status_code not in _RETRY_STATUSES or attempt >= self.max_retries:
            return None
        wait = _retry_after(r, attempt)
        return wait if time.monotonic() - started + wait <= self.retry_budget_s else None

    def _args(self, call: _Call) -> dict[str, Any]:
        """The request's keyword arguments with the auth header merged into its own headers."""
        kw = dict(call.kwargs)
        kw["headers"] = {**self.headers, **kw.get("headers", {})}
        return kw

    @staticmethod
    def _finish(call: _Call, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            raise APIError.from_response(r)
        return call.parse(r)


class Client(_Base):
    """Blocking client. ``images`` anywhere: bytes, file paths, PIL images or numpy arrays (sent as multipart)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0, max_retries: int = 4,
                 retry_budget_s: float = 60.0, http: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key, max_retries, retry_budget_s)
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, call: _Call) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            r = self._http.request(call.method, call.path, **self._args(call))
            wait = self._should_retry(r, attempt, started)
            if wait is None:
                return self._finish(call, r)
            time.sleep(wait)
            attempt += 1

    # ---- classification and embeddings -------------------------------------------------------------------------
    def classify(self, images: Sequence[Any], classes: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None, label_set_id: str | None = None,
                 coefficients: str | None = None, top_k: int | None = None, explain: int | None = None,
                 scores: str | None = None) -> ClassifyResult:
        return self._run(_classify(images, classes, templates, label_set_id, coefficients, top_k, explain, scores))

    def embeddings(self, inputs: str | Sequence[Any], model: str | None = None, modality: str = "text"
                   ) -> list[list[float]]:
        """Texts (``modality="text"``) or images; ``model`` '<model>' or '<model>:<coefficient set>'."""
        return self._run(_embeddings(inputs, model, modality, self._served()))

    def models(self) -> list[str]:
        return [m["id"] for m in self._run(_Call("GET", "/v1/models"))["data"]]

    def _served(self) -> str:
        if self._model is None:
            self._model = self.models()[0]
        return self._model

    # ---- label sets ----------------------------------------------------------------------------------------------
    def create_label_set(self, classes: Sequence[str], templates: Sequence[str] | None = None) -> str:
        body = {"classes": list(classes), **({"templates": list(templates)} if templates else {})}
        return self._run(_Call("POST", "/label-sets", {"json": body}))["label_set_id"]

    def label_set(self, label_set_id: str) -> dict[str, Any]:
        return self._run(_Call("GET", f"/label-sets/{label_set_id}"))

    # ---- fits, datasets and coefficient sets ---------------------------------------------------------------------
    def fit(self, name: str, dataset: Any, classes: Sequence[str] | None = None,
            templates: Sequence[str] | None = None, label_set_id: str | None = None, variant: str = "full",
            hyperparameters: dict[str, Any] | None = None, basis: str = "reference", activate: bool = True,
            world_sizes: dict[str, int] | None = None) -> Job:
        """Start a fit; ``dataset`` is a dataset id, ``"world:<task>"`` or ``{"images", "labels"}``."""
        acc = self._run(_fit(name, dataset, classes, templates, label_set_id, variant, hyperparameters, basis,
                             activate, world_sizes))
        return Job(self, acc["job_id"], acc["status_url"])

    def upload_dataset(self, archive: bytes | str | os.PathLike[str]) -> dict[str, Any]:
        data = archive if isinstance(archive, bytes) else Path(archive).read_bytes()
        kind = "application/zip" if data[:2] == b"PK" else "application/x-tar"
        return self._run(_Call("POST", "/datasets", {"content": data, "headers": {"content-type": kind}}))

    def coefficient_sets(self) -> list[dict[str, Any]]:
        return self._run(_Call("GET", "/coefficients"))["coefficient_sets"]

    def coefficient_versions(self, name: str) -> dict[str, Any]:
        return self._run(_Call("GET", f"/coefficients/{name}"))

    def activate(self, name: str, version: str) -> dict[str, Any]:
        return self._run(_Call("POST", f"/coefficients/{name}/activate", {"json": {"version": version}}))

    def rollback(self, name: str) -> dict[str, Any]:
        """Activate the version listed before the active one."""
        return self.activate(name, _previous(self.coefficient_versions(name)))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._run(_Call("GET", f"/fit-alignment/{job_id}"))

    # ---- bases and heads -----------------------------------------------------------------------------------------
    def build_basis(self, name: str, dataset: str, max_images: int | None = None) -> Job:
        """Build a basis on the worker from a dataset id, ``"world:<task>"`` or ``"world:mixture"``; ``wait()``
        returns the job with its ``basis``."""
        acc = self._run(_build_basis(name, dataset, max_images))
        return Job(self, acc["job_id"], acc["status_url"])

    def bases(self, all_weights: bool = False) -> dict[str, Any]:
        """``{"weights_id", "default", "bases"}``: the served weights' bases, newest first, and the default."""
        return self._run(_bases(all_weights))

    def basis(self, basis: str) -> dict[str, Any]:
        """One basis by id or name, with per-unit k_90 / k_99 / evr_1."""
        return self._run(_Call("GET", f"/bases/{basis}"))

    def heads(self, basis: str | None = None) -> dict[str, Any]:
        return self._run(_heads(basis))

    def head(self, layer: int, head: int, **params: Any) -> dict[str, Any]:
        """``params``: ``basis``, ``method``, ``atoms``, ``components``, ``component_atoms``."""
        return self._run(_Call("GET", f"/heads/{layer}/{head}", {"params": params}))

    def head_alignment(self, **body: Any) -> dict[str, Any]:
        return self._run(_Call("POST", "/heads/alignment", {"json": body}))


class AsyncClient(_Base):
    """The same methods as :class:`Client`, awaitable."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0, max_retries: int = 4,
                 retry_budget_s: float = 60.0, http: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, max_retries, retry_budget_s)
        self._http = http or httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _run(self, call: _Call) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            r = await self._http.request(call.method, call.path, **self._args(call))
            wait = self._should_retry(r, attempt, started)
            if wait is None:
                return self._finish(call, r)
            await asyncio.sleep(wait)
            attempt += 1

    async def classify(self, images: Sequence[Any], classes: Sequence[str] | None = None,
                       templates: Sequence[str] | None = None, label_set_id: str | None = None,
                       coefficients: str | None = None, top_k: int | None = None, explain: int | None = None,
                       scores: str | None = None) -> ClassifyResult:
        return await self._run(_classify(images, classes, templates, label_set_id, coefficients, top_k, explain,
                                         scores))

    async def embeddings(self, inputs: str | Sequence[Any], model: str | None = None, modality: str = "text"
                         ) -> list[list[float]]:
        if self._model is None:
            self._model = (await self.models())[0]
        return await self._run(_embeddings(inputs, model, modality, self._model))

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._run(_Call("GET", "/v1/models")))["data"]]

    async def create_label_set(self, classes: Sequence[str], templates: Sequence[str] | None = None) -> str:
        body = {"classes": list(classes), **({"templates": list(templates)} if templates else {})}
        return (await self._run(_Call("POST", "/label-sets", {"json": body})))["label_set_id"]

    async def label_set(self, label_set_id: str) -> dict[str, Any]:
        return await self._run(_Call("GET", f"/label-sets/{label_set_id}"))

    async def fit(self, name: str, dataset: Any, classes: Sequence[str] | None = None,
                  templates: Sequence[str] | None = None, label_set_id: str | None = None, variant: str = "full",
                  hyperparameters: dict[str, Any] | None = None, basis: str = "reference", activate: bool = True,
                  world_sizes: dict[str, int] | None = None) -> AsyncJob:
        acc = await self._run(_fit(name, dataset, classes, templates, label_set_id, variant, hyperparameters,
                                   basis, activate, world_sizes))
        return AsyncJob(self, acc["job_id"], acc["status_url"])

    async def coefficient_sets(self) -> list[dict[str, Any]]:
        return (await self._run(_Call("GET", "/coefficients")))["coefficient_sets"]

    async def coefficient_versions(self, name: str) -> dict[str, Any]:
        return await self._run(_Call("GET", f"/coefficients/{name}"))

    async def activate(self, name: str, version: str) -> dict[str, Any]:
        return await self._run(_Call("POST", f"/coefficients/{name}/activate", {"json": {"version": version}}))

    async def rollback(self, name: str) -> dict[str, Any]:
        return await self.activate(name, _previous(await self.coefficient_versions(name)))

    async def job(self, job_id: str) -> dict[str, Any]:
        return await self._run(_Call("GET", f"/fit-alignment/{job_id}"))

    async def build_basis(self, name: str, dataset: str, max_images: int | None = None) -> AsyncJob:
        acc = await self._run(_build_basis(name, dataset, max_images))
        return AsyncJob(self, acc["job_id"], acc["status_url"])

    async def bases(self, all_weights: bool = False) -> dict[str, Any]:
        return await self._run(_bases(all_weights))

    async def basis(self, basis: str) -> dict[str, Any]:
        return await self._run(_Call("GET", f"/bases/{basis}"))

    async def heads(self, basis: str | None = None) -> dict[str, Any]:
        return await self._run(_heads(basis))

    async def head(self, layer: int, head: int, **params: Any) -> dict[str, Any]:
        return await self._run(_Call("GET", f"/heads/{layer}/{head}", {"params": params}))

    async def head_alignment(self, **body: Any) -> dict[str, Any]:
        return await self._run(_Call("POST", "/heads/alignment", {"json": body}))


def _previous(info: dict[str, Any]) -> str:
    versions = [v["version"] for v in info["versions"]]
    if info["active"] not in versions or versions.index(info["active"]) == 0:
        raise APIError(409, "conflict", f"coefficient set {info['name']!r} has no version before the active one")
    return versions[versions.index(info["active"]) - 1]


class _Progress:
    """A tqdm bar of a job's fraction when tqdm is installed and asked for; otherwise nothing."""

    def __init__(self, enabled: bool, job_id: str) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=100, desc=f"job {job_id[:8]}", unit="%")

    def update(self, info: dict[str, Any]) -> None:
        if self.bar is not None:
            p = info.get("progress", {})
            self.bar.set_postfix_str(str(p.get("phase", info.get("status"))))
            self.bar.n = round(100 * float(p.get("fraction") or 0.0))
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _outcome(info: dict[str, Any]) -> dict[str, Any]:
    if info["status"] != "succeeded":
        raise JobFailed(info)
    return info


@dataclass
class Job:
    client: Client
    id: str
    status_url: str

    def refresh(self) -> dict[str, Any]:
        return self.client._run(_Call("GET", self.status_url))

    def cancel(self) -> dict[str, Any]:
        """Cancel a queued job, or stop a running fit at its next batch."""
        return self.client._run(_Call("DELETE", self.status_url))

    def wait(self, timeout: float | None = None, poll_s: float = 1.0, progress: bool = False) -> dict[str, Any]:
        """Poll ``status_url`` until the job ends; its result, or :class:`JobFailed` (failed or cancelled)."""
        bar = _Progress(progress, self.id)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                info = self.refresh()
                bar.update(info)
                if info["status"] in _DONE:
                    return _outcome(info)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {info['status']} after {timeout} s")
                time.sleep(poll_s)
        finally:
            bar.close()


@dataclass
class AsyncJob:
    client: AsyncClient
    id: str
    status_url: str

    async def refresh(self) -> dict[str, Any]:
        return await self.client._run(_Call("GET", self.status_url))

    async def cancel(self) -> dict[str, Any]:
        return await self.client._run(_Call("DELETE", self.status_url))

    async def wait(self, timeout: float | None = None, poll_s: float = 1.0, progress: bool = False
                   ) -> dict[str, Any]:
        bar = _Progress(progress, self.id)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                info = await self.refresh()
                bar.update(info)
                if info["status"] in _DONE:
                    return _outcome(info)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {self.id} still {info['status']} after {timeout} s")
                await asyncio.sleep(poll_s)
        finally:
            bar.close()

