"""The response cache and the priority levels on the real service, in one run (not a test).

    python benchmarks/bench_cache.py [--checkpoint PATH] [--out ARTIFACTS] [--requests 512] [--concurrency 16]

ViTAE-T at 224 (the release's weights from ../shared/reference when present, else random weights), real JPEG
photos sent as raw image bodies to /classify by `--concurrency` closed-loop clients. Two servers, the same
settings but the cache (VITAE_CACHE_MB=64 and 0), both at one image per batch (VITAE_MAX_BATCH_SIZE=1: on CPU a
batch gains nothing, and a high-priority image then waits for one image, not for a batch of others). Printed:
  * throughput, cache on vs off: no repeats (every image new), half repeating (every other request repeats the
    one before it), all repeating (a few images, already answered once); each workload alternates between the
    two servers in four rounds, the order reversed each round, so the machine's drift weighs on both alike;
  * the HTTP ceiling: the rate of same-size uploads refused before decoding (415, an unaccepted content type),
    on the cache-on server; the all-repeating rate with the cache on as a share of it;
  * a trickle of `--trickle` high-priority requests (one at a time, --gap-s apart): p50/p99 on the idle cache-off
    server and under an overload of `--concurrency` normal-priority clients, alternating in four rounds; these
    clients are bare HTTP/1.1 connections (httpx's own CPU would compete with the server for the two cores).
Each image is made unique by bytes after its JPEG end marker (decoders ignore them), so no repeat is accidental.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_service import REFERENCE, checkpoint_or_random  # noqa: E402
from harness import (  # noqa: E402
    LeanConnection,
    closed_loop,
    free_port,
    lean_closed_loop,
    real_jpegs,
    service_env,
    start,
    stop,
)
from results import add_record_option, record  # noqa: E402

GOALS = {"no repeats": (0.97, 1.03), "half repeating": (1.8, None), "all repeating": (4.0, None)}
CEILING_SHARE_GOAL = 0.7
PRIORITY_P99_GOAL = 2.0
WORKLOADS = ("no repeats", "half repeating", "all repeating")
ROUNDS = 4  # each workload alternates between the servers, and the trickle between idle and overload


def unique(jpegs: list[bytes], count: int, tag: str) -> list[bytes]:
    """`count` distinct uploads of the photos: each gets its own bytes after the end marker."""
    return [jpegs[i % len(jpegs)] + f"{tag}-{i}".encode() for i in range(count)]


def send_jpeg(data: bytes, content_type: str = "image/jpeg", **headers: str):
    async def send(http: httpx.AsyncClient, _: int) -> httpx.Response:
        return await http.post("/classify", content=data, headers={"content-type": content_type, **headers})

    return send


async def rate(url: str, uploads: list[bytes], concurrency: int, content_type: str = "image/jpeg") -> tuple[int, float]:
    """A closed loop over `uploads`: (answers, seconds). Refused answers count when the type is one the server
    refuses (the HTTP ceiling)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as http:
        loop = await closed_loop(
            http, concurrency, len(uploads), lambda h, i: send_jpeg(uploads[i], content_type)(h, i)
        )
    if content_type == "image/jpeg" and loop.errors:
        print(f"    ({loop.errors} requests not answered 200)")
    answered = len(loop.latencies_s) if content_type == "image/jpeg" else len(uploads)
    return answered, loop.elapsed_s


