"""Images by URL (``http(s)://`` strings where an image is expected), off unless an allowlist is configured.

A URL is a way to reach out of the cluster on a client's behalf, so every download is checked like this:

- the host must be on ``RESIDUAL_IMAGE_URL_ALLOWLIST`` (host names, ``host:port``, IP addresses or CIDRs); an empty
  allowlist refuses every URL (422 saying how to enable them);
- the name is resolved here, and every address it resolves to is checked: loopback, private, link-local (the cloud
  metadata address 169.254.169.254 included), multicast, unspecified and other non-public addresses are refused
  unless an allowlist entry names that address, or a CIDR inside the same kind of range (``10.0.0.0/8`` allows
  ``10.1.2.3``; ``0.0.0.0/0`` spans public and special ranges and allows public addresses only);
- the connection goes to the address that was checked (the name is not resolved a second time, so a DNS answer
  that changes in between cannot redirect it); HTTPS still verifies the certificate against the name;
- redirects are followed by hand, at most :data:`MAX_REDIRECTS`, each target checked again from the start;
- one download holds at most ``max_bytes`` (the announced length is checked first), a request's downloads together
  the same, within a connect timeout and a total timeout; a process runs at most ``max_concurrency`` at once.

A failing URL fails the request that sent it (4xx naming the image, the URL and the problem), before its images
reach the batcher: never anyone else's batch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from service.errors import InvalidRequest, PayloadTooLarge

__all__ = ["MAX_REDIRECTS", "Allowlist", "ImageFetcher", "is_url"]

MAX_REDIRECTS = 3
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHOWN = 200  # characters of a URL quoted in an error

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]


def is_url(text: str) -> bool:
    """Whether a string where an image is expected is a URL (any scheme; only http(s) is fetched)."""
    return bool(_URL.match(text[:64]))


def _kind(ip: Address) -> str | None:
    """Which special range an address is in (None: public)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, test in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                       ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                       ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if test:
            return kind
    return None if ip.is_global else "non-public"


@dataclass(frozen=True)
class _Entry:
    host: str | None  # a host name (lower case)
    network: Network | None  # an address or a CIDR
    port: int | None


class Allowlist:
    """``RESIDUAL_IMAGE_URL_ALLOWLIST``: host names, ``host:port``, IP addresses (``[v6]:port`` with a port), CIDRs."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.entries = [self._parse(e.strip()) for e in entries if e.strip()]

    @staticmethod
    def _parse(entry: str) -> _Entry:
        try:
            return _Entry(None, ipaddress.ip_network(entry, strict=False), None)  # 10.0.0.0/8, 192.0.2.7, ::1
        except ValueError:
            pass
        parts = urlsplit(f"//{entry}")  # host:port, [::1]:8080, name
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"image URL allowlist entry {entry!r}: bad port") from exc
        host = (parts.hostname or "").lower()
        if not host or parts.path or parts.query or parts.username:
            raise ValueError(f"image URL allowlist entry {entry!r} is not a host name, host:port, address or CIDR")
        try:
            return _Entry(None, ipaddress.ip_network(host), port)
        except ValueError:
            return _Entry(host, None, port)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def allows_host(self, host: str, port: int) -> bool:
        """The URL's host (a name or an address) is on the list (with its port, when the entry gives one)."""
        host = host.lower()
        try:
            ip: Address | None = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        for e in self.entries:
            if e.port is not None and e.port != port:
                continue
            if e.host is not None and e.host == host:
                return True
            if e.network is not None and ip is not None and ip in e.network:
                return True
        return False

    def names_address(self, ip: Address, port: int) -> bool:
        """An entry names this special address: the address itself, or a CIDR lying inside the same kind of range."""
        kind = _kind(ip)
        for e in self.entries:
            if e.network is None or (e.port is not None and e.port != port) or ip not in e.network:
                continue
            if _kind(e.network.network_address) == kind and _kind(e.network.broadcast_address) == kind:
                return True
        return False


