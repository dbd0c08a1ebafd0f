"""The pix2pix networks: the U-Net generator and the PatchGAN discriminator (Isola et al. 2017)."""

import math

import torch
from torch import nn

from components.networks.embedding import sinusoidal_embedding
from components.networks.init import init_normal_
from components.networks.norms import InstanceNorm


def norm_layer(kind: str, channels: int) -> nn.Module:
    """instance (no affine, as pix2pix), batch, or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return InstanceNorm(channels)
    return nn.Identity()


class UNetBlock(nn.Sequential):
    """One level of the U-Net on the way down or up: (activation, conv, norm[, dropout]).

    A class of its own, with its forward in this file, so that it can be compiled as a region
    (torch.compile leaves the `forward` of torch's own containers uncompiled); its layers and
    state_dict keys are a Sequential's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x


class UNetGenerator(nn.Module):
    """Encoder-decoder with skips; one stride-2 level per halving, down to 1 x 1.

    256 -> 8 levels (the paper's unet_256), 64 -> 6, 32 -> 5. Dropout in the three decoder
    blocks just outside the innermost one, tanh output.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        ngf: int = 64,
        max_multiplier: int = 8,
        norm: str = "batch",
        dropout: float = 0.5,
    ):
        super().__init__()
        levels = int(math.log2(image_size))
        channels = [ngf * min(2**level, max_multiplier) for level in range(levels)]
        # Batch norm has its own shift; the other norms keep the conv bias (as pix2pix does).
        bias = norm != "batch"
        self.downs = nn.ModuleList()
        for level in range(levels):
            if level == 0:
                block = nn.Conv2d(in_channels, channels[0], 4, 2, 1, bias=bias)
            elif level == levels - 1:
                block = UNetBlock(nn.LeakyReLU(0.2), nn.Conv2d(channels[level - 1], channels[level], 4, 2, 1, bias=bias))
            else:
                block = UNetBlock(
                    nn.LeakyReLU(0.2),
                    nn.Conv2d(channels[level - 1], channels[level], 4, 2, 1, bias=bias),
                    norm_layer(norm, channels[level]),
                )
            self.downs.append(block)
        self.ups = nn.ModuleList()
        for level in range(levels):
            inputs = channels[level] if level == levels - 1 else 2 * channels[level]
            if level == 0:
                block = UNetBlock(nn.ReLU(), nn.ConvTranspose2d(inputs, out_channels, 4, 2, 1), nn.Tanh())
            else:
                layers = [nn.ReLU(), nn.ConvTranspose2d(inputs, channels[level - 1], 4, 2, 1, bias=bias)]
                layers.append(norm_layer(norm, channels[level - 1]))
                if dropout > 0 and max(1, levels - 4) <= level <= levels - 2:
                    layers.append(nn.Dropout(dropout))
                block = UNetBlock(*layers)
            self.ups.append(block)
        init_normal_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        x = self.ups[-1](skips[-1])
        for level in range(len(self.ups) - 2, -1, -1):
            x = self.ups[level](torch.cat([skips[level], x], dim=1))
        return x


def patch_map_size(image_size: int, n_layers: int) -> int:
    """Side of the PatchGAN logit map: n_layers halvings, then two k4 s1 p1 convs (-1 each)."""
    return (image_size >> n_layers) - 2


class PatchGAN(nn.Module):
    """PatchGAN: a map of logits, one per overlapping patch (70 x 70 for n_layers = 3).

    With `time_conditioned`, a scalar t per sample (Diffusion-GAN's or DDGAN's timestep) is
    embedded and added to every block's features after the norm, so norms cannot remove it.
    """

    def __init__(self, in_channels: int, ndf: int = 64, n_layers: int = 3, norm: str = "batch", time_conditioned: bool = False):
        super().__init__()
        bias = norm != "batch"
        widths = [ndf * min(2**layer, 8) for layer in range(n_layers + 1)]
        self.convs = nn.ModuleList([nn.Conv2d(in_channels, widths[0], 4, 2, 1)])
        self.norms = nn.ModuleList([nn.Identity()])
        for layer in range(1, n_layers + 1):
            stride = 2 if layer < n_layers else 1
            self.convs.append(nn.Conv2d(widths[layer - 1], widths[layer], 4, stride, 1, bias=bias))
            self.norms.append(norm_layer(norm, widths[layer]))
        self.head = nn.Conv2d(widths[-1], 1, 4, 1, 1)
        self.time_dim = ndf
        if time_conditioned:
            self.time_mlp = nn.Sequential(nn.Linear(ndf, 4 * ndf), nn.SiLU(), nn.Linear(4 * ndf, 4 * ndf), nn.SiLU())
            self.time_projections = nn.ModuleList([nn.Linear(4 * ndf, width) for width in widths])
        else:
            self.time_mlp = None
            self.time_projections = None
        init_normal_(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        embedding = None
        if self.time_mlp is not None:
            embedding = self.time_mlp(sinusoidal_embedding(t, self.time_dim))
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = norm(conv(x))
            if embedding is not None:
                x = x + self.time_projections[index](embedding)[:, :, None, None].to(x.dtype)
            x = nn.functional.leaky_relu(x, 0.2)
        return self.head(x)
