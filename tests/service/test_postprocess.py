"""Post-processing as pure functions: logits -> top-k, tokens -> CAM, CAM -> colours and pictures."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from support.images import drawn_image
from support.photos import varied_jpegs

from model.preprocess import decode_image, to_model_mode
from service.postprocess import (
    JET_TABLE,
    box_reduce,
    fit_within,
    jet,
    jet_image,
    last_cell_cam,
    levels,
    normalize_cam,
    palette_png,
    render_cam,
    scale_picture,
    softmax,
    top_k,
    upsample,
)


def test_top_k_is_sorted_softmax_with_labels():
    logits = np.array([0.5, 3.0, -1.0, 2.0], np.float32)
    predictions = top_k(logits, ["a", "b", "c", "d"], 3)
    assert [p.label for p in predictions] == ["b", "d", "a"]
    assert predictions[0].score == pytest.approx(softmax(logits)[1])
    assert softmax(np.array([1000.0, 1000.0])).tolist() == [0.5, 0.5]  # no overflow


def test_last_cell_cam_sums_to_logit_minus_bias():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(3, 16, 8)).astype(np.float32)  # (B, N, D)
    weight, bias = rng.normal(size=(5, 8)), rng.normal(size=5)
    logits = tokens.mean(axis=1) @ weight.T + bias  # what a mean-pooled head computes
    targets = np.array([0, 4, 2])
    raw = last_cell_cam(tokens, weight, targets, (4, 4))
    assert raw.shape == (3, 4, 4)
    np.testing.assert_allclose(raw.sum(axis=(1, 2)), logits[np.arange(3), targets] - bias[targets], atol=1e-6)


def test_normalize_cam_is_relu_then_min_max_per_image():
    raw = np.array([[[-2.0, 0.0], [1.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    cam = normalize_cam(raw)
    np.testing.assert_allclose(cam[0], [[0.0, 0.0], [1 / 3, 1.0]])
    np.testing.assert_array_equal(cam[1], np.zeros((2, 2)))  # a flat map has nothing to show


def test_jet_runs_from_blue_to_red():
    colours = jet(np.array([[0.0, 0.5, 1.0]]))
    assert colours.dtype == np.uint8 and colours.shape == (1, 3, 3)
    blue, green, red = colours[0]
    assert blue[2] > 100 and blue[0] == 0
    assert green[1] == 255
    assert red[0] > 100 and red[2] == 0


def test_upsampling_is_bilinear_at_the_requested_size():
    grid = np.array([[0.0, 1.0]])
    up = upsample(grid, (8, 3))
    assert up.shape == (3, 8)
    assert np.all(np.diff(up[1]) >= 0) and 0.0 <= up.min() and up.max() <= 1.0


def test_render_cam_draws_a_small_image_at_its_own_size():
    images = render_cam(np.eye(4), drawn_image(0, size=(50, 20), mode="L"))
    assert (images.width, images.height) == (50, 20)
    assert images.grid == np.eye(4).tolist()
    heatmap, overlay = decoded(images.heatmap_png), decoded(images.overlay_jpeg)
    assert (heatmap.format, overlay.format) == ("PNG", "JPEG")
    assert heatmap.size == overlay.size == (50, 20)


def test_render_cam_caps_the_longer_side_and_keeps_the_aspect():
    images = render_cam(np.eye(4), drawn_image(0, size=(640, 427), mode="RGB"), max_side=256)
    assert (images.width, images.height) == (256, 171)
    assert decoded(images.heatmap_png).size == decoded(images.overlay_jpeg).size == (256, 171)


def test_heatmap_png_shows_the_jet_colours_of_the_map():
    grid = np.array([[0.0, 1.0], [0.0, 1.0]])
    heatmap = np.asarray(decoded(render_cam(grid, Image.new("RGB", (64, 64))).heatmap_png).convert("RGB"))
    np.testing.assert_array_equal(heatmap[32, 0], JET_TABLE[0])  # the cold edge: blue
    np.testing.assert_array_equal(heatmap[32, -1], JET_TABLE[255])  # the hot edge: red
    assert heatmap[32, 0, 2] > 100 and heatmap[32, -1, 0] > 100


def test_overlay_is_the_half_and_half_blend_of_image_and_heatmap():
    image = drawn_image(5, size=(96, 64), mode="RGB")
    grid = np.linspace(0, 1, 16).reshape(4, 4)
    overlay = np.asarray(decoded(render_cam(grid, image).overlay_jpeg), dtype=np.float64)
    heat = JET_TABLE[levels(grid, image.size)]
    expected = (np.asarray(image, dtype=np.float64) + heat) / 2
    assert np.abs(overlay - expected).mean() < 3  # JPEG at quality 90: a few levels of error on average


def test_fit_within_scales_down_only():
    assert fit_within((512, 512), 256) == (256, 256)
    assert fit_within((400, 640), 256) == (160, 256)
    assert fit_within((28, 28), 256) == (28, 28)


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


@pytest.mark.parametrize("shape", [(171, 256), (1, 7), (9, 1)])
def test_palette_png_decodes_to_the_same_indices_and_colours_whatever_the_rows(shape):
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 256, shape, dtype=np.uint8)  # neighbouring rows far apart: the filter wraps mod 256
    png = palette_png(indices, JET_TABLE)
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.mode, image.size) == ("PNG", "P", shape[::-1])
    np.testing.assert_array_equal(np.asarray(image), indices)
    np.testing.assert_array_equal(np.asarray(image.getpalette(), np.uint8).reshape(-1, 3), JET_TABLE)


def test_palette_png_of_a_heatmap_is_smaller_than_pils_unfiltered_one():
    rng = np.random.default_rng(1)
    map_levels = levels(normalize_cam(rng.normal(size=(14, 14))), (256, 171))
    ours = palette_png(map_levels, JET_TABLE)
    buffer = io.BytesIO()
    jet_image(map_levels).save(buffer, format="PNG", compress_level=1)
    assert len(ours) < 0.8 * len(buffer.getvalue()), (len(ours), len(buffer.getvalue()))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ours))), map_levels)


def test_an_rgb_overlay_picture_is_pils_bilinear_scaling_of_its_exact_extent_within_one_level():
    """torch's 8-bit kernel scales the box-reduced picture over its exact extent, remainder row included: within
    one level of PIL's scaling of the same box (ignoring the half row shifts edges by many levels)."""
    photos = [to_model_mode(decode_image(data), 3) for data in varied_jpegs(16, seed=3)]
    if not photos:
        pytest.skip("no source photographs installed (matplotlib, scikit-learn: the dev extras)")
    fractional = 0
    for photo in photos:
        base, extent = box_reduce(photo, 256)
        size = fit_within(extent, 256)
        fractional += extent != base.size
        got = np.asarray(scale_picture(base, size, extent), dtype=np.int16)
        expected = np.asarray(base.resize(size, Image.Resampling.BILINEAR, box=(0, 0, *extent)), dtype=np.int16)
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1, photo.size
    assert fractional >= 3  # the remainder row or column is exercised
