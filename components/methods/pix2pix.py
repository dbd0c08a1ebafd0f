"""pix2pix (Isola et al. 2017): cGAN + lambda_L1 * L1, optionally with Diffusion-GAN's D-input diffusion.

The step in the reference's order (its `optimize_parameters`): one G forward (`begin_step`);
D's step on the detached fake; then G's step against the *updated* D, reusing that fake, with
D's parameters frozen. With `r1_gamma > 0`, R1 is StyleGAN2-ADA's lazy regularisation (the
code Diffusion-GAN builds on): its own D step every `r1_interval` steps with gain = interval,
and D's Adam lr and betas scaled by interval / (interval + 1) to keep the per-step rates.

ATME (atme.py) reuses this class and changes only how the fake is generated.
"""

import torch
from torch import nn

from components.config.model import ModelParams
from components.data.batch import Batch
from components.methods.base import (
    Method,
    MethodContext,
    OptimizerStep,
    Player,
    Reduce,
    Sampler,
    eager,
    for_split_batches,
    unwrap,
)
from components.methods.diffusion_gan import DiffusionAugment
from components.methods.losses import GANLoss, r1_penalty
from components.networks.pix2pix import PatchGAN, UNetGenerator
from components.training_stats import StatsCollector, report_discriminator_health


def build_unet_generator(model: ModelParams) -> UNetGenerator:
    params = model.method.generator
    return UNetGenerator(
        model.source_channels,
        model.target_channels,
        model.image_size,
        params.ngf,
        params.max_multiplier,
        params.norm,
        params.dropout,
    )


def build_discriminator(model: ModelParams, in_channels: int, time_conditioned: bool) -> PatchGAN:
    params = model.method.discriminator
    return PatchGAN(in_channels, params.ndf, params.n_layers, params.norm, time_conditioned)


class Pix2PixSampler(Sampler):
    """Inference: one generator call on the source."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.generator(source)


class Pix2Pix(Method):
    default_betas = (0.5, 0.999)
    default_lr_schedule = "linear_decay"

    def __init__(self, context: MethodContext):
        super().__init__(context)
        model, method = context.model, context.model.method
        self.G = context.prepare(for_split_batches(self.build_generator(), context))
        diffusion = method.diffusion_gan
        self.augment = (
            DiffusionAugment(diffusion, context.device, context.reduce, context.rank) if diffusion is not None else None
        )
        in_channels = model.source_channels + model.target_channels
        discriminator = build_discriminator(model, in_channels, time_conditioned=self.augment is not None)
        self.D = context.prepare(for_split_batches(discriminator, context))
        self.gan_loss = GANLoss(method.loss)
        self.lambda_l1 = method.loss.lambda_l1
        self.r1_gamma = method.loss.r1_gamma
        self.r1_interval = method.loss.r1_interval if method.loss.r1_gamma > 0 else 0
        # The step's fake (with G's graph, made once in begin_step) and the updated D's logits on
        # it in G-main (what ATME's memory stores).
        self._fake: torch.Tensor | None = None
        self._fake_logits: torch.Tensor | None = None

    def build_generator(self) -> nn.Module:
        return build_unet_generator(self.model)

    def networks(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D}

    def parameters_of(self, player: Player) -> list[nn.Parameter]:
        return list(self.G.parameters()) if player == "G" else list(self.D.parameters())

    def optimizer_settings(self, player: Player, lr: float, betas: tuple[float, float]) -> tuple[float, tuple[float, float]]:
        if player == "D" and self.r1_interval:
            # StyleGAN2-ADA's lazy regularisation: the D-reg steps are extra Adam steps, so the lr
            # and the betas' memory are scaled to keep D's rates per training step.
            ratio = self.r1_interval / (self.r1_interval + 1)
            return lr * ratio, (betas[0] ** ratio, betas[1] ** ratio)
        return lr, betas

    def step_plan(self, step: int) -> tuple[OptimizerStep, ...]:
        plan = [OptimizerStep("D", ("D-main",))]
        if self.r1_interval and step % self.r1_interval == 0:
            plan.append(OptimizerStep("D", ("D-reg",), gain=self.r1_interval))
        plan.append(OptimizerStep("G", ("G-main",)))
        return tuple(plan)

    def generate(self, batch: Batch) -> torch.Tensor:
        return self.G(batch["source"])

    def discriminate(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """D's logits on a pair; under Diffusion-GAN the target side is diffused first (its own t)."""
        if self.augment is None:
            return self.D(torch.cat([source, target], dim=1))
        t = self.augment.sample_t(target.shape[0])
        return self.D(torch.cat([source, self.augment.diffuse(target, t)], dim=1), t)

    def begin_step(self, batch: Batch, stats: StatsCollector) -> None:
        with self.autocast():
            self._fake = self.generate(batch)

    def accumulate_gradients(self, phase: str, batch: Batch, gain: int, stats: StatsCollector) -> None:
        source, target = batch["source"], batch["target"]
        if phase == "D-main":
            with self.autocast():
                real_logits = self.discriminate(source, target)
                fake_logits = self.discriminate(source, self._fake.detach())
                loss = self.gan_loss.discriminator(real_logits, fake_logits)
            stats.report("loss/D", loss)
            report_discriminator_health(stats, real_logits, fake_logits)
            if self.augment is not None:
                self.augment.observe_real_logits(real_logits)
            loss.mul(gain).backward()
        elif phase == "D-reg":
            # Under Diffusion-GAN the gradient is taken w.r.t. the clean real, through the
            # diffusion, as the reference (its D applies the diffusion inside).
            real = target.detach().requires_grad_(True)
            with eager(), self.autocast():
                real_logits = self.discriminate(source, real)
                penalty = r1_penalty(real_logits, real)
            stats.report("loss/R1", penalty)
            # `+ 0 * logits` keeps every D output in the graph (DDP expects it).
            (penalty * (self.r1_gamma / 2) + real_logits.float().mean() * 0).mul(gain).backward()
        elif phase == "G-main":
            fake = self._fake
            with self.autocast():
                fake_logits = self.discriminate(source, fake)
                gan = self.gan_loss.generator(fake_logits)
                l1 = (fake.float() - target).abs().mean()
                loss = gan + self.lambda_l1 * l1
            stats.report("loss/G", loss)
            stats.report("loss/G_gan", gan)
            stats.report("loss/G_L1", l1)
            self._fake_logits = fake_logits.detach()
            loss.mul(gain).backward()
        else:
            raise self._phase_error(phase)

    def after_step(self, batch: Batch, stats: StatsCollector) -> None:
        if self.augment is not None:
            self.augment.after_batch(batch["source"].shape[0])
            stats.report("diffusion/T", self.augment.T)
            stats.report("diffusion/p", self.augment.p)
            stats.report("diffusion/r_d", self.augment.r_d)
        self._fake = self._fake_logits = None

    def make_sampler(self) -> Sampler:
        return Pix2PixSampler(unwrap(self.G))

    @classmethod
    def untrained_sampler(cls, model: ModelParams) -> Sampler:
        return Pix2PixSampler(build_unet_generator(model))

    def extra_state(self, gather: Reduce | None = None) -> dict:
        return {"augment": self.augment.state_dict(gather) if self.augment is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if self.augment is not None:
            self.augment.load_state_dict(state["augment"])
