"""What tracing costs: ViTAE-T over HTTP with tracing off and on (every request sampled), in one run (not a test).

    python benchmarks/bench_tracing.py [--requests 192] [--concurrency 16] [--rounds 3] [--trace-image PATH]

Exports ViTAE-T at 224 (the release's weights from ../shared/reference when present, else random weights), then
starts `python -m service` (backend auto) once per mode and round, off and on alternately so that drift on a shared
machine hits both alike: off is OTEL_TRACES_EXPORTER=none, on exports every request's spans over OTLP/HTTP to a
real receiver in this process (benchmarks/otlp_receiver.py), with the SDK's default batch span processor. Each
measurement is a closed loop of real JPEG photos to /classify (bench_service.measure); the report gives the median
images/s of each mode, their ratio against the goal (on within 5 % of off), the spans received and dropped.
`--trace-image` also draws one batched request's trace, from the spans received, as a PNG (docs/serving/tracing.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_service import REFERENCE, checkpoint_or_random, measure, raw_jpeg  # noqa: E402
from harness import free_port, metric_total, real_jpegs, service_env, start, stop  # noqa: E402
from otlp_receiver import OtlpReceiver, tracing_env  # noqa: E402
from results import add_record_option, record  # noqa: E402

GOAL = 0.95  # tracing on, every request sampled: at least this share of the throughput with tracing off
MODES = ("off", "on")


def measure_mode(mode: str, artifacts: Path, jpegs: list[bytes], args, receiver: OtlpReceiver, log: Path) -> dict:
    """One `python -m service` with tracing `mode`, under the closed loop; drive()'s figures and dropped spans."""
    port = free_port()
    env = service_env(artifacts, port, backend="auto", device="cpu", max_delay_ms=10, request_timeout_s=300)
    # The response cache off: the photos repeat, and a cached answer would measure neither inference nor its spans.
    env |= {"VITAE_QUEUE_CAPACITY": "4096", "VITAE_CACHE_MB": "0", "OTEL_TRACES_EXPORTER": "none"}
    if mode == "on":
        env |= tracing_env(receiver.endpoint)
        del env["OTEL_BSP_SCHEDULE_DELAY"]  # the SDK's default schedule, as a deployment would run it
    url, total = f"http://127.0.0.1:{port}", max(args.requests, 2 * args.concurrency)
    process = start([sys.executable, "-m", "service"], env, port, log, "/readyz")
    try:
        figures = measure(f"tracing {mode}", url, jpegs, args.concurrency, total, raw_jpeg("/classify"), process)
        dropped = metric_total(url, "vitae_trace_spans_dropped_total")
        if dropped is None:
            raise RuntimeError(f"the service at {url} answered no /metrics")
    finally:
        stop(process)  # the lifespan flushes the spans still queued
    return figures | {"spans_dropped": dropped}


def report(runs: dict[str, list[dict]], spans: int) -> dict[str, float]:
    medians = {mode: statistics.median(r["images_per_s"] for r in runs[mode]) for mode in MODES}
    ratio = medians["on"] / medians["off"]
    for mode in MODES:
        rounds = ", ".join(f"{r['images_per_s']:.1f}" for r in runs[mode])
        print(f"tracing {mode:3s}: median {medians[mode]:6.1f} images/s (rounds: {rounds})")
    verdict = "meets" if ratio >= GOAL else "misses"
    print(f"tracing on / off: {ratio:.3f} ({verdict} the goal of >= {GOAL}); {spans} spans received")
    # The server's CPU time per image is the steadier figure on a shared machine, where throughput drifts.
    cpu = {mode: statistics.median(r["cpu_ms_per_image"] for r in runs[mode]) for mode in MODES}
    print(f"server CPU per image: off {cpu['off']:.1f} ms, on {cpu['on']:.1f} ms ({cpu['on'] / cpu['off']:.3f})")
    return medians


def result_rows(runs: dict[str, list[dict]], clients: int, spans: int) -> list[dict[str, object]]:
    """One row per mode: median images/s and latency over the rounds, the ratio to off, the spans."""
    off = statistics.median(r["images_per_s"] for r in runs["off"])
    rows = []
    for mode in MODES:
        figures = runs[mode]
        rate = statistics.median(r["images_per_s"] for r in figures)
        rows.append(
            {
                "tracing": "on, every request sampled" if mode == "on" else "off",
                "clients": clients,
                "rounds": len(figures),
                "images_per_s": round(rate, 2),
                "vs_off": round(rate / off, 3),
                "p50_ms": round(statistics.median(r["p50"] for r in figures), 1),
                "p95_ms": round(statistics.median(r["p95"] for r in figures), 1),
                "server_cpu_ms_per_image": round(statistics.median(r["cpu_ms_per_image"] for r in figures), 1),
                "spans_received": spans if mode == "on" else 0,
                "spans_dropped": int(sum(r["spans_dropped"] for r in figures)),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REFERENCE)
    parser.add_argument("--variant", default="vitae_t")
    parser.add_argument("--requests", type=int, default=192, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="measurements per mode, off and on alternately")
    parser.add_argument("--trace-image", type=Path, default=None, help="draw one batched request's trace here")
    add_record_option(parser)
    args = parser.parse_args(argv)

    import export

    workdir = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    artifacts = workdir / "artifacts"
    checkpoint = checkpoint_or_random(args.checkpoint, args.variant, workdir)
    export.export_artifacts(checkpoint, artifacts, variant=args.variant, max_batch=32, precision="fp32")
    jpegs = real_jpegs(12)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with OtlpReceiver() as receiver:
        for round_ in range(args.rounds):
            for mode in MODES:
                log = workdir / f"service-{mode}-{round_}.log"
                runs[mode].append(measure_mode(mode, artifacts, jpegs, args, receiver, log))
        spans = receiver.snapshot()
    report(runs, len(spans))
    if args.trace_image:
        from trace_image import draw_batched_trace

        draw_batched_trace(spans, args.trace_image)
        print(f"one batched request's trace drawn in {args.trace_image}")
    record("tracing", result_rows(runs, args.concurrency, len(spans)), args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
