"""Prometheus metrics of one API process (one uvicorn worker per pod; scale with replicas, not workers).

Each app owns its registry, so several apps in one process (tests) never collide. What one model's engine does
(batches, forwards, text encodings, coefficient sets, images classified) carries a ``model`` label, bounded by the
configured models: the engine of a model gets a :class:`ModelMetrics`, the same metrics with that label bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["JobsCollector", "Metrics", "ModelMetrics"]

disable_created_metrics()  # no *_created series: they double the series count and no query here uses them

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram("residual_http_request_duration_seconds", "HTTP request duration",
                                         ["route", "status"], buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("residual_backbone_batch_size", "images per backbone forward",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.queue_depth = Gauge("residual_backbone_queue_depth", "images waiting for the backbone", ["model"],
                                 registry=r)
        self.forward_seconds = Histogram("residual_backbone_forward_seconds", "backbone forward duration",
                                         ["model"], buckets=_LATENCY, registry=r)
        self.text_cache_lookups = Counter("residual_text_cache_lookups_total",
                                          "label-set class-embedding lookups by tier", ["model", "tier"],
                                          registry=r)
        self.text_encoder_prompts = Counter("residual_text_encoder_prompts_total",
                                            "prompts run through the text encoder", ["model"], registry=r)
        self.images_classified = Counter("residual_images_classified_total", "images classified", ["model"],
                                         registry=r)
        self.coefficient_sets_loaded = Counter("residual_coefficient_sets_loaded_total",
                                               "coefficient sets loaded into memory", ["model"], registry=r)
        self.redis_up = Gauge("residual_redis_up", "1 when the last Redis call succeeded", registry=r)
        self.redis_errors = Counter("residual_redis_errors_total", "failed Redis calls", registry=r)
        self.backbone_errors = Counter("residual_backbone_errors_total", "failed backbone batches", ["model"],
                                       registry=r)
        self.coefficient_cache_bytes = Gauge("residual_coefficient_cache_bytes",
                                             "bytes of coefficient sets held in memory", ["model"], registry=r)
        self.coefficient_cache_sets = Gauge("residual_coefficient_cache_sets", "coefficient sets held in memory",
                                            ["model"], registry=r)
        self.coefficient_cache_evictions = Counter("residual_coefficient_cache_evictions_total",
                                                   "coefficient sets evicted from memory (LRU)", ["model"],
                                                   registry=r)
        self.coefficient_cache_lookups = Counter(
            "residual_coefficient_cache_lookups_total",
            "coefficient-set lookups: hit, miss (this request loads it) or shared (waits on another's load)",
            ["model", "result"], registry=r)
        self.batcher_restarts = Counter("residual_batcher_restarts_total",
                                        "times the batcher loop died and was restarted", ["model"],
                                        registry=r)
        self.text_encodes_shared = Counter("residual_text_encodes_shared_total",
                                           "label-set encodings that waited on an identical one in flight",
                                           ["model"], registry=r)
        self.reference_basis_images = Counter("residual_reference_basis_images_total",
                                              "images run through the model to build reference bases",
                                              ["model"], registry=r)
        self.embeddings = Counter("residual_embeddings_total", "inputs embedded by /v1/embeddings",
                                  ["model", "modality"],
                                  registry=r)
        self.rejected = Counter("residual_requests_rejected_total", "requests refused before the backbone",
                                ["reason"], registry=r)
        self.text_cache_bytes = Gauge("residual_text_cache_bytes", "bytes of class-embedding matrices held in "
                                      "memory", ["model"], registry=r)
        self.text_cache_writes_paused = Gauge("residual_text_cache_writes_paused", "1 while the cache Redis is over "
                                              "its high-water mark (the cache stops writing)", registry=r)
        self.decoding_pixels = Gauge("residual_decoding_pixels", "decoded pixels held by the image decoders now",
                                     registry=r)
        self.model_resident = Gauge("residual_model_resident", "1 while the model is loaded in this process",
                                    ["model", "device"], registry=r)
        self.model_bytes = Gauge("residual_model_bytes", "bytes of the model's parameters and buffers (0 while "
                                 "not loaded)", ["model"], registry=r)
        self.model_loads = Counter("residual_model_loads_total", "model loads (at start and on first use after an "
                                   "unload)", ["model"], registry=r)
        self.unit_drift = Gauge("residual_unit_drift", "drift score of each unit of a model against its default "
                                "basis, over this replica's recent window", ["model", "unit"], registry=r)
        self.drift_score = Gauge("residual_drift_score", "a model's drift score (mean of the top tenth of its units), "
                                 "this replica's recent window", ["model"], registry=r)
        self.drift_skipped = Counter("residual_drift_skipped_images_total", "traffic images left out of the drift "
                                     "statistics because their thread was behind", ["model"], registry=r)
        self.drift_cpu = Counter("residual_drift_cpu_seconds_total", "CPU time of the drift statistics thread "
                                 "(it runs at the lowest priority)", ["model"], registry=r)
        self.model_unloads = Counter("residual_model_unloads_total", "idle models unloaded to make room",
                                     ["model"], registry=r)

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self, model)


class _Bound:
    """A labelled metric with ``model`` fixed: ``.labels(tier=...)`` adds the rest."""

    def __init__(self, metric: Any, model: str) -> None:
        self.metric, self.model = metric, model

    def labels(self, **labels: str) -> Any:
        return self.metric.labels(model=self.model, **labels)


class _Lazy:
    """A metric's child for one model, created on first use (so a feature that is off exports no series)."""

    def __init__(self, metric: Any, model: str) -> None:
        self.metric, self.model = metric, model

    def set(self, value: float) -> None:
        self.metric.labels(model=self.model).set(value)

    def inc(self, amount: float = 1) -> None:
        self.metric.labels(model=self.model).inc(amount)


