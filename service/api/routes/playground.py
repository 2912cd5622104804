"""The playground: ``GET /`` serves one page (plain HTML, CSS and JavaScript under ``service/api/static``, no build
step, nothing from the network) that calls this API: classify with bars per image, the exact per-unit explanation of a
label as a layer x head heatmap, head spectra, and fits with live progress. The page is open (it holds no data);
every API call it makes carries the key typed into its key field.

``/docs`` and ``/redoc`` serve Swagger UI and ReDoc from the ``fastapi-offline`` package (``FastAPIOffline`` in
``service.api.app``). ReDoc's bundle shows a "Redocly" logo fetched from their CDN: ``/redoc`` here loads the package's
bundle through ``/docs-assets/redoc.standalone.js`` with that one address emptied (the logo then hides itself), so
the page makes no request outside this server.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response

from service import sources
from service.api.deps import get_runtime

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@cache
def _template() -> str:
    return (STATIC_DIR / "playground.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
async def playground(request: Request) -> HTMLResponse:
    rt = get_runtime(request)
    s = rt.settings
    ready = rt.ready
    config = {
        "model": ready.model.name if ready else rt.models.default,
        "models": rt.models.names,  # the picker (the default first)
        "weights_id": ready.model.weights_id if ready else "loading",
        "auth": "open" if s.api_key is None and s.admin_api_key is None else "keys",
        "world_tasks": sources.world_tasks(),
    }
    blob = json.dumps(config).replace("<", "\\u003c")  # no "</script>" can end the data block early
    return HTMLResponse(_template().replace("__CONFIG__", blob), headers={"Content-Security-Policy": _CSP})


_REDOC_LOGO = b'"https://cdn.redoc.ly/redoc/logo-mini.svg"'
OFFLINE_DOCS_STATIC = "/static-offline-docs"  # fastapi-offline's mount of its assets


@cache
def _redoc_js() -> bytes:
    bundle = (Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js").read_bytes()
    return bundle.replace(_REDOC_LOGO, b'""')


@router.get("/docs-assets/redoc.standalone.js")
async def redoc_js() -> Response:
    return Response(_redoc_js(), media_type="application/javascript",
                    headers={"Cache-Control": "public, max-age=86400"})


@router.get("/redoc", response_class=HTMLResponse)
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} - ReDoc",
                          redoc_js_url=f"{root}/docs-assets/redoc.standalone.js", with_google_fonts=False,
                          redoc_favicon_url=f"{root}{OFFLINE_DOCS_STATIC}/favicon.png")
