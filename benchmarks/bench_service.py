"""The service against its own engine and against what a user gets without it, in one run (not a test).

    python benchmarks/bench_service.py [--checkpoint PATH --variant vitae_t] [--requests 384] [--concurrency 32]

Exports ViTAE-T at 224 with this project (the release's weights from ../shared/reference when present, else
random weights), and separately with a plain `torch.onnx.export` of the same weights. Then, with real JPEG
photos (400-800 px) at `--concurrency` closed-loop clients (each sends its next image when the last one is
answered), it measures:
  * raw engine: the backend the service picks (`auto`: OpenVINO, bf16 where safe) on preprocessed inputs,
    batch 1..max, median of 3 interleaved rounds, best batch reported; ONNX Runtime fp32 likewise for reference;
  * the service (`python -m service`), with cam=false and with cam=true;
  * naive: the plain export in ONNX Runtime behind a FastAPI endpoint, one `session.run` per request;
  * LitServe: the plain export in ONNX Runtime behind LitServe with its batching (pip extra `bench`).
and prints the ratios against the goals. Servers and load generator share the machine, as on one host;
on a shared machine absolute figures drift between runs, so compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

try:
    import litserve as ls
except ImportError:  # the `bench` extra is not installed: the LitServe baseline is skipped
    ls = None

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import closed_loop, cpu_seconds, free_port, real_jpegs, service_env, start, stop  # noqa: E402
from results import add_record_option, record  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference" / "vitae_t_official.safetensors"
GOALS = {  # what the service must reach, as a multiple of each baseline
    "service / naive endpoint": 1.5,
    "service / LitServe": 1.7,
    "service / its raw engine": 0.90,
    "service cam=true / cam=false": 0.90,
}


# ------------------------------------------------------------------ inputs


def checkpoint_or_random(checkpoint: Path | None, variant: str, workdir: Path) -> Path:
    if checkpoint is not None and checkpoint.is_file():
        return checkpoint
    from safetensors.torch import save_file

    from model import create_model

    print(f"{checkpoint} not found: {variant} with random weights")
    path = workdir / f"{variant}_random.safetensors"
    save_file({k: v.contiguous() for k, v in create_model(variant).state_dict().items()}, str(path))
    return path


def plain_export(artifacts: Path, out: Path) -> Path:
    """What a user writes without this project: the model as loaded (BatchNorm unfolded), torch.onnx.export
    with a dynamic batch and the exporter's defaults; the outputs are the logits only."""
    import torch

    from model import ViTAE, load_weights
    from service.artifacts import read_artifacts

    served = read_artifacts(artifacts)
    model = load_weights(ViTAE(served.metadata.model_config()), served.file("weights")).eval()
    prep = served.preprocessing
    example = torch.zeros(1, prep.in_chans, prep.img_size, prep.img_size)
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter, torch's default, needs it)

        dynamo = True
    except ImportError:
        dynamo = False
    torch.onnx.export(
        model,
        (example,),
        str(out),
        dynamo=dynamo,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
    )
    print(f"plain export: torch.onnx.export(dynamo={dynamo}) -> {out.name}")
    return out


def preprocessed(artifacts: Path, jpegs: list[bytes]) -> np.ndarray:
    from model.preprocess import decode_image, preprocess, resize_size
    from service.artifacts import read_artifacts

    prep = read_artifacts(artifacts).preprocessing
    return np.stack([preprocess(decode_image(d, target_size=resize_size(prep)), prep) for d in jpegs])


# ------------------------------------------------------------------ the baselines' servers


