"""The training worker: ``residual-worker`` runs RQ (JSON serializer only) and executes the three kinds of job of
``service.jobs.specs`` (``service.jobs.fit``, ``service.jobs.basis``, ``service.jobs.alignment``).

It loads the configured backbone before taking jobs, serves its Prometheus metrics on
``RESIDUAL_WORKER_METRICS_HOST:PORT``, and survives its Redis: when the queue's Redis goes away or refuses writes
(a full Redis answers OOM), RQ's loop stops with an error; the worker logs it, counts it
(``residual_worker_redis_errors_total``), backs off (1 s doubling to 30 s) and takes jobs again, never exiting.
A job that finished while Redis refused its result reads ``succeeded`` all the same: its result is recorded in
the artifact store first (``service.jobs.context``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any

import redis
from prometheus_client import start_http_server
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from service import logs, tracing
from service.jobs.context import preload
from service.jobs.metrics import WORKER_REDIS_ERRORS
from service.jobs.queue import QUEUE_NAME, queue_policy_warning
from service.settings import settings_or_exit

__all__ = ["HeartbeatWorker", "main"]

logger = logging.getLogger(__name__)

_BACKOFF_S = (1.0, 30.0)


class HeartbeatWorker(SimpleWorker):
    """RQ's SimpleWorker (jobs run in this process, the backbone stays loaded) with live heartbeats.

    A forked work horse would inherit torch's thread pools and hang. SimpleWorker alone sends one heartbeat per
    job, valid for the whole job timeout, so a worker killed mid-fit would leave its job "running" for up to an
    hour. Here a thread renews the heartbeat every ``job_monitoring_interval`` seconds with a short TTL, so a
    killed worker's job expires within ``HEARTBEAT_GRACE_S`` and RQ's registry cleanup marks it failed.
    """

    HEARTBEAT_GRACE_S = 30

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        return int(self.job_monitoring_interval + self.HEARTBEAT_GRACE_S)

    def execute_job(self, job: Any, queue: Any) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.job_monitoring_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception:  # noqa: BLE001 - a missed beat must not kill the fit
                    logger.warning("heartbeat failed for job %s", job.id, exc_info=True)

        thread = threading.Thread(target=beat, name="rq-heartbeat", daemon=True)
        thread.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            thread.join()
        self.set_state(WorkerStatus.IDLE)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "refused"
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError):
        return "unavailable"
    return "error"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="residual-worker", description="Run an alignment worker (RQ, JSON jobs). "
                                "Settings come from RESIDUAL_* environment variables, as for the API.")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logs.configure(args.log_level)
    s = settings_or_exit("residual-worker")
    try:
        tracing.configure("residual-worker")  # OTEL_* (off by default): jobs continue their request's trace
    except ValueError as exc:
        print(f"residual-worker: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    conn = redis.Redis.from_url(s.jobs_redis_url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=10)
    _, warning = queue_policy_warning(conn)
    if warning:
        logger.warning("%s", warning)
    if s.worker_metrics_port:
        try:
            start_http_server(s.worker_metrics_port, addr=s.worker_metrics_host)
        except OSError as exc:  # a busy port must not keep the worker from taking jobs
            logger.warning("worker metrics not served on %s:%d: %s", s.worker_metrics_host, s.worker_metrics_port,
                           exc)
    preload(s)  # load the backbone before taking jobs
    delay = _BACKOFF_S[0]
    while True:
        started = time.monotonic()
        try:
            worker = HeartbeatWorker([Queue(QUEUE_NAME, connection=conn, serializer=JSONSerializer)],
                                     connection=conn, serializer=JSONSerializer, job_monitoring_interval=5)
            worker.work(burst=args.burst, with_scheduler=False, logging_level=args.log_level.upper())
            tracing.shutdown()
            return 0
        except (redis.RedisError, OSError) as exc:
            reason = _reason(exc)
            WORKER_REDIS_ERRORS.labels(reason=reason).inc()
            if time.monotonic() - started > 60:  # it had been working: start the backoff again
                delay = _BACKOFF_S[0]
            logger.error("the queue's Redis is %s (%s: %s); taking jobs again in %.0f s", reason,
                         type(exc).__name__, exc, delay)
            time.sleep(delay)
            delay = min(_BACKOFF_S[1], delay * 2)


if __name__ == "__main__":
    raise SystemExit(main())
