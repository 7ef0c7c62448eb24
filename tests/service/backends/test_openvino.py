"""The OpenVINO CPU backend: it agrees with ONNX Runtime, its tokens give the same CAM, and the choice
between bf16 and fp32 follows the CPU and the export's measurement."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from support.checkpoints import exported
from support.images import sample_images
from support.server import running, settings_for

from export.precision import MAX_RELATIVE_DIFF, cpu_flags, cpu_kind, native_bf16, this_cpu_has_native_bf16
from model.preprocess import decode_image, preprocess
from service import create_app
from service.artifacts import ServedArtifacts, read_artifacts
from service.backends import OnnxRuntimeBackend, create_backend, select_backend
from service.backends.openvino_backend import OpenVINOBackend, PrecisionRefused, choose_cpu_precision
from service.postprocess import last_cell_cam, normalize_cam

pytest.importorskip("openvino", reason="the openvino package (a core dependency) is not installed")

NATIVE_BF16 = this_cpu_has_native_bf16()
NO_BF16 = "needs a CPU with native bf16 (cpuinfo flag avx512_bf16 or amx_bf16); this one has neither"
SAFE = {"safe": True, "reason": "measured", "top1_agreement": 100.0, "max_logit_diff": 0.01}
UNSAFE = {"safe": False, "reason": "bf16 agrees with fp32 on 91.00 % of images, below 99.0 %"}
UNMEASURED = {"safe": None, "reason": "this CPU has no native bf16 (AVX512_BF16 or AMX)"}

# fp32: OpenVINO and ONNX Runtime run the same graph in fp32 with different kernels (summation order,
# fused GELU), the same budget as the export's ONNX-vs-PyTorch parity check.
FP32_TOLERANCE = 1e-4
# bf16 keeps 8 significant bits, a relative rounding error of 2^-9 = 0.2 % per stored value; through the
# model's ~20 matmuls and convolutions (accumulated in fp32) the errors add up to about 1 % of the
# activations' scale. The bound is 5 % of the largest fp32 value of each output: wide enough for that
# drift on any model, far below what a wrong layer or a wrong input layout gives (same scale as the output).
BF16_RELATIVE_TOLERANCE = 0.05
# ...and at least 0.1 % of that scale: fp32 kernels differ by < 1e-6 of it, a single bf16 rounding by 0.2 %.
# Relative, because the tiny random models' logits are ~1e-2, where bf16's drift is below FP32_TOLERANCE.
BF16_MIN_RELATIVE_DIFFERENCE = 1e-3


@pytest.fixture(scope="module", params=["gray", "rgb"])
def served(request, tiny_checkpoint, tiny_rgb_checkpoint) -> ServedArtifacts:
    checkpoint = tiny_checkpoint if request.param == "gray" else tiny_rgb_checkpoint
    return read_artifacts(exported(checkpoint))


@pytest.fixture(scope="module")
def images(served) -> np.ndarray:
    return np.stack([preprocess(decode_image(data), served.preprocessing) for data in sample_images(8)])


@pytest.fixture(scope="module")
def reference(served, images) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime fp32 logits (B, K) and tokens (B, N, D): the reference the other backends match."""
    return OnnxRuntimeBackend(served, gpu=False, threads=1).infer(images)


def measured_safe(served: ServedArtifacts) -> ServedArtifacts:
    """The same artifacts with an export verdict of "bf16 safe", as a model whose check passed records it.

    The tiny random models cannot earn that verdict on Fashion-MNIST (their classes are near-ties), and
    the numerics under test do not depend on it.
    """
    return dataclasses.replace(served, metadata=dataclasses.replace(served.metadata, cpu_bf16=SAFE))


def bf16_unsound_here(served: ServedArtifacts) -> str | None:
    """Why the export found this model's bf16 arithmetic unsound on this CPU (outputs non-finite, or further from
    fp32 than MAX_RELATIVE_DIFF of their scale), or None. The agreement gate, which the tiny random models fail
    on near-ties, is not part of it."""
    report = served.metadata.cpu_bf16
    relative = report.get("max_relative_diff")
    return report["reason"] if relative is None or relative > MAX_RELATIVE_DIFF else None


