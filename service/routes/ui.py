"""The web page at `/`: one static HTML/CSS/JS page shipped in this package (no build step, no CDN).

The page holds no secret, so it loads without the API key; every call it makes to the API sends the key the
user enters. Its Content-Security-Policy allows nothing but this origin, so it cannot load anything from outside.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)

PAGE = "index.html"
ASSETS = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}
PAGE_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
# Revalidated on every load, so a new version of the page shows up after an upgrade.
NO_STALE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def static_folder() -> Path:
    """`service/static/` of the installed package (package data, see pyproject.toml)."""
    return Path(str(files("service").joinpath("static")))


@router.get("/")
async def page() -> FileResponse:
    """The classifier page."""
    headers = NO_STALE | {"Content-Security-Policy": PAGE_POLICY, "Referrer-Policy": "no-referrer"}
    return FileResponse(static_folder() / PAGE, media_type="text/html; charset=utf-8", headers=headers)


@router.get("/ui/{name}")
async def page_asset(name: str) -> FileResponse:
    """The page's script, style sheet and icon."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, detail=f"no page asset named {name!r}; the page has {', '.join(ASSETS)}")
    return FileResponse(static_folder() / name, media_type=media_type, headers=NO_STALE)
