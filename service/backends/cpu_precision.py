"""Which precision the OpenVINO CPU backend serves: fp32, bf16 or int8, from the setting, what this CPU computes
natively and of which kind it is, and what the export measured (metadata.json `cpu_bf16`, `cpu_int8`).

A reduced precision is usable when the CPU computes it natively, the export measured it as safe for this model,
and it measured it on a CPU of the same kind (export.precision.cpu_kind: AMX and AVX-512 run different
kernels). `auto` serves the fastest usable one by the export's own figures (int8 only where it measured faster
than the alternative); a forced reduced precision that is not usable stops the start with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CPU_PRECISION_CHOICES = ("auto", "bf16", "int8", "fp32")
NATIVE = {"bf16": "AVX512_BF16 or AMX", "int8": "AVX512_VNNI, AVX_VNNI or AMX_INT8"}
RECORD = {"bf16": "cpu_bf16", "int8": "cpu_int8"}


class PrecisionRefused(RuntimeError):
    """A reduced precision was asked for but cannot be served safely here; the message says why and what to do."""


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "bf16", "int8" or "fp32"
    reason: str


def unusable(precision: str, native: bool, report: dict[str, Any] | None, kind: str | None) -> str | None:
    """Why `precision` cannot be served here, or None when it can."""
    report = report or {}
    safe = report.get("safe")
    if not native:
        return f"this CPU has no native {precision} ({NATIVE[precision]})"
    if safe is None:
        return (
            f"the export did not measure {precision} for this model ("
            + (report.get("reason") or f"no {RECORD[precision]} record")
            + ")"
        )
    if not safe:
        return f"the export measured {precision} as unsafe for this model ({report.get('reason')})"
    if kind and report.get("cpu_kind") and report["cpu_kind"] != kind:
        return (
            f"the export measured {precision} on a CPU of another kind ({report['cpu_kind']}, this one is {kind}); "
            "export again on this machine to measure it here"
        )
    return None


def choose_cpu_precision(
    requested: str,
    native_bf16: bool,
    export_report: dict[str, Any] | None,
    cpu_kind: str | None = None,
    *,
    native_int8: bool = False,
    int8_report: dict[str, Any] | None = None,
) -> PrecisionChoice:
    """The CPU precision to serve (see the module's docstring). `export_report` is `cpu_bf16`."""
    if requested not in CPU_PRECISION_CHOICES:
        raise ValueError(f"VITAE_CPU_PRECISION must be one of {', '.join(CPU_PRECISION_CHOICES)}, got {requested!r}")
    if requested == "fp32":
        return PrecisionChoice("fp32", "VITAE_CPU_PRECISION=fp32")
    why = {
        "bf16": unusable("bf16", native_bf16, export_report, cpu_kind),
        "int8": unusable("int8", native_int8, int8_report, cpu_kind),
    }
    if requested != "auto":
        if why[requested] is not None:
            raise PrecisionRefused(f"VITAE_CPU_PRECISION={requested} refused: {why[requested]}; use auto or fp32")
        return _served(requested, requested, export_report, int8_report)
    if why["int8"] is None and _int8_is_fastest(int8_report or {}, bf16_usable=why["bf16"] is None):
        return _served("int8", requested, export_report, int8_report)
    if why["bf16"] is None:
        return _served("bf16", requested, export_report, int8_report)
    reasons = why["bf16"] if int8_report is None else f"{why['bf16']}, and {why['int8']}"
    return PrecisionChoice("fp32", f"VITAE_CPU_PRECISION=auto: fp32 because {reasons}")


def _int8_is_fastest(report: dict[str, Any], bf16_usable: bool) -> bool:
    """Whether the export measured int8 faster than fp32 and, where bf16 is usable, than bf16 too."""
    int8 = report.get("int8_images_per_s") or 0.0
    rivals = [report.get("fp32_images_per_s") or 0.0] + (
        [report.get("bf16_images_per_s") or 0.0] if bf16_usable else []
    )
    return int8 > max(rivals)


def _served(
    precision: str, requested: str, bf16: dict[str, Any] | None, int8: dict[str, Any] | None
) -> PrecisionChoice:
    report = (bf16 if precision == "bf16" else int8) or {}
    figures = f"top-1 agreement {report.get('top1_agreement')} %"
    if precision == "bf16":
        figures += f", max logit diff {report.get('max_logit_diff')}"
    else:
        figures += (
            f", top-1 {report.get('int8_top1')} vs fp32 {report.get('fp32_top1')}; "
            f"{report.get('int8_images_per_s')} images/s vs fp32 {report.get('fp32_images_per_s')}"
            f" and bf16 {report.get('bf16_images_per_s')}"
        )
    return PrecisionChoice(precision, f"VITAE_CPU_PRECISION={requested}: native {precision}, measured safe ({figures})")
