"""Per-image metrics pinned to references: MATLAB's BT.601 Y, hand-computed PSNRs, scikit-image's SSIM and PSNR,
and the bicubic x4 figures of real photos."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pfsr.degradation import downsample, to_uint8, upsample
from pfsr.metrics import gradient_energy, image_metrics, psnr, rgb_to_y, ssim

# skimage and these metrics compute the same float64 quantities (window 2 * int(3.5 * 1.5 + 0.5) + 1 = 11 taps of
# the same normalised Gaussian, the same 5-pixel valid margin, the same constants for data_range 255) and differ
# only in summation order: ~1e-16 relative on local sums up to 255^2 = 6.5e4 gives variance errors ~1e-11,
# against C2 = 58.5 in the denominators -> ~1e-12 in SSIM. 1e-9 leaves room for other BLAS orders.
SKIMAGE_TOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: one thread (conftest)


def bicubic_x4(hr: np.ndarray) -> np.ndarray:
    """HR H x W x 3 uint8 (sides multiples of 4) -> MATLAB-bicubic down and up x4, uint8."""
    t = torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255
    return to_uint8(upsample(downsample(t, 4), 4))[0].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def pairs(photos):
    """name -> (bicubic x4, HR), the HR cut to multiples of 4."""
    out = {}
    for name in ("astronaut", "coffee", "chelsea"):
        img = photos[name]
        hr = img[: img.shape[0] // 4 * 4, : img.shape[1] // 4 * 4]
        out[name] = bicubic_x4(hr), hr
    return out


def test_rgb_to_y_matches_matlab_rgb2ycbcr():
    rgb = np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]], np.uint8)
    expected = np.array([235.0, 16.0, 16 + 65.481, 16 + 128.553, 16 + 24.966, 16 + 219 * 128 / 255])
    y = rgb_to_y(rgb)
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)
    yt = rgb_to_y(torch.from_numpy(rgb))
    assert isinstance(yt, torch.Tensor)
    np.testing.assert_allclose(yt.numpy(), expected, rtol=0, atol=1e-12)


def test_psnr_of_a_known_error(photos):
    """+-d on every value (a checkerboard of signs) is an MSE of d^2 on RGB; on Y, d (65.481 + 128.553 + 24.966)
    / 255 = 219 d / 255 per pixel."""
    hr = photos["astronaut"][:128, :128].clip(10, 245).astype(np.uint8)
    d = 3
    sign = np.where((np.indices(hr.shape[:2]).sum(0) % 2)[..., None] == 0, 1, -1)
    sr = (hr.astype(int) + d * sign).astype(np.uint8)
    assert psnr(sr, hr, 0) == pytest.approx(20 * math.log10(255 / d), abs=1e-10)  # 38.588 dB
    assert psnr(sr, hr, 4, test_y_channel=True) == pytest.approx(20 * math.log10(255 / (219 * d / 255)), abs=1e-10)


def test_identical_images_are_inf_and_one_for_numpy_and_torch(photos):
    hr = photos["coffee"][:64, :64]
    for img in (hr, torch.from_numpy(hr)):
        assert psnr(img, img, 4, test_y_channel=True) == math.inf
        assert psnr(img, img, 0) == math.inf
        assert ssim(img, img, 4, test_y_channel=True) == pytest.approx(1.0, abs=1e-12)


def test_numpy_torch_and_channel_order_agree(pairs):
    sr, hr = pairs["chelsea"]
    for y in (True, False):
        ref_p, ref_s = psnr(sr, hr, 4, y), ssim(sr, hr, 4, y)
        ts, th = torch.from_numpy(sr), torch.from_numpy(hr)
        assert psnr(ts, th, 4, y) == ref_p and ssim(ts, th, 4, y) == ref_s
        chw = dict(input_order="CHW")
        assert psnr(ts.permute(2, 0, 1), th.permute(2, 0, 1), 4, y, **chw) == ref_p
        assert ssim(ts.permute(2, 0, 1), th.permute(2, 0, 1), 4, y, **chw) == pytest.approx(ref_s, abs=1e-15)


def test_crop_border_removes_the_border(photos):
    hr = photos["rocket"][:64, :64]
    sr = hr.copy()
    sr[:4] = 0
    sr[:, -4:] = 255
    assert psnr(sr, hr, 4) == math.inf
    assert psnr(sr, hr, 3) < 40


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_ssim_and_psnr_on_y_agree_with_skimage(pairs, name):
    sr, hr = pairs[name]
    y_sr, y_hr = rgb_to_y(sr)[4:-4, 4:-4], rgb_to_y(hr)[4:-4, 4:-4]
    ref_ssim = structural_similarity(y_sr, y_hr, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=255)
    assert abs(ssim(sr, hr, 4, test_y_channel=True) - ref_ssim) < SKIMAGE_TOL
    ref_psnr = peak_signal_noise_ratio(y_hr, y_sr, data_range=255)
    assert psnr(sr, hr, 4, test_y_channel=True) == pytest.approx(ref_psnr, rel=1e-12)


def test_ssim_on_rgb_is_the_channel_mean_as_skimage(pairs):
    sr, hr = pairs["coffee"]
    ref = structural_similarity(sr[4:-4, 4:-4].astype(np.float64), hr[4:-4, 4:-4].astype(np.float64),
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
                                channel_axis=-1)
    assert abs(ssim(sr, hr, 4) - ref) < SKIMAGE_TOL


def test_bicubic_x4_figures_on_photos(pairs):
    """Bicubic x4 PSNR(Y) on natural photos lies in the range the SR literature reports for its benchmarks
    (Urban100 about 23.1 dB, Set5 about 28.4 dB; here 26.9, 27.3 and 31.5 dB); the blur shows as a fraction of
    the HR gradient energy (0.55, 0.32, 0.42 here; issue 9's prototype saw 0.47)."""
    for name, (sr, hr) in pairs.items():
        m = image_metrics(sr, hr, 4)
        assert 22 < m["psnr_y"] < 34, (name, m)
        assert m["psnr_rgb"] < m["psnr_y"]  # chroma errors add to RGB
        assert 0.6 < m["ssim_y"] < 0.95, (name, m)
        ratio = m["gradient_energy"] / gradient_energy(hr, 4)
        assert 0.2 < ratio < 0.8, (name, ratio)


def test_gradient_energy_hand_computed_and_noise_raises_it(photos):
    stripes = np.zeros((16, 16, 3), np.uint8)
    stripes[:, ::2] = 255  # black/white columns: Y alternates 16, 235; rows are constant
    assert gradient_energy(stripes) == pytest.approx(235 - 16, abs=1e-12)
    assert gradient_energy(stripes.transpose(1, 0, 2)) == pytest.approx(219, abs=1e-12)
    assert gradient_energy(np.full((8, 8, 3), 77, np.uint8)) == 0
    hr = photos["astronaut"][:128, :128]
    noisy = (hr + np.random.default_rng(0).normal(0, 10, hr.shape)).clip(0, 255).astype(np.uint8)
    assert gradient_energy(noisy) > 1.2 * gradient_energy(hr)


def test_image_metrics_keys_and_consistency(pairs):
    sr, hr = pairs["astronaut"]
    m = image_metrics(sr, hr, 4)
    assert set(m) == {"psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "lpips", "gradient_energy"}
    assert m["lpips"] is None
    assert m["psnr_y"] == psnr(sr, hr, 4, test_y_channel=True)
    assert m["ssim_rgb"] == ssim(sr, hr, 4)
    assert image_metrics(torch.from_numpy(sr), torch.from_numpy(hr), 4) == m


def test_bad_inputs_are_named():
    a = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, a[:16], 0)
    with pytest.raises(ValueError, match="11x11"):
        ssim(a[:16, :16], a[:16, :16], 4)
    with pytest.raises(ValueError, match="RGB in the last dimension"):
        rgb_to_y(np.zeros((4, 4)))
