"""The one training loop, for every method, in one process (Ray runs the same on each worker).

A step, in full: for each phase (G-main, D-main, and D-reg every r1_interval steps) zero
the phase's optimiser, let the method accumulate gradients, record the gradient norm, step.
Then the method's after_step (EMA, ATME's memory, adaptive T), and the divergence detector
watches the step's statistics (checking on the host only every `check_interval` steps).
"""

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sized

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from components.config.flatten import changed_keys
from components.config.model import DDGANParams, ModelParams
from components.config.train import TrainParams
from components.console import StepProgress, epoch_line
from components.data.batch import Batch
from components.methods.base import unwrap
from components.methods.build import build_method
from components.training.health import DivergenceDetector
from components.training.rng import capture_rng, restore_rng
from components.training.stats import StatsCollector

logger = logging.getLogger(__name__)
STATE_FORMAT_VERSION = 1


def identity(module: nn.Module) -> nn.Module:
    return module


def _switch(value: bool | str, cuda: bool) -> bool:
    return value is True or (value == "auto" and cuda)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one training step's random draws on one worker, distinct for every (seed, rank, step)."""
    return int(np.random.SeedSequence([seed % 2**64, rank, step]).generate_state(1, np.uint64)[0])


def lr_factor(kind: str, epochs: int, decay_epochs: int, floor_ratio: float) -> Callable[[int], float]:
    """LR multiplier for the epoch about to run (epochs already done = `epoch`)."""
    if kind == "constant":
        return lambda epoch: 1.0
    if kind == "cosine":
        return lambda epoch: floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / epochs))
    constant = epochs - decay_epochs
    # pix2pix's rule: 1 - max(0, epoch + 1 - constant) / (decay + 1), never reaching 0 exactly.
    return lambda epoch: 1.0 - max(0, epoch + 1 - constant) / (decay_epochs + 1)


