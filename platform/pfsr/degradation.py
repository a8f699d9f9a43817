"""Batched bicubic resizing and LR degradation on the tensors' own device.

Why our own kernel: kornia's antialiased bicubic (and torch's `interpolate(mode="bicubic")`, a = -0.75)
does not reproduce the MATLAB `imresize` kernel that made the DIV2K LR files; kornia's differs from Pillow's
BICUBIC by about 1/255 on real photos. MATLAB's kernel is the cubic with a = -0.5, widened by the scale factor
when shrinking (antialiasing), with symmetric padding at the borders. Being separable, a resize is two matrix
products with precomputed [out x in] weight matrices, which batches well on any device (and is faster than
kornia's resize on CPU: bench/degradation.py).

kornia is the tool for the optional extra degradations (`blur_noise_jpeg`: Gaussian blur, noise, JPEG), which
run on the batch's device too. The default, as the seed, is pure bicubic. Flips and 90-degree rotations happen
earlier, on the uint8 crops in the loader's workers (pfsr.data).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


def cubic(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB imresize, Pillow BICUBIC)."""
    ax = x.abs()
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))


@lru_cache(maxsize=64)
def _resize_matrix_cpu(in_size: int, out_size: int, scale: float, antialias: bool) -> Tensor:
    kernel_width = 4.0
    shrink = scale < 1 and antialias
    if shrink:
        kernel_width /= scale
    x = torch.arange(1, out_size + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in input coordinates (1-based)
    left = torch.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # [out, taps], 1-based
    dist = u[:, None] - idx
    weights = scale * cubic(dist * scale) if shrink else cubic(dist)
    weights = weights / weights.sum(dim=1, keepdim=True)
    # symmetric padding: mirror indices that fall outside [1, in_size]
    idx0 = idx.long() - 1
    period = 2 * in_size
    idx0 = torch.remainder(idx0, period)
    idx0 = torch.where(idx0 >= in_size, period - 1 - idx0, idx0)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    matrix.scatter_add_(1, idx0, weights)
    return matrix


def resize_matrix(in_size: int, out_size: int, scale: float, *, antialias: bool = True,
                  device=None, dtype=torch.float32) -> Tensor:
    """[out_size x in_size] weights of MATLAB's bicubic along one axis."""
    return _resize_matrix_cpu(in_size, out_size, float(scale), antialias).to(device=device, dtype=dtype)


def bicubic_resize(x: Tensor, scale: float, *, antialias: bool = True) -> Tensor:
    """MATLAB-style bicubic resize of [B x C x H x W] by `scale` (< 1 shrinks); output size round(H*scale).

    Values are not clamped (as MATLAB's double output); quantize with `to_uint8` when needed.
    """
    if x.ndim != 4:
        raise ValueError(f"bicubic_resize expects [B, C, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    out_h, out_w = round(h * scale), round(w * scale)
    compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    mh = resize_matrix(h, out_h, scale, antialias=antialias, device=x.device, dtype=compute)
    mw = resize_matrix(w, out_w, scale, antialias=antialias, device=x.device, dtype=compute)
    b, c = x.shape[:2]
    # Width first as one [B*C*H, W] x [W, out_w] product (one large GEMM is faster than B*C small ones), then
    # the height as a batched product.
    y = x.to(compute).reshape(-1, w) @ mw.T  # [B*C*H, out_w]
    y = torch.matmul(mh, y.reshape(b * c, h, out_w))  # [B*C, out_h, out_w]
    y = y.reshape(b, c, out_h, out_w)
    return y.to(x.dtype) if x.dtype.is_floating_point else y


def downsample(hr: Tensor, scale: int) -> Tensor:
    """HR [B, C, H, W] in [0, 1] -> LR [B, C, H/scale, W/scale]; H and W must be multiples of scale."""
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not a multiple of the scale {scale}")
    return bicubic_resize(hr, 1.0 / scale)


def upsample(lr: Tensor, scale: int) -> Tensor:
    """LR [B, C, h, w] -> bicubic [B, C, h*scale, w*scale]."""
    return bicubic_resize(lr, float(scale))


def bicubic_degradation(hr: Tensor, scale: int, generator: torch.Generator | None = None) -> Tensor:
    """The seed's degradation: MATLAB bicubic downsampling, clamped to [0, 1]."""
    return downsample(hr, scale).clamp(0, 1)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device) -> Tensor:
    """[n] draws from U[low, high] with `generator` (on its own device), moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return (low + (high - low) * torch.rand(n, generator=generator, device=gen_device)).to(device)


def blur_noise_jpeg_degradation(hr: Tensor, scale: int, generator: torch.Generator | None = None, *,
                                blur_sigma: tuple[float, float] = (0.2, 3.0),
                                noise_sigma: tuple[float, float] = (1 / 255, 25 / 255),
                                jpeg_quality: tuple[float, float] = (30.0, 95.0)) -> Tensor:
    """Classical degradation (Real-ESRGAN's first order): isotropic Gaussian blur of HR [B, C, H, W] (sigma in
    HR pixels), MATLAB bicubic downsampling, Gaussian noise, JPEG; every parameter drawn per sample from
    U[low, high]. -> LR [B, C, H/scale, W/scale] in [0, 1], on hr's device."""
    import kornia

    b = hr.shape[0]
    sigma = _uniform(b, *blur_sigma, generator, hr.device)
    radius = math.ceil(3 * blur_sigma[1])
    x = kornia.filters.gaussian_blur2d(hr, (2 * radius + 1,) * 2, torch.stack([sigma, sigma], dim=1),
                                       border_type="reflect")
    x = downsample(x, scale)
    std = _uniform(b, *noise_sigma, generator, hr.device).view(b, 1, 1, 1)
    gen_device = generator.device if generator is not None else hr.device
    x = x + std * torch.randn(x.shape, generator=generator, device=gen_device).to(hr.device)
    quality = _uniform(b, *jpeg_quality, generator, hr.device)
    return kornia.enhance.jpeg_codec_differentiable(x.clamp(0, 1), quality).clamp(0, 1)


DEGRADATIONS = {"bicubic": bicubic_degradation, "blur_noise_jpeg": blur_noise_jpeg_degradation}


def degrade(hr: Tensor, scale: int, method: str = "bicubic", generator: torch.Generator | None = None) -> Tensor:
    """Make the LR input from HR [B, C, H, W] in [0, 1] on its own device. Methods: DEGRADATIONS."""
    if method not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {method!r}; choose one of {sorted(DEGRADATIONS)}")
    return DEGRADATIONS[method](hr, scale, generator=generator)


def to_uint8(x: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 with rounding (as MATLAB's im2uint8)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
