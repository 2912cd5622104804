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
import inspect
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

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


R = TypeVar("R")
P = ParamSpec("P")


@dataclass
class _Call(Generic[R]):
    """One request and how to read its answer; ``job``: the answer is a job to wrap in Job / AsyncJob."""

    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    parse: Callable[[httpx.Response], R] = lambda r: r.json()
    job: bool = False


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


def _is_url(image: Any) -> bool:
    """An ``http(s)://`` string: sent as it is, for the service to fetch (where its operator allows URLs)."""
    return isinstance(image, str) and image[:8].lower().startswith(("http://", "https://"))


def _model(model: str | None) -> dict[str, str]:
    """The ``model`` field or parameter, when one is named (else the deployment's default model answers)."""
    return {"model": model} if model is not None else {}


def _label_set(classes: Sequence[str], templates: Sequence[str] | None) -> dict[str, Any]:
    return {"classes": list(classes), **({"templates": list(templates)} if templates else {})}


class _Requests:
    """Every operation of the API once, as a function of its arguments returning a :class:`_Call`. ``Client`` and
    ``AsyncClient`` are generated from these (same names, same signatures; a test checks it)."""

    # ---- classification and embeddings -------------------------------------------------------------------------
    @staticmethod
    def classify(images: Sequence[Any], classes: Sequence[str] | None = None,
                 templates: Sequence[str] | None = None, label_set_id: str | None = None,
                 coefficients: str | None = None, top_k: int | None = None, explain: int | None = None,
                 scores: str | None = None, model: str | None = None) -> _Call[ClassifyResult]:
        """Images (bytes, paths, PIL images, numpy arrays, or ``http(s)://`` URLs the service fetches where its
        operator allows them) against ``classes`` (and ``templates``), a registered ``label_set_id``, or a
        coefficient set's own label set; sent as multipart (as JSON when there are URLs, to keep their order).
        ``model``: a served model (default: the deployment's first)."""
        if any(_is_url(im) for im in images):
            import base64

            body: dict[str, Any] = {
                "images": [im if _is_url(im) else base64.b64encode(_image_bytes(im)[1]).decode() for im in images],
                **({"label_set": _label_set(classes, templates)} if classes is not None else {})}
            for key, value in (("label_set_id", label_set_id), ("coefficients", coefficients), ("top_k", top_k),
                               ("explain", explain), ("scores", scores), ("model", model)):
                if value is not None:
                    body[key] = value
            return _Call("POST", "/classify", {"json": body}, lambda r: ClassifyResult.parse(r.json()))
        data: dict[str, str] = {}
        if classes is not None:
            data["label_set"] = json.dumps(_label_set(classes, templates))
        for key, value in (("label_set_id", label_set_id), ("coefficients", coefficients), ("top_k", top_k),
                           ("explain", explain), ("scores", scores), ("model", model)):
            if value is not None:
                data[key] = str(value)
        files = [("images", (*_image_bytes(im), "application/octet-stream")) for im in images]
        return _Call("POST", "/classify", {"files": files, "data": data}, lambda r: ClassifyResult.parse(r.json()))

    @staticmethod
    def embeddings(inputs: str | Sequence[Any], model: str | None = None, modality: str = "text"
                   ) -> _Call[list[list[float]]]:
        """Texts (``modality="text"``) or images (as for :meth:`classify`, URLs included); ``model`` '<model>' or
        '<model>:<coefficient set>' (default: the served model)."""
        items = [inputs] if isinstance(inputs, str | bytes) else list(inputs)
        if modality == "image":
            import base64

            items = [x if _is_url(x) else base64.b64encode(_image_bytes(x)[1]).decode() for x in items]
        body: dict[str, Any] = {"input": items, "modality": modality, **({"model": model} if model else {})}
        return _Call("POST", "/v1/embeddings", {"json": body},
                     lambda r: [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])])

    @staticmethod
    def models() -> _Call[list[str]]:
        return _Call("GET", "/v1/models", parse=lambda r: [m["id"] for m in r.json()["data"]])

    # ---- label sets ----------------------------------------------------------------------------------------------
    @staticmethod
    def create_label_set(classes: Sequence[str], templates: Sequence[str] | None = None,
                         model: str | None = None) -> _Call[str]:
        """Register a label set of ``model`` (its id hashes that model's weights)."""
        return _Call("POST", "/label-sets", {"json": {**_label_set(classes, templates), **_model(model)}},
                     lambda r: str(r.json()["label_set_id"]))

    @staticmethod
    def label_set(label_set_id: str, model: str | None = None) -> _Call[dict[str, Any]]:
        return _Call("GET", f"/label-sets/{label_set_id}", {"params": _model(model)})

    # ---- fits, datasets and coefficient sets ---------------------------------------------------------------------
    @staticmethod
    def fit(name: str, dataset: Any, classes: Sequence[str] | None = None, templates: Sequence[str] | None = None,
            label_set_id: str | None = None, variant: str = "full", hyperparameters: dict[str, Any] | None = None,
            basis: str = "reference", activate: bool = True, world_sizes: dict[str, int] | None = None,
            model: str | None = None) -> _Call[dict[str, Any]]:
        """Start a fit; ``dataset`` is a dataset id, ``"world:<task>"`` or ``{"images", "labels"}``; without
        classes, a dataset's class folders (or a world task's own label set) are used. Returns a job."""
        body: dict[str, Any] = {"name": name, "dataset": dataset, "variant": variant, "basis": basis,
                                "activate": activate, **_model(model)}
        if classes is not None:
            body["label_set"] = _label_set(classes, templates)
        if label_set_id is not None:
            body["label_set_id"] = label_set_id
        if hyperparameters:
            body["hyperparameters"] = hyperparameters
        if world_sizes:
            body["world_sizes"] = world_sizes
        return _Call("POST", "/fit-alignment", {"json": body}, job=True)

    @staticmethod
    def job(job_id: str) -> _Call[dict[str, Any]]:
        return _Call("GET", f"/fit-alignment/{job_id}")

    @staticmethod
    def upload_dataset(archive: bytes | str | os.PathLike[str]) -> _Call[dict[str, Any]]:
        """A tar or zip archive in ImageFolder layout (bytes or a path), sent as a multipart file."""
        data = archive if isinstance(archive, bytes) else Path(archive).read_bytes()
        kind = "application/zip" if data[:2] == b"PK" else "application/x-tar"
        return _Call("POST", "/datasets", {"files": {"file": ("dataset", data, kind)}})

    @staticmethod
    def coefficient_sets(model: str | None = None) -> _Call[list[dict[str, Any]]]:
        return _Call("GET", "/coefficients", {"params": _model(model)},
                     parse=lambda r: list(r.json()["coefficient_sets"]))

    @staticmethod
    def coefficient_versions(name: str, model: str | None = None) -> _Call[dict[str, Any]]:
        return _Call("GET", f"/coefficients/{name}", {"params": _model(model)})

    @staticmethod
    def activate(name: str, version: str, model: str | None = None) -> _Call[dict[str, Any]]:
        return _Call("POST", f"/coefficients/{name}/activate", {"json": {"version": version},
                                                                "params": _model(model)})

    # ---- bases and heads -----------------------------------------------------------------------------------------
    @staticmethod
    def build_basis(name: str, dataset: str, max_images: int | None = None, model: str | None = None
                    ) -> _Call[dict[str, Any]]:
        """Build a basis on the worker from a dataset id, ``"world:<task>"`` or ``"world:mixture"``; returns a job
        whose ``wait()`` gives the new ``basis``."""
        body: dict[str, Any] = {"name": name, "dataset": dataset, **_model(model)}
        if max_images is not None:
            body["max_images"] = max_images
        return _Call("POST", "/bases", {"json": body}, job=True)

    @staticmethod
    def bases(all_weights: bool = False, model: str | None = None) -> _Call[dict[str, Any]]:
        """``{"model", "weights_id", "default", "bases"}``: a model's bases, newest first, and its default."""
        return _Call("GET", "/bases", {"params": {**({"all_weights": "true"} if all_weights else {}),
                                                  **_model(model)}})

    @staticmethod
    def basis(basis: str, model: str | None = None) -> _Call[dict[str, Any]]:
        """One basis by id or name, with per-unit k_90 / k_99 / evr_1."""
        return _Call("GET", f"/bases/{basis}", {"params": _model(model)})

    @staticmethod
    def heads(basis: str | None = None, model: str | None = None) -> _Call[dict[str, Any]]:
        return _Call("GET", "/heads", {"params": {**({"basis": basis} if basis else {}), **_model(model)}})

    @staticmethod
    def head(layer: int, head: int, basis: str | None = None, method: str | None = None, atoms: int | None = None,
             components: int | None = None, component_atoms: int | None = None, model: str | None = None
             ) -> _Call[dict[str, Any]]:
        params = {k: v for k, v in (("basis", basis), ("method", method), ("atoms", atoms),
                                    ("components", components), ("component_atoms", component_atoms),
                                    ("model", model))
                  if v is not None}
        return _Call("GET", f"/heads/{layer}/{head}", {"params": params})

    @staticmethod
    def head_alignment(dataset: Any, classes: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                       label_set_id: str | None = None, model: str | None = None, **options: Any
                       ) -> _Call[dict[str, Any]]:
        """``options``: world_sizes, fractions, seeds, ablation, top, basis (see POST /heads/alignment)."""
        body: dict[str, Any] = {"dataset": dataset, **_model(model), **options}
        if classes is not None:
            body["label_set"] = _label_set(classes, templates)
        if label_set_id is not None:
            body["label_set_id"] = label_set_id
        return _Call("POST", "/heads/alignment", {"json": body})


