"""The PyTorch backend's fast path: its half-precision twin and precision gate (run on CPU here, on the demo model),
its token rows, and on a CUDA device the CUDA graphs with pinned copies (skipped elsewhere, with the reason)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.checkpoints import DEMO_CHECKPOINT, exported

from export.inputs import model_inputs
from export.performer import StableTokenPerformer
from model.layers import TokenPerformer
from service.artifacts import read_artifacts
from service.backends import TorchBackend
from service.backends.torch_cuda import HalfServing, buckets, choose_precision, gate, run


@pytest.fixture(scope="module")
def demo_images(demo_model) -> np.ndarray:
    images, _ = model_inputs(demo_model.config.preprocessing, 32)
    return images


def test_half_twin_keeps_the_performer_kernel_in_fp32_and_the_rest_in_half(demo_model):
    twin = HalfServing(demo_model, torch.bfloat16)
    performers = [m for m in twin.modules() if isinstance(m, TokenPerformer)]
    assert performers and all(isinstance(m, StableTokenPerformer) for m in performers)
    for performer in performers:
        assert performer.kqv.weight.dtype == performer.proj.weight.dtype == performer.w.dtype == torch.float32
        assert performer.norm1.weight.dtype == torch.bfloat16
    assert twin.serving.model.head.weight.dtype == torch.bfloat16
    assert demo_model.head.weight.dtype == torch.float32  # the served model's own copy is left alone


def test_half_precision_passes_the_gate_on_real_images(demo_model, demo_images):
    precision, module, figures = choose_precision(demo_model, demo_images, "cpu")
    print(f"\nprecision gate on CPU arithmetic, demo model: {figures}")
    assert precision in ("fp16", "bf16") and isinstance(module, HalfServing)
    chosen = next(f for f in figures if f["precision"] == precision)
    assert chosen["passed"] and chosen["top1_agree"] == chosen["images"] == len(demo_images)
    assert chosen["max_abs_logit_diff"] == min(f["max_abs_logit_diff"] for f in figures if f["passed"])


def test_gate_refuses_non_finite_outputs_and_a_changed_top1(demo_model, demo_images):
    expected = run(HalfServing(demo_model, torch.float32), demo_images, "cpu")
    assert gate(expected, expected, "fp16")["passed"]
    nan = {name: value.copy() for name, value in expected.items()}
    nan["logits"][3, 0] = np.nan
    assert not gate(nan, expected, "fp16")["passed"]
    swapped = {name: value.copy() for name, value in expected.items()}
    swapped["logits"][0] = swapped["logits"][0][::-1]
    figures = gate(swapped, expected, "fp16")
    assert not figures["passed"] and figures["top1_agree"] < figures["images"]


def test_buckets_are_powers_of_two_up_to_the_max_batch():
    assert buckets(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert buckets(1) == [1]


def test_token_rows_return_only_those_rows_tokens(demo_images):
    backend = TorchBackend(read_artifacts(exported(DEMO_CHECKPOINT)), "cpu")
    logits, tokens = backend.infer(demo_images[:6])
    some_logits, some_tokens = backend.infer(demo_images[:6], token_rows=[4, 1])
    assert np.array_equal(logits, some_logits)
    assert np.array_equal(some_tokens, tokens[[4, 1]])
    assert backend.infer(demo_images[:6], token_rows=[])[1].shape == (0, *tokens.shape[1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_with_half_precision_match_fp32_on_the_cpu(demo_images):
    served = read_artifacts(exported(DEMO_CHECKPOINT))
    cpu = TorchBackend(served, "cpu")
    gpu = TorchBackend(served, "cuda", max_batch=16)
    assert gpu.precision in ("fp16", "bf16", "fp32") and gpu.precision_gate
    print(f"\n{gpu.precision}: {gpu.precision_reason}")
    for n in (1, 3, 16, 32):  # 32: two chunks of the largest graph
        expected, expected_tokens = cpu.infer(demo_images[:n])
        logits, tokens = gpu.infer(demo_images[:n], token_rows=[0, n - 1])
        assert logits.shape == expected.shape and tokens.shape == (2, *expected_tokens.shape[1:])
        assert (logits.argmax(1) == expected.argmax(1)).all()
        assert np.abs(logits - expected).max() <= 0.08 * max(1.0, np.abs(expected).max())
    on_device = torch.from_numpy(demo_images[:4]).cuda()  # GPU-decoded uploads arrive as device tensors
    assert np.array_equal(gpu.infer(on_device)[0], gpu.infer(demo_images[:4])[0])
