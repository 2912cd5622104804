"""The API as its own process on an asyncio loop in debug mode with ``slow_callback_duration = 0.05``: every step
that holds the event loop longer is written to stderr as one JSON line ``{"slow": seconds, "what": ...}``.

    python -m tests.debug_server PORT        (settings from RESIDUAL_* environment variables)
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from service.api.app import create_app
from service.api.server import Server, server_config


class _Report(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("Executing") and "took" in record.msg:
            line = json.dumps({"slow": float(record.args[-1]), "what": record.getMessage()[:400]})  # type: ignore[index]
            print(line, file=sys.stderr, flush=True)  # noqa: T201 - the test reads stderr


def main() -> int:
    logging.getLogger("asyncio").addHandler(_Report(logging.WARNING))
    app = create_app()
    runtime = app.state.runtime
    server = Server(server_config(app, runtime.settings, "127.0.0.1", int(sys.argv[1]), "warning"),
                    runtime.begin_drain)  # the production server: its protocol, limits and drain
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.05
    loop.run_until_complete(server.serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
