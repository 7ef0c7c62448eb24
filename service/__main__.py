"""`python -m service`: serve on VITAE_HOST:VITAE_PORT (default 0.0.0.0:8000); see service/server.py."""

from __future__ import annotations

import logging

from .app import create_app
from .server import serve
from .settings import get_settings


def main() -> None:
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
