"""The service's image preparation: bytes -> model input through the trainer's own preprocessing."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from support.images import drawn_image, encode

from model import Preprocessing
from model.preprocess import ImageDecodeError, ImageTooLargeError, decode_image, normalize, preprocess, resize_size
from service.inference import prepare_image
from service.postprocess import fit_within, render_cam

PREP = Preprocessing(img_size=32, in_chans=1, mean=(0.3,), std=(0.35,), crop_pct=1.0, interpolation="bilinear")


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("CMYK", "TIFF"), ("RGB", "WEBP")]
)
def test_prepare_image_is_the_trainers_preprocess(mode, fmt):
    data = encode(drawn_image(1, size=(64, 48), mode=mode), fmt)
    prepared = prepare_image(data, PREP, max_pixels=10**6, cam_max_side=512)
    expected = preprocess(decode_image(data, target_size=resize_size(PREP)), PREP)
    np.testing.assert_array_equal(prepared.pixels, expected)
    assert prepared.pixels.shape == (1, 32, 32) and prepared.original.size == (64, 48)


@pytest.mark.parametrize("shape", [(40, 30), (40, 30, 1), (40, 30, 3)])
def test_normalize_is_the_standardisation_formula_in_a_contiguous_channels_first_array(shape):
    channels = shape[2] if len(shape) == 3 else 1
    mean, std = (0.485, 0.456, 0.406)[:channels], (0.229, 0.224, 0.225)[:channels]
    prep = Preprocessing(img_size=30, in_chans=channels, mean=mean, std=std, crop_pct=1.0, interpolation="bilinear")
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    pixels[0, 0], pixels[-1, -1] = 0, 255  # both ends of the range
    hwc = pixels.reshape(40, 30, channels).astype(np.float64)
    expected = ((hwc / 255 - np.array(prep.mean)) / np.array(prep.std)).transpose(2, 0, 1)  # (C, H, W)
    got = normalize(pixels, prep)
    assert got.dtype == np.float32 and got.shape == (channels, 40, 30) and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    ("size", "kept", "drawn"),
    [((1000, 750), (500, 375), (400, 300)), ((1399, 300), (467, 100), (400, 86)), ((300, 1399), (100, 467), (86, 400))],
)
@pytest.mark.parametrize("mode", ["RGB", "P", "I;16"])
def test_the_overlay_keeps_an_integer_reduction_under_twice_cam_max_side_and_draws_within_it(size, kept, drawn, mode):
    """Only the cheap box reduction runs with the decode; render_cam's bilinear step finishes it at the answer."""
    image = drawn_image(2, size=size, mode="RGB")
    image = image.convert("P") if mode == "P" else image.convert("L").convert("I;16") if mode == "I;16" else image
    prepared = prepare_image(encode(image, "PNG"), PREP, max_pixels=10**7, cam_max_side=400)
    assert prepared.original.size == kept and prepared.original.mode in ("L", "RGB")
    grid = np.random.default_rng(0).random((4, 4))
    pictures = render_cam(grid, prepared.original, 400, prepared.extent)
    assert (pictures.width, pictures.height) == drawn == fit_within(size, 400)
    assert decode_image(base64.b64decode(pictures.overlay_jpeg)).size == drawn
    if mode == "RGB":  # what the decode step kept is what render_cam reduces the whole image to, extent included
        assert pictures == render_cam(grid, image, 400)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_image_is_kept_for_the_overlay_within_cam_max_side(fmt):
    data = encode(drawn_image(2, size=(1600, 1200), mode="RGB"), fmt)
    prepared = prepare_image(data, PREP, max_pixels=10**7, cam_max_side=400)
    assert prepared.original.size == (400, 300)
    assert prepare_image(data, PREP, max_pixels=10**7, cam_max_side=None).original is None
    # The model input does not depend on whether a CAM was asked for.
    np.testing.assert_array_equal(
        prepared.pixels, prepare_image(data, PREP, max_pixels=10**7, cam_max_side=None).pixels
    )


def test_a_jpeg_decoded_at_its_stored_size_is_not_decoded_again_for_the_overlay(monkeypatch):
    """Smaller than cam_max_side and not drafted: a second decode would give the same picture."""
    import service.inference

    decodes = []
    monkeypatch.setattr(service.inference, "decode_image", lambda *a, **k: decodes.append(k) or decode_image(*a, **k))
    small = encode(drawn_image(3, size=(120, 60), mode="RGB"), "JPEG")  # under twice 32 px: no draft
    assert prepare_image(small, PREP, max_pixels=10**7, cam_max_side=400).original.size == (120, 60)
    assert len(decodes) == 1
    # Drafted for a small model input (1600x1200 decodes at 200x150 for PREP's 32 px), so decoded again near 400.
    large = encode(drawn_image(2, size=(1600, 1200), mode="RGB"), "JPEG")
    decodes.clear()
    assert prepare_image(large, PREP, max_pixels=10**7, cam_max_side=400).original.size == (400, 300)
    assert [call["target_size"] for call in decodes] == [resize_size(PREP), 400]


def test_prepare_image_refuses_too_many_pixels():
    with pytest.raises(ImageTooLargeError):
        prepare_image(encode(Image.new("L", (100, 100)), "PNG"), PREP, max_pixels=99 * 100, cam_max_side=None)


@pytest.mark.parametrize("mode", ["LAB", "HSV", "YCbCr", "I;16", "F", "1", "CMYK"])
def test_every_colour_mode_pillow_reads_becomes_model_input(mode):
    image = (
        drawn_image(3, size=(40, 40), mode="RGB").convert(mode) if mode != "I;16" else Image.new("I;16", (40, 40), 3000)
    )
    assert preprocess(image, PREP).shape == (1, 32, 32)


def test_a_mode_with_no_conversion_is_a_decode_error_naming_it():
    with pytest.raises(ImageDecodeError, match="image mode La cannot be converted"):
        preprocess(Image.new("La", (40, 40)), PREP)


def test_a_phone_jpeg_with_an_mpf_segment_decodes_as_its_first_frame():
    first, second = Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("RGB", (64, 48), (10, 200, 10))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    r, g, _ = decode_image(data).getpixel((10, 10))
    assert r > 150 and g < 50
