"""CPU int8: the export's NNCF model with accuracy control, measured against fp32, and the precision the service
picks with it, on each kind of CPU (flags injected, so every kind is covered on any machine)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from support.images import sample_images

from export import export_artifacts
from export.int8 import (
    CLASSIFIER_HEAD,
    INT8_PRECISIONS,
    INT8_XML,
    MAX_TOP1_DROP,
    QUANTIZABLE_OPS,
    int8_verdict,
    layers_in_float,
    measure_int8,
    native_int8,
    runtime_layers,
    served_compute,
)
from export.precision import compile_cpu, cpu_flags, cpu_kind, native_bf16, openvino_capabilities
from model.preprocess import decode_image, preprocess
from service.artifacts import read_artifacts
from service.backends import BackendUnavailable, OnnxRuntimeBackend
from service.backends.cpu_precision import PrecisionRefused, choose_cpu_precision
from service.backends.openvino_backend import OpenVINOBackend, int8_compute

pytest.importorskip("openvino", reason="the openvino package (a core dependency) is not installed")

AVX2_EPYC = frozenset("avx avx2 fma f16c bmi2".split())
AVX512_VNNI_EPYC = AVX2_EPYC | frozenset("avx512f avx512bw avx512_bf16 avx512_vnni".split())
AMX_XEON = AVX512_VNNI_EPYC | frozenset("amx_tile amx_bf16 amx_int8".split())
HERE_INT8 = native_int8(cpu_flags())
NO_INT8 = "needs a CPU with native int8 (cpuinfo flag avx512_vnni, avx_vnni or amx_int8); this one has none"

BF16_SAFE = {"safe": True, "reason": "measured", "top1_agreement": 99.9, "max_logit_diff": 0.05, "cpu_kind": "amx"}


def int8_report(**changes) -> dict:
    report = {"safe": True, "reason": "measured", "top1_agreement": 99.6, "fp32_top1": 94.0, "int8_top1": 93.9}
    report |= {"fp32_images_per_s": 40.0, "bf16_images_per_s": 90.0, "int8_images_per_s": 150.0, "cpu_kind": "amx"}
    return report | changes


# ------------------------------------------------------------------ which CPUs, which verdict


@pytest.mark.parametrize(("flags", "native"), [(AVX2_EPYC, False), (AVX512_VNNI_EPYC, True), (AMX_XEON, True)])
def test_native_int8_from_the_flags_of_each_kind_of_machine(flags, native):
    assert native_int8(flags) is native


def test_a_cpu_without_vnni_or_amx_gets_no_int8_model(tmp_path):
    report = measure_int8(tmp_path / "absent.onnx", tmp_path, None, [], np.zeros(0), flags=AVX2_EPYC)
    assert report.safe is None and "no native int8" in report.reason and not list(tmp_path.iterdir())


def test_int8_verdict_needs_agreement_and_at_most_0_2_points_lost():
    assert int8_verdict(99.5, 94.0, 94.0 - MAX_TOP1_DROP + 0.01)[0]
    safe, why = int8_verdict(99.5, 94.06, 93.63)
    assert not safe and "loses 0.43 points" in why
    safe, why = int8_verdict(94.14, None, None)
    assert not safe and "94.14 %" in why


# ------------------------------------------------------------------ what the service serves


def choose(requested: str, kind: str, **reports) -> str:
    flags = {"avx2": AVX2_EPYC, "avx512_bf16": AVX512_VNNI_EPYC, "amx": AMX_XEON}[kind]
    return choose_cpu_precision(
        requested,
        native_bf16=kind != "avx2",
        export_report=reports.get("bf16", BF16_SAFE | {"cpu_kind": kind}),
        cpu_kind=kind,
        native_int8=native_int8(flags),
        int8_report=reports.get("int8", int8_report(cpu_kind=kind)),
    ).precision


def test_auto_serves_int8_where_it_passed_and_measured_fastest():
    assert choose("auto", "amx") == "int8"
    assert choose("auto", "amx", int8=int8_report(int8_images_per_s=80.0)) == "bf16"  # slower than bf16 here
    assert choose("auto", "amx", int8=int8_report(safe=False, reason="loses 0.43 points")) == "bf16"
    assert choose("auto", "amx", int8=None) == "bf16"  # not exported with --cpu-int8


def test_auto_on_a_cpu_without_int8_or_bf16_serves_fp32_and_says_why():
    choice = choose_cpu_precision(
        "auto", False, BF16_SAFE, "avx2", native_int8=False, int8_report=int8_report(cpu_kind="avx2")
    )
    assert choice.precision == "fp32" and "no native bf16" in choice.reason and "no native int8" in choice.reason


def test_int8_measured_on_another_kind_of_cpu_is_not_served_here():
    measured_on_amx = int8_report(cpu_kind="amx")
    assert choose("auto", "avx512_bf16", int8=measured_on_amx) == "bf16"
    with pytest.raises(PrecisionRefused, match="int8 refused: the export measured int8 on a CPU of another kind"):
        choose("int8", "avx512_bf16", int8=measured_on_amx)


def test_forced_int8_is_refused_on_a_cpu_without_native_int8_naming_the_instructions():
    with pytest.raises(PrecisionRefused, match="VITAE_CPU_PRECISION=int8 refused: .*VNNI.*use auto or fp32"):
        choose("int8", "avx2", int8=int8_report(cpu_kind="avx2"))


# ------------------------------------------------------------------ a real int8 export


@pytest.fixture(scope="module")
def int8_artifacts(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("nncf", reason="nncf (a dev dependency) builds the int8 model")
    if not HERE_INT8:
        pytest.skip(NO_INT8)
    out = tmp_path_factory.mktemp("int8") / "artifacts"
    export_artifacts(tiny_checkpoint, out, max_batch=4, tensorrt=False, cpu_int8=True)
    return out


@pytest.mark.timeout(900)  # the fixture quantizes with accuracy control: about two minutes on a loaded 2-core VM
def test_the_export_builds_and_measures_int8_and_records_its_files(int8_artifacts):
    served = read_artifacts(int8_artifacts)  # every recorded file is verified against its digest here
    report, files = served.metadata.cpu_int8, served.metadata.files
    assert files["int8"] == "model_int8.xml" and files["int8_weights"] == "model_int8.bin"
    assert report["cpu_kind"] == cpu_kind(cpu_flags()) and report["images"] > 0 and report["quantize_s"] > 0
    assert report["int8_images_per_s"] > 0 and report["fp32_images_per_s"] > 0
    assert report["safe"] == int8_verdict(report["top1_agreement"], report["fp32_top1"], report["int8_top1"])[0]
    assert served.metadata.settings["cpu_int8"] is True
    bf16_here = native_bf16(openvino_capabilities(), cpu_flags()) and served.metadata.cpu_bf16["safe"]
    here = {"fp32", "bf16"} if bf16_here else {"fp32"}  # bf16 layers only where the bf16 step found bf16 safe
    assert set(report["computes"]) == here and report["compute"] == served_compute(report["computes"])
    chosen = report["computes"][report["compute"]]
    assert (report["top1_agreement"], report["int8_images_per_s"]) == (
        chosen["top1_agreement"],
        chosen["int8_images_per_s"],
    )


def test_the_classifier_head_is_left_unquantized(int8_artifacts):
    """Its 8-bit input would move every logit at once: no FakeQuantize feeds the head, while others feed layers."""
    import openvino as ov

    model = ov.Core().read_model(str(int8_artifacts / INT8_XML))

    def quantized_inputs(op) -> bool:
        return any(i.get_source_output().get_node().get_type_name() == "FakeQuantize" for i in op.inputs())

    head = [op for op in model.get_ops() if CLASSIFIER_HEAD.match(op.get_friendly_name())]
    assert head and not any(quantized_inputs(op) for op in head), [op.get_friendly_name() for op in head]
    assert any(quantized_inputs(op) for op in model.get_ops() if op.get_type_name() == "MatMul")


def test_every_layer_with_quantized_weights_is_computed_in_int8_on_this_cpu(int8_artifacts):
    """A layer this CPU would compute in floating point anyway (dequantizing its inputs first) is left unquantized:
    the probe's names are recorded, none of them has 8-bit weights, and every layer that has them runs in int8."""
    import openvino as ov

    def int8_weights(op) -> bool:
        """Weights as a FakeQuantize, or as 8-bit constants dequantized (Convert, Multiply) on the way in."""
        node = op.input(1).get_source_output().get_node()
        for _ in range(4):
            if node.get_type_name() == "FakeQuantize":
                return True
            if node.get_type_name() == "Constant":
                return node.get_element_type().get_type_name() in INT8_PRECISIONS
            node = node.input(0).get_source_output().get_node()
        return False

    model = ov.Core().read_model(str(int8_artifacts / INT8_XML))
    weighted = [op for op in model.get_ops() if op.get_type_name() in QUANTIZABLE_OPS]
    with_int8_weights = {op.get_friendly_name() for op in weighted if int8_weights(op)}
    assert with_int8_weights
    left_in_float = read_artifacts(int8_artifacts).metadata.cpu_int8["left_in_float"]
    assert not with_int8_weights & set(left_in_float), left_in_float
    assert set(left_in_float) <= {op.get_friendly_name() for op in weighted}  # names of the model's own layers
    runtime = {name: precision for name, _, precision in runtime_layers(compile_cpu(int8_artifacts / INT8_XML, "fp32"))}
    computed = {name: runtime[name] for name in with_int8_weights if name in runtime}
    assert computed and all(precision.lower() in INT8_PRECISIONS for precision in computed.values()), computed


