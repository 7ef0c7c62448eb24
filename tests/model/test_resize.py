"""The resize and centre crop of model.preprocess against the release's evaluation transform (timm: PIL resizes the
whole image to the shorter side img_size / crop_pct, then the centre crop), on real photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from support.images import drawn_image
from support.photos import varied_jpegs

from model import Preprocessing
from model.preprocess import (
    RESAMPLE,
    VECTOR_MAX_PIXELS,
    crop_geometry,
    decode_image,
    resize_and_crop,
    resize_size,
    to_model_mode,
)

PHOTOS = 40


def prep_for(interpolation: str, in_chans: int = 3, img_size: int = 224, crop_pct: float = 0.9) -> Preprocessing:
    return Preprocessing(
        img_size=img_size,
        in_chans=in_chans,
        mean=(0.5,) * in_chans,
        std=(0.25,) * in_chans,
        crop_pct=crop_pct,
        interpolation=interpolation,
    )


def release_transform(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """uint8 (S, S[, C]): PIL's resize of the whole image, then the centre crop."""
    new_w, new_h, left, top = crop_geometry(*image.size, prep)
    resized = np.asarray(image.resize((new_w, new_h), RESAMPLE[prep.interpolation]))
    return resized[top : top + prep.img_size, left : left + prep.img_size]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photos as the service decodes them for ViTAE-T (JPEG draft to the resize size), in RGB."""
    jpegs = varied_jpegs(PHOTOS)
    if not jpegs:
        pytest.skip("no source photographs installed (matplotlib, scikit-learn: the dev extras)")
    size = resize_size(prep_for("bicubic"))
    return [to_model_mode(decode_image(data, target_size=size), 3) for data in jpegs]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_rgb_photos_are_the_release_transform_within_rounding(photos, interpolation):
    """torch's 8-bit kernel rounds its weights otherwise than PIL: values one level off, rarely two or three. On 200
    such photos: at most 3 levels, mean 0.007 levels. PIL resampling only the crop's source box (as this project
    did before) takes the vertical pass first: up to 11 levels, mean 0.025."""
    prep = prep_for(interpolation)
    diffs = []
    for image in photos:
        got, expected = resize_and_crop(image, prep), release_transform(image, prep)
        assert got.dtype == np.uint8 and got.shape == expected.shape == (224, 224, 3)
        diffs.append(np.abs(got.astype(np.int16) - expected.astype(np.int16)))
        assert diffs[-1].max() <= 3, f"{image.size}: {diffs[-1].max()} levels off"
    assert np.mean([d.mean() for d in diffs]) < 0.015
    assert np.mean([(d > 1).mean() for d in diffs]) < 0.001


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest", "lanczos"])
def test_grey_images_and_pil_only_filters_are_exactly_the_release_transform(photos, interpolation):
    for image in photos[:10]:
        grey = image.convert("L")
        prep = prep_for(interpolation, in_chans=1, img_size=32, crop_pct=0.875)
        np.testing.assert_array_equal(resize_and_crop(grey, prep), release_transform(grey, prep))
        if interpolation in ("nearest", "lanczos"):
            prep = prep_for(interpolation)
            np.testing.assert_array_equal(resize_and_crop(image, prep), release_transform(image, prep))


def test_an_image_already_at_the_resize_size_is_only_cropped():
    prep = prep_for("bicubic", img_size=32, crop_pct=0.8)  # resize to 40
    image = drawn_image(4, size=(40, 56), mode="RGB")
    np.testing.assert_array_equal(resize_and_crop(image, prep), np.asarray(image)[12:44, 4:36])


def test_an_rgb_image_over_the_vector_limit_is_resized_by_pil_exactly():
    """No writable copy of a huge upload for torch: PIL's whole-image resize, the release's transform itself."""
    image = drawn_image(5, size=(2600, 1600), mode="RGB")
    assert image.width * image.height > VECTOR_MAX_PIXELS
    prep = prep_for("bicubic")
    np.testing.assert_array_equal(resize_and_crop(image, prep), release_transform(image, prep))