def naive_app(artifacts: str, plain_onnx: str):
    """One `session.run` per request on the plain export: decode, preprocess, infer, top-5. No batching."""
    import onnxruntime as ort

    from model.preprocess import decode_image, preprocess, resize_size
    from service.artifacts import read_artifacts
    from service.postprocess import top_k

    served = read_artifacts(Path(artifacts))
    session = ort.InferenceSession(plain_onnx, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/classify")
    async def classify(request: Request) -> dict:
        data = await request.body()

        def work() -> list:
            image = decode_image(data, target_size=resize_size(served.preprocessing))
            pixels = preprocess(image, served.preprocessing)[None]  # (1, C, S, S)
            (logits,) = session.run(["logits"], {"images": pixels})
            return [vars(p) for p in top_k(logits[0], served.class_names, 5)]

        return {"predictions": await run_in_threadpool(work)}

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    return app


class PlainOnnxAPI(ls.LitAPI if ls is not None else object):
    """The plain export behind LitServe, in its steps: setup, decode_request, batch, predict, unbatch,
    encode_response. Module-level, so that LitServe can pickle it into its inference worker process."""

    def __init__(self, artifacts: str, plain_onnx: str, **batching) -> None:
        super().__init__(**batching)
        self.artifacts, self.plain_onnx = artifacts, plain_onnx

    def setup(self, device: str) -> None:
        import onnxruntime as ort

        from service.artifacts import read_artifacts

        self.served = read_artifacts(Path(self.artifacts))
        self.session = ort.InferenceSession(self.plain_onnx, providers=["CPUExecutionProvider"])

    def decode_request(self, request) -> np.ndarray:
        from model.preprocess import decode_image, preprocess, resize_size

        prep = self.served.preprocessing
        image = decode_image(request["file"].file.read(), target_size=resize_size(prep))
        return preprocess(image, prep)  # (C, S, S)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)  # (B, C, S, S)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 3:  # max batch 1: LitServe passes single inputs, without batch() and unbatch()
            return self.session.run(["logits"], {"images": x[None]})[0][0]  # (K,)
        return self.session.run(["logits"], {"images": x})[0]  # (B, K)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, logits: np.ndarray) -> dict:
        from service.postprocess import top_k

        return {"predictions": [vars(p) for p in top_k(logits, self.served.class_names, 5)]}


def run_naive(artifacts: str, plain_onnx: str, port: int) -> None:
    """Serve naive_app with uvicorn on 127.0.0.1:`port`."""
    import uvicorn

    uvicorn.run(naive_app(artifacts, plain_onnx), host="127.0.0.1", port=port, log_level="warning")


def run_litserve(artifacts: str, plain_onnx: str, port: int, max_batch: int, batch_timeout_s: float) -> None:
    """Serve PlainOnnxAPI with LitServe's dynamic batching, one inference worker on the CPU."""
    api = PlainOnnxAPI(artifacts, plain_onnx, max_batch_size=max_batch, batch_timeout=batch_timeout_s)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=300)
    server.run(port=port, host="127.0.0.1", generate_client_file=False, log_level="warning")


# ------------------------------------------------------------------ measuring


def calls_for(backend, x: np.ndarray, stop: float) -> int:
    """Calls `backend.infer(x)` until `stop` (time.perf_counter()), at least twice; how many calls ran."""
    runs = 0
    while time.perf_counter() < stop or runs < 2:
        backend.infer(x)
        runs += 1
    return runs


def raw_engine(
    backend, pixels: np.ndarray, max_batch: int, label: str, rounds: int = 3, seconds: float = 2.0
) -> tuple[dict[int, float], dict[int, float]]:
    """Images/s and CPU ms/image of `backend.infer` per batch size, with as many calls in flight as it has
    streams: medians of `rounds` interleaved rounds (every batch size once a round), so drift on a shared machine
    hits all alike and one lucky window does not set the figure. CPU is this process's, i.e. the engine's."""
    from service.backends import streams_of

    streams = streams_of(backend)
    batches = sorted({1, 2, 4, 8, 16, max_batch})
    inputs = {b: np.ascontiguousarray(np.resize(pixels, (b, *pixels.shape[1:]))) for b in batches}
    figures: dict[int, list[float]] = {b: [] for b in batches}
    cpu: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(rounds):
        for batch in batches:
            x = inputs[batch]
            backend.infer(x)
            started, cpu_started = time.perf_counter(), time.process_time()
            with ThreadPoolExecutor(streams) as pool:
                runs = sum(pool.map(calls_for, [backend] * streams, [x] * streams, [started + seconds] * streams))
            figures[batch].append(runs * batch / (time.perf_counter() - started))
            cpu[batch].append(1000 * (time.process_time() - cpu_started) / (runs * batch))
    results, cpu_ms = {}, {}
    for batch in batches:
        results[batch], cpu_ms[batch] = float(np.median(figures[batch])), float(np.median(cpu[batch]))
        spread = ", ".join(f"{f:.1f}" for f in figures[batch])
        print(
            f"  {label}, {streams} stream(s), batch {batch:3d}: {results[batch]:7.1f} images/s (rounds: {spread}), "
            f"CPU {cpu_ms[batch]:.0f} ms/image"
        )
    return results, cpu_ms


