"""`python -m export`: rebuild the serving artifacts from a checkpoint (see `export_artifacts`)."""

from __future__ import annotations

import argparse
import logging
import sys

from model import VARIANTS

from .artifacts import ArtifactsMetadata
from .labels import read_labels_file
from .pipeline import PRECISIONS, export_artifacts

DEFAULT_CHECKPOINT = "demo/model/vitae_fmnist.safetensors"
DEFAULT_OUT = "artifacts"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="project checkpoint or released weights")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="architecture of a released weights file")
    parser.add_argument("--num-classes", type=int, help="classes of a released weights file (default 1000)")
    parser.add_argument(
        "--labels", metavar="FILE", help="class names in index order: one per line or a JSON list (any checkpoint)"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="artifacts folder (the service's default)")
    parser.add_argument("--max-batch", type=int, default=32, help="largest batch the artifacts must serve")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16", help="TensorRT engine precision")
    parser.add_argument("--triton-repo", help="also write a Triton model repository here (the ONNX model)")
    parser.add_argument(
        "--triton-plan",
        action="store_true",
        help="also put the TensorRT plan in the Triton repository, as a model named after its TensorRT version",
    )
    parser.add_argument(
        "--no-tensorrt", action="store_true", help="build no TensorRT plan even where TensorRT and a GPU are present"
    )
    parser.add_argument(
        "--cpu-int8",
        action="store_true",
        help="also build an OpenVINO int8 model (NNCF with accuracy control) and measure it against fp32 here",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the artifacts are current")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        labels = read_labels_file(args.labels) if args.labels else None
        written = export_artifacts(
            args.checkpoint,
            args.out,
            variant=args.variant,
            num_classes=args.num_classes,
            max_batch=args.max_batch,
            precision=args.precision,
            triton_repo=args.triton_repo,
            triton_plan=args.triton_plan,
            force=args.force,
            labels=labels,
            tensorrt=not args.no_tensorrt,
            cpu_int8=args.cpu_int8,
        )
    # CheckpointError, GraphCheckError and LabelsError are ValueErrors, ParityError a RuntimeError.
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    meta = ArtifactsMetadata.from_dict(written)
    print(f"{meta.name} {meta.version}: {', '.join(meta.files.values())} in {args.out}")
    bf16 = meta.cpu_bf16 or {}
    print(f"CPU bf16 {verdict_word(bf16.get('safe'))} ({bf16.get('reason')})")
    if bf16.get("safe") is not None:
        print(
            f"  top-1 agreement {bf16['top1_agreement']} %, max logit diff {bf16['max_logit_diff']} "
            f"on {bf16['inputs']}; top-1 bf16 {bf16['bf16_top1']} vs fp32 {bf16['fp32_top1']}; "
            f"{bf16['bf16_images_per_s']} vs fp32 {bf16['fp32_images_per_s']} images/s"
        )
    if meta.cpu_int8:
        int8 = meta.cpu_int8
        print(f"CPU int8 {verdict_word(int8.get('safe'))} ({int8.get('reason')})")
        if int8.get("safe") is not None:
            print(
                f"  top-1 agreement {int8['top1_agreement']} % on {int8['inputs']}; top-1 int8 {int8['int8_top1']} "
                f"vs fp32 {int8['fp32_top1']}; {int8['int8_images_per_s']} vs fp32 {int8['fp32_images_per_s']} "
                f"(bf16 {int8['bf16_images_per_s']}) images/s"
            )
    return 0


def verdict_word(safe: bool | None) -> str:
    return {True: "safe", False: "unsafe", None: "not measured"}[safe]


if __name__ == "__main__":
    sys.exit(main())
