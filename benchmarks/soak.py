"""Soak the service with mixed traffic for N minutes; print its RSS over time and the count of 5xx (not a test).

    python benchmarks/soak.py [--minutes 5] [--clients 6] [--checkpoint demo/model/vitae_fmnist.safetensors]

Starts `python -m service` in a subprocess (ONNX Runtime on CPU, the checkpoint exported into a temporary
folder) and drives it from `--clients` threads, each sending one request after another, drawn from a fixed
mix: single images, several images in one request, CAM requests (some on a 6000x4000 image, drawn within
VITAE_CAM_MAX_SIDE), CAM at an earlier cell, and bad inputs (not an image, a truncated PNG, a decompression
bomb, a wrong content type, a bad parameter, a client gone mid-upload). Every `--sample-s` seconds it prints
the server's resident memory (VmRSS from /proc) and the answers so far.

Goal: RSS flat after the warm-up (the mean of the last third of the samples after `--warmup-s` within ±5 % of the
mean of the first third: single samples swing with the requests in flight) and 0 5xx.
"""

from __future__ import annotations

import argparse
import collections
import io
import random
import socket
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import free_port, service_env, start, stop  # noqa: E402
from results import add_record_option, record  # noqa: E402


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def inputs() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    samples = sorted((ROOT / "demo" / "samples").glob("*.png"))
    pictures = [path.read_bytes() for path in samples[:8]]
    while len(pictures) < 8:
        pictures.append(encode(Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)), "PNG"))
    photo = Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8))
    bomb = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR claims 100000x100000 pixels
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")
    return {
        **{f"picture{i}": data for i, data in enumerate(pictures)},
        "photo": encode(photo, "JPEG"),
        "huge": encode(Image.new("L", (6000, 4000), 90), "PNG"),
        "truncated": pictures[0][: len(pictures[0]) // 2],
        "bomb": bytes(bomb),
        "text": b"this is not an image" * 20,
    }


class Traffic:
    """The request mix; each call sends one request and returns its status (0: a deliberate disconnect)."""

    def __init__(self, url: str, data: dict[str, bytes]) -> None:
        self.url, self.data = url, data
        self.client = httpx.Client(base_url=url, timeout=120)
        pictures = [v for k, v in data.items() if k.startswith("picture")]
        self.mix = [
            (40, lambda: self.files([random.choice(pictures)])),
            (15, lambda: self.files(random.sample(pictures, 4))),
            (12, lambda: self.files([random.choice(pictures)], cam="true")),
            (6, lambda: self.files([data["photo"]], cam="true")),
            (2, lambda: self.files([data["huge"]], cam="true")),
            (4, lambda: self.files([random.choice(pictures)], cam="true", cam_layer="0")),
            (4, lambda: self.files([data["photo"], data["truncated"], random.choice(pictures)])),
            (3, lambda: self.files([data["bomb"]])),
            (3, lambda: self.files([data["text"]])),
            (
                3,
                lambda: self.client.post("/classify", content=b"x", headers={"content-type": "text/plain"}).status_code,
            ),
            (3, lambda: self.files([random.choice(pictures)], top_k="0")),
            (5, self.gone_mid_upload),
        ]
        self.weights = [weight for weight, _ in self.mix]

    def files(self, images: list[bytes], **params: str) -> int:
        parts = [("file", (f"i{i}", image, "application/octet-stream")) for i, image in enumerate(images)]
        return self.client.post("/classify", files=parts, params=params).status_code

    def gone_mid_upload(self) -> int:
        body = self.data["photo"]
        head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
        host, port = self.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head.encode() + body[: len(body) // 3])
            time.sleep(0.05)
        return 0

    def one(self) -> int:
        _, send = random.choices(self.mix, weights=self.weights)[0]
        return send()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Soak:
    """What a soak saw: every answer's status (0: a deliberate disconnect, -1: a client-side transport error) and
    the server's RSS samples after the warm-up."""

    minutes: float
    statuses: collections.Counter[int]
    rss_after_warmup_mb: list[float]

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    @property
    def drift(self) -> float:
        """Mean RSS of the last third of the samples over that of the first third, minus one."""
        third = max(1, len(self.rss_after_warmup_mb) // 3)
        early, late = np.mean(self.rss_after_warmup_mb[:third]), np.mean(self.rss_after_warmup_mb[-third:])
        return float((late - early) / early)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--sample-s", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=30.0)
    parser.add_argument("--log", type=Path, default=Path("soak-service.log"), help="the service's output")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "demo" / "model" / "vitae_fmnist.safetensors")
    add_record_option(parser)
    args = parser.parse_args()

    random.seed(0)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = service_env(
            Path(tmp) / "artifacts",
            port,
            auto_export="true",
            checkpoint=args.checkpoint,
            backend="onnxruntime",
            device="cpu",
            drain_grace_s=0,
        )
        server = start([sys.executable, "-m", "service"], env, port, args.log, "/readyz", timeout=300)
        try:
            soak = run(f"http://127.0.0.1:{port}", server.pid, args)
        finally:
            stop(server)
            tracebacks = args.log.read_text().count("Traceback")
            print(f"service exit status {server.returncode}; tracebacks in its log ({args.log}): {tracebacks}")
    report(soak)
    record("soak", result_rows(soak), args.record)


def run(url: str, pid: int, args: argparse.Namespace) -> Soak:
    data = inputs()
    statuses: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        traffic = Traffic(url, data)
        while not stop.is_set():
            try:
                status = traffic.one()
            except (httpx.HTTPError, OSError) as exc:
                status = -1
                print(f"client error: {type(exc).__name__}: {exc}", flush=True)
            with lock:
                statuses[status] += 1

    print(f"soak: {args.minutes:g} min, {args.clients} clients, service pid {pid}, RSS at start {rss_mb(pid):.1f} MB")
    print(f"{'t (s)':>7} {'RSS (MB)':>9} {'requests':>9} {'5xx':>5}  statuses")
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    samples: list[tuple[float, float]] = []
    while (elapsed := time.monotonic() - started) < args.minutes * 60:
        time.sleep(min(args.sample_s, max(0.0, args.minutes * 60 - elapsed)))
        elapsed = time.monotonic() - started
        rss = rss_mb(pid)
        samples.append((elapsed, rss))
        with lock:
            total, errors = sum(statuses.values()), sum(n for s, n in statuses.items() if s >= 500)
            shown = dict(sorted(statuses.items()))
        print(f"{elapsed:7.0f} {rss:9.1f} {total:9d} {errors:5d}  {shown}", flush=True)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    return Soak(args.minutes, statuses, [rss for t, rss in samples if t >= args.warmup_s])


def report(soak: Soak) -> None:
    statuses, after_warmup = soak.statuses, soak.rss_after_warmup_mb
    third = max(1, len(after_warmup) // 3)
    early, late = np.mean(after_warmup[:third]), np.mean(after_warmup[-third:])
    print(f"\nrequests: {sum(statuses.values())} ({dict(sorted(statuses.items()))}; 0 = a deliberate disconnect)")
    print(f"5xx: {soak.errors}; client-side transport errors: {statuses.get(-1, 0)}")
    print(
        f"RSS after warm-up ({len(after_warmup)} samples): "
        f"min {min(after_warmup):.1f}, max {max(after_warmup):.1f} MB; "
        f"mean of the first third {early:.1f} MB, of the last third {late:.1f} MB ({soak.drift:+.1%})"
    )
    print(f"goal (flat ±5 %, 0 5xx): {'met' if abs(soak.drift) <= 0.05 and soak.errors == 0 else 'NOT met'}")


def result_rows(soak: Soak) -> list[dict[str, object]]:
    """The summary as one row (benchmarks/results/soak.csv's columns)."""
    answered = [f"{n:,} × {status}" for status, n in sorted(soak.statuses.items()) if status > 0]
    if soak.statuses.get(0):
        answered.append(f"{soak.statuses[0]:,} deliberate disconnects")
    if soak.statuses.get(-1):
        answered.append(f"{soak.statuses[-1]:,} client-side transport errors")
    rss = soak.rss_after_warmup_mb
    return [
        {
            "minutes": soak.minutes,
            "requests": sum(soak.statuses.values()),
            "status_counts": ", ".join(answered),
            "responses_5xx": soak.errors,
            "rss_mb_after_first_minute": f"{min(rss):.1f}–{max(rss):.1f}",
            "rss_drift_percent": f"{100 * soak.drift:+.1f}",
        }
    ]


if __name__ == "__main__":
    main()