async def drive(url: str, jpegs: list[bytes], concurrency: int, total: int, request, server_cpu) -> dict[str, float]:
    """Closed loop: `concurrency` clients, `total` requests; `request(http, data)` sends one.

    Also the server's CPU time per answered image (`server_cpu()` reads its CPU seconds): what the
    server spends on one image whatever else runs on the machine, the steadier figure on a loaded one; and the
    load generator's (this process), which shares the machine with the server.
    """
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as http:
        await asyncio.gather(*(request(http, jpegs[i % len(jpegs)]) for i in range(concurrency)))  # warm up
        cpu_started, own_started = server_cpu(), time.process_time()
        loop = await closed_loop(http, concurrency, total, lambda http, i: request(http, jpegs[i % len(jpegs)]))
        cpu, own = server_cpu() - cpu_started, time.process_time() - own_started
    answered = len(loop.latencies_s)
    ms = np.array(loop.latencies_s) * 1000 if answered else np.array([np.nan])  # no answer at all: nan, not a crash
    return {
        "images_per_s": answered / loop.elapsed_s,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "cpu_ms_per_image": 1000 * cpu / max(1, answered),
        "client_cpu_ms_per_image": 1000 * own / max(1, answered),
        "errors": loop.errors,
    }


def raw_jpeg(path: str, **params):
    async def send(http: httpx.AsyncClient, data: bytes) -> httpx.Response:
        return await http.post(path, content=data, headers={"content-type": "image/jpeg"}, params=params)

    return send


def multipart(path: str):
    async def send(http: httpx.AsyncClient, data: bytes) -> httpx.Response:
        return await http.post(path, files={"file": ("photo.jpg", data, "image/jpeg")})

    return send


def measure(
    name: str, url: str, jpegs: list[bytes], concurrency: int, total: int, request, server: subprocess.Popen
) -> dict[str, float]:
    r = asyncio.run(drive(url, jpegs, concurrency, total, request, lambda: cpu_seconds(server.pid)))
    print(
        f"  {name:22s} c={concurrency}: {r['images_per_s']:6.1f} images/s  p50 {r['p50']:6.0f} ms  "
        f"p95 {r['p95']:6.0f} ms  server CPU {r['cpu_ms_per_image']:4.0f} ms/image  "
        f"load generator CPU {r['client_cpu_ms_per_image']:3.0f} ms/image  errors {r['errors']}"
    )
    return r


# ------------------------------------------------------------------ the run


@dataclass
class Run:
    """One run's figures: the raw engines per batch size, then each server under the same closed-loop load."""

    clients: int
    engine: str  # e.g. "openvino fp32, 2 stream(s)"
    raw: dict[int, float]  # images/s per batch
    raw_cpu: dict[int, float]  # CPU ms/image per batch
    ort_raw: dict[int, float]
    service: dict[str, float]  # drive()'s figures
    cam: dict[str, float]
    naive: dict[str, float]
    litserve: dict[str, float] | None  # None: LitServe is not installed

    @property
    def best_batch(self) -> int:
        return max(self.raw, key=self.raw.get)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REFERENCE)
    parser.add_argument("--variant", default="vitae_t")
    parser.add_argument("--out", type=Path, default=None, help="artifacts folder (default: a temporary one)")
    parser.add_argument("--requests", type=int, default=384, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=10.0)
    parser.add_argument("--cpu-precision", default="auto", help="the service's VITAE_CPU_PRECISION")
    parser.add_argument("--streams", type=int, default=0, help="the service's VITAE_INFER_STREAMS (0: the backend's)")
    add_record_option(parser)
    return parser.parse_args(argv)


def export_both(args: argparse.Namespace, artifacts: Path, workdir: Path) -> Path:
    """This project's export into `artifacts` and the plain one beside it; the plain export's path."""
    import export

    print(f"machine: {os.cpu_count()} CPU cores; exporting {args.variant} to {artifacts}")
    checkpoint = checkpoint_or_random(args.checkpoint, args.variant, workdir)
    meta = export.export_artifacts(
        checkpoint, artifacts, variant=args.variant, max_batch=args.max_batch, precision="fp32"
    )
    bf16 = meta["cpu_bf16"]
    print(
        f"export's bf16 check: safe={bf16['safe']} ({bf16['reason']}); agreement {bf16['top1_agreement']} %, "
        f"max logit diff {bf16['max_logit_diff']} on {bf16['inputs']}"
    )
    return plain_export(artifacts, workdir / "plain.onnx")


