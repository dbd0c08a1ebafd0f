"""Group normalisation that keeps bf16 activations in bf16, with float32 statistics."""

import torch
from torch import nn
from torch.nn import functional as F


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that returns the input's dtype under autocast.

    Autocast runs `group_norm` in float32: it copies a bf16 input to float32, normalises, and
    returns float32, so every activation after it (SiLU, FiLM, the next convolution's input)
    travels at twice the size, and autograd keeps the float32 copy of the input for the
    backward pass. Here the norm runs on the input as it is, outside autocast: PyTorch's
    group-norm kernels accumulate mean and variance in float32 for bf16 inputs, so the
    statistics are as precise, and one bf16 pass replaces three passes (copy, normalise,
    cast back) over twice the bytes. The affine parameters stay float32 parameters (the
    optimiser's copy); the kernel reads them in the input's dtype, as the convolutions do
    under autocast. In float32 this is exactly `nn.GroupNorm`, with the same state_dict keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
