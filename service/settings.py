"""Service settings: environment variables with the prefix ``RESIDUAL_`` (pydantic-settings)."""

from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["MODEL_NAME", "PLACEHOLDER_MARKERS", "ModelSpec", "Settings", "get_settings", "settings_or_exit"]

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A served model's name: what requests put in ``model`` (no ':' or '@', so ``<model>:<set>@<version>`` parses)."""

MIN_KEY_CHARS = 16
PLACEHOLDER_MARKERS = ("change-me", "changeme", "change_me", "changethis", "placeholder", "example", "replace-me",
                       "your-key", "secret", "password")
"""Substrings (case-insensitive) that mark a key as a placeholder copied from docs or manifests."""


class ModelSpec(BaseModel):
    """One served model (an entry of ``RESIDUAL_MODELS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(..., pattern=MODEL_NAME, description="what requests name in `model`")
    architecture: str = Field(..., min_length=1, description="open_clip architecture or embedded model name")
    weights: str | None = Field(None, description="a checkpoint file or an open_clip pretrained tag; none: the "
                                                  "embedded model's shipped weights (random for other architectures)")
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Settings(BaseSettings):
    """Every knob of the service; each field documents itself in ``/docs`` and in the README."""

    model_config = SettingsConfigDict(env_prefix="RESIDUAL_", extra="ignore", hide_input_in_errors=True)

    model_name: str = Field("residual-tiny", description="open_clip architecture or embedded model name")
    model_weights: str | None = Field(
        None, description="local checkpoint (.safetensors or torch file); default: the embedded model's weights")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="parameter storage precision")
    models: list[ModelSpec] | None = Field(
        None, description='several models in one deployment, a JSON list of {"name", "architecture", "weights", '
                          '"precision", "device"}; the first is the default. Unset: one model from model_name, '
                          'model_weights, device and precision')
    model_memory_bytes: PositiveInt | None = Field(
        None, description="bytes of model parameters kept loaded per device: models load at start while they fit, "
                          "the others on first use, and an idle model is unloaded (least recently used) to make "
                          "room; the default model always stays. Unset: every model loads at start")
    worker_models: PositiveInt = Field(2, description="models a worker keeps loaded (least recently used goes)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", repr=False,
                           description="Redis for the text-embedding cache (may hold a password: never printed)")
    queue_redis_url: str | None = Field(
        None, repr=False, description="Redis of the job queue (durable, noeviction); default: redis_url")
    redis_timeout_s: PositiveFloat = Field(0.1, description="socket timeout of every cache call")
    redis_retry_s: PositiveFloat = Field(2.0, description="after a Redis failure, wait this long before retrying")
    artifact_dir: Path = Field(Path("artifacts"), description="coefficient sets, bases, label sets, feature caches")
    text_cache_ttl_s: PositiveInt = Field(7 * 24 * 3600, description="TTL of prompt embeddings in Redis")
    label_set_cache_size: PositiveInt = Field(256, description="class-embedding matrices kept in process (LRU)")

    max_images: PositiveInt = Field(64, description="images per /classify request")
    max_batch_size: PositiveInt | None = Field(
        None, description="images per backbone forward (cross-request batching); default 64 on CPU, 256 on CUDA")
    max_wait_ms: float = Field(5.0, ge=0, description="how long the batcher waits to fill a batch")
    batching: bool = Field(True, description="merge concurrent requests into one backbone batch")
    max_queue: PositiveInt = Field(512, description="images waiting for the backbone before 429")
    image_pipeline: Literal["auto", "pil", "tensor"] = Field(
        "auto", description="decode and preprocess: pil (open_clip's exact transform, per image, in parallel), "
                            "tensor (batched JPEG decode and tensor resize on the model's device: nvJPEG on CUDA), "
                            "auto = tensor on CUDA, pil on CPU")
    decode_threads: int = Field(0, ge=0, description="threads decoding and preprocessing images (0: the cores)")
    request_timeout_s: PositiveFloat = Field(30.0, description="per-request deadline before 504")
    max_request_bytes: PositiveInt = Field(16 * 1024 * 1024, description="request body limit (413)")
    max_image_pixels: PositiveInt = Field(40_000_000, description="decoded pixel ceiling per image (413)")
    max_classes: PositiveInt = Field(1000, description="classes per label set")
    max_templates: PositiveInt = Field(100, description="templates per label set")
    max_prompt_chars: PositiveInt = Field(300, description="characters per class name or template")
    default_top_k: PositiveInt = Field(5, description="labels returned per image when top_k is not given")

    max_inline_images: PositiveInt = Field(2000, description="images in an inline /fit-alignment dataset")
    max_dataset_images: PositiveInt = Field(50_000, description="images in an uploaded dataset")
    job_timeout_s: PositiveInt = Field(3600, description="a fit running longer fails with a timeout")
    job_result_ttl_s: PositiveInt = Field(7 * 24 * 3600, description="how long job results and failures are kept")

    heads_sample_images: PositiveInt = Field(
        1000, description="reference images behind TwoNN and head descriptions (computed once per basis)")
    heads_sync_max_images: PositiveInt = Field(
        2000, description="images a POST /heads/alignment answers directly; more become a job on the worker")
    text_dictionary: Path | None = Field(
        None, description="text dictionary for head descriptions, one per line (default: the shipped one)")

    reference_basis: str | None = Field(
        None, description="the default basis: a basis id or name, or 'world' (opt in to the synthetic world's "
                          "reference set, built on first use: right for the embedded model only); unset: the basis "
                          "shipped with the weights, else the newest one built for them, else none (409)")
    reference_basis_images: PositiveInt = Field(
        10_000, description="world images behind the world basis (RESIDUAL_REFERENCE_BASIS=world)")

    worker_metrics_port: int = Field(9190, ge=0, le=65535, description="worker Prometheus port (0: none; not 9100, "
                                                                       "node_exporter's)")
    worker_metrics_host: str = Field("127.0.0.1", description="address the worker's metrics port binds (0.0.0.0 "
                                                              "in Kubernetes, where Prometheus scrapes the pod)")

    io_threads: PositiveInt = Field(8, description="threads for blocking file, Redis and decoding work per API process")
    coefficient_cache_bytes: PositiveInt | None = Field(
        None, description="bytes of loaded coefficient sets kept per model (LRU; a set is 0.85 MB at residual-tiny, "
                          "~39 MB at ViT-B/16). Default: follows the device the sets live on, the model's: an eighth "
                          "of the host memory on CPU (at least 512 MiB), a third of the GPU's on CUDA (a thousand "
                          "ViT-B/16 sets on an H200), shared by the models on that device")
    coefficient_load_concurrency: PositiveInt = Field(2, description="coefficient sets loaded at once")
    shutdown_timeout_s: PositiveFloat = Field(
        20.0, description="after SIGTERM: how long in-flight requests may finish before they are failed")
    max_header_bytes: PositiveInt = Field(64 * 1024, description="request line and headers of one request (431)")
    header_timeout_s: PositiveFloat = Field(
        10.0, description="a connection must complete its request headers within this time (then 408 and close)")
    body_idle_timeout_s: PositiveFloat = Field(
        15.0, description="longest pause while a request body is being received (then the connection closes)")
    keep_alive_timeout_s: PositiveFloat = Field(5.0, description="an idle keep-alive connection closes after this")
    max_connections: PositiveInt = Field(1024, description="open connections and requests per process (503 beyond)")
    max_request_pixels: PositiveInt = Field(
        100_000_000, description="decoded pixels of all images of one request, read from their headers before any is "
                                 "decoded (413)")
    max_decoding_pixels: PositiveInt = Field(
        160_000_000, description="decoded pixels held at once by this process's image decoders (a request waits "
                                 "for room)")
    max_prompts: PositiveInt = Field(10_000, description="prompts of one label set, classes x templates (413)")
    image_url_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="images by URL (http(s):// strings where an image is expected): the hosts "
                                          "they may come from, comma-separated host names, host:port, addresses or "
                                          "CIDRs. Empty: URLs are refused. Loopback, private, link-local and other "
                                          "non-public addresses are refused unless an entry names the address or a "
                                          "range of that kind")
    image_url_connect_timeout_s: PositiveFloat = Field(3.0, description="connect timeout of an image download")
    image_url_timeout_s: PositiveFloat = Field(10.0, description="total time of one image download, redirects "
                                                                 "included (then 422)")
    image_url_max_concurrency: PositiveInt = Field(16, description="image downloads at once per API process")
    max_response_items: PositiveInt = Field(
        200_000, description="images x top_k x (explain + 1) of one /classify answer (413)")
    text_cache_bytes: PositiveInt = Field(
        256 * 1024 * 1024, description="bytes of class-embedding matrices kept in process (LRU)")
    cache_high_water: float = Field(
        0.8, gt=0, le=1, description="the text cache stops writing to a Redis that has a maxmemory once its used "
                                     "memory passes this fraction of it (so the cache never fills the queue's "
                                     "Redis)")
    max_archive_bytes: PositiveInt = Field(
        512 * 1024 * 1024, description="decompressed bytes of all members of an uploaded dataset archive (413)")
    max_archive_member_bytes: PositiveInt = Field(
        16 * 1024 * 1024, description="decompressed bytes of one archive member (413)")
    max_archive_members: PositiveInt = Field(60_000, description="members of an uploaded dataset archive (413)")
    drift: Literal["on", "off"] = Field(
        "on", description="per-unit drift statistics of live traffic (GET /drift); off removes every cost")
    drift_window: PositiveInt = Field(1024, description="counted images of the recent drift window, per replica")
    drift_sample: float = Field(0.25, gt=0, le=1, description="share of traffic images the drift statistics count "
                                                                "(every 1/sample-th image; 1: all)")
    drift_flush_s: PositiveFloat = Field(5.0, description="how often a replica writes its drift sums to Redis")

    api_key: SecretStr | None = Field(
        None, description=f"Bearer key for /classify and read routes (None: open; at least {MIN_KEY_CHARS} "
                          "characters, no placeholder)")
    admin_api_key: SecretStr | None = Field(
        None, description="Bearer key for routes that enqueue work or store data (None: open)")

    @field_validator("models")
    @classmethod
    def _unique_models(cls, v: list[ModelSpec] | None) -> list[ModelSpec] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("RESIDUAL_MODELS is an empty list; list at least one model or unset it")
        seen: set[str] = set()
        for spec in v:
            if spec.name in seen:
                raise ValueError(f"RESIDUAL_MODELS names {spec.name!r} twice; each model needs its own name")
            seen.add(spec.name)
        return v

    @field_validator("image_url_allowlist", mode="before")
    @classmethod
    def _allowlist(cls, v: object) -> object:
        """Comma-separated, or a JSON list (the entries are parsed when the API starts: a bad one stops it, named)."""
        if isinstance(v, str):
            text = v.strip()
            return json.loads(text) if text.startswith("[") else [e.strip() for e in text.split(",") if e.strip()]
        return v

    @field_validator("api_key", "admin_api_key")
    @classmethod
    def _real_key(cls, v: SecretStr | None) -> SecretStr | None:
        """Refuse to start with a placeholder key or a short one (never echoes the key)."""
        if v is None:
            return v
        key = v.get_secret_value()
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"API keys must have at least {MIN_KEY_CHARS} characters (this one has {len(key)}); "
                             "generate one with `openssl rand -hex 32`")
        if any(m in key.lower() for m in PLACEHOLDER_MARKERS):
            raise ValueError("the API key is a placeholder (it contains a word like 'change-me' or 'secret'); "
                             "generate one with `openssl rand -hex 32`")
        return v

    def model_specs(self) -> list[ModelSpec]:
        """The served models, the default first: ``models``, or the one model of the single-model settings."""
        if self.models is not None:
            return list(self.models)
        return [ModelSpec(name=self.model_name, architecture=self.model_name, weights=self.model_weights,
                          precision=self.precision, device=self.device)]

    def coefficient_budget(self, device: str, models_on_device: int = 1) -> int:
        """``coefficient_cache_bytes``, or the default of ``device`` ("cpu", "cuda", "cuda:1") shared by
        ``models_on_device``."""
        if self.coefficient_cache_bytes is not None:
            return self.coefficient_cache_bytes
        return max(512 * 2**20, _device_bytes(device) // (3 if device.startswith("cuda") else 8)) // max(
            1, models_on_device)

    def batch_size_for(self, device_type: str) -> int:
        """max_batch_size, or the default of the device (64 on CPU, 256 on CUDA)."""
        return self.max_batch_size or (256 if device_type == "cuda" else 64)

    @property
    def jobs_redis_url(self) -> str:
        return self.queue_redis_url or self.redis_url


def _device_bytes(device: str) -> int:
    """Memory of a device: the GPU's total, or the host's (the cgroup limit when lower: a pod's)."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            host = min(host, int(limit))
    except OSError:
        pass
    return int(host)


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_or_exit(prog: str) -> Settings:
    """The settings, or exit 2 with one line per invalid setting (the start of ``residual-serve`` and
    ``residual-worker``: a bad ``RESIDUAL_MODELS`` entry is named, never a traceback)."""
    try:
        return get_settings()
    except ValidationError as exc:
        for err in exc.errors():
            head, *rest = err["loc"] or ("?",)
            where = f"RESIDUAL_{str(head).upper()}" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)
            print(f"{prog}: invalid setting {where}: {err['msg']}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