def skip_where_bf16_is_unsound(served: ServedArtifacts) -> None:
    if why := bf16_unsound_here(served):
        pytest.skip(
            f"the export measured bf16 unsound for this model on this CPU ({why}); it is not served: "
            "test_bf16_measured_unsound_here_is_never_served"
        )


def cam_maps(tokens: np.ndarray, served: ServedArtifacts, targets: np.ndarray) -> np.ndarray:
    return normalize_cam(last_cell_cam(tokens, served.head_weight, targets, served.grid))  # (B, h, w)


# ------------------------------------------------------------------ numerics


def test_fp32_agrees_with_onnxruntime_within_1e_4(served, images, reference):
    backend = OpenVINOBackend(served, precision="fp32", threads=1)
    logits, tokens = backend.infer(images)
    assert backend.precision == "fp32"
    assert logits.shape == reference[0].shape and tokens.shape == reference[1].shape
    assert np.abs(logits - reference[0]).max() <= FP32_TOLERANCE
    assert np.abs(tokens - reference[1]).max() <= FP32_TOLERANCE


def test_fp32_cam_from_its_tokens_matches_onnxruntimes(served, images, reference):
    logits, tokens = OpenVINOBackend(served, precision="fp32", threads=1).infer(images)
    targets = reference[0].argmax(axis=1)
    np.testing.assert_allclose(cam_maps(tokens, served, targets), cam_maps(reference[1], served, targets), atol=1e-3)


@pytest.mark.skipif(not NATIVE_BF16, reason=NO_BF16)
def test_bf16_agrees_with_onnxruntime_fp32_within_5_percent_of_the_output_scale(served, images, reference):
    skip_where_bf16_is_unsound(served)
    backend = OpenVINOBackend(measured_safe(served), precision="bf16", threads=1)
    logits, tokens = backend.infer(images)
    assert backend.precision == "bf16"
    for got, expected in ((logits, reference[0]), (tokens, reference[1])):
        assert np.isfinite(got).all()
        assert np.abs(got - expected).max() <= BF16_RELATIVE_TOLERANCE * np.abs(expected).max()
    # ...and it is really bf16, not fp32 under another name: the outputs drift by more than fp32 kernels do.
    assert np.abs(logits - reference[0]).max() > BF16_MIN_RELATIVE_DIFFERENCE * np.abs(reference[0]).max()


@pytest.mark.skipif(not NATIVE_BF16, reason=NO_BF16)
def test_bf16_cam_from_its_tokens_matches_onnxruntimes(served, images, reference):
    skip_where_bf16_is_unsound(served)
    _, tokens = OpenVINOBackend(measured_safe(served), precision="bf16", threads=1).infer(images)
    targets = reference[0].argmax(axis=1)
    # Maps are min-max normalised to 0..1, so the output-scale bound above reads as 0.05 here.
    got, expected = cam_maps(tokens, served, targets), cam_maps(reference[1], served, targets)
    assert np.abs(got - expected).max() <= BF16_RELATIVE_TOLERANCE * 2  # normalisation divides by a span


@pytest.mark.skipif(not NATIVE_BF16, reason=NO_BF16)
def test_bf16_measured_unsound_here_is_never_served(served):
    report = served.metadata.cpu_bf16
    assert report["cpu_kind"] == cpu_kind(cpu_flags()) and report["stress_images"] > 0
    if bf16_unsound_here(served) is None:  # sound here: its figures say so
        assert report["max_relative_diff"] <= MAX_RELATIVE_DIFF and report["max_logit_diff"] is not None
        return
    assert report["safe"] is False
    assert OpenVINOBackend(served, precision="auto", threads=1).precision == "fp32"
    with pytest.raises(PrecisionRefused, match="unsafe"):
        OpenVINOBackend(served, precision="bf16", threads=1)


def test_batch_sizes_give_the_same_answer_per_image(served, images):
    backend = OpenVINOBackend(served, precision="fp32", threads=1)
    whole, _ = backend.infer(images)
    one, _ = backend.infer(images[3:4])
    np.testing.assert_allclose(one[0], whole[3], atol=FP32_TOLERANCE)


