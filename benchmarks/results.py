"""Benchmark results as data: one CSV per benchmark under benchmarks/results/, one row per measured figure set.

Every row starts with where and how it was measured — date, machine (CPU model and core count), the CPU flags that
matter for these runtimes, the versions of the runtimes, the command — followed by the benchmark's own columns.
The docs render these files (docs/hooks.py), so a figure always appears beside its machine, date and command.

    from results import append_rows
    append_rows("export", [{"runtime": "exported, ORT ENABLE_ALL", "images_per_s": 37.5}])

Each script offers `--record [DIR]` (`add_record_option`) and, after printing its figures, hands the rows built from
them by its own `result_rows` to `record`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUN_COLUMNS = ("date", "machine", "cpu_flags", "versions", "command", "source")
# Flags that change which kernels OpenVINO, ONNX Runtime and PyTorch pick on x86 (bf16 and int8 paths above all).
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
PACKAGES = ("torch", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt-cu13")


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def machine() -> str:
    """CPU model and logical core count, e.g. `AMD EPYC 9B14, 2 cores`."""
    model = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def cpu_flags() -> str:
    flags = set(_cpuinfo().get("flags", "").split())
    return " ".join(flag for flag in FLAGS_THAT_MATTER if flag in flags)


def versions() -> str:
    found = []
    for package in PACKAGES:
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def command(argv: Sequence[str] | None = None) -> str:
    """The command line that measured the figures, without the `--record [DIR]` that only says where they go."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    args, rest = [], argv[1:]
    while rest:
        arg = rest.pop(0)
        if arg == "--record":
            if rest and not rest[0].startswith("-"):
                rest.pop(0)
        elif not arg.startswith("--record="):
            args.append(arg)
    return shlex.join(["python", str(script), *args])


def run_context(source: str = "") -> dict[str, str]:
    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "cpu_flags": cpu_flags(),
        "versions": versions(),
        "command": command(),
        "source": source,
    }


def append_rows(name: str, rows: Sequence[Mapping[str, object]], directory: Path = RESULTS_DIR) -> Path:
    """Append `rows` (the benchmark's own columns) to `<directory>/<name>.csv`, each preceded by this run's context.

    The file's header is written on first use; later rows must have the same columns, so one file stays one table.
    """
    if not rows:
        raise ValueError("no rows to record")
    figures = list(rows[0])
    for row in rows:
        if list(row) != figures:
            raise ValueError(f"every row needs the columns {figures}, got {list(row)}")
    header = [*RUN_COLUMNS, *figures]
    path = directory / f"{name}.csv"
    if path.exists():
        with path.open(newline="") as handle:
            existing = next(csv.reader(handle), [])
        if existing != header:
            raise ValueError(f"{path} has the columns {existing}; this run writes {header}")
    context = run_context()
    directory.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        if new:
            writer.writerow(header)
        for row in rows:
            writer.writerow([*(context[column] for column in RUN_COLUMNS), *(_cell(row[k]) for k in figures)])
    return path


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def add_record_option(parser: argparse.ArgumentParser) -> None:
    """`--record [DIR]`: append the printed figures as rows to DIR/<benchmark>.csv (DIR: benchmarks/results)."""
    parser.add_argument(
        "--record",
        nargs="?",
        const=RESULTS_DIR,
        default=None,
        type=Path,
        metavar="DIR",
        help="append the printed figures as rows to DIR/<benchmark>.csv (default DIR: benchmarks/results)",
    )


def record(name: str, rows: Sequence[Mapping[str, object]], directory: Path | None) -> None:
    """Append `rows` to `<directory>/<name>.csv` and say so; nothing when `directory` is None (no --record)."""
    if directory is None:
        return
    path = append_rows(name, rows, directory)
    print(f"recorded {len(rows)} row(s) in {path}")
