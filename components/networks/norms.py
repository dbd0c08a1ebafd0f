"""Group normalisation with float32 statistics whatever the activation dtype."""

import torch
from torch import nn
from torch.nn import functional as F


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that computes mean and variance in float32 and returns the input's dtype.

    Under bf16 autocast, `nn.GroupNorm` runs in float32 and returns float32, so every
    activation after it (SiLU, FiLM, the next convolution's input and what autograd keeps for
    the backward pass) travels and is stored at twice the size. Here the statistics stay in
    float32 (bf16 sums over 65,536 positions lose the variance) and the output is cast back,
    which torch.compile fuses into one kernel with the activation that follows. In float32
    this is exactly `nn.GroupNorm`, with the same parameters and state_dict keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
