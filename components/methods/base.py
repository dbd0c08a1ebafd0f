"""The interface every training method implements, and what methods share.

The loop runs, per step, the phases G-main, D-main and (every `r1_interval` steps) D-reg;
for each it zeroes the phase's optimiser, calls `accumulate_gradients(phase, batch, gain,
stats)` and steps the optimiser (StyleGAN2-ADA's loss.py structure). A method reports every
statistic by name to `stats`, so the loop never knows what a method computes.
"""

import contextlib
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from components.data.batch import Batch
from components.training.stats import StatsCollector

# What the session applies to each trainable network: move to the device, the performance
# switches (memory format, regional compile, checkpointing), then the caller's `wrap` (DDP under Ray).
Prepare = Callable[[nn.Module], nn.Module]
Autocast = Callable[[], contextlib.AbstractContextManager]
# Sums a tensor over data-parallel workers (identity-like in one process); methods use it for
# state that must agree across workers (Diffusion-GAN's r_d).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def unwrap(module: nn.Module) -> nn.Module:
    """The plain network inside DDP and torch.compile wrappers (for state dicts, EMA, export)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            module = module._orig_mod
        else:
            return module


class Method(Protocol):
    """A training method: its networks, its losses by phase, and its sampler."""

    # Adam betas the method was published with; used unless train.optimizer.betas is set.
    default_betas: tuple[float, float]
    # 0 disables the D-reg phase; otherwise it runs every r1_interval steps with gain = r1_interval.
    r1_interval: int

    def networks(self) -> dict[str, nn.Module]:
        """Every trainable network by name (G, D, and W for ATME), as prepared (possibly wrapped)."""

    def generator_parameters(self) -> list[nn.Parameter]:
        """What the G optimiser updates (G, and ATME's W: one optimiser for both)."""

    def discriminator_parameters(self) -> list[nn.Parameter]: ...

    def accumulate_gradients(self, phase: str, batch: Batch, gain: int, stats: StatsCollector) -> None: ...

    def after_step(self, batch: Batch, stats: StatsCollector) -> None:
        """Once per step after all phases: EMA, ATME's memory write, the adaptive-T update."""

    def make_sampler(self) -> nn.Module:
        """The inference network (the Translator's content), sharing the current weights."""

    def extra_state(self) -> dict:
        """The method's own state beyond networks and optimisers (EMA, memory, adaptive T)."""

    def load_extra_state(self, state: dict) -> None: ...
