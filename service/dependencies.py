"""What routes declare they need, as `Annotated[..., Depends()]` aliases: the state, a ready runtime, the API key.

Each is `async def` although none awaits: FastAPI runs a plain `def` dependency in its thread pool, a thread
hop per dependency per request that, under load, costs the event loop more than the check itself.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .lifecycle import Runtime, ServiceState, Status

NOT_READY = {
    Status.LOADING: "the model is still loading; retry shortly",
    Status.DRAINING: "the service is shutting down",
}


async def get_state(request: Request) -> ServiceState:
    """The app's ServiceState (set by create_app)."""
    return request.app.state.service


async def get_runtime(state: Annotated[ServiceState, Depends(get_state)]) -> Runtime:
    """The loaded runtime; 503 with Retry-After while loading or failed.

    Draining still serves: during the pre-stop grace load balancers may still send requests (only /readyz
    says 503), and after it the batchers answer what reaches them until the lifespan closes them.
    """
    if state.status not in (Status.READY, Status.DRAINING) or state.runtime is None:
        if state.status is Status.FAILED:
            detail = f"the model failed to load: {state.error}"
        else:
            detail = NOT_READY.get(state.status, str(state.status))
        raise HTTPException(503, detail=detail, headers={"Retry-After": "5"})
    return state.runtime


bearer_scheme = HTTPBearer(auto_error=False, description="VITAE_API_KEY as a Bearer token")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="VITAE_API_KEY")


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


StateDep = Annotated[ServiceState, Depends(get_state)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ApiKeyDep = Annotated[None, Depends(check_api_key)]
