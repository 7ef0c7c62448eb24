"""The service's threads carry kernel names, and the benchmarks' CPU split by thread role reads them."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks.harness import thread_cpu_seconds
from service.threads import name_this_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel thread names are read from /proc")


def busy_named_thread(name: str, cpu_s: float, named: threading.Event, done: threading.Event) -> None:
    name_this_thread(name)
    named.set()
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass
    done.wait(30)  # alive until the test has read its figures


@pytest.mark.parametrize(
    ("name", "kernel_name", "role"),
    [("vitae-decode-long-name", "vitae-decode-lo", "decode"), ("vitae-cam", "vitae-cam", "CAM pictures")],
)
def test_a_named_thread_shows_its_name_to_the_kernel_and_its_cpu_counts_for_its_role(name, kernel_name, role):
    named, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=busy_named_thread, args=(name, 0.3, named, done))
    before = thread_cpu_seconds(os.getpid())
    thread.start()
    try:
        assert named.wait(30)
        comm = Path(f"/proc/{os.getpid()}/task/{thread.native_id}/comm").read_text().strip()
        assert comm == kernel_name  # cut to the kernel's 15 bytes
        deadline = time.monotonic() + 30
        while thread_cpu_seconds(os.getpid())[role] - before[role] < 0.25:  # the thread spins 0.3 s of CPU
            assert time.monotonic() < deadline, f"the named thread's CPU was not counted as {role}"
            time.sleep(0.05)
    finally:
        done.set()
        thread.join()
