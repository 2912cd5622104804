"""The serving engine of one model, assembled: everything a route needs once that model has loaded.

:func:`load` runs on the model's owner (it loads and warms up the model; the owner is the one thread that runs every
forward of that model); :func:`start` then builds what needs the event loop (the batcher) and returns the
:class:`Engine`, whose fields are never None, so routes use them without checks. Each served model has its own
engine (``service.engine.registry``): its own owner thread, batcher, image pipeline (the model's input size) and
text-cache keys (its weights id), so a slow or failing model never holds up another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from residual import Basis
from service.engine.batcher import Batcher
from service.engine.drift import DriftMonitor
from service.engine.heads import HeadConfig, HeadService
from service.engine.model import ServingModel
from service.engine.pipeline import ImagePipeline, decode_threads
from service.engine.pools import ModelOwner, Pool
from service.engine.text_cache import RedisState, TextCache
from service.errors import ServiceError
from service.images import PixelBudget
from service.metrics import ModelMetrics
from service.settings import ModelSpec, Settings
from service.stores.artifacts import ArtifactStore
from service.stores.bases import BasisStore
from service.stores.coefficients import CoefficientCache, CoefficientStore
from service.stores.label_sets import LabelSetStore
from service.stores.ownership import WeightsOwner

__all__ = ["Engine", "Loaded", "load", "start"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """What the model owner builds (blocking): the model and the stores that are keyed by its weights."""

    model: ServingModel
    text: TextCache
    bases: BasisStore
    coefficients: CoefficientStore
    label_sets: LabelSetStore


@dataclass(frozen=True)
class Engine:
    """The serving path of one model: model, text cache, image pipeline, batcher, head analyses and its stores."""

    model: ServingModel
    owner: ModelOwner  # the one thread that runs every forward of this model
    metrics: ModelMetrics
    drift: DriftMonitor | None  # None: RESIDUAL_DRIFT=off
    text: TextCache
    images: ImagePipeline
    batcher: Batcher
    heads: HeadService
    bases: BasisStore
    coefficients: CoefficientStore
    label_sets: LabelSetStore


def load(spec: ModelSpec, settings: Settings, metrics: ModelMetrics, owner: ModelOwner, redis_state: RedisState,
         artifacts: ArtifactStore, weights_owner: WeightsOwner, known_weights: Callable[[], tuple[str, ...]]
         ) -> Loaded:
    """Blocking, on the model's owner: load the model, warm it up (one image and one text forward)."""
    model = ServingModel(spec)
    bb = model.backbone

    def encode(prompts: list[str]) -> torch.Tensor:  # every text forward runs on the model owner, chunk by chunk
        return owner.call(model.encode_prompts, prompts)

    text = TextCache(bb.weights_id, encode, redis_state, settings.text_cache_ttl_s, settings.label_set_cache_size,
                     metrics, settings.text_cache_bytes)
    model.warm_up()
    # the default basis setting names a basis of the default model; the others use their own newest basis
    bases = BasisStore(artifacts, bb, settings.reference_basis if spec == settings.model_specs()[0] else None,
                       model.name, weights_owner)
    # the fused sets live on the model's device: their budget follows it (shared by the models on it)
    device = bb.device.type if bb.device.index is None else f"{bb.device.type}:{bb.device.index}"
    on_device = sum(1 for m in settings.model_specs() if m.device in ("auto", bb.device.type))
    cache = CoefficientCache(settings.coefficient_budget(device, on_device), settings.coefficient_load_concurrency,
                             metrics)
    return Loaded(model=model, text=text, bases=bases,
                  coefficients=CoefficientStore(artifacts, bb, model.ln, bases, cache, metrics, model.name,
                                                weights_owner),
                  label_sets=LabelSetStore(artifacts, bb.weights_id, model.name, weights_owner, known_weights))


def start(loaded: Loaded, settings: Settings, metrics: ModelMetrics, owner: ModelOwner, decode: Pool,
          analysis: Pool, artifacts: ArtifactStore, budget: PixelBudget) -> Engine:
    """On the event loop: the image pipeline, the batcher (started) and the head analyses around a loaded model.

    ``budget`` (decoded pixels held at once) is the process's, shared by every model's image pipeline."""
    model, text = loaded.model, loaded.text
    bb = model.backbone
    device = bb.device.type
    images = ImagePipeline(bb, decode, decode_threads(settings.decode_threads), settings.max_image_pixels,
                           settings.image_pipeline, settings.max_request_pixels, budget)
    drift = _drift_monitor(loaded, settings, metrics) if settings.drift == "on" else None
    batcher = Batcher(model.forward, owner, settings.batch_size_for(device), settings.max_wait_ms / 1000,
                      settings.max_queue, settings.batching, metrics,
                      observe=drift.observe if drift is not None else None)
    batcher.start()

    def dictionary_embeddings(texts: list[str]) -> torch.Tensor:  # cached in Redis like any label set
        return text.class_embeddings(loaded.label_sets.id_of(texts, ["{}"]), texts, ["{}"])

    config = HeadConfig(chunk=min(settings.batch_size_for(device), settings.max_queue),  # a chunk must fit the queue
                        sample_images=settings.heads_sample_images, reference_images=settings.reference_basis_images,
                        dictionary=settings.text_dictionary)
    heads = HeadService(model, partial(batcher.submit, traffic=False), owner, analysis, config, artifacts,
                        loaded.bases, dictionary_embeddings, metrics.reference_basis_images.inc)
    return Engine(model=model, owner=owner, metrics=metrics, drift=drift, text=text, images=images, batcher=batcher,
                  heads=heads, bases=loaded.bases, coefficients=loaded.coefficients, label_sets=loaded.label_sets)


def _drift_monitor(loaded: Loaded, settings: Settings, metrics: ModelMetrics) -> DriftMonitor:
    """The drift statistics of this model's traffic, against its default basis (once there is one)."""
    bases = loaded.bases

    def default() -> tuple[dict[str, Any], Basis] | None:
        try:
            info = bases.default()
            return (info.ref(), bases.load(info)) if info is not None else None
        except ServiceError:  # RESIDUAL_REFERENCE_BASIS names a basis that does not exist yet
            return None

    def scores(units: list[str], values: torch.Tensor, score: float) -> None:
        for name, value in zip(units, values.tolist(), strict=True):
            metrics.unit_drift.labels(unit=name).set(value)
        metrics.drift_score.set(score)

    return DriftMonitor(loaded.model.name, loaded.model.weights_id, loaded.model.ln, default, loaded.text.redis,
                        settings.drift_window, settings.drift_flush_s, settings.drift_sample, scores,
                        metrics.drift_skipped.inc, metrics.drift_cpu.inc)
