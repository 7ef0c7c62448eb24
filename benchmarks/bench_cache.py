"""The response cache and the priority levels on the real service, in one run (not a test).

    python benchmarks/bench_cache.py [--checkpoint PATH] [--out ARTIFACTS] [--requests 256] [--concurrency 16]

ViTAE-T at 224 (the release's weights from ../shared/reference when present, else random weights), real JPEG
photos sent as raw image bodies to /classify by `--concurrency` closed-loop clients. Two servers, the same
settings but the cache (VITAE_CACHE_MB=64 and 0), both at one image per batch (VITAE_MAX_BATCH_SIZE=1: on CPU a
batch gains nothing, and a high-priority image then waits for one image, not for a batch of others). Printed:
  * throughput, cache on vs off: no repeats (every image new), half repeating (every other request repeats the
    one before it), all repeating (a few images, already answered once);
  * the HTTP ceiling: the rate of same-size uploads refused before decoding (415, an unaccepted content type),
    on the cache-on server; the all-repeating rate with the cache on as a share of it;
  * a trickle of high-priority requests (one at a time, --gap-s apart): p50/p99 on the idle cache-off server and
    under an overload of `--concurrency` normal-priority clients.
Each image is made unique by bytes after its JPEG end marker (decoders ignore them), so no repeat is accidental.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_service import REFERENCE, checkpoint_or_random  # noqa: E402
from harness import closed_loop, free_port, real_jpegs, service_env, start, stop  # noqa: E402
from results import add_record_option, record  # noqa: E402

GOALS = {"no repeats": (0.97, 1.03), "half repeating": (1.8, None), "all repeating": (4.0, None)}
CEILING_SHARE_GOAL = 0.7
PRIORITY_P99_GOAL = 2.0


def unique(jpegs: list[bytes], count: int, tag: str) -> list[bytes]:
    """`count` distinct uploads of the photos: each gets its own bytes after the end marker."""
    return [jpegs[i % len(jpegs)] + f"{tag}-{i}".encode() for i in range(count)]


def send_jpeg(data: bytes, content_type: str = "image/jpeg", **headers: str):
    async def send(http: httpx.AsyncClient, _: int) -> httpx.Response:
        return await http.post("/classify", content=data, headers={"content-type": content_type, **headers})

    return send


async def rate(url: str, uploads: list[bytes], concurrency: int, content_type: str = "image/jpeg") -> float:
    """Answers per second of a closed loop over `uploads` (refused answers count when the type is refused)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as http:
        loop = await closed_loop(
            http, concurrency, len(uploads), lambda h, i: send_jpeg(uploads[i], content_type)(h, i)
        )
    answered = len(loop.latencies_s) if content_type == "image/jpeg" else len(uploads)
    if content_type == "image/jpeg" and loop.errors:
        print(f"    ({loop.errors} requests not answered 200)")
    return answered / loop.elapsed_s


