"""Container health check: exit 0 when the service answers 200 on /readyz, 1 otherwise.

The images have no curl (python:*-slim, CUDA runtime), so this uses the standard library only. `/readyz`
turns 200 once the model is loaded and warmed up, which on a GPU includes building the TensorRT engine.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARD_ADDRESSES = {"", "0.0.0.0", "::"}


def readyz_url() -> str:
    """The /readyz URL of the service in this container, from the same VITAE_HOST/VITAE_PORT it binds."""
    host = os.environ.get("VITAE_HOST", "")
    host = "127.0.0.1" if host in WILDCARD_ADDRESSES else host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{os.environ.get('VITAE_PORT', '8000')}/readyz"


def main() -> int:
    url = readyz_url()
    # No proxies: an HTTP(S)_PROXY set for the build or the app must not swallow a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (503 while warming up) is a URLError
        print(f"not ready: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
