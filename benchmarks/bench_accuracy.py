"""Top-1 of the demo model served over HTTP in bf16 and in fp32, on the Fashion-MNIST test set (not a test).

    python benchmarks/bench_accuracy.py [--checkpoint demo/model/vitae_fmnist.safetensors] [--limit 10000]

Exports the checkpoint, then starts `python -m service` twice on it (openvino backend,
VITAE_CPU_PRECISION=bf16, then fp32) and sends every test image as a PNG through POST /classify
(multipart, 64 images a request), as a client would. Prints both top-1 figures, their difference
against the goal (within 0.2 points) and how often the two agree. Needs a CPU with native bf16.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import ServerFailed, free_port, service_env, start, stop  # noqa: E402
from results import add_record_option, record  # noqa: E402

DEMO = ROOT / "demo" / "model" / "vitae_fmnist.safetensors"
FILES_PER_REQUEST = 64
MAX_LOSS = 0.2  # points of top-1


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


async def classify_all(url: str, images: list[bytes], concurrency: int = 4) -> np.ndarray:
    """The service's top-1 class index for every image, in order."""
    chunks = [images[i : i + FILES_PER_REQUEST] for i in range(0, len(images), FILES_PER_REQUEST)]
    answers: list[list[int] | None] = [None] * len(chunks)
    queue = list(range(len(chunks)))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            index = queue.pop()
            files = [("file", (f"{index}_{j}.png", data, "image/png")) for j, data in enumerate(chunks[index])]
            response = await http.post("/classify", files=files, params={"top_k": 1})
            response.raise_for_status()
            answers[index] = [r["predictions"][0]["index"] for r in response.json()["results"]]

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return np.array([i for chunk in answers for i in chunk])


def served_predictions(artifacts: Path, precision: str, images: list[bytes], workdir: Path) -> np.ndarray:
    port = free_port()
    env = service_env(
        artifacts, port, backend="openvino", device="cpu", cpu_precision=precision, max_files=FILES_PER_REQUEST
    )
    process = start([sys.executable, "-m", "service"], env, port, workdir / f"service-{precision}.log", "/readyz")
    try:
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        print(f"  service: {ready['backend']} on {ready['device']} in {ready['precision']}")
        if ready["precision"] != precision:
            raise SystemExit(f"asked for {precision}, the service runs {ready['precision']}")
        return asyncio.run(classify_all(f"http://127.0.0.1:{port}", images))
    finally:
        stop(process)


@dataclass
class Accuracy:
    """Top-1 % per precision served (bf16 missing where the service refused it) and how often the two agree."""

    model: str
    images: int
    top1: dict[str, float]
    agreement: float | None  # % of images where bf16 and fp32 answer the same class; None: not both served


def measure(checkpoint: Path, limit: int) -> Accuracy:
    """Export `checkpoint`, then serve it in bf16 and in fp32 and send the first `limit` test images through each."""
    import export
    from export.inputs import fashion_mnist_test

    test = fashion_mnist_test()
    if test is None:
        raise SystemExit("no Fashion-MNIST test set (make data)")
    pixels, labels = test[0][:limit], test[1][:limit]
    workdir = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    artifacts = workdir / "artifacts"
    meta = export.export_artifacts(checkpoint, artifacts)
    bf16 = meta["cpu_bf16"]
    print(f"export's bf16 check: safe={bf16['safe']} ({bf16['reason']})")
    images = [png(p) for p in pixels]
    top1 = {}
    predictions = {}
    for precision in ("bf16", "fp32"):
        print(f"{precision}: {len(images)} Fashion-MNIST test images over HTTP")
        try:
            predictions[precision] = served_predictions(artifacts, precision, images, workdir)
        except ServerFailed as exc:
            print(f"  the service refused to start: {exc}")
            continue
        top1[precision] = 100.0 * float((predictions[precision] == labels).mean())
        print(f"  top-1 {top1[precision]:.2f} %")
    agreement = None
    if len(predictions) == 2:
        agreement = 100.0 * float((predictions["bf16"] == predictions["fp32"]).mean())
    return Accuracy(meta["name"], len(images), top1, agreement)


def report(accuracy: Accuracy) -> bool:
    """Print both top-1 figures against the goal; False when bf16 could not be compared."""
    top1 = accuracy.top1
    if "bf16" not in top1:
        print(f"fp32 top-1 {top1.get('fp32', float('nan')):.2f} %; bf16 could not be served here, so not compared")
        return False
    loss = top1["fp32"] - top1["bf16"]
    print()
    print(f"{accuracy.model} on {accuracy.images} Fashion-MNIST test images, through the service over HTTP")
    print(f"| precision | top-1 % |\n| --- | ---: |\n| fp32 | {top1['fp32']:.2f} |\n| bf16 | {top1['bf16']:.2f} |")
    verdict = "met" if loss <= MAX_LOSS else "NOT met"
    print(
        f"bf16 - fp32: {-loss:+.2f} points (goal: loss <= {MAX_LOSS}: {verdict}); "
        f"top-1 agreement {accuracy.agreement:.2f} %"
    )
    return True


def result_rows(accuracy: Accuracy) -> list[dict[str, object]]:
    """One row per precision served (benchmarks/results/accuracy.csv's columns); the agreement on bf16's row."""
    return [
        {
            "model": accuracy.model,
            "precision": precision,
            "top1_percent": round(top1, 2),
            "top1_agreement_percent": None
            if precision == "fp32" or accuracy.agreement is None
            else round(accuracy.agreement, 2),
        }
        for precision, top1 in sorted(accuracy.top1.items(), key=lambda item: item[0] != "fp32")
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEMO)
    parser.add_argument("--limit", type=int, default=10_000, help="test images to send (default: all 10,000)")
    add_record_option(parser)
    args = parser.parse_args(argv)

    accuracy = measure(args.checkpoint, args.limit)
    compared = report(accuracy)
    if accuracy.top1:
        record("accuracy", result_rows(accuracy), args.record)
    return 0 if compared else 1


if __name__ == "__main__":
    raise SystemExit(main())
