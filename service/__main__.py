"""`python -m service`: serve on VITAE_HOST:VITAE_PORT (default 0.0.0.0:8000); see service/server.py."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from .app import create_app
from .logs import configure_logging
from .server import serve
from .settings import get_settings


def main() -> None:
    try:
        settings = get_settings()
    except ValidationError as exc:  # one line per wrong variable, no traceback
        problems = "; ".join(f"VITAE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        sys.exit(f"the service's settings are wrong: {problems}")
    configure_logging(settings.log_level, settings.log_format)  # uvicorn's own lines go through it too
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
