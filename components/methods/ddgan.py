"""Denoising Diffusion GAN (Xiao, Kreis, Vahdat, ICLR 2022) for paired data, with classifier-free guidance.

T (2 to 8) large VP denoising steps; each step's denoising distribution is a conditional GAN:
G(cat(y_{t+1}, x), t, z) predicts y0, the fake y_t is drawn from the DDPM posterior
q(y_t | y_{t+1}, y0_hat), and D judges cat(y_t, y_{t+1}, x) at t. Non-saturating loss,
lazy R1 on the real y_t, EMA of G for sampling. With guidance, x is replaced by the null
condition (zeros) with probability p_uncond for G and D alike, and sampling uses
(1 + w) G(., x) - w G(., null) in y0 space with the same z.
The schedule follows the official code (get_sigma_schedule / Posterior_Coefficients), and so
does the step (train_ddgan.py): D's step first, on a fresh sample (t, y_t, y_{t+1}, z), with
R1 on that same real y_t added to the same step every `r1_interval` steps, unscaled; then G's
step on another fresh sample, D frozen; then the EMA.
"""

import torch
from torch import nn

from components.config.model import DDGANParams, ModelParams
from components.data.batch import Batch
from components.methods.atme import build_ddpm_generator
from components.methods.base import (
    Method,
    MethodContext,
    OptimizerStep,
    Player,
    Reduce,
    Sampler,
    eager,
    gaussian_like,
    unwrap,
)
from components.methods.ema import EMA
from components.methods.losses import GANLoss, r1_penalty
from components.methods.pix2pix import build_discriminator
from components.training_stats import StatsCollector, report_discriminator_health

EPS_SMALL = 1e-3


def vp_schedule(num_steps: int, beta_min: float, beta_max: float) -> dict[str, torch.Tensor]:
    """float64 coefficients for T = num_steps.

    t_k = k/T (1 - 1e-3) + 1e-3, abar(t) = exp(-0.5 t^2 (beta_max - beta_min) - t beta_min),
    beta_k = 1 - abar_k / abar_{k-1} (k = 1..T).
    q(y_k | y_0) = N(a_cum[k] y_0, sigma_cum[k]^2) for k = 0..T (k = 0: beta 1e-8, clean);
    one step: y_{k+1} = a[k+1] y_k + sigma[k+1] eps.
    Posterior q(y_k | y_{k+1}, y_0), indexed by k = 0..T-1: mean coef1[k] y_0 + coef2[k] y_{k+1},
    log variance log_var[k] (clipped at 1e-20).
    """
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps * (1 - EPS_SMALL) + EPS_SMALL
    alpha_bar = torch.exp(-0.5 * t**2 * (beta_max - beta_min) - t * beta_min)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    betas_with_first = torch.cat([torch.tensor([1e-8], dtype=torch.float64), betas])
    a = torch.sqrt(1 - betas_with_first)
    a_cum = torch.cumprod(a, dim=0)
    alphas = 1 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    return {
        "betas": betas,
        "a": a,
        "sigma": torch.sqrt(betas_with_first),
        "a_cum": a_cum,
        "sigma_cum": torch.sqrt(1 - a_cum**2),
        "coef1": betas * torch.sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod),
        "coef2": (1 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1 - alphas_cumprod),
        "log_var": torch.log(variance.clamp(min=1e-20)),
    }


