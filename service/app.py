"""The app factory: settings, middleware and routers; everything else lives in the modules it names.

Layout (the FastAPI "bigger applications" shape):
  lifecycle.py       Status, ServiceState, load_model, lifespan (owns every resource)
  dependencies.py    StateDep, RuntimeDep, ApiKeyDep (`Annotated[..., Depends()]` aliases)
  classify_flow.py   the steps of one /classify request (options, uploads, decode, response)
  dispatch.py        prepared images through the batchers under one deadline (/classify and v2 alike)
  v2/                the KServe v2 protocol: pure wire format (decode, encode, documents) + its request flow
  runtime.py         one model version ready to answer (backend + batchers); registry.py, models.py: the served
                     models, their versions, and how a new version goes live
  routes/*.py        one `router = APIRouter(...)` per role: operations, classify, v2 (KServe v2), models
                     (GET /models), admin (model control), docs (offline /docs, /redoc), ui (the web page at /)
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .backends import Backend
from .cache import CACHE_HEADER, ResponseCache
from .lifecycle import ServiceState, lifespan
from .metrics import Metrics
from .middleware import (
    BodyLimitMiddleware,
    BodyTimeout,
    BodyTooLarge,
    MetricsMiddleware,
    RequestContextMiddleware,
    body_timeout_response,
    too_large_response,
)
from .routes import admin, classify, docs, models, operations, ui, v2
from .settings import Settings, get_settings
from .tracing import Tracing
from .v2.errors import error_body

V2_ROUTES = (
    "GET /v2, /v2/health/live, /v2/health/ready, /v2/models/stats; under /v2/models/{name} and "
    "/v2/models/{name}/versions/{version}: GET '', /ready, /config, /stats and POST /infer"
)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """Paths and methods no route takes: under /v2 the protocol's {"error": ...} naming its routes, else FastAPI's."""
    path = request.url.path
    if path != "/v2" and not path.startswith("/v2/"):
        return await http_exception_handler(request, exc)
    if exc.status_code == 404:
        message = f"no v2 route at {path}; the protocol's routes: {V2_ROUTES}"
    elif exc.status_code == 405:
        allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "see /docs")
        message = f"{request.method} is not allowed on {path}; allowed: {allowed}"
    else:
        message = str(exc.detail)
    return JSONResponse(error_body(message), status_code=exc.status_code, headers=exc.headers)


async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    return too_large_response(exc.limit)


async def body_timeout(request: Request, exc: BodyTimeout) -> JSONResponse:
    return body_timeout_response(exc, request.url.path)


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> FastAPI:
    """Build the app; `backend` replaces the configured one (benchmarks and fault-injection tests)."""
    settings = settings or get_settings()
    metrics = Metrics()
    app = FastAPI(
        title="ViTAE inference service",
        version="1",
        summary="Image classification with dynamic batching and Grad-CAM maps",
        lifespan=lifespan,
        docs_url=None,  # routes.docs serves /docs and /redoc from packaged assets; FastAPI's own use a CDN
        redoc_url=None,
    )
    app.state.service = ServiceState(settings, metrics, tracing=Tracing.from_environment(metrics))
    app.state.given_backend = backend
    app.state.cache = ResponseCache(int(settings.cache_mb * 2**20), metrics)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=[
                "Authorization",
                "X-API-Key",
                "Content-Type",
                "Cache-Control",
                "X-Priority",
                "X-Request-Timeout",
            ],
            expose_headers=[CACHE_HEADER],
        )
    # Outermost (added last): the request id and the server span cover every answer, refusals included.
    app.add_middleware(RequestContextMiddleware, tracing=app.state.service.tracing)
    app.add_exception_handler(BodyTooLarge, body_too_large)
    app.add_exception_handler(BodyTimeout, body_timeout)
    app.add_exception_handler(StarletteHTTPException, http_error)

    app.include_router(operations.router)
    app.include_router(classify.router)
    app.include_router(v2.router)
    app.include_router(models.router)
    app.include_router(admin.router)
    app.include_router(docs.router)
    if settings.ui:
        app.include_router(ui.router)
    return app