def test_layers_in_float_names_the_weighted_layers_not_computed_in_int8():
    layers = [
        ("/NC.0/PCM/PCM.0/Conv/WithoutBiases", "Convolution", "bf16"),  # grouped, 4 channels a group: no int8 kernel
        ("/NC.0/PCM/PCM.0/Conv/WithoutBiases/fq_weights_1", "Const", "f32"),
        ("/NC.0/mlp/fc1/MatMul", "FullyConnected", "u8"),
        ("/NC.0/attn/MatMul_1", "Subgraph", "i8"),
        ("/RC/Einsum_3", "MatMul", "f32"),
        ("/RC/PRM/Concat", "Concat", "bf16"),
    ]
    assert layers_in_float(layers) == ["/NC.0/PCM/PCM.0/Conv/WithoutBiases", "/RC/Einsum_3"]


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_the_int8_backend_computes_in_int8(int8_artifacts, compute):
    if compute == "bf16" and not native_bf16(openvino_capabilities(), cpu_flags()):
        pytest.skip("int8 beside bf16 layers needs a CPU with native bf16 (avx512_bf16 or amx_bf16)")
    served = read_artifacts(int8_artifacts)
    # Forced safe: the tiny random model's near-ties fail the agreement gate.
    report = served.metadata.cpu_int8 | {"safe": True, "compute": compute}
    forced = dataclasses.replace(served, metadata=dataclasses.replace(served.metadata, cpu_int8=report))
    images = np.stack([preprocess(decode_image(data), served.preprocessing) for data in sample_images(8)])
    backend = OpenVINOBackend(forced, precision="int8", threads=1)
    logits, tokens = backend.infer(images)
    reference = OnnxRuntimeBackend(served, gpu=False, threads=1).infer(images)[0]
    assert backend.precision == "int8" and np.isfinite(logits).all() and np.isfinite(tokens).all()
    assert logits.shape == reference.shape and np.abs(logits - reference).max() > 0  # not the fp32 model
    layers = backend.compiled.get_runtime_model().get_ops()
    runtime = {op.get_rt_info()["runtimePrecision"].astype(str) for op in layers}
    assert runtime & {"u8", "i8"}, runtime  # layers really run on 8-bit integers
    assert ("bf16" in runtime) == (compute == "bf16"), runtime  # the others in the recorded precision


def test_the_served_compute_is_the_fastest_safe_one_else_fp32():
    fp32 = {"safe": True, "int8_images_per_s": 50.0}
    bf16 = {"safe": True, "int8_images_per_s": 80.0}
    assert served_compute({"fp32": fp32, "bf16": bf16}) == "bf16"
    assert served_compute({"fp32": fp32, "bf16": bf16 | {"safe": False}}) == "fp32"
    assert served_compute({"fp32": fp32 | {"safe": False}, "bf16": bf16}) == "bf16"
    assert served_compute({"fp32": fp32 | {"safe": False}}) == "fp32"


def test_an_int8_record_without_compute_runs_its_other_layers_in_fp32_and_a_bad_one_is_refused():
    assert int8_compute(None) == int8_compute({"safe": True}) == "fp32"
    assert int8_compute({"compute": "bf16"}) == "bf16"
    with pytest.raises(BackendUnavailable, match="cpu_int8.compute is 'fp16'"):
        int8_compute({"compute": "fp16"})