class ModelMetrics:
    """The metrics one model's engine writes, with its ``model`` label bound (the rest are the process's)."""

    def __init__(self, m: Metrics, model: str) -> None:
        self.model = model
        self.batch_size = m.batch_size.labels(model=model)
        self.queue_depth = m.queue_depth.labels(model=model)
        self.forward_seconds = m.forward_seconds.labels(model=model)
        self.text_cache_lookups = _Bound(m.text_cache_lookups, model)
        self.text_encoder_prompts = m.text_encoder_prompts.labels(model=model)
        self.images_classified = m.images_classified.labels(model=model)
        self.coefficient_sets_loaded = m.coefficient_sets_loaded.labels(model=model)
        self.backbone_errors = m.backbone_errors.labels(model=model)
        self.coefficient_cache_bytes = m.coefficient_cache_bytes.labels(model=model)
        self.coefficient_cache_sets = m.coefficient_cache_sets.labels(model=model)
        self.coefficient_cache_evictions = m.coefficient_cache_evictions.labels(model=model)
        self.coefficient_cache_lookups = _Bound(m.coefficient_cache_lookups, model)
        self.batcher_restarts = m.batcher_restarts.labels(model=model)
        self.text_encodes_shared = m.text_encodes_shared.labels(model=model)
        self.reference_basis_images = m.reference_basis_images.labels(model=model)
        self.embeddings = _Bound(m.embeddings, model)
        self.text_cache_bytes = m.text_cache_bytes.labels(model=model)
        self.unit_drift = _Bound(m.unit_drift, model)
        self.drift_score = _Lazy(m.drift_score, model)
        self.drift_skipped = _Lazy(m.drift_skipped, model)
        self.drift_cpu = _Lazy(m.drift_cpu, model)
        self.rejected = m.rejected  # reasons, per process
        self.decoding_pixels = m.decoding_pixels  # the decoders are shared by every model


class JobsCollector(Collector):
    """At scrape time: jobs by status, the queue length and the workers, read from the RQ registries (shared by
    replicas).

    ``read`` returns {status: count} including "queued", and "workers"; it returns None when Redis is unreachable.
    """

    def __init__(self, read: Callable[[], dict[str, int] | None]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.read()
        if counts is None:
            return
        counts = dict(counts)
        workers = counts.pop("workers", 0)
        jobs = GaugeMetricFamily("residual_queue_jobs", "jobs (fits, bases, head alignments) in the queue's "
                                 "registries by status", labels=["status"])
        for status, n in sorted(counts.items()):
            jobs.add_metric([status], n)
        yield jobs
        yield GaugeMetricFamily("residual_queue_workers", "workers registered on the job queue (heartbeating)",
                                value=workers)
        yield GaugeMetricFamily("residual_queue_length", "jobs waiting for a worker",
                                value=counts.get("queued", 0))
