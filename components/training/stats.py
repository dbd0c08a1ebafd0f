"""Statistics reported by name, kept on the device during an epoch, reduced once per epoch."""

from collections.abc import Callable

import torch


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
