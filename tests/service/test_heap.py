"""The loaded model's objects frozen out of garbage collection, and a retired version's objects still collected.

Real server (uvicorn in a thread) over a real model repository; the swap goes through the control endpoint.
"""

from __future__ import annotations

import gc
import weakref

import httpx
import pytest
from support.server import running, settings_for

from benchmarks.harness import publish_version, real_jpegs
from service import create_app, heap

ADMIN = {"X-Admin-Key": "heap-test-key"}


class Node:
    """A reference cycle: only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_settle_collects_what_an_earlier_settle_froze():
    node = Node()
    gone = weakref.ref(node)
    assert heap.settle() > 0
    del node
    gc.collect()
    assert gone() is not None, "a frozen cycle is left out of collections"
    heap.settle()
    assert gone() is None, "the next settle unfreezes, collects and frees it"
    heap.release()
    assert gc.get_freeze_count() == 0


def test_a_swapped_out_version_is_collected_and_shutdown_unfreezes(tmp_path, artifacts):
    repo = tmp_path / "repo"
    (repo / "tiny").mkdir(parents=True)
    publish_version(repo, "tiny", "1", artifacts)
    settings = settings_for(artifacts, model_repository=repo, default_model="tiny", admin_key=ADMIN["X-Admin-Key"])
    app = create_app(settings)
    with running(app) as url:
        assert gc.get_freeze_count() > 0, "the loaded model's objects are frozen before READY"
        runtime = app.state.service.models.entries["tiny"].live.runtime
        first, runtime.cycle = weakref.ref(runtime), Node()  # a cycle of version 1's, frozen with it
        cycle = weakref.ref(runtime.cycle)
        del runtime
        heap.settle()
        publish_version(repo, "tiny", "2", artifacts)
        loaded = httpx.post(f"{url}/admin/models/tiny/load", params={"version": "2"}, headers=ADMIN, timeout=60)
        assert loaded.status_code == 200 and loaded.json()["version"] == "2", loaded.text
        assert first() is None, "version 1's runtime is freed once version 2 is live"
        assert cycle() is None, "and so are its reference cycles: the swap unfroze and collected them"
        assert gc.get_freeze_count() > 0
        photo = real_jpegs(1)[0]
        answer = httpx.post(f"{url}/classify", files={"file": ("a.jpg", photo, "image/jpeg")}, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "2", answer.text
    assert gc.get_freeze_count() == 0, "a stopped service gives its objects back to the collector"
