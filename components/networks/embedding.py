"""Sinusoidal embedding of a scalar per sample (a timestep, or ATME's mean W)."""

import math

import torch


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """N -> N x dim: [sin(t * f_k), cos(t * f_k)] with frequencies f_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half))
    angles = t.float()[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)
