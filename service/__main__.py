"""`python -m service`: serve with uvicorn on VITAE_HOST:VITAE_PORT (default 0.0.0.0:8000)."""

from __future__ import annotations

import logging
import signal

import uvicorn

from .app import create_app
from .settings import Settings, get_settings


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with /readyz turning 503 the moment SIGTERM/SIGINT arrives.

    uvicorn then stops accepting connections, waits for the open requests (whose images the batcher
    keeps computing) and runs the lifespan shutdown, which drains whatever is still queued.
    """

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> None:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        # Requests cannot outlive their deadline, so waiting a little longer than it is enough.
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = DrainingServer(config, app.state.service.begin_drain)
    # uvicorn re-raises the captured signal after a graceful shutdown; with this no-op handler in place
    # that re-raise does not kill the process, so a drained shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()


def main() -> None:
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    serve(settings)


if __name__ == "__main__":
    main()
