"""Helpers the tests share (no tests here), imported as `from support.<module> import ...`.

Owns: real small checkpoints and their exported artifacts (`checkpoints`), test images (`images`),
a real uvicorn server around an app and its settings (`server`), HTTP over raw sockets (`raw_http`), headless
Chromium with no internet (`browser`). Fixtures stay in `conftest.py`.
May import: `model`, `export`, `service`, `benchmarks.harness` (a free port, the readiness poll) and third-party
test tools; never a test module.
"""
