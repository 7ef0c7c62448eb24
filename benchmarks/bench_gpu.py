"""ViTAE-T on a GPU: PyTorch fp32 and half + CUDA graphs, TensorRT where it imports, GPU decoding, the service.

    python benchmarks/bench_gpu.py [--checkpoint PATH] [--batches 1,8,64,256] [--seconds 3]

Prints, in one run (not a test; run by benchmarks/gpu_check.sh), images/s per batch:
  * PyTorch through the service's backend (host numpy in and out): eager fp32, and the fast path with the half
    precision its gate chose (the gate's figures against fp32 are printed with it);
  * TensorRT, when the tensorrt package imports: the export's engine-vs-fp32 figures, the PRM fusion, the engine
    alone on device-resident inputs (CUDA events) and through the service's TensorRT backend;
  * GPU decoding alone (nvJPEG batch, orientation, resize, crop, normalise) on real JPEGs;
  * the service, `python -m service` over HTTP (TensorRT backend, else PyTorch), each request carrying `batch`
    JPEGs, IN_FLIGHT clients at once.
Goals printed beside: >= 10,000 images/s raw for ViTAE-T in half precision at batch 256 on an H100; service >= 0.5x
its raw engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import closed_loop, free_port, real_jpegs, service_env, start, stop  # noqa: E402
from results import add_record_option, record  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference" / "vitae_t_official.safetensors"
RAW_GOAL, SERVICE_GOAL = 10_000.0, 0.5  # the goals: raw half at batch 256; service/raw
IN_FLIGHT = 64  # concurrent clients


def export_vitae_t(checkpoint: Path | None, out: Path, max_batch: int) -> dict:
    import torch

    from export import export_artifacts
    from model import create_model
    from model.checkpoint import checkpoint_metadata, save_checkpoint

    if checkpoint is None or not checkpoint.is_file():
        print("ViTAE-T: random weights (no reference checkpoint)")
        torch.manual_seed(0)
        model = create_model("vitae_t").eval()
        meta = checkpoint_metadata(model, variant="vitae_t", class_names=[f"class_{i}" for i in range(1000)])
        checkpoint, variant = save_checkpoint(model, out.parent / "vitae_t_random", meta), None
    else:
        print(f"ViTAE-T: {checkpoint}")
        variant = "vitae_t"
    started = time.perf_counter()
    meta = export_artifacts(checkpoint, out, variant=variant, max_batch=max_batch, precision="fp16", force=True)
    print(f"export with TensorRT FP16 engine (max batch {max_batch}): {time.perf_counter() - started:.1f} s")
    return meta


def print_agreement(meta: dict) -> None:
    trt = meta.get("tensorrt")
    if not trt:
        raise SystemExit("no TensorRT engine was built: see the export log above")
    parity = trt["parity"]
    print(
        f"TensorRT {trt['version']} on {trt['gpu_name']} (sm {trt['compute_capability']}), {trt['precision']}: "
        f"top-1 {parity['top1_agree']}/{parity['images']} agree with fp32, max |logits diff| "
        f"{parity['max_abs_diff']['logits']:.4g} (allowed {parity['tolerance']:g} x {parity['logit_scale']:.3g}), "
        f"max |tokens diff| {parity['max_abs_diff']['tokens']:.4g}, finite: {parity['finite']} "
        f"[{parity['inputs']}]"
    )


def print_fusion(out: Path) -> None:
    import onnx

    from export.fusion import format_fusion, fusion_problems, prm_fusion
    from export.graph import find_prm_blocks

    graph = onnx.load(str(out / "model.onnx"))
    layers = json.loads((out / "layers.json").read_text())
    report = prm_fusion(layers, find_prm_blocks(graph), [n.name for n in graph.graph.node])
    print(format_fusion(report))
    problems = fusion_problems(report)
    print(f"PRM branches fused: {len(report) - len(problems)}/{len(report)}")


def raw_engine(plan: Path, shape: tuple[int, int, int], batches: list[int], seconds: float) -> dict[int, float]:
    """Images/s of the engine alone: inputs already on the GPU, timed with CUDA events."""
    import tensorrt as trt
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    results = {}
    for batch in batches:
        x = torch.randn(batch, *shape, device="cuda")
        context.set_input_shape("images", tuple(x.shape))
        context.set_tensor_address("images", x.data_ptr())
        outputs = {}
        for name in ("logits", "tokens"):
            dtype = torch.float16 if engine.get_tensor_dtype(name) == trt.float16 else torch.float32
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
        for _ in range(10):
            context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        runs, elapsed = 0, 0.0
        while elapsed < seconds:
            begin.record(stream)
            for _ in range(20):
                context.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            runs += 20
            elapsed += begin.elapsed_time(end) / 1000
        results[batch] = runs * batch / elapsed
    return results


def backend_infer(artifacts: Path, shape: tuple[int, int, int], batches: list[int], seconds: float) -> dict[int, float]:
    """Images/s through the service's TensorRT backend: host arrays in, host arrays out."""
    from service.artifacts import read_artifacts
    from service.backends import TensorRTBackend

    backend = TensorRTBackend(read_artifacts(artifacts), "cuda")
    results = {}
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
        for _ in range(5):
            backend.infer(x)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            backend.infer(x)
            runs += 1
        results[batch] = runs * batch / (time.perf_counter() - started)
    backend.close()
    return results