async def _resolve_with(run: Callable[..., Awaitable[Any]], host: str, port: int) -> list[str]:
    infos = await run(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass
class _Request:
    """The downloads of one request: the bytes they may still hold together, and whether one has failed."""

    left: int
    failed: bool = False


class ImageFetcher:
    """Downloads the images of one process under the rules above; ``run`` runs a blocking call off the event loop
    (the name lookups: a pool of their own, so a slow resolver never holds the threads other work needs)."""

    def __init__(self, allowlist: Sequence[str], max_bytes: int, connect_timeout_s: float, timeout_s: float,
                 max_concurrency: int, run: Callable[..., Awaitable[Any]]) -> None:
        self.allowlist = Allowlist(allowlist)
        self.max_bytes = max_bytes
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_concurrency)
        self._run = run
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # created on the event loop that uses it
            self._client = httpx.AsyncClient(
                follow_redirects=False, trust_env=False,  # no proxy from the environment: we connect where we checked
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                limits=httpx.Limits(max_keepalive_connections=0))  # a connection is never reused for another name
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # ---- many -----------------------------------------------------------------------------------------------------
    async def resolve(self, items: Sequence[bytes | str], what: str = "images") -> list[bytes]:
        """Images as bytes, or URLs to download (concurrently): all bytes, in order. The first failure by index is
        raised; downloads that have not started by then never start, the others are cancelled."""
        urls = [i for i, item in enumerate(items) if isinstance(item, str)]
        if not urls:
            return [item for item in items if isinstance(item, bytes)]
        request = _Request(self.max_bytes)
        tasks = {i: asyncio.ensure_future(self.fetch(str(items[i]), i, what, request)) for i in urls}
        try:
            await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
            for i in urls:  # the failure of the lowest index (deterministic), the others cancelled in `finally`
                task = tasks[i]
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            got = {i: t.result() for i, t in tasks.items()}
        finally:
            for t in tasks.values():
                t.cancel()
        return [got[i] if isinstance(item, str) else item for i, item in enumerate(items)]

    # ---- one ------------------------------------------------------------------------------------------------------
    async def fetch(self, url: str, index: int, what: str = "images", request: _Request | None = None) -> bytes:
        """One URL -> its bytes (every rule of the module); 422/413 naming ``what[index]`` and the URL. ``request``:
        the byte budget and the fate of the request's other downloads."""
        shown = url[:_SHOWN] + ("..." if len(url) > _SHOWN else "")
        label = f"{what}[{index}] ({shown})"
        if not self.allowlist:
            raise InvalidRequest(f"{what}[{index}] is a URL, and images by URL are off on this deployment: send the "
                                 "image as base64, or have the operator list the hosts to fetch from in "
                                 "RESIDUAL_IMAGE_URL_ALLOWLIST")
        async with self._slots:
            if request is not None and request.failed:
                return b""  # another download of the request failed: it is answered with that failure
            limit = self.max_bytes if request is None else min(self.max_bytes, request.left)
            try:
                data = await asyncio.wait_for(self._follow(url, label, limit), self.timeout_s)
            except TimeoutError as exc:
                if request is not None:
                    request.failed = True
                raise InvalidRequest(f"{label}: the download did not finish within {self.timeout_s:g} s") from exc
            except BaseException:
                if request is not None:
                    request.failed = True  # set before the slot is released: no download starts after it
                raise
        if request is not None:
            if len(data) > request.left:
                request.failed = True
                raise PayloadTooLarge(f"{label}: this request's downloads exceed {self.max_bytes} bytes together")
            request.left -= len(data)
        return data

    async def _follow(self, url: str, label: str, limit: int) -> bytes:
        for hop in range(MAX_REDIRECTS + 1):
            status, location, data = await self._get(url, label, limit)
            if location is None:
                if status >= 400 or status < 200:
                    raise InvalidRequest(f"{label}: the server answered HTTP {status}")
                return data
            if hop == MAX_REDIRECTS:
                break
            target = urljoin(url, location)
            label = f"{label} -> redirect {target[:_SHOWN]}"
            url = target
        raise InvalidRequest(f"{label}: more than {MAX_REDIRECTS} redirects")

    async def _address(self, host: str, port: int, label: str) -> str:
        """The checked address to connect to (every address the name resolves to must pass)."""
        try:
            literal: Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = await _resolve_with(self._run, host, port)
            except OSError as exc:
                raise InvalidRequest(f"{label}: the host name {host!r} does not resolve ({exc})") from exc
            if not addresses:
                raise InvalidRequest(f"{label}: the host name {host!r} does not resolve")
        for text in addresses:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
            kind = _kind(ip)
            if kind is not None and not self.allowlist.names_address(ip, port):
                via = "" if literal is not None else f"{host!r} resolves to "
                raise InvalidRequest(f"{label}: {via}{ip}, a {kind} address; such addresses are refused unless "
                                     "RESIDUAL_IMAGE_URL_ALLOWLIST names the address or its range")
        return addresses[0]

    async def _get(self, url: str, label: str, limit: int) -> tuple[int, str | None, bytes]:
        """One GET (no redirect followed): (status, the Location of a redirect or None, the body)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidRequest(f"{label}: not a valid URL ({exc})") from exc
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise InvalidRequest(f"{label}: only http:// and https:// URLs are fetched, not {scheme}://")
        host = (parts.hostname or "").lower()
        if not host:
            raise InvalidRequest(f"{label}: the URL has no host")
        if parts.username or parts.password:
            raise InvalidRequest(f"{label}: URLs with credentials are refused")
        port = port or (443 if scheme == "https" else 80)
        if not self.allowlist.allows_host(host, port):
            raise InvalidRequest(f"{label}: the host {host}:{port} is not on RESIDUAL_IMAGE_URL_ALLOWLIST")
        address = await self._address(host, port, label)
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        pinned = f"[{ip}]" if ip.version == 6 else str(ip)
        target = parts._replace(netloc=f"{pinned}:{port}", fragment="").geturl()
        default_port = port == (443 if scheme == "https" else 80)
        shown_host = f"[{host}]" if ":" in host else host  # an IPv6 literal
        headers = {"Host": shown_host if default_port else f"{shown_host}:{port}", "Accept": "image/*",
                   "Accept-Encoding": "identity"}  # the cap counts the bytes as sent: no compressed bodies
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        client = self._http()
        try:
            async with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise InvalidRequest(f"{label}: a redirect without a Location")
                    return response.status_code, location, b""
                if response.status_code >= 300:
                    return response.status_code, None, b""
                announced = response.headers.get("content-length")
                left = "" if limit == self.max_bytes else f" (what is left of this request's {self.max_bytes})"
                if announced is not None and announced.isdigit() and int(announced) > limit:
                    raise PayloadTooLarge(f"{label}: the image is {announced} bytes; the limit is {limit}{left}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_raw():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"{label}: the image is more than {limit} bytes{left}")
                    chunks.append(chunk)
                return response.status_code, None, b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise InvalidRequest(f"{label}: timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise InvalidRequest(f"{label}: the download failed ({type(exc).__name__}: {exc})") from exc
