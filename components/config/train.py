"""params/train.yaml: the training loop, optimisers, LR schedule, health checks, performance switches.

The `run:` section (Ray scaling, checkpoints, MLflow tracking) is `RunParams` from
components/config/run.py.
"""

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from components.config.loading import StrictModel
from components.config.run import RunParams

PositiveInt = Annotated[int, Field(gt=0)]


class OptimizerParams(StrictModel):
    """Adam for G (with ATME's W) and for D."""

    lr_g: float = Field(2e-4, gt=0.0)
    lr_d: float = Field(2e-4, gt=0.0)
    # null: the method's published betas, (0.5, 0.999) for pix2pix and ATME, (0.5, 0.9) for DDGAN.
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] | None = None


class LRScheduleParams(StrictModel):
    """Learning-rate factor per epoch, the same for G and D.

    linear_decay: constant, then linear decay to 0 over the last `decay_epochs` (pix2pix).
    cosine: cosine from the base LR to `lr_floor` over all epochs (DDGAN).
    constant: no schedule.
    auto: cosine for DDGAN, linear_decay otherwise.
    """

    kind: Literal["auto", "linear_decay", "cosine", "constant"] = "auto"
    # null: half of `epochs` (pix2pix trains 100 constant + 100 decaying epochs).
    decay_epochs: Annotated[int, Field(ge=0)] | None = None
    lr_floor: float = Field(1e-5, ge=0.0)


class HealthParams(StrictModel):
    """The divergence detector; its checks run every `check_interval` steps (one host sync each)."""

    check_interval: PositiveInt = 50
    # A loss that is NaN or infinite stops the run at the next check.
    stop_on_nonfinite: bool = True
    # D's loss below this floor for `patience_steps` consecutive steps: D has won, G gets no signal.
    d_loss_floor: float = Field(1e-3, ge=0.0)
    # D classifying every real and fake patch correctly for `patience_steps` consecutive steps.
    stop_on_perfect_d: bool = True
    patience_steps: PositiveInt = 500


class ValidationParams(StrictModel):
    """A fixed subset of the val split scored every few epochs (L1, PSNR, SSIM as `val/...` metrics).

    The subset is the split's first `samples` samples in index order, the same every epoch and
    every run, scored by worker rank 0 with the sampler the exported generator uses.
    """

    samples: int = Field(16, ge=0)  # 0: no validation
    every_epochs: PositiveInt = 1  # and always after the last epoch
    # DDGAN trained with guidance: after the last epoch, the subset is scored at each weight w.
    guidance_weights: list[Annotated[float, Field(ge=0.0)]] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0])

    @field_validator("guidance_weights")
    @classmethod
    def _distinct(cls, weights: list[float]) -> list[float]:
        if len(set(weights)) != len(weights):
            raise ValueError("guidance weights must not repeat")
        return weights


class PerformanceParams(StrictModel):
    """Speed switches; "auto" turns each on where it helps (CUDA) and off on the CPU.

    The on/off switches take true, false or auto (YAML reads a bare on/off as true/false too).
    """

    autocast: Literal["auto", "none", "bf16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    fused_adam: bool | Literal["auto"] = "auto"
    tf32: bool = True
    # torch.compile of each network; a network that fails to compile runs eagerly with a warning.
    compile: bool | Literal["auto"] = "auto"


class TrainParams(StrictModel):
    """All of params/train.yaml."""

    epochs: PositiveInt = 4
    batch_size: PositiveInt = 8
    seed: int = 0
    optimizer: OptimizerParams = OptimizerParams()
    lr_schedule: LRScheduleParams = LRScheduleParams()
    health: HealthParams = HealthParams()
    performance: PerformanceParams = PerformanceParams()
    validation: ValidationParams = ValidationParams()
    run: RunParams = RunParams()

    @model_validator(mode="after")
    def _decay_fits(self) -> "TrainParams":
        decay = self.lr_schedule.decay_epochs
        if decay is not None and decay > self.epochs:
            raise ValueError(f"lr_schedule.decay_epochs = {decay} exceeds epochs = {self.epochs}")
        lowest = min(self.optimizer.lr_g, self.optimizer.lr_d)
        if self.lr_schedule.kind == "cosine" and self.lr_schedule.lr_floor > lowest:
            # The cosine would climb from the base LR up to the "floor" instead of decaying.
            raise ValueError(
                f"lr_schedule.lr_floor = {self.lr_schedule.lr_floor} exceeds the learning rate {lowest} "
                "(optimizer.lr_g / lr_d) that the cosine decays from"
            )
        return self
