"""The interface every training method implements, what it is built from, and what methods share.

A step, as the loop runs it for every method (StyleGAN2-ADA's training loop and loss.py):

    method.begin_step(batch, stats)              # forward passes the step's phases share
    for step in method.step_plan(step_index):    # the method's reference order, in one place
        only step.player's parameters require grad
        zero its optimiser; for phase in step.phases: method.accumulate_gradients(phase, batch, step.gain, stats)
        its optimiser steps
    method.after_step(batch, stats)              # EMA, ATME's memory write, the adaptive-T update

Switching `requires_grad` per optimiser step means the player that is not stepping gets no
gradient at all: no wasted backward into its weights and, under DDP, no all-reduce of them.
A method reports every statistic by name to `stats`, so the loop never knows what it computes.
"""

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from components.config.model import ModelParams
from components.data.batch import Batch
from components.training_stats import StatsCollector

logger = logging.getLogger(__name__)

# What the session applies to each trainable network: move to the device, the performance
# switches (memory format, regional compile, checkpointing), then the caller's `wrap` (DDP under Ray).
Prepare = Callable[[nn.Module], nn.Module]
Autocast = Callable[[], contextlib.AbstractContextManager]
# Sums a tensor over data-parallel workers and returns the sum (every rank gets the same);
# methods use it for state that must agree across workers (Diffusion-GAN's r_d) and to merge
# per-worker state for a checkpoint (ATME's memory). Calling it is a collective.
Reduce = Callable[[torch.Tensor], torch.Tensor]
Player = Literal["G", "D"]
LRScheduleKind = Literal["linear_decay", "cosine", "constant"]


def eager() -> contextlib.AbstractContextManager:
    """Runs torch.compile'd networks (whole or regional) eagerly inside the block: R1
    differentiates D's input gradient once more (a double backward), which torch.compile's
    autograd does not support."""
    return torch.compiler.set_stance("force_eager")


def unprepared(network: nn.Module) -> nn.Module:
    return network


def unwrap(module: nn.Module) -> nn.Module:
    """The plain network inside DDP and torch.compile wrappers (for state dicts, EMA, export)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            module = module._orig_mod
        else:
            return module


def gaussian_like(tensor: torch.Tensor) -> torch.Tensor:
    """N(0, 1) noise of `tensor`'s shape, dtype and device, drawn in logical (NCHW) order:
    the same noise whatever the tensor's memory format (`randn_like` fills a channels_last
    tensor in memory order), so the channels_last switch does not change a run's draws."""
    return torch.randn(tensor.shape, dtype=tensor.dtype, device=tensor.device)


@dataclass(frozen=True)
class MethodContext:
    """What every method is built from.

    `rank` and `world_size` describe the data-parallel group (0 and 1 in one process): the
    methods use them for per-worker state (who keeps a partial sum after a resume) and for
    batch norm when the batch is split (`for_split_batches`).
    """

    model: ModelParams
    dataset_size: int
    device: torch.device
    prepare: Prepare = unprepared
    autocast: Autocast = contextlib.nullcontext
    reduce: Reduce | None = None
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class OptimizerStep:
    """One optimiser step of one player: zero its gradients, accumulate `phases` in order, step.

    `gain` multiplies the phases' losses (StyleGAN2-ADA's lazy regularisation: the interval).
    """

    player: Player
    phases: tuple[str, ...]
    gain: int = 1


def for_split_batches(network: nn.Module, context: MethodContext) -> nn.Module:
    """Batch norm when the batch is split over workers: SyncBatchNorm on GPUs, so its statistics
    are those of the whole batch, as in one process; the CPU has no SyncBatchNorm, so there each
    worker keeps its own statistics (with a warning). Instance norm, the shipped default and
    pix2pix's recipe for split batches, needs neither."""
    has_batch_norm = any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in network.modules())
    if context.world_size <= 1 or not has_batch_norm:
        return network
    if context.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(network)
    logger.warning(
        "%s uses batch norm with the batch split over %d CPU workers: each normalises over its own share "
        "(SyncBatchNorm needs GPUs); set norm: instance for statistics that do not depend on the split",
        type(network).__name__,
        context.world_size,
    )
    return network


class Sampler(nn.Module):
    """The inference network inside the Translator: `forward(source) -> image`.

    `nfe` is the number of generator calls per image; methods with classifier-free guidance
    set `guidance_trained` and honour `guidance_weight`; `seed`, where a sampler draws noise,
    makes the draws reproducible.
    """

    nfe: int = 1
    guidance_trained: bool = False
    guidance_weight: float = 0.0
    seed: int | None = None


class Method:
    """A training method: its networks, its phases and their order, its sampler, its state.

    Subclasses set `default_betas` (the Adam betas it was published with; train.yaml's
    `optimizer.betas` overrides them) and `default_lr_schedule` (what `lr_schedule.kind: auto`
    means for it), build their networks through `context.prepare`, and implement the phases.
    """

    default_betas: tuple[float, float]
    default_lr_schedule: LRScheduleKind

    def __init__(self, context: MethodContext):
        self.context = context
        self.model = context.model
        self.device = context.device
        self.autocast = context.autocast

    def networks(self) -> dict[str, nn.Module]:
        """Every trainable network by name (G, D, and W for ATME), as prepared (possibly wrapped)."""
        raise NotImplementedError

    def parameters_of(self, player: Player) -> list[nn.Parameter]:
        """What the player's optimiser updates (G: G, and ATME's W, one optimiser for both; D: D)."""
        raise NotImplementedError

    def optimizer_settings(self, player: Player, lr: float, betas: tuple[float, float]) -> tuple[float, tuple[float, float]]:
        """The player's Adam lr and betas given the configured ones (unchanged unless a method's
        reference adjusts them)."""
        return lr, betas

    def step_plan(self, step: int) -> tuple[OptimizerStep, ...]:
        """The optimiser steps of training step `step`, in order."""
        raise NotImplementedError

    def begin_step(self, batch: Batch, stats: StatsCollector) -> None:
        """Forward passes that several phases of this step share (run with G's parameters trainable)."""

    def accumulate_gradients(self, phase: str, batch: Batch, gain: int, stats: StatsCollector) -> None:
        raise NotImplementedError

    def after_step(self, batch: Batch, stats: StatsCollector) -> None:
        """Once per step after all optimiser steps."""

    def make_sampler(self) -> Sampler:
        """The inference network (the Translator's content), sharing the current weights."""
        raise NotImplementedError

    @classmethod
    def untrained_sampler(cls, model: ModelParams) -> Sampler:
        """A sampler of the right architecture for `model`, to load an export's state into."""
        raise NotImplementedError

    def extra_state(self, gather: Reduce | None = None) -> dict:
        """The method's state beyond networks and optimisers (EMA, memory, adaptive T).

        With `gather` (a sum over workers; every rank must call this at the same point), state
        that each worker holds for itself is merged, so one checkpoint holds all of it.
        """
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Load what `extra_state` returned (gathered or not)."""

    def _phase_error(self, phase: str) -> ValueError:
        return ValueError(f"{type(self).__name__} has no phase {phase!r}")
