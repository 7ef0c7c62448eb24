"""Benchmark the inference service against the raw backend and a naive FastAPI endpoint (not a test).

    python benchmarks/bench_service.py [--checkpoint PATH --variant vitae_t] [--requests 192] [--threads 0]

Exports ViTAE-T at 224 (the release's weights from ../shared/reference when present, else random weights),
then in one run measures:
  * raw backend: ONNX Runtime on already-preprocessed inputs at batch 1..max, images/s (best batch reported);
  * the service: `python -m service` in a subprocess, driven over HTTP with real JPEG photos at
    concurrency 1, 8, 32, 64 (closed loop: each client sends its next image when the last one is answered);
  * naive: a FastAPI endpoint in a subprocess that decodes, preprocesses and runs one inference per
    request on the same backend (no batching), driven the same way.
The load generator runs on the same machine as the servers, as a client on one host would.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REFERENCE = ROOT.parent / "shared" / "reference" / "vitae_t_official.safetensors"


# ------------------------------------------------------------------ inputs


def real_jpegs(count: int) -> list[bytes]:
    """Real photos shipped inside installed packages (scikit-learn, matplotlib), re-encoded at a few sizes."""
    from PIL import Image

    found = []
    for package, relative in (
        ("sklearn", "datasets/images/china.jpg"),
        ("sklearn", "datasets/images/flower.jpg"),
        ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ):
        try:
            module = __import__(package)
        except ImportError:
            continue
        path = Path(module.__file__).parent / relative
        if path.is_file():
            found.append(Image.open(path).convert("RGB"))
    if not found:
        raise SystemExit("no real JPEG photos found (install scikit-learn or matplotlib, the dev extras)")
    out = []
    for i in range(count):
        photo = found[i % len(found)]
        scale = (1.0, 0.8, 0.6, 1.25)[(i // len(found)) % 4]
        width, height = (round(side * scale) for side in photo.size)
        buffer = io.BytesIO()
        photo.resize((width, height)).save(buffer, format="JPEG", quality=85 + i % 10)
        out.append(buffer.getvalue())
    return out


def export_model(checkpoint: Path | None, variant: str, out: Path, max_batch: int) -> Path:
    import export
    from model import create_model

    if checkpoint is None or not checkpoint.is_file():
        from safetensors.torch import save_file

        print(f"{REFERENCE} not found: ViTAE-T with random weights")
        checkpoint = out.parent / "vitae_t_random.safetensors"
        model = create_model(variant)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    export.export_artifacts(checkpoint, out, variant=variant, max_batch=max_batch, precision="fp32")
    return out


# ------------------------------------------------------------------ the naive endpoint


def naive_app(artifacts: Path, threads: int):
    """One inference per request: decode, preprocess, backend.infer(batch of 1), top-5. No queue, no batching."""

    from model.preprocess import decode_image, preprocess, resize_size
    from service.artifacts import read_artifacts
    from service.backends import OnnxRuntimeBackend
    from service.postprocess import top_k

    served = read_artifacts(artifacts)
    backend = OnnxRuntimeBackend(served, gpu=False, threads=threads, int8=False)
    app = FastAPI()

    @app.post("/classify")
    async def classify(request: Request) -> dict:
        data = await request.body()

        def work() -> list:
            image = decode_image(data, target_size=resize_size(served.preprocessing))
            pixels = preprocess(image, served.preprocessing)[None]
            logits, _ = backend.infer(pixels)
            return [vars(p) for p in top_k(logits[0], served.class_names, 5)]

        return {"predictions": await run_in_threadpool(work)}

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    return app


# ------------------------------------------------------------------ measuring


def raw_backend(artifacts: Path, jpegs: list[bytes], threads: int, max_batch: int) -> dict[int, float]:
    from model.preprocess import decode_image, preprocess, resize_size
    from service.artifacts import read_artifacts
    from service.backends import OnnxRuntimeBackend

    served = read_artifacts(artifacts)
    prep = served.preprocessing
    pixels = np.stack([preprocess(decode_image(d, target_size=resize_size(prep)), prep) for d in jpegs])
    backend = OnnxRuntimeBackend(served, gpu=False, threads=threads, int8=False)
    results = {}
    for batch in sorted({1, 8, 16, max_batch}):
        x = np.concatenate([pixels] * (batch // len(pixels) + 1))[:batch]
        backend.infer(x)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < 4.0 or runs < 3:
            backend.infer(x)
            runs += 1
        results[batch] = runs * batch / (time.perf_counter() - started)
        print(f"  raw backend batch {batch:3d}: {results[batch]:7.1f} images/s")
    return results


async def drive(url: str, jpegs: list[bytes], concurrency: int, total: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    next_index = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index, errors
        while next_index < total:
            data = jpegs[next_index % len(jpegs)]
            next_index += 1
            started = time.perf_counter()
            try:
                response = await http.post("/classify", content=data, headers={"content-type": "image/jpeg"})
            except httpx.HTTPError:  # a dropped connection counts as an error, not as a latency
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            errors += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        await asyncio.gather(
            *(
                http.post("/classify", content=jpegs[0], headers={"content-type": "image/jpeg"})
                for _ in range(min(concurrency, 8))
            )
        )  # warm connections and caches
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "images_per_s": len(latencies) / elapsed,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "errors": errors,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{command} exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"{command} did not become ready; see {log}")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def measure_server(name, command, env, port, jpegs, levels, requests, log) -> dict[int, dict[str, float]]:
    process = start(command, env, port, log)
    results = {}
    try:
        for concurrency in levels:
            total = max(requests, 2 * concurrency)
            results[concurrency] = asyncio.run(drive(f"http://127.0.0.1:{port}", jpegs, concurrency, total))
            r = results[concurrency]
            print(
                f"  {name:8s} c={concurrency:3d}: {r['images_per_s']:7.1f} images/s  p50 {r['p50']:7.1f}  "
                f"p95 {r['p95']:7.1f}  p99 {r['p99']:7.1f} ms  errors {r['errors']}"
            )
    finally:
        stop(process)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REFERENCE)
    parser.add_argument("--variant", default="vitae_t")
    parser.add_argument("--out", type=Path, default=None, help="artifacts folder (default: a temporary one)")
    parser.add_argument("--requests", type=int, default=192, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument(
        "--service-max-batch",
        type=int,
        default=0,
        help="VITAE_MAX_BATCH_SIZE for the service (0: the raw backend's best batch size measured in this run)",
    )
    parser.add_argument("--max-delay-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="bench-service-"))
    artifacts = args.out or workdir / "artifacts"
    print(f"machine: {os.cpu_count()} CPU cores; exporting {args.variant} to {artifacts}")
    export_model(args.checkpoint, args.variant, artifacts, args.max_batch)
    jpegs = real_jpegs(12)
    print(f"inputs: {len(jpegs)} real JPEG photos, {min(len(j) for j in jpegs)}..{max(len(j) for j in jpegs)} bytes")

    print("raw backend (ONNX Runtime, preprocessed inputs, in process)")
    raw = raw_backend(artifacts, jpegs, args.threads, args.max_batch)
    best_batch = max(raw, key=raw.get)
    # Batches beyond the backend's best size add latency and no throughput, so that is the service's cap.
    service_batch = args.service_max_batch or best_batch

    env = os.environ | {"PYTHONPATH": str(ROOT), "VITAE_LOG_LEVEL": "warning"}
    port = free_port()
    service_env = env | {
        "VITAE_ARTIFACTS": str(artifacts),
        "VITAE_AUTO_EXPORT": "false",
        "VITAE_BACKEND": "onnxruntime",
        "VITAE_DEVICE": "cpu",
        "VITAE_HOST": "127.0.0.1",
        "VITAE_PORT": str(port),
        "VITAE_MAX_BATCH_SIZE": str(service_batch),
        "VITAE_MAX_DELAY_MS": str(args.max_delay_ms),
        "VITAE_THREADS": str(args.threads),
        "VITAE_INT8_CPU": "false",
        "VITAE_QUEUE_CAPACITY": "4096",
        "VITAE_REQUEST_TIMEOUT_S": "120",
    }
    print(f"service (python -m service, max batch {service_batch}, max delay {args.max_delay_ms} ms)")
    service = measure_server(
        "service",
        [sys.executable, "-m", "service"],
        service_env,
        port,
        jpegs,
        levels,
        args.requests,
        workdir / "service.log",
    )
    port = free_port()
    naive_command = [
        sys.executable,
        "-c",
        "import sys, uvicorn; sys.path.insert(0, 'benchmarks'); from bench_service import naive_app; "
        f"uvicorn.run(naive_app({str(artifacts)!r}, {args.threads}), host='127.0.0.1', port={port}, "
        "log_level='warning')",
    ]
    print("naive FastAPI endpoint (one inference per request)")
    naive = measure_server("naive", naive_command, env, port, jpegs, levels, args.requests, workdir / "naive.log")

    print()
    print(
        f"ViTAE-T 224, ONNX Runtime CPU, {os.cpu_count()} cores; raw backend best: "
        f"{raw[best_batch]:.1f} images/s at batch {best_batch}"
    )
    print(
        "| concurrency | service img/s | p50 ms | p95 ms | p99 ms | % of raw | naive img/s | p50 ms | p95 ms | p99 ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        s, n = service[c], naive[c]
        print(
            f"| {c} | {s['images_per_s']:.1f} | {s['p50']:.0f} | {s['p95']:.0f} | {s['p99']:.0f} | "
            f"{100 * s['images_per_s'] / raw[best_batch]:.0f}% | {n['images_per_s']:.1f} | {n['p50']:.0f} | "
            f"{n['p95']:.0f} | {n['p99']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