def workload(name: str, jpegs: list[bytes], count: int, tag: str, few: list[bytes]) -> list[bytes]:
    if name == "no repeats":  # every image new
        return unique(jpegs, count, f"{tag}-fresh")
    if name == "half repeating":  # each sent twice in a row
        return [img for img in unique(jpegs, count // 2, f"{tag}-half") for _ in range(2)]
    return [few[i % len(few)] for i in range(count)]  # a few images, answered before


def throughputs(servers: dict[str, Server], jpegs: list[bytes], args: argparse.Namespace) -> dict[str, dict]:
    """Requests/s of each workload on each server. The workloads alternate between the servers in ROUNDS rounds,
    the order reversed each round, so the machine's drift (±15 % within minutes) weighs on both alike; a rate is
    the answers of all rounds over their time. The cache-on server's all-repeating load is `--hit-factor` larger."""
    count = args.requests // ROUNDS
    few = {tag: unique(jpegs, 4, f"{tag}-few") for tag in servers}
    for tag, server in servers.items():
        asyncio.run(rate(server.url, few[tag], 4))  # answered once: cached when the cache is on
    answered = {tag: dict.fromkeys(WORKLOADS, 0) for tag in servers}
    seconds = {tag: dict.fromkeys(WORKLOADS, 0.0) for tag in servers}
    for round_ in range(ROUNDS):
        order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
        for name in WORKLOADS:
            for tag in order:
                n = count * (args.hit_factor if tag == "on" and name == "all repeating" else 1)
                uploads = workload(name, jpegs, n, f"{tag}{round_}", few[tag])
                n, elapsed_s = asyncio.run(rate(servers[tag].url, uploads, args.concurrency))
                answered[tag][name] += n
                seconds[tag][name] += elapsed_s
    figures = {tag: {name: answered[tag][name] / seconds[tag][name] for name in WORKLOADS} for tag in servers}
    for tag in servers:
        for name, value in figures[tag].items():
            print(f"  cache {tag:3s} {name:15s} {value:7.1f} requests/s")
    return figures


async def trickle(
    server: Server, uploads: list[bytes], gap_s: float, overload: list[bytes] | None, c: int
) -> list[float]:
    """Latencies (s) of high-priority requests sent one at a time, beside `c` normal clients when overloaded.

    Both use bare HTTP/1.1 connections (harness.LeanConnection): httpx would take ~5 ms of the server's two cores
    per request, and the figure would measure the load generator's contention rather than the scheduling."""
    background = None
    if overload:
        normal = {"content-type": "image/jpeg", "x-priority": "normal"}
        prepared = lambda i: ("POST", "/classify", normal, overload[i % len(overload)])  # noqa: E731
        background = asyncio.create_task(lean_closed_loop("127.0.0.1", server.port, c, 10**9, prepared))
        await asyncio.sleep(3)  # the queue fills
    connection = LeanConnection("127.0.0.1", server.port)
    latencies = []
    try:
        for data in uploads:
            started = time.perf_counter()
            status, _ = await connection.request(
                "POST", "/classify", {"content-type": "image/jpeg", "x-priority": "high"}, data
            )
            if status == 200:
                latencies.append(time.perf_counter() - started)
            await asyncio.sleep(gap_s)
    finally:
        connection.close()
        if background is not None:
            background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await background
    return latencies


def priorities(server: Server, jpegs: list[bytes], args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """p50/p99 of the high-priority trickle, idle and overloaded, alternating in ROUNDS rounds."""
    latencies: dict[str, list[float]] = {"idle": [], "overload": []}
    normal = unique(jpegs, 256, "normal")
    per_round = max(1, args.trickle // ROUNDS)
    for round_ in range(ROUNDS):
        for state in ("idle", "overload"):
            high = unique(jpegs, per_round, f"high-{state}-{round_}")
            load = normal if state == "overload" else None
            latencies[state] += asyncio.run(trickle(server, high, args.gap_s, load, args.concurrency))
    return {state: percentiles(values) for state, values in latencies.items()}


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ms = np.array(latencies) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def serve(artifacts: Path, cache_mb: int, log: Path) -> Server:
    port = free_port()
    env = service_env(artifacts, port, cache_mb=cache_mb, max_batch_size=1, request_timeout_s=120)
    return Server(start([sys.executable, "-m", "service"], env, port, log, "/readyz"), port)


def measure(artifacts: Path, args: argparse.Namespace, workdir: Path) -> dict:
    jpegs = real_jpegs(12)
    print(f"uploads: {len(jpegs)} real photos, {min(map(len, jpegs)) // 1024}-{max(map(len, jpegs)) // 1024} KiB")
    servers: dict[str, Server] = {}
    try:
        servers["on"] = serve(artifacts, 64, workdir / "cache_on.log")
        servers["off"] = serve(artifacts, 0, workdir / "cache_off.log")
        figures: dict = throughputs(servers, jpegs, args)
        refused = unique(jpegs, args.requests * args.hit_factor, "refused")
        n, elapsed_s = asyncio.run(rate(servers["on"].url, refused, args.concurrency, content_type="text/plain"))
        figures["ceiling"] = n / elapsed_s
        print(f"  HTTP ceiling (same-size uploads refused before decoding) {figures['ceiling']:7.1f} requests/s")
        stop(servers.pop("on").process)  # idle, but its threads would share the cores with the trickle
        figures |= priorities(servers["off"], jpegs, args)
    finally:
        for server in servers.values():
            stop(server.process)
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
    parser.add_argument("--requests", type=int, default=512, help="requests per computed workload")
    parser.add_argument(
        "--hit-factor", type=int, default=20, help="all-repeating and ceiling send this many times more"
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--trickle", type=int, default=100, help="high-priority requests, idle and overloaded each")
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