def throughputs(url: str, jpegs: list[bytes], args: argparse.Namespace, tag: str) -> dict[str, float]:
    count, c = args.requests, args.concurrency
    fresh = unique(jpegs, count, f"{tag}-fresh")
    half = [img for img in unique(jpegs, count // 2, f"{tag}-half") for _ in range(2)]  # each sent twice in a row
    few = unique(jpegs, 4, f"{tag}-few")
    asyncio.run(rate(url, few, 4))  # answered once: cached when the cache is on
    repeats = [few[i % len(few)] for i in range(count * (args.hit_factor if tag == "on" else 1))]
    figures = {
        "no repeats": asyncio.run(rate(url, fresh, c)),
        "half repeating": asyncio.run(rate(url, half, c)),
        "all repeating": asyncio.run(rate(url, repeats, c)),
    }
    for name, value in figures.items():
        print(f"  cache {tag:3s} {name:15s} {value:7.1f} requests/s")
    return figures


async def trickle(url: str, uploads: list[bytes], gap_s: float, overload: list[bytes] | None, c: int) -> list[float]:
    """Latencies (s) of high-priority requests sent one at a time, beside `c` normal clients when overloaded."""
    limits = httpx.Limits(max_connections=c + 1, max_keepalive_connections=c + 1)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as http:
        background = None
        if overload:
            send = lambda h, i: send_jpeg(overload[i % len(overload)], X_Priority="normal")(h, i)  # noqa: E731
            background = asyncio.create_task(closed_loop(http, c, 10**9, send))
            await asyncio.sleep(3)  # the queue fills
        latencies = []
        for data in uploads:
            started = time.perf_counter()
            answer = await send_jpeg(data, **{"X-Priority": "high"})(http, 0)
            if answer.status_code == 200:
                latencies.append(time.perf_counter() - started)
            await asyncio.sleep(gap_s)
        if background is not None:
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
    return latencies


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ms = np.array(latencies) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def serve(artifacts: Path, cache_mb: int, log: Path):
    port = free_port()
    env = service_env(artifacts, port, cache_mb=cache_mb, max_batch_size=1, request_timeout_s=120)
    return start([sys.executable, "-m", "service"], env, port, log, "/readyz"), f"http://127.0.0.1:{port}"


def measure(artifacts: Path, args: argparse.Namespace, workdir: Path) -> dict:
    jpegs = real_jpegs(12)
    print(f"uploads: {len(jpegs)} real photos, {min(map(len, jpegs)) // 1024}-{max(map(len, jpegs)) // 1024} KiB")
    figures: dict = {}
    server, url = serve(artifacts, 64, workdir / "cache_on.log")
    try:
        figures["on"] = throughputs(url, jpegs, args, "on")
        refused = unique(jpegs, args.requests * args.hit_factor, "refused")
        figures["ceiling"] = asyncio.run(rate(url, refused, args.concurrency, content_type="text/plain"))
        print(f"  HTTP ceiling (same-size uploads refused before decoding) {figures['ceiling']:7.1f} requests/s")
    finally:
        stop(server)
    server, url = serve(artifacts, 0, workdir / "cache_off.log")
    try:
        figures["off"] = throughputs(url, jpegs, args, "off")
        high = unique(jpegs, args.trickle, "high")
        figures["idle"] = percentiles(asyncio.run(trickle(url, high, args.gap_s, None, args.concurrency)))
        normal = unique(jpegs, 256, "normal")
        loaded = asyncio.run(trickle(url, unique(jpegs, args.trickle, "high2"), args.gap_s, normal, args.concurrency))
        figures["overload"] = percentiles(loaded)
    finally:
        stop(server)
    return figures


def result_rows(figures: dict) -> list[dict[str, object]]:
    """One row per ratio against its goal, as printed (benchmarks/results/cache.csv's columns)."""
    rows = []

    def add(figure: str, value: float, goal: str, met: bool) -> None:
        rows.append({"figure": figure, "value": round(value, 2), "goal": goal, "met": met})

    for name, (low, high) in GOALS.items():
        ratio = figures["on"][name] / figures["off"][name]
        goal = f"{low:g}-{high:g}x" if high else f">= {low:g}x"
        add(f"cache on / off, {name}", ratio, goal, ratio >= low and (high is None or ratio <= high))
    share = figures["on"]["all repeating"] / figures["ceiling"]
    add("all repeating / HTTP ceiling", share, f">= {CEILING_SHARE_GOAL:g}", share >= CEILING_SHARE_GOAL)
    ratio = figures["overload"][1] / figures["idle"][1]
    add("high priority p99, overload / idle", ratio, f"<= {PRIORITY_P99_GOAL:g}x", ratio <= PRIORITY_P99_GOAL)
    return rows


def report(figures: dict, rows: list[dict[str, object]]) -> None:
    (idle50, idle99), (load50, load99) = figures["idle"], figures["overload"]
    print(f"  high priority, idle:     p50 {idle50:6.0f} ms  p99 {idle99:6.0f} ms")
    print(f"  high priority, overload: p50 {load50:6.0f} ms  p99 {load99:6.0f} ms")
    print(f"\n{'figure':42s} {'value':>6s}  goal")
    for row in rows:
        print(f"{row['figure']:42s} {row['value']:6.2f}  {row['goal']:9s} {'met' if row['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=REFERENCE)
    parser.add_argument("--variant", default="vitae_t")
    parser.add_argument("--out", type=Path, default=None, help="artifacts folder to serve or export into")
    parser.add_argument("--requests", type=int, default=256, help="requests per computed workload")
    parser.add_argument(
        "--hit-factor", type=int, default=20, help="all-repeating and ceiling send this many times more"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--trickle", type=int, default=40, help="high-priority requests in each trickle")
    parser.add_argument("--gap-s", type=float, default=0.1)
    add_record_option(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        artifacts = args.out or workdir / "artifacts"
        if not (artifacts / "metadata.json").is_file():
            import export

            checkpoint = checkpoint_or_random(args.checkpoint, args.variant, workdir)
            export.export_artifacts(checkpoint, artifacts, variant=args.variant, max_batch=8, precision="fp32")
        figures = measure(artifacts, args, workdir)
    rows = result_rows(figures)
    report(figures, rows)
    record("cache", rows, args.record)


if __name__ == "__main__":
    main()
