"""A model repository served under steady load while versions change: the poller, the control endpoint, a broken one.

Real HTTP (uvicorn in a thread), real exports of tiny checkpoints, real JPEG photos; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import httpx
import pytest
from support.checkpoints import exported
from support.server import metric, serving

from benchmarks.harness import publish_version, real_jpegs

ADMIN = {"X-Admin-Key": "swap-test-key"}
DEADLINE_S = 120


@pytest.fixture()
def repository(tmp_path, artifacts, tiny_rgb_checkpoint) -> Path:
    """Two models at version 1: `tiny` (grayscale, 10 classes) and `rgb` (5 classes)."""
    repo = tmp_path / "repo"
    (repo / "tiny").mkdir(parents=True)
    (repo / "rgb").mkdir()
    publish_version(repo, "tiny", "1", artifacts)
    publish_version(repo, "rgb", "1", exported(tiny_rgb_checkpoint))
    return repo


def serve_repository(repo: Path, artifacts: Path, **overrides):
    values = dict(model_repository=repo, default_model="tiny", model_poll_s=0.1, admin_key=ADMIN["X-Admin-Key"])
    return serving(artifacts, **(values | overrides))


async def until(condition, what: str) -> None:
    """Poll an async condition until it holds; fail naming `what` after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class Client:
    """One sequential client: its answers in order, as (status, version, sent_at)."""

    def __init__(self, http: httpx.AsyncClient, path: str, photo: bytes, v2: bool = False) -> None:
        self.http, self.path, self.photo, self.v2 = http, path, photo, v2
        self.answers: list[tuple[int, str | None, float]] = []

    async def send(self) -> tuple[int, str | None]:
        if self.v2:
            body = {
                "inputs": [
                    {
                        "name": "image_bytes",
                        "shape": [1, 1],
                        "datatype": "BYTES",
                        "data": [base64.b64encode(self.photo).decode()],
                    }
                ]
            }
            response = await self.http.post(self.path, json=body)
            return response.status_code, response.json().get("model_version")
        response = await self.http.post(self.path, files={"file": ("photo.jpg", self.photo, "image/jpeg")})
        return response.status_code, response.json().get("model", {}).get("version")

    async def run(self, stop: asyncio.Event, most: int) -> None:
        while not stop.is_set() and len(self.answers) < most:
            sent = time.monotonic()
            status, version = await self.send()
            self.answers.append((status, version, sent))

    def versions(self) -> list[str]:
        """The versions answered, each run of equal ones once: the switches this client saw."""
        runs: list[str] = []
        for _, version, _ in self.answers:
            if not runs or runs[-1] != version:
                runs.append(version)
        return runs

    def saw(self, version: str, since: float = 0.0) -> bool:
        return any(v == version and sent >= since for _, v, sent in self.answers)


async def model(http: httpx.AsyncClient, name: str) -> dict:
    listed = (await http.get("/models")).json()["models"]
    return next(m for m in listed if m["name"] == name)


async def swap_under_load(url: str, repo: Path, artifacts: Path) -> tuple[list[Client], list[Client], dict]:
    photos = real_jpegs(4)
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        tiny = [
            Client(http, "/classify?model=tiny", photos[0]),
            Client(http, "/classify", photos[1]),
            Client(http, "/v2/models/tiny/infer", photos[2], v2=True),
        ]
        rgb = [Client(http, "/v2/models/rgb/infer", photos[3], v2=True)]
        stop = asyncio.Event()
        load = asyncio.gather(*(c.run(stop, most=3000) for c in tiny + rgb))
        try:
            await until(lambda: _all(c.saw("1") for c in tiny), "every client answered by version 1")
            # 1. The poller: version 2 appears complete in the repository.
            publish_version(repo, "tiny", "2", artifacts)
            await until(lambda: _all(c.saw("2") for c in tiny), "every client answered by version 2 (the poller)")
            # 2. The control endpoint: roll back to version 1; it answers once version 1 is live again.
            loaded = await http.post("/admin/models/tiny/load", params={"version": "1"}, headers=ADMIN)
            assert loaded.status_code == 200 and loaded.json()["version"] == "1", loaded.text
            rolled_back = time.monotonic()
            await until(lambda: _all(c.saw("1", since=rolled_back) for c in tiny), "answers after the rollback")
            # 3. A broken version (model.onnx truncated) is refused; version 1 keeps answering.
            publish_version(repo, "tiny", "3", artifacts, truncate_onnx=True)
            await until(lambda: _has_failure(http, "tiny", "3"), "/models to report version 3 of tiny as refused")
            refused = time.monotonic()
            await until(
                lambda: _all(
                    [*(sum(s >= refused for *_, s in c.answers) >= 20 for c in tiny + rgb), _total(tiny + rgb) >= 400]
                ),
                "twenty answers per client after the refusal, four hundred in all",
            )
        finally:
            stop.set()
            await load
        listed = await model(http, "tiny")
        listed["metrics"] = (await http.get("/metrics")).text
    return tiny, rgb, listed


def _total(clients: list[Client]) -> int:
    return sum(len(c.answers) for c in clients)


async def _all(conditions) -> bool:
    return all(conditions)


async def _has_failure(http: httpx.AsyncClient, name: str, version: str) -> bool:
    return (await model(http, name)).get("failure", {}).get("version") == version


def test_versions_swap_under_load_with_no_failed_request(repository, artifacts):
    with serve_repository(repository, artifacts) as url:
        tiny, rgb, listed = asyncio.run(swap_under_load(url, repository, artifacts))

    answers = [a for c in tiny + rgb for a in c.answers]
    assert len(answers) >= 300, f"only {len(answers)} requests were answered"
    assert [a for a in answers if a[0] != 200] == [], "every request is answered 200"
    for client in tiny:
        # Old before each switch, new after it: 1, then 2 (poller), then 1 again (rollback), never back and forth.
        assert client.versions() == ["1", "2", "1"], f"{client.path}: {client.versions()}"
    assert all(c.versions() == ["1"] for c in rgb), "the other model is untouched by tiny's swaps"
    assert listed["version"] == "1" and listed["state"] == "ready"
    assert listed["failure"]["version"] == "3" and "model.onnx" in listed["failure"]["reason"]
    assert listed["versions"] == ["1", "2", "3"]
    assert metric(listed["metrics"], "vitae_model_loads_total", model="tiny", outcome="refused") == 1
    assert metric(listed["metrics"], "vitae_model_loads_total", model="tiny", outcome="live") == 3
