"""GAN health metrics and the divergence detector.

Metrics (reported by every method's D-main phase, from D's logits on real and fake pairs):
- health/D_real = -E log D(x, y), health/D_fake = -E log(1 - D(x, G(x)));
- health/V = -(D_real + D_fake), the GAN value; health/V_gap = V + log 4, which is 0 at the
  equilibrium D = 1/2;
- health/D_entropy: mean over patches of H(sigmoid(logit)), at most log 2 (ATME's diagnostic);
- health/D_accuracy: fraction of real patches with logit > 0 and fake patches with logit < 0.
"""

import math

import torch
from torch.nn import functional as F

from components.config.train import HealthParams
from components.training.stats import StatsCollector

LOG4 = math.log(4.0)


class TrainingDiverged(RuntimeError):
    """Training failed in a way more steps will not repair; `reason` says which check fired."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"training diverged: {reason}")


def binary_entropy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(sigmoid(l)) = p softplus(-l) + (1 - p) softplus(l), stable for large |l|."""
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


def report_discriminator_health(stats: StatsCollector, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
    real_logits, fake_logits = real_logits.detach().float(), fake_logits.detach().float()
    d_real = F.softplus(-real_logits).mean()
    d_fake = F.softplus(fake_logits).mean()
    value = -(d_real + d_fake)
    stats.report("health/D_real", d_real)
    stats.report("health/D_fake", d_fake)
    stats.report("health/V", value)
    stats.report("health/V_gap", value + LOG4)
    entropy = torch.cat([binary_entropy_of_logits(real_logits).flatten(), binary_entropy_of_logits(fake_logits).flatten()])
    stats.report("health/D_entropy", entropy.mean())
    accuracy = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
    stats.report("health/D_accuracy", accuracy)


class DivergenceDetector:
    """Watches every step on the device; `check` (one host sync) raises `TrainingDiverged`.

    Fires on: any reported `loss/*` NaN or infinite; `loss/D` below `d_loss_floor` for
    `patience_steps` consecutive steps; `health/D_accuracy` at 1.0 for `patience_steps` steps.
    """

    def __init__(self, params: HealthParams, device: torch.device):
        self.params = params
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.low_loss_streak = torch.zeros((), dtype=torch.long, device=device)
        self.perfect_d_streak = torch.zeros((), dtype=torch.long, device=device)

    def observe(self, step_values: dict[str, torch.Tensor]) -> None:
        losses = [value for name, value in step_values.items() if name.startswith("loss/")]
        if losses:
            self.nonfinite |= ~torch.isfinite(torch.stack(losses)).all()
        if "loss/D" in step_values:
            self.low_loss_streak = (self.low_loss_streak + 1) * (step_values["loss/D"] < self.params.d_loss_floor)
        if "health/D_accuracy" in step_values:
            self.perfect_d_streak = (self.perfect_d_streak + 1) * (step_values["health/D_accuracy"] >= 1.0)

    def check(self, step: int) -> None:
        nonfinite, low_loss, perfect_d = torch.stack(
            [self.nonfinite.long(), self.low_loss_streak, self.perfect_d_streak]
        ).tolist()
        patience = self.params.patience_steps
        if nonfinite and self.params.stop_on_nonfinite:
            raise TrainingDiverged(f"a loss became NaN or infinite (detected at step {step})")
        if low_loss >= patience:
            raise TrainingDiverged(
                f"the discriminator loss stayed below {self.params.d_loss_floor} for {low_loss} steps "
                f"(step {step}): D has won and G gets no gradient"
            )
        if perfect_d >= patience and self.params.stop_on_perfect_d:
            raise TrainingDiverged(
                f"the discriminator classified every patch correctly for {perfect_d} steps (step {step}): D has collapsed G"
            )

    def state_dict(self) -> dict:
        return {"nonfinite": self.nonfinite, "low_loss_streak": self.low_loss_streak, "perfect_d_streak": self.perfect_d_streak}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite.copy_(state["nonfinite"])
        self.low_loss_streak.copy_(state["low_loss_streak"])
        self.perfect_d_streak.copy_(state["perfect_d_streak"])
