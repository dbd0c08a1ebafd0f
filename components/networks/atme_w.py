"""ATME's W: from D's logit map to a per-pixel corruption in (-1, 1) at any image size."""

import torch
from torch import nn

from components.networks.norms import GroupNorm


class ATMEW(nn.Module):
    """Three (bilinear upsample, 3x3 conv, GroupNorm, SiLU) blocks to 1/4, 1/2 and the full
    image size, then a 1x1 conv to one channel and tanh (the reference fixes 64, 128, 256)."""

    def __init__(self, image_size: int, channels: tuple[int, int, int] = (32, 64, 32), groups: int = 8):
        super().__init__()
        sizes = (image_size // 4, image_size // 2, image_size)
        layers: list[nn.Module] = []
        previous = 1
        for size, width in zip(sizes, channels):
            layers += [
                nn.Upsample(size=(size, size), mode="bilinear", align_corners=False),
                nn.Conv2d(previous, width, 3, padding=1),
                GroupNorm(groups, width),
                nn.SiLU(),
            ]
            previous = width
        layers += [nn.Conv2d(previous, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, logit_map: torch.Tensor) -> torch.Tensor:
        return self.net(logit_map)
