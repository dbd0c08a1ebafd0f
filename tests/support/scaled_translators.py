"""A stand-in translator whose quality is one number, for registry tests: output = source x factor,
scored on pairs whose targets are source x 0.5 (so 0.45 beats 0.3)."""

import torch
from torch import nn

from components.evaluation.held_out import score_held_out


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor))

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return (source * self.factor).clamp(-1, 1)


def score(module: nn.Module, size: int, pairs: int):
    """`module`'s held-out scores on `pairs` seeded random sources of `size` px, targets source x 0.5."""
    source = torch.rand(pairs, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"source": source, "target": source * 0.5, "index": torch.arange(pairs)}
    return score_held_out(module, [batch], torch.device("cpu"))
