"""OS-level names for the service's own threads, so that `top -H`, /proc and profilers tell them apart.

Python (before 3.14) names its threads only for itself; the kernel sees every thread as "python". The decode pool,
the CAM pool and the batchers' workers name themselves `vitae-<role>` when they start (Linux, at most 15 bytes);
the event loop is the main thread, and threads a runtime starts (OpenVINO's, ONNX Runtime's) keep the name of the
thread that started them. `benchmarks/bench_service.py` reads these names to split the server's CPU by role.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

PR_SET_NAME = 15  # prctl(2)
MAX_NAME_BYTES = 15


def name_this_thread(name: str) -> None:
    """Give the calling thread `name` (cut to 15 bytes) as the kernel shows it; does nothing off Linux."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(PR_SET_NAME, name.encode()[:MAX_NAME_BYTES], 0, 0, 0)
    except (OSError, AttributeError):  # no libc to call: the thread keeps its name
        pass
