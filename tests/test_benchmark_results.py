"""Each benchmark's `--record` rows: its printed figures under exactly the columns of its CSV in benchmarks/results/.

No benchmark runs here: each script's `result_rows` is a pure function of its result structure, given a small
synthetic result; the rows must be what the script prints and must append to a copy of the committed file.
"""

from __future__ import annotations

import collections
import csv
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from support.checkpoints import ROOT

BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from results import RUN_COLUMNS, append_rows, command  # noqa: E402


def script(name: str):
    """A benchmark script as a module (its main does not run)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def figure_columns(csv_name: str) -> list[str]:
    with (BENCHMARKS / "results" / f"{csv_name}.csv").open(newline="") as handle:
        header = next(csv.reader(handle))
    assert header[: len(RUN_COLUMNS)] == list(RUN_COLUMNS)
    return header[len(RUN_COLUMNS) :]


def appended(csv_name: str, rows: list[dict], tmp_path: Path) -> list[dict[str, str]]:
    """Append `rows` to a copy of the committed CSV (append_rows refuses other columns); the rows as written."""
    committed = BENCHMARKS / "results" / f"{csv_name}.csv"
    if committed.exists():
        shutil.copy(committed, tmp_path / committed.name)
    path = append_rows(csv_name, rows, tmp_path)
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))[-len(rows) :]


def service_run():
    bench = script("bench_service")
    served = {"images_per_s": 17.44, "p50": 1791.2, "p95": 1953.6, "cpu_ms_per_image": 107.3}
    served |= {"client_cpu_ms_per_image": 5.8, "errors": 0}
    return bench.Run(
        clients=32,
        engine="openvino fp32, 2 stream(s)",
        raw={1: 19.53, 2: 18.0},
        raw_cpu={1: 101.2, 2: 99.0},
        ort_raw={1: 20.0, 2: 20.84},
        service=served,
        cam=served | {"images_per_s": 15.6},
        naive=served | {"images_per_s": 15.64},
        litserve=None,
    )


def test_service_rows_are_the_printed_table(tmp_path, capsys):
    run = service_run()
    rows = script("bench_service").result_rows(run)
    assert [list(row) for row in rows] == [figure_columns("service")] * len(rows)
    assert [row["what"] for row in rows] == [
        "raw engine: openvino fp32, 2 stream(s), best batch 1",
        "raw ONNX Runtime fp32 on model.onnx, best batch",
        "this service, cam=false",
        "this service, cam=true",
        "naive endpoint",
    ]
    written = appended("service", rows, tmp_path)
    assert [written[0][k] for k in ("images_per_s", "p50_ms", "server_cpu_ms_per_image")] == ["19.5", "", "101"]
    assert written[1]["images_per_s"] == "20.8"
    assert [written[2][k] for k in ("images_per_s", "p50_ms", "p95_ms", "loadgen_cpu_ms_per_image")] == [
        "17.4",
        "1791",
        "1954",
        "6",
    ]
    script("bench_service").report(run)
    printed = capsys.readouterr().out
    assert "| raw engine: openvino fp32, 2 stream(s), best batch 1 | 19.5 | | | 101 | |" in printed
    assert "| this service, cam=false | 17.4 | 1791 | 1954 | 107 | 6 |" in printed


def test_service_rows_include_litserve_when_it_ran():
    run = service_run()
    run.litserve = run.naive | {"images_per_s": 14.5}
    rows = script("bench_service").result_rows(run)
    assert rows[-1]["what"] == "LitServe" and rows[-1]["images_per_s"] == 14.5


def test_export_rows_give_each_runtime_against_the_plain_export_at_its_level(tmp_path):
    bench = script("bench_export")
    plain, exported = bench.PLAIN, bench.EXPORTED
    speeds = {f"{exported}, ORT ALL": 37.52, f"{plain}, ORT ALL": 38.1, f"{exported}, ORT BASIC": 32.6}
    speeds |= {f"{plain}, ORT BASIC": 34.3, "PyTorch eager": 30.0}
    rows = bench.result_rows(speeds)
    assert [list(row) for row in rows] == [figure_columns("export")] * len(rows)
    written = {row["runtime"]: row for row in appended("export", rows, tmp_path)}
    assert written[f"{exported}, ORT ALL"]["images_per_s"] == "37.5"
    assert written[f"{exported}, ORT ALL"]["vs_plain_export"] == "0.98"
    assert written[f"{exported}, ORT BASIC"]["vs_plain_export"] == "0.95"  # against BASIC's plain export
    assert written["PyTorch eager"]["vs_plain_export"] == "0.79"  # against ORT ALL's


def test_accuracy_rows_put_the_agreement_on_bf16s_row(tmp_path):
    bench = script("bench_accuracy")
    accuracy = bench.Accuracy("demo model (W)", 10_000, {"bf16": 94.07, "fp32": 94.06}, 99.931)
    rows = bench.result_rows(accuracy)
    assert [list(row) for row in rows] == [figure_columns("accuracy")] * 2
    written = appended("accuracy", rows, tmp_path)
    assert [(r["precision"], r["top1_percent"], r["top1_agreement_percent"]) for r in written] == [
        ("fp32", "94.06", ""),
        ("bf16", "94.07", "99.93"),
    ]


def test_accuracy_rows_without_bf16_hold_fp32_alone():
    bench = script("bench_accuracy")
    rows = bench.result_rows(bench.Accuracy("demo", 100, {"fp32": 94.0}, None))
    assert [(row["precision"], row["top1_agreement_percent"]) for row in rows] == [("fp32", None)]


def test_accuracy_where_auto_served_fp32_reports_nothing_to_compare(capsys):
    bench = script("bench_accuracy")
    assert bench.report(bench.Accuracy("demo", 100, {"fp32": 94.0}, None, auto_chose="fp32"))
    assert "auto served fp32" in capsys.readouterr().out
    assert not bench.report(bench.Accuracy("demo", 100, {"fp32": 94.0}, None))  # bf16 asked for and refused


@pytest.mark.parametrize(("flags", "builds_int8"), [({"avx2", "avx512f"}, False), ({"avx2", "avx512_vnni"}, True)])
def test_service_benchmark_builds_int8_by_default_only_where_the_cpu_multiplies_it(monkeypatch, flags, builds_int8):
    import export.precision

    bench = script("bench_service")
    monkeypatch.setattr(export.precision, "cpu_flags", lambda: flags)
    assert bench.parse_args([]).cpu_int8 is builds_int8
    assert bench.parse_args(["--no-cpu-int8"]).cpu_int8 is False
    assert bench.parse_args(["--cpu-int8"]).cpu_int8 is True


def test_service_benchmark_says_whether_the_export_it_measures_has_int8():
    bench = script("bench_service")
    assert "safe=True" in bench.int8_line({"safe": True, "reason": "agrees"}, wanted=False)
    assert "reused" in bench.int8_line(None, wanted=True)  # asked for, but --out held an export without it
    assert "not built" in bench.int8_line(None, wanted=False)


def test_v2_wire_rows_give_each_encodings_body_and_parse_time(tmp_path):
    bench = script("bench_v2_wire")
    figures = {"binary": (4_816_896, 0.00071), "json": (23_612_000, 3.21)}
    rows = bench.result_rows((8, 3, 224, 224), figures)
    assert [list(row) for row in rows] == [figure_columns("v2_wire")] * 2
    written = appended("v2_wire", rows, tmp_path)
    assert [(r["input"], r["batch"], r["body_mb"], r["parse_ms"]) for r in written] == [
        ("images FP32 [8, 3, 224, 224], binary tensor data", "8", "4.8", "0.7"),
        ("images FP32 [8, 3, 224, 224], JSON", "8", "23.6", "3210"),
    ]


def test_tracing_rows_give_each_mode_and_its_ratio_to_off(tmp_path):
    bench = script("bench_tracing")
    run = {"images_per_s": 17.0, "p50": 900.0, "p95": 1100.0, "cpu_ms_per_image": 110.0, "spans_dropped": 0.0}
    runs = {"off": [run, run | {"images_per_s": 18.0}], "on": [run | {"images_per_s": 17.1}, run]}
    rows = bench.result_rows(runs, clients=16, spans=2400)
    assert [list(row) for row in rows] == [figure_columns("tracing")] * 2
    written = appended("tracing", rows, tmp_path)
    assert [(r["tracing"], r["images_per_s"], r["vs_off"], r["spans_received"]) for r in written] == [
        ("off", "17.5", "1", "0"),
        ("on, every request sampled", "17.05", "0.974", "2400"),
    ]


def test_int8_rows_leave_top1_blank_without_labels(tmp_path):
    bench = script("bench_int8")
    figures = [
        bench.Int8Figures("demo", 10_000, 93.87, 93.24, 97.92, 555.2, 502.0),
        bench.Int8Figures("vitae_t", 256, None, None, 91.02, 21.2, 20.9),
    ]
    rows = bench.result_rows(figures)
    assert [list(row) for row in rows] == [figure_columns("int8")] * 2
    written = appended("int8", rows, tmp_path)
    assert written[0]["argmax_agreement"] == "97.92 % of 10,000" and written[0]["fp32_images_per_s"] == "555.2"
    assert written[1]["top1_fp32_percent"] == "" and written[1]["argmax_agreement"] == "91.02 % of 256"


def test_soak_row_counts_statuses_and_memory_drift(tmp_path):
    bench = script("soak")
    statuses = collections.Counter({200: 5321, 400: 225, 503: 2, 0: 322})
    soak = bench.Soak(5.0, statuses, [535.0, 540.0, 560.0, 587.4, 541.0, 545.0])
    rows = bench.result_rows(soak)
    assert [list(row) for row in rows] == [figure_columns("soak")]
    (written,) = appended("soak", rows, tmp_path)
    assert written["requests"] == "5870" and written["responses_5xx"] == "2"
    assert written["status_counts"] == "5,321 × 200, 225 × 400, 2 × 503, 322 deliberate disconnects"
    assert written["rss_mb_after_first_minute"] == "535.0–587.4"
    assert written["rss_drift_percent"] == "+1.0"  # (541 + 545) / (535 + 540) - 1


def test_gpu_rows_are_one_per_column_and_batch(tmp_path):
    bench = script("bench_gpu")
    columns = {"torch fp32 eager": {8: 2101.4, 1: 400.2}, "GPU decode only": {8: 9000.0}}
    rows = bench.result_rows("NVIDIA H100 80GB HBM3", columns)
    expected = ["gpu", "what", "batch", "images_per_s"]
    if (BENCHMARKS / "results" / "gpu.csv").exists():
        expected = figure_columns("gpu")
    assert [list(row) for row in rows] == [expected] * 3
    written = appended("gpu", rows, tmp_path)
    assert [(r["what"], r["batch"], r["images_per_s"]) for r in written] == [
        ("torch fp32 eager", "1", "400"),
        ("torch fp32 eager", "8", "2101"),
        ("GPU decode only", "8", "9000"),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["benchmarks/bench_v2_wire.py", "--batch", "2", "--record"],
        ["benchmarks/bench_v2_wire.py", "--record", "/tmp/results", "--batch", "2"],
        ["benchmarks/bench_v2_wire.py", "--batch", "2", "--record=/tmp/results"],
    ],
)
def test_the_recorded_command_leaves_out_where_the_rows_went(argv):
    assert command(argv) == "python benchmarks/bench_v2_wire.py --batch 2"


def test_cache_rows_are_the_printed_table(tmp_path, capsys):
    bench = script("bench_cache")
    figures = {
        "on": {"no repeats": 20.0, "half repeating": 39.0, "all repeating": 300.0},
        "off": {"no repeats": 20.2, "half repeating": 20.0, "all repeating": 20.0},
        "ceiling": 380.0,
        "idle": (60.0, 80.0),
        "overload": (90.0, 200.0),
    }
    rows = bench.result_rows(figures)
    assert [list(row) for row in rows] == [figure_columns("cache")] * len(rows)
    bench.report(figures, rows)
    printed = capsys.readouterr().out
    assert all(f"{row['figure']:42s} {row['value']:6.2f}" in printed for row in rows)
    assert [(row["value"], row["met"]) for row in rows] == [
        (0.99, True),
        (1.95, True),
        (15.0, True),
        (0.79, True),
        (2.5, False),
    ]
    written = appended("cache", rows, tmp_path)
    assert [row["figure"] for row in written] == [row["figure"] for row in rows]


def test_service_ratios_measured_in_rounds_are_their_per_round_medians():
    bench = script("bench_service")
    run = service_run()
    assert bench.ratios(run)["service / its raw engine"] == pytest.approx(17.44 / 19.53)  # best batch 1's
    run.round_ratios = {"service / its raw engine": 0.83, "lone client p50 / raw batch-1 latency": 1.2}
    figures = bench.ratios(run)
    assert figures["service / its raw engine"] == 0.83 and figures["lone client p50 / raw batch-1 latency"] == 1.2
    assert figures["service cam=true / cam=false"] == pytest.approx(15.6 / 17.44)


@pytest.mark.parametrize("max_batch", [3, 8])
def test_service_benchmark_reads_the_batch_the_service_sends_its_engine(artifacts, max_batch):
    """bench_service serves with the service's own batching and gives LitServe the same cap: it reads it back."""
    from support.server import serving

    with serving(artifacts, max_batch_size=max_batch) as url:
        assert script("bench_service").service_max_batch(url) == max_batch
