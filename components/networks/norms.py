"""Group normalisation that keeps bf16 activations in bf16, with float32 statistics, and can
apply the FiLM and SiLU that follow it in the same operation; instance normalisation that can
keep its input's layout."""

import torch
from torch import nn
from torch.nn import functional as F

from components.networks.fused_group_norm import group_norm_activation


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that returns the input's dtype under autocast, optionally followed by a
    per-sample FiLM, (1 + scale) * h + shift, and a SiLU.

    Autocast runs `group_norm` in float32: it copies a bf16 input to float32, normalises, and
    returns float32, so every activation after it (SiLU, FiLM, the next convolution's input)
    travels at twice the size, and autograd keeps the float32 copy of the input for the
    backward pass. Here the norm runs on the input as it is, outside autocast: PyTorch's
    group-norm kernels accumulate mean and variance in float32 for bf16 inputs, so the
    statistics are as precise, and one bf16 pass replaces three passes (copy, normalise,
    cast back) over twice the bytes. The affine parameters stay float32 parameters (the
    optimiser's copy); the kernel reads them in the input's dtype, as the convolutions do
    under autocast. In float32 this is exactly `nn.GroupNorm`, with the same state_dict keys.

    `fused` (set by the `fused_norm` switch, components/training/performance.py): norm, FiLM
    and SiLU run as one operation with its own backward pass (fused_group_norm.py), which
    makes two passes over the activation each way instead of one per op, and keeps only the
    norm's input for the backward pass.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_groups, num_channels, eps, affine)
        self.fused = False

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, silu: bool = False
    ) -> torch.Tensor:
        if self.fused:
            return group_norm_activation(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift, silu)
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            h = F.group_norm(x, self.num_groups, weight, bias, self.eps)
        if scale is not None:
            h = torch.addcmul(shift.to(h.dtype), h, 1 + scale.to(h.dtype))
        return F.silu(h) if silu else h


class InstanceNorm(nn.InstanceNorm2d):
    """`nn.InstanceNorm2d` (no affine, no running statistics: pix2pix's) that can keep its input's layout.

    PyTorch's instance norm normalises a contiguous (NCHW) copy of its input, viewed as one
    sample of batch x channels channels, and returns NCHW: with channels_last, each one copies
    the activation to NCHW and the next convolution copies it back to NHWC. `fused` (set by the
    `fused_norm` switch) runs it as the fused group norm with one group per channel
    (fused_group_norm.py), which reads and writes any layout in place; same statistics, same
    eps, no state_dict entries either way.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return group_norm_activation(x, self.num_features, self.weight, self.bias, self.eps)
        return super().forward(x)
