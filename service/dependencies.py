"""What routes declare they need, as `Annotated[..., Depends()]` aliases: the state, a ready runtime, the API key,
the request's policy (priority, deadline, cache use).

Each is `async def` although none awaits: FastAPI runs a plain `def` dependency in its thread pool, a thread
hop per dependency per request that, under load, costs the event loop more than the check itself.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .cache import ResponseCache
from .lifecycle import Runtime, ServiceState, Status
from .registry import ModelUnavailable, UnknownModel
from .request_policy import PRIORITIES, RequestPolicy, policy_from_headers

NOT_READY = {
    Status.LOADING: "the model is still loading; retry shortly",
    Status.DRAINING: "the service is shutting down",
}


async def get_state(request: Request) -> ServiceState:
    """The app's ServiceState (set by create_app)."""
    return request.app.state.service


async def get_runtime(request: Request, state: Annotated[ServiceState, Depends(get_state)]) -> AsyncIterator[Runtime]:
    """The live runtime of the model the request names (v2: the path's name; /classify: `?model=`; none: the
    default), leased until the request is answered; 404 listing the served names, 503 with Retry-After while
    loading or failed.

    Draining still serves: during the pre-stop grace load balancers may still send requests (only /readyz
    says 503), and after it the batchers answer what reaches them until the lifespan closes them.
    """
    if state.status not in (Status.READY, Status.DRAINING):
        if state.status is Status.FAILED:
            detail = f"the model failed to load: {state.error}"
        else:
            detail = NOT_READY.get(state.status, str(state.status))
        raise HTTPException(503, detail=detail, headers={"Retry-After": "5"})
    try:
        loaded = state.models.find(request.path_params.get("name") or request.query_params.get("model"))
    except UnknownModel as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except ModelUnavailable as exc:
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": "5"}) from None
    with loaded.lease() as runtime:  # a version replaced meanwhile is closed only once this request is answered
        yield runtime


bearer_scheme = HTTPBearer(auto_error=False, description="VITAE_API_KEY as a Bearer token")
api_key_scheme = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False, description="VITAE_API_KEY")


async def check_api_key(
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    api_key: Annotated[str | None, Security(api_key_scheme)],
) -> None:
    """401 unless VITAE_API_KEY is unset or given as a Bearer token or an X-API-Key header.

    Every credential sent must be the key: a right X-API-Key does not excuse a wrong or malformed Authorization.
    """
    expected = state.settings.api_key
    if expected is None:
        return
    authorization = bearer.credentials if bearer else request.headers.get("authorization")
    given = [key for key in (api_key, authorization) if key is not None]
    key = expected.get_secret_value().encode()
    if not given or not all(secrets.compare_digest(g.encode(), key) for g in given):
        raise HTTPException(
            401,
            detail="missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def get_policy(
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    x_priority: Annotated[
        str | None, Header(description=f"{PRIORITIES} (default normal): the queue serves the most urgent first")
    ] = None,
    x_request_timeout: Annotated[
        str | None, Header(description="seconds this request may take (> 0), capped by VITAE_REQUEST_TIMEOUT_S")
    ] = None,
) -> RequestPolicy:
    """The request's priority, deadline and cache use from its headers; 400 naming a bad header."""
    try:
        return policy_from_headers(request.headers, state.settings.request_timeout_s)
    except ValueError as exc:
        raise HTTPException(400, detail=str(exc)) from None


# Its own scheme name: two APIKeyHeader schemes under the default name would merge into one in the OpenAPI schema.
admin_key_scheme = APIKeyHeader(
    name="X-Admin-Key", scheme_name="AdminKey", auto_error=False, description="VITAE_ADMIN_KEY"
)


async def check_admin_key(
    state: Annotated[ServiceState, Depends(get_state)],
    admin_key: Annotated[str | None, Security(admin_key_scheme)],
) -> None:
    """403 while VITAE_ADMIN_KEY is unset (the control endpoints are off); 401 unless X-Admin-Key is the key."""
    expected = state.settings.admin_key
    if expected is None:
        raise HTTPException(403, detail="the model control endpoints are off: set VITAE_ADMIN_KEY to turn them on")
    if admin_key is None or not secrets.compare_digest(admin_key.encode(), expected.get_secret_value().encode()):
        raise HTTPException(401, detail="missing or wrong admin key: send 'X-Admin-Key: <VITAE_ADMIN_KEY>'")


async def get_cache(request: Request) -> ResponseCache:
    """The app's response cache (set by create_app)."""
    return request.app.state.cache


StateDep = Annotated[ServiceState, Depends(get_state)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ApiKeyDep = Annotated[None, Depends(check_api_key)]
AdminKeyDep = Annotated[None, Depends(check_admin_key)]
PolicyDep = Annotated[RequestPolicy, Depends(get_policy)]
CacheDep = Annotated[ResponseCache, Depends(get_cache)]
