"""A real uvicorn server (lifespan on) around the service's app, its test settings, and reading its metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from benchmarks.harness import free_port  # noqa: F401  (the tests' free port is the benchmarks' one)
from benchmarks.harness import wait_ready as poll_ready
from service import create_app
from service.server import server_config
from service.settings import Settings


def settings_for(artifacts: Path, **overrides) -> Settings:
    """Settings that serve `artifacts` as they are (never export the demo checkpoint into them).

    The response cache is off unless a test turns it on (`cache_mb=...`): tests of queueing, deadlines and
    overload send the same images again and count what the backend computes.
    """
    values = dict(artifacts=artifacts, auto_export=False, backend="onnxruntime", device="cpu", threads=1)
    values |= dict(max_delay_ms=5, preprocess_threads=2, log_level="warning", cache_mb=0)
    return Settings(**(values | overrides))


class ServerThread:
    """The service's own uvicorn configuration (service.server) for one app, on a free local port, in a thread."""

    def __init__(self, app) -> None:
        self.app = app
        config = server_config(app, app.state.service.settings, host="127.0.0.1", port=0)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_ready(url: str, timeout: float = 60.0) -> dict:
    """Poll /readyz until 200 (its body) or failed/timeout (RuntimeError)."""
    return poll_ready(url, timeout=timeout, interval=0.02)


@contextmanager
def running(app, *, ready: bool = True) -> Iterator[str]:
    """Serve `app` over real HTTP for the duration of the block; yields its base URL."""
    server = ServerThread(app)
    url = server.start()
    try:
        if ready:
            wait_ready(url)
        yield url
    finally:
        server.stop()


@contextmanager
def serving(artifacts: Path, backend=None, *, ready: bool = True, **overrides) -> Iterator[str]:
    """Serve `artifacts` with `settings_for(artifacts, **overrides)`; yields the base URL."""
    with running(create_app(settings_for(artifacts, **overrides), backend=backend), ready=ready) as url:
        yield url


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus exposition (0 when absent)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(w in line for w in wanted):
                return float(line.rsplit(" ", 1)[1])
    return 0.0
