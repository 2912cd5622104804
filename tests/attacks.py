"""Hostile clients on raw sockets and HTTP, shared by tests/integration/test_hostile_clients.py and bench/attacks.py.

Each function plays one attack from issue 24 against a running API (``base`` is ``http://host:port``) and reports
what the server did; none of them sleeps: pacing and waiting use ``select`` on the socket, so a server that closes
the connection is seen at once.
"""

from __future__ import annotations

import contextlib
import io
import select
import socket
import time
from urllib.parse import urlparse

from PIL import Image

__all__ = ["big_png", "idle_until_closed", "oversized_header", "slowloris", "stalled_body", "status_of_raw",
           "unauthenticated_body"]


def _addr(base: str) -> tuple[str, int]:
    u = urlparse(base)
    return str(u.hostname), int(u.port or 80)


def _read_response(sock: socket.socket, deadline: float) -> tuple[int | None, dict[str, str], bytes]:
    """(status or None when closed without one, headers, body read so far) within ``deadline`` (monotonic)."""
    data = b""
    while b"\r\n\r\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, {}, data
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError):
            return None, {}, data
        if not chunk:
            return None, {}, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0") or 0)
    while len(body) < length and time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _closed(sock: socket.socket, deadline: float) -> bool:
    """Whether the server closes the connection before ``deadline`` (anything it sends first is read and dropped)."""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            continue
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, ConnectionAbortedError):
            return True
    return False


def status_of_raw(base: str, request: bytes, timeout: float = 30.0) -> tuple[int | None, dict[str, str], bytes]:
    with socket.create_connection(_addr(base), timeout=timeout) as sock:
        sock.sendall(request)
        return _read_response(sock, time.monotonic() + timeout)


def unauthenticated_body(base: str, path: str, size: int = 16 * 1024 * 1024, prefix: int = 64 * 1024,
                         key: str = "wrong-key-0123456789abcdef", timeout: float = 30.0
                         ) -> tuple[int | None, bool, float]:
    """POST a ``size``-byte JSON body (``[[],[],...]``) with a wrong key, sending only its first ``prefix`` bytes:
    (status, whether the server then closed the connection, seconds to the answer)."""
    host, port = _addr(base)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\nContent-Length: {size}\r\n\r\n").encode()
    body = (b"[" + b"[]," * (prefix // 3))[:prefix]
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(head + body)
        status, headers, _ = _read_response(sock, started + timeout)
        elapsed = time.monotonic() - started
        closed = headers.get("connection", "").lower() == "close" and _closed(sock, time.monotonic() + timeout)
    return status, closed, elapsed


def oversized_header(base: str, size: int, timeout: float = 30.0) -> tuple[int | None, dict[str, str], bytes]:
    """GET /livez with one header of ``size`` bytes."""
    host, port = _addr(base)
    request = (f"GET /livez HTTP/1.1\r\nHost: {host}:{port}\r\nX-Padding: ").encode() + b"a" * size + b"\r\n\r\n"
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it may answer and close before the end
            sock.sendall(request)
        return _read_response(sock, time.monotonic() + timeout)


def idle_until_closed(base: str, limit: float, send: bytes = b"") -> float | None:
    """Open a connection, send ``send`` (nothing by default) and wait: seconds until the server closes it, or None
    when it is still open after ``limit`` seconds."""
    with socket.create_connection(_addr(base), timeout=limit + 5) as sock:
        started = time.monotonic()
        if send:
            sock.sendall(send)
        return time.monotonic() - started if _closed(sock, started + limit) else None


def slowloris(base: str, interval: float, limit: float) -> tuple[int | None, float | None]:
    """Send a request's headers one byte every ``interval`` seconds, forever: (the status the server answers
    with, seconds until it closed the connection), (None, None) when it never did within ``limit``."""
    host, port = _addr(base)
    request = f"GET /livez HTTP/1.1\r\nHost: {host}:{port}\r\n" + "X-a: b\r\n" * 10_000
    with socket.create_connection((host, port), timeout=limit + 5) as sock:
        started = time.monotonic()
        for ch in request.encode():
            ready, _, _ = select.select([sock], [], [], interval)  # paces the bytes; wakes when the server speaks
            if ready:
                status, _, _ = _read_response(sock, time.monotonic() + 5)
                _closed(sock, time.monotonic() + 5)
                return status, time.monotonic() - started
            if time.monotonic() - started > limit:
                return None, None
            try:
                sock.sendall(bytes([ch]))
            except (BrokenPipeError, ConnectionResetError):
                return None, time.monotonic() - started
    return None, None


def stalled_body(base: str, limit: float) -> float | None:
    """Headers of a 1000-byte JSON body, 10 bytes of it, then silence: seconds until the server closes."""
    host, port = _addr(base)
    head = (f"POST /label-sets HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n").encode()
    return idle_until_closed(base, limit, head + b'{"classes"')


def big_png(width: int, height: int) -> bytes:
    """A single-colour RGB PNG of ``width`` x ``height`` pixels (tiny on the wire, large once decoded)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (180, 40, 40)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()
