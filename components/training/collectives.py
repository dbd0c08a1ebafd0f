"""Sums and maxima over the data-parallel workers, and the divergence detector that agrees across them.

Outside a process group (one process, the tests) every collective returns its input.
"""

from typing import Literal

import torch
import torch.distributed as dist

from components.training.health import DivergenceDetector


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(values: torch.Tensor, op_name: Literal["sum", "max"] = "sum") -> torch.Tensor:
    """`values` combined over all workers (a new tensor; every rank gets the same result)."""
    reduced = values.detach().clone()
    if is_distributed():
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM if op_name == "sum" else dist.ReduceOp.MAX)
    return reduced


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    return all_reduce(values, "sum")


class AgreeingDetector(DivergenceDetector):
    """The divergence detector with one verdict for all workers.

    Each rank sees its own losses, so a NaN or a streak can show on one rank a step before the
    others; a rank that stopped alone would leave the others waiting in DDP's all-reduce. The
    check (already a host sync, every `check_interval` steps, at the same step on every rank)
    first takes the maximum of each flag over the workers.
    """

    def check(self, step: int) -> None:
        flags = torch.stack([self.nonfinite.long(), self.low_loss_streak, self.perfect_d_streak])
        flags = all_reduce(flags, "max")
        self.nonfinite.copy_(flags[0].bool())
        self.low_loss_streak.copy_(flags[1])
        self.perfect_d_streak.copy_(flags[2])
        super().check(step)
