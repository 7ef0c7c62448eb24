"""service.gpu_decode against the PIL path (model.preprocess) on real photos, with device="cpu": the tensor steps
(orientation, resize, crop, normalisation) are the ones the GPU runs; only the decoder differs (nvJPEG there)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from support.checkpoints import SHARED_REFERENCE
from support.images import drawn_image, encode
from support.photos import varied_jpegs

from export.serving import serving_outputs
from export.source import load_source
from model import Preprocessing, get_variant
from model.preprocess import decode_image, preprocess
from service.gpu_decode import GpuDecoder, decoder_available, orient, probe
from service.inference import prepare_image

VITAE_T_REFERENCE = SHARED_REFERENCE / "vitae_t_official.safetensors"
PHOTOS = 60
MIN_TOP1_AGREEMENT = 0.98
VITAE_T = get_variant("vitae_t").preprocessing


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    photos = varied_jpegs(PHOTOS)
    if not photos:
        pytest.skip("no photographs among the installed packages (matplotlib, scikit-learn)")
    return photos


def pil_path(data: bytes, prep: Preprocessing) -> np.ndarray:
    """The service's PIL path as it serves (draft-mode decoding of large JPEGs included)."""
    return prepare_image(data, prep, max_pixels=None, cam_max_side=None).pixels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_pixels_as_pil_exif_transpose(orientation):
    image = drawn_image(orientation, size=(7, 5), mode="RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(image, "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))  # (H', W', 3)
    pixels = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())  # (3, H, W)
    assert np.array_equal(orient(pixels, orientation).numpy().transpose(1, 2, 0), expected)


def test_probe_reads_the_orientation_and_refuses_what_the_pil_path_must_take():
    rgb = drawn_image(0, size=(40, 30), mode="RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    assert probe(encode(rgb, "JPEG", exif=exif.tobytes()), None) == 6
    assert probe(encode(rgb, "JPEG"), None) == 1
    assert probe(encode(rgb.convert("L"), "JPEG"), None) == 1
    assert probe(encode(rgb, "PNG"), None) is None
    assert probe(encode(rgb.convert("CMYK"), "JPEG"), None) is None
    assert probe(encode(rgb, "JPEG"), max_pixels=40 * 30 - 1) is None
    assert probe(b"\xff\xd8\xff\xe0 not a jpeg\xff\xd9", None) is None
    assert probe(encode(rgb, "JPEG")[:-100], None) is None  # truncated


def test_uploads_it_cannot_take_fall_back_one_by_one(jpegs):
    rgb = drawn_image(1, size=(64, 48), mode="RGB")
    truncated = jpegs[1][: len(jpegs[1]) // 3]
    uploads = [jpegs[0], encode(rgb, "PNG"), encode(rgb.convert("CMYK"), "JPEG"), truncated, jpegs[2]]
    out = GpuDecoder(VITAE_T, "cpu")(uploads)
    assert [o is not None for o in out] == [True, False, False, False, True]
    assert out[0].shape == (3, 224, 224) and out[0].dtype == torch.float32


def test_lanczos_models_are_left_to_the_pil_path(jpegs):
    prep = Preprocessing(**{**VITAE_T.to_dict(), "interpolation": "lanczos"})
    assert GpuDecoder(prep, "cpu")(jpegs[:3]) == [None, None, None]


def test_tensor_path_matches_pil_pixels_decoded_at_full_size(jpegs):
    """Same decoded pixels (PIL, full size): the tensor steps alone differ from model.preprocess by at most a
    few 8-bit levels on a handful of pixels."""
    got = GpuDecoder(VITAE_T, "cpu")(jpegs)
    diffs = [np.abs(g.numpy() - preprocess(decode_image(data), VITAE_T)) for g, data in zip(got, jpegs, strict=True)]
    worst = max(float(d.max()) for d in diffs)
    mean = float(np.mean([d.mean() for d in diffs]))
    print(f"\ntensor path vs PIL, same pixels, {len(jpegs)} photos: max |diff| {worst:.4f}, mean {mean:.5f}")
    assert worst <= 0.25 and mean <= 0.005


def test_grey_model_input_matches_the_pil_path(jpegs):
    prep = get_variant("vitae_fmnist").preprocessing
    got = GpuDecoder(prep, "cpu")(jpegs[:10])
    for pixels, data in zip(got, jpegs[:10], strict=True):
        expected = preprocess(decode_image(data), prep)
        assert pixels.shape == expected.shape
        assert np.abs(pixels.numpy() - expected).mean() <= 0.02


@pytest.mark.skipif(not VITAE_T_REFERENCE.is_file(), reason=f"no reference ViTAE-T weights at {VITAE_T_REFERENCE}")
def test_released_vitae_t_agrees_on_top1_with_the_pil_path(jpegs):
    """The decision the issue asks for: >= 98 % top-1 agreement on >= 50 varied real JPEGs, against the service's
    own PIL path (which decodes large JPEGs in draft mode, the main source of the pixel differences)."""
    model = load_source(VITAE_T_REFERENCE, variant="vitae_t").model.eval()
    ours = torch.stack(GpuDecoder(VITAE_T, "cpu")(jpegs)).numpy()  # (B, 3, 224, 224)
    theirs = np.stack([pil_path(data, VITAE_T) for data in jpegs])  # (B, 3, 224, 224)
    top1 = [serving_outputs(model, x)["logits"].argmax(axis=1) for x in (ours, theirs)]
    agreement = float((top1[0] == top1[1]).mean())
    print(
        f"\nViTAE-T top-1 agreement, tensor path vs PIL path, {len(jpegs)} photos: {agreement:.1%}; "
        f"largest pixel difference after normalisation {np.abs(ours - theirs).max():.3f}"
    )
    assert len(jpegs) >= 50 and agreement >= MIN_TOP1_AGREEMENT


@pytest.mark.gpu
@pytest.mark.skipif(not decoder_available("cuda"), reason="needs a CUDA device and torchvision's image ops (nvJPEG)")
def test_nvjpeg_decoding_agrees_with_the_cpu_tensor_path(jpegs):
    on_gpu = GpuDecoder(VITAE_T, "cuda")(jpegs)
    on_cpu = GpuDecoder(VITAE_T, "cpu")(jpegs)
    assert all(g is not None and g.is_cuda for g in on_gpu)
    diffs = [float((g.cpu() - c).abs().mean()) for g, c in zip(on_gpu, on_cpu, strict=True)]
    print(f"\nnvJPEG vs CPU decoding: mean |diff| per image at most {max(diffs):.4f} (normalised)")
    assert max(diffs) <= 0.05
