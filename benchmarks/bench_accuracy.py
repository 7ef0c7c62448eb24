"""Top-1 of the demo model served over HTTP in a reduced precision and in fp32, on the Fashion-MNIST test set
(not a test).

    python benchmarks/bench_accuracy.py [--checkpoint demo/model/vitae_fmnist.safetensors] [--limit 10000]
                                        [--precision auto|bf16|int8]

Exports the checkpoint (with the int8 model for int8 and auto), then starts `python -m service` twice on it
(openvino backend, VITAE_CPU_PRECISION=--precision, then fp32) and sends every test image as a PNG through
POST /classify (multipart, 64 images a request), as a client would. With auto (the default) the service picks, and
the precision it picked is the one compared; where it picks fp32 there is nothing to compare and fp32 is served
once. Prints both top-1 figures, their difference against the goal (within 0.2 points) and how often the two
agree. bf16 needs a CPU with native bf16, int8 one with native int8.
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


def served_predictions(artifacts: Path, precision: str, images: list[bytes], workdir: Path) -> tuple[str, np.ndarray]:
    """The precision the service runs when asked for `precision`, and its answers."""
    port = free_port()
    env = service_env(
        artifacts, port, backend="openvino", device="cpu", cpu_precision=precision, max_files=FILES_PER_REQUEST
    )
    process = start([sys.executable, "-m", "service"], env, port, workdir / f"service-{precision}.log", "/readyz")
    try:
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        print(f"  service: {ready['backend']} on {ready['device']} in {ready['precision']}")
        if precision != "auto" and ready["precision"] != precision:
            raise SystemExit(f"asked for {precision}, the service runs {ready['precision']}")
        return ready["precision"], asyncio.run(classify_all(f"http://127.0.0.1:{port}", images))
    finally:
        stop(process)


@dataclass
class Accuracy:
    """Top-1 % per precision served (the reduced one missing where the service refused it) and how often the
    two agree."""

    model: str
    images: int
    top1: dict[str, float]
    agreement: float | None  # % of images where the reduced precision and fp32 agree; None: not both served
    auto_chose: str | None = None  # what VITAE_CPU_PRECISION=auto served, when it was asked for


def measure(checkpoint: Path, limit: int, precision: str = "auto") -> Accuracy:
    """Export `checkpoint`, then serve it in `precision` and in fp32 and send the first `limit` test images through
    each."""
    import export
    from export.inputs import fashion_mnist_test

    test = fashion_mnist_test()
    if test is None:
        raise SystemExit("no Fashion-MNIST test set (make data)")
    pixels, labels = test[0][:limit], test[1][:limit]
    workdir = Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    artifacts = workdir / "artifacts"
    meta = export.export_artifacts(checkpoint, artifacts, cpu_int8=precision in ("int8", "auto"))
    for record_name in ("cpu_bf16", "cpu_int8"):
        if meta.get(record_name):
            print(f"export's {record_name}: safe={meta[record_name]['safe']} ({meta[record_name]['reason']})")
    images = [png(p) for p in pixels]
    top1 = {}
    predictions = {}
    auto_chose = None
    for asked in (precision, "fp32"):
        if asked in predictions:  # auto served fp32: the baseline is already measured
            continue
        print(f"{asked}: {len(images)} Fashion-MNIST test images over HTTP")
        try:
            served, answers = served_predictions(artifacts, asked, images, workdir)
        except ServerFailed as exc:
            print(f"  the service refused to start: {exc}")
            continue
        if asked == "auto":
            auto_chose = served
        predictions[served] = answers
        top1[served] = 100.0 * float((answers == labels).mean())
        print(f"  top-1 {top1[served]:.2f} %")
    agreement = None
    if len(predictions) == 2:
        reduced = next(p for p in predictions if p != "fp32")
        agreement = 100.0 * float((predictions[reduced] == predictions["fp32"]).mean())
    return Accuracy(meta["name"], len(images), top1, agreement, auto_chose)


def report(accuracy: Accuracy) -> bool:
    """Print both top-1 figures against the goal; False when no reduced precision could be compared."""
    top1 = accuracy.top1
    reduced = next((p for p in top1 if p != "fp32"), None)
    if accuracy.auto_chose == "fp32" and "fp32" in top1:
        print(f"auto served fp32 on this CPU (no reduced precision passed its gate here): top-1 {top1['fp32']:.2f} %")
        return True
    if reduced is None or "fp32" not in top1:
        print(f"fp32 top-1 {top1.get('fp32', float('nan')):.2f} %; the reduced precision was not served, not compared")
        return False
    loss = top1["fp32"] - top1[reduced]
    print()
    print(f"{accuracy.model} on {accuracy.images} Fashion-MNIST test images, through the service over HTTP")
    print("| precision | top-1 % |\n| --- | ---: |")
    print(f"| fp32 | {top1['fp32']:.2f} |\n| {reduced} | {top1[reduced]:.2f} |")
    verdict = "met" if loss <= MAX_LOSS else "NOT met"
    print(
        f"{reduced} - fp32: {-loss:+.2f} points (goal: loss <= {MAX_LOSS}: {verdict}); "
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
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "int8"),
        default="auto",
        help="compared against fp32 (default auto: what the service picks on this CPU)",
    )
    add_record_option(parser)
    args = parser.parse_args(argv)

    accuracy = measure(args.checkpoint, args.limit, args.precision)
    compared = report(accuracy)
    if accuracy.top1:
        record("accuracy", result_rows(accuracy), args.record)
    return 0 if compared else 1


if __name__ == "__main__":
    raise SystemExit(main())
