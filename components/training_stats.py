"""Statistics reported by name (a leaf module, as StyleGAN2-ADA's torch_utils/training_stats.py).

The methods and the loop report here; nothing in this module knows the loop, so the methods
(and the stages that only load a trained generator) depend on no training code.

Discriminator health, reported by every method's D-main from D's logits on real and fake pairs:
- health/D_real = -E log D(x, y), health/D_fake = -E log(1 - D(x, G(x)));
- health/V = -(D_real + D_fake), the GAN value; health/V_gap = V + log 4, which is 0 at the
  equilibrium D = 1/2;
- health/D_entropy: mean over patches of H(sigmoid(logit)), at most log 2 (ATME's diagnostic);
- health/D_accuracy: fraction of real patches with logit > 0 and fake patches with logit < 0.
"""

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

LOG4 = math.log(4.0)


class StatsCollector:
    """Methods and the loop `report(name, value)`; nothing here synchronises with the host per step.

    `step_values` holds this step's values (device tensors) for the divergence detector.
    `reduce_epoch` stacks every statistic's sum and count into one tensor, passes it through
    `reduce` when given (the Ray worker passes an all-reduce, so every rank gets the global
    means), and copies it to the host once. Every rank must report the same names.
    """

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.reduce = reduce
        self.step_values: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def begin_step(self) -> None:
        self.step_values = {}

    def report(self, name: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value).detach().float().mean()
        self.step_values[name] = value
        self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._counts[name] = self._counts.get(name, 0) + 1

    def reduce_epoch(self) -> dict[str, float]:
        """Mean of each statistic over the epoch (and over workers); resets the accumulators."""
        names = sorted(self._sums)
        if not names:
            return {}
        device = self._sums[names[0]].device
        sums = torch.stack([self._sums[name].to(device) for name in names])
        counts = torch.tensor([float(self._counts[name]) for name in names], device=device)
        packed = torch.cat([sums, counts])
        if self.reduce is not None:
            packed = self.reduce(packed)
        sums, counts = packed.split(len(names))
        means = (sums / counts.clamp(min=1)).tolist()
        self._sums, self._counts = {}, {}
        return dict(zip(names, means))

    def state_dict(self) -> dict:
        return {"sums": dict(self._sums), "counts": dict(self._counts)}

    def load_state_dict(self, state: dict) -> None:
        self._sums = {name: value.clone() for name, value in state["sums"].items()}
        self._counts = dict(state["counts"])


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
