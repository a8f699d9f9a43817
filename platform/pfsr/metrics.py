"""Per-image quality metrics with BasicSR's conventions (metrics/psnr_ssim.py), pinned to MATLAB's definitions.

Images are RGB on the 0-255 scale (uint8, or floats on that scale), H x W x C by default (`input_order="CHW"`
for channel-first), as numpy arrays or tensors; both go through the same float64 torch code, so the two agree.
- `crop_border` pixels are removed on every side first (the SR convention crops `scale` pixels).
- `test_y_channel`: compare the luma Y of ITU-R BT.601 (MATLAB rgb2ycbcr, Y in [16, 235], not rounded), in
  float64 (BasicSR converts in float32: on the test photos its figures differ from these by < 1e-6 dB, < 1e-8 SSIM).
- PSNR of identical images is inf (as BasicSR's numpy metric; its torch twin adds 1e-8 instead, we do not).
- SSIM: Wang et al. 2004 with an 11 x 11 Gaussian window (sigma 1.5), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2,
  statistics over the valid region only, mean over the map and then over channels.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

# MATLAB rgb2ycbcr's first row, for R, G, B in [0, 1]: Y = 16 + 65.481 R + 128.553 G + 24.966 B.
BT601_Y = (65.481, 128.553, 24.966)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def _as_tensor(img: Any) -> Tensor:
    """numpy or tensor -> float64 tensor on its device (numpy on the CPU)."""
    t = torch.from_numpy(np.asarray(img)) if not isinstance(img, Tensor) else img
    return t.to(torch.float64)


def rgb_to_y(img: Any) -> Any:
    """RGB [..., 3] on the 0-255 scale -> Y [...] in [16, 235] (float64; numpy in, numpy out)."""
    t = _as_tensor(img)
    if t.shape[-1] != 3:
        raise ValueError(f"rgb_to_y expects RGB in the last dimension, got shape {tuple(t.shape)}")
    y = 16.0 + t @ torch.tensor(BT601_Y, dtype=torch.float64, device=t.device) / 255.0
    return y if isinstance(img, Tensor) else y.cpu().numpy()


def _prepare(img: Any, crop_border: int, test_y_channel: bool, input_order: str) -> Tensor:
    """-> float64 [C x H x W], cropped, on the 0-255 scale (Y only when asked and the image is RGB)."""
    t = _as_tensor(img)
    if t.ndim == 2:
        t = t[:, :, None] if input_order == "HWC" else t[None]
    if t.ndim != 3 or input_order not in ("HWC", "CHW"):
        raise ValueError(f"expected an H x W x C or C x H x W image (input_order 'HWC' or 'CHW'), got shape "
                         f"{tuple(t.shape)} with input_order {input_order!r}")
    if input_order == "HWC":
        t = t.permute(2, 0, 1)
    if crop_border > 0:
        t = t[:, crop_border:-crop_border, crop_border:-crop_border]
    if test_y_channel and t.shape[0] == 3:
        t = rgb_to_y(t.permute(1, 2, 0))[None]
    return t.contiguous()


def _pair(img1: Any, img2: Any, crop_border: int, test_y_channel: bool, input_order: str) -> tuple[Tensor, Tensor]:
    if tuple(img1.shape) != tuple(img2.shape):
        raise ValueError(f"images differ in shape: {tuple(img1.shape)} vs {tuple(img2.shape)}")
    a = _prepare(img1, crop_border, test_y_channel, input_order)
    b = _prepare(img2, crop_border, test_y_channel, input_order).to(a.device)
    if a.shape[-1] < 1 or a.shape[-2] < 1:
        raise ValueError(f"crop_border {crop_border} leaves nothing of an image of shape {tuple(img1.shape)}")
    return a, b


def psnr(img1: Any, img2: Any, crop_border: int = 0, test_y_channel: bool = False, input_order: str = "HWC") -> float:
    """Peak signal-to-noise ratio in dB for peak 255: 10 log10(255^2 / MSE); inf for identical images."""
    a, b = _pair(img1, img2, crop_border, test_y_channel, input_order)
    mse = torch.mean((a - b) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_taps() -> list[float]:
    """cv2.getGaussianKernel(11, 1.5): the separable factor of BasicSR's 11 x 11 window."""
    g = [math.exp(-((i - SSIM_WINDOW // 2) ** 2) / (2 * SSIM_SIGMA**2)) for i in range(SSIM_WINDOW)]
    return [v / sum(g) for v in g]


def _filter_valid(x: Tensor, taps: list[float]) -> Tensor:
    """Gaussian-weighted local means over the valid region, [B x H x W] -> [B x H-10 x W-10]: shifted in-place
    sums along each axis, several times faster than float64 conv2d on the CPU, with the same result."""
    for dim in (-2, -1):
        n = x.shape[dim] - len(taps) + 1
        out = x.narrow(dim, 0, n) * taps[0]
        for k in range(1, len(taps)):
            out.add_(x.narrow(dim, k, n), alpha=taps[k])
        x = out
    return x


def ssim(img1: Any, img2: Any, crop_border: int = 0, test_y_channel: bool = False, input_order: str = "HWC") -> float:
    """Structural similarity (Wang et al. 2004), BasicSR's calculate_ssim: mean SSIM map per channel, then the
    mean over channels. Images must be at least 11 x 11 after the crop."""
    a, b = _pair(img1, img2, crop_border, test_y_channel, input_order)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after cropping {crop_border}, "
                         f"got {tuple(a.shape[-2:])}")
    g = _gaussian_taps()
    mu1, mu2 = _filter_valid(a, g), _filter_valid(b, g)
    var1 = _filter_valid(a * a, g) - mu1**2
    var2 = _filter_valid(b * b, g) - mu2**2
    cov = _filter_valid(a * b, g) - mu1 * mu2
    ssim_map = (((2 * mu1 * mu2 + SSIM_C1) * (2 * cov + SSIM_C2))
                / ((mu1**2 + mu2**2 + SSIM_C1) * (var1 + var2 + SSIM_C2)))
    return ssim_map.mean(dim=(1, 2)).mean().item()


def gradient_energy(img: Any, crop_border: int = 0, input_order: str = "HWC") -> float:
    """Mean absolute horizontal difference plus mean absolute vertical difference of Y (0-255 scale).

    Detail measure of issue 9: noise raises it above the HR image's, blur lowers it (bicubic x4: about 0.5x).
    """
    y = _prepare(img, crop_border, True, input_order)[0]
    return ((y[:, 1:] - y[:, :-1]).abs().mean() + (y[1:, :] - y[:-1, :]).abs().mean()).item()


def image_metrics(sr_uint8: Any, hr_uint8: Any, scale: int, lpips_model: Optional[torch.nn.Module] = None
                  ) -> dict[str, Optional[float]]:
    """All per-image figures of an SR result against HR, both H x W x 3 uint8 (numpy or tensor).

    PSNR/SSIM on Y and on RGB crop `scale` border pixels (BasicSR); gradient_energy (of SR, cropped the same) is
    to be compared with gradient_energy(HR); LPIPS (full image, `pfsr.features.LPIPS`) is None without a model.
    """
    out: dict[str, Optional[float]] = {
        "psnr_y": psnr(sr_uint8, hr_uint8, scale, test_y_channel=True),
        "ssim_y": ssim(sr_uint8, hr_uint8, scale, test_y_channel=True),
        "psnr_rgb": psnr(sr_uint8, hr_uint8, scale),
        "ssim_rgb": ssim(sr_uint8, hr_uint8, scale),
        "lpips": None,
        "gradient_energy": gradient_energy(sr_uint8, scale),
    }
    if lpips_model is not None:
        device = next(lpips_model.parameters()).device

        def batch(img: Any) -> Tensor:  # H x W x 3 uint8 -> [1 x 3 x H x W] in [0, 1]
            return (_as_tensor(img).permute(2, 0, 1)[None] / 255.0).to(device=device, dtype=torch.float32)

        with torch.no_grad():
            out["lpips"] = lpips_model(batch(sr_uint8), batch(hr_uint8)).item()
    return out


__all__ = ["rgb_to_y", "psnr", "ssim", "gradient_energy", "image_metrics"]
