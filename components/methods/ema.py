"""Exponential moving average of a network's weights (DDGAN samples from the EMA of G)."""

import copy

import torch
from torch import nn


class EMA:
    """`shadow` follows `source` with decay min(decay, (1 + n) / (10 + n)) after n updates.

    The warm-up keeps early averages from being dominated by the random initial weights.
    """

    def __init__(self, source: nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(source).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadow_params = list(self.shadow.parameters())
        torch._foreach_lerp_(shadow_params, [p.detach() for p in source.parameters()], 1.0 - decay)
        for shadow_buffer, buffer in zip(self.shadow.buffers(), source.buffers()):
            shadow_buffer.copy_(buffer)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.updates = int(state["updates"])