class TrainingSession:
    """Networks, optimisers, schedules, method state, statistics and RNG of one training run."""

    def __init__(
        self,
        model: ModelParams,
        train: TrainParams,
        dataset_size: int,
        device: torch.device,
        wrap: Callable[[nn.Module], nn.Module] = identity,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        rank: int | None = None,
    ):
        self.model, self.train, self.device = model, train, torch.device(device)
        # None: this process's rank in the default process group (0 without one).
        self.rank = rank if rank is not None else (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
        cuda = self.device.type == "cuda"
        performance = train.performance
        self.channels_last = _switch(performance.channels_last, cuda)
        self.autocast_dtype = torch.bfloat16 if performance.autocast == "bf16" or (performance.autocast == "auto" and cuda) else None
        if cuda and performance.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(train.seed)

        def prepare(network: nn.Module) -> nn.Module:
            network = network.to(self.device)
            if self.channels_last:
                network = network.to(memory_format=torch.channels_last)
            network = wrap(network)
            if _switch(performance.compile, cuda):
                # A network that fails to compile then runs eagerly, with dynamo's warning.
                torch._dynamo.config.suppress_errors = True
                network = torch.compile(network)
            return network

        self.method = build_method(model, dataset_size, self.device, prepare, self._autocast, reduce)
        betas = train.optimizer.betas or self.method.default_betas
        fused = _switch(performance.fused_adam, cuda)
        self.optimizer_g = torch.optim.Adam(self.method.generator_parameters(), lr=train.optimizer.lr_g, betas=betas, fused=fused)
        self.optimizer_d = torch.optim.Adam(self.method.discriminator_parameters(), lr=train.optimizer.lr_d, betas=betas, fused=fused)
        schedule = train.lr_schedule
        kind = schedule.kind if schedule.kind != "auto" else ("cosine" if isinstance(model.method, DDGANParams) else "linear_decay")
        decay = schedule.decay_epochs if schedule.decay_epochs is not None else train.epochs // 2
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_factor(kind, train.epochs, decay, schedule.lr_floor / optimizer.param_groups[0]["lr"])
            )
            for optimizer in (self.optimizer_g, self.optimizer_d)
        ]
        self.stats = StatsCollector(reduce)
        self.detector = DivergenceDetector(train.health, self.device)
        self.step = 0
        self.epoch = 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: Batch) -> Batch:
        size = self.model.image_size
        if batch["source"].shape[-2:] != (size, size) or batch["target"].shape[-2:] != (size, size):
            raise ValueError(
                f"batch images are {tuple(batch['source'].shape[-2:])} / {tuple(batch['target'].shape[-2:])}, "
                f"the model was built for image_size {size} (params/model.yaml image_size must match the data's crop size)"
            )
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        moved = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        for key in ("source", "target"):
            moved[key] = moved[key].to(memory_format=memory_format)
        return moved

    def train_step(self, batch: Batch) -> None:
        # Every step's draws (dropout, z, diffusion t and noise, condition dropout) come from a
        # seed of (seed, rank, step): workers draw independent noise for their samples, where one
        # seed for all would give sample k of every rank the same t, z and noise; and a resumed
        # run repeats them exactly on every rank, where only rank 0's RNG state is checkpointed.
        torch.manual_seed(step_seed(self.train.seed, self.rank, self.step))
        batch = self._to_device(batch)
        method, stats = self.method, self.stats
        stats.begin_step()
        phases = [("G-main", self.optimizer_g, 1), ("D-main", self.optimizer_d, 1)]
        if method.r1_interval and self.step % method.r1_interval == 0:
            phases.append(("D-reg", self.optimizer_d, method.r1_interval))
        for phase, optimizer, gain in phases:
            optimizer.zero_grad(set_to_none=True)
            method.accumulate_gradients(phase, batch, gain, stats)
            if phase.endswith("-main"):
                gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                stats.report(f"grad_norm/{phase[0]}", torch.nn.utils.get_total_norm(gradients))
            optimizer.step()
        method.after_step(batch, stats)
        self.detector.observe(stats.step_values)
        self.step += 1
        if self.step % self.train.health.check_interval == 0:
            self.detector.check(self.step)

    def end_epoch(self) -> dict[str, float]:
        """Check health, reduce the epoch's statistics, step the LR schedules."""
        self.detector.check(self.step)
        metrics = self.stats.reduce_epoch()
        metrics["lr/G"] = self.optimizer_g.param_groups[0]["lr"]
        metrics["lr/D"] = self.optimizer_d.param_groups[0]["lr"]
        for scheduler in self.schedulers:
            scheduler.step()
        self.epoch += 1
        return metrics

    @torch.no_grad()
    def sample(self, source: torch.Tensor) -> torch.Tensor:
        """Translate with the current weights as the exported Translator would."""
        sampler = self.method.make_sampler()
        was_training = sampler.training
        sampler.eval()
        images = sampler(source.to(self.device)).clamp(-1, 1)
        sampler.train(was_training)
        return images

    def state_dict(self) -> dict:
        """The complete training state; torch.save it, load it with weights_only=True."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "model": self.model.model_dump(mode="json"),
            "step": self.step,
            "epoch": self.epoch,
            "networks": {name: unwrap(network).state_dict() for name, network in self.method.networks().items()},
            "optimizers": {"G": self.optimizer_g.state_dict(), "D": self.optimizer_d.state_dict()},
            "schedulers": {"G": self.schedulers[0].state_dict(), "D": self.schedulers[1].state_dict()},
            "method": self.method.extra_state(),
            "stats": self.stats.state_dict(),
            "detector": self.detector.state_dict(),
            "rng": capture_rng(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(f"unsupported training state format {state.get('format_version')!r}")
        saved = state["model"]
        current = self.model.model_dump(mode="json")
        if saved != current:
            changed = changed_keys(saved, current)
            raise ValueError(f"the checkpoint was trained with different model params: {', '.join(changed)} changed")
        for name, network in self.method.networks().items():
            unwrap(network).load_state_dict(state["networks"][name])
        self.optimizer_g.load_state_dict(state["optimizers"]["G"])
        self.optimizer_d.load_state_dict(state["optimizers"]["D"])
        self.schedulers[0].load_state_dict(state["schedulers"]["G"])
        self.schedulers[1].load_state_dict(state["schedulers"]["D"])
        self.method.load_extra_state(state["method"])
        self.stats.load_state_dict(state["stats"])
        self.detector.load_state_dict(state["detector"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        restore_rng(state["rng"])


def run_epochs(
    session: TrainingSession,
    loader: Iterable[Batch],
    epochs: int,
    on_epoch_end: Callable[[TrainingSession, dict[str, float]], None] | None = None,
    progress: StepProgress | None = None,
) -> list[dict[str, float]]:
    """Train from `session.epoch` up to `epochs`; returns each epoch's metrics.

    Logs one line per epoch (time, rate, ETA and the statistics of console.EPOCH_LINE_FIELDS);
    `progress`, when given, follows the steps inside each epoch.
    """
    history = []
    first_epoch, run_started = session.epoch, time.perf_counter()
    for _ in range(session.epoch, epochs):
        started, images = time.perf_counter(), 0
        if progress is not None:
            progress.start(f"epoch {session.epoch + 1}/{epochs}", len(loader) if isinstance(loader, Sized) else 0)
        for batch in loader:
            session.train_step(batch)
            images += batch["source"].shape[0]
            if progress is not None:
                progress.advance()
        if progress is not None:
            progress.close()
        metrics = session.end_epoch()
        elapsed = time.perf_counter() - started
        metrics["throughput/images_per_s"] = images / elapsed if elapsed > 0 else 0.0
        # The mean time of this run's epochs so far, checkpoints and logging included.
        per_epoch = (time.perf_counter() - run_started) / (session.epoch - first_epoch)
        logger.info(
            "%s",
            epoch_line(session.epoch, epochs, elapsed, metrics["throughput/images_per_s"],
                       per_epoch * (epochs - session.epoch), metrics),
        )
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(session, metrics)
    return history
