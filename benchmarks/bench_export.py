"""Images/s of the exported ONNX model in ONNX Runtime vs a plain `torch.onnx.export` vs PyTorch eager.

Same model (ViTAE-T at 224; the shared released weights when present, else random), same batch, same thread
count, same process, interleaved rounds so background load hits all three alike. Not a test:

    python benchmarks/bench_export.py [--batch 8] [--threads N] [--rounds 5] [--weights PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import add_record_option, record  # noqa: E402

from export.artifacts import INPUT_NAME, OUTPUT_NAMES  # noqa: E402
from export.fold import fold_batchnorms  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from export.serving import ServingModel  # noqa: E402
from model import create_model, load_weights  # noqa: E402

EXPORTED, PLAIN = "exported (export/)", "plain torch.onnx.export"
SHARED_WEIGHTS = ROOT.parent / "shared" / "reference" / "vitae_t_official.safetensors"


def plain_export(model: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    """What a user gets from one `torch.onnx.export` call on the unfolded model: default opset, no clean-up."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ServingModel(model).eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch"}},
        )


def ort_runner(path: Path, threads: int, level: ort.GraphOptimizationLevel, load_times: dict, label: str):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    load_times[label] = time.perf_counter() - start
    return lambda x: session.run(None, {INPUT_NAME: x})


def torch_runner(model: torch.nn.Module):
    def run(x: np.ndarray):
        with torch.inference_mode():
            tokens = model.forward_features(torch.from_numpy(x))
            return model.forward_head(tokens), tokens

    return run


def time_once(run, x: np.ndarray, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        run(x)
    return len(x) * iters / (time.perf_counter() - start)


def measure(model: torch.nn.Module, x: np.ndarray, args: argparse.Namespace) -> tuple[dict, dict]:
    """Images/s of every runner (median of the rounds) and each ONNX session's load time in s."""
    with tempfile.TemporaryDirectory() as tmp:
        ours, plain = Path(tmp) / "ours.onnx", Path(tmp) / "plain.onnx"
        export_onnx(fold_batchnorms(model), ours)
        plain_export(model, plain, torch.from_numpy(x))
        # ORT's default level (ALL) re-does much of the graph work at session load; BASIC shows the graphs as
        # exported (constant folding and redundant-node removal only), i.e. what a runtime that does not rewrite
        # the graph would see.
        opt = ort.GraphOptimizationLevel
        levels = {"ALL": opt.ORT_ENABLE_ALL, "BASIC": opt.ORT_ENABLE_BASIC}
        load_times: dict[str, float] = {}
        runners = {}
        for level_name, level in levels.items():
            for label, path in ((EXPORTED, ours), (PLAIN, plain)):
                name = f"{label}, ORT {level_name}"
                runners[name] = ort_runner(path, args.threads, level, load_times, name)
        runners["PyTorch eager"] = torch_runner(model)
        for run in runners.values():  # warm-up
            run(x)
        samples: dict[str, list[float]] = {name: [] for name in runners}
        names = list(runners)
        for r in range(args.rounds):
            # Rotate the order each round so no runner always goes first after another's burst of load.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                samples[name].append(time_once(runners[name], x, args.iters))
    return {name: float(np.median(v)) for name, v in samples.items()}, load_times


def vs_plain(speeds: dict[str, float]) -> dict[str, float]:
    """Each runner's images/s over the plain export's at the same ORT level (PyTorch eager: over ORT ALL's)."""
    ratios = {}
    for name, speed in speeds.items():
        level = name.rsplit("ORT ", 1)[-1] if "ORT " in name else "ALL"
        ratios[name] = speed / speeds[f"{PLAIN}, ORT {level}"]
    return ratios


def result_rows(speeds: dict[str, float]) -> list[dict[str, object]]:
    """The table's rows as printed (benchmarks/results/export.csv's columns)."""
    ratios = vs_plain(speeds)
    return [
        {"runtime": name, "images_per_s": round(speed, 1), "vs_plain_export": round(ratios[name], 2)}
        for name, speed in speeds.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the median is reported")
    parser.add_argument("--iters", type=int, default=3, help="batches per round")
    parser.add_argument("--weights", type=Path, default=SHARED_WEIGHTS)
    add_record_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = create_model("vitae_t").eval()
    origin = "random weights"
    if args.weights.is_file():
        load_weights(model, args.weights)
        origin = args.weights.name
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    speeds, load_times = measure(model, x, args)

    print(
        f"ViTAE-T 224 ({origin}), batch {args.batch}, {args.threads} threads, "
        f"median of {args.rounds} rounds x {args.iters} batches; torch {torch.__version__}, ORT {ort.__version__}"
    )
    print(f"| {'runtime':<36} | {'images/s':>9} | {'vs plain export (same ORT level)':>32} | {'session load s':>14} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 34}|{'-' * 16}|")
    ratios = vs_plain(speeds)
    for name, speed in speeds.items():
        load = f"{load_times[name]:.2f}" if name in load_times else "-"
        print(f"| {name:<36} | {speed:>9.1f} | {ratios[name]:>31.2f}x | {load:>14} |")
    record("export", result_rows(speeds), args.record)


if __name__ == "__main__":
    main()
