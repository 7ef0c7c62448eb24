"""What the KServe v2 wire format costs the server: binary tensor data vs JSON for one FP32 batch (not a test).

    python benchmarks/bench_v2_wire.py [--batch 8] [--size 224] [--channels 3] [--repeat 3]

tritonclient builds the request body both ways (its own encoder, as a client would send it); the service's
parser reads each body; the best of --repeat runs is printed, with the body sizes and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.http as triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import add_record_option, record  # noqa: E402

from service.v2 import parse_infer_request  # noqa: E402

ENCODINGS = {"binary": "binary tensor data", "json": "JSON"}


def best_parse_s(body: bytes, header_length: int | None, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        parse_infer_request(body, None if header_length is None else str(header_length))
        times.append(time.perf_counter() - started)
    return min(times)


def measure(pixels: np.ndarray, repeat: int) -> dict[str, tuple[int, float]]:
    """{encoding: (body bytes, best parse s)} for `pixels` sent as binary tensor data and as JSON."""
    figures = {}
    for name, binary in (("binary", True), ("json", False)):
        tensor = triton.InferInput("images", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
        figures[name] = (len(body), best_parse_s(body, header_length, repeat))
        print(f"{name:>6}: body {figures[name][0] / 1e6:6.1f} MB, parse {figures[name][1] * 1000:9.1f} ms")
    return figures


def result_rows(shape: tuple[int, ...], figures: dict[str, tuple[int, float]]) -> list[dict[str, object]]:
    """One row per encoding as printed (benchmarks/results/v2_wire.csv's columns)."""
    return [
        {
            "input": f"images FP32 {list(shape)}, {ENCODINGS[name]}",
            "batch": shape[0],
            "body_mb": round(body_bytes / 1e6, 1),
            "parse_ms": round(parse_s * 1000, 1),
        }
        for name, (body_bytes, parse_s) in figures.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    add_record_option(parser)
    args = parser.parse_args()
    pixels = np.random.default_rng(0).standard_normal((args.batch, args.channels, args.size, args.size))
    pixels = pixels.astype(np.float32)  # (B, C, S, S)
    figures = measure(pixels, args.repeat)
    (binary_bytes, binary_s), (json_bytes, json_s) = figures["binary"], figures["json"]
    print(f"JSON / binary: {json_bytes / binary_bytes:.1f}x the bytes, {json_s / binary_s:.0f}x the parse time")
    record("v2_wire", result_rows(pixels.shape, figures), args.record)


if __name__ == "__main__":
    main()
