"""The benchmarks' readiness poll gives up, and says why, instead of waiting on a server that is gone or silent."""

from __future__ import annotations

import pytest

from benchmarks.harness import ServerNotReady, free_port, wait_ready


def test_the_readiness_poll_stops_when_the_server_has_exited():
    with pytest.raises(ServerNotReady, match="exited"):
        wait_ready(f"http://127.0.0.1:{free_port()}", timeout=60, exited=lambda: True)


def test_the_readiness_poll_stops_at_its_deadline_and_names_what_it_last_saw():
    with pytest.raises(ServerNotReady, match="did not become ready in 0.2 s .*ConnectError"):
        wait_ready(f"http://127.0.0.1:{free_port()}", timeout=0.2, interval=0.05)
