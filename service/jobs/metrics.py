"""Worker-side metrics, served by ``residual-worker`` on ``RESIDUAL_WORKER_METRICS_PORT``.

A module of their own, so that ``python -m service.worker`` (which runs the worker module as ``__main__`` and
then imports it again as the job's module) registers them once.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["FEATURE_CACHE", "FIT_SECONDS", "JOBS_DONE"]

FIT_SECONDS = Histogram("residual_fit_duration_seconds", "wall time of a fit job (extraction + fitting)",
                        ["variant"], buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600))
FEATURE_CACHE = Counter("residual_feature_cache_lookups_total", "feature-cache lookups of fit jobs", ["result"])
JOBS_DONE = Counter("residual_fit_jobs_total", "fit jobs finished by this worker", ["status"])
