"""schemathesis against the OpenAPI schema of a real API process: no operation ever answers 5xx.

The API runs as its own uvicorn process (the real middleware stack, the real model) with a private Redis, so
fuzzed job submissions never reach a shared queue. Examples per operation are bounded (CI time); every operation
of the schema is exercised (12 generated examples each).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.processes import api_process
from tests.redis_server import start_private


@schemathesis.serializer("application/x-tar", "application/zip")
def _archive_bytes(ctx, value):  # type: ignore[no-untyped-def]
    """Archives are raw bytes on the wire (schemathesis only knows octet-stream and images by default)."""
    return {"data": value if isinstance(value, bytes) else str(value).encode()}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    redis = start_private()
    try:
        # large head analyses become jobs (queued on the private Redis, no worker runs them)
        with api_process(redis.url, tmp_path_factory.mktemp("fuzz-artifacts"), heads_sync_max_images="64",
                         max_inline_images="64") as client:
            yield schemathesis.openapi.from_url(f"{client.base_url}/openapi.json")
    finally:
        redis.stop()


def test_no_operation_answers_a_server_error(api_schema) -> None:  # type: ignore[no-untyped-def]
    failures: list[str] = []
    operations = 0
    for result in api_schema.get_all_operations():
        op = result.ok()
        operations += 1

        @given(case=op.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case) -> None:  # type: ignore[no-untyped-def]
            case.call_and_validate(checks=[not_a_server_error], timeout=60)

        try:
            fuzz()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, report them together
            failures.append(f"{op.label}: {str(exc).strip().splitlines()[0]}")
    assert operations >= 20
    assert not failures, "\n".join(failures)
