"""The one training loop, for every method, in one process (Ray runs the same on each worker).

A step, in full: the method's `begin_step` (forward passes its phases share), then each
optimiser step of the method's `step_plan`, in the method's reference order: only that
player's parameters require grad; zero its optimiser, let the method accumulate the step's
phases (G-main, D-main, D-reg), record the gradient norm of a main step, step. Then the
method's `after_step` (EMA, ATME's memory, adaptive T), and the divergence detector watches
the step's statistics (checking on the host only every `check_interval` steps). The loop
knows no method by name: the order, the optimiser settings and the default LR schedule are
the method's (components/methods/base.py).
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
from components.config.model import ModelParams
from components.config.train import TrainParams
from components.console import StepProgress, epoch_line
from components.data.batch import Batch
from components.methods.base import MethodContext, Player, eager, unwrap
from components.methods.registry import build_method
from components.training.health import DivergenceDetector
from components.training.performance import apply_switches, configure_backends, resolve_switches
from components.training.rng import capture_rng, restore_rng
from components.training_stats import StatsCollector

logger = logging.getLogger(__name__)
STATE_FORMAT_VERSION = 1


def identity(module: nn.Module) -> nn.Module:
    return module


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


def as_this_optimizer_runs(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state, to run with this session's Adam implementation.

    `load_state_dict` keeps the saved groups' `fused` and `foreach` flags, so a run resumed
    with `fused_adam` changed (a CPU run continued on a GPU, where `auto` turns it on) would
    step as the saving run did. Unfused, the step counts stay on the CPU where PyTorch keeps
    them: loaded onto the GPU (the checkpoint is loaded to the session's device), every step
    would read each one back to the host.
    """
    implementation = {key: optimizer.defaults[key] for key in ("fused", "foreach")}
    groups = [{**group, **implementation} for group in saved["param_groups"]]
    if implementation["fused"] or optimizer.defaults["capturable"]:
        return {**saved, "param_groups": groups}  # load_state_dict moves the step counts to the device
    state = {
        index: {**values, "step": values["step"].cpu()} if "step" in values else values
        for index, values in saved["state"].items()
    }
    return {**saved, "param_groups": groups, "state": state}


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
        self.switches = resolve_switches(train.performance, self.device)
        self.channels_last = self.switches.channels_last
        self.autocast_dtype = self.switches.autocast_dtype
        configure_backends(self.switches)
        torch.manual_seed(train.seed)

        def prepare(network: nn.Module) -> nn.Module:
            return wrap(apply_switches(network.to(self.device), self.switches))

        self.reduce = reduce
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        context = MethodContext(model, dataset_size, self.device, prepare, self._autocast, reduce, self.rank, world_size)
        self.method = build_method(context)
        configured_betas = train.optimizer.betas or self.method.default_betas
        fused = self.switches.fused_adam
        self.optimizers: dict[Player, torch.optim.Adam] = {}
        for player, configured_lr in (("G", train.optimizer.lr_g), ("D", train.optimizer.lr_d)):
            lr, betas = self.method.optimizer_settings(player, configured_lr, configured_betas)
            self.optimizers[player] = torch.optim.Adam(self.method.parameters_of(player), lr=lr, betas=betas, fused=fused)
        schedule = train.lr_schedule
        kind = schedule.kind if schedule.kind != "auto" else self.method.default_lr_schedule
        decay = schedule.decay_epochs if schedule.decay_epochs is not None else train.epochs // 2
        self.schedulers = {
            player: torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_factor(kind, train.epochs, decay, schedule.lr_floor / optimizer.param_groups[0]["lr"])
            )
            for player, optimizer in self.optimizers.items()
        }
        self._trainable: Player | None = None
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
                f"the model was built for image_size {size} (params/data.yaml image_size; prepare the data at that size)"
            )
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        moved = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        for key in ("source", "target"):
            moved[key] = moved[key].to(memory_format=memory_format)
        return moved

    def _make_trainable(self, player: Player) -> None:
        """Only `player`'s parameters require grad (StyleGAN2-ADA's training loop): the other
        player's networks take no gradient and, under DDP, all-reduce nothing."""
        if self._trainable == player:
            return
        for owner, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.requires_grad_(owner == player)
        self._trainable = player

    def train_step(self, batch: Batch) -> None:
        # Every step's draws (dropout, z, diffusion t and noise, condition dropout) come from a
        # seed of (seed, rank, step): workers draw independent noise for their samples, where one
        # seed for all would give sample k of every rank the same t, z and noise; and a resumed
        # run repeats them exactly on every rank, where only rank 0's RNG state is checkpointed.
        torch.manual_seed(step_seed(self.train.seed, self.rank, self.step))
        batch = self._to_device(batch)
        method, stats = self.method, self.stats
        stats.begin_step()
        self._make_trainable("G")  # a forward shared with G-main must build G's graph
        method.begin_step(batch, stats)
        for optimizer_step in method.step_plan(self.step):
            player = optimizer_step.player
            optimizer = self.optimizers[player]
            self._make_trainable(player)
            optimizer.zero_grad(set_to_none=True)
            for phase in optimizer_step.phases:
                method.accumulate_gradients(phase, batch, optimizer_step.gain, stats)
            if f"{player}-main" in optimizer_step.phases:
                gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                stats.report(f"grad_norm/{player}", torch.nn.utils.get_total_norm(gradients))
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
        for player, optimizer in self.optimizers.items():
            metrics[f"lr/{player}"] = optimizer.param_groups[0]["lr"]
        for scheduler in self.schedulers.values():
            scheduler.step()
        self.epoch += 1
        return metrics

    @torch.no_grad()
    def sample(self, source: torch.Tensor) -> torch.Tensor:
        """Translate with the current weights as the exported Translator would, eagerly: with
        `compile` on, a sample grid's few pairs (a batch size of their own, shapes are static)
        would compile every block once more, seconds to minutes for a handful of images."""
        sampler = self.method.make_sampler()
        was_training = sampler.training
        sampler.eval()
        with eager():
            images = sampler(source.to(self.device)).clamp(-1, 1)
        sampler.train(was_training)
        return images

    def state_dict(self, gather: bool = False) -> dict:
        """The complete training state; torch.save it, load it with weights_only=True.

        gather: merge the method's per-worker state over the workers with the session's
        `reduce` (a collective: every rank calls it at the same point; the Ray checkpoint).
        """
        return {
            "format_version": STATE_FORMAT_VERSION,
            "model": self.model.model_dump(mode="json"),
            "step": self.step,
            "epoch": self.epoch,
            "networks": {name: unwrap(network).state_dict() for name, network in self.method.networks().items()},
            "optimizers": {player: optimizer.state_dict() for player, optimizer in self.optimizers.items()},
            "schedulers": {player: scheduler.state_dict() for player, scheduler in self.schedulers.items()},
            "method": self.method.extra_state(self.reduce if gather else None),
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
        for player, optimizer in self.optimizers.items():
            optimizer.load_state_dict(as_this_optimizer_runs(state["optimizers"][player], optimizer))
            scheduler = self.schedulers[player]
            scheduler.load_state_dict(state["schedulers"][player])
            # The coming epoch's LR under this session's schedule: the saved one was computed
            # for the saved `epochs`, which a finished run continued to more epochs no longer has.
            for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base_lr * factor(scheduler.last_epoch)
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
    warmup_s = None  # the run's first step: compilation, cuDNN's search, first allocations
    for _ in range(session.epoch, epochs):
        started, images = time.perf_counter(), 0
        if progress is not None:
            progress.start(f"epoch {session.epoch + 1}/{epochs}", len(loader) if isinstance(loader, Sized) else 0)
        for batch in loader:
            step_started = time.perf_counter()
            session.train_step(batch)
            if warmup_s is None:
                warmup_s = time.perf_counter() - step_started
            images += batch["source"].shape[0]
            if progress is not None:
                progress.advance()
        if progress is not None:
            progress.close()
        metrics = session.end_epoch()
        elapsed = time.perf_counter() - started
        metrics["throughput/images_per_s"] = images / elapsed if elapsed > 0 else 0.0
        # The mean time of this run's epochs so far, checkpoints and logging included, less the
        # warm-up, which later epochs do not repeat (with compile on, minutes against epochs of
        # seconds: the ETA would say hours for minutes of training).
        per_epoch = (time.perf_counter() - run_started - (warmup_s or 0.0)) / (session.epoch - first_epoch)
        logger.info(
            "%s",
            epoch_line(session.epoch, epochs, elapsed, metrics["throughput/images_per_s"],
                       per_epoch * (epochs - session.epoch), metrics),
        )
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(session, metrics)
    return history
