"""RRDB network (ESRGAN, BasicSR's RRDBNet): the LR encoder of PF-SR and its L1 regression baseline."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..degradation import upsample


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs with dense connections; output scaled by 0.2 and added to the input. [N x C x h x w]."""

    def __init__(self, *, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(num_feat + i * num_grow_ch, num_grow_ch if i < 4 else num_feat, 3, padding=1) for i in range(5)
        )
        for conv in self.convs:  # BasicSR's default_init_weights(scale=0.1)
            nn.init.kaiming_normal_(conv.weight)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for i, conv in enumerate(self.convs):
            out = conv(torch.cat(feats, dim=1))
            if i < 4:
                feats.append(F.leaky_relu(out, 0.2))
        return x + 0.2 * out


class RRDB(nn.Module):
    """Residual in residual dense block: three RDBs, scaled residual. [N x C x h x w] -> same."""

    def __init__(self, *, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat=num_feat, num_grow_ch=num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat=num_feat, num_grow_ch=num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat=num_feat, num_grow_ch=num_grow_ch)

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class Upsampler(nn.Sequential):
    """Nearest-neighbour upsampling by 2, 3, 4 or 8, each x2 (or x3) step followed by a conv and LeakyReLU."""

    def __init__(self, *, num_feat: int, scale: int):
        factors = {2: [2], 3: [3], 4: [2, 2], 8: [2, 2, 2]}
        if scale not in factors:
            raise ValueError(f"scale must be 2, 3, 4 or 8, got {scale}")
        layers: list[nn.Module] = []
        for f in factors[scale]:
            layers += [nn.Upsample(scale_factor=f, mode="nearest"), nn.Conv2d(num_feat, num_feat, 3, padding=1),
                       nn.LeakyReLU(0.2, inplace=True)]
        super().__init__(*layers)


class RRDBNet(nn.Module):
    """RRDB trunk with an L1 regression head.

    `features(lr)`: [N x 3 x h x w] in [0, 1] -> [N x num_feat*len(feature_blocks) x h x w], the outputs of the
    selected blocks concatenated (the conditioning of the U-Net). `forward(lr)`: -> SR image [N x 3 x sh x sw],
    predicted as a correction of the bicubic upsampling (BasicSR's RRDBNet predicts the image itself; the skip
    makes the untrained network start at bicubic quality and the short CPU trainings converge sooner).
    """

    def __init__(self, *, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32, feature_blocks: tuple[int, ...] = (1, 8, 15, 22)):
        super().__init__()
        if not feature_blocks or max(feature_blocks) >= num_block or min(feature_blocks) < 0:
            raise ValueError(f"feature_blocks {feature_blocks} must be indices into {num_block} blocks")
        self.scale = scale
        self.feature_blocks = tuple(feature_blocks)
        self.feature_channels = num_feat * len(self.feature_blocks)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, padding=1)
        self.body = nn.ModuleList(RRDB(num_feat=num_feat, num_grow_ch=num_grow_ch) for _ in range(num_block))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.upsampler = Upsampler(num_feat=num_feat, scale=scale)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, padding=1)

    def _trunk(self, lr: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        first = self.conv_first(lr)
        x, selected = first, []
        for i, block in enumerate(self.body):
            x = block(x)
            if i in self.feature_blocks:
                selected.append(x)
        return first, x, selected

    def features(self, lr: Tensor) -> Tensor:
        _, _, selected = self._trunk(lr)
        return torch.cat(selected, dim=1)

    def forward(self, lr: Tensor) -> Tensor:
        first, x, _ = self._trunk(lr)
        x = first + self.conv_body(x)
        x = self.upsampler(x)
        return upsample(lr, self.scale) + self.conv_last(F.leaky_relu(self.conv_hr(x), 0.2))
