"""ViTAE-T on a GPU: TensorRT FP16 export, its agreement with fp32, the PRM fusion, raw and service images/s.

    python benchmarks/bench_gpu.py [--checkpoint PATH] [--batches 1,8,64,256] [--seconds 3]

Prints, in one run (not a test; run by benchmarks/gpu_check.sh):
  * the export of ViTAE-T at 224 with a TensorRT FP16 engine (max batch = the largest of --batches), its build time
    and the engine-vs-fp32 figures the export recorded in metadata.json;
  * for each PRM branch, the engine layer computing its Conv and Gelu (from layers.json);
  * raw TensorRT images/s per batch: the engine alone on device-resident inputs (CUDA events), and through the
    service's TensorRT backend (host numpy in and out, as the service calls it);
  * the service's images/s per batch: `python -m service` (TensorRT backend) driven over HTTP, each request
    carrying `batch` JPEGs, 4 requests in flight; and its ratio to the raw engine at that batch.
Goals printed beside: >= 10,000 images/s raw TensorRT FP16 for ViTAE-T on an H100-class GPU; service >= 0.85x raw.
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

from bench_service import free_port, real_jpegs, service_env, start, stop  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference" / "vitae_t_official.safetensors"
RAW_GOAL, SERVICE_GOAL = 10_000.0, 0.85
IN_FLIGHT = 4


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


async def drive_batches(url: str, jpegs: list[bytes], batch: int, total_images: int) -> float:
    """Images/s of the service with `IN_FLIGHT` requests of `batch` JPEGs each in flight."""
    files = [("file", (f"{i}.jpg", jpegs[i % len(jpegs)], "image/jpeg")) for i in range(batch)]
    requests = max(IN_FLIGHT * 2, total_images // batch)
    sent = 0
    answered = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent, answered
        while sent < requests:
            sent += 1
            response = await http.post("/classify", files=files)
            response.raise_for_status()
            answered += batch

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await http.post("/classify", files=files)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(IN_FLIGHT)))
        return answered / (time.perf_counter() - started)


def service_rates(artifacts: Path, batches: list[int], images: int, log: Path) -> dict[int, float]:
    port = free_port()
    env = service_env(
        artifacts,
        port,
        backend="tensorrt",
        device="cuda",
        max_batch_size=max(batches),
        max_files=max(batches),
        max_delay_ms=2,
        queue_capacity=8 * IN_FLIGHT * max(batches),
        request_timeout_s=300,
        max_upload_bytes=1 << 30,
    )
    jpegs = real_jpegs(16)
    process = start([sys.executable, "-m", "service"], env, port, log)
    try:
        return {b: asyncio.run(drive_batches(f"http://127.0.0.1:{port}", jpegs, b, images)) for b in batches}
    finally:
        stop(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REFERENCE)
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per raw measurement")
    parser.add_argument("--service-images", type=int, default=2048, help="images per service measurement")
    parser.add_argument("--out", type=Path, default=None, help="artifacts folder (default: a temporary one)")
    args = parser.parse_args(argv)
    batches = sorted({int(b) for b in args.batches.split(",")})

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    out = args.out or work / "artifacts"
    meta = export_vitae_t(args.checkpoint, out, max(batches))
    print_agreement(meta)
    print_fusion(out)

    shape = tuple(meta["inputs"][0]["shape"][1:])
    raw = raw_engine(out / "model.plan", shape, batches, args.seconds)
    infer = backend_infer(out, shape, batches, args.seconds)
    service = service_rates(out, batches, args.service_images, work / "service.log")

    print(f"\nViTAE-T 224, TensorRT FP16, images/s (goals: raw >= {RAW_GOAL:,.0f} on H100-class, service >= "
          f"{SERVICE_GOAL}x raw)")  # fmt: skip
    print(f"{'batch':>6} {'raw engine':>12} {'backend.infer':>14} {'service':>10} {'service/raw':>12}")
    for batch in batches:
        ratio = service[batch] / raw[batch]
        print(f"{batch:6d} {raw[batch]:12,.0f} {infer[batch]:14,.0f} {service[batch]:10,.0f} {ratio:12.2f}")
    best = max(raw.values())
    best_batch = max(raw, key=raw.get)
    print(
        f"best raw {best:,.0f} images/s at batch {best_batch}: {'meets' if best >= RAW_GOAL else 'misses'} the "
        f"{RAW_GOAL:,.0f} goal; service/raw at that batch {service[best_batch] / best:.2f} "
        f"({'meets' if service[best_batch] / best >= SERVICE_GOAL else 'misses'} {SERVICE_GOAL})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
