"""The service against its own engine and against what a user gets without it, in one run (not a test).

    python benchmarks/bench_service.py [--checkpoint PATH --variant vitae_t] [--requests 384] [--concurrency 32]
                                       [--cpu-precision auto|bf16|int8|fp32] [--[no-]cpu-int8]
                                       [--out DIR (kept; reused when exported)]

Exports ViTAE-T at 224 with this project (the release's weights from ../shared/reference when present, else
random weights), with its int8 model where the CPU multiplies int8 natively (VNNI, AMX-INT8; `--[no-]cpu-int8`
decides otherwise), and separately with a plain `torch.onnx.export` of the same weights. Then, with real JPEG
photos (400-800 px) at `--concurrency` closed-loop clients (each sends its next image when the last one is
answered), it measures:
  * raw engine: the backend the service picks (`auto`: OpenVINO, int8 or bf16 where safe and faster) on
    preprocessed inputs, batch 1..max, median of 3 interleaved rounds, best batch reported; ONNX Runtime fp32
    likewise for reference; and the same engine's batch-1 latency with one stream on every core (OpenVINO's
    LATENCY hint);
  * the service (`python -m service`, response cache off: the photos repeat), with cam=false and with cam=true,
    and one lone client sending one photo at a time;
  * naive: the plain export in ONNX Runtime behind a FastAPI endpoint, one `session.run` per request;
  * LitServe: the plain export in ONNX Runtime behind LitServe with its batching (pip extra `bench`).
and prints the ratios against the goals, and the server's CPU per image outside its engine (its threads' CPU less the
inference runtime's: the runtime's own threads, and its work inside backend calls on the batch workers'). Servers and
load generator share the machine, as on one host; the load generator is a bare keep-alive HTTP/1.1 client
(harness.LeanConnection), so that it takes little of the servers' cores. On a shared machine absolute figures drift
between runs, so compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

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

from harness import (  # noqa: E402
    THREAD_ROLES,
    Prepared,
    cpu_seconds,
    free_port,
    lean_closed_loop,
    metric_total,
    multipart_body,
    real_jpegs,
    service_env,
    start,
    stop,
    thread_cpu_seconds,
)
from results import add_record_option, machine, record  # noqa: E402
from results import cpu_flags as flags_that_matter  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference" / "vitae_t_official.safetensors"
GOALS = {  # name -> (goal, True: at least / False: at most)
    "service / naive endpoint": (2.5, True),
    "service / LitServe": (1.7, True),
    "service / its raw engine": (0.80, True),
    "service cam=true / cam=false": (0.90, True),
    "lone client p50 / raw batch-1 latency": (1.35, False),
    "server CPU ms/image outside the engine": (4.0, False),
}
LONE_BLOCKS = 4  # a lone client's blocks, each right after a measurement of the engine's batch-1 latency
LONE_PER_BLOCK = 24
RAW_SECONDS = 2.0  # the raw engine at its best batch, just before and just after the service's load


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


def raw_throughput(backend, x: np.ndarray, seconds: float) -> tuple[float, float]:
    """Images/s and CPU ms/image of `backend.infer(x)` with as many calls in flight as it has streams, for
    `seconds`. CPU is this process's, i.e. the engine's."""
    from service.backends import streams_of

    streams = streams_of(backend)
    backend.infer(x)
    started, cpu_started = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(streams) as pool:
        runs = sum(pool.map(calls_for, [backend] * streams, [x] * streams, [started + seconds] * streams))
    images = runs * len(x)
    return images / (time.perf_counter() - started), 1000 * (time.process_time() - cpu_started) / images


def batch_of(pixels: np.ndarray, batch: int) -> np.ndarray:
    """`batch` images cycled from `pixels` (N, C, S, S)."""
    return np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))


def raw_engine(
    backend, pixels: np.ndarray, max_batch: int, label: str, rounds: int = 3, seconds: float = 2.0
) -> tuple[dict[int, float], dict[int, float]]:
    """raw_throughput per batch size: medians of `rounds` interleaved rounds (every batch size once a round), so
    drift on a shared machine hits all alike and one lucky window does not set the figure."""
    from service.backends import streams_of

    batches = sorted({1, 2, 4, 8, 16, max_batch})
    figures: dict[int, list[float]] = {b: [] for b in batches}
    cpu: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(rounds):
        for batch in batches:
            speed, cpu_ms = raw_throughput(backend, batch_of(pixels, batch), seconds)
            figures[batch].append(speed)
            cpu[batch].append(cpu_ms)
    results, cpu_ms = {}, {}
    for batch in batches:
        results[batch], cpu_ms[batch] = float(np.median(figures[batch])), float(np.median(cpu[batch]))
        spread = ", ".join(f"{f:.1f}" for f in figures[batch])
        print(
            f"  {label}, {streams_of(backend)} stream(s), batch {batch:3d}: {results[batch]:7.1f} images/s "
            f"(rounds: {spread}), CPU {cpu_ms[batch]:.0f} ms/image"
        )
    return results, cpu_ms


def raw_latency_ms(backend, pixels: np.ndarray, calls: int = 60) -> float:
    """Median wall time of `backend.infer` on one image, one call at a time (after a warm-up call)."""
    x = np.ascontiguousarray(pixels[:1])
    backend.infer(x)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        backend.infer(x)
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


ENGINE_ON_WORKERS = "vitae_inference_thread_cpu_seconds_total"  # the batch workers' CPU inside backend calls


async def drive(port: int, jpegs: list[bytes], concurrency: int, total: int, request, server) -> dict[str, float]:
    """Closed loop: `concurrency` clients, `total` requests; `request(data)` is the request that sends one photo.

    Also the server's CPU time per answered image (`server`'s process group, from /proc): what the server spends on
    one image whatever else runs on the machine, the steadier figure on a loaded one, and the same split by its
    threads' roles (harness.thread_cpu_seconds: event loop, decode, CAM pictures, batch workers, engine); and the load
    generator's (this process), which shares the machine with the server. The runtime's work on the batch workers'
    threads (inside the backend call, which the service counts in ENGINE_ON_WORKERS) is the engine's.
    """
    requests = [request(data) for data in jpegs]
    await lean_closed_loop("127.0.0.1", port, concurrency, concurrency, lambda i: requests[i % len(requests)])  # warm
    url = f"http://127.0.0.1:{port}"
    cpu_started, roles_started, on_workers_started, own_started = (
        cpu_seconds(server.pid),
        thread_cpu_seconds(server.pid),
        metric_total(url, ENGINE_ON_WORKERS),
        time.process_time(),
    )
    loop = await lean_closed_loop("127.0.0.1", port, concurrency, total, lambda i: requests[i % len(requests)])
    cpu, own = cpu_seconds(server.pid) - cpu_started, time.process_time() - own_started
    roles = {role: spent - roles_started[role] for role, spent in thread_cpu_seconds(server.pid).items()}
    on_workers = metric_total(url, ENGINE_ON_WORKERS)
    if on_workers is not None and on_workers_started is not None:
        roles["batch workers"] -= on_workers - on_workers_started
        roles["engine"] += on_workers - on_workers_started
    answered = len(loop.latencies_s)
    ms = np.array(loop.latencies_s) * 1000 if answered else np.array([np.nan])  # no answer at all: nan, not a crash
    return {
        "images_per_s": answered / loop.elapsed_s,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "cpu_ms_per_image": 1000 * cpu / max(1, answered),
        "client_cpu_ms_per_image": 1000 * own / max(1, answered),
        "errors": loop.errors,
    } | {f"{role} cpu_ms_per_image": 1000 * spent / max(1, answered) for role, spent in roles.items()}


def raw_jpeg(path: str, **params: str):
    """The photo as the request body (content-type image/jpeg), `params` as the query."""
    target = path + ("?" + urlencode(params) if params else "")

    def prepared(data: bytes) -> Prepared:
        return "POST", target, {"content-type": "image/jpeg"}, data

    return prepared


def multipart(path: str):
    """The photo as the multipart/form-data field `file` (what LitServe's API reads)."""

    def prepared(data: bytes) -> Prepared:
        headers, body = multipart_body("file", "photo.jpg", data, "image/jpeg")
        return "POST", path, headers, body

    return prepared


def measure(
    name: str, port: int, jpegs: list[bytes], concurrency: int, total: int, request, server: subprocess.Popen
) -> dict[str, float]:
    r = asyncio.run(drive(port, jpegs, concurrency, total, request, server))
    print(figures_line(name, concurrency, r))
    return r


def figures_line(name: str, concurrency: int, r: dict[str, float]) -> str:
    """One load's printed line: drive()'s figures."""
    return (
        f"  {name:22s} c={concurrency}: {r['images_per_s']:6.1f} images/s  p50 {r['p50']:6.0f} ms  "
        f"p95 {r['p95']:6.0f} ms  server CPU {r['cpu_ms_per_image']:4.0f} ms/image  "
        f"load generator CPU {r['client_cpu_ms_per_image']:3.0f} ms/image  errors {r['errors']:g}"
    )


# ------------------------------------------------------------------ the run


@dataclass
class Run:
    """One run's figures: the raw engines per batch size, then each server under the same closed-loop load."""

    clients: int
    engine: str  # e.g. "openvino bf16, 2 stream(s)"
    raw: dict[int, float]  # images/s per batch
    raw_cpu: dict[int, float]  # CPU ms/image per batch
    ort_raw: dict[int, float]
    service: dict[str, float]  # drive()'s figures
    cam: dict[str, float]
    naive: dict[str, float] | None  # None: --skip-baselines
    litserve: dict[str, float] | None  # None: LitServe is not installed, or --skip-baselines
    raw_latency_ms: float | None = None  # the engine's batch-1 latency, one stream on every core
    lone: dict[str, float] | None = None  # drive()'s figures for one client, one photo at a time
    cpu: str = ""  # the CPU's model and the flags that decide its kernels
    beside: tuple[float, float] | None = None  # the engine at the best batch in the service's rounds: images/s, CPU
    round_ratios: dict[str, float] | None = None  # ratios as medians of per-round ratios (measure_service)

    @property
    def best_batch(self) -> int:
        return max(self.raw, key=self.raw.get)

    @property
    def engine_speed(self) -> tuple[float, float]:
        """The engine's images/s and CPU ms/image at its best batch: from the rounds beside the service if any."""
        return self.beside or (self.raw[self.best_batch], self.raw_cpu[self.best_batch])


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
    parser.add_argument("--rounds", type=int, default=3, help="rounds of engine and service, interleaved")
    parser.add_argument(
        "--cpu-int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the export also builds and measures int8 (python -m export's), so that `auto` may serve it; "
        "default: where this CPU multiplies int8 natively (VNNI or AMX-INT8)",
    )
    parser.add_argument("--skip-baselines", action="store_true", help="measure the engine and the service only")
    add_record_option(parser)
    args = parser.parse_args(argv)
    if args.cpu_int8 is None:
        args.cpu_int8 = int8_is_native()
    return args


def int8_is_native() -> bool:
    """Whether this CPU multiplies int8 natively, where int8 may pay (export.int8's test of its flags)."""
    from export.int8 import native_int8
    from export.precision import cpu_flags

    return native_int8(cpu_flags())


def cpu_description() -> str:
    """The CPU's model, its kind and the flags that decide which kernels run (what every figure was measured on):
    the same words as the CSV's `machine` and `cpu_flags` columns."""
    from export.precision import cpu_flags, cpu_kind

    return f"{machine()}, kind {cpu_kind(cpu_flags())} ({flags_that_matter() or 'none of avx2+'})"


def export_both(args: argparse.Namespace, artifacts: Path, workdir: Path) -> Path:
    """This project's export into `artifacts` (kept when `--out` already holds one) and the plain one beside it;
    the plain export's path."""
    import export

    plain = artifacts / "plain.onnx"
    if (artifacts / "metadata.json").is_file() and plain.is_file():
        print(f"reusing the export in {artifacts}")
        meta = json.loads((artifacts / "metadata.json").read_text())
    else:
        print(f"exporting {args.variant} to {artifacts}")
        checkpoint = checkpoint_or_random(args.checkpoint, args.variant, workdir)
        meta = export.export_artifacts(
            checkpoint,
            artifacts,
            variant=args.variant,
            max_batch=args.max_batch,
            precision="fp32",
            cpu_int8=args.cpu_int8,
        )
        plain_export(artifacts, plain)
    bf16 = meta["cpu_bf16"]
    print(
        f"export's bf16 check: safe={bf16['safe']} ({bf16['reason']}); agreement {bf16['top1_agreement']} %, "
        f"max logit diff {bf16['max_logit_diff']} on {bf16['inputs']}"
    )
    print(int8_line(meta.get("cpu_int8"), args.cpu_int8))
    return plain


def int8_line(report: dict | None, wanted: bool) -> str:
    """What the export says of int8 (metadata.json's `cpu_int8`), or why there is none."""
    if report:
        return f"export's int8: safe={report['safe']} ({report['reason']})"
    if wanted:
        return "export's int8: none in this (reused) export; export into an empty --out to build it"
    return "export's int8: not built (--no-cpu-int8, or this CPU does not multiply int8 natively)"


@dataclass
class Engines:
    """The engine the service picks, as the service runs it (`engine`) and with one stream on every core
    (`single`, for batch-1 latency), open in this process for the rounds interleaved with the service."""

    engine: object
    single: object
    pixels: np.ndarray  # the photos preprocessed, (N, C, S, S)

    def close(self) -> None:
        self.engine.close()
        self.single.close()


def measure_raw_engines(artifacts: Path, jpegs: list[bytes], args: argparse.Namespace) -> tuple:
    """The engine the service picks, swept over batch sizes, and ONNX Runtime fp32 likewise, in this process:
    (Engines, what, raw, raw CPU, ORT raw)."""
    from service.artifacts import read_artifacts
    from service.backends import OnnxRuntimeBackend, select_backend

    served = read_artifacts(artifacts)
    pixels = preprocessed(artifacts, jpegs)
    ort = OnnxRuntimeBackend(served, gpu=False, streams=args.streams)
    ort_raw, _ = raw_engine(ort, pixels, args.max_batch, "onnxruntime fp32")
    ort.close()
    selection = select_backend("auto", served, device="cpu", cpu_precision=args.cpu_precision, streams=args.streams)
    engine = selection.backend
    print(f"raw engine: {engine.name} {engine.precision} ({selection.reason})")
    raw, raw_cpu = raw_engine(engine, pixels, args.max_batch, f"{engine.name} {engine.precision}")
    what = f"{engine.name} {engine.precision}, {engine.streams} stream(s)"
    single = select_backend("auto", served, device="cpu", cpu_precision=args.cpu_precision, streams=1).backend
    return Engines(engine, single, pixels), what, raw, raw_cpu, ort_raw


def median_figures(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per figure, the median over rounds (drive()'s dicts)."""
    return {key: float(np.median([r[key] for r in rounds])) for key in rounds[0]}


@dataclass
class Interleaved:
    """What measure_service's rounds give: each figure the median of its rounds."""

    max_batch: int  # the service's largest batch
    raw: float  # the engine at its best batch, images/s
    raw_cpu: float  # its CPU ms/image
    raw_latency_ms: float  # batch 1 on `Engines.single`
    service: dict[str, float]
    cam: dict[str, float]
    lone: dict[str, float]
    ratios: dict[str, float]  # GOALS' ratios, each the median of its per-round ratios


def service_max_batch(url: str) -> int:
    """The largest batch the service at `url` sends its engine (its v2 model configuration's preferred batch)."""
    name = httpx.get(f"{url}/readyz").json()["model"]
    config = httpx.get(f"{url}/v2/models/{name}/config").json()
    return config["dynamic_batching"]["preferred_batch_size"][0]


def measure_service(engines: Engines, artifacts: Path, jpegs: list[bytes], best_batch: int, args, workdir: Path):
    """`python -m service` with its default batching (on CPU with several streams at most 4 images a batch) in
    `args.rounds` rounds, each: the raw engine at its best batch `best_batch` (in this process, the service idle),
    the service with cam=false, the raw engine again (the service's ratio is against the mean of the two), the
    service with cam=true, then a lone client in blocks paired with the engine's batch-1 latency (measure_lone); so
    drift on a shared machine hits every figure alike. -> Interleaved."""
    port = free_port()
    served_env = service_env(
        artifacts,
        port,
        backend="auto",
        device="cpu",
        cpu_precision=args.cpu_precision,
        infer_streams=args.streams,
        # No VITAE_MAX_BATCH_SIZE: the service batches as it does by default (service_max_batch says how).
        max_delay_ms=args.max_delay_ms,
        queue_capacity=4096,
        request_timeout_s=300,
        cache_mb=0,  # the photos repeat: with the cache on, this would measure the cache
    )
    c, total = args.concurrency, max(args.requests, 2 * args.concurrency)
    process = start([sys.executable, "-m", "service"], served_env, port, workdir / "service.log", "/readyz")
    raw, latency, service, cam, lone = [], [], [], [], []
    engine_ratio, lone_ratio = [], []
    batch = batch_of(engines.pixels, best_batch)
    try:
        max_batch = service_max_batch(f"http://127.0.0.1:{port}")
        print(f"service (python -m service, its max batch {max_batch}, max delay {args.max_delay_ms} ms, cache off)")
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        what = f"{ready['backend']} on {ready['device']} in {ready['precision']}, {ready['streams']} stream(s)"
        print(f"  serving with {what}; {args.rounds} rounds")
        for _ in range(args.rounds):
            before = raw_throughput(engines.engine, batch, RAW_SECONDS)
            service.append(measure("service cam=false", port, jpegs, c, total, raw_jpeg("/classify"), process))
            after = raw_throughput(engines.engine, batch, RAW_SECONDS)
            raw.append(tuple((b + a) / 2 for b, a in zip(before, after, strict=True)))
            engine_ratio.append(service[-1]["images_per_s"] / raw[-1][0])
            print(
                f"  raw engine, batch {best_batch}: {before[0]:6.1f} before, {after[0]:6.1f} after images/s, "
                f"CPU {raw[-1][1]:.0f} ms/image"
            )
            cam.append(measure("service cam=true", port, jpegs, c, total, raw_jpeg("/classify", cam="true"), process))
            figures, latency_ms, ratio = measure_lone(engines, port, jpegs, process)
            lone.append(figures)
            latency.append(latency_ms)
            lone_ratio.append(ratio)
    finally:
        stop(process)
    per_round = {
        "service / its raw engine": engine_ratio,
        "service cam=true / cam=false": [
            c["images_per_s"] / s["images_per_s"] for c, s in zip(cam, service, strict=True)
        ],
        "lone client p50 / raw batch-1 latency": lone_ratio,
    }
    return Interleaved(
        max_batch=max_batch,
        ratios={name: float(np.median(values)) for name, values in per_round.items()},
        raw=float(np.median([r[0] for r in raw])),
        raw_cpu=float(np.median([r[1] for r in raw])),
        raw_latency_ms=float(np.median(latency)),
        service=median_figures(service),
        cam=median_figures(cam),
        lone=median_figures(lone),
    )


def measure_lone(engines: Engines, port: int, jpegs: list[bytes], server: subprocess.Popen) -> tuple:
    """One lone client (one photo at a time) in LONE_BLOCKS short blocks, each right after the engine's batch-1
    latency on every core: (the blocks' median figures, the latency's median, the median of each block's p50 over
    the latency measured just before it). The machine's speed moves within seconds, so each ratio pairs two figures
    taken about a second apart."""
    blocks, latencies = [], []
    for _ in range(LONE_BLOCKS):
        latencies.append(raw_latency_ms(engines.single, engines.pixels, LONE_PER_BLOCK))
        blocks.append(asyncio.run(drive(port, jpegs, 1, LONE_PER_BLOCK, raw_jpeg("/classify"), server)))
    figures = median_figures(blocks)
    latency_ms = float(np.median(latencies))
    ratio = float(np.median([block["p50"] / ms for block, ms in zip(blocks, latencies, strict=True)]))
    print(figures_line("service, lone client", 1, figures))
    print(f"    raw engine, 1 stream on every core, batch 1: {latency_ms:.1f} ms (p50); paired ratio {ratio:.2f}")
    return figures, latency_ms, ratio


def measure_baseline(name: str, runner: str, ready_path: str, request, jpegs: list[bytes], args, log: Path, **kwargs):
    """A baseline server, `runner(port=..., **kwargs)` of this module in its own process, under the service's load."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "VITAE_LOG_LEVEL": "warning"}
    port = free_port()
    code = f"import sys; sys.path.insert(0, 'benchmarks'); from bench_service import {runner}; "
    command = [sys.executable, "-c", code + f"{runner}(port={port}, **{kwargs!r})"]
    total = max(args.requests, 2 * args.concurrency)
    process = start(command, env, port, log, ready_path)
    try:
        return measure(name, port, jpegs, args.concurrency, total, request, process)
    finally:
        stop(process)


def measure_baselines(artifacts: Path, plain: Path, jpegs: list[bytes], max_batch: int, args, workdir: Path) -> tuple:
    """The plain export behind a naive endpoint, then behind LitServe (None when not installed) batching at most
    `max_batch` images, as the service does."""
    files = {"artifacts": str(artifacts), "plain_onnx": str(plain)}
    print("naive FastAPI endpoint (plain export, one session.run per request)")
    log = workdir / "naive.log"
    naive = measure_baseline("naive endpoint", "run_naive", "/readyz", raw_jpeg("/classify"), jpegs, args, log, **files)
    if ls is None:
        print("LitServe: not installed (pip install -e '.[bench]'); skipped")
        return naive, None
    print(f"LitServe (plain export, max batch {max_batch}, batch timeout {args.max_delay_ms} ms)")
    batching = {"max_batch": max_batch, "batch_timeout_s": args.max_delay_ms / 1000}
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
    speed, cpu = run.engine_speed
    beside = ", beside the service" if run.beside else ""
    rows = [
        {"what": f"raw engine: {run.engine}, best batch {best}{beside}", "images_per_s": round(speed, 1)}
        | blank
        | {"server_cpu_ms_per_image": round(cpu, 0)},
    ]
    if run.raw_latency_ms is not None:
        rows.append(
            {"what": "raw engine, 1 stream on every core, batch 1", "images_per_s": round(1000 / run.raw_latency_ms, 1)}
            | blank
            | {"p50_ms": round(run.raw_latency_ms, 1)}
        )
    rows.append(
        {"what": "raw ONNX Runtime fp32 on model.onnx, best batch", "images_per_s": round(max(run.ort_raw.values()), 1)}
        | blank
    )
    served = [("this service, cam=false", run.service), ("this service, cam=true", run.cam)]
    served += [("this service, one lone client", run.lone)] if run.lone is not None else []
    served += [("naive endpoint", run.naive)] if run.naive is not None else []
    served += [("LitServe", run.litserve)] if run.litserve is not None else []
    for name, r in served:
        rows.append(
            {
                "what": name,
                "images_per_s": round(r["images_per_s"], 1),
                "p50_ms": round(r["p50"], 1 if r is run.lone else 0),
                "p95_ms": round(r["p95"], 1 if r is run.lone else 0),
                "server_cpu_ms_per_image": round(r["cpu_ms_per_image"], 0),
                "loadgen_cpu_ms_per_image": round(r["client_cpu_ms_per_image"], 0),
            }
        )
    return rows


OUTSIDE_ENGINE = tuple(role for role in THREAD_ROLES if role != "engine")  # not the inference runtime's


def outside_engine_ms(figures: dict[str, float]) -> float | None:
    """The server's CPU per image on its own threads (HTTP, decoding, batching, answers): all but the engine's."""
    keys = [f"{role} cpu_ms_per_image" for role in OUTSIDE_ENGINE]
    return sum(figures[key] for key in keys) if all(key in figures for key in keys) else None


def ratios(run: Run) -> dict[str, float | None]:
    """Each goal's figure in this run (GOALS' names); None where the run has no such figure. Ratios within the
    service's rounds are medians of per-round ratios, each taken minutes apart at most."""
    service = run.service["images_per_s"]
    return {
        "service / naive endpoint": None if run.naive is None else service / run.naive["images_per_s"],
        "service / LitServe": None if run.litserve is None else service / run.litserve["images_per_s"],
        "service / its raw engine": service / run.engine_speed[0],
        "service cam=true / cam=false": run.cam["images_per_s"] / service,
        "lone client p50 / raw batch-1 latency": (
            None if run.lone is None or run.raw_latency_ms is None else run.lone["p50"] / run.raw_latency_ms
        ),
        "server CPU ms/image outside the engine": outside_engine_ms(run.service),
    } | (run.round_ratios or {})


def report(run: Run) -> None:
    """The table, the figures against the goals, and the CPU per image, which drifts less than throughput."""
    print()
    print(f"ViTAE-T 224 on {run.cpu or f'{os.cpu_count()} CPU cores'}; {run.clients} concurrent clients, real JPEGs")
    print("| what | images/s | p50 ms | p95 ms | server CPU ms/image | load generator CPU ms/image |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in result_rows(run):
        cells = ["" if value is None else value if isinstance(value, str) else f"{value:g}" for value in row.values()]
        print("|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|")
    print()
    for name, figure in ratios(run).items():
        goal, at_least = GOALS[name]
        sign = ">=" if at_least else "<="
        if figure is None:
            print(f"{name:40s}   n/a  (goal {sign} {goal:.2f})")
        else:
            verdict = "met" if (figure >= goal if at_least else figure <= goal) else "NOT met"
            print(f"{name:40s} {figure:5.2f}  (goal {sign} {goal:.2f}: {verdict})")
    service, cam = run.service, run.cam
    cpu_ratio = service["cpu_ms_per_image"] / cam["cpu_ms_per_image"]
    print(f"{'server CPU/image cam=false / cam=true':40s} {cpu_ratio:5.2f}  (the cam cost without the load's noise)")
    print(f"{'load generator CPU ms/image':40s} {service['client_cpu_ms_per_image']:5.2f}  (on the same cores)")
    for load, figures in (("cam=false", service), ("cam=true", cam)):
        roles = [f"{role} {figures.get(f'{role} cpu_ms_per_image', math.nan):.1f}" for role in THREAD_ROLES]
        print(f"{'service CPU ms/image by thread role':40s} {', '.join(roles)} ({load})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-service-"))
    artifacts = args.out or workdir / "artifacts"
    cpu = cpu_description()
    print(f"machine: {cpu}")
    # ---- measure: the exports, the raw engines in process, the service, the baselines
    plain = export_both(args, artifacts, workdir)
    jpegs = real_jpegs(12)
    print(f"inputs: {len(jpegs)} real JPEG photos, {min(len(j) for j in jpegs)}..{max(len(j) for j in jpegs)} bytes")
    engines, engine, raw, raw_cpu, ort_raw = measure_raw_engines(artifacts, jpegs, args)
    best_batch = max(raw, key=raw.get)
    try:
        rounds = measure_service(engines, artifacts, jpegs, best_batch, args, workdir)
    finally:
        engines.close()
    naive, litserve = (
        (None, None)
        if args.skip_baselines
        else measure_baselines(artifacts, plain, jpegs, rounds.max_batch, args, workdir)
    )
    run = Run(
        args.concurrency,
        engine,
        raw,
        raw_cpu,
        ort_raw,
        rounds.service,
        rounds.cam,
        naive,
        litserve,
        rounds.raw_latency_ms,
        rounds.lone,
        cpu,
        (rounds.raw, rounds.raw_cpu),
        rounds.ratios,
    )
    # ---- report
    report(run)
    record("service", result_rows(run), args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
