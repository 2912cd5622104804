"""Worker-side metrics, served by ``residual-worker`` on ``RESIDUAL_WORKER_METRICS_PORT``.

A module of their own, so that ``python -m service.jobs.worker`` (which runs the worker module as ``__main__`` and
then imports the job modules) registers them once.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, disable_created_metrics

__all__ = ["FEATURE_CACHE", "FIT_SECONDS", "JOBS", "JOB_SECONDS", "WORKER_REDIS_ERRORS"]

disable_created_metrics()  # no *_created series

JOBS = Counter("residual_jobs_total", "jobs finished by this worker, by kind (fit-alignment, basis, head-alignment) "
               "and outcome (succeeded, failed, cancelled)", ["kind", "outcome"])
JOB_SECONDS = Histogram("residual_job_duration_seconds", "wall time of a succeeded job", ["kind"],
                        buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600))
FIT_SECONDS = Histogram("residual_fit_duration_seconds", "wall time of a fit job (extraction + fitting)",
                        ["variant"], buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600))
FEATURE_CACHE = Counter("residual_feature_cache_lookups_total", "feature-cache lookups of fit jobs", ["result"])
WORKER_REDIS_ERRORS = Counter("residual_worker_redis_errors_total", "times the worker loop lost or was refused by "
                              "the queue's Redis and backed off", ["reason"])
