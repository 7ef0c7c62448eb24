"""`python -m service`: serve on VITAE_HOST:VITAE_PORT (default 0.0.0.0:8000); see service/server.py."""

from __future__ import annotations

from .app import create_app
from .logs import configure_logging
from .server import serve
from .settings import get_settings


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)  # uvicorn's own lines go through it too
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
