"""pfsr.degradation: MATLAB bicubic against Pillow's BICUBIC on the scikit-image photos, shapes, and the
optional kornia blur/noise/JPEG degradation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pfsr.degradation import DEGRADATIONS, bicubic_resize, degrade, downsample, to_uint8, upsample


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_bicubic_matches_pillow_on_photos(photos, scale):
    """Pillow's BICUBIC reduction is MATLAB's kernel (a = -0.5, widened by the scale, antialiased)."""
    for name, img in photos.items():
        h, w = (s - s % scale for s in img.shape[:2])
        img = img[:h, :w]
        pil = np.asarray(Image.fromarray(img).resize((w // scale, h // scale), Image.BICUBIC), dtype=np.float64)
        ours = to_uint8(downsample(_to_tensor(img), scale))[0].permute(1, 2, 0).numpy().astype(np.float64)
        mae = np.abs(ours - pil).mean()
        assert mae < 0.5, f"{name} x{scale}: mean absolute error {mae:.3f}/255 against Pillow"


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_shapes_and_batching(scale):
    hr = torch.rand(5, 3, 24 * scale, 16 * scale, dtype=torch.float64)
    lr = downsample(hr, scale)
    assert lr.shape == (5, 3, 24, 16) and lr.dtype == torch.float64
    assert upsample(lr, scale).shape == hr.shape
    # one image at a time gives the batch's result: nothing leaks across the batch
    assert torch.allclose(torch.cat([downsample(hr[i:i + 1], scale) for i in range(5)]), lr)
    with pytest.raises(ValueError, match="not a multiple of the scale"):
        downsample(hr[..., :-1], scale)


def test_constant_images_stay_constant():
    hr = torch.full((2, 3, 48, 48), 0.3)
    assert torch.allclose(downsample(hr, 4), torch.full((2, 3, 12, 12), 0.3), atol=1e-6)
    assert torch.allclose(bicubic_resize(hr, 0.5, antialias=False), torch.full((2, 3, 24, 24), 0.3), atol=1e-6)


def test_default_degradation_is_pure_bicubic(photos):
    hr = _to_tensor(photos["coffee"][:192, :192])
    assert torch.equal(degrade(hr, 4), downsample(hr, 4).clamp(0, 1))
    assert set(DEGRADATIONS) == {"bicubic", "blur_noise_jpeg"}
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(hr, 4, "gaussian")


@pytest.mark.parametrize("scale", [2, 4])
def test_blur_noise_jpeg_is_seeded_and_degrades(photos, scale):
    hr = torch.cat([_to_tensor(photos[n][:96, :96]) for n in ("astronaut", "coffee", "chelsea")])
    lr = degrade(hr, scale, "blur_noise_jpeg", torch.Generator().manual_seed(0))
    assert lr.shape == (3, 3, 96 // scale, 96 // scale) and 0 <= lr.min() and lr.max() <= 1
    assert torch.equal(lr, degrade(hr, scale, "blur_noise_jpeg", torch.Generator().manual_seed(0)))
    assert not torch.equal(lr, degrade(hr, scale, "blur_noise_jpeg", torch.Generator().manual_seed(1)))
    clean = downsample(hr, scale).clamp(0, 1)
    assert 1 / 255 < (lr - clean).abs().mean() < 0.2  # visibly degraded, still the same picture