def test_the_compiled_model_is_cached_for_the_next_start(served, tmp_path):
    OpenVINOBackend(served, precision="fp32", threads=1, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache").iterdir())
    assert cached, "no compiled model in the cache folder"
    OpenVINOBackend(served, precision="fp32", threads=1, cache_dir=tmp_path / "cache")
    assert sorted((tmp_path / "cache").iterdir()) == sorted(cached)  # loaded, not compiled and written again


def infer_from_threads(backend, images: np.ndarray, threads: int, rounds: int = 3) -> list[np.ndarray]:
    """Logits of `rounds` calls per thread, `threads` threads calling `infer` at once."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: backend.infer(images)[0], range(threads * rounds)))


def test_streams_compute_batches_at_once_and_each_gets_its_own_answer(served, images, reference):
    backend = OpenVINOBackend(served, precision="fp32", threads=2, streams=2)
    assert backend.streams == 2
    halves = (images[:4], images[4:])
    with ThreadPoolExecutor(2) as pool:  # two streams, different inputs at once: no answer crosses over
        results = list(pool.map(lambda i: backend.infer(halves[i % 2])[0], range(12)))
    for i, logits in enumerate(results):
        expected = reference[0][:4] if i % 2 == 0 else reference[0][4:]
        assert np.abs(logits - expected).max() <= FP32_TOLERANCE


def test_a_batch_that_finds_no_other_running_takes_every_core_and_agrees(served, images, reference):
    backend = OpenVINOBackend(served, precision="fp32", threads=2, streams=2)
    alone = backend._alone  # the every-core request: a call takes it only while no other call runs
    assert alone is not None and alone.get_compiled_model().get_property("PERFORMANCE_HINT") == "LATENCY"
    assert backend.runs_alone_on_every_core  # what lets the batcher's urgent window serialise batches
    assert np.abs(backend.infer(images)[0] - reference[0]).max() <= FP32_TOLERANCE
    assert np.abs(alone.get_tensor("logits").data - reference[0]).max() <= FP32_TOLERANCE  # it computed that call
    # Calls beside one another share the every-core request and the streams; none waits, none crosses over.
    halves = (images[:4], images[4:])
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: backend.infer(halves[i % 2])[0], range(18)))
    for i, logits in enumerate(results):
        expected = reference[0][:4] if i % 2 == 0 else reference[0][4:]
        assert np.abs(logits - expected).max() <= FP32_TOLERANCE
    assert backend._running == 0


def test_one_stream_is_the_latency_configuration(served, images, reference):
    backend = OpenVINOBackend(served, precision="fp32", threads=2, streams=1)
    assert backend.streams == 1 and not backend.runs_alone_on_every_core
    assert backend.compiled.get_property("PERFORMANCE_HINT") == "LATENCY"
    assert np.abs(backend.infer(images)[0] - reference[0]).max() <= FP32_TOLERANCE


def test_auto_streams_are_the_plugins_throughput_choice(served):
    backend = OpenVINOBackend(served, precision="fp32", streams=0)
    assert backend.compiled.get_property("PERFORMANCE_HINT") == "THROUGHPUT"
    assert backend.streams == backend.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") >= 1


def test_onnxruntime_streams_share_one_session_and_agree(served, images, reference):
    backend = OnnxRuntimeBackend(served, gpu=False, threads=2, streams=2)
    assert backend.streams == 2
    for logits in infer_from_threads(backend, images, threads=2):
        assert np.abs(logits - reference[0]).max() <= FP32_TOLERANCE


# ------------------------------------------------------------------ choosing the precision


def test_auto_uses_bf16_on_a_bf16_cpu_when_the_export_found_it_safe():
    choice = choose_cpu_precision("auto", native_bf16=True, export_report=SAFE)
    assert choice.precision == "bf16" and "measured safe" in choice.reason


@pytest.mark.parametrize(
    ("native", "report", "why"),
    [
        (False, SAFE, "no native bf16"),
        (True, UNSAFE, "unsafe"),
        (True, UNMEASURED, "did not measure"),
        (True, None, "did not measure"),
    ],
)
def test_auto_falls_back_to_fp32_and_says_why(native, report, why):
    choice = choose_cpu_precision("auto", native_bf16=native, export_report=report)
    assert choice.precision == "fp32" and why in choice.reason


@pytest.mark.parametrize(("native", "report"), [(False, SAFE), (True, UNSAFE), (True, UNMEASURED)])
def test_forced_bf16_is_refused_when_it_is_not_safe_here(native, report):
    with pytest.raises(PrecisionRefused, match="VITAE_CPU_PRECISION=bf16 refused: .*use auto or fp32"):
        choose_cpu_precision("bf16", native_bf16=native, export_report=report)


def test_forced_bf16_is_used_when_safe_and_fp32_always_is():
    assert choose_cpu_precision("bf16", native_bf16=True, export_report=SAFE).precision == "bf16"
    assert choose_cpu_precision("fp32", native_bf16=True, export_report=SAFE).precision == "fp32"


def test_an_unknown_precision_names_the_accepted_ones():
    with pytest.raises(ValueError, match="auto, bf16, int8, fp32"):
        choose_cpu_precision("fp8", native_bf16=True, export_report=SAFE)


def test_native_bf16_from_openvino_capabilities_or_cpu_flags():
    assert native_bf16({"FP32", "INT8", "BF16"}, set())
    assert native_bf16({"FP32"}, {"avx512f", "avx512_bf16"})
    assert native_bf16(set(), {"amx_tile", "amx_bf16"})
    assert not native_bf16({"FP32", "INT8", "BIN", "EXPORT_IMPORT"}, {"avx2", "avx512f", "avx512_vnni"})


def test_cpu_flags_reads_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


# ------------------------------------------------------------------ selection, on this machine


def test_auto_on_a_cpu_picks_openvino_and_says_which_precision(served):
    selection = select_backend("auto", served, device="cpu", threads=1)
    assert selection.backend.name == "openvino" and selection.backend.device == "cpu"
    assert f"{selection.backend.precision}:" in selection.reason and "fastest" in selection.reason


def test_the_export_measured_bf16_on_this_cpu(served):
    report = served.metadata.cpu_bf16
    if NATIVE_BF16:
        assert report["safe"] in (True, False) and report["images"] > 0
        assert 0 <= report["top1_agreement"] <= 100 and report["max_logit_diff"] >= 0
    else:
        assert report["safe"] is None and "no native bf16" in report["reason"]


def test_auto_precision_follows_the_exports_verdict_here(served):
    backend = OpenVINOBackend(served, precision="auto", threads=1)
    expected = "bf16" if NATIVE_BF16 and served.metadata.cpu_bf16["safe"] else "fp32"
    assert backend.precision == expected


def test_forced_bf16_on_a_model_measured_unsafe_stops_the_start_with_the_reason(served):
    unsafe = dataclasses.replace(served, metadata=dataclasses.replace(served.metadata, cpu_bf16=UNSAFE))
    with pytest.raises(PrecisionRefused, match="unsafe|no native bf16"):
        select_backend("auto", unsafe, device="cpu", cpu_precision="bf16")  # not quietly onnxruntime fp32


def test_forced_bf16_on_another_backend_is_refused(served):
    with pytest.raises(PrecisionRefused, match="openvino backend, not onnxruntime"):
        create_backend("onnxruntime", served, "cpu", cpu_precision="bf16")


# ------------------------------------------------------------------ over HTTP


def test_readyz_and_model_say_backend_device_and_precision(tiny_checkpoint):
    artifacts = exported(tiny_checkpoint)
    with running(create_app(settings_for(artifacts, backend="openvino", cpu_precision="fp32"))) as url:
        ready = httpx.get(f"{url}/readyz").json()
        assert (ready["backend"], ready["device"], ready["precision"]) == ("openvino", "cpu", "fp32")
        card = httpx.get(f"{url}/model").json()
        assert (card["backend"], card["device"], card["precision"]) == ("openvino", "cpu", "fp32")
        assert ready["streams"] == card["streams"] >= 1
        response = httpx.post(
            f"{url}/classify", params={"cam": "true"}, files=[("file", ("a.png", sample_images(1)[0], "image/png"))]
        )
        assert response.status_code == 200 and np.array(response.json()["cam"]["grid"]).shape == (4, 4)
