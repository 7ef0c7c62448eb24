"""Resident memory of the service before, during and after version swaps under load (not a test).

A model repository of the demo model (exported once into a temporary folder, then published as versions 1..N),
served by `python -m service` with the control endpoint on; clients keep sending /classify while the control endpoint
puts each version live in turn (the last swap rolls back to version 1). The server's VmRSS is sampled every 20 ms:
the figure before the first swap, the peak during each swap (two versions loaded), and after each (the old one
closed). Goal: after each swap, RSS within --margin-mb of its level before the first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import free_port, publish_version, real_jpegs, service_env, start, stop  # noqa: E402
from soak import rss_mb  # noqa: E402

DEMO = ROOT / "demo" / "model" / "vitae_fmnist.safetensors"
KEY = "bench-swap"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--versions", type=int, default=3, help="versions published (swaps: one per version after 1)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients sending /classify throughout")
    parser.add_argument("--backend", default="onnxruntime", help="VITAE_BACKEND of the server")
    parser.add_argument("--margin-mb", type=float, default=25.0, help="allowed RSS growth after the swaps, MB")
    return parser.parse_args()


class Sampler(threading.Thread):
    """The server's RSS every 20 ms; `peak_since(t)` the largest sample since a time."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.running = pid, [], True

    def run(self) -> None:
        while self.running:
            self.samples.append((time.monotonic(), rss_mb(self.pid)))
            time.sleep(0.02)

    def peak_since(self, since: float) -> float:
        return max(rss for t, rss in self.samples if t >= since)


def load(url: str, photo: bytes, stop_event: threading.Event, statuses: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop_event.is_set():
            statuses.append(http.post("/classify", files={"file": ("p.jpg", photo, "image/jpeg")}).status_code)


def main() -> None:
    args = parse_args()
    import export  # the export pipeline only for building the repository

    with tempfile.TemporaryDirectory() as tmp:
        repo, built = Path(tmp) / "repo", Path(tmp) / "built"
        export.export_artifacts(DEMO, built, max_batch=8)
        (repo / "vitae").mkdir(parents=True)
        for version in range(1, args.versions + 1):
            publish_version(repo, "vitae", str(version), built)
        port = free_port()
        env = service_env(built, port, model_repository=repo, admin_key=KEY, model_poll_s=0, backend=args.backend)
        server = start([sys.executable, "-m", "service"], env, port, Path(tmp) / "server.log", "/readyz", timeout=300)
        try:
            measure(f"http://127.0.0.1:{port}", server.pid, args)
        finally:
            stop(server)


def measure(url: str, pid: int, args: argparse.Namespace) -> None:
    sampler, stop_event, statuses = Sampler(pid), threading.Event(), []
    sampler.start()
    clients = [threading.Thread(target=load, args=(url, p, stop_event, statuses)) for p in real_jpegs(args.clients)]
    for client in clients:
        client.start()
    time.sleep(5)  # a warmed-up steady state to compare with
    before = rss_mb(pid)
    print(f"RSS before the swaps: {before:.1f} MB (version 1 live, {args.clients} clients)")
    print(f"{'swap':>10} {'peak during (MB)':>17} {'after (MB)':>11} {'after - before':>15}")
    worst = 0.0
    for version in [*range(2, args.versions + 1), 1]:
        started = time.monotonic()
        answer = httpx.post(
            f"{url}/admin/models/vitae/load", params={"version": version}, headers={"X-Admin-Key": KEY}, timeout=300
        )
        answer.raise_for_status()
        time.sleep(2)  # requests on the new version only; the old one is closed
        after = rss_mb(pid)
        worst = max(worst, after - before)
        print(f"{'-> ' + str(version):>10} {sampler.peak_since(started):17.1f} {after:11.1f} {after - before:+15.1f}")
    stop_event.set()
    for client in clients:
        client.join()
    sampler.running = False
    failed = sum(status != 200 for status in statuses)
    print(f"requests: {len(statuses)}, not 200: {failed}")
    verdict = "met" if worst <= args.margin_mb else "NOT met"
    print(f"goal (RSS after each swap within {args.margin_mb:g} MB of before): {verdict} (worst {worst:+.1f} MB)")


if __name__ == "__main__":
    main()
