"""pix2pix (Isola et al. 2017): cGAN + lambda_L1 * L1, optionally with Diffusion-GAN's D-input diffusion.

ATME (atme.py) reuses this class and changes only how the fake is generated.
"""

import torch
from torch import nn

from components.config.model import ModelParams
from components.data.batch import Batch
from components.methods.base import Autocast, Prepare, Reduce, unwrap
from components.methods.diffusion_gan import DiffusionAugment
from components.methods.losses import GANLoss, r1_penalty
from components.networks.pix2pix import PatchGAN, UNetGenerator
from components.training.health import report_discriminator_health
from components.training.stats import StatsCollector


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


class Pix2PixSampler(nn.Module):
    """Inference: one generator call on the source."""

    nfe = 1

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.generator(source)


class Pix2Pix:
    default_betas = (0.5, 0.999)

    def __init__(
        self,
        model: ModelParams,
        dataset_size: int,
        device: torch.device,
        prepare: Prepare,
        autocast: Autocast,
        reduce: Reduce | None = None,
    ):
        method = model.method
        self.model = model
        self.device = device
        self.autocast = autocast
        self.G = prepare(self.build_generator())
        diffusion = method.diffusion_gan
        self.augment = DiffusionAugment(diffusion, device, reduce) if diffusion is not None else None
        in_channels = model.source_channels + model.target_channels
        self.D = prepare(build_discriminator(model, in_channels, time_conditioned=self.augment is not None))
        self.gan_loss = GANLoss(method.loss)
        self.lambda_l1 = method.loss.lambda_l1
        self.r1_gamma = method.loss.r1_gamma
        self.r1_interval = method.loss.r1_interval if method.loss.r1_gamma > 0 else 0
        # G-main's fake (detached) and D's logits on it, reused by D-main and after_step.
        self._fake: torch.Tensor | None = None
        self._fake_logits: torch.Tensor | None = None

    def build_generator(self) -> nn.Module:
        return build_unet_generator(self.model)

    def networks(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D}

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.G.parameters())

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.D.parameters())

    def generate(self, batch: Batch) -> torch.Tensor:
        return self.G(batch["source"])

    def discriminate(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """D's logits on a pair; under Diffusion-GAN the target side is diffused first."""
        if self.augment is None:
            return self.D(torch.cat([source, target], dim=1))
        t = self.augment.sample_t(target.shape[0])
        return self.D(torch.cat([source, self.augment.diffuse(target, t)], dim=1), t)

    def accumulate_gradients(self, phase: str, batch: Batch, gain: int, stats: StatsCollector) -> None:
        source, target = batch["source"], batch["target"]
        if phase == "G-main":
            with self.autocast():
                fake = self.generate(batch)
                fake_logits = self.discriminate(source, fake)
                gan = self.gan_loss.generator(fake_logits)
                l1 = (fake.float() - target).abs().mean()
                loss = gan + self.lambda_l1 * l1
            stats.report("loss/G", loss)
            stats.report("loss/G_gan", gan)
            stats.report("loss/G_L1", l1)
            self._fake, self._fake_logits = fake.detach(), fake_logits.detach()
            loss.mul(gain).backward()
        elif phase == "D-main":
            with self.autocast():
                real_logits = self.discriminate(source, target)
                fake_logits = self.discriminate(source, self._fake)
                loss = self.gan_loss.discriminator(real_logits, fake_logits)
            stats.report("loss/D", loss)
            report_discriminator_health(stats, real_logits, fake_logits)
            if self.augment is not None:
                self.augment.observe_real_logits(real_logits)
            loss.mul(gain).backward()
        elif phase == "D-reg":
            with self.autocast():
                if self.augment is None:
                    t, real = None, target
                else:
                    t = self.augment.sample_t(target.shape[0])
                    real = self.augment.diffuse(target, t)
                real = real.detach().requires_grad_(True)
                pair = torch.cat([source, real], dim=1)
                real_logits = self.D(pair) if t is None else self.D(pair, t)
                penalty = r1_penalty(real_logits, real)
            stats.report("loss/R1", penalty)
            # `+ 0 * logits` keeps every D output in the graph (DDP expects it).
            (penalty * (self.r1_gamma / 2) + real_logits.float().mean() * 0).mul(gain).backward()
        else:
            raise ValueError(f"{type(self).__name__} has no phase {phase!r}")

    def after_step(self, batch: Batch, stats: StatsCollector) -> None:
        if self.augment is not None:
            self.augment.after_batch(batch["source"].shape[0])
            stats.report("diffusion/T", self.augment.T)
            stats.report("diffusion/p", self.augment.p)
            stats.report("diffusion/r_d", self.augment.r_d)
        self._fake = self._fake_logits = None

    def make_sampler(self) -> nn.Module:
        return Pix2PixSampler(unwrap(self.G))

    def extra_state(self) -> dict:
        return {"augment": self.augment.state_dict() if self.augment is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if self.augment is not None:
            self.augment.load_state_dict(state["augment"])
