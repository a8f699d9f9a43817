"""Pretrained feature distances: VGG19 conv5_4 L1 (the quality loss of the reference code) and LPIPS (VGG).

The VGG trunks are written here (no torchvision import) with torchvision's module indices, so that their state
dicts read torchvision's files directly: `features.0.weight`, `features.0.bias`, ... (the `classifier.*` keys of
those files are ignored). Files are looked up as torchvision would download them: in torch hub's checkpoints
folder ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints), or at an explicit path.
Nothing is downloaded; a missing file is an InputError that says which file and where it was looked for.

LPIPS v0.1 (Zhang et al. 2018) takes its linear layers from the installed `lpips` package's weights file;
the package itself is never imported (it imports torchvision).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError

VGG16_FILE = "vgg16-397923af.pth"
VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG_URL = "https://download.pytorch.org/models/{}"

# torchvision's vgg cfgs "D" (VGG16) and "E" (VGG19): conv widths, "M" = 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# conv5_4 in VGG19's `features`, before its ReLU: the reference code takes `vgg.features[:35]`
# (ECDP lib/model/percep.py lines 9-11, feature_layer = 34).
VGG19_CONV5_4 = 34
LPIPS_VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in VGG16's `features`
LPIPS_CHANNELS = (64, 128, 256, 512, 512)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# lpips.ScalingLayer: maps [-1, 1] inputs to ImageNet statistics.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def hub_checkpoints_dir() -> Path:
    """Where torchvision keeps downloaded weights: $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_backbone_weights(filename: str, explicit_path: Optional[str | os.PathLike] = None
                          ) -> tuple[Optional[Path], str]:
    """Locate torchvision's `filename` (e.g. vgg16-397923af.pth): the explicit path when given, else torch hub's
    checkpoints folder. Returns (path, "where it came from") or (None, "why not"), for reports that say which."""
    if explicit_path is not None:
        path = Path(explicit_path).expanduser()
        if path.is_file():
            return path, f"given path {path}"
        return None, f"{filename}: the given path {path} is not a file"
    path = hub_checkpoints_dir() / filename
    if path.is_file():
        return path, f"torch hub cache {path}"
    return None, (f"{filename} not found in torch hub's checkpoints folder {path.parent} "
                  f"($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints) and no path was given")


def _missing_message(filename: str, reason: str, use: str, offline_hint: str) -> str:
    return (f"{use} needs torchvision's ImageNet weights {filename}, which were not found: {reason}. Download "
            f"{VGG_URL.format(filename)} into $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints) "
            f"or pass its path; {offline_hint}")


def vgg_features(cfg: Sequence[int | str], end: int) -> nn.Sequential:
    """torchvision's `vgg.features` (conv3x3 + ReLU, "M" max-pool) cut after layer index `end - 1`."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1), nn.ReLU()]
            in_ch = int(v)
    return nn.Sequential(*layers[:end])


def load_vgg_features(features: nn.Sequential, path: Path) -> None:
    """Load the `features.*` tensors of a torchvision VGG state-dict file (weights_only) into `features`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download or a file that is not a state dict
        raise InputError(f"{path}: cannot read as a torchvision state dict: {e}") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state dict, got {type(state).__name__}")
    wanted = features.state_dict()
    trunk = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")
             and k[len("features."):] in wanted}
    missing = sorted(set(wanted) - set(trunk))
    if missing:
        raise InputError(f"{path}: not a torchvision VGG state dict of this depth; missing features.{missing[0]}")
    bad = [k for k, v in trunk.items() if v.shape != wanted[k].shape]
    if bad:
        raise InputError(f"{path}: features.{bad[0]} has shape {tuple(trunk[bad[0]].shape)}, "
                         f"expected {tuple(wanted[bad[0]].shape)}")
    features.load_state_dict(trunk)


class VGG19Distance(nn.Module):
    """L1 distance between VGG19 conv5_4 features (before its ReLU; ImageNet normalization) of x and y,
    [N x 3 x H x W] in [0, 1] -> scalar: the reference code's image-quality feature loss.

    `weights_path`: torchvision's vgg19-dcbb9e9d.pth; None looks in torch hub's checkpoints folder.
    """

    def __init__(self, weights_path: Optional[str | os.PathLike] = None):
        super().__init__()
        path, reason = find_backbone_weights(VGG19_FILE, weights_path)
        if path is None:
            raise InputError(_missing_message(VGG19_FILE, reason, "loss.quality_features: vgg19",
                                              "set loss.quality_vgg19_weights, or use `loss.quality_features: "
                                              "laplacian`, which needs no weights and works offline"))
        self.source = reason
        self.features = vgg_features(VGG19_CFG, VGG19_CONV5_4 + 1)
        load_vgg_features(self.features, path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD)[None, :, None, None], persistent=False)

    def embed(self, x: Tensor) -> Tensor:
        """[N x 3 x H x W] in [0, 1] -> conv5_4 features (pre-ReLU, any sign) [N x 512 x H/16 x W/16]."""
        return self.features((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return F.l1_loss(self.embed(x), self.embed(y))


def lpips_lin_weights_path() -> Path:
    """The released LPIPS v0.1 VGG linear layers inside the installed `lpips` package (found without importing
    it: the package imports torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("LPIPS needs the linear-layer weights of the `lpips` package (lpips/weights/v0.1/vgg.pth); "
                         "install it without its torchvision dependency: pip install --no-deps lpips")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    if not path.is_file():
        raise InputError(f"the installed lpips package has no {path}; reinstall it: pip install --no-deps lpips")
    return path


def normalize_channels(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit length along channels, as lpips.normalize_tensor. [N x C x H x W]."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 with the VGG16 trunk: forward(x, y), [N x 3 x H x W] in [0, 1] -> distances [N] (0 for equal
    images). Inputs are mapped to [-1, 1] and through lpips' scaling layer; features at relu1_2 ... relu5_3 are
    unit-normalized over channels, their squared differences weighted by the released 1x1 linear layers,
    averaged over space and summed over layers.

    `vgg16_weights`: torchvision's vgg16-397923af.pth; None looks in torch hub's checkpoints folder.
    """

    def __init__(self, vgg16_weights: Optional[str | os.PathLike] = None):
        super().__init__()
        path, reason = find_backbone_weights(VGG16_FILE, vgg16_weights)
        if path is None:
            raise InputError(_missing_message(VGG16_FILE, reason, "LPIPS (VGG)",
                                              "without it evaluation reports lpips as null"))
        self.source = reason
        self.features = vgg_features(VGG16_CFG, LPIPS_VGG16_TAPS[-1] + 1)
        load_vgg_features(self.features, path)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        lin_path = lpips_lin_weights_path()
        released = torch.load(lin_path, map_location="cpu", weights_only=True)
        # lpips names them lin{k}.model.1.weight (model.0 is a dropout)
        self.lins.load_state_dict({f"{k}.weight": released[f"lin{k}.model.1.weight"] for k in range(len(self.lins))})
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None], persistent=False)
        self.requires_grad_(False).eval()

    def taps(self, x: Tensor) -> list[Tensor]:
        """[N x 3 x H x W] in [0, 1] -> the five relu features."""
        h = ((2 * x - 1) - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_VGG16_TAPS:
                out.append(h)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two [N, 3, H, W] batches of one shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        total = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, self.taps(x), self.taps(y)):
            diff = (normalize_channels(fx) - normalize_channels(fy)) ** 2
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


__all__ = ["VGG19Distance", "LPIPS", "find_backbone_weights", "hub_checkpoints_dir", "lpips_lin_weights_path",
           "vgg_features", "VGG16_FILE", "VGG19_FILE"]
