"""`/docs` (Swagger UI) and `/redoc` that work without internet.

FastAPI's own pages load their JavaScript and CSS from a CDN, which leaves them blank in a closed network.
These serve the same UIs from the files the `fastapi-offline` package ships; create the app with
`docs_url=None, redoc_url=None` so that FastAPI's CDN pages are not registered as well. Their
Content-Security-Policy keeps the browser from reaching outside at all (ReDoc's footer links a logo on a CDN:
blocked, it is simply not shown).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

router = APIRouter(include_in_schema=False)

ASSETS_PATH = "/docs/assets"
# FastAPI's page templates start the UIs with an inline script; ReDoc styles inline and searches in a blob worker.
DOCS_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'self'",
        "frame-ancestors 'none'",
    ]
)
# The OAuth2 redirect page only runs its inline script (it hands the token to the Swagger UI window that opened it).
REDIRECT_POLICY = "default-src 'none'; script-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'"
NOSNIFF = {"X-Content-Type-Options": "nosniff"}
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}


def assets_folder() -> Path:
    """Where `fastapi-offline` keeps Swagger UI and ReDoc in the installed environment."""
    return Path(str(files("fastapi_offline").joinpath("static")))


def asset_url(request: Request, name: str) -> str:
    """The URL of one docs asset, under the app's root path (behind a proxy that mounts it below /)."""
    return f"{request.scope.get('root_path', '')}{ASSETS_PATH}/{name}"


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI for this app's OpenAPI schema."""
    app = request.app
    page = get_swagger_ui_html(
        openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        swagger_js_url=asset_url(request, "swagger-ui-bundle.js"),
        swagger_css_url=asset_url(request, "swagger-ui.css"),
        swagger_favicon_url=asset_url(request, "favicon.png"),
        oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
        swagger_ui_parameters=app.swagger_ui_parameters,
    )
    page.headers.update({"Content-Security-Policy": DOCS_POLICY, **NOSNIFF})
    return page


@router.get("/docs/oauth2-redirect")
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    """Swagger UI's OAuth2 redirect page (FastAPI's), framed by no one."""
    page = get_swagger_ui_oauth2_redirect_html()
    page.headers.update({"Content-Security-Policy": REDIRECT_POLICY, **NOSNIFF})
    return page


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc for this app's OpenAPI schema, with the system fonts (no Google Fonts)."""
    app = request.app
    page = get_redoc_html(
        openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
        title=f"{app.title} - ReDoc",
        redoc_js_url=asset_url(request, "redoc.standalone.js"),
        redoc_favicon_url=asset_url(request, "favicon.png"),
        with_google_fonts=False,
    )
    page.headers.update({"Content-Security-Policy": DOCS_POLICY, **NOSNIFF})
    return page


@router.get(ASSETS_PATH + "/{name}")
async def docs_asset(name: str) -> FileResponse:
    """One of the files Swagger UI and ReDoc need."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, detail=f"no docs asset named {name!r}; the docs use {', '.join(ASSETS)}")
    return FileResponse(assets_folder() / name, media_type=media_type, headers=NOSNIFF)