def measure_raw_engines(artifacts: Path, jpegs: list[bytes], args: argparse.Namespace) -> tuple:
    """The engine the service picks, and ONNX Runtime fp32, in this process: (what, raw, raw CPU, ORT raw)."""
    from service.artifacts import read_artifacts
    from service.backends import OnnxRuntimeBackend, select_backend

    served = read_artifacts(artifacts)
    pixels = preprocessed(artifacts, jpegs)
    selection = select_backend("auto", served, device="cpu", cpu_precision=args.cpu_precision, streams=args.streams)
    engine = selection.backend
    print(f"raw engine: {engine.name} {engine.precision} ({selection.reason})")
    raw, raw_cpu = raw_engine(engine, pixels, args.max_batch, f"{engine.name} {engine.precision}")
    what = f"{engine.name} {engine.precision}, {engine.streams} stream(s)"
    engine.close()
    ort = OnnxRuntimeBackend(served, gpu=False, streams=args.streams)
    ort_raw, _ = raw_engine(ort, pixels, args.max_batch, "onnxruntime fp32")
    ort.close()
    return what, raw, raw_cpu, ort_raw


def measure_service(artifacts: Path, jpegs: list[bytes], best_batch: int, args, workdir: Path) -> tuple[dict, dict]:
    """`python -m service` with cam=false, then cam=true: drive()'s figures for each."""
    port = free_port()
    served_env = service_env(
        artifacts,
        port,
        backend="auto",
        device="cpu",
        cpu_precision=args.cpu_precision,
        infer_streams=args.streams,
        # Batches beyond the engine's best size add latency and no throughput, so that is the service's cap.
        max_batch_size=best_batch,
        max_delay_ms=args.max_delay_ms,
        queue_capacity=4096,
        request_timeout_s=300,
    )
    url, c, total = f"http://127.0.0.1:{port}", args.concurrency, max(args.requests, 2 * args.concurrency)
    print(f"service (python -m service, max batch {best_batch}, max delay {args.max_delay_ms} ms)")
    process = start([sys.executable, "-m", "service"], served_env, port, workdir / "service.log", "/readyz")
    try:
        ready = httpx.get(f"{url}/readyz").json()
        what = f"{ready['backend']} on {ready['device']} in {ready['precision']}, {ready['streams']} stream(s)"
        print(f"  serving with {what}")
        service = measure("service cam=false", url, jpegs, c, total, raw_jpeg("/classify"), process)
        cam = measure("service cam=true", url, jpegs, c, total, raw_jpeg("/classify", cam="true"), process)
    finally:
        stop(process)
    return service, cam


