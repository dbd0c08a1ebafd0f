"""Diffusion-GAN (Wang et al., ICLR 2023) for paired data: diffuse the target side of D's inputs.

D sees `cat(x, y_t)` with `y_t = sqrt(abar_t) y + sqrt(1 - abar_t) sigma eps` and the timestep
t; the diffusion is differentiable, so G learns through it. Half the batch (in expectation)
stays clean (t = 0); the rest draws t from {1..T}, P(t) proportional to t ("priority") or
uniform. Every `update_interval` batches the adaptive T moves with
r_d = E sign(D logits on diffused reals):
    p <- clip(p + sign(r_d - d_target) * batch * interval / (ada_kimg * 1000), 0, 1)
    T = T_min + round(p (T_max - T_min))
As in the reference, the betas are linear from beta_start to beta_end over the *current* T,
so the schedule stretches as T grows. Everything stays on the device: no host sync per step.
Under data parallelism the session's `reduce` (a sum over workers) makes r_d and the image
count global, so every worker moves to the same T; a checkpoint gathers the partial sums of
the interval in progress, and after a resume rank 0 alone holds them, so they count once.
"""

from collections.abc import Callable

import torch

from components.config.model import DiffusionGANParams
from components.methods.base import gaussian_like


class DiffusionAugment:
    def __init__(
        self,
        params: DiffusionGANParams,
        device: torch.device,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        rank: int = 0,
    ):
        self.params = params
        self.reduce = reduce
        self.rank = rank
        self.steps = torch.arange(1, params.t_max + 1, device=device, dtype=torch.float64)
        self.p = torch.zeros((), device=device, dtype=torch.float64)
        self.T = torch.full((), params.t_min, device=device, dtype=torch.long)
        self.r_d = torch.zeros((), device=device, dtype=torch.float64)
        self._sign_sum = torch.zeros((), device=device, dtype=torch.float64)
        self._sign_count = 0
        self._images = 0
        self._batches = 0

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t = prod_{i <= t} (1 - beta_i) for the current T; abar_0 = 1 (t = 0 is clean)."""
        params = self.params
        span = (self.T - 1).clamp(min=1).double()
        betas = params.beta_start + (params.beta_end - params.beta_start) * (self.steps - 1) / span
        cumulative = torch.cumsum(torch.log1p(-betas), dim=0).exp()
        abar = cumulative.gather(0, (t - 1).clamp(min=0))
        return torch.where(t > 0, abar, torch.ones_like(abar))

    def sample_t(self, batch_size: int) -> torch.Tensor:
        """t per sample: 0 with probability 1/2, else from {1..T} by the configured distribution."""
        weights = self.steps if self.params.t_distribution == "priority" else torch.ones_like(self.steps)
        weights = weights * (self.steps <= self.T)
        cdf = torch.cumsum(weights, dim=0)
        draws = torch.rand(batch_size, device=cdf.device, dtype=torch.float64) * cdf[-1]
        t = torch.searchsorted(cdf, draws, right=True) + 1
        clean = torch.rand(batch_size, device=cdf.device) < 0.5
        return torch.where(clean, torch.zeros_like(t), t)

    def diffuse(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alpha_bar(t).to(y.dtype)[:, None, None, None]
        return abar.sqrt() * y + (1 - abar).sqrt() * self.params.sigma * gaussian_like(y)

    def observe_real_logits(self, real_logits: torch.Tensor) -> None:
        self._sign_sum += real_logits.detach().sign().double().sum()
        self._sign_count += real_logits.numel()

    def after_batch(self, batch_size: int) -> None:
        self._batches += 1
        self._images += batch_size
        if self._batches % self.params.update_interval == 0:
            totals = torch.stack([self._sign_sum, *self._sign_sum.new_tensor([self._sign_count, self._images])])
            if self.reduce is not None:
                totals = self.reduce(totals)
            self.update(totals[0] / totals[1].clamp(min=1), totals[2])
            self._sign_sum.zero_()
            self._sign_count = self._images = 0

    def update(self, r_d: torch.Tensor, images: torch.Tensor | float) -> None:
        """One adaptive-T update from the mean sign of D on reals over the last `images` images."""
        params = self.params
        step = images / (params.ada_kimg * 1000)
        self.r_d = torch.as_tensor(r_d, dtype=torch.float64, device=self.p.device)
        self.p = (self.p + torch.sign(self.r_d - params.d_target) * step).clamp(0.0, 1.0)
        self.T = (params.t_min + torch.round(self.p * (params.t_max - params.t_min))).long()

    def state_dict(self, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """With `gather` (a sum over workers, a collective), the partial sums of the interval in
        progress are those of all workers."""
        sign_sum, counts = self._sign_sum, self._sign_sum.new_tensor([self._sign_count, self._images])
        if gather is not None:
            sign_sum, counts = gather(sign_sum), gather(counts)
        return {
            "p": self.p,
            "T": self.T,
            "r_d": self.r_d,
            "sign_sum": sign_sum,
            "sign_count": int(counts[0]),
            "images": int(counts[1]),
            "batches": self._batches,
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.p.device
        self.p, self.T, self.r_d = (state[key].to(device) for key in ("p", "T", "r_d"))
        self._batches = int(state["batches"])
        # The saved partial sums are the whole group's: they continue on rank 0 only, so the next
        # update's sum over workers counts them once.
        keep = self.rank == 0
        self._sign_sum = state["sign_sum"].to(device) * keep
        self._sign_count, self._images = (int(state[key]) * keep for key in ("sign_count", "images"))