def torch_rates(artifacts: Path, shape: tuple, batches: list[int], seconds: float, fast: bool) -> tuple[dict, str]:
    """Images/s through the PyTorch backend (host arrays in and out): eager fp32, or half + CUDA graphs."""
    from service.artifacts import read_artifacts
    from service.backends import TorchBackend

    backend = TorchBackend(
        read_artifacts(artifacts), "cuda", precision="auto" if fast else "fp32", graphs=fast, max_batch=max(batches)
    )
    results = {}
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
        for _ in range(3):
            backend.infer(x, token_rows=[])
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            backend.infer(x, token_rows=[])
            runs += 1
        results[batch] = runs * batch / (time.perf_counter() - started)
    label = f"{backend.precision}: {backend.precision_reason}"
    backend.close()
    return results, label


def decode_rate(prep, jpegs: list[bytes], batch: int, seconds: float) -> float:
    """Images/s of GPU decoding alone (nvJPEG batch + orientation, resize, crop, normalise), `batch` per call."""
    import torch

    from service.gpu_decode import GpuDecoder

    decoder = GpuDecoder(prep, "cuda")
    uploads = [jpegs[i % len(jpegs)] for i in range(batch)]
    decoder(uploads)
    torch.cuda.synchronize()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        decoder(uploads)
        runs += 1
    torch.cuda.synchronize()
    return runs * batch / (time.perf_counter() - started)