_JOBS = ("fit", "build_basis")  # their answer is wrapped in Job / AsyncJob


def _signature(builder: Callable[..., Any], job: str) -> inspect.Signature:
    """The builder's parameters after ``self``, returning what the client returns (the parsed answer, or a job)."""
    sig = inspect.signature(builder)
    returned = str(sig.return_annotation)
    returned = returned[len("_Call[") : -1] if returned.startswith("_Call[") else returned
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sig.replace(parameters=[self_param, *sig.parameters.values()],
                       return_annotation=job if builder.__name__ in _JOBS else returned)


def _sync(builder: Callable[P, _Call[R]]) -> Callable[Concatenate[Client, P], Any]:
    def method(self: Client, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self._run(builder(*args, **kwargs))

    method.__name__ = method.__qualname__ = builder.__name__
    method.__doc__ = builder.__doc__
    method.__signature__ = _signature(builder, "Job")  # type: ignore[attr-defined]
    return method


def _async(builder: Callable[P, _Call[R]]) -> Callable[Concatenate[AsyncClient, P], Any]:
    async def method(self: AsyncClient, *args: P.args, **kwargs: P.kwargs) -> Any:
        return await self._run(builder(*args, **kwargs))

    method.__name__ = method.__qualname__ = builder.__name__
    method.__doc__ = builder.__doc__
    method.__signature__ = _signature(builder, "AsyncJob")  # type: ignore[attr-defined]
    return method


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

    def _should_retry(self, r: httpx.Response, attempt: int, started: float) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if r.status_code not in _RETRY_STATUSES or attempt >= self.max_retries:
            return None
        wait = _retry_after(r, attempt)
        return wait if time.monotonic() - started + wait <= self.retry_budget_s else None

    def _args(self, call: _Call[Any]) -> dict[str, Any]:
        """The request's keyword arguments with the auth header merged into its own headers."""
        kw = dict(call.kwargs)
        kw["headers"] = {**self.headers, **kw.get("headers", {})}
        return kw

    @staticmethod
    def _finish(call: _Call[R], r: httpx.Response) -> R:
        if r.status_code >= 400:
            raise APIError.from_response(r)
        return call.parse(r)


_OPERATIONS = [name for name in vars(_Requests) if not name.startswith("_")]


class Client(_Base):
    """Blocking client. ``images`` anywhere: bytes, file paths, PIL images or numpy arrays (sent as multipart).
    Its methods are the operations of :class:`_Requests`, plus ``rollback``."""

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

    def _run(self, call: _Call[R]) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            r = self._http.request(call.method, call.path, **self._args(call))
            wait = self._should_retry(r, attempt, started)
            if wait is None:
                out = self._finish(call, r)
                return Job(self, out["job_id"], out["status_url"]) if call.job else out
            time.sleep(wait)
            attempt += 1

    def rollback(self, name: str, model: str | None = None) -> dict[str, Any]:
        """Activate the version listed before the active one."""
        versions = self.coefficient_versions(name, model=model)  # type: ignore[attr-defined]
        return self.activate(name, _previous(versions), model=model)  # type: ignore[attr-defined,no-any-return]


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

    async def _run(self, call: _Call[R]) -> Any:
        started = time.monotonic()
        attempt = 0
        while True:
            r = await self._http.request(call.method, call.path, **self._args(call))
            wait = self._should_retry(r, attempt, started)
            if wait is None:
                out = self._finish(call, r)
                return AsyncJob(self, out["job_id"], out["status_url"]) if call.job else out
            await asyncio.sleep(wait)
            attempt += 1

    async def rollback(self, name: str, model: str | None = None) -> dict[str, Any]:
        """Activate the version listed before the active one."""
        versions = await self.coefficient_versions(name, model=model)  # type: ignore[attr-defined]
        return await self.activate(name, _previous(versions), model=model)  # type: ignore[attr-defined,no-any-return]


for _name in _OPERATIONS:
    _builder = getattr(_Requests, _name)
    setattr(Client, _name, _sync(_builder))
    setattr(AsyncClient, _name, _async(_builder))


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
        return self.client._run(_Call("GET", self.status_url))  # type: ignore[no-any-return]

    def cancel(self) -> dict[str, Any]:
        """Cancel a queued job, or stop a running one at its next batch or chunk (it reads ``cancelling`` until
        then)."""
        return self.client._run(_Call("DELETE", self.status_url))  # type: ignore[no-any-return]

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
        return await self.client._run(_Call("GET", self.status_url))  # type: ignore[no-any-return]

    async def cancel(self) -> dict[str, Any]:
        """See :meth:`Job.cancel`."""
        return await self.client._run(_Call("DELETE", self.status_url))  # type: ignore[no-any-return]

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

