"""The HTTP routes, one module-level `router = APIRouter(...)` per role; `service.app.create_app` includes them.

Owns: path operations, their query parameters and OpenAPI extras. A route parses, calls and shapes: the work
lives in `service.classify_flow`, `service.dispatch` and `service.v2` (and the modules they call), the state in
`service.lifecycle`. May import: `service.dependencies` (the `...Dep` aliases), `service.classify_flow`,
`service.dispatch`, `service.v2`, `service.schemas`, `service.lifecycle` types. Not `service.app`. A new
protocol or page is a new module here plus one `app.include_router` line in `service/app.py`.
"""
