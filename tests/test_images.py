"""pfsr.images: decoding to 8-bit sRGB with notes, one-line rejections, BasicSR sub-image boxes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pfsr.errors import InputError
from pfsr.images import (ImageRejected, crop, decode_image, encode_image, is_image_name, load_rgb, read_header,
                         subimage_boxes)
from tests.zoo import CONVERTED, MAX_PIXELS, MIN_SIZE, REJECTED, zoo_files


@pytest.fixture(scope="module")
def zoo(photos):
    return zoo_files(photos["astronaut"])


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_bad_files_are_rejected_with_a_one_line_reason(zoo, name):
    with pytest.raises(ImageRejected) as info:
        decode_image(zoo[name], name, MAX_PIXELS, min_size=MIN_SIZE)
    assert REJECTED[name] in info.value.reason
    assert "\n" not in info.value.reason
    assert str(info.value).startswith(f"{name}: ") and isinstance(info.value, InputError)


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_awkward_files_become_8bit_rgb_with_a_note(zoo, name):
    out = decode_image(zoo[name], name, MAX_PIXELS, min_size=MIN_SIZE)
    assert out.rgb.dtype == np.uint8 and out.rgb.ndim == 3 and out.rgb.shape[2] == 3
    assert any(CONVERTED[name] in note for note in out.notes), out.notes
    assert (out.alpha is not None) == (name == "rgba.png")


def test_conversions_keep_the_content(zoo, photos):
    src = photos["astronaut"][:96, :128].astype(int)
    rotated = decode_image(zoo["rotated.jpg"], "rotated.jpg")
    assert rotated.rgb.shape == (128, 96, 3)  # orientation 6: shown rotated 90 degrees clockwise
    assert np.abs(np.rot90(rotated.rgb, k=1).astype(int) - src).mean() < 3  # JPEG q95
    gray = decode_image(zoo["gray16.png"], "gray16.png").rgb
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.array_equal(gray[..., 0], np.asarray(Image.fromarray(photos["astronaut"][:96, :128]).convert("L")))
    rgba = decode_image(zoo["rgba.png"], "rgba.png")
    assert np.array_equal(rgba.rgb, src) and rgba.alpha.shape == (96, 128)
    assert np.array_equal(decode_image(zoo["rgb16.tif"], "rgb16.tif").rgb, src)
    # A linear-light 128 under the linear profile is sRGB 188 (1.055 * 0.502^(1/2.4) - 0.055 = 0.737).
    assert np.abs(decode_image(zoo["linear_icc.png"], "linear_icc.png").rgb.astype(int) - 188).max() <= 1


def test_pixel_count_is_checked_from_the_header_before_decoding(zoo):
    # big.png claims 3000 x 3000 over a few bytes: a full decode would fail as truncated; the header says enough.
    with pytest.raises(ImageRejected, match="too many pixels: 3000x3000"):
        read_header(zoo["big.png"], "big.png", max_pixels=MAX_PIXELS)
    header = read_header(zoo["big.png"], "big.png", max_pixels=10_000_000)
    assert (header.width, header.height, header.format) == (3000, 3000, "PNG")
    rotated = read_header(zoo["rotated.jpg"], "rotated.jpg")
    assert (rotated.width, rotated.height, rotated.orientation) == (96, 128, 6)


def test_photos_decode_exactly(photos):
    for name, img in photos.items():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
        out = decode_image(buf.getvalue(), f"{name}.png")
        assert np.array_equal(out.rgb, img) and out.notes == [] and out.alpha is None


def _basicsr_boxes(w, h, patch, step):
    """BasicSR scripts/data_preparation/extract_subimages.py, worker(), thresh_size = 0."""
    h_space = np.arange(0, h - patch + 1, step)
    if h - (h_space[-1] + patch) > 0:
        h_space = np.append(h_space, h - patch)
    w_space = np.arange(0, w - patch + 1, step)
    if w - (w_space[-1] + patch) > 0:
        w_space = np.append(w_space, w - patch)
    return [(int(x), int(y), int(x) + patch, int(y) + patch) for y in h_space for x in w_space]


@pytest.mark.parametrize("w,h", [(2040, 1356), (480, 480), (481, 719), (1000, 960)])
def test_subimage_boxes_match_basicsr(w, h):
    assert subimage_boxes(w, h, 480, 240) == _basicsr_boxes(w, h, 480, 240)


def test_small_sides_stay_whole():
    assert subimage_boxes(300, 200, 480, 240) == [(0, 0, 300, 200)]
    assert subimage_boxes(700, 200, 480, 240) == [(0, 0, 480, 200), (220, 0, 700, 200)]
    assert subimage_boxes(700, 500, 0, 0) == [(0, 0, 700, 500)]


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_encoding_is_lossless_and_deterministic(photos, fmt):
    patch = crop(photos["coffee"], (10, 20, 138, 116))
    data = encode_image(patch, fmt)
    assert data == encode_image(patch.copy(), fmt)
    assert np.array_equal(load_rgb(data), patch)


def test_image_names():
    assert is_image_name("a/b/0001.PNG") and is_image_name("x.JPEG") and is_image_name("y.webp")
    assert not is_image_name("notes.txt") and not is_image_name("a/.hidden.png") and not is_image_name("x.tar")
