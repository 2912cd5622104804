"""The HTTP server process: uvicorn with connection limits it lacks, and a drain on SIGTERM.

uvicorn (httptools) accepts headers of any size (a 64 MiB header was read and answered 200) and has no timeout for
a connection that never completes its headers or stops sending its body half way: slowloris connections and
connections that never send a byte stay open forever. :class:`LimitedProtocol` is uvicorn's httptools protocol
with those limits (``ConnectionLimits``, from settings):

- request line + headers over ``max_header_bytes``: 431 (JSON error body), connection closed;
- headers not complete ``header_timeout_s`` after the connection opened (or after the previous response): 408
  when some bytes came, a plain close when none did;
- a body that stops arriving for ``body_idle_timeout_s`` (while the server is reading it): connection closed, the
  request sees a client disconnect;
- between requests, uvicorn's keep-alive timeout (``keep_alive_timeout_s``);
- more than ``max_connections`` open connections: 503 (uvicorn's ``limit_concurrency``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import logs, tracing
from service.errors import error_body
from service.settings import Settings, settings_or_exit

__all__ = ["ConnectionLimits", "LimitedProtocol", "Server", "main", "server_config"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int  # request line and headers of one request (431 beyond)
    header_timeout_s: float  # from connection (or end of the previous response) to the end of the headers
    body_idle_timeout_s: float  # longest pause while a request body is being read

    @classmethod
    def from_settings(cls, s: Settings) -> ConnectionLimits:
        return cls(s.max_header_bytes, s.header_timeout_s, s.body_idle_timeout_s)


def _raw_response(status: int, reason: str, kind: str, message: str) -> bytes:
    body = json.dumps(error_body(kind, message)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header size limit, a header timeout and a body idle timeout."""

    limits: ConnectionLimits = ConnectionLimits(64 * 1024, 10.0, 15.0)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._in_headers = True
        self._received_any = False
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    # ---- timers -----------------------------------------------------------------------------------------------
    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, raw: bytes | None) -> None:
        self._closing = True
        self._disarm()
        if not self.transport.is_closing():
            if raw is not None:
                self.transport.write(raw)
            self.transport.close()

    def _header_timeout(self) -> None:
        self._timer = None
        if not self._in_headers or self.transport.is_closing():
            return
        if self._received_any:
            self._refuse(_raw_response(408, "Request Timeout", "timeout",
                                       f"the request headers did not arrive within {self.limits.header_timeout_s:g} s"))
        else:
            self._refuse(None)  # never said anything: just close

    def _body_timeout(self) -> None:
        self._timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server, not the client, is behind: wait again
            self._arm(self.limits.body_idle_timeout_s, self._body_timeout)
            return
        logger.info("closing a connection whose request body stalled for %.0f s", self.limits.body_idle_timeout_s)
        self._refuse(None)

    # ---- protocol events --------------------------------------------------------------------------------------
    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._received_any = True
        super().data_received(data)
        if self._closing or self.parser is None:
            return
        if self._in_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(_raw_response(431, "Request Header Fields Too Large", "headers_too_large",
                                           f"the request line and headers exceed {self.limits.max_header_bytes} "
                                           "bytes"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._arm(self.limits.body_idle_timeout_s, self._body_timeout)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm(self.limits.body_idle_timeout_s, self._body_timeout)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request on this connection gets its own header timer when it begins; until then uvicorn's
        # keep-alive timer closes an idle connection
        self._in_headers = True
        self._received_any = False
        self._header_bytes = 0


def protocol_for(limits: ConnectionLimits) -> type[LimitedProtocol]:
    """The protocol class uvicorn instantiates (it passes only its own arguments), with ``limits`` bound."""
    return type("LimitedProtocolWithSettings", (LimitedProtocol,), {"limits": limits})


def server_config(app: Any, settings: Settings, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's configuration for one API process: one worker, our protocol and limits, the drain deadline."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1, log_config=logs.uvicorn_config(),
                          http=protocol_for(ConnectionLimits.from_settings(settings)),
                          timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
                          limit_concurrency=settings.max_connections,
                          timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)) + 5)


class Server(uvicorn.Server):
    """uvicorn's server, plus: the first SIGTERM/SIGINT calls ``on_drain`` (the runtime stops admitting work and
    fails what is left at its own deadline) before uvicorn's graceful shutdown starts."""

    def __init__(self, config: uvicorn.Config, on_drain: Any) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self._draining:
            self._draining = True
            self.on_drain(sig)
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    """``residual-serve``: one API process (settings from ``RESIDUAL_*`` environment variables)."""
    from service.api.app import create_app

    p = argparse.ArgumentParser(prog="residual-serve", description="Run the ResiDual Serve HTTP API. "
                                "Every RESIDUAL_* environment variable is a setting (see README).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logs.configure(args.log_level)
    settings = settings_or_exit("residual-serve")
    try:
        tracing.configure("residual-serve")  # OTEL_* (off by default)
        app = create_app(settings)
    except ValueError as exc:  # a RESIDUAL_MODELS or allowlist entry, an OTEL_* value that cannot work
        print(f"residual-serve: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    runtime = app.state.runtime
    try:
        Server(server_config(app, runtime.settings, args.host, args.port, args.log_level), runtime.begin_drain).run()
    finally:
        tracing.shutdown()  # flush the spans still queued
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
