"""The divergence detector: stops a run whose statistics say more steps will not repair it.

The statistics it watches (losses, `health/D_accuracy`) are reported by the methods to the
collector in `components/training_stats.py`, which also defines the health metrics.
"""

import torch

from components.config.train import HealthParams


class TrainingDiverged(RuntimeError):
    """Training failed in a way more steps will not repair; `reason` says which check fired."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"training diverged: {reason}")


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
