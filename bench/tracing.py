"""What tracing costs: /classify throughput with traces exported over OTLP/HTTP against tracing off, side by side.

One API process with ``OTEL_TRACES_EXPORTER=otlp`` (every request sampled, its spans exported in batches to a
collector stub this bench runs: an HTTP server that counts the requests and bytes it receives and answers 200, as a
collector does), one with ``OTEL_TRACES_EXPORTER=none`` (the default), loaded in alternation, then a second pair
started in the other order (``bench/_ab.py``). ``--control`` runs both with tracing off (the noise of the
comparison itself). Reports the ratio on / off of the median images/s and what reached the collector.

    python bench/tracing.py --json bench/out/tracing.json
    python bench/tracing.py --smoke
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from _ab import arguments, compare, images, summary  # type: ignore[import-not-found]


class Collector:
    """An OTLP/HTTP endpoint that accepts every export (``POST /v1/traces``) and counts it."""

    def __init__(self) -> None:
        self.exports = 0
        self.bytes = 0
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                n = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(n)
                collector.exports += 1
                collector.bytes += n
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str] | None = None) -> int:
    p = arguments(__doc__, "tracing")
    args = p.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds, args.clients = 2.0, 1, 4
    collector = Collector()
    try:
        on = {"OTEL_TRACES_EXPORTER": "none" if args.control else "otlp",
              "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_TRACES_SAMPLER": "always_on"}
        rates = compare({"on": on, "off": {"OTEL_TRACES_EXPORTER": "none"}}, images(64), args.clients, args.images,
                        args.seconds, args.rounds)
    finally:
        collector.close()
    summary(args, rates, collector_exports=collector.exports, collector_bytes=collector.bytes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