def measure_baseline(name: str, runner: str, ready_path: str, request, jpegs: list[bytes], args, log: Path, **kwargs):
    """A baseline server, `runner(port=..., **kwargs)` of this module in its own process, under the service's load."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "VITAE_LOG_LEVEL": "warning"}
    port = free_port()
    code = f"import sys; sys.path.insert(0, 'benchmarks'); from bench_service import {runner}; "
    command = [sys.executable, "-c", code + f"{runner}(port={port}, **{kwargs!r})"]
    total = max(args.requests, 2 * args.concurrency)
    process = start(command, env, port, log, ready_path)
    try:
        return measure(name, f"http://127.0.0.1:{port}", jpegs, args.concurrency, total, request, process)
    finally:
        stop(process)


def measure_baselines(artifacts: Path, plain: Path, jpegs: list[bytes], best_batch: int, args, workdir: Path) -> tuple:
    """The plain export behind a naive endpoint, then behind LitServe (None when not installed)."""
    files = {"artifacts": str(artifacts), "plain_onnx": str(plain)}
    print("naive FastAPI endpoint (plain export, one session.run per request)")
    log = workdir / "naive.log"
    naive = measure_baseline("naive endpoint", "run_naive", "/readyz", raw_jpeg("/classify"), jpegs, args, log, **files)
    if ls is None:
        print("LitServe: not installed (pip install -e '.[bench]'); skipped")
        return naive, None
    print(f"LitServe (plain export, max batch {best_batch}, batch timeout {args.max_delay_ms} ms)")
    batching = {"max_batch": best_batch, "batch_timeout_s": args.max_delay_ms / 1000}
    log = workdir / "litserve.log"
    litserve = measure_baseline(
        "LitServe", "run_litserve", "/health", multipart("/predict"), jpegs, args, log, **files, **batching
    )
    return naive, litserve


# ------------------------------------------------------------------ the report


def result_rows(run: Run) -> list[dict[str, object]]:
    """The table's rows as printed (benchmarks/results/service.csv's columns); None: no such figure."""
    best = run.best_batch
    blank = dict.fromkeys(("p50_ms", "p95_ms", "server_cpu_ms_per_image", "loadgen_cpu_ms_per_image"))
    rows = [
        {"what": f"raw engine: {run.engine}, best batch {best}", "images_per_s": round(run.raw[best], 1)}
        | blank
        | {"server_cpu_ms_per_image": round(run.raw_cpu[best], 0)},
        {"what": "raw ONNX Runtime fp32 on model.onnx, best batch", "images_per_s": round(max(run.ort_raw.values()), 1)}
        | blank,
    ]
    served = [("this service, cam=false", run.service), ("this service, cam=true", run.cam)]
    served += [("naive endpoint", run.naive)] + ([("LitServe", run.litserve)] if run.litserve is not None else [])
    for name, r in served:
        rows.append(
            {
                "what": name,
                "images_per_s": round(r["images_per_s"], 1),
                "p50_ms": round(r["p50"], 0),
                "p95_ms": round(r["p95"], 0),
                "server_cpu_ms_per_image": round(r["cpu_ms_per_image"], 0),
                "loadgen_cpu_ms_per_image": round(r["client_cpu_ms_per_image"], 0),
            }
        )
    return rows


def ratios(run: Run) -> dict[str, float | None]:
    service = run.service["images_per_s"]
    return {
        "service / naive endpoint": service / run.naive["images_per_s"],
        "service / LitServe": None if run.litserve is None else service / run.litserve["images_per_s"],
        "service / its raw engine": service / run.raw[run.best_batch],
        "service cam=true / cam=false": run.cam["images_per_s"] / service,
    }


def report(run: Run) -> None:
    """The table, the ratios against the goals, and the CPU per image, which drifts less than throughput."""
    print()
    print(f"ViTAE-T 224, {os.cpu_count()} CPU cores, {run.clients} concurrent clients, real JPEGs; one run")
    print("| what | images/s | p50 ms | p95 ms | server CPU ms/image | load generator CPU ms/image |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in result_rows(run):
        formats = ("", ".1f", ".0f", ".0f", ".0f", ".0f")
        cells = ["" if value is None else format(value, f) for value, f in zip(row.values(), formats, strict=True)]
        print("|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|")
    print()
    for name, ratio in ratios(run).items():
        if ratio is None:
            print(f"{name:30s}   n/a  (goal >= {GOALS[name]:.2f})")
        else:
            verdict = "met" if ratio >= GOALS[name] else "NOT met"
            print(f"{name:30s} {ratio:5.2f}  (goal >= {GOALS[name]:.2f}: {verdict})")
    service, cam = run.service, run.cam
    cpu_ratio = service["cpu_ms_per_image"] / cam["cpu_ms_per_image"]
    print(f"{'server CPU/image cam=false / cam=true':30s} {cpu_ratio:5.2f}  (the cam cost without the load's noise)")
    engine_share = run.raw_cpu[run.best_batch] / service["cpu_ms_per_image"]
    print(
        f"{'raw engine CPU/image / service CPU/image':30s} {engine_share:5.2f}  (the share of the server's CPU that is "
        f"inference; the load generator took {service['client_cpu_ms_per_image']:.0f} ms/image of the same cores)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-service-"))
    artifacts = args.out or workdir / "artifacts"
    # ---- measure: the exports, the raw engines in process, the service, the baselines
    plain = export_both(args, artifacts, workdir)
    jpegs = real_jpegs(12)
    print(f"inputs: {len(jpegs)} real JPEG photos, {min(len(j) for j in jpegs)}..{max(len(j) for j in jpegs)} bytes")
    engine, raw, raw_cpu, ort_raw = measure_raw_engines(artifacts, jpegs, args)
    best_batch = max(raw, key=raw.get)
    service, cam = measure_service(artifacts, jpegs, best_batch, args, workdir)
    naive, litserve = measure_baselines(artifacts, plain, jpegs, best_batch, args, workdir)
    run = Run(args.concurrency, engine, raw, raw_cpu, ort_raw, service, cam, naive, litserve)
    # ---- report
    report(run)
    record("service", result_rows(run), args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
