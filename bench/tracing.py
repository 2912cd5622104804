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

import argparse
import json
import statistics
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _ab import compare, images  # type: ignore[import-not-found]


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--control", action="store_true", help="an A/A run: both processes with tracing off")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path)
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
    traced, untraced = statistics.median(rates["on"]), statistics.median(rates["off"])
    result = {"control": args.control, "clients": args.clients, "images_per_request": args.images,
              "seconds": args.seconds, "rounds": args.rounds,
              "images_per_s": {"on": round(traced, 1), "off": round(untraced, 1)},
              "rounds_images_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
              "on_vs_off": round(traced / untraced, 3),
              "collector_exports": collector.exports, "collector_bytes": collector.bytes}
    print(json.dumps(result, indent=2))  # noqa: T201
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
