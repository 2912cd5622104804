"""The rules of images by URL (service.fetch), without a network: which hosts the allowlist admits, which resolved
addresses are refused and which allowlist entries name them. The downloads themselves are tested against loopback
servers in tests/integration/test_protocols.py."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from service.errors import InvalidRequest
from service.fetch import Allowlist, ImageFetcher, is_url


def test_allowlist_entries() -> None:
    a = Allowlist(["images.example.com", "cdn.example.org:8443", "192.0.2.10", "10.0.0.0/8", "[::1]:9000", ""])
    assert a.allows_host("images.example.com", 443) and a.allows_host("IMAGES.example.com", 80)
    assert a.allows_host("cdn.example.org", 8443) and not a.allows_host("cdn.example.org", 443)
    assert a.allows_host("192.0.2.10", 80) and a.allows_host("10.20.30.40", 80)
    assert a.allows_host("::1", 9000) and not a.allows_host("::1", 9001)
    assert not a.allows_host("evil.example.com", 443) and not a.allows_host("example.com", 443)
    assert not Allowlist([]) and Allowlist(["a.b"])
    for bad in ("http://x/", "a/b", "host:port", "user@host"):
        with pytest.raises(ValueError, match="allowlist entry"):
            Allowlist([bad])


@pytest.mark.parametrize(("address", "entries", "named"), [
    ("127.0.0.1", ["127.0.0.1"], True),
    ("127.0.0.1", ["127.0.0.0/8"], True),
    ("127.0.0.1", ["localhost"], False),  # a name never names an address
    ("127.0.0.1", ["127.0.0.1:8080"], True),  # with the port of the URL (8080 below)
    ("127.0.0.1", ["127.0.0.1:9090"], False),
    ("10.1.2.3", ["10.0.0.0/8"], True),
    ("169.254.169.254", ["0.0.0.0/0"], False),  # a range that spans public and special addresses names none
    ("169.254.169.254", ["169.254.169.254"], True),
    ("::1", ["0.0.0.0/0", "::/0"], False),
    ("::ffff:127.0.0.1", ["127.0.0.1"], False),  # the mapped form is loopback too, and not the same entry
])
def test_which_entries_name_a_special_address(address: str, entries: list[str], named: bool) -> None:
    assert Allowlist(entries).names_address(ipaddress.ip_address(address), 8080) is named


def _fetcher(entries: list[str], resolved: list[str]) -> ImageFetcher:
    async def run(fn: object, host: str, port: int, *args: object) -> list[tuple[object, ...]]:
        return [(None, None, None, "", (a, port)) for a in resolved]  # getaddrinfo's shape

    return ImageFetcher(entries, 1024, 1.0, 2.0, 4, run)


@pytest.mark.parametrize(("resolved", "kind"), [
    (["127.0.0.1"], "loopback"), (["10.0.0.5"], "private"), (["169.254.169.254"], "link-local"),
    (["224.0.0.1"], "multicast"), (["0.0.0.0"], "unspecified"), (["::1"], "loopback"),
    (["::ffff:127.0.0.1"], "loopback"), (["100.64.0.1"], "non-public"),
    (["93.184.216.34", "127.0.0.1"], "loopback"),  # every address the name resolves to must pass
])
def test_a_name_resolving_to_a_special_address_is_refused(resolved: list[str], kind: str) -> None:
    fetcher = _fetcher(["images.example.com"], resolved)
    with pytest.raises(InvalidRequest, match=f"'images.example.com' resolves to .*, a {kind} address"):
        asyncio.run(fetcher.fetch("http://images.example.com/cat.png", 0))


def test_refusals_before_any_connection() -> None:
    with pytest.raises(InvalidRequest, match="images by URL are off on this deployment.*RESIDUAL_IMAGE_URL_ALLOWLIST"):
        asyncio.run(_fetcher([], []).fetch("http://images.example.com/cat.png", 0))
    fetcher = _fetcher(["images.example.com"], ["93.184.216.34"])
    for url, message in (("http://user:pw@images.example.com/x", "credentials"),
                         ("gopher://images.example.com/x", "only http:// and https://"),
                         ("http://other.example.com/x", "not on RESIDUAL_IMAGE_URL_ALLOWLIST"),
                         ("http://images.example.com:99999/x", "not a valid URL")):
        with pytest.raises(InvalidRequest, match=message):
            asyncio.run(fetcher.fetch(url, 3))


def test_is_url() -> None:
    assert is_url("http://x/y") and is_url("HTTPS://x") and is_url("ftp://x")
    assert not is_url("iVBORw0KGgo=") and not is_url("data:image/png;base64,AAAA")


def test_downloads_per_process_are_capped_and_a_request_shares_one_byte_budget() -> None:
    """A loopback server that holds its answers until two downloads are in flight at once: with a cap of 2, never
    more than 2; the bytes come back in order; the downloads of one request share one byte budget (413 past it)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from service.errors import PayloadTooLarge

    state = {"now": 0, "most": 0}
    lock = threading.Lock()
    two_at_once = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
                if state["now"] >= 2:
                    two_at_once.set()
            assert two_at_once.wait(10), "the downloads never ran two at once"
            body = self.path.encode() * 100  # 100 x the path: its own bytes
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            with lock:
                state["now"] -= 1

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"

    async def run(fn: object, *args: object) -> object:
        raise AssertionError("an address literal needs no lookup")

    async def main() -> None:
        fetcher = ImageFetcher(["127.0.0.1"], 10_000, 1.0, 5.0, 2, run)
        try:
            urls = [f"{base}/{i}.png" for i in range(6)]
            got = await fetcher.resolve([*urls[:3], b"inline", *urls[3:]])
            assert got == [f"/{i}.png".encode() * 100 for i in range(3)] + [b"inline"] + [
                f"/{i}.png".encode() * 100 for i in range(3, 6)]
        finally:
            await fetcher.aclose()
        # one at a time (the others wait for the slot, never cancelled mid-connection): the fourth finds 1,900
        # bytes of the request's 10,000 left
        fetcher = ImageFetcher(["127.0.0.1"], 10_000, 1.0, 5.0, 1, run)
        try:
            with pytest.raises(PayloadTooLarge, match=r"images\[3\] .*: the image is 2700 bytes; the limit is 1900 "
                                                      r"\(what is left of this request's 10000\)"):
                await fetcher.resolve([f"{base}/{'x' * 20}-{i}.png" for i in range(6)])  # 6 x 2,700 bytes
        finally:
            await fetcher.aclose()

    try:
        asyncio.run(main())
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert state["most"] == 2