class DDGANSampler(Sampler):
    """Inference: y_T ~ N(0, I), then T denoising steps, each one G call (two batched with guidance).

    `guidance_weight` is a sampling-time knob; `seed`, when set, makes the noise reproducible
    (leave it None for torch.export).
    """

    def __init__(self, generator: nn.Module, params: DDGANParams, target_channels: int, guidance_weight: float):
        super().__init__()
        self.generator = generator
        self.num_steps = params.num_steps
        self.nz = params.nz
        self.target_channels = target_channels
        self.guidance_trained = params.guidance is not None
        self.guidance_weight = guidance_weight
        schedule = vp_schedule(params.num_steps, params.beta_min, params.beta_max)
        for name in ("coef1", "coef2", "log_var"):
            self.register_buffer(name, schedule[name].float(), persistent=False)

    @property
    def nfe(self) -> int:
        return self.num_steps * (2 if self.guidance_weight != 0 else 1)

    def predict_y0(self, y: torch.Tensor, source: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.guidance_weight == 0:
            return self.generator(torch.cat([y, source], dim=1), t, z)
        both = torch.cat([torch.cat([y, source], dim=1), torch.cat([y, torch.zeros_like(source)], dim=1)])
        conditional, unconditional = self.generator(both, t.repeat(2), z.repeat(2, 1)).chunk(2)
        w = self.guidance_weight
        return ((1 + w) * conditional - w * unconditional).clamp(-1, 1)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        # torch.export cannot trace `generator=None` with a dynamic batch: pass the keyword only
        # when a seed asks for reproducible noise.
        seeded = {} if self.seed is None else {"generator": torch.Generator(device=source.device).manual_seed(self.seed)}
        batch, _, height, width = source.shape
        y = torch.randn(batch, self.target_channels, height, width, device=source.device, dtype=source.dtype, **seeded)
        y0 = y
        for k in range(self.num_steps - 1, -1, -1):
            t = torch.full((batch,), float(k), device=source.device)
            z = torch.randn(batch, self.nz, device=source.device, dtype=source.dtype, **seeded)
            y0 = self.predict_y0(y, source, t, z)
            if k > 0:
                eps = torch.randn(y.shape, device=source.device, dtype=source.dtype, **seeded)
                y = self.coef1[k] * y0 + self.coef2[k] * y + torch.exp(0.5 * self.log_var[k]) * eps
        return y0


class DDGAN(Method):
    default_betas = (0.5, 0.9)
    default_lr_schedule = "cosine"

    def __init__(self, context: MethodContext):
        super().__init__(context)
        model = context.model
        method: DDGANParams = model.method
        self.params = method
        target, source = model.target_channels, model.source_channels
        self.G = context.prepare(build_ddpm_generator(model, target + source, target, latent_dim=method.nz))
        self.D = context.prepare(build_discriminator(model, 2 * target + source, time_conditioned=True))
        self.ema = EMA(unwrap(self.G), method.ema_decay)
        # The official DDGAN loss: softplus(-D(real)) + softplus(D(fake)), not halved.
        self.gan_loss = GANLoss(method.loss, discriminator_scale=1.0)
        self.lambda_l1 = method.loss.lambda_l1
        self.r1_gamma = method.loss.r1_gamma
        self.r1_interval = method.loss.r1_interval if method.loss.r1_gamma > 0 else 0
        schedule = vp_schedule(method.num_steps, method.beta_min, method.beta_max)
        self.schedule = {name: value.float().to(context.device) for name, value in schedule.items()}
        # D-main's real sample, which D-reg penalises (the official R1 is on D's real y_t).
        self._real: dict[str, torch.Tensor] = {}

    def networks(self) -> dict[str, nn.Module]:
        return {"G": self.G, "D": self.D}

    def parameters_of(self, player: Player) -> list[nn.Parameter]:
        return list(self.G.parameters()) if player == "G" else list(self.D.parameters())

    def step_plan(self, step: int) -> tuple[OptimizerStep, ...]:
        regularise = self.r1_interval and step % self.r1_interval == 0
        return (OptimizerStep("D", ("D-main", "D-reg") if regularise else ("D-main",)), OptimizerStep("G", ("G-main",)))

    def _coefficient(self, name: str, index: torch.Tensor) -> torch.Tensor:
        return self.schedule[name][index][:, None, None, None]

    def diffuse_pair(self, y0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_t, y_{t+1}) from clean y0 for integer t in 0..T-1."""
        y_t = self._coefficient("a_cum", t) * y0 + self._coefficient("sigma_cum", t) * gaussian_like(y0)
        y_next = self._coefficient("a", t + 1) * y_t + self._coefficient("sigma", t + 1) * gaussian_like(y0)
        return y_t, y_next

    def posterior_sample(self, y0: torch.Tensor, y_next: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mean = self._coefficient("coef1", t) * y0 + self._coefficient("coef2", t) * y_next
        noise = gaussian_like(y0) * (t > 0).to(y0.dtype)[:, None, None, None]
        return mean + torch.exp(0.5 * self._coefficient("log_var", t)) * noise

    def _condition(self, source: torch.Tensor) -> torch.Tensor:
        if self.params.guidance is None:
            return source
        dropped = torch.rand(source.shape[0], device=source.device) < self.params.guidance.p_uncond
        return torch.where(dropped[:, None, None, None], torch.zeros_like(source), source)

    def _fresh_sample(self, batch: Batch) -> dict[str, torch.Tensor]:
        """A training sample of the denoising GAN: t, the real pair (y_t, y_{t+1}), the condition, z."""
        target = batch["target"]
        n = target.shape[0]
        t = torch.randint(0, self.params.num_steps, (n,), device=target.device)
        y_t, y_next = self.diffuse_pair(target, t)
        condition = self._condition(batch["source"])
        z = torch.randn(n, self.params.nz, device=target.device)
        return {"t": t, "y_t": y_t, "y_next": y_next, "condition": condition, "z": z}

    def _denoise(self, sample: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(y0_hat, fake y_t): G's prediction from y_{t+1}, then a draw from the posterior."""
        y0_hat = self.G(torch.cat([sample["y_next"], sample["condition"]], dim=1), sample["t"].float(), sample["z"])
        return y0_hat, self.posterior_sample(y0_hat.float(), sample["y_next"], sample["t"])

    def _discriminate(self, y_t: torch.Tensor, sample: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.D(torch.cat([y_t, sample["y_next"], sample["condition"]], dim=1), sample["t"].float())

    def accumulate_gradients(self, phase: str, batch: Batch, gain: int, stats: StatsCollector) -> None:
        target = batch["target"]
        if phase == "D-main":
            sample = self._fresh_sample(batch)
            with self.autocast():
                with torch.no_grad():  # G's gradients here would be thrown away
                    _, fake = self._denoise(sample)
                real_logits = self._discriminate(sample["y_t"], sample)
                fake_logits = self._discriminate(fake, sample)
                loss = self.gan_loss.discriminator(real_logits, fake_logits)
            stats.report("loss/D", loss)
            report_discriminator_health(stats, real_logits, fake_logits)
            self._real = sample
            loss.mul(gain).backward()
        elif phase == "D-reg":
            sample = self._real
            real = sample["y_t"].detach().requires_grad_(True)
            with eager(), self.autocast():
                real_logits = self._discriminate(real, sample)
                penalty = r1_penalty(real_logits, real)
            stats.report("loss/R1", penalty)
            (penalty * (self.r1_gamma / 2) + real_logits.float().mean() * 0).mul(gain).backward()
        elif phase == "G-main":
            sample = self._fresh_sample(batch)
            with self.autocast():
                y0_hat, fake = self._denoise(sample)
                fake_logits = self._discriminate(fake, sample)
                gan = self.gan_loss.generator(fake_logits)
                l1 = (y0_hat.float() - target).abs().mean()
                loss = gan + self.lambda_l1 * l1
            stats.report("loss/G", loss)
            stats.report("loss/G_gan", gan)
            stats.report("loss/G_L1", l1)
            loss.mul(gain).backward()
        else:
            raise self._phase_error(phase)

    def after_step(self, batch: Batch, stats: StatsCollector) -> None:
        self.ema.update(unwrap(self.G))
        self._real = {}

    def make_sampler(self) -> Sampler:
        weight = self.params.guidance.weight if self.params.guidance is not None else 0.0
        return DDGANSampler(self.ema.shadow, self.params, self.model.target_channels, weight).to(self.device)

    @classmethod
    def untrained_sampler(cls, model: ModelParams) -> Sampler:
        method: DDGANParams = model.method
        channels = model.target_channels + model.source_channels
        generator = build_ddpm_generator(model, channels, model.target_channels, latent_dim=method.nz)
        weight = method.guidance.weight if method.guidance is not None else 0.0
        return DDGANSampler(generator, method, model.target_channels, weight)

    def extra_state(self, gather: Reduce | None = None) -> dict:
        return {"ema": self.ema.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