async def drive_batches(url: str, jpegs: list[bytes], batch: int, total_images: int) -> float:
    """Images/s of the service with `IN_FLIGHT` requests of `batch` JPEGs each in flight."""
    files = [("file", (f"{i}.jpg", jpegs[i % len(jpegs)], "image/jpeg")) for i in range(batch)]
    requests = max(IN_FLIGHT * 2, total_images // batch)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await http.post("/classify", files=files)  # warm-up
        loop = await closed_loop(http, IN_FLIGHT, requests, lambda http, _: http.post("/classify", files=files))
    if loop.errors:
        raise SystemExit(f"batch {batch}: {loop.errors} of {requests} requests to the service got no answer")
    return len(loop.latencies_s) * batch / loop.elapsed_s


def service_rates(
    artifacts: Path, batches: list[int], images: int, log: Path, backend: str = "tensorrt"
) -> dict[int, float]:
    port = free_port()
    env = service_env(
        artifacts,
        port,
        backend=backend,
        device="cuda",
        max_batch_size=max(batches),
        max_files=max(batches),
        max_delay_ms=2,
        queue_capacity=8 * IN_FLIGHT * max(batches),
        request_timeout_s=300,
        max_upload_bytes=1 << 30,
    )
    jpegs = real_jpegs(16)
    process = start([sys.executable, "-m", "service"], env, port, log, "/readyz")
    try:
        return {b: asyncio.run(drive_batches(f"http://127.0.0.1:{port}", jpegs, b, images)) for b in batches}
    finally:
        stop(process)


def has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def print_table(title: str, columns: dict[str, dict[int, float]], batches: list[int]) -> None:
    print(f"\n{title}")
    print(f"{'batch':>6} " + " ".join(f"{name:>22}" for name in columns))
    for batch in batches:
        print(f"{batch:6d} " + " ".join(f"{col.get(batch, float('nan')):22,.0f}" for col in columns.values()))


def result_rows(gpu: str, columns: dict[str, dict[int, float]]) -> list[dict[str, object]]:
    """The table as printed, one row per column and batch (benchmarks/results/gpu.csv's columns)."""
    return [
        {"gpu": gpu, "what": name, "batch": batch, "images_per_s": round(rate)}
        for name, rates in columns.items()
        for batch, rate in sorted(rates.items())
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REFERENCE)
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per raw measurement")
    parser.add_argument("--service-images", type=int, default=2048, help="images per service measurement")
    parser.add_argument("--out", type=Path, default=None, help="artifacts folder (default: a temporary one)")
    add_record_option(parser)
    args = parser.parse_args(argv)
    batches = sorted({int(b) for b in args.batches.split(",")})
    trt = has_tensorrt()

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    out = args.out or work / "artifacts"
    meta = export_vitae_t(args.checkpoint, out, max(batches))
    shape = tuple(meta["inputs"][0]["shape"][1:])
    columns: dict[str, dict[int, float]] = {}
    # PyTorch: eager fp32, then the fast path (half chosen by its gate, CUDA graphs, pinned copies).
    columns["torch fp32 eager"], _ = torch_rates(out, shape, batches, args.seconds, fast=False)
    columns["torch half + graphs"], label = torch_rates(out, shape, batches, args.seconds, fast=True)
    print(f"PyTorch fast path: {label}")
    if trt:
        print_agreement(meta)
        print_fusion(out)
        columns["TensorRT raw engine"] = raw_engine(out / "model.plan", shape, batches, args.seconds)
        columns["TensorRT backend.infer"] = backend_infer(out, shape, batches, args.seconds)
    else:
        print("skipped: TensorRT (the tensorrt package does not import here)")
    from service.artifacts import read_artifacts

    jpegs = real_jpegs(16)
    prep = read_artifacts(out).preprocessing
    decode = {b: decode_rate(prep, jpegs, b, args.seconds) for b in batches if b > 1}
    columns["GPU decode only"] = decode
    backend = "tensorrt" if trt else "torch"
    columns[f"service ({backend}, HTTP)"] = service_rates(out, batches, args.service_images, work / "s.log", backend)
    print_table(f"ViTAE-T 224, images/s on {gpu_name()}", columns, batches)

    raw = columns["TensorRT raw engine"] if trt else columns["torch half + graphs"]
    service = columns[f"service ({backend}, HTTP)"]
    best_batch = max(raw, key=raw.get)
    ratio = service[best_batch] / raw[best_batch]
    print(
        f"goals: raw >= {RAW_GOAL:,.0f} images/s at batch 256 on an H100: {raw.get(256, 0):,.0f} "
        f"({'meets' if raw.get(256, 0) >= RAW_GOAL else 'misses'}); service >= {SERVICE_GOAL}x its raw engine at "
        f"batch {best_batch}: {ratio:.2f} ({'meets' if ratio >= SERVICE_GOAL else 'misses'})"
    )
    record("gpu", result_rows(gpu_name(), columns), args.record)
    return 0


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    sys.exit(main())
