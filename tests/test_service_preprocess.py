"""The service's image preparation: bytes -> model input through the trainer's own preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from support.images import drawn_image, encode

from model import Preprocessing
from model.preprocess import ImageTooLargeError, decode_image, preprocess, resize_size
from service.inference import prepare_image

PREP = Preprocessing(img_size=32, in_chans=1, mean=(0.3,), std=(0.35,), crop_pct=1.0, interpolation="bilinear")


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("CMYK", "TIFF"), ("RGB", "WEBP")]
)
def test_prepare_image_is_the_trainers_preprocess(mode, fmt):
    data = encode(drawn_image(1, size=(64, 48), mode=mode), fmt)
    prepared = prepare_image(data, PREP, max_pixels=10**6, keep_original=True)
    expected = preprocess(decode_image(data, target_size=resize_size(PREP)), PREP)
    np.testing.assert_array_equal(prepared.pixels, expected)
    assert prepared.pixels.shape == (1, 32, 32) and prepared.original.size == (64, 48)


def test_a_large_jpeg_keeps_its_full_size_for_the_overlay():
    data = encode(drawn_image(2, size=(800, 600), mode="RGB"), "JPEG")
    prepared = prepare_image(data, PREP, max_pixels=10**7, keep_original=True)
    assert prepared.original.size == (800, 600)
    assert prepare_image(data, PREP, max_pixels=10**7, keep_original=False).original is None


def test_prepare_image_refuses_too_many_pixels():
    with pytest.raises(ImageTooLargeError):
        prepare_image(encode(Image.new("L", (100, 100)), "PNG"), PREP, max_pixels=99 * 100, keep_original=False)
